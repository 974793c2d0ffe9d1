"""Weight broadcast: what one policy publication costs, by LoRA rank and for the full UNet.

Measured on the default model's UNet through the path the system uses (docs/design.md §3):
``export_state`` (safetensors bytes + checksum) -> one ``ray.put`` -> the same ref to N plain Ray actors that
hold the same UNet and ``load_state`` it (``set_weights``); plus the in-process load a single-process loop pays.
The SD-1.5 architecture is sized, not timed: its UNet is built on the meta device (no memory, no time), the
adapter added there, and bytes = parameters × dtype size (safetensors adds a small JSON header).
The collective transport (``train.weight_sync: collective``) is not timed here: its gloo path is a CPU test
fallback and its nccl path needs GPUs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from bench.common import median_time
from policy.lora import LoraSettings, WeightState, adapter_parameters, add_adapter, export_state, load_state

RANKS = (4, 16, 64)
FULL = 0  # "rank" 0 stands for the full UNet (export_state(unet, None, ...))
_MB = 1e6


def _unet(model_path: str | Path, rank: int) -> torch.nn.Module:
    """The model's UNet with a "policy" adapter of ``rank`` (none for FULL)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(Path(model_path), subfolder="unet", local_files_only=True,
                                                use_safetensors=True)
    if rank != FULL:
        add_adapter(unet, "policy", LoraSettings(rank=rank, alpha=float(rank)))
    return unet.requires_grad_(False).eval()


def _export(unet: torch.nn.Module, rank: int, version: int) -> WeightState:
    return export_state(unet, None if rank == FULL else "policy", version)


class UNetHolder:
    """A stand-in rollout actor: holds the UNet (with the adapter of the rank under test) and loads states."""

    def __init__(self, model_path: str, torch_threads: int = 1):
        torch.set_num_threads(torch_threads)
        self.model_path = model_path
        self.unet: torch.nn.Module | None = None

    def prepare(self, rank: int) -> int:
        self.unet = _unet(self.model_path, rank)
        return sum(p.numel() for p in self.unet.parameters())

    def set_weights(self, state: WeightState) -> str:
        if self.unet is None:
            raise RuntimeError("UNetHolder.set_weights before prepare(rank): no UNet to load into")
        return load_state(self.unet, state).checksum


def bench_broadcast(model_path: str | Path, ranks: tuple[int, ...] = (*RANKS, FULL), num_actors: int = 2,
                    repeats: int = 5) -> list[dict[str, Any]]:
    """Size and timings (median of ``repeats``) per rank; needs a running Ray (``ray.init``) for the actors."""
    import ray

    holders = [ray.remote(UNetHolder).options(num_cpus=1).remote(str(model_path)) for _ in range(num_actors)]
    rows = []
    try:
        for rank in ranks:
            unet = _unet(model_path, rank)
            ray.get([h.prepare.remote(rank) for h in holders])
            state = _export(unet, rank, 1)
            ref = ray.put(state)

            def to_actors(ref: Any = ref, state: WeightState = state, rank: int = rank) -> None:
                sums = ray.get([h.set_weights.remote(ref) for h in holders])
                if set(sums) != {state.checksum}:
                    raise RuntimeError(f"an actor loaded rank {rank} weights with a wrong checksum: {sums}")

            to_actors()  # warm-up: the first call also pays the actors' lazy imports
            rows.append({"what": "full UNet" if rank == FULL else f"LoRA r{rank}", "rank": rank,
                         "params": sum(t.numel() for t in state.tensors().values()), "mb": state.nbytes / _MB,
                         "export_ms": 1e3 * median_time(lambda u=unet, r=rank: _export(u, r, 2), repeats),
                         "put_ms": 1e3 * median_time(lambda s=state: ray.put(s), repeats),
                         "actors_ms": 1e3 * median_time(to_actors, repeats),
                         "local_load_ms": 1e3 * median_time(lambda u=unet, s=state: load_state(u, s), repeats)})
    finally:
        for h in holders:
            ray.kill(h, no_restart=True)
    return rows


def lora_parameter_count(unet: torch.nn.Module, rank: int) -> int:
    """Parameters of a rank-``rank`` LoRA adapter on ``unet`` (added on the module passed in)."""
    add_adapter(unet, f"r{rank}", LoraSettings(rank=rank, alpha=float(rank)))
    return sum(p.numel() for p in adapter_parameters(unet, f"r{rank}").values())


def architecture_sizes(unet_config: dict[str, Any], ranks: tuple[int, ...] = RANKS) -> list[dict[str, Any]]:
    """Broadcast sizes for an architecture, computed on the meta device: MB in fp32 and in bf16/fp16."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
    base = sum(p.numel() for p in unet.parameters())
    rows = [{"what": f"LoRA r{r}", "rank": r, "params": lora_parameter_count(unet, r)} for r in ranks]
    rows.append({"what": "full UNet", "rank": FULL, "params": base})
    for row in rows:
        row.update(mb_fp32=4 * row["params"] / _MB, mb_bf16=2 * row["params"] / _MB)
    return rows


def sd15_sizes(ranks: tuple[int, ...] = RANKS) -> list[dict[str, Any]]:
    from policy.components import ARCHITECTURES

    return architecture_sizes(ARCHITECTURES["sd15"]["net"], ranks)
