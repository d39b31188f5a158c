"""The refinement of a network's field (``network_refine``, :mod:`dirio.methods.refine`): it removes a
fold it is given without moving the rest of a correct field, keeps the affine residual apart, and runs
after a network stage from the API with its steps logged as ``refine``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dirio.api import register
from dirio.errors import DirioError
from dirio.evaluation.jacobian import fraction_nonpositive_jacobian
from dirio.io.checkpoints import save_checkpoint
from dirio.losses.regularizers import Folding, stencil_determinant
from dirio.methods.network import clear_model_cache
from dirio.methods.refine import RefineConfig, refine_field
from dirio.transforms.networks import LapIRN

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (24, 24, 24)


def textured(shape=SHAPE) -> torch.Tensor:
    """``(1, 1, *S)`` smooth random texture in [0, 1] (LNCC needs local structure everywhere)."""
    generator = torch.Generator().manual_seed(0)
    noise = torch.rand((1, 1, *[n // 4 for n in shape]), generator=generator)
    image = torch.nn.functional.interpolate(noise, size=shape, mode="trilinear", align_corners=True)
    return (image - image.min()) / (image.max() - image.min())


def folded_bump(shape=SHAPE, amplitude=8.0, sigma=3.0) -> torch.Tensor:
    """``(1, 3, *S)``: ``u_0 = -amplitude exp(-|x - c|^2 / (2 sigma^2))``, a bump along axis 0 whose
    derivative reaches ``amplitude / (sigma sqrt(e)) = 1.6``, so ``det < 0`` on one side of it
    (0.85 % of the voxels)."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(float(n)) for n in shape], indexing="ij"))
    centre = torch.tensor([n / 2 for n in shape]).view(3, 1, 1, 1)
    bump = -amplitude * torch.exp(-((grid - centre) ** 2).sum(0) / (2 * sigma**2))
    disp = torch.zeros((1, 3, *shape))
    disp[0, 0] = bump
    return disp


def percent_folded(disp: torch.Tensor) -> float:
    return 100.0 * fraction_nonpositive_jacobian(disp[0].permute(1, 2, 3, 0).numpy())


def test_refinement_removes_a_fold_and_keeps_the_rest_of_the_field():
    """Same image on both sides (the identity is right): a folding bump is unfolded in 60 steps,
    and the field far from the bump, where it was already right, stays within 0.1 voxels of 0 on average
    (Adam moves every voxel a little, however small its gradient)."""
    image = textured()
    start = folded_bump()
    assert percent_folded(start) > 0.5
    result = refine_field(image, image, start, RefineConfig(iterations=60), progress=False)
    refined = result.displacement.detach()
    assert percent_folded(refined) == 0.0
    assert float(Folding()(refined)) < 0.05 * float(Folding()(start))
    far = refined[..., :4, :, :]  # more than 8 voxels from the bump's centre along axis 0
    assert float(far.abs().mean()) < 0.1
    assert [row["iteration"] for row in result.history] == list(range(60))
    assert {"lncc", "diffusion", "folding"} <= set(result.history[0])


def test_no_folding_weight_leaves_the_fold():
    """The fold goes because of the folding term: without it (weight 0) 40 steps leave it folded."""
    image = textured()
    start = folded_bump()
    result = refine_field(image, image, start, RefineConfig(iterations=40, folding=0.0), progress=False)
    assert percent_folded(result.displacement.detach()) > 0.5 * percent_folded(start)


def test_the_refinement_of_an_affine_composite_refines_the_residual_only():
    """With a fixed affine (a 2-voxel translation) the result is the refined residual composed with it."""
    image = textured()
    matrix = torch.eye(4, dtype=torch.float64)
    matrix[0, 3] = 2.0
    result = refine_field(image, image, torch.zeros((1, 3, *SHAPE)), RefineConfig(iterations=2), matrix=matrix,
                          progress=False)
    residual = result.transform.dense.displacement(SHAPE).detach()
    composite = result.displacement.detach()
    torch.testing.assert_close(composite[:, 0] - residual[:, 0], torch.full_like(composite[:, 0], 2.0),
                               atol=0.05, rtol=0)  # x + r + a(x + r): translation adds 2 along axis 0


def test_negative_steps_are_refused_in_one_line():
    with pytest.raises(DirioError, match="`network_refine` must be >= 0"):
        register(np.zeros((8, 8, 8), np.float32), np.zeros((8, 8, 8), np.float32), method="nio", network_refine=-1,
                 device="cpu", progress=False)


def test_a_network_stage_with_refinement_logs_and_records_it(tmp_path):
    """``method="network"`` with ``network_refine=3``: the network's field, then 3 refine steps."""
    torch.manual_seed(0)
    path = tmp_path / "tiny.pt"
    save_checkpoint(path, LapIRN(start_channel=2))
    clear_model_cache()
    fixed = textured((16, 16, 16))[0, 0].numpy()
    moving = np.roll(fixed, 1, axis=0)
    try:
        plain = register(fixed, moving, method="network", model=str(path), device="cpu", progress=False,
                         keep_stages=True)
        refined = register(fixed, moving, method="network", model=str(path), device="cpu", progress=False,
                           network_refine=3, keep_stages=True, affine="translation")
    finally:
        clear_model_cache()
    assert [s["stage"] for s in plain.stages] == ["network"]
    assert [s["stage"] for s in refined.stages] == ["affine", "network", "refine"]
    assert [row["stage"] for row in refined.history] == ["refine"] * 3
    assert set(refined.stage_fields) >= {"network", "refine"}
    np.testing.assert_array_equal(refined.stage_fields["refine"], refined.disp)
    assert not np.array_equal(refined.stage_fields["network"], refined.disp)


def test_refinement_unfolds_a_2d_field_too():
    """The same in 2D: a folding bump along axis 0 of a 32 x 32 textured image is unfolded."""
    generator = torch.Generator().manual_seed(1)
    noise = torch.rand((1, 1, 8, 8), generator=generator)
    image = torch.nn.functional.interpolate(noise, size=(32, 32), mode="bilinear", align_corners=True)
    grid = torch.stack(torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij"))
    start = torch.zeros((1, 2, 32, 32))
    start[0, 0] = -8.0 * torch.exp(-((grid - 16.0) ** 2).sum(0) / (2 * 3.0**2))
    folded = float((stencil_determinant(start) <= 0).float().mean())
    refined = refine_field(image, image, start, RefineConfig(iterations=60), progress=False).displacement.detach()
    assert folded > 0.005 and float((stencil_determinant(refined) <= 0).float().mean()) == 0.0
