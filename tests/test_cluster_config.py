"""cluster/gpu.yaml against Ray 2.60's own offline validation and the project's resource contract.

No network, no credentials: Ray's `prepare_config` + `validate_config` only, and a check that nothing
imports a cloud SDK on the way.
"""

import copy
import math
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import ray
import yaml
from ray._common.utils import RESOURCE_CONSTRAINT_PREFIX, resources_from_ray_options

from cluster import validate as cv
from cluster.resources import ACCELERATOR_TYPE_PREFIX, LEARNER, ROLLOUT, actor_resources

REPO = Path(__file__).resolve().parents[1]
GPU_YAML = REPO / "cluster" / "gpu.yaml"
MOUNT = "~/diffusion-pref-ray"


@pytest.fixture
def cfg() -> dict:
    return yaml.safe_load(GPU_YAML.read_text())


def test_shipped_yaml_validates():
    summaries = cv.validate_cluster_config(GPU_YAML)
    by_name = {s.name: s for s in summaries}
    assert set(by_name) == {"head", "a100", "l4"}
    head = by_name["head"]
    assert head.is_head and head.cpus > 0 and head.gpus == 0 and head.learner == head.rollout == 0
    a100, l4 = by_name["a100"], by_name["l4"]
    assert (a100.accelerator, a100.gpus, a100.learner, a100.rollout) == ("A100", 8, 4, 4)
    assert (a100.min_workers, a100.max_workers) == (1, 1)
    assert (l4.accelerator, l4.gpus, l4.learner, l4.rollout) == ("L4", 4, 0, 4)
    assert [s.line().split(":")[0] for s in summaries] == ["head", "a100", "l4"]


def test_resource_names_are_exactly_those_of_the_contract(cfg):
    assert (LEARNER, ROLLOUT) == ("learner", "rollout")
    assert ACCELERATOR_TYPE_PREFIX == RESOURCE_CONSTRAINT_PREFIX  # the prefix Ray gives accelerator_type=
    keys = {k for node_type in cfg["available_node_types"].values() for k in node_type["resources"]}
    accelerators = {k for k in keys if k.startswith(ACCELERATOR_TYPE_PREFIX)}
    assert keys - accelerators - {"CPU", "GPU"} == {LEARNER, ROLLOUT}
    assert accelerators == {"accelerator_type:A100", "accelerator_type:L4"}


def test_setup_installs_this_project_from_the_synced_tree(cfg):
    assert cfg["file_mounts"] == {MOUNT: "."}
    pip = [c for c in cfg["setup_commands"] if "pip install" in c]
    assert all(c.startswith(f"cd {MOUNT} && ") for c in pip)
    order = ["pip install -c constraints.txt torch torchvision",
             "pip install -c constraints.txt -e .",
             "pip install -c constraints.txt --no-deps image-reward==1.5 clip-anytorch==2.6.0"]
    assert [c.removeprefix(f"cd {MOUNT} && ") for c in pip] == order


def _set(path: str, value):
    """Mutator: set cfg[a][b]... (dotted path) to value."""
    def mutate(cfg: dict) -> None:
        *parents, last = path.split(".")
        node = cfg
        for key in parents:
            node = node[key]
        node[last] = value
    return mutate


def _both(*mutators):
    def mutate(cfg: dict) -> None:
        for m in mutators:
            m(cfg)
    return mutate


def _delete(path: str):
    def mutate(cfg: dict) -> None:
        *parents, last = path.split(".")
        node = cfg
        for key in parents:
            node = node[key]
        del node[last]
    return mutate


NT = "available_node_types"
BROKEN = {
    # Ray's schema: node resources are integers, node types have no unknown keys.
    "float custom resource": (_set(f"{NT}.l4.resources.rollout", 0.5),
                              ["Ray schema", f"{NT}.l4.resources.rollout", "integer"]),
    "unknown node-type key": (_set(f"{NT}.l4.accelerator_type", "L4"),
                              ["Ray schema", f"{NT}.l4", "Additional properties", "accelerator_type"]),
    "head type not a node type": (_set("head_node_type", "cpu_head"),
                                  ["head_node_type", "available_node_types"]),
    "min_workers over max": (_set(f"{NT}.l4.min_workers", 5), ["max_workers", "min_workers"]),
    "no provider": (_delete("provider"), ["missing top-level key 'provider'"]),
    # The project's rules.
    "whole-valued float (schema accepts 4.0)": (_set(f"{NT}.l4.resources.rollout", 4.0),
                                               ["'l4'", "'rollout' is 4.0", "integers"]),
    "missing learner type": (_delete(f"{NT}.a100.resources.learner"),
                             ["exactly one node type must offer 'learner'", "none"]),
    "two learner types": (_both(_set(f"{NT}.l4.resources.learner", 1), _set(f"{NT}.l4.resources.rollout", 3)),
                          ["exactly one", "'a100'", "'l4'"]),
    "learner type scales past 1": (_set(f"{NT}.a100.max_workers", 2), ["'a100'", "max_workers: 1", "has 2"]),
    "head with GPUs": (_set(f"{NT}.head.resources.GPU", 1), ["head node type 'head'", "no GPUs", "GPU=1"]),
    "head without CPUs": (_set(f"{NT}.head.resources.CPU", 0), ["head node type 'head'", "CPU=0"]),
    "one rollout pool": (_delete(f"{NT}.l4"), ["at least two GPU node types", "['a100']"]),
    "rollout above GPUs": (_set(f"{NT}.l4.resources.rollout", 5), ["'l4'", "GPU=4", "rollout=5"]),
    "learner + rollout above GPUs": (_set(f"{NT}.a100.resources.rollout", 8),
                                     ["'a100'", "GPU=8", "learner=4", "rollout=8"]),
    "misspelt custom resource": (_set(f"{NT}.l4.resources.rolout", 4), ["unknown custom resource 'rolout'"]),
    "GPU type without model": (_delete(f"{NT}.l4.resources.accelerator_type:L4"),
                               ["'l4'", "accelerator_type:"]),
    "model on a CPU type": (_set(f"{NT}.head.resources.accelerator_type:A100", 1),
                            ["'head'", "'A100'", "no GPU"]),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_variant_fails_with_one_clear_line(cfg, case):
    mutate, expected = BROKEN[case]
    mutate(cfg)
    with pytest.raises(cv.ClusterConfigError) as info:
        cv.validate_cluster_config(cfg)
    message = str(info.value)
    assert "\n" not in message
    for part in expected:
        assert part in message, (part, message)


def test_validation_leaves_the_given_dict_alone(cfg):
    before = copy.deepcopy(cfg)
    cv.validate_cluster_config(cfg)
    assert cfg == before


def test_cli_offline_without_cloud_sdks(tmp_path):
    """`python -m cluster.validate` in a fresh interpreter that refuses (and records) any cloud-SDK import."""
    broken = yaml.safe_load(GPU_YAML.read_text())
    broken[NT]["head"]["resources"]["GPU"] = 1
    broken_path = tmp_path / "broken.yaml"
    broken_path.write_text(yaml.safe_dump(broken))
    script = textwrap.dedent(f"""
        import runpy, sys
        attempts = []
        class Refuse:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("boto3", "botocore", "googleapiclient", "google_auth_httplib2"):
                    attempts.append(name)
                    raise ImportError("cloud SDK import refused by the test: " + name)
        sys.meta_path.insert(0, Refuse())
        codes = []
        for argv in ([], [{str(broken_path)!r}]):
            sys.argv = ["cluster.validate", *argv]
            try:
                runpy.run_module("cluster.validate", run_name="__main__")
            except SystemExit as e:
                codes.append(e.code)
        print("RESULT", codes, attempts)
    """)
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert "RESULT [0, 1] []" in run.stdout
    summary = [line for line in run.stdout.splitlines() if not line.startswith("RESULT")]
    assert [line.split(":")[0] for line in summary] == ["head", "a100", "l4"]
    errors = [line for line in run.stderr.splitlines() if line.startswith(str(broken_path))]
    assert len(errors) == 1 and "no GPUs" in errors[0]


def test_cli_reports_unreadable_file(tmp_path, capsys):
    assert cv.main([str(tmp_path / "missing.yaml")]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "missing.yaml" in err and "cannot read" in err


def test_gcp_overrides_in_notes_validate(cfg):
    """The 'Switching to GCP' block of cluster/NOTES.md, merged into gpu.yaml, passes the same checks."""
    notes = (REPO / "cluster" / "NOTES.md").read_text()
    block = re.search(r"```yaml\n# gcp-overrides\n(.*?)```", notes, re.S)
    assert block, "NOTES.md lost its '# gcp-overrides' yaml block"
    overrides = yaml.safe_load(block.group(1))
    for key in ("provider", "auth", "head_setup_commands"):
        cfg[key] = overrides[key]
    assert set(overrides[NT]) == set(cfg[NT])
    for name, node_type in overrides[NT].items():
        cfg[NT][name]["node_config"] = node_type["node_config"]
    summaries = cv.validate_cluster_config(cfg)
    assert {s.name: s.instance_type for s in summaries} == {
        "head": "n2-standard-16", "a100": "a2-highgpu-8g", "l4": "g2-standard-48"}


# ---------------------------------------------------------------------------------------- actor_resources

@pytest.mark.parametrize(("args", "expected"), [
    (("learner", 1, "A100"), {"num_gpus": 1, "resources": {"learner": 1}, "accelerator_type": "A100"}),
    (("learner", 1, None), {"num_gpus": 1, "resources": {"learner": 1}}),
    (("rollout", 1, "L4"), {"num_gpus": 1, "resources": {"rollout": 1}, "accelerator_type": "L4"}),
    (("rollout", 2, None), {"num_gpus": 2, "resources": {"rollout": 2}}),
    (("reward", 0.25, None), {"num_gpus": 0.25, "resources": {"rollout": 0.25}}),
    (("reward", 0.5, "A100"), {"num_gpus": 0.5, "resources": {"rollout": 0.5}, "accelerator_type": "A100"}),
    (("reward", 0, None), {"num_gpus": 0, "resources": {}}),
])
def test_actor_resources(args, expected):
    kwargs = actor_resources(*args)
    assert kwargs == expected
    ray.remote(**kwargs)(type("Actor", (), {}))  # Ray's own option validation accepts them


@pytest.mark.parametrize(("args", "fits_on"), [
    (("learner", 1, "A100"), {"a100"}),
    (("learner", 1, "L4"), set()),
    (("rollout", 1, "L4"), {"l4"}),
    (("rollout", 1, None), {"a100", "l4"}),
    (("rollout", 4, None), {"a100", "l4"}),    # 4 rollout GPUs on the learners' node, never more
    (("rollout", 5, None), set()),
    (("learner", 4, None), {"a100"}),          # a group of 4 learner ranks fits the A100 node
    (("reward", 0.25, "A100"), {"a100"}),
    (("reward", 0, None), {"head", "a100", "l4"}),
])
def test_actor_demand_fits_the_intended_node_types(cfg, args, fits_on):
    """Ray's demand for the kwargs (its own translation) against each node type's total resources."""
    demand = resources_from_ray_options(actor_resources(*args))
    fits = {name for name, node_type in cfg[NT].items()
            if all(node_type["resources"].get(k, 0) >= v for k, v in demand.items() if v)}
    assert fits == fits_on


@pytest.mark.parametrize(("args", "expected"), [
    (("critic", 1, None), ["'critic'", "learner", "rollout", "reward"]),
    (("rollout", -1, None), ["num_gpus", ">= 0"]),
    (("rollout", math.nan, None), ["num_gpus", "finite"]),
    (("rollout", True, None), ["num_gpus"]),
    (("rollout", "1", None), ["num_gpus"]),
    (("rollout", 1.5, None), ["whole number", "1.5"]),
    (("rollout", 1, "accelerator_type:L4"), ["bare GPU model", "accelerator_type:L4"]),
    (("rollout", 1, ""), ["bare GPU model"]),
    (("reward", 0, "L4"), ["num_gpus > 0", "reward"]),
])
def test_actor_resources_rejects_bad_input(args, expected):
    with pytest.raises(ValueError) as info:
        actor_resources(*args)
    for part in expected:
        assert part in str(info.value), (part, str(info.value))
