"""The GPU benchmark (``python -m bench --gpu``): SD-1.5 architecture, random weights, 512 px, bf16.

What it measures on one CUDA GPU, driving the same plain classes the Ray actors wrap (Ray is not needed):
images/s of the sampler per batch size and the TFLOP/s that implies against the bf16 peak; one learner
update (LoRA r16) per batch of 1..8 pairs with its time and peak memory; adapter/full-UNet export and load;
and the usual speed-ups (channels-last, SDPA vs classic attention, torch.compile, CUDA graphs), each try
isolated so one failure is reported instead of ending the run. Without CUDA it reports why and returns.

FLOPs are counted, not estimated: ``torch.utils.flop_counter.FlopCounterMode`` runs the real forward and
sums 2·m·n·k over every matmul, convolution and attention product (it works on CPU, so it is tested on the
tiny model); an elementwise op counts nothing, so achieved TFLOP/s is a lower bound on the work done.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.common import count_flops

PEAK_BF16_TFLOPS = 790.0  # measured bf16 matmul peak of the lent H100/H200 (docs/dependencies.md §4)
SAMPLE_BATCHES = (1, 4, 8, 16)
LEARNER_BATCHES = (1, 2, 4, 8)
NUM_STEPS = 20


def unet_step_flops(unet: torch.nn.Module, batch: int, text_len: int, guidance: bool = True) -> int:
    """FLOPs of one denoising step: one UNet call on ``batch`` latents (doubled under classifier-free guidance)."""
    cfg = unet.config
    n = 2 * batch if guidance else batch
    p = next(unet.parameters())
    x = torch.zeros(n, cfg.in_channels, cfg.sample_size, cfg.sample_size, device=p.device, dtype=p.dtype)
    ctx = torch.zeros(n, text_len, cfg.cross_attention_dim, device=p.device, dtype=p.dtype)
    t = torch.full((n,), 500, device=p.device)
    with torch.no_grad():
        return count_flops(lambda: unet(x, t, encoder_hidden_states=ctx))


def _seconds(fn: Callable[[], Any], repeats: int = 3) -> float:
    """Median seconds of ``fn`` after one warm-up call, synchronising the GPU around each call when there is one."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _try(results: dict[str, Any], name: str, fn: Callable[[], Any]) -> None:
    try:
        results[name] = fn()
    except Exception as e:  # a speed-up that fails here is a finding, not a reason to stop the run
        results[name] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


def run_gpu(quick: bool = False, model_dir: str | Path | None = None) -> dict[str, Any]:
    """All GPU figures as a dict; ``{"skipped": reason}`` without CUDA."""
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device in this process: the GPU section did not run"}
    from policy import DiffusionPolicy, SamplerConfig, build_random_model

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(model_dir) if model_dir else build_random_model(Path(tmp) / "sd15", arch="sd15")
        steps = 4 if quick else NUM_STEPS
        policy = DiffusionPolicy.from_pretrained(path, "cuda", torch.bfloat16, SamplerConfig(num_steps=steps))
        out: dict[str, Any] = {"device": torch.cuda.get_device_name(), "steps": steps, "peak_tflops": PEAK_BF16_TFLOPS}
        out["sampling"] = _sampling(policy, SAMPLE_BATCHES[:2] if quick else SAMPLE_BATCHES)
        out["tries"] = _tries(policy, 4)
        out["learner"] = _learner(path, LEARNER_BATCHES[:1] if quick else LEARNER_BATCHES, num_steps=steps)
    return out


def _sampling(policy: Any, batches: tuple[int, ...]) -> list[dict[str, Any]]:
    rows = []
    for b in batches:
        prompts, seeds = ["a photo of a cat"] * b, list(range(b))
        flops = count_flops(lambda p=prompts, s=seeds: policy.sample(p, s))
        _reset_peak()
        secs = _seconds(lambda p=prompts, s=seeds: policy.sample(p, s))
        rows.append({"batch": b, "images_per_s": b / secs, "gflop_per_image": flops / b / 1e9,
                     "tflops": flops / secs / 1e12, "mfu": flops / secs / 1e12 / PEAK_BF16_TFLOPS,
                     "peak_gib": _peak_gib()})
    return rows


def _tries(policy: Any, batch: int) -> dict[str, Any]:
    """images/s of sampling under each speed-up, applied one after another on the same UNet."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    prompts, seeds = ["a photo of a cat"] * batch, list(range(batch))
    unet = policy.unet

    def rate() -> float:
        return batch / _seconds(lambda: policy.sample(prompts, seeds))

    res: dict[str, Any] = {}
    _try(res, "baseline (SDPA)", rate)
    unet.set_attn_processor(AttnProcessor())
    _try(res, "classic attention", rate)
    unet.set_attn_processor(AttnProcessor2_0())
    unet.to(memory_format=torch.channels_last)
    _try(res, "channels-last", rate)
    original = unet.forward
    unet.forward = torch.compile(original)
    _try(res, "torch.compile", rate)
    unet.forward = torch.compile(original, mode="reduce-overhead")  # CUDA graphs
    _try(res, "torch.compile + CUDA graphs", rate)
    unet.forward = original
    return res


def _learner(path: Path, batches: tuple[int, ...], device: str = "cuda", dtype: str = "bfloat16",
             num_steps: int = NUM_STEPS) -> dict[str, Any]:
    """One LoRA-r16 update per pair batch size (seconds, peak memory), and what publishing the adapter or the
    full UNet costs in process (export = safetensors bytes, load = copy into the actor-side UNet)."""
    from actors.rollout import RolloutWorker
    from learner.config import build_config
    from learner.trainer import Learner
    from policy import export_state, load_state

    tree = {"model": {"path": str(path), "dtype": dtype, "device": device}, "sampler": {"num_steps": num_steps},
            "lora": {"rank": 16, "alpha": 16.0}, "pairs": {"kind": "step_branch", "branch_steps": [0]},
            "reward": {"spec": {"world": 1.0}, "num_actors": 0}}
    cfg = build_config(tree)
    worker, learner = RolloutWorker(cfg.rollout_settings()), Learner(cfg)
    n = max(batches)
    records = worker.generate(["a red circle on the left"] * n, list(range(n)), list(range(n)), 0)[0]
    updates = []
    for b in batches:
        part = records.slice(0, b)
        _reset_peak()
        secs = _seconds(lambda r=part: learner.update(r))
        updates.append({"pairs": b, "update_s": secs, "peak_gib": _peak_gib()})
    torch_dtype = learner.policy.dtype
    unet_l, unet_w = learner.policy.unet, worker.policy.unet
    broadcast = []
    for what, name in (("LoRA r16", "policy"), ("full UNet", None)):
        state = export_state(unet_l, name, 1, torch_dtype)
        broadcast.append({"what": what, "mb": state.nbytes / 1e6,
                          "export_ms": 1e3 * _seconds(lambda nm=name: export_state(unet_l, nm, 1, torch_dtype), 1),
                          "load_ms": 1e3 * _seconds(lambda st=state: load_state(unet_w, st), 1)})
    return {"updates": updates, "broadcast": broadcast}
