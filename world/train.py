"""Train the embedded text-to-image model on the synthetic world: ``python -m world.train --out world/model``.

Why: no hub weights exist here, yet the default alignment run needs a real (if tiny) latent diffusion model in
diffusers layout. Two stages, both on CPU within the issue's budget (<= 45 min on 2 cores, weights < 20 MB):

1. AutoencoderKL 32x32x3 -> 8x8x4, loss = MSE + ``kl_weight`` * KL (per-element means); afterwards the config's
   ``scaling_factor`` is set to 1 / std of the sampled latents of the training set (the SD convention, Rombach et
   al. 2022, Sec. 4.3 / App. G), so the diffusion model sees unit-variance latents.
2. CLIPTextModel + UNet2DConditionModel trained jointly on ε-prediction under the SD-1.5 DDIM schedule, with the
   prompt dropped to "" 10% of the time (classifier-free guidance, Ho & Salimans 2022) and the per-sample loss
   weighted by min(SNR, 5) / SNR ("Min-SNR-γ", Hang et al. 2023: faster convergence at a fixed budget).
   An EMA of the weights is what gets saved (it samples better than the last iterate after a short run).

The run writes world/assets/train_loss.png and world/TRAINING.md (command, seed, wall time, final losses).

``--process flow --init world/model`` makes the flow world instead (world/flow_model): the same networks,
started from the trained model's weights (its VAE kept as is), trained for rectified-flow velocity prediction
(``VelocityObjective``) and saved with a ``FlowMatchEulerDiscreteScheduler``; its record goes to
world/FLOW_TRAINING.md and world/assets/flow_*.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from tqdm import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from policy.flow import flow_add_noise
from policy.process import MODEL_TIME_SCALE
from policy.tokenizer import write_word_tokenizer
from world.scenes import IMAGE_SIZE, render_batch, sample_scenes, split_prompts, vocabulary

ASSETS = Path(__file__).parent / "assets"
TRAINING_MD = Path(__file__).parent / "TRAINING.md"
FLOW_TRAINING_MD = Path(__file__).parent / "FLOW_TRAINING.md"
MAX_TOKENS = 16

# SD-1.5 DDIM conventions (the brief's default; 8x8 latents did not need another schedule).
SCHEDULER = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                 set_alpha_to_one=False, steps_offset=1, clip_sample=False, prediction_type="epsilon")
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32),
           down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
           layers_per_block=1, norm_num_groups=8, sample_size=IMAGE_SIZE)
# (32, 48) channels, cross-attention only at the 4x4 level: cheaper per forward than the (32, 64) row of
# docs/dependencies.md §5 with attention at both levels (the sampling target is >= 30 images/s); one shape on
# 8x8 latents needs little capacity.
UNET = dict(sample_size=IMAGE_SIZE // 4, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 48),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, attention_head_dim=4,
            norm_num_groups=8)
# The flow world's scheduler: σ spaced evenly (shift 1). SD3's shift of 3 moves steps towards noise for 1024 px
# images, whose many latent tokens keep more signal at a given σ (Esser et al. 2024, §5.3.2); 8x8 latents do not.
FLOW_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=MAX_TOKENS)


@dataclass
class TrainConfig:
    seed: int = 0
    images_per_prompt: int = 250
    vae_steps: int = 400
    vae_batch: int = 32
    vae_lr: float = 2e-3
    kl_weight: float = 1e-4
    steps: int = 3000
    batch: int = 128
    lr: float = 1e-3
    warmup: int = 100
    cfg_drop: float = 0.1
    snr_gamma: float = 5.0
    ema_decay: float = 0.998
    max_minutes: float = 42.0  # hard stop of the diffusion stage so the whole run stays within 45 minutes


def build_parts(tokenizer: CLIPTokenizer, seed: int) -> tuple[AutoencoderKL, CLIPTextModel, UNet2DConditionModel]:
    """The three networks at random init (also used by rewards.world_headroom for the random-init baseline)."""
    torch.manual_seed(seed)
    text_config = CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **TEXT)
    return AutoencoderKL(**VAE), CLIPTextModel(text_config), UNet2DConditionModel(**UNET)


def write_tokenizer(out_dir: str | Path) -> CLIPTokenizer:
    return write_word_tokenizer(vocabulary(), out_dir, max_length=MAX_TOKENS)


def save_model(out: str | Path, vae: AutoencoderKL, text_encoder: CLIPTextModel, unet: UNet2DConditionModel,
               tokenizer: CLIPTokenizer, scheduler: DDIMScheduler | FlowMatchEulerDiscreteScheduler | None = None
               ) -> None:
    """Save in diffusers layout (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/), safetensors;
    the scheduler says how the UNet was trained (default: SD-1.5's DDIM)."""
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler or DDIMScheduler(**SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)


def random_init_model(out_dir: str | Path, seed: int = 0,
                      scheduler: DDIMScheduler | FlowMatchEulerDiscreteScheduler | None = None) -> Path:
    """The trained architecture with random weights, saved in the same layout (loaded the same way) with
    ``scheduler`` (default: DDIM): the floor of the headroom table and of the judge's score check."""
    out = Path(out_dir)
    tokenizer = write_tokenizer(out / "_tokenizer")
    save_model(out, *build_parts(tokenizer, seed), tokenizer, scheduler)
    return out


def _lr_lambda(warmup: int, total: int):
    """Linear warm-up, then cosine decay to 10%."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return f


def train_vae(images: torch.Tensor, cfg: TrainConfig, vae: AutoencoderKL) -> list[float]:
    """Stage 1; ``images`` in [-1, 1]. Returns the per-step losses."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup, cfg.vae_steps))
    losses = []
    vae.train()
    bar = tqdm(range(cfg.vae_steps), desc="vae", mininterval=10, file=sys.stdout)
    for step in bar:
        x = images[torch.randint(len(images), (cfg.vae_batch,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar).mean()
        loss = F.mse_loss(recon, x) + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", refresh=False)
    vae.eval()
    return losses


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Posterior mean and std of every image, and the scaling factor 1 / std(sampled latents)."""
    means, stds = [], []
    for chunk in images.split(512):
        dist = vae.encode(chunk).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    mean, std = torch.cat(means), torch.cat(stds)
    gen = torch.Generator().manual_seed(seed)
    sampled = mean + std * torch.randn(mean.shape, generator=gen)
    return mean, std, 1.0 / sampled.std().item()


def min_snr_weight(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ weight for ε-prediction: min(SNR(t), γ) / SNR(t), SNR = ᾱ / (1 − ᾱ) (Hang et al. 2023, Eq. 8)."""
    a = alphas_cumprod[timesteps]
    snr = a / (1 - a)
    return snr.clamp(max=gamma) / snr


Noised = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # x_t, the net's timestep, target, weight


class EpsilonObjective:
    """ε-prediction under SD-1.5's DDPM schedule, t uniform over its 1000 steps, weighted by Min-SNR-γ."""

    label = "ε-MSE"

    def __init__(self, snr_gamma: float) -> None:
        self.scheduler, self.snr_gamma = DDIMScheduler(**SCHEDULER), snr_gamma

    def __call__(self, z0: torch.Tensor, noise: torch.Tensor, gen: torch.Generator) -> Noised:
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(z0),), generator=gen)
        weight = min_snr_weight(t, self.scheduler.alphas_cumprod, self.snr_gamma)
        return self.scheduler.add_noise(z0, noise, t), t, noise, weight


class VelocityObjective:
    """Rectified flow with velocity prediction, as SD3 trains (Esser et al. 2024, §2 and §3.1): x_σ = (1−σ) x_0 +
    σ ε, target v = ε − x_0, σ drawn logit-normal(0, 1) (their best sampler, "lognorm(0.00, 1.00)"); the net sees
    σ · 1000, the timestep ``FlowMatchEulerDiscreteScheduler`` feeds it (policy.process.FlowMatchingSDE)."""

    label = "velocity MSE"

    def __init__(self) -> None:
        self.scheduler = FlowMatchEulerDiscreteScheduler(**FLOW_SCHEDULER)

    def __call__(self, z0: torch.Tensor, noise: torch.Tensor, gen: torch.Generator) -> Noised:
        sigma = torch.sigmoid(torch.randn(len(z0), generator=gen))
        x_t = flow_add_noise(z0, sigma.view(-1, 1, 1, 1), noise)
        return x_t, sigma * MODEL_TIME_SCALE, noise - z0, torch.ones_like(sigma)


def train_diffusion(latent_mean: torch.Tensor, latent_std: torch.Tensor, scaling: float, ids: torch.Tensor,
                    prompt_index: torch.Tensor, empty_ids: torch.Tensor, cfg: TrainConfig,
                    text_encoder: CLIPTextModel, unet: UNet2DConditionModel, deadline: float,
                    objective: EpsilonObjective | VelocityObjective
                    ) -> tuple[list[float], int, CLIPTextModel, UNet2DConditionModel]:
    """Stage 2. ``ids[prompt_index[i]]`` are the token ids of image i. Returns losses, steps done and the EMA nets."""
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    params = [*unet.parameters(), *text_encoder.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup, cfg.steps))
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    ema_params = [*ema_unet.parameters(), *ema_text.parameters()]
    unet.train()
    text_encoder.train()
    losses = []
    step = 0
    bar = tqdm(range(cfg.steps), desc="diffusion", mininterval=10, file=sys.stdout)
    for step in bar:
        if time.monotonic() > deadline:
            print(f"time budget reached: stopping the diffusion stage after {step} of {cfg.steps} steps")
            break
        idx = torch.randint(len(latent_mean), (cfg.batch,), generator=gen)
        z0 = (latent_mean[idx] + latent_std[idx] * torch.randn(latent_mean[idx].shape, generator=gen)) * scaling
        x_t, t, target, weight = objective(z0, torch.randn(z0.shape, generator=gen), gen)
        tokens = ids[prompt_index[idx]]
        drop = torch.rand(cfg.batch, generator=gen) < cfg.cfg_drop
        tokens = torch.where(drop[:, None], empty_ids[None, :], tokens)
        context = text_encoder(tokens)[0]
        pred = unet(x_t, t, encoder_hidden_states=context).sample
        per_sample = (pred - target).pow(2).mean(dim=(1, 2, 3))
        loss = (weight * per_sample).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        losses.append(per_sample.mean().item())  # the plain MSE, comparable across weightings
        if step % 50 == 0:
            bar.set_postfix(mse=f"{np.mean(losses[-50:]):.4f}", refresh=False)
    else:
        step = cfg.steps
    return losses, step, ema_text, ema_unet


def plot_losses(panels: list[tuple[list[float], str]], path: Path) -> None:
    """One log-scale panel per (per-step losses, title)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def smooth(v: list[float], k: int = 50) -> np.ndarray:
        a = np.asarray(v)
        return np.convolve(a, np.ones(k) / k, mode="valid") if len(a) > k else a

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
    for ax, (v, title) in zip(axes[0], panels, strict=True):
        ax.plot(v, alpha=0.25, lw=0.5, label="per step")
        ax.plot(np.arange(len(smooth(v))) + (len(v) - len(smooth(v))) // 2, smooth(v), lw=1.5, label="mean of 50")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_training_md(cfg: TrainConfig, report: dict, path: Path, title: str = "The embedded world model",
                      loss_png: str = "assets/train_loss.png") -> None:
    vae = (f"- final VAE loss (mean of the last 100 steps): {report['final_vae_loss']:.5f}; "
           f"reconstruction MSE on [-1,1] pixels of held-aside images: {report['vae_recon_mse']:.5f}"
           if "final_vae_loss" in report else f"- VAE, latent scaling and initial weights: those of {report['init']}")
    lines = [
        f"# {title}: how it was trained",
        "",
        "Reproduce (2 CPU cores, no downloads):",
        "",
        "```",
        report["command"],
        "```",
        "",
        f"- seed: {cfg.seed}; torch threads: {report['threads']}; load average at start / end: "
        f"{report['load_start']} / {report['load_end']} (the CPU was shared with other jobs)",
        f"- wall time: {report['minutes_total']:.1f} min in total (data {report['minutes_data']:.1f}, "
        f"VAE {report['minutes_vae']:.1f}, diffusion {report['minutes_diffusion']:.1f}); CPU time of the "
        f"process {report['cpu_minutes']:.1f} min (= the wall time on an otherwise idle machine at {report['threads']} "
        "thread(s))",
        f"- diffusion steps done: {report['diffusion_steps']} of {cfg.steps} (batch {cfg.batch})",
        vae,
        f"- final diffusion {report['objective']} (mean of the last 100 steps): {report['final_diffusion_loss']:.4f}",
        f"- latent scaling_factor (1/std): {report['scaling_factor']:.4f}",
        f"- parameters: UNet {report['params_unet']:,}, VAE {report['params_vae']:,}, "
        f"text encoder {report['params_text']:,}; weights on disk {report['model_mb']:.2f} MB",
        f"- data: {report['train_prompts']} training prompts x {cfg.images_per_prompt} images; "
        f"{report['heldout_prompts']} held-out prompts (combinations never seen in training)",
        "",
        "Config: `" + json.dumps(asdict(cfg)) + "`",
        "",
        f"Loss curves: {loss_png}",
        "",
        "<!-- evaluation -->",
        "<!-- /evaluation -->",
        "",
        "<!-- speed -->",
        "<!-- /speed -->",
        "",
    ]
    path.write_text("\n".join(lines))


def update_section(name: str, text: str, path: Path = TRAINING_MD) -> None:
    """Replace the text between ``<!-- name -->`` and ``<!-- /name -->`` (appended if the markers are missing)."""
    block = f"<!-- {name} -->\n{text.strip()}\n<!-- /{name} -->"
    old = path.read_text() if path.is_file() else ""
    pattern = re.compile(rf"<!-- {name} -->.*?<!-- /{name} -->", re.S)
    path.write_text(pattern.sub(lambda _: block, old) if pattern.search(old) else old.rstrip() + "\n\n" + block + "\n")


def load_parts(model_dir: str | Path) -> tuple[AutoencoderKL, CLIPTextModel, UNet2DConditionModel, CLIPTokenizer]:
    """A trained world model's VAE, text encoder, UNet and tokenizer (the flow world starts from them)."""
    kw = {"local_files_only": True, "use_safetensors": True}
    return (AutoencoderKL.from_pretrained(model_dir, subfolder="vae", **kw),
            CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder", **kw),
            UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", **kw),
            CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer", local_files_only=True))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="world/model", help="output directory (diffusers layout)")
    parser.add_argument("--seed", type=int, default=0)
    for name in ("images_per_prompt", "vae_steps", "steps", "batch"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(TrainConfig, name))
    parser.add_argument("--max-minutes", type=float, default=TrainConfig.max_minutes)
    parser.add_argument("--lr", type=float, default=TrainConfig.lr)
    parser.add_argument("--process", choices=("ddim", "flow"), default="ddim",
                        help="ddim: ε-prediction (world/model); flow: rectified-flow velocity (world/flow_model)")
    parser.add_argument("--init", default=None,
                        help="start from this trained model directory (its VAE is kept: no VAE stage)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0: torch's default); 1 is far faster when other jobs share the CPU")
    parser.add_argument("--no-report", action="store_true", help="skip assets/ and TRAINING.md (smoke runs)")
    args = parser.parse_args(argv)
    cfg = TrainConfig(seed=args.seed, images_per_prompt=args.images_per_prompt, vae_steps=args.vae_steps,
                      steps=args.steps, batch=args.batch, lr=args.lr, max_minutes=args.max_minutes)
    objective = VelocityObjective() if args.process == "flow" else EpsilonObjective(cfg.snr_gamma)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0, cpu0 = time.monotonic(), time.process_time()
    deadline = t0 + 60 * cfg.max_minutes
    load_start = f"{os.getloadavg()[0]:.1f}"

    train_prompts, heldout = split_prompts(cfg.seed)
    scenes = sample_scenes(train_prompts, cfg.images_per_prompt * len(train_prompts), seed=cfg.seed)
    images = render_batch(scenes) * 2 - 1
    prompt_index = torch.arange(len(scenes)) % len(train_prompts)
    aside = render_batch(sample_scenes(train_prompts, 512, seed=cfg.seed + 100)) * 2 - 1
    t_data = time.monotonic()

    vae_report: dict = {"init": args.init}
    if args.init:
        vae, text_encoder, unet, tokenizer = load_parts(args.init)
        with torch.no_grad():
            latent_mean, latent_std, _ = encode_latents(vae, images, cfg.seed)
        scaling, vae_losses = vae.config.scaling_factor, []
    else:
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = write_tokenizer(Path(tmp) / "tokenizer")
        vae, text_encoder, unet = build_parts(tokenizer, cfg.seed)
        vae_losses = train_vae(images, cfg, vae)
        with torch.no_grad():
            recon_mse = F.mse_loss(vae(aside, sample_posterior=False).sample, aside).item()
        latent_mean, latent_std, scaling = encode_latents(vae, images, cfg.seed)
        vae.register_to_config(scaling_factor=scaling)
        vae_report = {"final_vae_loss": float(np.mean(vae_losses[-100:])), "vae_recon_mse": recon_mse}
    t_vae = time.monotonic()

    def token_ids(prompts: list[str]) -> torch.Tensor:
        return tokenizer(prompts, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                         return_tensors="pt").input_ids

    diff_losses, steps_done, text_encoder, unet = train_diffusion(
        latent_mean, latent_std, scaling, token_ids(train_prompts), prompt_index, token_ids([""])[0], cfg,
        text_encoder, unet, deadline, objective)
    t_diff = time.monotonic()

    save_model(args.out, vae, text_encoder, unet, tokenizer, objective.scheduler)
    model_mb = sum(f.stat().st_size for f in Path(args.out).rglob("*") if f.is_file()) / 2**20
    report = dict(
        command="python -m world.train " + " ".join(sys.argv[1:] if argv is None else argv),
        threads=torch.get_num_threads(), load_start=load_start, load_end=f"{os.getloadavg()[0]:.1f}",
        minutes_total=(t_diff - t0) / 60, minutes_data=(t_data - t0) / 60, minutes_vae=(t_vae - t_data) / 60,
        minutes_diffusion=(t_diff - t_vae) / 60, cpu_minutes=(time.process_time() - cpu0) / 60,
        diffusion_steps=steps_done, objective=objective.label, **vae_report,
        final_diffusion_loss=float(np.mean(diff_losses[-100:])), scaling_factor=scaling,
        params_unet=sum(p.numel() for p in unet.parameters()), params_vae=sum(p.numel() for p in vae.parameters()),
        params_text=sum(p.numel() for p in text_encoder.parameters()), model_mb=model_mb,
        train_prompts=len(train_prompts), heldout_prompts=len(heldout),
    )
    print(json.dumps(report, indent=2))
    if not args.no_report:
        prefix = "flow_" if args.process == "flow" else ""
        panels = [(vae_losses, "VAE: MSE + KL")] if vae_losses else []
        plot_losses([*panels, (diff_losses, f"diffusion: {objective.label}")], ASSETS / f"{prefix}train_loss.png")
        (ASSETS / f"{prefix}train_report.json").write_text(json.dumps({"config": asdict(cfg), **report}, indent=2))
        if args.process == "flow":
            write_training_md(cfg, report, FLOW_TRAINING_MD, "The embedded flow world model",
                              "assets/flow_train_loss.png")
        else:
            write_training_md(cfg, report, TRAINING_MD)


if __name__ == "__main__":
    main()
