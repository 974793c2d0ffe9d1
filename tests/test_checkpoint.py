"""learner/checkpoint.py: bitwise round trips, exact resume, crash safety, corruption, retention."""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import learner.checkpoint as ckpt
from learner.checkpoint import (
    CheckpointError,
    RngSnapshot,
    capture_rng,
    latest_checkpoint,
    load_checkpoint,
    optimizer_state_to_tensors,
    restore_rng,
    save_checkpoint,
    tensors_to_optimizer_state,
)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _same(a: object, b: object) -> bool:
    """Structural equality with exact container types and bitwise tensors (dtype and shape included)."""
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(_bits(a), _bits(b)))
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _sample_tensors() -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(4, 6, generator=g, dtype=torch.float64)
    return {
        "policy": {"a.lora_A": torch.randn(3, 5, generator=g),
                   "a.lora_B": torch.randn(5, 3, generator=g).bfloat16(),
                   "scalar": torch.tensor(1.5, dtype=torch.float64), "empty": torch.zeros(0, 2)},
        "ref": {"strided": wide[:, ::2], "ints": torch.randint(-5, 5, (7,), generator=g, dtype=torch.int64),
                "nan_inf": torch.tensor([float("nan"), float("inf"), -0.0])},
        "extra": {},
    }


def _manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def test_round_trip_bitwise_and_layout(tmp_path: Path) -> None:
    tensors = _sample_tensors()
    state = {"step": 120, "driver": {"cursor": 17, "log_offset": 4096, "names": ["a", "b"]}, "lr": 0.1 + 0.2}
    path = save_checkpoint(tmp_path, 120, tensors, state)
    assert path == tmp_path / "step-00000120"
    assert sorted(p.name for p in path.iterdir()) == [
        "extra.safetensors", "manifest.json", "policy.safetensors", "ref.safetensors", "state.json"]
    assert (tmp_path / "latest").read_text().strip() == "step-00000120"
    assert not list(tmp_path.glob(".tmp-*"))
    # the manifest's digests are those of the bytes on disk (recomputed here, independently)
    for name, meta in _manifest(path)["files"].items():
        data = (path / name).read_bytes()
        assert meta == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}

    loaded, loaded_state = load_checkpoint(path)
    assert loaded_state == state and loaded_state["lr"] == 0.1 + 0.2
    assert set(loaded) == set(tensors)
    for group, flat in tensors.items():
        assert set(loaded[group]) == set(flat)
        for k, t in flat.items():
            assert _same(t.contiguous(), loaded[group][k]), (group, k)


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(4, 8)
        self.b = torch.nn.Linear(8, 2)
        self.drop = torch.nn.Dropout(0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.drop(torch.tanh(self.a(x))))


def _train(net: _Net, opt: torch.optim.Optimizer, gen: torch.Generator, steps: int) -> None:
    """Every source of randomness the learner may touch drives the batch, so a missed RNG breaks equality."""
    for _ in range(steps):
        x = torch.randn(5, 4, generator=gen) + random.random() + float(np.random.standard_normal())
        y = torch.randn(5, 2)  # torch global RNG, as is the dropout mask
        loss = (net(x) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _make(seed: int) -> tuple[_Net, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    net = _Net()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1, amsgrad=True)
    return net, opt


def test_resume_continues_training_bitwise(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(1)
    net, opt = _make(0)
    gen = torch.Generator().manual_seed(2)
    _train(net, opt, gen, 3)

    rng = capture_rng({"data": gen})
    opt_t, opt_skel = optimizer_state_to_tensors(opt.state_dict())
    save_checkpoint(tmp_path, 3, {"policy": dict(net.state_dict()), "optimizer": opt_t, "rng": rng.tensors},
                    {"step": 3, "rng": rng.json, "optimizer": opt_skel, "driver": {"cursor": 15}})
    _train(net, opt, gen, 4)
    uninterrupted = {k: v.clone() for k, v in net.state_dict().items()}

    # a fresh process: different weights, different RNG positions, then resume
    random.seed(99)
    np.random.seed(99)
    net2, opt2 = _make(7)
    gen2 = torch.Generator().manual_seed(99)
    tensors, state = load_checkpoint(latest_checkpoint(tmp_path))
    net2.load_state_dict(tensors["policy"])
    opt2.load_state_dict(tensors_to_optimizer_state(tensors["optimizer"], state["optimizer"]))
    restore_rng(RngSnapshot(state["rng"], tensors["rng"]), {"data": gen2})
    assert state["driver"] == {"cursor": 15}
    _train(net2, opt2, gen2, 4)
    for k, v in uninterrupted.items():
        assert torch.equal(v, net2.state_dict()[k]), k


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.AdamW(p, lr=torch.tensor(1e-3), betas=(0.9, 0.99)),
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.0),
    lambda p: torch.optim.SGD(
        [{"params": p[:1], "lr": 0.5}, {"params": p[1:], "nesterov": True, "momentum": 0.9}], lr=0.1
    ),
])
def test_optimizer_codec_round_trip(make_opt) -> None:
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    opt = make_opt(list(net.parameters()))
    for _ in range(2):
        opt.zero_grad()
        net(torch.randn(4, 3)).sum().backward()
        opt.step()
    sd = opt.state_dict()
    tensors, skeleton = optimizer_state_to_tensors(sd)
    skeleton = json.loads(json.dumps(skeleton, allow_nan=False))  # it must be plain JSON
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())
    assert _same(tensors_to_optimizer_state(tensors, skeleton), sd)


def test_optimizer_codec_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"/param_groups/0/fn holds a function"):
        optimizer_state_to_tensors({"param_groups": [{"fn": lambda: 0}]})
    tensors, skeleton = optimizer_state_to_tensors({"state": {0: {"m": torch.ones(2)}}})
    with pytest.raises(ValueError, match="not referenced"):
        tensors_to_optimizer_state({**tensors, "stray": torch.ones(1)}, skeleton)
    with pytest.raises(ValueError, match="references tensor '0'"):
        tensors_to_optimizer_state({}, skeleton)


def _draws(gens: dict[str, torch.Generator]) -> list:
    out = [random.random(), random.gauss(0, 1), np.random.standard_normal(3).tolist(),
           np.random.randint(1 << 30), torch.randn(4).tolist()]
    out += [torch.rand(3, generator=g).tolist() for g in gens.values()]
    if torch.cuda.is_available():
        out.append(torch.randn(3, device="cuda").tolist())
    return out


def test_rng_restore_repeats_every_stream() -> None:
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    gens = {"noise": torch.Generator().manual_seed(5), "prompts": torch.Generator().manual_seed(6)}
    random.gauss(0, 1)  # leaves a cached Gaussian in python's state ...
    np.random.standard_normal()  # ... and in numpy's (has_gauss = 1): both must be restored too
    snap = capture_rng(gens)
    assert snap.json["python"][2] is not None and snap.json["numpy"][3] == 1
    js = json.loads(json.dumps(snap.json, allow_nan=False))  # what a checkpoint stores
    first = _draws(gens)
    _draws(gens)  # move every stream further
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    restore_rng(RngSnapshot(js, snap.tensors), gens)
    assert _draws(gens) == first


def test_rng_restore_checks_generator_names() -> None:
    snap = capture_rng({"noise": torch.Generator()})
    with pytest.raises(ValueError, match=r"got generators \[\].*holds \['noise'\]"):
        restore_rng(snap)
    with pytest.raises(ValueError, match=r"\['extra', 'noise'\]"):
        restore_rng(snap, {"noise": torch.Generator(), "extra": torch.Generator()})


def _tiny(step: int) -> dict[str, dict[str, torch.Tensor]]:
    return {"policy": {"w": torch.full((2, 2), float(step))}, "optimizer": {"0": torch.arange(3.0) + step}}


# the 2nd group file; the manifest (2nd _write_bytes, after state.json); the fsync just before the rename
@pytest.mark.parametrize(("fail_at", "call"), [("_write_group", 2), ("_write_bytes", 2), ("_fsync_dir", 1)])
def test_crash_mid_save_leaves_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   fail_at: str, call: int) -> None:
    save_checkpoint(tmp_path, 10, _tiny(10), {"step": 10})
    real = getattr(ckpt, fail_at)
    calls = []

    def crash(*args, **kwargs):
        calls.append(args)
        if len(calls) == call:
            raise OSError("disk full (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt, fail_at, crash)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(tmp_path, 20, _tiny(20), {"step": 20})
    monkeypatch.undo()
    assert len(calls) == call
    assert not (tmp_path / "step-00000020").exists() and not list(tmp_path.glob(".tmp-*"))
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000010"
    assert (tmp_path / "latest").read_text().strip() == "step-00000010"
    tensors, state = load_checkpoint(latest_checkpoint(tmp_path))
    assert state == {"step": 10} and torch.equal(tensors["policy"]["w"], torch.full((2, 2), 10.0))


def test_killed_writer_leftovers_are_never_loaded_and_get_cleaned(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    save_checkpoint(tmp_path, 10, _tiny(10), {"step": 10})
    # what a SIGKILL leaves: a temp dir with a full manifest, and a step dir that lost its manifest
    stale = tmp_path / ".tmp-step-00000020-12345"
    stale.mkdir()
    for f in (tmp_path / "step-00000010").iterdir():
        (stale / f.name).write_bytes(f.read_bytes())
    (tmp_path / "step-00000030").mkdir()
    (tmp_path / "step-00000030" / "policy.safetensors").write_bytes(b"partial")
    with caplog.at_level(logging.WARNING, logger="learner.checkpoint"):
        assert latest_checkpoint(tmp_path) == tmp_path / "step-00000010"
    assert "step-00000030" in caplog.text and "manifest.json is missing" in caplog.text
    with pytest.raises(CheckpointError, match=r"step-00000030/manifest.json is missing"):
        load_checkpoint(tmp_path / "step-00000030")
    save_checkpoint(tmp_path, 11, _tiny(11), {"step": 11})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000010", "step-00000011"]


@pytest.mark.parametrize("victim", ["policy.safetensors", "state.json", "manifest.json"])
def test_corrupt_file_falls_back_to_previous(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                             victim: str) -> None:
    save_checkpoint(tmp_path, 1, _tiny(1), {"step": 1})
    newest = save_checkpoint(tmp_path, 2, _tiny(2), {"step": 2})
    data = bytearray((newest / victim).read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit, size unchanged
    (newest / victim).write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="learner.checkpoint"):
        assert latest_checkpoint(tmp_path) == tmp_path / "step-00000001"
    assert f"skipping checkpoint {newest}" in caplog.text
    with pytest.raises(CheckpointError, match=rf"step-00000002/{victim} (does not match|is unreadable)"):
        load_checkpoint(newest)


def test_truncated_or_missing_file_is_rejected(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, 5, _tiny(5), {"step": 5})
    (path / "optimizer.safetensors").write_bytes((path / "optimizer.safetensors").read_bytes()[:-1])
    with pytest.raises(CheckpointError, match=r"optimizer.safetensors does not match.*size"):
        load_checkpoint(path)
    (path / "optimizer.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"optimizer.safetensors is missing"):
        load_checkpoint(path)
    assert latest_checkpoint(tmp_path) is None


def test_retention_keeps_newest(tmp_path: Path) -> None:
    for step in (0, 5, 10, 15, 20):
        save_checkpoint(tmp_path, step, _tiny(step), {"step": step}, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000015", "step-00000020"]
    save_checkpoint(tmp_path, 25, _tiny(25), {"step": 25}, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000025"]


def test_resave_same_step_replaces_and_newer_checkpoints_are_kept(tmp_path: Path) -> None:
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, step, _tiny(step), {"step": step, "run": "old"})
    # saving 20 again replaces it; pruning never removes a newer checkpoint (30), nor more than keep allows
    save_checkpoint(tmp_path, 20, _tiny(20), {"step": 20, "run": "new"}, keep=1)
    assert load_checkpoint(tmp_path / "step-00000020")[1] == {"step": 20, "run": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-00000020", "step-00000030"]


def _forge(path: Path, group: str, data: bytes) -> None:
    """Rewrite ``path``'s manifest to list tensor group ``group`` (its file holding ``data``), checksum included."""
    manifest = _manifest(path)
    digest = hashlib.sha256(data).hexdigest()
    manifest["groups"] = [group]
    manifest["files"] = {"state.json": manifest["files"]["state.json"],
                         f"{group}.safetensors": {"sha256": digest, "size": len(data)}}
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    manifest["checksum"] = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("group", ["../outside", "/tmp/outside", "a/b", "..", ".hidden"])
def test_manifest_group_names_cannot_leave_the_checkpoint(tmp_path: Path, group: str) -> None:
    path = save_checkpoint(tmp_path / "ckpt", 1, _tiny(1), {"step": 1})
    data = (path / "policy.safetensors").read_bytes()
    (tmp_path / "outside.safetensors").write_bytes(data)  # what a crafted manifest would point at
    (tmp_path / "ckpt" / "outside.safetensors").write_bytes(data)
    _forge(path, group, data)
    with pytest.raises(CheckpointError, match="not a plain file name"):
        load_checkpoint(path)
    assert latest_checkpoint(tmp_path / "ckpt") is None


def test_empty_or_missing_root_has_no_checkpoint(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None
    assert latest_checkpoint(tmp_path / "never_created") is None


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"step": -1}, "step must be an int >= 0"),
    ({"step": 1.0}, "step must be an int >= 0"),
    ({"keep": 0}, "keep must be an int >= 1"),
    ({"tensors": {"../up": {}}}, r"group name '../up'"),
    ({"tensors": {"policy": {"w": [1.0]}}}, r"tensors\['policy'\] must map str -> torch.Tensor"),
    ({"state": {"t": torch.ones(1)}}, "state is not strict JSON"),
    ({"state": {"nan": float("nan")}}, "state is not strict JSON"),
    ({"state": {"betas": (0.9, 0.99)}}, "JSON round trip"),
    ({"state": {1: "a"}}, "JSON round trip"),
])
def test_save_rejects_bad_input(tmp_path: Path, kwargs: dict, match: str) -> None:
    args = {"root": tmp_path, "step": 1, "tensors": _tiny(1), "state": {"step": 1}} | kwargs
    with pytest.raises(ValueError, match=match):
        save_checkpoint(**args)
    assert latest_checkpoint(tmp_path) is None and not list(tmp_path.iterdir())
