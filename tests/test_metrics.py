"""learner.metrics and learner.plots: JSON lines, TensorBoard read-back, bucket stats, grids, curves."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import metric_history
from matplotlib.figure import Figure
from PIL import Image

from learner.metrics import RunLogger, bucket_stats, summary_stats
from learner.plots import PAD, save_comparison_grid, save_image_grid, save_reward_curve

F64 = torch.float64


def read_jsonl(path: Path) -> list[dict]:
    def reject(token: str) -> None:
        raise AssertionError(f"non-standard JSON constant {token} in {path.name}")

    return [json.loads(line, parse_constant=reject) for line in path.read_text().splitlines()]


def tb_scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# ---------------------------------------------------------------------------------------------- RunLogger


def test_log_writes_one_json_line_per_call_and_keeps_history(tmp_path: Path):
    with RunLogger(tmp_path, tensorboard=False) as run:
        run.log(0, {"loss": 0.75, "accuracy": 0.5}, prefix="train")
        run.log(3, {"loss": torch.tensor(0.5), "staleness": np.float32(2.0), "dropped": 4}, prefix="train/")
        run.log(np.int64(3), {"reward_mean": 1.25})  # type: ignore[arg-type]
    lines = read_jsonl(tmp_path / "metrics.jsonl")
    assert [line["step"] for line in lines] == [0, 3, 3]
    assert all(isinstance(line["time"], float) for line in lines)
    assert lines[0]["metrics"] == {"train/loss": 0.75, "train/accuracy": 0.5}
    assert lines[1]["metrics"] == {"train/loss": 0.5, "train/staleness": 2.0, "train/dropped": 4.0}
    assert lines[2]["metrics"] == {"reward_mean": 1.25}
    assert metric_history(run, "train/loss") == [(0, 0.75), (3, 0.5)]
    assert not (tmp_path / "tb").exists()


def test_non_finite_values_become_null_and_stay_out_of_history_and_tensorboard(tmp_path: Path):
    with RunLogger(tmp_path) as run:
        run.log(1, {"loss": 0.5, "kl": 0.1}, prefix="train")
        run.log(2, {"loss": math.nan, "kl": math.inf}, prefix="train")
        run.log(3, {"loss": 0.25, "kl": -math.inf}, prefix="train")
    lines = read_jsonl(tmp_path / "metrics.jsonl")  # strict parse: no NaN/Infinity tokens
    assert lines[1]["metrics"] == {"train/loss": None, "train/kl": None}
    assert lines[2]["metrics"] == {"train/loss": 0.25, "train/kl": None}
    assert metric_history(run, "train/loss") == [(1, 0.5), (3, 0.25)]
    assert metric_history(run, "train/kl") == [(1, 0.1)]
    scalars = tb_scalars(tmp_path / "tb")
    assert [s for s, _ in scalars["train/loss"]] == [1, 3]
    assert [s for s, _ in scalars["train/kl"]] == [1]


def test_tensorboard_event_file_holds_the_scalar_tags_and_values(tmp_path: Path):
    torch.manual_seed(0)
    values = torch.rand(5, dtype=F64).tolist()
    with RunLogger(tmp_path) as run:
        for step, v in enumerate(values):
            run.log(step * 10, {"loss": v, "implicit_acc": 1 - v}, prefix="train")
        run.log(50, {"images_per_s/actor0": 12.5})
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    scalars = tb_scalars(tmp_path / "tb")
    assert {"train/loss", "train/implicit_acc", "images_per_s/actor0"} <= set(scalars)
    assert [s for s, _ in scalars["train/loss"]] == [0, 10, 20, 30, 40]
    np.testing.assert_allclose([v for _, v in scalars["train/loss"]], values, rtol=1e-6)  # stored as float32
    acc = [v for _, v in scalars["train/implicit_acc"]]
    np.testing.assert_allclose(acc, [1 - v for v in values], rtol=1e-6)
    assert scalars["images_per_s/actor0"] == [(50, 12.5)]


def test_event_writes_json_and_one_human_line(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.INFO, logger="dpr"), RunLogger(tmp_path, tensorboard=False) as run:
        run.event("actor_restarted", actor=1, version=4)
        run.event("nan_skip", step=7, loss=math.nan, reason="loss was nan", path=tmp_path)
    events = read_jsonl(tmp_path / "events.jsonl")
    assert [e["kind"] for e in events] == ["actor_restarted", "nan_skip"]
    assert events[0]["fields"] == {"actor": 1, "version": 4}
    assert events[1]["fields"] == {"step": 7, "loss": None, "reason": "loss was nan", "path": str(tmp_path)}
    messages = [r.getMessage() for r in caplog.records if r.name == "dpr"]
    assert messages[0] == "[event] actor_restarted actor=1 version=4"
    assert messages[1].startswith('[event] nan_skip step=7 loss=nan reason="loss was nan" path=')


def test_files_append_across_loggers_so_a_resumed_run_keeps_its_record(tmp_path: Path):
    with RunLogger(tmp_path, tensorboard=False) as run:
        run.log(0, {"loss": 1.0})
    with RunLogger(tmp_path, tensorboard=False) as run:
        run.log(1, {"loss": 0.5})
    assert [line["step"] for line in read_jsonl(tmp_path / "metrics.jsonl")] == [0, 1]


def test_bad_logger_input_is_rejected_with_the_key_named(tmp_path: Path):
    run = RunLogger(tmp_path, tensorboard=False)
    with pytest.raises(ValueError, match=r"'train/loss'.*real number"):
        run.log(0, {"loss": "0.5"}, prefix="train")
    with pytest.raises(ValueError, match=r"'reward'.*scalar"):
        run.log(0, {"reward": torch.ones(3)})
    with pytest.raises(ValueError, match="step"):
        run.log(-1, {"loss": 0.5})
    with pytest.raises(ValueError, match="step"):
        run.log(1.5, {"loss": 0.5})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="names"):
        run.log(0, {"": 0.5})
    with pytest.raises(ValueError, match="kind"):
        run.event("actor restarted")
    with pytest.raises(KeyError, match="'train/los'"):
        metric_history(run, "train/los")
    assert (tmp_path / "metrics.jsonl").read_text() == ""  # nothing half-written by a rejected call
    run.close()
    run.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        run.log(0, {"loss": 0.5})


# ---------------------------------------------------------------------------------------------- statistics


def manual_mean_std_sem(xs: list[float]) -> tuple[float, float, float]:
    n = len(xs)
    mean = sum(xs) / n
    ss = sum((x - mean) ** 2 for x in xs)
    sem = math.sqrt(ss / (n - 1)) / math.sqrt(n) if n > 1 else math.nan
    return mean, math.sqrt(ss / n), sem


def test_summary_stats_match_the_formulas():
    torch.manual_seed(1)
    values = torch.randn(37, dtype=F64) * 3 + 1
    mean, std, sem = manual_mean_std_sem(values.tolist())
    got = summary_stats(values, name="reward")
    assert got == pytest.approx({"reward_mean": mean, "reward_std": std, "reward_sem": sem}, rel=1e-12)
    one = summary_stats(torch.tensor([2.0]))
    assert one["reward_mean"] == 2.0 and one["reward_std"] == 0.0 and math.isnan(one["reward_sem"])
    with pytest.raises(ValueError, match="empty"):
        summary_stats(torch.empty(0))


def test_bucket_stats_match_a_manual_computation():
    torch.manual_seed(3)
    num_steps = 20
    k = torch.randint(0, num_steps, (200,))
    values = torch.randn(200, dtype=F64)
    got = bucket_stats(values, k, num_buckets=4, num_steps=num_steps)
    for lo, hi in [(0, 4), (5, 9), (10, 14), (15, 19)]:
        xs = [v for v, s in zip(values.tolist(), k.tolist(), strict=True) if lo <= s <= hi]
        mean, std, _ = manual_mean_std_sem(xs)
        label = f"bucket{lo}-{hi}"
        assert got[f"reward_mean/{label}"] == pytest.approx(mean, rel=1e-12)
        assert got[f"reward_std/{label}"] == pytest.approx(std, rel=1e-12)
        assert got[f"reward_count/{label}"] == len(xs)
    assert len(got) == 12


def test_bucket_stats_uneven_split_and_empty_bucket():
    values = torch.tensor([1.0, 3.0, 10.0, 20.0, 30.0], dtype=F64)
    k = torch.tensor([0, 2, 7, 8, 9])  # nothing in steps 3..5
    got = bucket_stats(values, k, num_buckets=3, num_steps=10, name="r")
    assert sorted(got) == sorted(
        f"r_{stat}/bucket{b}" for stat in ("mean", "std", "count") for b in ("0-2", "3-5", "6-9")
    )
    assert got["r_mean/bucket0-2"] == 2.0 and got["r_std/bucket0-2"] == 1.0
    assert got["r_mean/bucket6-9"] == 20.0 and got["r_std/bucket6-9"] == pytest.approx(math.sqrt(200 / 3))
    assert math.isnan(got["r_mean/bucket3-5"]) and math.isnan(got["r_std/bucket3-5"])
    assert got["r_count/bucket3-5"] == 0.0


def test_bucket_stats_rejects_bad_input():
    v = torch.zeros(4)
    with pytest.raises(ValueError, match="step_index must be in"):
        bucket_stats(v, torch.tensor([0, 1, 2, 10]), num_buckets=2, num_steps=10)
    with pytest.raises(ValueError, match="integer"):
        bucket_stats(v, torch.zeros(4), num_buckets=2, num_steps=10)
    with pytest.raises(ValueError, match="must match"):
        bucket_stats(v, torch.zeros(3, dtype=torch.long), num_buckets=2, num_steps=10)
    with pytest.raises(ValueError, match="num_buckets"):
        bucket_stats(v, torch.zeros(4, dtype=torch.long), num_buckets=11, num_steps=10)


# ---------------------------------------------------------------------------------------------- plots


def line_px(font_size: int) -> int:
    return font_size + 3


def expected_pixels(image: torch.Tensor) -> np.ndarray:
    """[3,H,W] in [0,1] → [H,W,3] uint8, rounding to nearest (the test's own conversion)."""
    return np.rint(image.clamp(0, 1).permute(1, 2, 0).numpy().astype(np.float64) * 255).astype(np.uint8)


def downscale(tile: np.ndarray, up: int) -> np.ndarray:
    """Every up×up block of a nearest-neighbour upscale is constant: check that, keep one pixel a block."""
    h, w = tile.shape[0] // up, tile.shape[1] // up
    blocks = tile.reshape(h, up, w, up, 3)
    assert (blocks == blocks[:, :1, :, :1]).all(), "upscaling is not nearest-neighbour"
    return blocks[:, 0, :, 0]


def test_image_grid_size_tiles_and_captions(tmp_path: Path):
    torch.manual_seed(4)
    images = torch.rand(7, 3, 8, 6)
    images[5, 0, 0, 0] = 1.02  # decoder overshoot: clamped
    captions = [f"prompt {i}" for i in range(6)] + [""]
    path = tmp_path / "sub" / "grid.png"
    up, ncol, lines, font = 3, 3, 2, 11
    save_image_grid(images, captions, path, ncol=ncol, upscale=up, caption_lines=lines, font_size=font)
    img = np.asarray(Image.open(path).convert("RGB"))
    t, u, c = 8 * up, 6 * up, lines * line_px(font)
    assert img.shape == (3 * (t + c) + 4 * PAD, 3 * u + 4 * PAD, 3)
    for i in (0, 5, 6):
        r, j = divmod(i, ncol)
        x, y = PAD + j * (u + PAD), PAD + r * (t + c + PAD)
        np.testing.assert_array_equal(downscale(img[y : y + t, x : x + u], up), expected_pixels(images[i]))
        band = img[y + t : y + t + c, x : x + u]
        assert (band.min() < 128) == bool(captions[i]), f"caption band of tile {i}"
    assert (img[-(t + c + PAD) :, -(u + PAD) :] == 255).all()  # the unused 9th cell stays blank


def test_comparison_grid_stacks_labelled_rows(tmp_path: Path):
    torch.manual_seed(5)
    before, after = torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8)
    up, font = 4, 11
    path = tmp_path / "before_after.png"
    rows = {"before": before, "after": after}
    save_comparison_grid(rows, ["a", "b", "c", "d"], path, upscale=up, font_size=font)
    img = np.asarray(Image.open(path).convert("RGB"))
    t = u = 8 * up
    c = 2 * line_px(font)
    assert img.shape[0] == 2 * (t + PAD) + PAD + c
    label_w = img.shape[1] - (4 * u + 5 * PAD)
    assert label_w > 2 * PAD
    for r, row in enumerate((before, after)):
        for j in (0, 3):
            x, y = label_w + PAD + j * (u + PAD), PAD + r * (t + PAD)
            np.testing.assert_array_equal(downscale(img[y : y + t, x : x + u], up), expected_pixels(row[j]))
        assert img[PAD + r * (t + PAD) : PAD + r * (t + PAD) + t, :label_w].min() < 128, "row label drawn"
    assert img[2 * (t + PAD) :, label_w:].min() < 128, "captions drawn under the last row"


def test_reward_curve_png_size_and_content(tmp_path: Path):
    path = tmp_path / "reward_curve.png"
    history = {
        "held-out": [(10, 0.3, 0.05), (0, 0.1, 0.04), (20, 0.5, math.nan), (30, math.nan, 0.1)],
        "train": [(5, 0.2, 0.02), (15, 0.45, 0.03)],
        "not yet": [],
    }
    save_reward_curve(history, path, figsize=(5.0, 3.0), dpi=80)
    img = Image.open(path)
    assert img.format == "PNG" and img.size == (400, 240)
    rgb = np.asarray(img.convert("RGB")).astype(int)
    for color in ((0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)):  # matplotlib's first two cycle colours
        assert (np.abs(rgb - color).sum(-1) < 30).sum() > 50, f"line of colour {color}"
        band = 0.75 * 255 + 0.25 * np.array(color)  # alpha 0.25 over the white axes
        assert (np.abs(rgb - band).sum(-1) < 6).sum() > 100, f"± SEM band of colour {color}"
    assert [p.name for p in tmp_path.iterdir()] == ["reward_curve.png"]


def test_plot_inputs_are_validated(tmp_path: Path):
    ok = torch.rand(2, 3, 4, 4)
    cases = [
        (lambda: save_image_grid(torch.rand(2, 4, 4, 4), ["a", "b"], tmp_path / "g.png"), "shape"),
        (lambda: save_image_grid(ok * math.nan, ["a", "b"], tmp_path / "g.png"), "NaN"),
        (lambda: save_image_grid(ok, ["a"], tmp_path / "g.png"), "1 captions for 2 images"),
        (lambda: save_image_grid((ok * 255).byte(), ["a", "b"], tmp_path / "g.png"), "float"),
        (lambda: save_image_grid(ok, ["a", "b"], tmp_path / "g.jpg"), r"\.png"),
        (lambda: save_image_grid(ok, ["a", "b"], tmp_path / "g.png", upscale=0), "upscale"),
        (lambda: save_comparison_grid({"x": ok, "y": ok[:1]}, ["a", "b"], tmp_path / "c.png"), "same shape"),
        (lambda: save_comparison_grid({}, [], tmp_path / "c.png"), "empty"),
        (lambda: save_reward_curve({}, tmp_path / "r.png"), "empty"),
        (lambda: save_reward_curve({"s": [(0, 1.0)]}, tmp_path / "r.png"), "'s'.*step, mean, sem"),
        (lambda: save_reward_curve({"s": [(0, 1.0, -0.1)]}, tmp_path / "r.png"), ">= 0"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    assert list(tmp_path.iterdir()) == []


def test_failed_writes_leave_no_file_behind_and_keep_the_old_figure(tmp_path: Path, monkeypatch):
    grid, curve = tmp_path / "grid.png", tmp_path / "curve.png"
    save_image_grid(torch.rand(2, 3, 4, 4), ["a", "b"], grid)
    save_reward_curve({"s": [(0, 1.0, 0.1)]}, curve)
    old = {p: p.read_bytes() for p in (grid, curve)}

    def fail_midway(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", fail_midway)
    monkeypatch.setattr(Figure, "savefig", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        save_image_grid(torch.rand(2, 3, 4, 4), ["a", "b"], grid)
    with pytest.raises(OSError, match="disk full"):
        save_comparison_grid({"before": torch.rand(1, 3, 4, 4)}, ["a"], tmp_path / "new.png")
    with pytest.raises(OSError, match="disk full"):
        save_reward_curve({"s": [(0, 2.0, 0.1)]}, curve)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curve.png", "grid.png"]
    assert {p: p.read_bytes() for p in (grid, curve)} == old
