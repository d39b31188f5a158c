"""dirio's Adam (:mod:`dirio.optim.adam`): PyTorch's multi-tensor Adam to the last bit, without the compiler."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from dirio.optim.adam import Adam
from dirio.optim.optimizers import make_optimizer


def _problem(seed: int):
    """Two parameter groups of a small least-squares problem with a non-quadratic term (float32)."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [(3, 5, 6), (7,), (2, 4)]
    params = [torch.randn(shape, generator=generator).requires_grad_() for shape in shapes]
    targets = [torch.randn(shape, generator=generator) for shape in shapes]
    groups = [{"params": params[:2], "lr_divisor": 2.0}, {"params": params[2:], "lr": 0.03, "lr_divisor": 1.0}]
    return params, targets, groups


def _loss(params, targets, skip: int | None = None):
    return sum(((p - t) ** 2).mean() + 0.1 * torch.sin(3 * p).sum() for i, (p, t) in enumerate(zip(params, targets))
               if i != skip)


def _run(optimizer, params, targets, steps: int, start: int = 0):
    for step in range(start, start + steps):
        for group in optimizer.param_groups:  # a schedule changes the rate between steps, as dirio's engine does
            group["lr"] = 0.05 * (1 + step % 3) / group["lr_divisor"]
        for p in params:
            p.grad = None
        # the second parameter has no gradient every fourth step (its moments must not move then)
        _loss(params, targets, skip=1 if step % 4 == 3 else None).backward()
        optimizer.step()


@pytest.mark.parametrize("options", [{}, {"weight_decay": 0.01}, {"amsgrad": True, "betas": (0.8, 0.99), "eps": 1e-6}])
def test_the_parameters_equal_torch_optim_adams_to_the_last_bit(options):
    ours, targets, groups = _problem(1)
    theirs, _, their_groups = _problem(1)
    _run(Adam(groups, lr=0.1, **options), ours, targets, 30)
    _run(torch.optim.Adam(their_groups, lr=0.1, foreach=True, **options), theirs, targets, 30)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
    assert not torch.equal(ours[0], _problem(1)[0][0])  # the parameters moved


def test_a_state_saved_by_either_optimiser_continues_in_the_other():
    reference, targets, groups = _problem(2)
    _run(torch.optim.Adam(groups, lr=0.1, foreach=True, amsgrad=True), reference, targets, 20)
    for first, second in ((torch.optim.Adam, Adam), (Adam, torch.optim.Adam)):
        params, _, groups = _problem(2)
        before = first(groups, lr=0.1, amsgrad=True)
        _run(before, params, targets, 12)
        after = second([{**g, "params": g["params"]} for g in before.param_groups], lr=0.1, amsgrad=True)
        after.load_state_dict(before.state_dict())
        _run(after, params, targets, 8, start=12)
        for a, b in zip(params, reference):
            assert torch.equal(a, b)


def test_zero_grad_and_checks():
    params, targets, groups = _problem(3)
    optimizer = make_optimizer("adam", groups, 0.1)
    assert isinstance(optimizer, Adam) and optimizer.param_groups[0]["lr_divisor"] == 2.0
    _loss(params, targets).backward()
    optimizer.zero_grad(set_to_none=False)
    assert all(torch.count_nonzero(p.grad) == 0 for p in params)
    optimizer.zero_grad()
    assert all(p.grad is None for p in params)
    with pytest.raises(ValueError, match="more than one parameter group"):
        Adam([{"params": params}, {"params": params[:1]}])
    with pytest.raises(ValueError, match="Invalid beta"):
        Adam(params, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="different number of parameter groups"):
        Adam(groups).load_state_dict({"state": {}, "param_groups": [{"params": [0]}]})


_DENSE_RUN = """
import sys
import numpy as np
from dirio.api import register
from dirio.config.settings import make_settings
rng = np.random.default_rng(0)
fixed = rng.random((16, 18, 20)).astype(np.float32)
register(fixed, np.roll(fixed, 1, 0), settings=make_settings(preset="brain-mri", progress=False, iterations=(2, 2, 2)))
print("torch._dynamo" in sys.modules)
"""


def test_a_dense_registration_never_imports_the_compiler():
    """The point of the class: about 1 s of import that the first pyramid level used to wait for."""
    completed = subprocess.run([sys.executable, "-c", _DENSE_RUN], capture_output=True, text=True, check=True)
    assert completed.stdout.strip() == "False"
