"""Atomic, verified learner checkpoints with exact resume.

Layout: ``root/step-00000120/{manifest.json, state.json, <group>.safetensors...}`` plus ``root/latest``
(the name of the newest committed directory, for scripts and humans). Nothing is unpickled: tensors are
safetensors, everything else strict JSON.

Atomicity: a save writes into ``root/.tmp-step-…-<pid>/``, fsyncs every file, writes ``manifest.json`` LAST
(sha256 + size of every other file), fsyncs the directory and only then renames it to ``step-…``. A crash at
any point leaves either no ``step-…`` directory or a complete one; leftover ``.tmp-*`` directories are removed
by the next save. ``latest_checkpoint`` re-hashes before trusting a directory, so a later corruption (bit rot,
a truncated copy) falls back to the previous checkpoint instead of resuming from garbage. One writer per root.

Optimizer state: flattened to tensors (a safetensors group) + a JSON skeleton rather than ``torch.save``.
Both round-trip AdamW bitwise; this keeps one pickle-free format (``torch.load(weights_only=True)`` has had
escapes, e.g. CVE-2025-32434) and fits the ``(tensors, state)`` API with no third kind of file.

Usage in the learner::

    rng = capture_rng({"noise": gen})
    opt_t, opt_skel = optimizer_state_to_tensors(opt.state_dict())
    save_checkpoint(root, step, {"policy": lora, "optimizer": opt_t, "rng": rng.tensors},
                    {"step": step, "rng": rng.json, "optimizer": opt_skel, "driver": driver_state})
    ...
    tensors, state = load_checkpoint(latest_checkpoint(root))
    opt.load_state_dict(tensors_to_optimizer_state(tensors["optimizer"], state["optimizer"]))
    restore_rng(RngSnapshot(state["rng"], tensors["rng"]), {"noise": gen})
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

logger = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "manifest.json"
STATE = "state.json"
LATEST = "latest"
_STEP_DIR = re.compile(r"step-(\d+)")
_GROUP = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_CHUNK = 1 << 20


class CheckpointError(RuntimeError):
    """A checkpoint directory is incomplete, corrupt or not in this format."""


# ---------------------------------------------------------------------------------------------- saving


def _step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_group(path: Path, group: str, tensors: Mapping[str, Tensor]) -> None:
    for key, t in tensors.items():
        if not isinstance(key, str) or not isinstance(t, Tensor):
            raise ValueError(
                f"tensors[{group!r}] must map str -> torch.Tensor, got {key!r} -> {type(t).__name__}"
            )
    save_file({k: t.detach().cpu().contiguous() for k, t in tensors.items()}, str(path))
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _file_digest(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _state_json(state: Mapping[str, Any]) -> bytes:
    """Strict JSON that must load back equal: tuples, non-str keys or NaN would not resume identically."""
    if not isinstance(state, Mapping):
        raise ValueError(f"state must be a JSON object (dict), got {type(state).__name__}")
    try:
        text = json.dumps(state, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f"state is not strict JSON: {e}") from e
    if json.loads(text) != state:
        raise ValueError("state does not survive a JSON round trip: use lists, not tuples, and str keys only")
    return text.encode()


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """Committed-looking ``step-N`` directories, newest first."""
    if not root.is_dir():
        return []
    matches = ((_STEP_DIR.fullmatch(p.name), p) for p in root.iterdir())
    return sorted(((int(m.group(1)), p) for m, p in matches if m and p.is_dir()), reverse=True)


def _prune(root: Path, step: int, keep: int) -> None:
    """Keep the newest ``keep`` manifests up to ``step``; drop older ones, uncommitted ones and stale temps.

    A committed directory with a larger step is never removed: only a resume that found it corrupt leaves one
    behind, and it stays for inspection.
    """
    kept = 0
    for s, path in _step_dirs(root):
        committed = (path / MANIFEST).is_file()
        if s > step and committed:
            continue
        if s <= step and committed and kept < keep:
            kept += 1
            continue
        shutil.rmtree(path, ignore_errors=True)
    for path in root.glob(".tmp-*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def save_checkpoint(
    root: Path,
    step: int,
    tensors: Mapping[str, Mapping[str, Tensor]],
    state: Mapping[str, Any],
    keep: int = 3,
) -> Path:
    """Atomically write ``tensors`` (a safetensors file per group) and JSON ``state`` as ``root/step-N``.

    Returns the committed directory. Re-saving an existing step (a resume that repeats it) replaces it.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be an int >= 1, got {keep!r}")
    for group in tensors:
        if not isinstance(group, str) or not _GROUP.fullmatch(group):
            raise ValueError(f"tensor group name {group!r} must match {_GROUP.pattern} (it names a file)")
    state_bytes = _state_json(state)

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = _step_dir_name(step)
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        files: dict[str, dict[str, Any]] = {}
        for group in sorted(tensors):
            _write_group(tmp / f"{group}.safetensors", group, tensors[group])
        _write_bytes(tmp / STATE, state_bytes)
        for path in sorted(tmp.iterdir()):
            digest, size = _file_digest(path)
            files[path.name] = {"sha256": digest, "size": size}
        body = {"format": FORMAT, "step": step, "groups": sorted(tensors), "files": files}
        manifest = {**body, "checksum": _body_checksum(body)}
        _write_bytes(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
        _fsync_dir(tmp)
        if final.exists():
            old = root / f".tmp-replaced-{name}-{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pointer = root / f".tmp-{LATEST}-{os.getpid()}"
    _write_bytes(pointer, f"{name}\n".encode())
    os.replace(pointer, root / LATEST)
    _fsync_dir(root)
    _prune(root, step, keep)
    return final


# --------------------------------------------------------------------------------------------- loading


def _body_checksum(body: Mapping[str, Any]) -> str:
    """sha256 of the manifest minus this field, so a damaged manifest is reported as itself."""
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _verify(path: Path) -> dict[str, Any]:
    """Check the manifest and every file's size and sha256; return the manifest or raise CheckpointError."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{manifest_path} is missing: the checkpoint was never committed")
    try:
        manifest = json.loads(manifest_path.read_bytes())
        body = {k: v for k, v in manifest.items() if k != "checksum"}
        intact = manifest["checksum"] == _body_checksum(body)
        files, groups, step = manifest["files"], manifest["groups"], manifest["step"]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{manifest_path} is unreadable: {e!r}") from e
    if not intact:
        raise CheckpointError(f"{manifest_path} does not match its own checksum: corrupt or modified")
    listed = groups if isinstance(groups, list) else [groups]
    bad = [g for g in listed if not isinstance(g, str) or not _GROUP.fullmatch(g)]
    if bad:  # a group names a file: "../x" or "/x" would read outside the checkpoint directory
        raise CheckpointError(f"{manifest_path} names tensor group {bad[0]!r}, which is not a plain file name "
                              f"({_GROUP.pattern}): refusing to read outside the checkpoint")
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{manifest_path} has format {manifest.get('format')!r}, expected {FORMAT}")
    m = _STEP_DIR.fullmatch(path.name)
    if m and int(m.group(1)) != step:
        raise CheckpointError(f"{manifest_path} says step {step}, the directory name says {m.group(1)}")
    expected = {STATE} | {f"{g}.safetensors" for g in groups}
    if set(files) != expected:
        raise CheckpointError(f"{manifest_path} lists {sorted(files)}, expected {sorted(expected)}")
    for fname, meta in files.items():
        fpath = path / fname
        if not fpath.is_file():
            raise CheckpointError(f"{fpath} is missing")
        digest, size = _file_digest(fpath)
        if size != meta["size"] or digest != meta["sha256"]:
            raise CheckpointError(f"{fpath} does not match its manifest entry (size {size} vs "
                                  f"{meta['size']}, or sha256 differs): corrupt or modified")
    return manifest


def latest_checkpoint(root: Path, skipped: list[str] | None = None) -> Path | None:
    """The newest ``step-N`` directory that verifies; corrupt or uncommitted ones are skipped with a warning (or,
    when ``skipped`` is given, with their reasons appended to it instead).

    Scans rather than trusting ``root/latest``: a crash between the rename and the pointer update leaves the
    pointer one behind, and only hashing tells a good directory from a damaged one.
    """
    for _, path in _step_dirs(Path(root)):
        try:
            _verify(path)
        except CheckpointError as e:
            if skipped is None:
                logger.warning("skipping checkpoint %s: %s", path, e)
            else:
                skipped.append(str(e))
            continue
        return path
    return None


def load_checkpoint(path: Path) -> tuple[dict[str, dict[str, Tensor]], dict[str, Any]]:
    """Verify, then load ``(tensors by group, state)``; a mismatch raises CheckpointError naming the file."""
    path = Path(path)
    manifest = _verify(path)
    tensors = {g: load_file(str(path / f"{g}.safetensors")) for g in manifest["groups"]}
    return tensors, json.loads((path / STATE).read_bytes())


# ------------------------------------------------------------------------------------- optimizer state


def optimizer_state_to_tensors(state_dict: Mapping[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into flat tensors and a JSON skeleton that references them by name.

    The skeleton tags dicts (``{"__dict__": [[key, value], ...]}``, so int parameter ids stay ints), tuples
    (``{"__tuple__": [...]}``, e.g. Adam's betas) and tensors (``{"__tensor__": name}``); lists, numbers,
    strings, booleans and None are stored as themselves.
    """
    tensors: dict[str, Tensor] = {}
    skeleton = _encode(state_dict, "", tensors)
    return tensors, skeleton


def tensors_to_optimizer_state(tensors: Mapping[str, Tensor], skeleton: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of ``optimizer_state_to_tensors``; every tensor must be referenced exactly once."""
    used: set[str] = set()
    state = _decode(skeleton, tensors, used)
    if extra := set(tensors) - used:
        raise ValueError(f"optimizer tensors {sorted(extra)[:5]} are not referenced by the skeleton")
    return state


def _encode(obj: Any, where: str, out: dict[str, Tensor]) -> Any:
    if isinstance(obj, Tensor):
        name = str(len(out))
        out[name] = obj.detach()
        return {"__tensor__": name}
    if isinstance(obj, Mapping):
        pairs = []
        for k, v in obj.items():
            if not isinstance(k, str | int):
                raise ValueError(f"optimizer state key {k!r} at {where or '/'} must be a str or an int")
            pairs.append([k, _encode(v, f"{where}/{k}", out)])
        return {"__dict__": pairs}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{where}/{i}", out) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{where}/{i}", out) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise ValueError(f"optimizer state at {where or '/'} holds a {type(obj).__name__}; "
                     "only tensors, dicts, lists, tuples, numbers, strings and None can be checkpointed")


def _decode(node: Any, tensors: Mapping[str, Tensor], used: set[str]) -> Any:
    if isinstance(node, list):
        return [_decode(v, tensors, used) for v in node]
    if not isinstance(node, dict):
        return node
    if len(node) != 1:
        raise ValueError(f"optimizer skeleton node {sorted(node)} must have exactly one tag")
    ((tag, value),) = node.items()
    if tag == "__tensor__":
        if value not in tensors:
            raise ValueError(f"optimizer skeleton references tensor {value!r}, which is not in the tensors")
        used.add(value)
        return tensors[value]
    if tag == "__tuple__":
        return tuple(_decode(v, tensors, used) for v in value)
    if tag == "__dict__":
        return {k: _decode(v, tensors, used) for k, v in value}
    raise ValueError(f"optimizer skeleton tag {tag!r} is not one of __dict__, __tuple__, __tensor__")


# ---------------------------------------------------------------------------------------------- RNG


class RngSnapshot(NamedTuple):
    """RNG state for a checkpoint: ``json`` goes into ``state``, ``tensors`` into a safetensors group."""

    json: dict[str, Any]
    tensors: dict[str, Tensor]


def capture_rng(generators: Mapping[str, torch.Generator] | None = None) -> RngSnapshot:
    """Snapshot python ``random``, numpy's global RNG, torch CPU, each visible CUDA device and ``generators``.

    Python and numpy states become JSON lists (exact: ints, and a float that JSON round-trips by repr); torch
    states are already uint8 tensors.
    """
    generators = dict(generators or {})
    version, words, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    json_part = {
        "python": [version, list(words), gauss_next],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "cuda_devices": len(cuda),
        "generators": sorted(generators),
    }
    tensors = {"torch_cpu": torch.get_rng_state()}
    tensors.update({f"cuda.{i}": s for i, s in enumerate(cuda)})
    tensors.update({f"generator.{n}": g.get_state() for n, g in generators.items()})
    return RngSnapshot(json_part, tensors)


def restore_rng(snapshot: RngSnapshot, generators: Mapping[str, torch.Generator] | None = None) -> None:
    """Restore what ``capture_rng`` took; the named generators must be exactly the captured ones."""
    js, tensors = snapshot
    generators = dict(generators or {})
    if sorted(generators) != js["generators"]:
        raise ValueError(
            f"restore_rng got generators {sorted(generators)}, the snapshot holds {js['generators']}"
        )
    n_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if js["cuda_devices"] and js["cuda_devices"] != n_cuda:
        raise ValueError(f"the snapshot holds RNG states of {js['cuda_devices']} CUDA devices, this process "
                         f"sees {n_cuda}: resume with the same visible devices")
    version, words, gauss_next = js["python"]
    random.setstate((version, tuple(words), gauss_next))
    kind, keys, pos, has_gauss, cached = js["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch_cpu"])
    if js["cuda_devices"]:
        torch.cuda.set_rng_state_all([tensors[f"cuda.{i}"] for i in range(js["cuda_devices"])])
    for name, gen in generators.items():
        gen.set_state(tensors[f"generator.{name}"])
