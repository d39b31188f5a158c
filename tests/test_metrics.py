"""Tests for the dirio.evaluation metrics: hand-computed values for every metric, plus brute-force cross-checks.

Fields are numpy arrays in the on-disk layout ``(*S, ndim)``, voxel units, pull convention.
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from dirio.evaluation import _checks, evaluate, jacobian, landmarks, overlap, surface


def zero_field(shape):
    return np.zeros((*shape, len(shape)), dtype=np.float32)


def box(shape, *ranges):
    """Boolean mask with True on the product of the index ranges ``(start, stop)``."""
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(a, b) for a, b in ranges)] = True
    return mask


def piecewise_linear(x, knots, values):
    """Continuous piecewise-linear function through (knots, values), constant outside."""
    return np.interp(x, knots, values)


# --- warp_labels -------------------------------------------------------------------------------


def test_warp_labels_integer_shift_pulls_from_x_plus_u_and_zero_fills_outside():
    """warped(x) = moving(x + u): a shift of +1 along axis 0 moves content to lower indices; the
    last slice samples outside the grid and becomes label 0; the integer dtype is kept."""
    rng = np.random.default_rng(0)
    moving = rng.integers(0, 5, size=(6, 5, 4)).astype(np.int16)
    disp = zero_field(moving.shape)
    disp[..., 0] = 1.0
    warped = overlap.warp_labels(moving, disp)
    assert warped.dtype == np.int16
    np.testing.assert_array_equal(warped[:-1], moving[1:])
    np.testing.assert_array_equal(warped[-1], 0)


def test_warp_labels_with_the_zero_field_is_a_copy_of_the_map():
    moving = np.random.default_rng(0).integers(0, 5, (6, 7, 8)).astype(np.int16)
    warped = overlap.warp_labels(moving, np.zeros((6, 7, 8, 3), np.float32))
    assert warped.dtype == moving.dtype and np.array_equal(warped, moving)
    assert not np.shares_memory(warped, moving)
    # the general path with a tiny shift rounds to the same voxels (but at the far border, which
    # it treats as outside: the evaluator's quirk)
    tiny = np.full((6, 7, 8, 3), 1e-3, np.float32)
    inner = (slice(0, -1),) * 3
    assert np.array_equal(overlap.warp_labels(moving, tiny)[inner], moving[inner])


def test_warp_labels_2d_nearest_rounds_fractional_displacement():
    """A displacement of 0.4 voxel rounds to no move, 0.6 to one voxel (nearest neighbour); any
    point past the last voxel centre, even by 0.4, is outside and gets 0 (the evaluator's scipy
    ``mode="constant"``)."""
    moving = np.arange(1, 21, dtype=np.uint8).reshape(4, 5)
    disp = zero_field(moving.shape)
    disp[..., 1] = 0.4
    warped = overlap.warp_labels(moving, disp)
    np.testing.assert_array_equal(warped[:, :-1], moving[:, :-1])
    np.testing.assert_array_equal(warped[:, -1], 0)
    disp[..., 1] = 0.6
    warped = overlap.warp_labels(moving, disp)
    assert warped.dtype == np.uint8
    np.testing.assert_array_equal(warped[:, :-1], moving[:, 1:])


def test_warp_labels_rejects_mismatched_grid():
    with pytest.raises(ValueError, match="does not match"):
        overlap.warp_labels(np.zeros((4, 4, 4), np.int32), zero_field((4, 4, 5)))


# --- Dice, mean Dice, DSC30 --------------------------------------------------------------------


def test_dice_of_cubes_with_known_overlap():
    """Two 4^3 cubes offset by one voxel overlap in 3*4*4 = 48 voxels: Dice = 96 / 128 = 0.75."""
    fixed = box((8, 8, 8), (1, 5), (1, 5), (1, 5)).astype(np.int32)
    warped = box((8, 8, 8), (2, 6), (1, 5), (1, 5)).astype(np.int32)
    assert overlap.dice_per_label(fixed, warped) == {1: pytest.approx(0.75)}


def test_dice_2d_identical_and_disjoint_labels():
    """Identical label 1 gives 1, disjoint label 2 gives 0 (present in both maps)."""
    fixed = np.zeros((6, 6), np.int32)
    warped = np.zeros((6, 6), np.int32)
    fixed[:2, :2] = warped[:2, :2] = 1
    fixed[4:, 4:] = 2
    warped[4:, :2] = 2
    assert overlap.dice_per_label(fixed, warped) == {1: 1.0, 2: 0.0}


def test_dice_missing_label_is_nan_and_excluded_from_mean():
    """A label absent from the warped map (no moving map given) is NaN, not 0, and the mean skips it."""
    fixed = np.zeros((8, 8, 8), np.int32)
    warped = np.zeros((8, 8, 8), np.int32)
    fixed[box(fixed.shape, (1, 5), (1, 5), (1, 5))] = 1
    warped[box(fixed.shape, (2, 6), (1, 5), (1, 5))] = 1
    fixed[6:, 6:, 6:] = 2
    dice = overlap.dice_per_label(fixed, warped)
    assert set(dice) == {1, 2}
    assert math.isnan(dice[2])
    assert overlap.mean_dice(dice) == pytest.approx(0.75)


def test_dice_presence_follows_moving_map_like_learn2reg():
    """With the moving map given, a label present in fixed and moving but warped away scores 0
    (Learn2Reg checks presence in fixed and moving); a label missing from moving is NaN."""
    fixed = np.zeros((6, 6, 6), np.int32)
    fixed[:2] = 1
    fixed[4:] = 2
    moving = np.zeros_like(fixed)
    moving[:2] = 1
    warped = np.zeros_like(fixed)
    dice = overlap.dice_per_label(fixed, warped, labels=[1, 2], moving_labels=moving)
    assert dice[1] == 0.0
    assert math.isnan(dice[2])


def test_mean_dice_all_nan_is_nan_without_warning():
    with np.errstate(all="raise"):
        assert math.isnan(overlap.mean_dice({1: float("nan"), 2: float("nan")}))


def test_dsc30_is_the_linear_0_3_quantile():
    """numpy's linear method: position 0.3 * (n - 1) between sorted values.
    [0.1 .. 0.5]: position 1.2 -> 0.2 + 0.2 * 0.1 = 0.22; [0.5, 0.7, 0.8, 0.9]: 0.9 -> 0.68."""
    assert overlap.dsc30([0.5, 0.1, 0.4, 0.2, 0.3]) == pytest.approx(0.22)
    assert overlap.dsc30([0.9, 0.5, 0.7, 0.8]) == pytest.approx(0.68)
    assert overlap.dsc30([0.42]) == pytest.approx(0.42)


def test_dsc30_nan_propagates_unless_skipped():
    values = [0.9, float("nan"), 0.5, 0.7, 0.8]
    assert math.isnan(overlap.dsc30(values))
    assert overlap.dsc30(values, skip_nan=True) == pytest.approx(0.68)
    assert math.isnan(overlap.dsc30([]))


# --- HD95 --------------------------------------------------------------------------------------


def test_hd95_of_cubes_offset_by_two_voxels_is_two_voxels():
    """4^3 cubes offset by 2 along axis 0: the far faces (a quarter of the surfels) are 2 voxels
    from the other surface and nothing is farther, so the 95th percentile is 2 voxels."""
    fixed = box((12, 10, 10), (2, 6), (2, 6), (2, 6)).astype(np.uint8)
    warped = box((12, 10, 10), (4, 8), (2, 6), (2, 6)).astype(np.uint8)
    assert surface.hd95_per_label(fixed, warped) == {1: pytest.approx(2.0)}


def test_hd95_in_mm_with_anisotropic_spacing():
    """The same cubes with spacing (2, 1, 1) mm: the 2-voxel offset along axis 0 is 4 mm; with
    spacing (1, 3, 0.5) (offset axis at 1 mm) it is 2 mm; spacing=None stays in voxels."""
    fixed = box((12, 10, 10), (2, 6), (2, 6), (2, 6)).astype(np.uint8)
    warped = box((12, 10, 10), (4, 8), (2, 6), (2, 6)).astype(np.uint8)
    assert surface.hd95_per_label(fixed, warped, spacing=(2.0, 1.0, 1.0))[1] == pytest.approx(4.0)
    assert surface.hd95_per_label(fixed, warped, spacing=(1.0, 3.0, 0.5))[1] == pytest.approx(2.0)
    assert surface.hd95_per_label(fixed, warped, spacing=None)[1] == pytest.approx(2.0)


def test_hd95_2d_squares_offset_by_three_pixels():
    fixed = box((16, 12), (2, 8), (3, 9)).astype(np.int32)
    warped = box((16, 12), (5, 11), (3, 9)).astype(np.int32)
    assert surface.hd95_per_label(fixed, warped)[1] == pytest.approx(3.0)
    assert surface.hd95_per_label(fixed, warped, spacing=(0.5, 2.0))[1] == pytest.approx(1.5)


def test_hd95_ignores_a_thin_spike_that_the_maximum_sees():
    """A 2-voxel spike on an 8^3 cube holds far less than 5% of the surface: HD95 = 0 while the
    full Hausdorff distance (100th percentile) is the spike length, 2 voxels."""
    cube = box((16, 16, 16), (2, 10), (2, 10), (2, 10))
    spiked = cube.copy()
    spiked[10:12, 6, 6] = True
    assert surface.robust_hausdorff(spiked, cube, 95.0) == 0.0
    assert surface.robust_hausdorff(spiked, cube, 100.0) == pytest.approx(2.0)


def test_hd95_missing_labels_follow_learn2reg():
    """Absent from fixed or moving: NaN. Present in both but warped away: inf (empty surface)."""
    fixed = np.zeros((8, 8, 8), np.int32)
    fixed[1:4, 1:4, 1:4] = 1
    fixed[5:7, 5:7, 5:7] = 2
    moving = np.zeros_like(fixed)
    moving[1:4, 1:4, 1:4] = 1
    moving[0:2, 5:7, 5:7] = 3
    warped = np.zeros_like(fixed)
    hd = surface.hd95_per_label(fixed, warped, labels=[1, 2, 3], moving_labels=moving)
    assert hd[1] == math.inf
    assert math.isnan(hd[2]) and math.isnan(hd[3])


def test_surfel_areas_sum_to_the_marching_cubes_area_of_a_box():
    """The surfel areas of an a x b x c box sum to its area minus the marching-cubes bevels:
    faces (a-1)(b-1)..., edges 4 (a-1 + b-1 + c-1) * sqrt(2)/2, corners 8 * sqrt(3)/8."""
    a, b, c = 5, 4, 3
    mask = box((9, 8, 7), (2, 2 + a), (2, 2 + b), (2, 2 + c))
    found = surface.surface_distances(mask, mask)
    faces = 2 * ((a - 1) * (b - 1) + (a - 1) * (c - 1) + (b - 1) * (c - 1))
    edges = 4 * ((a - 1) + (b - 1) + (c - 1)) * math.sqrt(2) / 2
    corners = 8 * math.sqrt(3) / 8
    assert found["areas_a"].sum() == pytest.approx(faces + edges + corners)
    np.testing.assert_array_equal(found["distances_a_to_b"], 0.0)


def _brute_force_hausdorff(a, b, percent, spacing):
    """Independent HD: enumerate corner points one by one, all-pairs distances, weighted percentile."""
    ndim = a.ndim
    table = surface._surfel_area_table(tuple(float(s) for s in spacing))
    corners = list(itertools.product((0, 1), repeat=ndim))

    def surfels(mask):
        padded = np.pad(mask, 1)
        points, areas = [], []
        for corner in itertools.product(*[range(n + 1) for n in mask.shape]):
            values = [padded[tuple(c + o for c, o in zip(corner, off))] for off in corners]
            if any(values) and not all(values):
                points.append(corner)
                areas.append(table[sum(1 << bit for bit, v in enumerate(values) if v)])
        return np.array(points, float) * spacing, np.array(areas)

    pa, wa = surfels(a)
    pb, wb = surfels(b)
    pair = cdist(pa, pb)

    def directed(distances, weights):
        order = np.lexsort((weights, distances))
        share = np.cumsum(weights[order]) / weights.sum()
        first = np.nonzero(share >= percent / 100.0)[0]
        return distances[order][first[0] if first.size else -1]

    return max(directed(pair.min(axis=1), wa), directed(pair.min(axis=0), wb))


@pytest.mark.parametrize("seed", range(4))
def test_hd_matches_brute_force_on_random_tiny_shapes(seed):
    """Distance transforms + percentile agree with an all-pairs computation (3D and 2D, mm)."""
    rng = np.random.default_rng(seed)
    for shape in ((7, 6, 8), (13, 11)):
        a = ndimage.gaussian_filter(rng.random(shape), 1.0) > 0.5
        b = ndimage.gaussian_filter(rng.random(shape), 1.0) > 0.5
        a[(1,) * len(shape)] = b[(2,) * len(shape)] = True
        spacing = np.array([1.0, 2.5, 0.7][: len(shape)])
        for percent in (95.0, 50.0, 100.0):
            expected = _brute_force_hausdorff(a, b, percent, spacing)
            assert surface.robust_hausdorff(a, b, percent, spacing) == pytest.approx(expected, rel=1e-12)


def test_hd95_matches_deepmind_surface_distance_when_installed(monkeypatch):
    """Cross-check against DeepMind's package (the one Learn2Reg calls) when it is importable."""
    sd = pytest.importorskip("surface_distance")
    monkeypatch.setattr(np, "Inf", np.inf, raising=False)  # the package predates numpy 2
    rng = np.random.default_rng(3)
    for _ in range(5):
        a = ndimage.gaussian_filter(rng.random((12, 12, 12)), 1.5) > 0.5
        b = ndimage.gaussian_filter(rng.random((12, 12, 12)), 1.5) > 0.5
        for spacing in ((1.0, 1.0, 1.0), (0.8, 1.7, 3.0)):
            expected = sd.compute_robust_hausdorff(sd.compute_surface_distances(a, b, spacing), 95)
            assert surface.robust_hausdorff(a, b, 95.0, spacing) == pytest.approx(expected, rel=1e-12)


# --- TRE ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", [3, 1])
def test_tre_constant_field(order):
    """u = (1, -2, 0.5) everywhere: TRE = ||(p_f + u - p_m) * spacing||, e.g. p_f = p_m gives
    ||(1, -2, 0.5) * (2, 1, 3)|| = ||(2, -2, 1.5)|| = sqrt(10.25)."""
    disp = zero_field((12, 12, 12))
    disp[...] = (1.0, -2.0, 0.5)
    fixed = np.array([[5.0, 6.0, 5.5], [6.2, 5.1, 6.7]])
    moving = np.array([[5.0, 6.0, 5.5], [7.2, 3.1, 7.2]])
    errors = landmarks.tre(fixed, moving, disp, spacing=(2.0, 1.0, 3.0), order=order)
    np.testing.assert_allclose(errors, [math.sqrt(10.25), 0.0], atol=1e-9)


def test_tre_linear_field_cubic_and_linear_agree():
    """u(x) = A x + b is reproduced by both interpolations away from the border, so both orders give
    the hand value ||(p + A p + b - q) * spacing||."""
    shape = (24, 24, 24)
    a = np.array([[0.02, -0.01, 0.0], [0.0, 0.03, 0.01], [-0.02, 0.0, 0.01]])
    b = np.array([0.5, -0.25, 1.0])
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij"), axis=-1)
    disp = grid @ a.T + b
    fixed = np.array([[11.3, 12.1, 10.6], [12.0, 11.5, 12.7], [10.2, 12.9, 11.1]])
    moving = fixed + np.array([[0.5, 0.0, 1.0], [0.3, -0.2, 0.9], [0.1, 0.2, 0.3]])
    spacing = (1.5, 0.75, 2.0)
    expected = np.linalg.norm((fixed + fixed @ a.T + b - moving) * np.array(spacing), axis=1)
    for order in (1, 3):
        np.testing.assert_allclose(landmarks.tre(fixed, moving, disp, spacing, order=order), expected, atol=1e-6)


def test_tre_2d_and_bad_shapes():
    disp = zero_field((8, 8))
    disp[..., 0] = 3.0
    assert landmarks.tre([[4.0, 4.0]], [[4.0, 4.0]], disp, spacing=(0.5, 1.0)) == pytest.approx([1.5])
    with pytest.raises(ValueError, match="shape"):
        landmarks.tre([[1.0, 2.0, 3.0]], [[1.0, 2.0, 3.0]], disp, spacing=(1.0, 1.0))
    assert landmarks.tre(np.zeros((0, 2)), np.zeros((0, 2)), disp, spacing=(1.0, 1.0)).shape == (0,)


# --- Jacobian-based metrics --------------------------------------------------------------------


def test_identity_has_zero_sdlogj_and_no_folding():
    disp = zero_field((9, 8, 7))
    np.testing.assert_array_equal(jacobian.jacobian_determinant_l2r(disp), 1.0)
    assert jacobian.jacobian_determinant_l2r(disp).shape == (5, 4, 3)
    assert jacobian.sdlogj_l2r(disp) == pytest.approx(0.0, abs=1e-12)
    assert jacobian.sdlogj(disp) == 0.0
    assert jacobian.fraction_nonpositive_jacobian(disp) == 0.0


def test_uniform_scaling_has_constant_determinant():
    """u = s x gives det = (1 + s)^3 everywhere inside the crop, hence SDlogJ = 0."""
    s = 0.2
    shape = (9, 9, 9)
    disp = s * np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij"), axis=-1)
    np.testing.assert_allclose(jacobian.jacobian_determinant_l2r(disp), (1 + s) ** 3, rtol=1e-12)
    assert jacobian.sdlogj_l2r(disp) == pytest.approx(0.0, abs=1e-12)
    assert jacobian.sdlogj(disp) == pytest.approx(0.0, abs=1e-12)


def _two_region_field(shape):
    """u_0 = 0.5 x_0 up to x_0 = 6, then slope -0.25: central differences give det 1.5 for
    x_0 <= 5, 1 + (0.5 - 0.25) / 2 = 1.125 at x_0 = 6 and 0.75 for x_0 >= 7."""
    x0 = np.arange(shape[0], dtype=float)
    u0 = piecewise_linear(x0, [0, 6, 20], [0.0, 3.0, 3.0 - 0.25 * 14])
    disp = np.zeros((*shape, len(shape)))
    disp[..., 0] = u0.reshape(-1, *([1] * (len(shape) - 1)))
    return disp


def test_sdlogj_of_two_regions_with_known_determinants():
    """On a (12, 6, 6) grid the crop keeps x_0 = 2..9: dets [1.5]*4, 1.125, [0.75]*3 per row."""
    disp = _two_region_field((12, 6, 6))
    dets = [1.5] * 4 + [1.125] + [0.75] * 3
    np.testing.assert_allclose(jacobian.jacobian_determinant_l2r(disp)[:, 0, 0], dets, rtol=1e-12)
    assert jacobian.sdlogj_l2r(disp) == pytest.approx(float(np.std(np.log(np.array(dets) + 3.0))), rel=1e-12)
    assert jacobian.sdlogj(disp) == pytest.approx(float(np.std(np.log(dets))), rel=1e-12)


def test_sdlogj_2d_two_regions():
    disp = _two_region_field((12, 7))
    dets = [1.5] * 4 + [1.125] + [0.75] * 3
    assert jacobian.sdlogj(disp) == pytest.approx(float(np.std(np.log(dets))), rel=1e-12)


def test_sdlogj_l2r_mask_keeps_voxels_where_mask_is_one():
    """Masking to the x_0 <= 5 region (det 1.5 everywhere) gives 0; the mask is cropped like the field."""
    disp = _two_region_field((12, 6, 6))
    mask = np.zeros((12, 6, 6))
    mask[:6] = 1
    assert jacobian.sdlogj_l2r(disp, mask) == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(jacobian.sdlogj_l2r(disp, np.zeros((12, 6, 6))))


def _fold_field(shape):
    """u_0 = 0 up to x_0 = 4, slope -3 up to x_0 = 7, then -9: a fold of the slab 4 <= x_0 <= 7.

    Central differences: det = 1 - 1.5 = -0.5 at x_0 = 4 and 7, 1 - 3 = -2 at 5 and 6, 1 elsewhere.
    """
    x0 = np.arange(shape[0], dtype=float)
    u0 = piecewise_linear(x0, [0, 4, 7, 20], [0.0, 0.0, -9.0, -9.0])
    disp = np.zeros((*shape, len(shape)))
    disp[..., 0] = u0.reshape(-1, *([1] * (len(shape) - 1)))
    return disp


def test_fraction_nonpositive_jacobian_on_a_fold():
    """The crop keeps x_0 = 2..9 (8 slabs); 4 of them (x_0 = 4..7) fold: fraction 0.5, 2D and 3D."""
    for shape in ((12, 6, 5), (12, 7)):
        disp = _fold_field(shape)
        assert jacobian.fraction_nonpositive_jacobian(disp) == 0.5
    dets = jacobian.jacobian_determinant_l2r(_fold_field((12, 6, 5)))[:, 0, 0]
    np.testing.assert_allclose(dets, [1.0, 1.0, -0.5, -2.0, -2.0, -0.5, 1.0, 1.0])
    assert jacobian.sdlogj((_fold_field((12, 6, 5)))) == 0.0  # folded voxels are left out


def test_jacobian_needs_a_grid_larger_than_the_crop():
    with pytest.raises(ValueError, match="larger than 4"):
        jacobian.jacobian_determinant_l2r(zero_field((4, 8, 8)))


# --- NDV ---------------------------------------------------------------------------------------


def test_tetrahedral_determinants_of_an_affine_map():
    """For phi(x) = A x + b every corner tetrahedron has det(A) and both central ones 2 det(A)
    (away from the edge-replicated border)."""
    a = np.array([[1.1, 0.2, 0.0], [-0.1, 0.9, 0.3], [0.05, 0.0, 1.2]])
    shape = (6, 6, 6)
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij"), axis=-1)
    disp = grid @ (a - np.eye(3)).T + np.array([0.3, -1.0, 2.0])
    dets = jacobian.tetrahedral_jacobian_determinants(disp)[:, 1:-1, 1:-1, 1:-1]
    assert dets.shape[0] == 10
    np.testing.assert_allclose(dets[:8], np.linalg.det(a), rtol=1e-12)
    np.testing.assert_allclose(dets[8:], 2 * np.linalg.det(a), rtol=1e-12)


def test_ndv_identity_and_smooth_field_are_zero():
    assert jacobian.ndv(zero_field((6, 7, 8))) == 0.0
    assert jacobian.ndv_fraction(zero_field((6, 7, 8))) == 0.0
    assert jacobian.ndv(zero_field((6, 7))) == 0.0
    shape = (10, 10, 10)
    x = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij"), axis=-1)
    smooth = 0.8 * np.sin(2 * np.pi * x[..., [1, 2, 0]] / 10)  # |gradient| <= 0.5: no fold
    assert jacobian.ndv(smooth) == 0.0


def test_ndv_of_a_one_dimensional_fold():
    """For u = (u_0(x_0), 0, 0) every tetrahedron det is 1 + (forward or backward difference of u_0),
    so the NDV is the number of voxels per x_0-row cross-section times sum over x_0 edges of
    max(-(1 + du_0), 0). The fold has 3 edges with du_0 = -3: 3 * 2 = 6 per row.
    On (12, 5, 6): NDV = 6 * 30 = 180 voxels, fraction 6 / 12 = 0.5. In 2D on (12, 7): NDA = 42."""
    disp = _fold_field((12, 5, 6))
    assert jacobian.ndv(disp) == pytest.approx(180.0)
    assert jacobian.ndv_fraction(disp) == pytest.approx(0.5)
    disp2d = _fold_field((12, 7))
    assert jacobian.ndv(disp2d) == pytest.approx(42.0)
    assert jacobian.ndv_fraction(disp2d) == pytest.approx(0.5)


def test_ndv_of_a_reflection():
    """u_0 = -2 x_0 reflects every row: each of the D - 1 interior edges has 1 + du_0 = -1, so the
    NDV is (D - 1) H W; the edge-replicated border adds nothing. A mask restricts the sum."""
    shape = (7, 4, 5)
    disp = np.zeros((*shape, 3))
    disp[..., 0] = -2.0 * np.arange(7, dtype=float)[:, None, None]
    assert jacobian.ndv(disp) == pytest.approx(6 * 4 * 5)
    mask = np.zeros(shape)
    mask[0] = 1  # the first slab: only its forward edges fold, half a voxel each
    assert jacobian.ndv(disp, mask) == pytest.approx(0.5 * 4 * 5)
    assert jacobian.ndv_fraction(disp, mask) == pytest.approx(0.5)


@pytest.mark.parametrize("shape", [(7, 9), (6, 8, 10)])
def test_bounding_box_is_the_extent_of_the_true_voxels(shape):
    rng = np.random.default_rng(len(shape))
    for _ in range(20):
        mask = np.zeros(shape, dtype=bool)
        mask[tuple(rng.integers(0, n, size=3) for n in shape)] = True
        expected = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(mask))
        assert surface._bounding_box(mask) == expected


def _blob_labels(rng, shape, count):
    """A label map of ``count`` smoothed random blobs (labels 1..count, some may vanish), as uint8."""
    noise = ndimage.gaussian_filter(rng.normal(size=(count + 1, *shape)), (0,) + (1.5,) * len(shape))
    return np.argmax(noise, axis=0).astype(np.uint8)


@pytest.mark.parametrize("shape", [(17, 19), (12, 14, 16)])
def test_scores_in_label_boxes_equal_the_whole_map_scores(shape):
    """Dice and HD95 (voxels and mm) of integer maps, computed in each label's box, equal the scores of
    the whole maps to the last bit, missing labels included: absent from the fixed map, from the
    moving map, or warped out of the image."""
    rng = np.random.default_rng(len(shape))
    for _ in range(4):
        fixed, moving, warped = (_blob_labels(rng, shape, 6) for _ in range(3))
        fixed[fixed == 5] = 0          # absent from the fixed map
        moving[moving == 4] = 0        # absent from the moving map
        warped[warped == 3] = 0        # warped out of the image
        labels = [1, 2, 3, 4, 5, 6, 9]  # 9: absent everywhere
        spacing = (1.5, 0.7, 2.0)[: len(shape)]
        scorers = [overlap._dice, lambda a, b: surface.robust_hausdorff(a, b),
                   lambda a, b: surface.robust_hausdorff(a, b, 95.0, spacing)]
        for score in scorers:
            for asked, reference in ((labels, moving), (None, moving), (labels, None)):
                boxed = _checks.scores_per_label(fixed, warped, asked, reference, score)
                whole = _checks._scores_of_whole_maps(fixed, warped, warped if reference is None else reference,
                                                      asked, score)
                assert list(boxed) == list(whole)
                assert np.array_equal(np.array(list(boxed.values())), np.array(list(whole.values())), equal_nan=True)
        assert math.isnan(overlap.dice_per_label(fixed, warped, labels, moving_labels=moving)[4])
        assert overlap.dice_per_label(fixed, warped, labels, moving_labels=moving)[3] == 0.0


def test_label_boxes_index_integer_maps_only():
    """Boxes of the positive labels of integer and boolean maps; float maps and negative labels are
    left to the whole-map comparison (None), as is a label 0 asked for."""
    labels = np.zeros((5, 6, 7), np.int16)
    labels[1:3, 2:5, 0:1] = 2
    labels[4, 5, 6] = 7
    assert _checks.label_boxes(labels) == {2: (slice(1, 3), slice(2, 5), slice(0, 1)),
                                           7: (slice(4, 5), slice(5, 6), slice(6, 7))}
    assert _checks.label_boxes(labels > 0) == {1: (slice(1, 5), slice(2, 6), slice(0, 7))}
    assert _checks.label_boxes(labels.astype(np.float32)) is None
    negative = labels.copy()
    negative[0, 0, 0] = -1
    assert _checks.label_boxes(negative) is None
    background = overlap.dice_per_label(labels, labels, labels=[0, 2])
    assert background == {0: 1.0, 2: 1.0}


def test_ndv_in_slabs_equals_the_whole_grid_definition(monkeypatch):
    """The slab-wise volume map is the negative parts of all 10 determinants of the whole grid,
    summed and scaled by 1/12, to the last bit, whatever the slab size."""
    rng = np.random.default_rng(3)
    disp = ndimage.gaussian_filter(rng.normal(0, 4, (3, 9, 10, 11)), (0, 1, 1, 1)).transpose(1, 2, 3, 0)
    dets = jacobian.tetrahedral_jacobian_determinants(disp)
    expected = 0.5 / 6 * np.sum(np.maximum(-dets, 0.0), axis=0)
    assert expected.sum() > 0.1  # the field folds
    for voxels in (1, 110, 250, 10**6):
        monkeypatch.setattr(jacobian, "_NDV_SLAB_VOXELS", voxels)
        assert np.array_equal(jacobian.non_diffeomorphic_volume_map(disp), expected)


def test_ndv_matches_digital_diffeomorphism_when_installed():
    """Cross-check against Liu et al.'s package when it is importable."""
    core = pytest.importorskip("digital_diffeomorphism.core")
    rng = np.random.default_rng(5)
    disp = ndimage.gaussian_filter(rng.normal(size=(10, 11, 12, 3)), (1.5, 1.5, 1.5, 0)) * 8
    expected = core.ndv(disp.astype(np.float32).copy(), is_disp=True)
    assert jacobian.ndv(disp) == pytest.approx(float(expected[0]), rel=1e-4)


# --- evaluate_field ----------------------------------------------------------------------------


def test_evaluate_field_reports_everything_and_is_json_ready():
    """All keys, values consistent with the single metrics, NaN kept and accepted by json.dumps."""
    shape = (12, 10, 10)
    disp = np.zeros((*shape, 3), np.float32)
    disp[..., 0] = -2.0  # warped(x) = moving(x - 2): moves moving content +2 along axis 0
    fixed = np.zeros(shape, np.int32)
    moving = np.zeros(shape, np.int32)
    fixed[4:8, 2:6, 2:6] = 1
    moving[2:6, 2:6, 2:6] = 1
    fixed[9:11, 7:9, 7:9] = 2  # absent from moving: NaN
    points = np.array([[5.0, 5.0, 5.0], [6.0, 4.0, 5.0]])
    result = evaluate.evaluate_field(
        disp,
        fixed_labels=fixed,
        moving_labels=moving,
        fixed_points=points,
        moving_points=points - (2.0, 0.0, 0.0),
        spacing=(2.0, 1.0, 1.0),
    )
    assert result["dice_per_label"]["1"] == 1.0
    assert math.isnan(result["dice_per_label"]["2"])
    assert result["dice_mean"] == 1.0
    assert result["hd95_voxels"] == 0.0 and result["hd95_mm"] == 0.0
    assert result["tre_mm"] == pytest.approx([0.0, 0.0], abs=1e-9)
    assert result["tre_mm_mean"] == pytest.approx(0.0, abs=1e-9)
    assert result["tre_order"] == 3
    assert result["sdlogj_l2r"] == pytest.approx(0.0, abs=1e-12) and result["sdlogj"] == 0.0
    assert result["percent_nonpositive_jacobian"] == 0.0
    assert result["ndv_voxels"] == 0.0 and result["ndv_percent"] == 0.0
    text = json.dumps(result)
    assert "NaN" in text
    assert json.loads(text)["dice_per_label"]["1"] == 1.0


def test_evaluate_field_fold_percentages_and_2d():
    """Only Jacobian metrics without labels or points; percentages are 100 x the fractions."""
    result = evaluate.evaluate_field(_fold_field((12, 6, 5)))
    assert set(result) == {"sdlogj_l2r", "sdlogj", "percent_nonpositive_jacobian", "ndv_voxels", "ndv_percent"}
    assert result["percent_nonpositive_jacobian"] == pytest.approx(50.0)
    assert result["ndv_voxels"] == pytest.approx(180.0)
    assert result["ndv_percent"] == pytest.approx(50.0)
    fixed = np.zeros((12, 7), np.int32)
    fixed[2:6, 2:5] = 1
    result2d = evaluate.evaluate_field(zero_field((12, 7)), fixed_labels=fixed, moving_labels=fixed)
    assert result2d["dice_mean"] == 1.0 and result2d["hd95_mm"] == 0.0
    json.dumps(result2d)


def test_evaluate_field_needs_both_label_maps():
    with pytest.raises(ValueError, match="both"):
        evaluate.evaluate_field(zero_field((6, 6, 6)), fixed_labels=np.zeros((6, 6, 6), np.int32))


def test_l2r_jacobian_is_scipys_correlation_bit_for_bit():
    """The evaluator's derivatives are scipy correlations with [-0.5, 0, 0.5] (zero padding), cropped by
    2; dirio forms them from shifted slices and must give the same float64 values exactly."""
    from scipy import ndimage

    from dirio.core.fields import determinant_of_entries
    from dirio.evaluation.jacobian import jacobian_determinant_l2r

    rng = np.random.default_rng(3)
    for shape in ((9, 10, 11, 3), (12, 13, 2)):
        disp = rng.normal(scale=0.7, size=shape)
        ndim = shape[-1]
        crop = (slice(2, -2),) * ndim
        entries = [[ndimage.correlate1d(disp[..., c], np.array([-0.5, 0.0, 0.5]), axis=a, mode="constant",
                                        cval=0.0)[crop] + (1.0 if a == c else 0.0) for a in range(ndim)]
                   for c in range(ndim)]
        assert np.array_equal(jacobian_determinant_l2r(disp), determinant_of_entries(entries))
