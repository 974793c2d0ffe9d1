"""Named LoRA adapters on one frozen UNet, and their versioned, serialisable state.

One base, two peft adapters: "policy" (trained) and "ref" (only when the reference moves); a frozen reference
is the base with adapters disabled, so it costs no memory and is never sent (docs/design.md §3).
A state travels as safetensors bytes tagged with a version. Loading checks names and shapes, copies in place
and returns ``(version, keys matched, checksum)`` computed from what the module now holds, so a sync that
silently did nothing is caught by comparing checksums (the failure users report most, docs/design.md §3).
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

POLICY = "policy"
REF = "ref"


class AdapterMismatchError(ValueError):
    """A weight state does not fit the module it is loaded into (names or shapes differ)."""


class LoraSettings(BaseModel):
    """LoRA hyper-parameters; defaults follow D3PO/SPO (rank 4 on the attention projections)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    rank: int = Field(4, ge=1, strict=True)
    alpha: float = Field(4.0, gt=0, description="LoRA scale numerator (scale = alpha / rank)")
    target_modules: tuple[str, ...] = Field(("to_q", "to_k", "to_v", "to_out.0"), min_length=1,
                                            description="UNet modules that get an adapter")


def add_adapter(unet: torch.nn.Module, name: str, settings: LoraSettings) -> None:
    """Add a LoRA adapter ``name`` (B initialised to zero, so it starts equal to the base)."""
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, target_modules=list(settings.target_modules),
                        init_lora_weights=True)
    with warnings.catch_warnings():  # peft warns that a second adapter is being added: that is the design
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        unet.add_adapter(config, adapter_name=name)


def adapter_names(unet: torch.nn.Module) -> list[str]:
    config = getattr(unet, "peft_config", None) or {}
    return list(config)


def adapter_parameters(unet: torch.nn.Module, name: str | None) -> dict[str, torch.nn.Parameter]:
    """Parameters of adapter ``name`` keyed by peft's adapter-free names; ``None`` = every base weight."""
    if name is None:
        return {k: p for k, p in unet.named_parameters() if "lora_" not in k}
    tag = f".{name}."
    params = {k.replace(tag, ".", 1): p for k, p in unet.named_parameters() if "lora_" in k and tag in k}
    if not params:
        raise AdapterMismatchError(f"module has no adapter {name!r}; adapters: {adapter_names(unet) or 'none'}")
    return params


def _adapter_state(unet: torch.nn.Module) -> tuple[bool, list[str]]:
    """(adapters disabled, active adapter names) as the first LoRA layer holds them: peft's whole-module switches
    keep every layer in the same state, so one layer answers for all without walking the module."""
    layer = next(m for m in unet.modules() if isinstance(m, BaseTunerLayer))
    return layer.disable_adapters, list(layer.active_adapters)


def activate(unet: torch.nn.Module, name: str | None) -> None:
    """Make the UNet run under adapter ``name`` (None = the base, adapters disabled) from now on.

    Already in that state (a sampler calling the policy step after step) it touches nothing: a switch walks every
    module and parameter, which cost a third of a 1-chain generate call. A switch stays in force until the next
    one, since the next call most likely wants the same weights. peft's set_adapter also flips requires_grad to
    the active adapter; the flags are put back, so the trained adapter stays trainable whatever was evaluated.
    """
    names = adapter_names(unet)
    if name is not None and name not in names:
        raise AdapterMismatchError(f"module has no adapter {name!r}; adapters: {names or 'none (add it first)'}")
    if not names:
        return
    layer = next(m for m in unet.modules() if isinstance(m, BaseTunerLayer))  # peft keeps all layers alike
    running = None if layer.disable_adapters else list(layer.active_adapters)
    if running == (None if name is None else [name]):
        return
    flags = [(p, p.requires_grad) for p in unet.parameters()]
    if name is None:
        unet.disable_adapters()
    else:
        unet.set_adapter(name)
        unet.enable_adapters()
    for p, flag in flags:
        p.requires_grad_(flag)


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    """Order-independent content hash (names + bytes), used to prove a load really happened."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous().cpu()
        h.update(key.encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class WeightState:
    """A versioned weight state: safetensors bytes of an adapter (or of the whole UNet when ``adapter`` is None)."""

    version: int
    adapter: str | None
    blob: bytes
    checksum: str

    @property
    def nbytes(self) -> int:
        return len(self.blob)

    def tensors(self) -> dict[str, torch.Tensor]:
        return st_load(self.blob)


@dataclass(frozen=True)
class LoadReport:
    version: int
    keys_matched: int
    checksum: str


def snapshot(unet: torch.nn.Module, name: str | None) -> dict[str, torch.Tensor]:
    """A detached copy of adapter ``name`` in sorted-key order: what a published version holds from then on."""
    params = adapter_parameters(unet, name)
    return {k: params[k].detach().clone() for k in sorted(params)}


def pack_state(tensors: dict[str, torch.Tensor], adapter: str | None, version: int) -> WeightState:
    """safetensors bytes of ``tensors`` (the state of ``adapter``) tagged with ``version``."""
    tensors = {k: t.contiguous().cpu() for k, t in tensors.items()}
    blob = st_save(tensors, metadata={"version": str(version), "adapter": adapter or ""})
    return WeightState(version, adapter, blob, checksum(tensors))


def export_state(unet: torch.nn.Module, name: str | None, version: int, dtype: torch.dtype | None = None
                 ) -> WeightState:
    """Serialise adapter ``name`` (None: full UNet) cast to ``dtype`` (the rollout dtype) with a version tag."""
    return pack_state({k: p.detach().to(dtype or p.dtype) for k, p in adapter_parameters(unet, name).items()}, name,
                      version)


def load_state(unet: torch.nn.Module, state: WeightState, into: str | None = None) -> LoadReport:
    """Copy ``state`` into adapter ``into`` (default: the adapter it was exported from) without restarting.

    Fails, before touching anything, when names or shapes differ; the returned checksum is computed from the
    module's parameters after the copy, in the state's dtype, so it equals ``state.checksum`` only if it landed.
    """
    return copy_into(unet, state.adapter if into is None else into, state.tensors(), state.version)


def copy_into(unet: torch.nn.Module, target: str | None, tensors: dict[str, torch.Tensor], version: int = 0
              ) -> LoadReport:
    """Copy a tensor dict into adapter ``target`` in place (see ``load_state``, which serves the wire format)."""
    params = adapter_parameters(unet, target)
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise AdapterMismatchError(
            f"weight state v{version} does not fit adapter {target!r}: {len(missing)} missing keys "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}); check lora settings"
        )
    bad = [k for k in tensors if tensors[k].shape != params[k].shape]
    if bad:
        k = bad[0]
        raise AdapterMismatchError(
            f"weight state v{version}: shape of {k} is {tuple(tensors[k].shape)}, adapter {target!r} "
            f"expects {tuple(params[k].shape)} ({len(bad)} tensors differ; check lora.rank)"
        )
    with torch.no_grad():
        for k, t in tensors.items():
            params[k].copy_(t)
    held = {k: params[k].detach().to(tensors[k].dtype) for k in tensors}
    return LoadReport(version, len(tensors), checksum(held))
