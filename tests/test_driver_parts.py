"""The driver's parts without Ray: weight transport between the roles, the staleness buffer, the strict-JSON
reward curve. (The Ray paths, collective transport and actor recovery included, are in test_system.py.)"""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from actors.rollout import RolloutWorker
from actors.stored import StoredPairs, record_summary
from learner.buffer import PairBuffer, mean_age
from learner.metrics import RunLogger
from learner.report import Evaluator, RolloutStats
from learner.trainer import Learner
from policy import POLICY
from policy.lora import checksum
from policy.transport import OBJECT_STORE


def _perturb(learner: Learner) -> None:
    with torch.no_grad():
        for p in learner.policy.adapter_parameters(POLICY).values():
            p.add_(0.01)


def test_object_store_round_trip_and_a_resend_carries_the_published_version(make_config):
    cfg = make_config()
    learner, worker = Learner(cfg), RolloutWorker(cfg.rollout_settings())
    _perturb(learner)
    first = learner.send_weights(1, OBJECT_STORE)
    report = worker.receive_weights(first, OBJECT_STORE)
    assert (report.version, report.keys_matched, report.checksum) == (1, len(first.tensors()), first.checksum)
    assert worker.version == 1
    _perturb(learner)  # an update after the publish ...
    again = learner.send_weights(1)  # ... does not leak into a re-send of version 1 (e.g. to a restarted actor)
    assert again.checksum == first.checksum
    assert worker.receive_weights(again).checksum == first.checksum
    newer = learner.send_weights(2)
    live = {k: p.detach() for k, p in learner.policy.adapter_parameters(POLICY).items()}
    assert newer.checksum == checksum(live) != first.checksum


def test_a_generate_that_carries_weights_loads_them_before_sampling_and_reports_the_load(make_config):
    cfg = make_config()
    learner, worker = Learner(cfg), RolloutWorker(cfg.rollout_settings())
    _perturb(learner)
    state = learner.send_weights(1, OBJECT_STORE)
    batch, stats = worker.generate(["a red circle on the left"], [0], [0], expected_version=1, weights=state)
    assert (stats["load"].version, stats["load"].checksum) == (1, state.checksum)
    assert set(batch.column("policy_version").to_pylist()) == {1}  # sampled by the version it carried
    assert "load" not in worker.generate(["a red circle on the left"], [0], [1], expected_version=1)[1]


def test_buffer_drops_and_counts_stale_records_and_takes_the_oldest_first():
    """Calls' records by reference (one version each): stale calls dropped and counted on arrival, the oldest rows
    taken first, a call split across two updates, trained ages counted per row."""
    buf = PairBuffer(max_staleness=1)
    assert [buf.accept(name, rows, v, version=3) for name, rows, v in (("a", 1, 3), ("b", 1, 2), ("c", 1, 1),
                                                                      ("d", 1, 3))] == [0, 1, 2, 0]
    assert (len(buf), buf.seen, buf.dropped) == (3, 4, 1)
    buf.accept("e", 1, 0, version=4)
    buf.accept("f", 3, 4, version=4)
    assert (len(buf), buf.seen, buf.dropped) == (6, 8, 2)
    assert buf.histogram == {"0": 5, "1": 1, "2": 1, "4": 1}
    for version, step in ((2, 10), (3, 12), (4, 15)):  # versions published after 10, 12 and 15 updates
        buf.published(version, step)
    assert buf.take(2, step=16) == StoredPairs((("a", 0, 1), ("b", 0, 1)))
    assert buf.take(2, step=17) == StoredPairs((("d", 0, 1), ("f", 0, 1)))  # f's other two rows wait
    assert buf.take(2, step=17) == StoredPairs((("f", 1, 2),)) and len(buf) == 0
    assert buf.trained_age == {"4": 1, "6": 1, "5": 1, "2": 3} and mean_age(buf.trained_age) == 3.5  # in updates
    with pytest.raises(ValueError, match="asked for 1 pairs, 0 are buffered"):
        buf.take(1, step=18)
    restored = PairBuffer(max_staleness=1)
    restored.load_state_dict(json.loads(json.dumps(buf.state_dict())))
    assert restored.state_dict() == buf.state_dict()


def test_evaluator_curve_survives_json_with_an_undefined_standard_error(make_config, tmp_path):
    ev = Evaluator(None, None, ["a"], make_config().eval, tmp_path, None)
    ev.curve = [(0, 0.5, math.nan), (10, 0.7, 0.01)]
    state = json.loads(json.dumps(ev.state_dict(), allow_nan=False))
    ev.load_state_dict(state, {})
    assert ev.curve[1] == (10, 0.7, 0.01) and ev.curve[0][:2] == (0, 0.5) and math.isnan(ev.curve[0][2])


def test_evaluator_samples_every_prompt_with_its_own_fixed_seed(make_config, tmp_path):
    cfg = make_config(eval={"num_prompts": 3, "seeds_per_prompt": 2})
    a = Evaluator(None, None, ["x", "y"], cfg.eval, tmp_path, None)
    b = Evaluator(None, None, ["x", "y"], cfg.eval, tmp_path, None)
    assert a.prompts == ["x", "y", "x"] * 2 and a.seeds == b.seeds and len(set(a.seeds)) == 6


def test_buffer_drops_records_that_grew_stale_while_they_waited():
    """A record fresh on arrival ages while newer versions are published: the learner must not get it once it is
    staler than max_staleness (checked again when a batch is asked for)."""
    buf = PairBuffer(max_staleness=1)
    buf.accept("old", 2, 2, version=3)  # staleness 1: kept
    buf.accept("new", 1, 3, version=3)
    assert buf.ready(3, version=3) and buf.dropped == 0
    assert not buf.ready(3, version=4)  # now 2 and 1: the two version-2 records go
    assert (len(buf), buf.dropped) == (1, 2)
    assert buf.take(1, step=4) == StoredPairs((("new", 0, 1),))


def test_rollout_stats_are_logged_once_per_update_over_every_call_since_the_last(tmp_path):
    """Two calls' records summarised together (float64 reference), once; nothing is logged when nothing came."""
    rng = np.random.default_rng(0)
    calls = [record_summary(pa.RecordBatch.from_pydict({
        "reward_w": rng.random(len(k)).astype(np.float32), "step_index": np.array(k, np.int16),
        "policy_version": [0] * len(k), "guided": [i % 3 == 0 for i in k]}))
        for k in ([0, 1, 2, 3, 4], [5, 6, 7, 0, 1, 2, 3])]
    with RunLogger(tmp_path, tensorboard=False) as logger:
        stats = RolloutStats(logger, num_steps=8)
        moves = [rng.random((n, 2)) for n in (2, 3)]  # actors.rollout.guidance_delivery of the moved winners
        stats.add(1, calls[0], moves[0])
        stats.add(0, calls[1], moves[1])
        stats.log(3, dropped=4)
        stats.log(4, dropped=4)
    (line,) = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    m = line["metrics"]
    r = np.concatenate([c["reward_w"] for c in calls]).astype(np.float64)
    k = np.concatenate([c["step_index"] for c in calls])
    assert line["step"] == 3 and m["rollout/dropped_stale_total"] == 4 and m["rollout/staleness_mean"] == 5 / 12
    assert m["rollout/train_reward_w_mean"] == pytest.approx(r.mean(), abs=1e-12)
    assert m["rollout/train_reward_w_sem"] == pytest.approx(r.std(ddof=1) / math.sqrt(12), abs=1e-12)
    assert m["rollout/reward_w_mean/bucket2-3"] == pytest.approx(r[(k >= 2) & (k < 4)].mean(), abs=1e-12)
    assert m["rollout/reward_w_count/bucket6-7"] == ((k >= 6) & (k < 8)).sum()
    assert m["rollout/guided_rate"] == stats.guidance_accept_rate == 5 / 12  # steps 0, 3, 6, 0, 3
    moved = np.concatenate(moves)
    assert m["rollout/guide_shift"] == pytest.approx(moved[:, 0].mean(), abs=1e-12)
    assert stats.guidance_delivery == pytest.approx({"guidance_shift": moved[:, 0].sum() / 5,
                                                     "guidance_logp_deficit": moved[:, 1].sum() / 5}, abs=1e-12)


def test_the_room_for_a_call_is_the_staleness_window_less_what_waits_ahead():
    """A new call's records queue behind the buffered ones and those of the calls in flight (the buffer serves the
    oldest first); the learner trains ``batch_size`` a update and drops records older than ``max_staleness``
    versions, one version every ``broadcast_every`` updates."""
    from types import SimpleNamespace

    from learner.loop import Driver, Task

    buffer = PairBuffer(max_staleness=4)
    buffer.accept("records", 100, sampled_by=0, version=0)
    train = SimpleNamespace(max_staleness=4, broadcast_every=2, batch_size=64)
    driver = SimpleNamespace(cfg=SimpleNamespace(train=train), buffer=buffer, pairs_per_prompt=None)
    inflight = {"ref": Task(0, [0] * 8, ["p"] * 8, [0] * 8, 0)}
    assert Driver._room(driver, inflight) == math.inf  # nothing measured yet: no cap
    driver.pairs_per_prompt = 10.0
    window = (4 + 1) * 2 * 64
    assert Driver._room(driver, inflight) == pytest.approx((window - 100 - 8 * 10) / 10)
    assert Driver._room(driver, {}) == pytest.approx((window - 100) / 10)
