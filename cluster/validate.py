"""Offline check of a Ray cluster-launcher YAML: Ray's own schema first, then this project's rules.

    python -m cluster.validate [cluster/gpu.yaml]

Ray has no public validation API and no `ray up --dry-run`. `ray up` runs `prepare_config` (merge the
provider's defaults), fills node resources from the cloud, runs `validate_config` (JSON schema plus
cross-field rules) and bootstraps the provider; only the fill and the bootstrap touch the cloud. This module
runs the two offline steps, `ray.autoscaler._private.util.prepare_config` and `validate_config`. They are
private Ray APIs, which is why Ray is pinned (2.60.0) in constraints.txt; `prepare_config` must come first,
or `validate_config` fails with a misleading "Missing 'cluster_synced_files'" Ray-version error.

Then the project's rules, the contract with cluster/resources.py: exactly one node type offers `learner`
(with max_workers 1); at least two GPU node types offer `rollout`; custom resources are integers with known
names; a node's GPUs cover its learner + rollout units; every GPU node type names its GPU model; the head
has CPUs and no GPUs. The first problem raises ClusterConfigError (one line); the CLI prints it, exits 1.
"""

import argparse
import copy
import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from cluster.resources import ACCELERATOR_TYPE_PREFIX, LEARNER, ROLLOUT

DEFAULT_CONFIG = Path(__file__).with_name("gpu.yaml")
# Resources Ray itself defines; every other key in a node type's `resources` is a custom resource.
RAY_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


class ClusterConfigError(ValueError):
    """A cluster config that Ray or this project would reject; the message is one actionable line."""


@dataclass(frozen=True)
class NodeTypeSummary:
    name: str
    instance_type: str
    is_head: bool
    cpus: int
    gpus: int
    accelerator: str | None
    learner: int
    rollout: int
    min_workers: int
    max_workers: int

    def line(self) -> str:
        role = "head" if self.is_head else "worker"
        return (f"{self.name}: {role} {self.instance_type} CPU={self.cpus} GPU={self.gpus} "
                f"accelerator={self.accelerator or '-'} {LEARNER}={self.learner} {ROLLOUT}={self.rollout} "
                f"workers={self.min_workers}..{self.max_workers}")


def load_config(path_or_dict: str | Path | Mapping[str, Any]) -> dict:
    """A deep copy of the config (Ray's helpers mutate what they are given), loaded from YAML if a path."""
    if isinstance(path_or_dict, Mapping):
        return copy.deepcopy(dict(path_or_dict))
    path = Path(path_or_dict)
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ClusterConfigError(f"cannot read the config: {' '.join(str(e).split())}") from None
    if not isinstance(config, dict):
        raise ClusterConfigError(f"the top level must be a YAML mapping, not {type(config).__name__}")
    return config


def ray_validate(config: dict) -> dict:
    """Ray's offline steps of `ray up`; returns the config merged with the provider's defaults."""
    for key in ("provider", "available_node_types", "head_node_type"):  # prepare_config indexes these
        if key not in config:
            raise ClusterConfigError(f"missing top-level key {key!r}")
    if not isinstance(config["provider"], dict) or "type" not in config["provider"]:
        raise ClusterConfigError("provider needs a 'type' (e.g. aws, gcp)")
    try:
        prepared = prepare_config(config)
        validate_config(prepared)
    except jsonschema.ValidationError as e:
        where = ".".join(str(p) for p in e.absolute_path) or "<top level>"
        raise ClusterConfigError(f"Ray schema: {where}: {' '.join(e.message.split())}") from None
    except (ValueError, RuntimeError, NotImplementedError, KeyError, TypeError) as e:
        raise ClusterConfigError(f"Ray rejected the config: {' '.join(str(e).split())}") from None
    return prepared


def summarize(name: str, node_type: dict, head_node_type: str) -> NodeTypeSummary:
    """Check one node type's resources against the contract and summarize it."""
    resources = node_type["resources"]
    accelerators = []
    for key, value in resources.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise ClusterConfigError(f"node type {name!r}: resource {key!r} is {value!r}; node resources "
                                     f"must be integers (actors request fractions instead)")
        if key.startswith(ACCELERATOR_TYPE_PREFIX):
            accelerators.append(key.removeprefix(ACCELERATOR_TYPE_PREFIX))
        elif key not in (*RAY_RESOURCES, LEARNER, ROLLOUT):
            raise ClusterConfigError(f"node type {name!r}: unknown custom resource {key!r}; allowed: "
                                     f"{LEARNER!r}, {ROLLOUT!r}, '{ACCELERATOR_TYPE_PREFIX}<GPU model>'")
    cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
    learner, rollout = resources.get(LEARNER, 0), resources.get(ROLLOUT, 0)
    is_head = name == head_node_type
    if is_head and (cpus <= 0 or gpus):
        raise ClusterConfigError(f"head node type {name!r} must have CPUs and no GPUs (has CPU={cpus}, "
                                 f"GPU={gpus}): put GPUs on worker node types")
    if gpus < learner + rollout:
        raise ClusterConfigError(f"node type {name!r}: GPU={gpus} is fewer than {LEARNER}={learner} + "
                                 f"{ROLLOUT}={rollout}; each unit stands for one whole GPU")
    if gpus and len(accelerators) != 1:
        raise ClusterConfigError(f"node type {name!r} has GPUs but {len(accelerators)} "
                                 f"'{ACCELERATOR_TYPE_PREFIX}<GPU model>' keys; give exactly one, e.g. "
                                 f"\"{ACCELERATOR_TYPE_PREFIX}A100\": 1, so accelerator_type= requests fit")
    if not gpus and accelerators:
        raise ClusterConfigError(f"node type {name!r} names GPU model {accelerators[0]!r} but has no GPU")
    node_config = node_type["node_config"]
    instance_type = node_config.get("InstanceType") or node_config.get("machineType") or "?"  # AWS or GCP
    return NodeTypeSummary(
        name=name, instance_type=str(instance_type),
        is_head=is_head, cpus=cpus, gpus=gpus, accelerator=accelerators[0] if accelerators else None,
        learner=learner, rollout=rollout,
        min_workers=node_type["min_workers"], max_workers=node_type["max_workers"])


def validate_cluster_config(path_or_dict: str | Path | Mapping[str, Any]) -> list[NodeTypeSummary]:
    """Validate a cluster config (a YAML path or a loaded dict); one summary per node type."""
    prepared = ray_validate(load_config(path_or_dict))
    summaries = [summarize(name, node_type, prepared["head_node_type"])
                 for name, node_type in prepared["available_node_types"].items()]
    learner_types = [s for s in summaries if s.learner]
    if len(learner_types) != 1:
        raise ClusterConfigError(f"exactly one node type must offer {LEARNER!r}, found "
                                 f"{[s.name for s in learner_types] or 'none'}")
    if learner_types[0].max_workers != 1:
        raise ClusterConfigError(f"node type {learner_types[0].name!r} offers {LEARNER!r}: set "
                                 f"max_workers: 1 (has {learner_types[0].max_workers}), there is one learner")
    rollout_types = [s.name for s in summaries if s.rollout]
    if len(rollout_types) < 2:
        raise ClusterConfigError(f"at least two GPU node types must offer {ROLLOUT!r} (heterogeneous pools), "
                                 f"found {rollout_types or 'none'}")
    return summaries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.validate", description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default=str(DEFAULT_CONFIG),
                        help="cluster YAML (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.getLogger("ray.autoscaler").setLevel(logging.WARNING)  # prepare_config's INFO chatter
    try:
        summaries = validate_cluster_config(args.config)
    except ClusterConfigError as e:
        print(f"{args.config}: {e}", file=sys.stderr)
        return 1
    for summary in summaries:
        print(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
