"""The cost model of the scale simulation (``python -m bench.scale``): seconds per rollout chain and per learner pair
on A100, L4 and H100 GPUs for SD-1.5 at 512 px, derived from FLOP counts and public peak figures.

Every constant says where it comes from. The FLOP counts are ``torch.utils.flop_counter.FlopCounterMode`` totals
(2 FLOPs per multiply-add) of the SD-1.5 architectures in ``policy.components.ARCHITECTURES["sd15"]`` built on the
``meta`` device; ``count_flops()`` recounts them (tests/test_scale.py checks that it agrees with the constants).
Seconds = FLOPs / (peak × MFU): one stated MFU for every kernel is the model's main simplification (small-batch
SD-1.5 sampling runs below it, large-batch training near it), so the absolute seconds are estimates and the
ratios between rollout and learner work are what the simulation's sizing rests on.
"""

from __future__ import annotations

from dataclasses import dataclass

# ---- FLOPs (counted with FlopCounterMode on the meta device; count_flops() reproduces them) --------------------
UNET_CFG_FLOPS = 1.6065e12  # SD-1.5 UNet, 4×64×64 latent, 77×768 text, batch 2 (classifier-free guidance pair)
VAE_DECODE_FLOPS = 2.5145e12  # SD-1.5 VAE decoder, 4×64×64 latent -> 3×512×512 image, batch 1
REWARD_FLOPS = 0.16203e12  # CLIP ViT-L/14 image tower at 224 px, batch 1 (the aesthetic reward's backbone;
#                            its linear head is negligible). Config: hidden 1024, 24 layers, 16 heads, patch 14.
LORA_PARAMS = 797_184  # rank-4 LoRA on to_q/to_k/to_v/to_out.0 of SD-1.5's UNet (policy.lora.LoraSettings default)

# ---- the work per chain and per pair (read from actors/rollout.py and learner/trainer.py) -----------------------
# step_branch (TailorPO preset configs/tailorpo_sd15.yaml: 20 steps, branches at 0,4,8,12,16): every step is one
# CFG UNet call; each branch adds the two children's x̂_0 at the next timestep (2 UNet calls, the winner's ε is
# reused by the next step: net +1), 2 VAE decodes and 2 reward calls. 5 pairs per chain.
NUM_STEPS, BRANCHES = 20, 5
CHAIN_FLOPS = (NUM_STEPS + BRANCHES) * UNET_CFG_FLOPS + 2 * BRANCHES * (VAE_DECODE_FLOPS + REWARD_FLOPS)
PAIRS_PER_CHAIN = BRANCHES
# Learner, per step pair: the log-ratio needs the policy's ε at x_t (one CFG UNet call, both children share it)
# and the reference's (one more, forward only). Backward ≈ 2× forward when every weight gets a gradient (Kaplan et
# al. 2020, "Scaling Laws for Neural Language Models", §2.1: C ≈ 6N per token = 2N forward + 4N backward); with a
# frozen base (LoRA) the weight-gradient half is skipped: backward ≈ 1× forward.
PAIR_FLOPS = {"lora": (1 + 1) * UNET_CFG_FLOPS + UNET_CFG_FLOPS, "full": (1 + 2) * UNET_CFG_FLOPS + UNET_CFG_FLOPS}
# Held-out evaluation: one plain chain (20 UNet calls), one decode, one reward call per prompt.
EVAL_FLOPS = NUM_STEPS * UNET_CFG_FLOPS + VAE_DECODE_FLOPS + REWARD_FLOPS

# ---- hardware: dense bf16 tensor-core peak, FLOP/s (NVIDIA datasheets) ---------------------------------------------
PEAK_BF16 = {
    "A100": 312e12,  # NVIDIA A100 Tensor Core GPU datasheet (2021): BF16 312 TFLOPS dense (624 with sparsity)
    "L4": 121e12,  # NVIDIA L4 datasheet (2023): BF16 242 TFLOPS with sparsity -> 121 dense
    "H100": 989e12,  # NVIDIA H100 datasheet, SXM5: BF16 1,979 TFLOPS with sparsity -> 989 dense
}
MFU = 0.35  # model FLOPs utilisation assumed for every kernel (stated, not measured: no GPU here)
JITTER_SIGMA = 0.10  # lognormal sigma of every simulated duration (±10 %)

# ---- the pool: cluster/gpu.yaml's rollout GPUs, 7 A100 (learner node) + up to 16 L4 (4 nodes × 4) ---------------
A100_SHARE = 7 / 23

# ---- bytes on the wire --------------------------------------------------------------------------------------------
LATENT_SHAPE = (4, 64, 64)  # SD-1.5 latent at 512 px (VAE factor 8), float32 in records


@dataclass(frozen=True)
class Costs:
    """Seconds of each simulated call on one GPU kind."""

    gpu: str
    chain_s: float  # one rollout chain with its branches, decodes and rewards
    pair_s: float  # one learner step pair (forward + backward + reference)
    eval_chain_s: float

    @staticmethod
    def of(gpu: str, trainable: str = "lora") -> Costs:
        rate = PEAK_BF16[gpu] * MFU
        return Costs(gpu, CHAIN_FLOPS / rate, PAIR_FLOPS[trainable] / rate, EVAL_FLOPS / rate)

    @property
    def pairs_per_s(self) -> float:
        """Rollout pairs per second of one actor on this GPU."""
        return PAIRS_PER_CHAIN / self.chain_s


def pool(n: int) -> list[str]:
    """GPU kinds of ``n`` rollout actors in cluster/gpu.yaml's proportions, at least one A100; every prefix
    ``pool(n)[:m]`` is ``pool(m)``, so one set of actors serves every pool size of a sweep."""
    kinds: list[str] = []
    for i in range(1, n + 1):
        kinds.append("A100" if max(1, round(i * A100_SHARE)) > kinds.count("A100") else "L4")
    return kinds


def count_flops() -> dict[str, float]:
    """Recount the FLOP constants above on the meta device (needs diffusers and transformers; about a second)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from policy.components import ARCHITECTURES

    arch = ARCHITECTURES["sd15"]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**arch["net"])
        vae = AutoencoderKL(**arch["vae"])
        clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                                num_attention_heads=16, image_size=224, patch_size=14))

    def flops(fn) -> float:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            fn()
        return float(counter.get_total_flops())

    meta = {"device": "meta"}
    return {"unet_cfg": flops(lambda: unet(torch.empty(2, *LATENT_SHAPE, **meta), torch.tensor([500, 500], **meta),
                                           torch.empty(2, 77, 768, **meta))),
            "vae_decode": flops(lambda: vae.decode(torch.empty(1, *LATENT_SHAPE, **meta))),
            "reward": flops(lambda: clip(pixel_values=torch.empty(1, 3, 224, 224, **meta)))}
