"""``python -m learner.data import`` on a small dataset in Pick-a-Pic v2's layout made from the embedded world
(pairs ranked by the world reward, PNG bytes, a few broken rows), then Diffusion-DPO trained offline on it."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from actors.records import TrajectoryLog, iterate_batches
from learner.data import main as data_main
from learner.trainer import Learner
from rewards.world import WorldReward
from world.scenes import render_batch, sample_scenes, split_prompts

pytestmark = pytest.mark.filterwarnings("ignore")
MODEL = str(Path(__file__).resolve().parent.parent / "world" / "model")
BROKEN = {"undecodable": 3, "no caption": 7, "bad labels": 11, "tie": 13}  # row -> what is wrong


def png(image: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def make_pickapic(root: Path, n: int, seed: int = 0, shards: int = 2, broken: bool = True) -> None:
    """``n`` rows in Pick-a-Pic v2's columns: two renders of one world prompt, label 1 on the higher world reward."""
    prompts = split_prompts(0)[0]
    a, b = sample_scenes(prompts, n, seed), sample_scenes(prompts, n, seed + 1)
    big_a, big_b = render_batch(a, 48), render_batch(b, 48)  # larger than the model's 32 px: the import resizes
    reward = WorldReward()
    caps = [prompts[i % len(prompts)] for i in range(n)]
    first = reward(render_batch(a), caps) > reward(render_batch(b), caps)
    rows = {"ranking_id": list(range(n)), "caption": caps, "jpg_0": [png(x) for x in big_a],
            "jpg_1": [png(x) for x in big_b], "label_0": first.float().tolist(), "label_1": (~first).float().tolist(),
            "image_0_uid": [f"u{i}a" for i in range(n)], "image_1_uid": [f"u{i}b" for i in range(n)]}
    if broken:
        rows["jpg_1"][BROKEN["undecodable"]] = b"not an image"
        rows["caption"][BROKEN["no caption"]] = None
        rows["label_0"][BROKEN["bad labels"]], rows["label_1"][BROKEN["bad labels"]] = 0.3, 0.7
        rows["label_0"][BROKEN["tie"]] = rows["label_1"][BROKEN["tie"]] = 0.5
    table = pa.table(rows)
    root.mkdir(parents=True, exist_ok=True)
    for k, start in enumerate(range(0, n, -(-n // shards))):
        pq.write_table(table.slice(start, -(-n // shards)), root / f"train-{k:05d}.parquet")


def test_import_reports_bad_rows_and_trains_diffusion_dpo(tmp_path, make_config, capsys):
    src, out = tmp_path / "pickapic", tmp_path / "pairs"
    make_pickapic(src, 48)
    (out / "stale").mkdir(parents=True)  # an earlier import: replaced whole
    assert data_main(["import", "--format", "pickapic", str(src), "--out", str(out), "--model", MODEL,
                      "--batch-size", "16"]) == 0
    assert "imported 44 pairs from 48 rows" in capsys.readouterr().out
    assert not (out / "stale").exists() and not list(tmp_path.glob(".pairs.*"))
    summary = json.loads((out / "import.json").read_text())
    assert (summary["pairs"], summary["bad_rows"], summary["ties_dropped"]) == (44, 3, 1)
    bad = [json.loads(line) for line in (out / "bad_rows.jsonl").read_text().splitlines()]
    assert sorted(int(b["ranking_id"]) for b in bad) == sorted(v for k, v in BROKEN.items() if k != "tie")
    assert {b["reason"].split(":")[0] for b in bad} == {"undecodable jpg_1", "missing caption",
                                                        "unknown label values (0.3, 0.7)"}
    table = TrajectoryLog(out).read()
    assert table.schema.metadata[b"kind"] == b"clean" and table.num_rows == 44
    assert table.schema.field("x0_w").type.shape == [4, 8, 8]
    # Diffusion-DPO on the imported pairs: the DPO loss on them falls from log 2 (policy = reference)
    cfg = make_config(model={"path": MODEL}, loss={"kind": "diffusion_dpo", "beta": 500.0},
                      train={"lr": 3e-3, "batch_size": 16}, lora={"rank": 4, "alpha": 4.0})
    learner = Learner(cfg)

    def dpo_loss() -> float:
        state = learner.generator.get_state()
        learner.generator.manual_seed(123)  # the same t and noise at every measurement
        with torch.no_grad():
            loss = float(learner._loss(next(iterate_batches(table, 44, 0)))[0].loss)
        learner.generator.set_state(state)
        return loss

    before = dpo_loss()
    assert abs(before - np.log(2)) < 1e-6
    for epoch in range(4):
        for batch in iterate_batches(table, 16, epoch):
            learner.update(batch)
    assert dpo_loss() < before - 0.02  # seeded: 0.693 -> 0.644 measured


def test_folder_format_and_one_line_errors(tmp_path, capsys):
    images = render_batch(sample_scenes(["a red circle on the left"], 2, 0))
    for i, x in enumerate(images):
        (tmp_path / f"{i}.png").write_bytes(png(x))
    (tmp_path / "pairs.csv").write_text("prompt,image_a,image_b,preferred\n"
                                        "a red circle on the left,0.png,1.png,b\n"
                                        "a red circle on the left,0.png,missing.png,a\n")
    out = tmp_path / "out"
    assert data_main(["import", "--format", "folder", str(tmp_path / "pairs.csv"), "--out", str(out),
                      "--model", MODEL]) == 0
    table = TrajectoryLog(out).read()
    assert table.num_rows == 1 and table.column("prompt").to_pylist() == ["a red circle on the left"]
    assert "undecodable jpg_1" in (out / "bad_rows.jsonl").read_text()
    assert data_main(["import", "--format", "pickapic", str(tmp_path / "nothing"), "--out", str(out),
                      "--model", MODEL]) == 2
    assert "no parquet files" in capsys.readouterr().err
