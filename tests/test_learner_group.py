"""A data-parallel learner group (train.num_learners) on real Ray actors (CPU, gloo): K = 2 trains to the same
adapter as K = 1 on the same batches, resumes exactly from its checkpoint, and a dead rank ends in one line."""

from __future__ import annotations

import types
from pathlib import Path

import pyarrow as pa
import pytest
import ray
import torch
from helpers import tolerance

from actors.records import from_table
from actors.rollout import RolloutWorker
from actors.stored import StoredPairs, shard_bounds
from learner.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from learner.config import ConfigError
from learner.group import LearnerGroup, shard
from learner.main import WORKER_ENV
from learner.trainer import Learner
from policy import POLICY

pytestmark = pytest.mark.filterwarnings("ignore")
PROMPTS = ["a red circle on the left", "a blue square on the right", "a green triangle at the top",
           "a yellow circle at the bottom"]


def test_batch_size_not_divisible_by_the_learners_is_one_line(make_config):
    with pytest.raises(ConfigError) as e:
        make_config(train={"batch_size": 6, "num_learners": 4})
    assert "\n" not in str(e.value) and "train.batch_size=6 must be divisible by train.num_learners=4" in str(e.value)
    with pytest.raises(ConfigError, match=r"train\.num_learners must be >= 1"):
        make_config(train={"num_learners": 0})
    with pytest.raises(ConfigError, match=r"needs train\.weight_sync=object_store"):
        make_config(train={"num_learners": 2, "weight_sync": "collective"})


def test_shards_are_contiguous_and_cover_the_batch(make_config):
    table = pa.table({"i": list(range(7))})
    assert [s.column("i").to_pylist() for s in shard(table, 3)] == [[0, 1], [2, 3], [4, 5, 6]]
    batch = from_table(_records(make_config()))
    parts = shard(batch, 2)
    assert [len(p) for p in parts] == [6, 6] and parts[0].prompts + parts[1].prompts == batch.prompts
    assert torch.equal(torch.cat([p.tensors["x_w"] for p in parts]), batch.tensors["x_w"])


def _records(cfg) -> pa.Table:
    """12 step pairs (4 chains × 3 branch steps) from a rollout of the initial policy."""
    batch, _ = RolloutWorker(cfg.rollout_settings()).generate(PROMPTS, list(range(4)), list(range(4)), 0)
    return pa.Table.from_batches([batch])


def _group(cfg, k: int) -> LearnerGroup:
    group = LearnerGroup([ray.remote(Learner).options(num_cpus=0).remote(cfg) for _ in range(k)])
    group.connect("gloo")
    return group


def _updates(group: LearnerGroup, batches: list[pa.Table]) -> list[dict[str, float]]:
    return [group.get(group.update(b)) for b in batches]


def _adapter(handle) -> dict[str, torch.Tensor]:
    return ray.get(handle.policy_tensors.remote())


def _flat(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([tensors[k].flatten() for k in sorted(tensors)])


def _rank_generator(handle) -> torch.Tensor:
    return ray.get(handle.__ray_call__.remote(lambda learner: learner.generator.get_state()))


@pytest.fixture(scope="module")
def ray_session():
    ray.init(num_cpus=4, include_dashboard=False, runtime_env={"env_vars": WORKER_ENV}, logging_level="ERROR")
    yield
    ray.shutdown()


@ray.remote
def _rows(layout, *batches) -> list[int]:
    """What a learner rank's ``update`` receives from ``StoredPairs.send``: the rows it names."""
    return layout.assemble(batches).column("row").to_pylist()


def test_stored_pairs_split_into_contiguous_shares_that_send_the_rows_they_name(ray_session):
    """The learner ranks' shares of one update: every row once, in order, from the object store."""
    tables = [pa.RecordBatch.from_pydict({"row": list(range(start, start + n))}) for start, n in ((0, 5), (5, 3))]
    a, b = (ray.put(t) for t in tables)
    pairs = StoredPairs(((a, 2, 3), (b, 0, 3)))  # rows 2-4 of the first call and 0-2 of the second
    assert len(pairs) == 6 and ray.get(pairs.send(_rows)) == [2, 3, 4, 5, 6, 7]
    shares = pairs.split(4)
    assert [len(s) for s in shares] == [1, 2, 1, 2] and shares[1] == StoredPairs(((a, 3, 2),))
    assert shares[3] == StoredPairs(((b, 1, 2),)) and shares[2] == StoredPairs(((b, 0, 1),))
    assert [r for s in shares for r in ray.get(s.send(_rows))] == [2, 3, 4, 5, 6, 7]
    assert shard_bounds(6, 4) == [0, 1, 3, 4, 6]


def test_two_learners_match_one_resume_exactly_and_a_dead_rank_is_one_line(ray_session, make_config, tmp_path):
    from learner.loop import Counters, Driver, LearnerDiedError

    def gradients(learner: Learner) -> dict[str, torch.Tensor]:  # nested, so Ray ships it by value
        """The gradients the last update stepped with (they stay on the parameters until the next update)."""
        return {k: p.grad.clone() for k, p in learner.policy.adapter_parameters(POLICY).items()}

    cfg = make_config(train={"batch_size": 8, "num_learners": 2, "lr": 1e-2})
    table = _records(cfg)
    tables = [table.slice(0, 8), table.slice(4, 8), table.slice(2, 8)]
    stored = StoredPairs(((ray.put(table.to_batches()[0]), 4, 8),))  # as the driver passes them: by reference
    batches = [tables[0], stored, tables[2]]  # the group's; the learner in this process gets the tables

    one, two = Learner(cfg), _group(cfg, 2)  # one learner: in this process, as a K = 1 group's actor runs it
    start = _flat(one.policy_tensors())  # every rank's too (the same seed)
    m1, m2 = [one.update(tables[0])], _updates(two, batches[:1])
    # the gradient every rank steps with is the whole batch's (float32 sums in another order)
    g1, g2 = gradients(one), ray.get(two.ranks[1].__ray_call__.remote(gradients))
    assert g1.keys() == g2.keys()
    g1, g2 = torch.cat([g.flatten() for g in g1.values()]), torch.cat([g2[k].flatten() for k in g1])
    # float-order spread: max 2.3e-06 over 24 seeds (bench/tolerances.py); bound 1e-05 = 4x
    assert float(g1.norm()) > 1e-3 and float((g2 - g1).norm() / g1.norm()) < tolerance("learner_group.gradient")
    m1 += [one.update(b) for b in tables[1:]]
    m2 += _updates(two, batches[1:2])
    ray.get(two.ranks[1].__ray_call__.remote(lambda learner: torch.rand(3, generator=learner.generator)))
    rank1_stream = _rank_generator(two.ranks[1])  # a stochastic loss draws from each rank's own stream
    path = save_checkpoint(tmp_path / "ckpt", 2, *two.checkpoint(ray.get))
    m2 += _updates(two, batches[2:])

    # the same parameters as one learner on the whole batch, on both ranks (bitwise equal to each other), up to
    # float rounding, which AdamW's m/√v amplifies to a sizeable part of a step where a gradient element is near 0:
    # so the distance between the two is compared with the distance they moved, not element by element
    ref, lead, other = one.policy_tensors(), _adapter(two.lead), _adapter(two.ranks[1])
    assert ref.keys() == lead.keys() and all(torch.equal(lead[k], other[k]) for k in ref)
    moved, apart = _flat(ref) - start, _flat(lead) - _flat(ref)
    assert float(moved.abs().max()) > 1e-3  # the adapter moved
    # float-order spread: max 2.4e-05 over 24 seeds (bench/tolerances.py); bound 1e-04 = 4x
    assert float(apart.norm() / moved.norm()) < tolerance("learner_group.parameters")
    # float-order spread: max 6.0e-07 over 24 seeds (bench/tolerances.py); bound 5e-06 = 8x
    first = tolerance("learner_group.first_update_metrics")  # same parameters: float rounding only
    for key in ("loss", "accuracy", "margin", "grad_norm"):  # metrics are the whole batch's
        assert m2[0][key] == pytest.approx(m1[0][key], rel=first), key
    for a, b in zip(m1, m2, strict=True):
        assert b["pairs"] == a["pairs"] == 8
        # float-order spread: max 1.5e-07 over 24 seeds (bench/tolerances.py); bound 1e-06 = 7x
        assert b["reward_w"] == pytest.approx(a["reward_w"], rel=tolerance("learner_group.reward_w"))
        for key in ("loss", "margin"):
            # float-order spread: max 1.2e-04 over 24 seeds (bench/tolerances.py); bound 5e-04 = 4x
            assert b[key] == pytest.approx(a[key], rel=0, abs=tolerance("learner_group.loss_margin")), key

    # resume: a fresh group restored from the checkpoint after update 2 continues exactly
    fresh = _group(cfg, 2)
    tensors, state = load_checkpoint(path)
    assert "rng_rank1" in tensors and fresh.get(fresh.restore(tensors, state)) == 2
    assert torch.equal(_rank_generator(fresh.ranks[1]), rank1_stream)
    resumed = _updates(fresh, batches[2:])
    assert resumed[0]["loss"] == m2[2]["loss"]
    for k, v in _adapter(fresh.lead).items():
        assert torch.equal(v, lead[k]), k
    for handle in two.ranks:
        ray.kill(handle)

    # a dead rank: the other rank's collective fails, and the driver says so in one line with the resume hint
    ray.kill(fresh.ranks[1], no_restart=True)
    driver = types.SimpleNamespace(learners=fresh, out=tmp_path, counters=Counters(steps=3))
    with pytest.raises(LearnerDiedError) as e:
        Driver._learner(driver, fresh.update(stored))  # rank 0 starts the dead rank's share itself
    assert str(e.value).startswith("a learner rank died at update 3") and "--resume" in str(e.value)
    assert "\n" not in str(e.value)
    ray.kill(fresh.lead)


def test_a_run_with_two_learners_trains_and_checkpoints_every_rank(ray_session, make_config):
    from learner.main import run

    cfg = make_config(train={"mode": "sync", "steps": 3, "batch_size": 4, "num_learners": 2},
                      output={"checkpoint_every": 3})
    assert run(cfg)["steps"] == 3
    path = latest_checkpoint(Path(cfg.output.dir) / "checkpoints")
    assert path is not None and "rng_rank1" in load_checkpoint(path)[0]
