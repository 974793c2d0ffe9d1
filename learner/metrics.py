"""Run observability: JSON-lines metrics and events, TensorBoard scalars, and the statistics they carry.

Layout of a run directory written by :class:`RunLogger`:
  * ``metrics.jsonl`` — one ``{"step", "time", "metrics"}`` object per ``log`` call (strict JSON: NaN/inf
    → null), so a crashed run still leaves a parseable record and ``jq`` works on it;
  * ``events.jsonl`` — one ``{"time", "kind", "fields"}`` object per ``event`` call (restarts, drops, syncs);
  * ``tb/`` — TensorBoard event files (``tensorboard --logdir <out_dir>``), finite values only.
Files are opened in append mode so that a run resumed from a checkpoint continues the same record.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import numbers
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from torch import Tensor

LOGGER = logging.getLogger("dpr")


def _as_float(key: str, value: Any) -> float:
    """A real scalar (Python/NumPy number or one-element tensor) as float; anything else is a caller bug."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"metric {key!r} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if not isinstance(value, str | bytes):
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    raise ValueError(f"metric {key!r} must be a real number, got {type(value).__name__}: {value!r}")


def _jsonable(value: Any) -> Any:
    """Strict-JSON form of an event field: non-finite floats → None, scalars unwrapped, the rest as str."""
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return str(value)


def _human(value: Any) -> str:
    """Compact value for the one-line log: 4 significant digits, strings quoted only when they hold spaces."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, str) and (not value or any(c.isspace() for c in value)):
        return json.dumps(value)
    return str(value)


class RunLogger:
    """Writes every metric to JSON lines and TensorBoard (optional).

    Non-finite values are kept as ``null`` in ``metrics.jsonl`` (a NaN loss is information, not a reason to
    crash the run) but left out of TensorBoard, whose plots need numbers.
    Thread-safe: a learner may log from the thread that drains actor results.
    """

    def __init__(self, out_dir: Path | str, tensorboard: bool = True) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.tb_dir = self.out_dir / "tb"
        self._lock = threading.Lock()
        self._writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when asked for

            self._writer = SummaryWriter(log_dir=str(self.tb_dir), flush_secs=10)
        self._metrics_file = (self.out_dir / "metrics.jsonl").open("a", encoding="utf-8")
        self._events_file = (self.out_dir / "events.jsonl").open("a", encoding="utf-8")
        self._closed = False

    def log(self, step: int, metrics: Mapping[str, Any], prefix: str = "") -> None:
        """Record ``metrics`` at learner ``step`` under tags ``prefix/name`` (``name`` if no prefix)."""
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        step = int(step)  # NumPy ints are accepted, but JSON and TensorBoard get a plain int
        values: dict[str, float] = {}
        for name, value in metrics.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"metric names must be non-empty strings, got {name!r}")
            tag = f"{prefix.rstrip('/')}/{name}" if prefix else name
            values[tag] = _as_float(tag, value)
        record = {
            "step": step,
            "time": time.time(),
            "metrics": {k: (v if math.isfinite(v) else None) for k, v in values.items()},
        }
        with self._lock:
            self._check_open()
            self._write(self._metrics_file, record)
            if self._writer is not None:
                for tag, v in values.items():
                    if math.isfinite(v):
                        self._writer.add_scalar(tag, v, global_step=step)
        LOGGER.debug("step=%d %s", step, " ".join(f"{k}={_human(v)}" for k, v in values.items()))

    def event(self, kind: str, **fields: Any) -> None:
        """Record a discrete happening (``kind``, e.g. ``actor_restarted``) in events.jsonl and the log."""
        if not isinstance(kind, str) or not kind or any(c.isspace() for c in kind):
            raise ValueError(f"event kind must be a non-empty word without spaces, got {kind!r}")
        record = {"time": time.time(), "kind": kind, "fields": _jsonable(fields)}
        with self._lock:
            self._check_open()
            self._write(self._events_file, record)
        LOGGER.info("[event] %s", " ".join([kind, *(f"{k}={_human(v)}" for k, v in fields.items())]))

    def close(self) -> None:
        """Flush and close every file; later calls are no-ops."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._metrics_file.close()
            self._events_file.close()
            if self._writer is not None:
                self._writer.close()

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"RunLogger for {self.out_dir} is closed")

    @staticmethod
    def _write(file: Any, record: dict[str, Any]) -> None:
        # Flushed per line: the record must survive a killed learner.
        file.write(json.dumps(record, allow_nan=False) + "\n")
        file.flush()


def _check_1d(name: str, t: Tensor) -> None:
    if t.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")


def summary_stats(values: Tensor, name: str = "reward") -> dict[str, float]:
    """``{name}_mean``, ``{name}_std`` (population, ddof=0), ``{name}_sem`` (sample std / √n) of 1-D values.

    The std describes the batch spread (defined for n = 1, as DDPO-style reward stats use it); the SEM is an
    estimate of the mean's error for the ± bands of the reward curve, so it uses ddof=1 and is NaN for n < 2.
    """
    _check_1d("values", values)
    if values.numel() == 0:
        raise ValueError("values is empty: summary_stats needs at least one value")
    v = values.detach().to(torch.float64)
    n = v.numel()
    sem = v.std(correction=1).item() / math.sqrt(n) if n > 1 else math.nan
    return {f"{name}_mean": v.mean().item(), f"{name}_std": v.std(correction=0).item(), f"{name}_sem": sem}


def bucket_edges(num_buckets: int, num_steps: int) -> list[int]:
    """Bucket b holds step indices [edges[b], edges[b+1]), edges[b] = ⌊b·num_steps/num_buckets⌋."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 1 <= num_buckets <= num_steps:
        raise ValueError(f"num_buckets must be in [1, num_steps={num_steps}], got {num_buckets}")
    return [b * num_steps // num_buckets for b in range(num_buckets + 1)]


def bucket_stats(
    values: Tensor, step_index: Tensor, num_buckets: int, num_steps: int, name: str = "reward"
) -> dict[str, float]:
    """Mean, population std and count of ``values`` per bucket of the denoising-step index.

    ``step_index`` is k in generation order (k = 0 is the first denoising step, from x_T; the convention of
    ``learner.time_weighting``). Keys read ``{name}_mean/bucket{lo}-{hi}`` with inclusive bounds, e.g.
    ``reward_mean/bucket0-4`` for k ∈ {0..4}; a bucket with no sample has NaN mean/std and count 0 (the
    RunLogger keeps the key as null, so every step logs the same keys).
    """
    _check_1d("values", values)
    _check_1d("step_index", step_index)
    if values.shape != step_index.shape:
        raise ValueError(f"values {tuple(values.shape)} and step_index {tuple(step_index.shape)} must match")
    if step_index.dtype.is_floating_point or step_index.dtype.is_complex:
        raise ValueError(f"step_index must be an integer tensor, got {step_index.dtype}")
    edges = bucket_edges(num_buckets, num_steps)
    if step_index.numel() and (int(step_index.min()) < 0 or int(step_index.max()) >= num_steps):
        lo, hi = int(step_index.min()), int(step_index.max())
        raise ValueError(f"step_index must be in [0, {num_steps}), got {lo}..{hi}")
    v = values.detach().to(torch.float64)
    k = step_index.detach()
    out: dict[str, float] = {}
    for lo, hi in itertools.pairwise(edges):
        sel = v[(k >= lo) & (k < hi)]
        label = f"bucket{lo}-{hi - 1}"
        empty = sel.numel() == 0
        out[f"{name}_mean/{label}"] = math.nan if empty else sel.mean().item()
        out[f"{name}_std/{label}"] = math.nan if empty else sel.std(correction=0).item()
        out[f"{name}_count/{label}"] = float(sel.numel())
    return out


