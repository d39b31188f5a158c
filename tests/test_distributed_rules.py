"""The combination rules under torch.distributed: two gloo processes, each with half of the batch,
take the same steps as one process with the whole batch, for sum, pcgrad and surgery.

Each objective's gradient is averaged across the processes before any projection
(:func:`dirio.core.distributed.average_gradients`); with mean losses over equal halves that average
is the gradient over the whole batch, so the projections and updates agree up to float32 rounding
(the all-reduce sums in another order). Tolerance: 5e-5 absolute on every weight after 4 SGD steps
that move the weights by more than 1e-2, while half of the batch alone ends more than 1e-3 away. (Plain SGD, because Adam divides by the root of the
second moment and turns rounding noise of near-zero gradient entries, which surgery creates by
projecting, into steps of the learning rate's size.)
"""


import pytest
import torch
import torch.distributed as dist

from dirio.core.context import LevelContext
from dirio.core.distributed import average_gradients
from dirio.losses.regularizers import make_regularizer
from dirio.losses.similarity import make_similarity
from dirio.losses.terms import RegularizerTerm, Role, SimilarityTerm, Term
from dirio.optim.combine import make_combine_rule
from dirio.optim.optimizers import make_optimizer
from dirio.optim.step import Step
from dirio.transforms.network import NetworkTransform
from spawn_helpers import free_port, spawn
from tiny_networks import TinyRegistrationNet, blob_pair

STEPS = 4
BATCH = 4
SEED = 5


def train(rule_name: str, fixed: torch.Tensor, moving: torch.Tensor) -> dict[str, torch.Tensor]:
    """``STEPS`` steps of the shared step on one batch; returns the final weights."""
    torch.set_num_threads(1)
    transform = NetworkTransform(TinyRegistrationNet(seed=1))
    terms = [Term("mse", Role.SIMILARITY, SimilarityTerm(make_similarity("mse")), 1.0),
             Term("diffusion", Role.REGULARIZER, RegularizerTerm(make_regularizer("diffusion")), 0.5)]
    options = {} if rule_name == "sum" else {"generator": torch.Generator().manual_seed(3)}
    step = Step(terms, make_combine_rule(rule_name, **options), reduce=average_gradients)
    ctx = LevelContext(level=0, shape=tuple(fixed.shape[2:]), full_shape=tuple(fixed.shape[2:]), fixed=fixed,
                       moving=moving)
    step.prepare(ctx)
    optimizer = make_optimizer("sgd", transform.parameter_groups(), 0.5)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for _ in range(STEPS):
        step(transform, ctx, optimizer, params)
    return {k: v.detach().clone() for k, v in transform.state_dict().items()}


def worker(rank: int, world: int, port: int, rule_name: str, path: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        fixed, moving = blob_pair(batch=BATCH, seed=SEED, jitter=1.0)
        half = BATCH // world
        weights = train(rule_name, fixed[rank * half:(rank + 1) * half], moving[rank * half:(rank + 1) * half])
        torch.save(weights, f"{path}.{rank}")
        dist.barrier()  # leave together: neither rank tears down gloo while the other still talks
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("rule_name", ["sum", "pcgrad", "surgery"])
def test_two_processes_with_half_batches_take_the_steps_of_one_process_with_the_whole_batch(rule_name, tmp_path):
    fixed, moving = blob_pair(batch=BATCH, seed=SEED, jitter=1.0)
    single = train(rule_name, fixed, moving)
    path = str(tmp_path / "weights")
    spawn(worker, (2, free_port(), rule_name, path), 2, [f"{path}.{rank}" for rank in range(2)])
    ranks = [torch.load(f"{path}.{r}", weights_only=True) for r in range(2)]
    initial = TinyRegistrationNet(seed=1).state_dict()
    moved = max(float((single[f"network.{k}"] - v).abs().max()) for k, v in initial.items())
    assert moved > 1e-2  # the steps did change the weights
    for name, value in single.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name  # the ranks never diverge
        assert torch.allclose(ranks[0][name], value, atol=5e-5, rtol=0), (name, float((ranks[0][name] - value).abs().max()))


def test_without_the_reduction_the_ranks_would_diverge(tmp_path):
    # the check above is not vacuous: each half alone gives other weights than the whole batch
    fixed, moving = blob_pair(batch=BATCH, seed=SEED, jitter=1.0)
    whole = train("pcgrad", fixed, moving)
    half = train("pcgrad", fixed[:2], moving[:2])
    assert max(float((whole[k] - half[k]).abs().max()) for k in whole) > 1e-3
