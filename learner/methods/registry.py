"""Preference methods by name: each loss registers one function per pair kind it accepts.

A method turns a batch of preference pairs into a ``PairLoss`` through a ``MethodContext`` (the learner's
log-ratio and MSE functions, noise process and time weighting; learner/methods/context.py). The config looks
the (loss, pair kind) combination up at start-up, so an unsupported one is a one-line config error before any
actor starts; the learner looks up the same entry at every update.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from actors.records import PairBatch
    from learner.losses import PairLoss
    from learner.methods.context import MethodContext

MethodFn = Callable[["MethodContext", "PairBatch"], "tuple[PairLoss, dict[str, float]]"]
_METHODS: dict[tuple[str, str], MethodFn] = {}


def register_method(loss: str, record_kind: str) -> Callable[[MethodFn], MethodFn]:
    """Decorator: ``fn(context, batch)`` computes ``loss`` on pairs stored as ``record_kind`` ("step" or
    "trajectory", see actors.records)."""

    def wrap(fn: MethodFn) -> MethodFn:
        _METHODS[(loss, record_kind)] = fn
        return fn

    return wrap


def method_names() -> list[str]:
    return sorted({loss for loss, _ in _METHODS})


def find_method(loss: str, record_kind: str) -> MethodFn:
    """The registered function, or ValueError naming what is registered."""
    if (loss, record_kind) not in _METHODS:
        kinds = sorted(k for name, k in _METHODS if name == loss)
        if not kinds:
            raise ValueError(f"loss.kind must be one of {method_names()}, got {loss!r}")
        raise ValueError(f"loss.kind={loss} does not train on {record_kind} pairs; it accepts {kinds} pairs")
    return _METHODS[(loss, record_kind)]

