"""Specification of dirio.losses.regularizers: diffusion, L1, total variation and bending energy.

Fields with constant first derivatives (linear, u = A x) or constant second derivatives
(quadratic, u_c = x^T H_c x / 2) have energies known in closed form, on any grid size. Shapes
are anisotropic so that a swapped axis or component shows up as a wrong value.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dirio.core import fields as field
from dirio.losses import regularizers
from dirio.losses.regularizers import (
    BendingEnergy,
    Diffusion,
    Folding,
    L1,
    TotalVariation,
    bending_reference,
    diffusion_reference,
    forward_differences,
    stencil_determinant,
    l1_reference,
    make_regularizer,
    tv_reference,
)

SHAPES = {3: (6, 7, 8), 2: (7, 9)}
NAMES = ["diffusion", "l1", "tv", "bending"]


def _linear_field(matrix: np.ndarray, shape, batch: int = 1) -> torch.Tensor:
    """(batch, ndim, *shape) field u_c(x) = sum_a A[c, a] x_a + c (the offset c must not matter)."""
    ndim = len(shape)
    grid = field.identity_grid(shape, dtype=torch.float64)
    a = torch.as_tensor(matrix, dtype=torch.float64)
    u = torch.einsum("ca,a...->c...", a, grid) + torch.arange(ndim, dtype=torch.float64).view(ndim, *([1] * ndim))
    return u.unsqueeze(0).expand(batch, *u.shape).contiguous()


def _quadratic_field(hessians: np.ndarray, shape) -> torch.Tensor:
    """(1, ndim, *shape) field u_c(x) = x^T H_c x / 2 + linear term (which must not matter)."""
    ndim = len(shape)
    grid = field.identity_grid(shape, dtype=torch.float64)
    h = torch.as_tensor(hessians, dtype=torch.float64)
    u = 0.5 * torch.einsum("a...,cab,b...->c...", grid, h, grid) + 0.3 * grid.sum(0)
    return u.unsqueeze(0)


def _random_matrix(ndim: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(ndim, ndim))


def _random_hessians(ndim: int, seed: int = 0) -> np.ndarray:
    m = np.random.default_rng(seed).normal(size=(ndim, ndim, ndim))
    return m + m.transpose(0, 2, 1)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("ndim", [2, 3])
def test_constant_field_has_zero_energy(name, ndim):
    """A translation is perfectly smooth: every regulariser gives exactly 0."""
    offsets = torch.arange(1.0, ndim + 1, dtype=torch.float64).view(1, ndim, *([1] * ndim))
    disp = torch.ones((2, ndim, *SHAPES[ndim]), dtype=torch.float64) * offsets
    assert float(make_regularizer(name)(disp)) == 0.0


@pytest.mark.parametrize("ndim", [2, 3])
def test_linear_field_energies_match_closed_form(ndim):
    """u = A x: diffusion = ||A||_F^2, l1 = sum |A|, tv = sqrt(||A||_F^2 + eps) - sqrt(eps), bending = 0."""
    a = _random_matrix(ndim)
    disp = _linear_field(a, SHAPES[ndim], batch=2)
    assert float(Diffusion()(disp)) == pytest.approx((a**2).sum(), rel=1e-12)
    assert float(L1()(disp)) == pytest.approx(np.abs(a).sum(), rel=1e-12)
    eps = 1e-6
    assert float(TotalVariation(eps=eps)(disp)) == pytest.approx(math.sqrt((a**2).sum() + eps) - math.sqrt(eps), rel=1e-12)
    assert float(BendingEnergy()(disp)) == pytest.approx(0.0, abs=1e-20)


@pytest.mark.parametrize("ndim", [2, 3])
def test_quadratic_field_bending_energy_is_sum_of_squared_hessians(ndim):
    """u_c = x^T H_c x / 2: d2u_c/dx_a dx_b = H_c[a, b] exactly, so bending = sum_c ||H_c||_F^2
    (diagonal terms once, mixed terms twice = both (a, b) and (b, a) entries)."""
    h = _random_hessians(ndim)
    disp = _quadratic_field(h, SHAPES[ndim])
    assert float(BendingEnergy()(disp)) == pytest.approx((h**2).sum(), rel=1e-10)


def test_diffusion_hand_computed_on_a_tiny_field():
    """One component varying only along axis 0 as [0, 1, 3]: differences 1 and 2, mean square 2.5."""
    disp = torch.zeros((1, 2, 3, 2), dtype=torch.float64)
    disp[0, 0] = torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64).view(3, 1)
    assert float(Diffusion()(disp)) == pytest.approx(2.5)
    assert float(L1()(disp)) == pytest.approx(1.5)
    # Second difference along axis 0 is 3 - 2 + 0 = 1 on the single interior voxel row.
    assert float(BendingEnergy()(disp)) == pytest.approx(1.0)


@pytest.mark.parametrize("ndim", [2, 3])
def test_spacing_scaling_law(ndim):
    """Spacing h divides derivatives by h: diffusion / h^2, l1 / h, bending / h^4."""
    disp = torch.randn((1, ndim, *SHAPES[ndim]), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert float(Diffusion()(disp, spacing=2)) == pytest.approx(float(Diffusion()(disp)) / 4, rel=1e-12)
    assert float(L1()(disp, spacing=2.0)) == pytest.approx(float(L1()(disp)) / 2, rel=1e-12)
    assert float(BendingEnergy()(disp, spacing=(2,) * ndim)) == pytest.approx(float(BendingEnergy()(disp)) / 16, rel=1e-12)


def test_per_axis_spacing_applies_to_its_own_axis_only():
    """A field varying only along axis 1: spacing (1, 2, 1) divides diffusion by 4, spacing (2, 1, 1) changes nothing."""
    disp = torch.zeros((1, 3, *SHAPES[3]), dtype=torch.float64)
    disp[0, 2] = field.identity_grid(SHAPES[3], dtype=torch.float64)[1] ** 2
    base = float(Diffusion()(disp))
    assert float(Diffusion()(disp, spacing=(1, 2, 1))) == pytest.approx(base / 4, rel=1e-12)
    assert float(Diffusion()(disp, spacing=(2, 1, 1))) == pytest.approx(base, rel=1e-12)
    assert float(BendingEnergy()(disp, spacing=(1, 2, 1))) == pytest.approx(float(BendingEnergy()(disp)) / 16, rel=1e-12)


def test_coarse_grid_of_the_same_linear_map_has_the_same_diffusion():
    """The same fine-grid map u = A x sampled on a grid of spacing 2 (values still in fine voxels)
    has derivative 2A per coarse voxel; dividing by the spacing gives the fine-grid energy."""
    a = _random_matrix(3, seed=2)
    coarse = _linear_field(2 * a, (4, 5, 6))
    assert float(Diffusion()(coarse, spacing=2)) == pytest.approx((a**2).sum(), rel=1e-12)


def test_total_variation_is_isotropic_per_voxel_norm_of_the_jacobian():
    """tv = mean_x sqrt(sum_{c,a} (D_a u_c)^2 + eps) - sqrt(eps) on the voxels where all forward differences exist."""
    disp = torch.randn((1, 2, 5, 6), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    d = disp[0].numpy()
    d0 = d[:, 1:, :-1] - d[:, :-1, :-1]
    d1 = d[:, :-1, 1:] - d[:, :-1, :-1]
    eps = 1e-3
    expected = np.mean(np.sqrt((d0**2).sum(0) + (d1**2).sum(0) + eps) - math.sqrt(eps))
    assert float(TotalVariation(eps=eps)(disp)) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_energies_are_nonnegative_and_differentiable(name):
    """Random fields give finite energies >= 0 with finite, non-zero gradients."""
    disp = torch.randn((1, 3, *SHAPES[3]), generator=torch.Generator().manual_seed(4), dtype=torch.float64, requires_grad=True)
    value = make_regularizer(name)(disp)
    value.backward()
    assert float(value.detach()) > 0.0
    assert torch.isfinite(disp.grad).all() and float(disp.grad.abs().max()) > 0.0


REFERENCES = {
    "diffusion": diffusion_reference,
    "l1": l1_reference,
    "tv": tv_reference,
    "bending": bending_reference,
}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("slab_voxels", [1, 40, 1 << 18])
def test_slab_implementation_equals_autograd_reference(monkeypatch, name, ndim, slab_voxels):
    """The cache-blocked analytic-gradient energies equal the plain-autograd formulas in value and
    gradient, for one-row slabs, a few rows per slab and a single slab, with anisotropic spacing."""
    monkeypatch.setattr(regularizers, "_SLAB_VOXELS", slab_voxels)
    shape = SHAPES[ndim]
    spacing = (1.0, 2.0, 0.5)[:ndim]
    disp = torch.randn((2, ndim, *shape), generator=torch.Generator().manual_seed(6), dtype=torch.float64, requires_grad=True)
    fast = make_regularizer(name)(disp, spacing)
    (grad_fast,) = torch.autograd.grad(3.0 * fast, disp)
    reference = REFERENCES[name](disp, spacing)
    (grad_reference,) = torch.autograd.grad(3.0 * reference, disp)
    torch.testing.assert_close(fast, reference, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad_fast, grad_reference, rtol=1e-10, atol=1e-14)
    with torch.no_grad():
        torch.testing.assert_close(make_regularizer(name)(disp, spacing), reference.detach(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["diffusion", "tv", "bending"])
def test_energy_gradients_pass_gradcheck(monkeypatch, name):
    """Finite differences confirm the analytic gradients (two-row slabs)."""
    monkeypatch.setattr(regularizers, "_SLAB_VOXELS", 2 * 5 * 6)
    disp = torch.randn((1, 3, 4, 5, 6), generator=torch.Generator().manual_seed(7), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda u: make_regularizer(name)(u, (1.0, 1.5, 2.0)), (disp,))


def test_forward_differences_shapes_and_values():
    """Axis a's difference has one voxel fewer along a and equals u[x + e_a] - u[x] divided by the spacing."""
    disp = torch.randn((1, 3, *SHAPES[3]), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    diffs = forward_differences(disp, spacing=(1, 2, 4))
    assert [tuple(d.shape[2:]) for d in diffs] == [(5, 7, 8), (6, 6, 8), (6, 7, 7)]
    torch.testing.assert_close(diffs[2], (disp[..., 1:] - disp[..., :-1]) / 4)


def test_invalid_inputs_and_factory_errors():
    """Wrong field shapes, bad spacings, unknown names and options raise ValueError naming the valid choices."""
    with pytest.raises(ValueError):
        Diffusion()(torch.zeros((1, 2, 4, 4, 4)))
    with pytest.raises(ValueError):
        Diffusion()(torch.zeros((1, 3, 4, 4, 4)), spacing=(1, 1))
    with pytest.raises(ValueError):
        Diffusion()(torch.zeros((1, 3, 4, 4, 4)), spacing=0)
    with pytest.raises(ValueError, match="diffusion, l1, tv, bending"):
        make_regularizer("elastic")
    with pytest.raises(ValueError, match="eps"):
        make_regularizer("tv", weight=2.0)
    with pytest.raises(ValueError):
        make_regularizer("tv", eps=0.0)
    assert make_regularizer("tv", eps=1e-4).eps == 1e-4
    for name in NAMES:
        assert make_regularizer(name).name == name


# --- the folding penalty (a hinge on the Jacobian determinant) ------------------------------------

@pytest.mark.parametrize("ndim", [2, 3])
def test_folding_is_zero_for_translations_and_smooth_fields(ndim):
    """A translation and a gentle linear map keep every local volume above the margin: exactly 0."""
    offsets = torch.arange(1.0, ndim + 1, dtype=torch.float64).view(1, ndim, *([1] * ndim))
    translation = torch.ones((2, ndim, *SHAPES[ndim]), dtype=torch.float64) * offsets
    gentle = _linear_field(0.1 * np.eye(ndim), SHAPES[ndim])
    assert float(Folding()(translation)) == 0.0
    assert float(Folding()(gentle)) == 0.0


@pytest.mark.parametrize("ndim", [2, 3])
def test_folding_of_a_linear_fold_is_the_hinge_of_its_determinant(ndim):
    """u = A x with det(I + A) = -0.5 folds everywhere: the penalty is margin - det = 0.1 + 0.5, and
    the determinant is det(I + A) at every interior voxel, on any grid spacing."""
    a = np.zeros((ndim, ndim))
    a[0, 0] = -1.5  # I + A = diag(-0.5, 1, ...): det -0.5
    a[0, 1] = 0.7  # a shear does not change the determinant
    det = -0.5
    u = _linear_field(a, SHAPES[ndim])
    torch.testing.assert_close(stencil_determinant(u), torch.full((1, *(n - 2 for n in SHAPES[ndim])), det,
                                                                   dtype=torch.float64))
    for stencil in ("forward", "backward"):
        torch.testing.assert_close(stencil_determinant(u, stencil=stencil), stencil_determinant(u))
    assert float(Folding(stencils="central")(u)) == pytest.approx(0.1 - det, rel=1e-12)
    assert float(Folding()(u)) == pytest.approx(3 * (0.1 - det), rel=1e-12)  # three stencils
    assert float(Folding(margin=0.5, stencils="forward")(u)) == pytest.approx(0.5 - det, rel=1e-12)
    # the same fine-grid map on a grid of spacing 2 (values in fine voxels): the same determinant
    coarse = _linear_field(2 * a, SHAPES[ndim])
    assert float(Folding(stencils="central")(coarse, spacing=2)) == pytest.approx(0.1 - det, rel=1e-12)


def test_one_sided_stencils_see_the_odd_even_fold_the_central_one_misses():
    """u_0 = 0.8 (-1)^x0 folds every other cell (forward differences -1.6 and +1.6: det -0.6 and
    2.6) while central differences of it are 0 (det 1): only the one-sided hinges are positive."""
    x0 = torch.arange(8, dtype=torch.float64).view(8, 1, 1)
    u = torch.zeros((1, 3, 8, 6, 6), dtype=torch.float64)
    u[0, 0] = 0.8 * (-1.0) ** x0
    assert float(stencil_determinant(u).min()) == pytest.approx(1.0)
    assert float(stencil_determinant(u, stencil="forward").min()) == pytest.approx(-0.6)
    assert float(stencil_determinant(u, stencil="backward").min()) == pytest.approx(-0.6)
    assert float(Folding(stencils="central")(u)) == 0.0
    assert float(Folding()(u)) == pytest.approx(2 * 0.5 * (0.1 + 0.6), rel=1e-12)


def test_corner_stencils_see_an_oscillation_of_one_axis_against_another_the_others_miss():
    """u_0 = -u_1 = 0.3 s with s = (-1)^(x_0 + x_1): the central determinant is 1, the all-forward and
    all-backward ones 1 + 2 s (u_0 + u_1 amplitudes) = 1; the corners forward along one of the two axes
    and backward along the other are 1 -+ 1.2 s, so they fold (-0.2) at every other voxel.
    ``corners`` sums the central and the 8 corner hinges."""
    from dirio.losses.folding import corner_stencils

    shape = (6, 6, 6)
    parity = (torch.arange(shape[0]).view(-1, 1, 1) + torch.arange(shape[1]).view(1, -1, 1)) % 2
    sign = (1.0 - 2.0 * parity.double()).expand(shape)
    u = torch.zeros((1, 3, *shape), dtype=torch.float64)
    u[0, 0], u[0, 1] = 0.3 * sign, -0.3 * sign
    for stencil in ("central", "forward", "backward"):
        assert float(stencil_determinant(u, stencil=stencil).min()) > 0
    assert float(Folding()(u)) == 0.0
    corners = corner_stencils(3)
    assert len(corners) == 8 and ("forward",) * 3 in corners and ("backward",) * 3 in corners
    folded = [c for c in corners if float(stencil_determinant(u, stencil=c).min()) <= 0]
    assert folded == [c for c in corners if c[0] != c[1]]  # the mixed ones in the plane of the oscillation
    for c in folded:
        assert float(stencil_determinant(u, stencil=c).min()) == pytest.approx(-0.2)
    # 4 folding corners, each below the 0.1 margin by 0.3 at half of the interior voxels
    assert float(Folding(stencils="corners")(u)) == pytest.approx(4 * 0.5 * 0.3, rel=1e-12)


def test_stencil_determinant_is_the_evaluators_on_the_interior():
    """Central differences as the Learn2Reg evaluator's Jacobian, which crops one voxel more."""
    from dirio.evaluation.jacobian import jacobian_determinant_l2r

    disp = torch.randn((1, 3, 8, 9, 10), generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    ours = stencil_determinant(disp)[0, 1:-1, 1:-1, 1:-1].numpy()
    theirs = jacobian_determinant_l2r(disp[0].permute(1, 2, 3, 0).numpy())
    np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-12)


def test_folding_gradient_passes_gradcheck_and_pushes_towards_unfolding():
    """Finite differences confirm the gradient; a descent step on a folded field raises its determinant."""
    disp = torch.randn((1, 3, 4, 5, 6), generator=torch.Generator().manual_seed(9), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda u: Folding()(u, (1.0, 1.5, 2.0)), (disp,))
    folded = (2.0 * disp).detach().requires_grad_(True)
    before = Folding()(folded)
    before.backward()
    after = Folding()(folded.detach() - 0.05 * folded.grad / folded.grad.abs().max())
    assert float(before.detach()) > 0.0 and float(after) < float(before.detach())


def test_folding_rejects_bad_margins_and_tiny_grids():
    with pytest.raises(ValueError, match="margin"):
        Folding(margin=0.0)
    with pytest.raises(ValueError, match="stencils"):
        Folding(stencils="sideways")
    with pytest.raises(ValueError, match="stencil"):
        stencil_determinant(torch.zeros((1, 3, 5, 5, 5)), stencil=("forward", "sideways", "forward"))
    with pytest.raises(ValueError, match="3 voxels"):
        Folding()(torch.zeros((1, 3, 2, 5, 5)))
    assert isinstance(make_regularizer("folding", margin=0.2), Folding)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("stencils", ["all", "corners", "central", "forward", "backward"])
@pytest.mark.parametrize("slab_elements", [1, 60, 1 << 18])
def test_folding_sparse_backward_equals_plain_autograd(monkeypatch, ndim, stencils, slab_elements):
    """The slab-by-slab forward and the backward over the active voxels only give the plain-autograd
    value and gradient (one-row slabs, a few rows per slab, a single slab)."""
    from dirio.losses import folding
    from dirio.losses.folding import folding_reference

    monkeypatch.setattr(folding, "_SLAB_ELEMENTS", slab_elements)

    shape = SHAPES[ndim]
    spacing = (1.0, 2.0, 0.5)[:ndim]
    disp = (0.8 * torch.randn((2, ndim, *shape), generator=torch.Generator().manual_seed(10),
                              dtype=torch.float64)).requires_grad_(True)
    fast = Folding(margin=0.3, stencils=stencils)(disp, spacing)
    (grad_fast,) = torch.autograd.grad(2.0 * fast, disp)
    reference = folding_reference(disp, spacing, margin=0.3, stencils=stencils)
    (grad_reference,) = torch.autograd.grad(2.0 * reference, disp)
    assert float(reference.detach()) > 0.0
    torch.testing.assert_close(fast, reference, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad_fast, grad_reference, rtol=1e-10, atol=1e-14)
