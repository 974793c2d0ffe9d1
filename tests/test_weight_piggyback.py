"""Over the object store a published version travels with each actor's next ``generate``: after the first publish the
driver makes no ``receive_weights`` call, a wrong checksum in a generate's load report still stops the run, a
restarted actor still recovers with an explicit load, and sync rounds stay on-policy. The real driver on Ray, with
the scale simulation's torch-free roles (fast to start; the real RolloutWorker's generate with weights is covered
in test_driver_parts.py)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest
import ray

from bench import costs
from bench.scale import MAX_PROMPTS, SimLearner, SimRollout, record_template, sim_config
from learner.group import LearnerGroup
from learner.loop import Driver
from learner.main import WORKER_ENV
from learner.metrics import RunLogger
from learner.weights import WeightSync, WeightSyncError
from policy.lora import LoadReport
from policy.transport import OBJECT_STORE

pytestmark = pytest.mark.filterwarnings("ignore")
SCALE = 0.02  # simulated seconds are 50x shorter


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": WORKER_ENV}, logging_level="ERROR")
    yield
    ray.shutdown()


def _rollout_class(wrong_checksum: bool = False, die_once: Path | None = None) -> type:
    """SimRollout running at SCALE from its start (a restarted one too). ``wrong_checksum``: the loads that come with
    a generate report a checksum other than the one of what they loaded; ``die_once``: actor 0's process exits in
    the middle of its first generate after it loaded version 1, once (the file marks it). Defined here so that
    Ray pickles it by value (the workers cannot import a test module)."""

    class Rollout(SimRollout):
        def __init__(self, *args: Any):
            super().__init__(*args)
            self.reset(SCALE)

        def _load(self, payload: Any, carried: bool) -> Any:
            report = super()._load(payload, carried)
            return dataclasses.replace(report, checksum="0" * 16) if carried and wrong_checksum else report

        def generate(self, *args: Any, **kwargs: Any) -> Any:
            if die_once and self.actor_id == 0 and self.version >= 1 and not die_once.exists():
                die_once.touch()
                os._exit(1)
            return super().generate(*args, **kwargs)

    return Rollout


def _run(tmp_path: Path, mode: str = "async", wrong_checksum: bool = False, die: bool = False, steps: int = 8
         ) -> tuple[Driver, list[dict[str, Any]], Path]:
    """A short run of the real driver with two rollout actors; ``die``: actor 0 dies once in the middle of a call
    (Ray restarts it)."""
    template = ray.put(record_template(MAX_PROMPTS, costs.BRANCHES))  # held here: a restarted actor needs it
    rollout = _rollout_class(wrong_checksum, tmp_path / "died" if die else None)
    cls = ray.remote(rollout).options(num_cpus=0, max_restarts=-1, max_task_retries=0)
    actors = [cls.remote(template, i, "A100", costs.BRANCHES, i) for i in range(2)]
    learner = ray.remote(SimLearner).options(num_cpus=0, max_restarts=0).remote("A100", "lora", 0)
    ray.get(learner.reset.remote(SCALE))
    cfg = sim_config(2, steps, 32, 100, 1, tmp_path)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"mode": mode})})
    prompts = [f"prompt {i}" for i in range(64)]
    with RunLogger(tmp_path, tensorboard=False) as logger:
        driver = Driver(cfg, LearnerGroup([learner]), actors, tmp_path, prompts, prompts[:2], logger)
        try:
            driver.run()
        finally:
            reports = ray.get([a.report.remote() for a in actors])
            for handle in [*actors, learner]:
                ray.kill(handle)
    return driver, reports, tmp_path


def test_a_version_reaches_an_actor_only_with_its_next_generate(tmp_path):
    driver, reports, _ = _run(tmp_path)
    assert driver.counters.steps == 8 and driver.weights.version == 8
    for r in reports:
        direct = [v for _, v, carried in r["loads"] if not carried]
        carried = [v for _, v, c in r["loads"] if c]
        assert direct == [0]  # the first publish only: no receive_weights call per actor and publish after it
        assert carried and carried == sorted(carried) and carried[0] >= 1  # each generate brought the newest


def test_a_load_report_must_show_what_its_generate_carried(tmp_path):
    """In process, what the slow run below checks end to end: a wrong checksum is one WeightSyncError."""
    with RunLogger(tmp_path, tensorboard=False) as logger:
        sync = WeightSync(OBJECT_STORE, None, [None], ray.get, logger)
        sync.version, sync.checksum, sync.payload = 1, "a" * 16, "ref"  # as a publish into the object store leaves it
        assert sync.attach(0) == "ref"
        sync.landed(0, LoadReport(1, 3, "a" * 16))
        assert sync.held == [1] and sync.attach(0) is None  # loaded: the next generate carries nothing
        sync.version, sync.checksum = 2, "b" * 16
        assert sync.attach(0) == "ref"
        with pytest.raises(WeightSyncError, match=r"rollout actor 0 loaded v2 with checksum 0{16}, sent policy v2"):
            sync.landed(0, LoadReport(2, 3, "0" * 16))


@pytest.mark.slow  # ~20 s; the test above checks the same verification in process
def test_a_wrong_checksum_in_a_generates_load_report_stops_the_run(tmp_path):
    with pytest.raises(WeightSyncError,
                       match=r"rollout actor \d loaded v\d+ with checksum 0000000000000000, sent policy v"):
        _run(tmp_path, wrong_checksum=True)


@pytest.mark.slow  # 40 updates (~20 s) for the driver to notice the death; the others here run 8
def test_a_restarted_actor_recovers_with_an_explicit_load(tmp_path):
    driver, reports, out = _run(tmp_path, die=True, steps=40)  # time for the driver to see the death, run on
    assert driver.counters.steps == 40 and driver.weights.failures == 1
    loads = [(v, carried) for _, v, carried in reports[0]["loads"]]  # the restarted process's loads
    assert loads[0][0] >= 1 and not loads[0][1]  # its first load is the recovery's, of the version then published
    assert all(carried for _, carried in loads[1:])
    assert [v for _, v, carried in reports[1]["loads"] if not carried] == [0]
    events = (out / "events.jsonl").read_text()
    assert '"actor_failed"' in events and '"actor_recovered"' in events


@pytest.mark.slow  # ~17 s; the async runs above check what a generate carries, test_system.py syncs rounds
def test_sync_rounds_carry_the_new_version_and_stay_on_policy(tmp_path):
    driver, reports, _ = _run(tmp_path, mode="sync")
    assert driver.buffer.histogram == {"0": driver.buffer.seen} and driver.buffer.dropped == 0
    for r in reports:
        assert [v for _, v, carried in r["loads"] if not carried] == [0]
