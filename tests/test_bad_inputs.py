"""A corpus of bad inputs: each ends in exit code 2 with ONE line on stderr that names the key or path and the fix,
within seconds, before Ray starts and without writing anything (learner.preflight + the typed config)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from actors.records import TrajectoryLog, to_record_batch
from learner.main import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def base(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """A valid config on the tiny model (output under a fresh directory) and the files the cases break."""
    root = tmp_path_factory.mktemp("bad_inputs")
    tree = {"model": {"path": str(tiny_model_dir)}, "sampler": {"num_steps": 6},
            "pairs": {"kind": "step_branch", "branch_steps": [0, 2]}, "reward": {"spec": {"world": 1.0}},
            "rollout": {"num_actors": 1}, "train": {"steps": 2, "batch_size": 4},
            "output": {"dir": str(root / "out" / "run")}}
    (root / "ok.yaml").write_text(yaml.safe_dump(tree))
    files = {"root": root, "config": root / "ok.yaml"}
    files["a_file"] = root / "a_file"
    files["a_file"].write_text("not a directory")
    (root / "used").mkdir()
    (root / "used" / "metrics.jsonl").write_text("{}\n")
    files["no_unet"] = root / "no_unet"
    shutil.copytree(tiny_model_dir, files["no_unet"])
    next((files["no_unet"] / "unet").glob("*.safetensors")).unlink()
    (root / "empty.txt").write_text("# only a comment\n\n")
    (root / "binary.txt").write_bytes(b"\xff\xfe\x00\x01")
    (root / "off_grammar.txt").write_text("a red circle on the left\na purple giraffe in space\n")
    (root / "empty_log").mkdir()
    for name, data in (("garbage", b"PAR1 this is not parquet"), ("truncated", None), ("foreign", None)):
        part = root / f"log_{name}" / "kind=step" / "round=000000" / "part-0-00000000.parquet"
        part.parent.mkdir(parents=True)
        if data is not None:
            part.write_bytes(data)
            continue
        pq.write_table(pa.table({"x": list(range(100))}), part)
        if name == "truncated":
            part.write_bytes(part.read_bytes()[:-20])
    clean = {"prompt": ["a red circle on the left"], "prompt_id": [0], "x0_w": torch.zeros(1, 4, 8, 8),
             "x0_l": torch.zeros(1, 4, 8, 8), "reward_w": [1.0], "reward_l": [0.0], "actor_id": [0], "round": [0]}
    TrajectoryLog(root / "log_clean").write(to_record_batch("clean", clean), round=0, actor_id=0)
    ckpts = {"ckpt_none": [], "ckpt_tmp_only": [".tmp-step-00000002-1"], "ckpt_corrupt": ["step-00000002"]}
    for name, dirs in ckpts.items():
        (root / name / "checkpoints").mkdir(parents=True)
        (root / name / "metrics.jsonl").write_text("{}\n")
        for d in dirs:
            (root / name / "checkpoints" / d).mkdir()
            (root / name / "checkpoints" / d / "manifest.json").write_text("{not json")
    (root / "bad.yaml").write_text("train: {steps: [1, 2\n")
    (root / "list.yaml").write_text("- 1\n- 2\n")
    (root / "typo.yaml").write_text("trian: {steps: 2}\n")
    (root / "dup_top.yaml").write_text("train: {steps: 2}\nloss: {beta: 0.5}\nloss: {kind: dense_dpo}\n")
    (root / "dup_nested.yaml").write_text("loss:\n  kind: dpo_logprob\n  beta: 0.5\n  kind: dense_dpo\n")
    return files


def _cases(f: dict[str, Path]) -> list[tuple[list[str], str]]:
    """(flags on top of the valid config, text the one error line must contain)."""
    r = f["root"]
    return [
        # wrong type, out of range, non-finite
        (["--loss.beta", "nan"], "loss.beta must be a finite number"),
        (["--loss.beta", ".inf"], "loss.beta must be a finite number"),
        (["--loss.beta", "0"], "loss.beta must be > 0"),
        (["--train.lr", "nan"], "train.lr must be a finite number"),
        (["--train.lr", "-1"], "train.lr must be > 0"),
        (["--train.grad_clip", ".inf"], "train.grad_clip must be a finite number"),
        (["--train.steps", "true"], "train.steps must be an integer"),
        (["--train.steps", "1.5"], "train.steps must be an integer"),
        (["--train.steps", "0"], "train.steps must be >= 1"),
        (["--train.batch_size", "many"], "train.batch_size must be an integer"),
        (["--train.max_staleness", "-1"], "train.max_staleness must be >= 0"),
        (["--train.mode", "syncc"], "train.mode must be one of"),
        (["--train.num_gpus", "nan"], "train.num_gpus must be a finite number"),
        (["--loss.kind", "nope"], "loss.kind must be one of"),
        (["--sampler.num_steps", "0"], "sampler.num_steps"),
        (["--sampler.eta", "nan"], "sampler.eta"),
        (["--pairs.branch_steps", "[99]"], "pairs.branch_steps [99] are beyond sampler.num_steps"),
        (["--reference.ema", "2"], "reference.ema must be in (0, 1]"),
        (["--reward.spec", "{world: .nan}"], "reward.spec.world must be a finite number"),
        (["--reward.spec", "{}"], "reward.spec"),
        (["--reward.spec", "{wrold: 1.0}"], "reward.spec: unknown reward 'wrold'"),
        (["--reward.options", "{world: {no_such_option: 1}}"], "reward.options.world: unknown option"),
        (["--reward.options", "{aesthetic: {}}"], "reward.options names 'aesthetic'"),
        (["--eval.every", "-1"], "eval.every must be >= 0"),
        (["--output.keep_checkpoints", "0"], "output.keep_checkpoints must be >= 1"),
        (["--output.tensorboard", "maybe"], "output.tensorboard must be true or false"),
        (["--rollout.num_actors", "0"], "rollout.num_actors must be >= 1"),
        (["--rollout.slowdown_s", "[.nan]"], "rollout.slowdown_s.0 must be a finite number"),
        (["--ray.num_cpus", "-1"], "ray.num_cpus must be >= 1"),
        (["--ray.small_box", "maybe"], "ray.small_box must be one of 'auto', 'on' or 'off', got 'maybe'"),
        (["--reward.spec", "{world: 1.0, world: 0.5}"], "--reward.spec: duplicate key 'world' (line 1)"),
        # rules between sections (learner.config's Config validator)
        (["--guidance.kind", "reward_gradient", "--reward.spec", "{world: 1.0, world_shape: 1.0}"],
         "needs a differentiable reward; ['world_shape'] in reward.spec have no gradient"),
        # unknown flags and config files
        (["--loss.betta", "1"], "did you mean 'loss.beta'"),
        (["--no-such-flag"], "unknown config key 'no-such-flag'"),
        (["--config", str(r / "missing.yaml")], "config file not found"),
        (["--config", str(r / "bad.yaml")], "is not valid YAML"),
        (["--config", str(r / "list.yaml")], "must hold a mapping of sections"),
        (["--config", str(r / "typo.yaml")], "unknown config key 'trian'"),
        (["--config", str(r / "dup_top.yaml")], f"{r / 'dup_top.yaml'}: duplicate key 'loss' (line 3)"),
        (["--config", str(r / "dup_nested.yaml")], f"{r / 'dup_nested.yaml'}: duplicate key 'kind' (line 4)"),
        # resources of a local run
        (["--ray.num_cpus", "1"], "ray.num_cpus=1 cannot place the actors"),
        (["--num-actors", "64"], "--num-actors"),
        (["--train.num_gpus", "64"], "GPUs"),
        # model directories
        (["--model.path", str(r / "no_model")], "model directory not found"),
        (["--model.path", str(f["no_unet"])], "is missing unet/"),
        (["--model.path", str(f["a_file"])], "model directory not found"),
        # prompt files
        (["--data.train_prompts", str(r / "missing.txt")], "prompt file not found"),
        (["--data.train_prompts", str(r / "empty.txt")], "holds no prompts"),
        (["--data.eval_prompts", str(r / "binary.txt")], "is not UTF-8"),
        (["--data.train_prompts", str(r / "off_grammar.txt")], "prompt 2 cannot be scored by reward 'world'"),
        (["--data.eval_prompts", "world:test"], "unknown prompt set"),
        # offline datasets
        (["--data.offline_dataset", str(r / "no_log")], "data.offline_dataset: directory not found"),
        (["--data.offline_dataset", str(r / "empty_log")], "data.offline_dataset: no trajectory records"),
        (["--data.offline_dataset", str(r / "log_garbage")], "is not a readable Parquet file"),
        (["--data.offline_dataset", str(r / "log_truncated")], "is not a readable Parquet file"),
        (["--data.offline_dataset", str(r / "log_foreign")], "not a pair record"),
        (["--data.offline_dataset", str(r / "log_clean")], "holds clean pairs, and loss.kind=dpo_logprob does not "
         "train on clean pairs"),
        # output directories and checkpoints
        (["--output.dir", str(f["a_file"] / "run")], "is a file"),
        (["--output.dir", str(r / "used")], "--output.overwrite true"),
        (["--resume"], "--resume: no complete checkpoint"),
        (["--resume", "--output.dir", str(r / "ckpt_none")], "--resume: no complete checkpoint"),
        (["--resume", "--output.dir", str(r / "ckpt_tmp_only")], "--resume: no complete checkpoint"),
        (["--resume", "--output.dir", str(r / "ckpt_corrupt")], "manifest.json is unreadable"),
        (["--resume", "--output.overwrite", "true", "--output.dir", str(r / "ckpt_corrupt")], "pick one"),
        (["--ray.address", "127.0.0.1:9"], "cannot reach the Ray cluster"),
    ]


def _snapshot(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_size for p in root.rglob("*")}


def test_every_bad_input_gets_one_line_and_exit_2(base, capsys):
    cases = _cases(base)
    assert len(cases) >= 40
    main(["--config", str(base["config"]), "--train.steps", "0"])  # the first call pays for the imports
    capsys.readouterr()
    before = _snapshot(base["root"])
    failures = []
    for flags, expected in cases:
        start = time.perf_counter()
        rc = main(["--config", str(base["config"]), *flags])
        seconds = time.perf_counter() - start
        err = capsys.readouterr().err.strip().splitlines()
        ok = rc == 2 and len(err) == 1 and err[0].startswith("error: ") and expected in err[0] and seconds < 10
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            failures.append(f"{flags}: Ray was started")
        elif not ok:
            failures.append(f"{flags}: rc={rc}, {seconds:.1f} s, stderr={err}")
        assert _snapshot(base["root"]) == before, f"{flags} wrote into {base['root']}"
    assert not failures, f"{len(failures)} of {len(cases)} bad inputs failed:\n" + "\n".join(failures)


@pytest.mark.parametrize("flags", [["--loss.betta", "1"], ["--train.steps", "true"],
                                   ["--reward.spec", "{jpeg_compressibility: 1.0}"]])  # default.yaml is guided
def test_bad_flags_through_the_real_cli(flags):
    out = subprocess.run([sys.executable, "-m", "learner.main", *flags], capture_output=True, text=True, cwd=ROOT,
                         timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_output_under_a_file_through_the_real_cli(base):
    target = base["a_file"] / "run"
    out = subprocess.run([sys.executable, "-m", "learner.main", "--config", str(base["config"]), "--output.dir",
                          str(target)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip() == (f"error: output.dir: {base['a_file']} is a file, so {target} cannot be a "
                                  "directory; choose another --output.dir")


def test_overwrite_removes_only_the_earlier_runs_outputs(tmp_path):
    from learner.preflight import check_output, clear_outputs

    out = tmp_path / "run"
    for name in ("metrics.jsonl", "summary.json", "before_after.png", "samples_eval_step00010.png", "notes.txt"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("x")
    (out / "checkpoints" / "step-00000002").mkdir(parents=True)
    check_output(out, resume=False, overwrite=True)  # accepted
    clear_outputs(out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # what the run did not write stays
