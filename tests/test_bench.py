"""The benchmark suite: its arithmetic against hand computations, the FLOP counter on known layers, the GPU path's
CPU-runnable parts, and a --quick smoke run that produces every table (no timing assertions)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bench.broadcast import architecture_sizes
from bench.common import bench_tree, count_flops, make_config, table
from bench.gpu import run_gpu, unet_step_flops
from bench.system import window_figures
from policy.components import ARCHITECTURES


def _line(t: float, step: int, **metrics: float) -> str:
    return json.dumps({"step": step, "time": t, "metrics": metrics})


@pytest.mark.parametrize("kind, per_record", [("step_branch", 1), ("trajectory", 2)])
def test_window_figures_match_a_hand_computation(tmp_path, tiny_model_dir, kind, per_record):
    cfg = make_config(bench_tree(tiny_model_dir, 2, True, tmp_path), pairs={"kind": kind},
                      guidance={"kind": "reward_gradient" if kind == "step_branch" else "none"})
    lines = [
        _line(99.0, 0, **{"rollout/actor0/batch": 50.0, "rollout/actor0/chains_per_s": 1.0}),  # before: ignored
        _line(100.0, 0, **{"eval/heldout_reward_mean": 0.3}),  # the loop starts
        _line(101.0, 0, **{"rollout/actor0/batch": 4.0, "rollout/actor0/chains_per_s": 2.0}),
        _line(102.5, 0, **{"rollout/actor1/batch": 6.0, "rollout/actor1/chains_per_s": 3.0}),
        _line(103.0, 1, **{"train/loss": 0.7, "train/update_seconds": 0.5}),
        _line(105.0, 2, **{"train/loss": 0.6, "train/update_seconds": 1.0}),  # the last update: the loop ends
        _line(106.0, 2, **{"rollout/actor0/batch": 8.0, "rollout/actor0/chains_per_s": 2.0}),  # after: ignored
        _line(107.0, 2, **{"eval/heldout_reward_mean": 0.4}),
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(lines) + "\n")
    f = window_figures(path, cfg)
    wall, chains, upd = 5.0, 10.0 * per_record, 1.5
    busy = 4 * per_record / 2.0 + 6 * per_record / 3.0
    assert f["updates"] == 2 and f["chains"] == chains
    assert f["wall_s"] == pytest.approx(wall)
    assert f["images_per_s"] == pytest.approx(chains / wall)
    assert f["steps_per_s"] == pytest.approx(chains * cfg.sampler.num_steps / wall)
    assert f["updates_per_s"] == pytest.approx(2 / wall)
    assert f["s_per_update"] == pytest.approx(upd / 2)
    assert f["not_training"] == pytest.approx(1 - upd / wall)
    assert f["generate_s"] == pytest.approx(busy)
    assert f["gen_chains_per_s"] == pytest.approx(chains / busy)
    assert f["busy_processes"] == pytest.approx((busy + upd) / wall)
    assert f["chains_per_call"] == pytest.approx(chains / 2)


def test_window_figures_needs_a_finished_run(tmp_path, tiny_model_dir):
    cfg = make_config(bench_tree(tiny_model_dir, 2, True, tmp_path))
    path = tmp_path / "metrics.jsonl"
    path.write_text(_line(1.0, 0, **{"eval/heldout_reward_mean": 0.3}) + "\n")
    with pytest.raises(ValueError, match="no 'before' evaluation or no learner update"):
        window_figures(path, cfg)


@pytest.mark.parametrize("batch, branch, per_task", [(64, 10, 16), (8, 2, 4), (64, 10, 40), (12, 5, 3), (7, 3, 1)])
def test_baseline_round_fills_whole_batches(tmp_path, tiny_model_dir, batch, branch, per_task):
    from bench.baseline import round_prompts

    cfg = make_config(bench_tree(tiny_model_dir, 2, False, tmp_path), train={"batch_size": batch},
                      pairs={"branch_steps": list(range(branch))}, rollout={"prompts_per_task": per_task})
    expected = next(n for n in range(per_task, 10_000) if n * branch % batch == 0)  # brute force
    assert round_prompts(cfg) == expected


def test_lora_sizes_match_the_architecture(tmp_path):
    from diffusers import UNet2DConditionModel

    spec = ARCHITECTURES["tiny"]["net"]
    rows = {r["what"]: r for r in architecture_sizes(spec, ranks=(2, 8))}
    unet = UNet2DConditionModel(**spec)
    targets = [m for name, m in unet.named_modules()
               if isinstance(m, torch.nn.Linear) and name.endswith((".to_q", ".to_k", ".to_v", ".to_out.0"))]
    assert targets
    for r in (2, 8):  # LoRA on W (out × in): A is r × in, B is out × r
        params = sum(r * (m.in_features + m.out_features) for m in targets)
        assert rows[f"LoRA r{r}"]["params"] == params
        assert rows[f"LoRA r{r}"]["mb_fp32"] == pytest.approx(4 * params / 1e6)
        assert rows[f"LoRA r{r}"]["mb_bf16"] == pytest.approx(2 * params / 1e6)
    assert rows["full UNet"]["params"] == sum(p.numel() for p in unet.parameters())


def test_flop_counter_on_known_layers():
    torch.manual_seed(0)
    lin, conv = torch.nn.Linear(16, 24), torch.nn.Conv2d(3, 5, kernel_size=3, padding=1)
    x, img = torch.randn(7, 16), torch.randn(2, 3, 10, 10)
    assert count_flops(lambda: lin(x)) == 2 * 7 * 16 * 24
    assert count_flops(lambda: conv(img)) == 2 * 2 * 5 * 10 * 10 * 3 * 3 * 3


def test_unet_step_flops_on_the_tiny_model(one_thread):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**ARCHITECTURES["tiny"]["net"]).eval()
    one = unet_step_flops(unet, 1, text_len=16, guidance=False)
    assert one > 0
    assert unet_step_flops(unet, 3, text_len=16, guidance=False) == 3 * one  # every op is per sample
    assert unet_step_flops(unet, 1, text_len=16, guidance=True) == 2 * one  # CFG doubles the batch


def test_gpu_section_skips_cleanly_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "no CUDA" in run_gpu()["skipped"]


@pytest.fixture()
def one_thread():
    """One torch thread (the roles' default): two OpenMP threads crawl when other processes share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_gpu_measurements_run_on_cpu_with_the_tiny_model(tiny_model_dir, one_thread):
    from bench.gpu import _learner, _sampling
    from policy import DiffusionPolicy, SamplerConfig

    policy = DiffusionPolicy.from_pretrained(tiny_model_dir, sampler=SamplerConfig(num_steps=2))
    (row,) = _sampling(policy, (2,))
    assert row["images_per_s"] > 0 and row["gflop_per_image"] > 0 and row["mfu"] > 0
    out = _learner(tiny_model_dir, (1,), device="cpu", dtype="float32", num_steps=2)
    assert [r["pairs"] for r in out["updates"]] == [1] and out["updates"][0]["update_s"] > 0
    sizes = {r["what"]: r["mb"] for r in out["broadcast"]}
    assert 0 < sizes["LoRA r16"] < sizes["full UNet"]


def test_table_renders_every_cell():
    text = table(["a", "bb"], [[1, 0.123456], ["x", None], [2, 12345.6]]).splitlines()
    assert text[0] == "| a | bb    |" and text[2] == "| 1 | 0.123 |"
    assert text[3] == "| x | –     |" and text[4] == "| 2 | 12346 |"


def test_cli_errors_are_one_line(tmp_path, capsys):
    from bench.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["--sections", "baseline,nope"])
    assert e.value.code == 2 and "unknown ['nope']" in capsys.readouterr().err
    assert main(["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "r.md")]) == 2
    assert "model directory not found" in capsys.readouterr().err


def test_quick_run_writes_every_table(tmp_path):
    from bench.__main__ import main

    out = tmp_path / "RESULTS.md"
    out.write_text("# Benchmark results\n\nWritten by hand.\n")
    assert main(["--quick", "--out", str(out)]) == 0
    text = out.read_text()
    for needle in ("## 1-2. Throughput", "| baseline (1 process", "| 2 actors async", "Thread scaling",
                   "## 3. Weight broadcast", "| LoRA r4 ", "| full UNet", "SD-1.5 architecture",
                   "## 4. Reward batching", "concurrent callers", "load average"):
        assert needle in text, needle
    assert text.startswith("# Benchmark results\n\nWritten by hand.\n")
    rows = [ln for ln in text.splitlines() if ln.startswith("| 2 actors async")]
    assert rows and not math.isnan(float(rows[0].split("|")[5]))  # images/s is a number
    data = json.loads((tmp_path / "results.json").read_text())
    assert {"baseline", "system", "broadcast", "reward_local", "reward_actor", "machine"} <= set(data)
    assert [r["name"] for r in data["system"]][-1] == "2 actors async"


def test_report_keeps_the_hand_written_text_around_the_generated_block(tmp_path):
    from bench.__main__ import GENERATED, write_report

    path = tmp_path / "RESULTS.md"
    write_report(path, "| old |")
    assert path.read_text() == f"# Benchmark results\n\n{GENERATED[0]}\n| old |\n{GENERATED[1]}\n"
    path.write_text(path.read_text().replace("# Benchmark results\n", "# Benchmark results\nAnalysis.\n")
                    + "After.\n")
    write_report(path, "| new |")
    assert path.read_text() == f"# Benchmark results\nAnalysis.\n\n{GENERATED[0]}\n| new |\n{GENERATED[1]}\nAfter.\n"


def _fake_run(name: str, images: float, updates: float, **extra: float) -> dict:
    return {"name": name, "updates": 20, "chains": 100, "wall_s": 10.0, "images_per_s": images,
            "steps_per_s": 20 * images, "updates_per_s": updates, "s_per_update": 0.5, "not_training": 0.5,
            "update_s": 5.0, "gen_chains_per_s": 3.0, "busy_processes": 1.5, "total_s": 30.0, "chains_per_call": 8.0,
            **extra}


def test_render_puts_every_run_in_the_tables_and_writes_no_analysis():
    from bench.__main__ import render

    probe = {"gen_chains_per_s": {1: 4.0, 2: 0.5}, "update_s": {1: 0.8, 2: 5.0}, "chains_per_call": 8}
    base = _fake_run("baseline (1 process, 1 thread)", 4.0, 0.6, threads=1, probe=probe, generate_s=5.0,
                     publish_s=0.1, round_prompts=32)
    system = [_fake_run("1 actor async", 3.0, 0.5),
              _fake_run("2 actors async", 5.0, 0.7, dropped_stale_pairs=30, trained_age_mean=1.5)]
    res = {"machine": {"cpu": "x", "cores": 2, "ram_gib": 1.0, "load_avg": (0.5, 0.5, 0.5), "python": "3",
                       "torch": "t", "ray": "r", "diffusers": "d", "cuda": False, "date": "today"},
           "quick": False, "cores": 2, "batch_size": 64, "pairs_per_prompt": 10, "num_steps": 20, "seconds": 1.0,
           "model": "m", "updates": 20, "lora_rank": 4, "baseline": base, "system": system,
           "reward_local": [{"batch": 16, "scores_per_s": 1.0, "ms_per_call": 3.0},
                            {"batch": 32, "scores_per_s": 1.0, "ms_per_call": 1.0}],
           "reward_actor": [{"callers": 1, "request_images": 32, "scores_per_s": 1.0, "images_per_batch": 32.0,
                             "latency_ms": 11.5}],
           "broadcast": [{"what": "LoRA r4", "rank": 4, "params": 1, "mb": 1.0, "export_ms": 7.0, "put_ms": 1.0,
                          "actors_ms": 12.0, "local_load_ms": 1.0}],
           "sd15_sizes": []}
    text = render(res, "python -m bench")
    rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]]
            for ln in text.splitlines() if ln.startswith("| ")}
    assert rows["2 actors async"][3:5] == ["5", "1.25"]  # images/s and × baseline (5.0 / 4.0)
    assert rows["2 actors async"][-2:] == ["30", "1.5"]  # stale pairs dropped, mean trained pair age
    assert rows["1 actor async"][7] == "0.833"  # updates × baseline (0.5 / 0.6)
    assert "Where the time goes" not in text and "Headline" not in text
