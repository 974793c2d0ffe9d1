"""The resource contract between cluster/gpu.yaml and the learner's actor placement.

Every node type in the cluster YAML advertises the custom resources below; every actor asks for them
through `actor_resources`. Nothing else in the project spells these names, so the YAML and the code
cannot drift apart (tests/test_cluster_config.py checks the YAML against this module).

Why custom resources at all: `num_gpus` alone lets Ray put any actor on any GPU, so rollout actors created
first could take the GPU the learner needs. The learner's node type offers one `learner` unit and
`rollout` units for its *other* GPUs only, so one GPU always stays free for the learner.

Why integers: the cluster-launcher schema (ray/autoscaler/ray-schema.json, Ray 2.60) types every node
`resources` value as an integer, so a node cannot offer "0.5 rollout". Node types offer one unit per GPU,
and actors take fractions of a unit instead (a reward actor sharing a rollout GPU asks for 0.25).

Why a CPU-only head: the autoscaler never starts a GPU node to satisfy a CPU-only demand (ray#20476), and
the driver plus CPU reward work must run somewhere, so the head has CPUs and no GPUs, and no GPU is
wasted on the driver. CPU-only actors (num_gpus == 0) ask for no custom resource, so the head can host them.

This module imports nothing from Ray: the GPU benchmarks run the same code where Ray is not installed.
"""

import math

LEARNER = "learner"
ROLLOUT = "rollout"

# Reward actors share the rollout GPUs (they score what the rollout actors produce, on the same pool).
ROLE_RESOURCE: dict[str, str] = {"learner": LEARNER, "rollout": ROLLOUT, "reward": ROLLOUT}

# Ray's own prefix for the resource that `accelerator_type=` requests (ray/_common/utils.py).
ACCELERATOR_TYPE_PREFIX = "accelerator_type:"
ACCELERATOR_TYPE_DEMAND = 0.001  # how much of that resource Ray asks for per actor (ray/_common/utils.py)
EPS = 1e-9  # resource amounts are floats: 0.25 x 4 must fit in 1.0


def actor_resources(role: str, num_gpus: float, accelerator_type: str | None = None) -> dict:
    """Keyword arguments for `ray.remote(...)` / `.options(...)` that place an actor of `role`.

    The custom resource amount equals `num_gpus`, so `rollout` units count GPUs: 0.5 GPU takes 0.5 of a
    unit, and a node with 7 units never hosts more than 7 GPUs' worth of rollout/reward actors.
    `accelerator_type` (e.g. "A100", "L4") pins the actor to that GPU model; Ray turns it into a tiny
    demand for the node's `accelerator_type:<X>` resource.
    """
    if role not in ROLE_RESOURCE:
        raise ValueError(f"unknown role {role!r}; roles are: {', '.join(ROLE_RESOURCE)}")
    if isinstance(num_gpus, bool) or not isinstance(num_gpus, int | float) or not math.isfinite(num_gpus):
        raise ValueError(f"num_gpus must be a finite number >= 0, got {num_gpus!r}")
    if num_gpus < 0:
        raise ValueError(f"num_gpus must be >= 0, got {num_gpus!r}")
    if num_gpus > 1 and not float(num_gpus).is_integer():
        raise ValueError(f"num_gpus above 1 must be a whole number (an actor cannot span part of a GPU), "
                         f"got {num_gpus!r}")
    if accelerator_type is not None:
        if not isinstance(accelerator_type, str) or not accelerator_type or ":" in accelerator_type:
            raise ValueError(f"accelerator_type must be a bare GPU model such as 'A100' or 'L4', "
                             f"got {accelerator_type!r}")
        if num_gpus == 0:
            raise ValueError(f"accelerator_type={accelerator_type!r} needs num_gpus > 0 "
                             f"(a CPU-only {role} actor has no GPU model to match)")
    kwargs: dict = {"num_gpus": num_gpus, "resources": {ROLE_RESOURCE[role]: num_gpus} if num_gpus else {}}
    if accelerator_type is not None:
        kwargs["accelerator_type"] = accelerator_type
    return kwargs


def actor_bundle(role: str, num_cpus: float, num_gpus: float, accelerator_type: str | None = None
                 ) -> dict[str, float]:
    """The Ray resources one actor of ``role`` reserves (as `ray.cluster_resources()` names them): its CPUs and
    GPUs, the role's custom unit and Ray's tiny demand for the accelerator type, zeros left out."""
    placed = actor_resources(role, num_gpus, accelerator_type)
    bundle = {"CPU": float(num_cpus), "GPU": float(num_gpus), **{k: float(v) for k, v in placed["resources"].items()}}
    if accelerator_type is not None:
        bundle[ACCELERATOR_TYPE_PREFIX + accelerator_type] = ACCELERATOR_TYPE_DEMAND
    return {k: v for k, v in bundle.items() if v > 0}


def largest_fit(have: dict[str, float], fixed: dict[str, float], each: dict[str, float]) -> int:
    """How many actors of bundle ``each`` fit in the resources ``have`` beside the ``fixed`` demand; -1 when the
    fixed demand alone does not fit; a large number when ``each`` asks for nothing."""
    if any(have.get(k, 0.0) + EPS < v for k, v in fixed.items()):
        return -1
    return min((int((have.get(k, 0.0) - fixed.get(k, 0.0)) / v + EPS) for k, v in each.items()), default=1 << 30)
