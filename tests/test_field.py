"""Specification of dirio.core.fields: warping, composition, resizing, integration, Jacobians, layouts.

Every test builds a synthetic input whose correct answer is known in closed form. Shapes are
deliberately anisotropic (every axis a different length) so that a swapped axis or component
order shows up as a shape error or a wrong value instead of passing by symmetry.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dirio.core import fields as field
from dirio.core import filters

SHAPES = {3: (9, 11, 13), 2: (11, 13)}


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_image(shape, seed: int = 0) -> torch.Tensor:
    """(1, 1, *shape) uniform noise: every voxel different, so any misplaced sample is visible."""
    return torch.rand((1, 1, *shape), generator=_generator(seed))


def _smooth_field(shape, amplitude: float, sigma: float = 2.5, seed: int = 0) -> torch.Tensor:
    """(1, ndim, *shape) Gaussian-smoothed noise rescaled so that max |u| == amplitude voxels."""
    noise = torch.randn((1, len(shape), *shape), generator=_generator(seed))
    smooth = filters.gaussian_smooth(noise, sigma)
    return smooth * (amplitude / smooth.abs().max())


def _smooth_image(shape) -> torch.Tensor:
    """(1, 1, *shape) low-frequency product of cosines (period about 2.5 image widths per axis)."""
    grid = field.identity_grid(shape)
    values = torch.ones(shape)
    for axis, n in enumerate(shape):
        values = values * torch.cos(2.0 * math.pi * grid[axis] / (2.5 * n) + 0.3 * (axis + 1))
    return values[None, None]


def _linear_field(shape, matrix: np.ndarray, offset: np.ndarray) -> torch.Tensor:
    """(1, ndim, *shape) field u(x) = matrix @ x + offset with x the voxel coordinates."""
    grid = field.identity_grid(shape, dtype=torch.float64)
    u = torch.einsum("cd,d...->c...", torch.as_tensor(matrix, dtype=torch.float64), grid)
    u = u + torch.as_tensor(offset, dtype=torch.float64).view(-1, *([1] * len(shape)))
    return u.float()[None]


def _interior(ndim: int, margin: int) -> tuple:
    """Index that drops ``margin`` voxels on every side of every spatial axis of (B, C, *S)."""
    return (slice(None), slice(None)) + (slice(margin, -margin),) * ndim


# --- identity_grid and the grid_sample conversion -----------------------------------------------


@pytest.mark.parametrize("ndim", [2, 3])
def test_identity_grid_component_d_is_the_index_along_axis_d(ndim):
    shape = SHAPES[ndim]
    grid = field.identity_grid(shape)
    assert grid.shape == (ndim, *shape)
    index = (2, 3, 4)[:ndim]
    assert grid[(slice(None), *index)].tolist() == list(index)


@pytest.mark.parametrize("ndim", [2, 3])
def test_identity_warp_is_exact(ndim):
    """warp(m, 0) == m up to float rounding of the normalise/unnormalise round trip."""
    image = _random_image(SHAPES[ndim])
    zero = torch.zeros((1, ndim, *SHAPES[ndim]))
    warped = field.warp(image, zero)
    assert warped.shape == image.shape
    torch.testing.assert_close(warped, image, atol=1e-5, rtol=0)


# --- warping by known displacements ----------------------------------------------------------------


@pytest.mark.parametrize("ndim,axis", [(3, 0), (3, 1), (3, 2), (2, 0), (2, 1)])
@pytest.mark.parametrize("shift", [2, -3])
def test_constant_integer_shift_along_each_axis_pulls_from_x_plus_shift(ndim, axis, shift):
    """With u = shift * e_axis, warped[x] = moving[x + shift * e_axis] wherever x + shift is inside.

    This pins both the component order of u (component ``axis`` moves along array axis
    ``axis``) and the reversed (x, y, z) order of the grid_sample conversion.
    """
    shape = SHAPES[ndim]
    image = _random_image(shape, seed=axis)
    disp = torch.zeros((1, ndim, *shape))
    disp[:, axis] = float(shift)
    warped = field.warp(image, disp)

    n = shape[axis]
    out_index = [slice(None)] * (ndim + 2)
    src_index = [slice(None)] * (ndim + 2)
    out_index[2 + axis] = slice(max(0, -shift), n - max(0, shift))
    src_index[2 + axis] = slice(max(0, shift), n + min(0, shift))
    torch.testing.assert_close(warped[tuple(out_index)], image[tuple(src_index)], atol=1e-5, rtol=0)


@pytest.mark.parametrize("ndim", [2, 3])
def test_subvoxel_shift_of_linear_ramp_equals_analytic_shift(ndim):
    """Linear interpolation is exact on affine functions: ramp(x) = a.x + c warped by a constant s
    is a.(x + s) + c wherever x + s stays inside the grid (here: a 1-voxel interior margin)."""
    shape = SHAPES[ndim]
    slope = torch.tensor([0.7, -1.3, 0.4][:ndim])
    shift = torch.tensor([0.3, -0.6, 0.45][:ndim])
    grid = field.identity_grid(shape)
    ramp = (torch.einsum("d,d...->...", slope, grid) + 5.0)[None, None]
    disp = shift.view(1, ndim, *([1] * ndim)).expand(1, ndim, *shape).clone()

    warped = field.warp(ramp, disp)
    expected = ramp + float(slope @ shift)
    inner = _interior(ndim, 1)
    torch.testing.assert_close(warped[inner], expected[inner], atol=1e-4, rtol=0)


@pytest.mark.parametrize("ndim", [2, 3])
def test_nearest_warp_of_integer_labels_keeps_dtype_and_label_set(ndim):
    """Integer label maps are warped by nearest neighbour: no new values, same dtype."""
    shape = SHAPES[ndim]
    labels = torch.randint(0, 5, (1, 1, *shape), generator=_generator(3)) * 7  # labels {0, 7, ..., 28}
    disp = _smooth_field(shape, amplitude=2.3, seed=4)
    warped = field.warp(labels, disp, mode="nearest")
    assert warped.dtype == labels.dtype
    assert set(warped.unique().tolist()) <= set(labels.unique().tolist())
    # even when "linear" is requested, integer maps are never blended
    warped_linear = field.warp(labels, disp, mode="linear")
    assert warped_linear.dtype == labels.dtype
    assert set(warped_linear.unique().tolist()) <= set(labels.unique().tolist())


@pytest.mark.parametrize("ndim", [2, 3])
def test_nearest_warp_picks_the_closest_voxel(ndim):
    """A shift of +0.4 voxel rounds back onto the same voxel, +0.6 onto the next one (interior)."""
    shape = SHAPES[ndim]
    labels = torch.randint(0, 50, (1, 1, *shape), generator=_generator(5)).to(torch.int32)
    for fraction, step in [(0.4, 0), (0.6, 1)]:
        disp = torch.zeros((1, ndim, *shape))
        disp[:, 0] = fraction
        warped = field.warp(labels, disp, mode="nearest")
        n = shape[0]
        torch.testing.assert_close(warped[:, :, : n - 1], labels[:, :, step : n - 1 + step])


def test_warp_rejects_a_field_on_another_grid():
    with pytest.raises(ValueError, match="grid"):
        field.warp(torch.zeros(1, 1, 4, 5, 6), torch.zeros(1, 3, 4, 5, 7))


def test_sample_rejects_unknown_modes():
    image, coords = torch.zeros(1, 1, 4, 5), torch.zeros(1, 2, 4, 5)
    with pytest.raises(ValueError, match="interpolation"):
        field.sample(image, coords, mode="cubic")
    with pytest.raises(ValueError, match="padding"):
        field.sample(image, coords, padding="wrap")


# --- composition ----------------------------------------------------------------------------------


@pytest.mark.parametrize("ndim", [2, 3])
def test_compose_equals_sequential_warping_of_coordinate_images(ndim):
    """warp(warp(m, first), second) == warp(m, compose(first, second)) exactly when m is linear.

    Take m = the identity coordinate images (channel d holds x_d). Warping them is exact, so
    both sides equal x + second(x) + interp(first)(x + second(x)) up to float rounding, in the
    interior where no sample leaves the grid (margin > 2 * max|u| + 1). The swapped order or
    the plain sum first + second differ by about |grad first| * |second| (several hundredths of a
    voxel here, against a 1e-4 tolerance), so a composition in the wrong order fails.
    """
    shape = (22, 24, 26)[:ndim]
    coords = field.identity_grid(shape)[None]
    first = _smooth_field(shape, amplitude=2.0, sigma=2.0, seed=10)
    second = _smooth_field(shape, amplitude=2.0, sigma=2.0, seed=11)
    inner = _interior(ndim, 6)

    sequential = field.warp(field.warp(coords, first), second)[inner]
    composed = field.warp(coords, field.compose(first, second))[inner]
    torch.testing.assert_close(composed, sequential, atol=1e-4, rtol=0)
    for wrong in (field.compose(second, first), first + second):
        assert (field.warp(coords, wrong)[inner] - sequential).abs().max().item() > 0.03


@pytest.mark.parametrize("ndim", [2, 3])
def test_compose_equals_sequential_warping_of_smooth_image(ndim):
    """For a smooth image and small smooth fields the two sides differ only by the error of
    interpolating an already interpolated image: well under 1% of the image range (interior)."""
    shape = (20, 22, 24)[:ndim]
    image = _smooth_image(shape)  # values in [-1, 1]
    first = _smooth_field(shape, amplitude=1.5, seed=10)
    second = _smooth_field(shape, amplitude=1.5, seed=11)
    inner = _interior(ndim, 4)
    sequential = field.warp(field.warp(image, first), second)
    composed = field.warp(image, field.compose(first, second))
    assert (sequential[inner] - composed[inner]).abs().max().item() < 5e-3


@pytest.mark.parametrize("ndim", [2, 3])
def test_compose_of_translations_adds_them(ndim):
    shape = SHAPES[ndim]
    a = torch.zeros((1, ndim, *shape))
    b = torch.zeros((1, ndim, *shape))
    a[:, 0], b[:, -1] = 1.25, -0.5
    torch.testing.assert_close(field.compose(a, b), a + b)


@pytest.mark.parametrize("ndim", [2, 3])
def test_compose_with_zero_is_identity(ndim):
    shape = SHAPES[ndim]
    u = _smooth_field(shape, amplitude=2.0, seed=12)
    zero = torch.zeros_like(u)
    torch.testing.assert_close(field.compose(u, zero), u, atol=1e-5, rtol=0)
    torch.testing.assert_close(field.compose(zero, u), u, atol=1e-6, rtol=0)


# --- resizing -------------------------------------------------------------------------------------


@pytest.mark.parametrize("ndim", [2, 3])
def test_resize_field_of_linear_field_matches_analytic_field_on_new_grid(ndim):
    """u(x) = A x + b on a coarse grid, resized to a finer grid with align_corners semantics.

    A fine voxel x' lies at coarse coordinate x = x' / f with f_d = (n'_d - 1) / (n_d - 1), and
    a displacement of u_d coarse voxels is f_d * u_d fine voxels, so the expected field is
    v_d(x') = f_d * (A (x' / f) + b)_d. Linear interpolation is exact on it.
    """
    coarse = (5, 6, 7)[:ndim]
    fine = (9, 16, 10)[:ndim]  # factors 2, 3 and 1.5: integer and non-integer
    rng = np.random.default_rng(0)
    matrix = rng.normal(0.0, 0.3, (ndim, ndim))
    offset = rng.normal(0.0, 1.0, ndim)
    factors = np.array([(nf - 1) / (nc - 1) for nf, nc in zip(fine, coarse)])

    resized = field.resize_field(_linear_field(coarse, matrix, offset), fine)
    expected_matrix = np.diag(factors) @ matrix @ np.diag(1.0 / factors)
    expected = _linear_field(fine, expected_matrix, factors * offset)
    assert resized.shape == (1, ndim, *fine)
    torch.testing.assert_close(resized, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ndim", [2, 3])
def test_resize_field_of_translation_rescales_to_new_voxel_units(ndim):
    """A shift of one coarse voxel is two fine voxels when n' - 1 = 2 (n - 1)."""
    coarse = (5, 6, 7)[:ndim]
    fine = tuple(2 * n - 1 for n in coarse)
    u = torch.ones((1, ndim, *coarse))
    torch.testing.assert_close(field.resize_field(u, fine), torch.full((1, ndim, *fine), 2.0))


@pytest.mark.parametrize("ndim", [2, 3])
def test_resize_field_up_then_down_is_identity(ndim):
    """On nested grids (n' - 1 = 2 (n - 1)) the coarse nodes are fine nodes: exact round trip."""
    coarse = (6, 7, 8)[:ndim]
    fine = tuple(2 * n - 1 for n in coarse)
    u = _smooth_field(coarse, amplitude=2.0, sigma=1.0, seed=13)
    round_trip = field.resize_field(field.resize_field(u, fine), coarse)
    torch.testing.assert_close(round_trip, u, atol=1e-5, rtol=0)


@pytest.mark.parametrize("ndim", [2, 3])
def test_resize_field_down_then_up_is_close_for_smooth_fields(ndim):
    """A field that varies slowly survives a factor-2 down/up round trip to well under 0.1 voxel."""
    fine = (25, 29, 33)[:ndim]
    coarse = tuple((n - 1) // 2 + 1 for n in fine)
    u = _smooth_field(fine, amplitude=3.0, sigma=5.0, seed=14)
    round_trip = field.resize_field(field.resize_field(u, coarse), fine)
    assert (round_trip - u).abs().max().item() < 0.1


def test_resize_field_to_same_shape_returns_input():
    u = _smooth_field((4, 5, 6), amplitude=1.0)
    assert field.resize_field(u, (4, 5, 6)) is u


# --- velocity integration -------------------------------------------------------------------------


@pytest.mark.parametrize("ndim", [2, 3])
def test_integrate_constant_velocity_is_that_translation(ndim):
    shape = SHAPES[ndim]
    velocity = torch.zeros((1, ndim, *shape))
    for axis in range(ndim):
        velocity[:, axis] = 0.75 * (axis + 1) * (-1) ** axis
    torch.testing.assert_close(field.integrate_velocity(velocity, steps=7), velocity, atol=1e-5, rtol=0)


@pytest.mark.parametrize("ndim", [2, 3])
def test_integrate_zero_velocity_is_zero(ndim):
    zero = torch.zeros((1, ndim, *SHAPES[ndim]))
    assert torch.count_nonzero(field.integrate_velocity(zero)) == 0


@pytest.mark.parametrize("ndim", [2, 3])
def test_integrate_smooth_velocity_gives_positive_jacobian_everywhere(ndim):
    """Scaling and squaring yields a diffeomorphism even where the velocity itself, used as a
    displacement, would fold (the check that the test velocity is large enough to matter)."""
    shape = (24, 26, 28)[:ndim]
    velocity = _smooth_field(shape, amplitude=6.0, sigma=2.5, seed=15)
    assert field.jacobian_determinant(velocity).min() < 0  # as a displacement, it folds
    disp = field.integrate_velocity(velocity, steps=8)
    assert field.jacobian_determinant(disp).min() > 0


def test_integrate_velocity_rejects_negative_steps():
    with pytest.raises(ValueError, match="steps"):
        field.integrate_velocity(torch.zeros(1, 2, 4, 4), steps=-1)


# --- Jacobian -------------------------------------------------------------------------------------


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("scale", [0.5, 1.3])
def test_jacobian_determinant_of_uniform_scaling_is_scale_to_the_ndim(ndim, scale):
    """x + u(x) = s x has det J = s**ndim everywhere, borders included (differences are exact)."""
    shape = SHAPES[ndim]
    u = field.identity_grid(shape)[None] * (scale - 1.0)
    det = field.jacobian_determinant(u)
    assert det.shape == (1, *shape)
    torch.testing.assert_close(det, torch.full_like(det, scale**ndim), atol=1e-5, rtol=1e-5)


def test_jacobian_determinant_of_anisotropic_affine_map():
    """x + u(x) = M x + t has det J = det M; M with off-diagonal terms checks the cofactor signs."""
    matrix = np.array([[1.2, 0.3, -0.1], [0.05, 0.9, 0.2], [-0.2, 0.1, 1.1]])
    u = _linear_field((6, 7, 8), matrix - np.eye(3), np.array([0.5, -1.0, 2.0]))
    det = field.jacobian_determinant(u)
    torch.testing.assert_close(det, torch.full_like(det, float(np.linalg.det(matrix))), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ndim", [2, 3])
def test_jacobian_determinant_of_rotation_is_one(ndim):
    angle = 0.4
    c, s = math.cos(angle), math.sin(angle)
    rotation = np.array([[c, -s], [s, c]]) if ndim == 2 else np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    shape = SHAPES[ndim]
    centre = (np.array(shape) - 1) / 2.0
    # rotation about the grid centre: x + u(x) = R (x - c) + c
    u = _linear_field(shape, rotation - np.eye(ndim), centre - rotation @ centre)
    det = field.jacobian_determinant(u)
    torch.testing.assert_close(det, torch.ones_like(det), atol=1e-5, rtol=0)


def test_jacobian_matrix_entries_are_identity_plus_gradient():
    """[c, a] = delta_ca + d u_c / d x_a: u_0 = 2 x_2 gives entry [0, 2] = 2, nothing else moves."""
    u = torch.zeros(1, 3, 4, 5, 6)
    u[:, 0] = 2.0 * field.identity_grid((4, 5, 6))[2]
    jac = field.jacobian_matrix(u)[0, :, :, 2, 2, 2]
    expected = torch.eye(3)
    expected[0, 2] = 2.0
    torch.testing.assert_close(jac, expected)


# --- numpy layout and world / ITK conversion ------------------------------------------------------


@pytest.mark.parametrize("ndim", [2, 3])
def test_field_numpy_round_trip_and_learn2reg_layout(ndim):
    """On disk a field is (*S, ndim): array[x..., c] == tensor[0, c, x...]."""
    shape = SHAPES[ndim]
    tensor = torch.randn((1, ndim, *shape), generator=_generator(20))
    array = field.field_to_numpy(tensor)
    assert array.shape == (*shape, ndim)
    assert array.dtype == np.float32
    index = (1, 2, 3)[:ndim]
    for c in range(ndim):
        assert array[(*index, c)] == tensor[(0, c, *index)].item()
    back = field.field_from_numpy(array)
    assert back.shape == tensor.shape and back.dtype == torch.float32
    torch.testing.assert_close(back, tensor, atol=0, rtol=0)
    # an unbatched (ndim, *S) tensor has the same on-disk layout
    np.testing.assert_array_equal(field.field_to_numpy(tensor[0]), array)


def test_field_from_numpy_rejects_a_wrong_layout():
    with pytest.raises(ValueError, match="field"):
        field.field_from_numpy(np.zeros((3, 4, 5, 6), dtype=np.float32))  # channels first


def test_field_to_world_with_diagonal_affine_scales_by_spacing():
    disp = np.random.default_rng(1).normal(size=(3, 4, 5, 3)).astype(np.float32)
    affine = np.diag([1.5, 2.0, 0.75, 1.0])
    affine[:3, 3] = [10.0, -20.0, 30.0]  # the translation does not act on displacement vectors
    world = field.field_to_world(disp, affine)
    assert world.shape == disp.shape and world.dtype == np.float32
    np.testing.assert_allclose(world, disp * np.array([1.5, 2.0, 0.75]), rtol=1e-6)


def test_field_to_world_with_axis_permutation_moves_components():
    """An affine whose voxel axis i points along world y puts component i into world y."""
    affine = np.array([[0, 0, 2.0, 0], [3.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0, 1]])
    disp = np.zeros((2, 2, 2, 3), dtype=np.float32)
    disp[..., 0] = 1.0  # one voxel along i
    world = field.field_to_world(disp, affine)
    np.testing.assert_allclose(world[0, 0, 0], [0.0, 3.0, 0.0])


def test_world_to_itk_lps_flips_x_and_y_only():
    ras = np.array([[1.0, 2.0, 3.0], [-4.0, 5.0, -6.0]], dtype=np.float32)
    lps = field.world_to_itk_lps(ras)
    np.testing.assert_array_equal(lps, [[-1.0, -2.0, 3.0], [4.0, -5.0, -6.0]])
    assert ras[0, 0] == 1.0  # the input is not modified


# --- box smoothing (the parameter smoothing of the dense models) ---------------------------------


def _pooled_reference(x: torch.Tensor, passes: int) -> torch.Tensor:
    """The definition: 3-voxel average pooling per axis, border averages over the inside voxels."""
    ndim = x.dim() - 2
    pool = torch.nn.functional.avg_pool3d if ndim == 3 else torch.nn.functional.avg_pool2d
    for _ in range(passes):
        for axis in range(ndim):
            kernel = [1] * ndim
            kernel[axis] = 3
            x = pool(x, kernel, stride=1, padding=[k // 2 for k in kernel], count_include_pad=False)
    return x


@pytest.mark.parametrize("shape", [(1, 2, 5, 6), (2, 3, 4, 5, 6), (1, 3, 3, 7, 4)])
@pytest.mark.parametrize("passes", [1, 2, 3])
def test_box_smooth_is_average_pooling_and_its_gradient_is_the_transpose(shape, passes):
    from dirio.transforms.dense import smooth_parameters

    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(smooth_parameters(x, passes), _pooled_reference(x, passes))
    assert torch.autograd.gradcheck(lambda t: smooth_parameters(t, passes), (x,))
    g = torch.randn(*shape, dtype=torch.float64)
    (expected,) = torch.autograd.grad(_pooled_reference(x, passes), x, g)
    (got,) = torch.autograd.grad(smooth_parameters(x, passes), x, g)
    torch.testing.assert_close(got, expected)


def test_box_smooth_on_axes_of_one_and_two_voxels():
    """One voxel: left alone; two voxels: both become their mean (pooling refuses such grids)."""
    x = torch.randn(1, 1, 1, 2, dtype=torch.float64)
    expected = x.mean(dim=3, keepdim=True).expand_as(x)
    torch.testing.assert_close(filters.box_smooth(x, 1), expected)
    torch.testing.assert_close(filters.box_smooth_adjoint(torch.ones_like(x), 1), torch.ones_like(x))
