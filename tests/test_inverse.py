"""Specification of the inverse of a field (:mod:`dirio.core.inverse`), the transforms' exact
inverses (``inverse_field``, :func:`dirio.transforms.base.invert_transform`), the API's inverse
(``register(..., inverse=True)``, ``invert_field``, ``apply_field(..., inverse=True)``) and the
command line's ``register --inverse`` / ``warp --inverse``.

Conventions: a field ``u`` maps a fixed-grid point ``x`` to ``x + u(x)``; its inverse ``v`` maps
``y`` back to ``y + v(y)``, so ``v(y) + u(y + v(y)) = 0`` (the residual) and
``u(x) + v(x + u(x)) = 0`` (the inverse consistency).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from cli_helpers import run_cli
from dirio.api import apply_field, invert_field, register
from dirio.core.context import LevelContext
from dirio.core.fields import identity_grid, integrate_velocity
from dirio.core.inverse import (
    field_statistics,
    inverse_consistency,
    inverse_consistency_summary,
    inverse_residual,
    invert_displacement,
    invert_velocity,
    quantile,
)
from dirio.testing.synthetic import smooth_random_field, warped_pair
from dirio.transforms.affine import AffineThenDense
from dirio.transforms.base import TransformModule, invert_transform
from dirio.transforms.composed import ComposedDisplacement
from dirio.transforms.dense import DenseDisplacement, StationaryVelocity, smooth_parameters

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (20, 24, 18)


def _interior(tensor: torch.Tensor, margin: int = 4) -> torch.Tensor:
    """The voxels at least ``margin`` from every border of a ``(B, *S)`` or ``(B, C, *S)`` tensor."""
    spatial = tensor.dim() - 3
    index = [slice(None)] * spatial + [slice(margin, -margin)] * 3
    return tensor[tuple(index)]


def _context(shape=SHAPE) -> LevelContext:
    image = torch.zeros(1, 1, *shape)
    return LevelContext(level=0, shape=tuple(shape), full_shape=tuple(shape), fixed=image, moving=image)


# --- the fixed-point inverse ---------------------------------------------------------------------


def test_the_inverse_of_a_translation_is_the_opposite_translation_everywhere():
    shift = torch.tensor([1.5, -0.75, 2.0]).view(1, 3, 1, 1, 1)
    disp = shift.expand(1, 3, *SHAPE).contiguous()
    found = invert_displacement(disp)
    torch.testing.assert_close(found.field, -disp.expand_as(found.field), rtol=0, atol=1e-6)
    assert float(found.residual.max()) < 1e-6
    assert found.iterations <= 2 and found.method == "newton"


def test_the_inverse_of_a_linear_map_is_the_inverse_matrix_inside_the_grid():
    """u(x) = (M - I)(x - c): x -> c + M (x - c), whose inverse is y -> c + M^-1 (y - c)."""
    matrix = torch.tensor([[1.06, 0.03, 0.0], [-0.02, 0.95, 0.04], [0.0, 0.05, 1.03]], dtype=torch.float64)
    centre = torch.tensor([(n - 1) / 2 for n in SHAPE], dtype=torch.float64).view(3, 1, 1, 1)
    grid = identity_grid(SHAPE, dtype=torch.float64) - centre
    disp = (torch.einsum("ij,j...->i...", matrix - torch.eye(3, dtype=torch.float64), grid))[None].float()
    expected = torch.einsum("ij,j...->i...", torch.linalg.inv(matrix) - torch.eye(3, dtype=torch.float64), grid)
    found = invert_displacement(disp, iterations=60, tolerance=1e-6)
    # Linear interpolation of a linear field is exact; near the border points leave the grid.
    torch.testing.assert_close(_interior(found.field), _interior(expected[None].float()), rtol=0, atol=1e-4)


def test_round_trip_of_a_smooth_known_warp_is_within_a_tenth_of_a_voxel():
    """The acceptance check: forward then inverse returns within 0.1 voxel on average."""
    disp = smooth_random_field(SHAPE, sigma=5.0, max_displacement=3.0, seed=4)
    found = invert_displacement(disp)
    round_trip = inverse_consistency(disp, found.field)
    assert float(round_trip.mean()) < 0.1
    assert float(found.residual.mean()) < 1e-3
    summary = found.summary()
    assert summary["residual_voxels_max"] == pytest.approx(float(found.residual.max()))
    assert summary["iterations"] == found.iterations < 30  # stopped by the tolerance


def test_two_dimensional_fields_are_inverted_too():
    disp = smooth_random_field((40, 36), sigma=5.0, max_displacement=3.0, seed=8)
    for newton in (True, False):
        found = invert_displacement(disp, newton=newton)
        assert found.field.shape == disp.shape and found.residual.shape == (1, 40, 36)
        assert float(found.residual.mean()) < 1e-3
        assert float(inverse_consistency(disp, found.field).mean()) < 0.1


def test_a_folding_field_is_reported_not_hidden():
    """u_i = 3 sin(2 pi i / 10) has slopes up to 1.9: the map folds, so no inverse exists. Newton
    finds a preimage for every point (a small residual: one branch of the fold), but the round trip
    forward then inverse says that it is no inverse; the plain fixed-point iteration does not
    converge and its residual says so too."""
    grid = identity_grid(SHAPE)
    disp = torch.zeros(1, 3, *SHAPE)
    disp[0, 0] = 3.0 * torch.sin(2 * math.pi * grid[0] / 10.0)
    found = invert_displacement(disp, iterations=10)
    assert float(inverse_consistency(disp, found.field).mean()) > 1.0
    plain = invert_displacement(disp, iterations=10, newton=False)
    assert plain.iterations == 10 and plain.method == "fixed-point"
    assert float(plain.residual.mean()) > 1.0
    assert float(inverse_consistency(disp, plain.field).mean()) > 1.0


def test_newton_steps_converge_where_a_strong_compression_slows_the_fixed_point_iteration():
    """x -> c + M (x - c) with M = diag(0.3, 1.4, 1): the fixed-point error shrinks by |M - I| = 0.7
    per step; Newton's is exact for a linear map once its steps (at most 1 voxel each) got there."""
    matrix = torch.diag(torch.tensor([0.3, 1.4, 1.0], dtype=torch.float64))
    centre = torch.tensor([(n - 1) / 2 for n in SHAPE], dtype=torch.float64).view(3, 1, 1, 1)
    grid = identity_grid(SHAPE, dtype=torch.float64) - centre
    disp = torch.einsum("ij,j...->i...", matrix - torch.eye(3, dtype=torch.float64), grid)[None].float()
    expected = torch.einsum("ij,j...->i...", torch.linalg.inv(matrix) - torch.eye(3, dtype=torch.float64), grid)
    newton = invert_displacement(disp, iterations=8, tolerance=0.0)
    plain = invert_displacement(disp, iterations=8, tolerance=0.0, newton=False)
    # points whose preimage lies inside the grid (|y - c| <= 1.5 along the compressed axis)
    inside = (slice(None), slice(None), slice(8, 12), slice(8, -8), slice(6, -6))
    newton_error = (newton.field - expected[None].float())[inside].abs().max()
    plain_error = (plain.field - expected[None].float())[inside].abs().max()
    assert float(newton_error) < 1e-3 < 0.1 < float(plain_error)


def test_a_few_voxels_that_cannot_converge_do_not_run_the_iteration_to_its_limit():
    """A smooth warp with a fold in one slab (2 of 20 slices): the rest converges within a few
    iterations; allowing 15 % of the voxels to stay unconverged stops there, allowing none does not."""
    disp = smooth_random_field(SHAPE, sigma=5.0, max_displacement=2.0, seed=4)
    grid = identity_grid(SHAPE)
    slab = (grid[0] >= 9) & (grid[0] <= 10)
    disp[0, 1] = torch.where(slab, 4.0 * torch.sin(2 * math.pi * grid[1] / 6.0), disp[0, 1])
    strict = invert_displacement(disp, iterations=25, unconverged_fraction=0.0)
    lenient = invert_displacement(disp, iterations=25, unconverged_fraction=0.15)
    assert strict.iterations == 25 and lenient.iterations < 15
    assert float(lenient.residual[(grid[0] < 7).unsqueeze(0)].mean()) < 1e-3
    assert float(lenient.residual.max()) > 0.5  # the fold is still visible in the residual
    with pytest.raises(ValueError, match="unconverged_fraction"):
        invert_displacement(disp, unconverged_fraction=1.0)


def test_the_residual_is_zero_for_an_exact_inverse_and_the_error_otherwise():
    shift = torch.tensor([1.0, 2.0, 0.0]).view(1, 3, 1, 1, 1).expand(1, 3, *SHAPE)
    assert float(inverse_residual(shift, -shift).max()) == 0.0
    # with v = 0 the residual is |u| = sqrt(5) everywhere
    torch.testing.assert_close(inverse_residual(shift, torch.zeros_like(shift)),
                               torch.full((1, *SHAPE), math.sqrt(5.0)))


def test_inverse_consistency_is_in_millimetres():
    shift = torch.tensor([1.0, 2.0, 0.0]).view(1, 3, 1, 1, 1).expand(1, 3, *SHAPE)
    assert float(inverse_consistency(shift, -shift, (2.0, 1.0, 3.0)).max()) == 0.0
    error = inverse_consistency(shift, torch.zeros_like(shift), (2.0, 1.0, 3.0))
    torch.testing.assert_close(error, torch.full((1, *SHAPE), math.sqrt(2.0**2 + 2.0**2)))
    summary = inverse_consistency_summary(shift, torch.zeros_like(shift), (2.0, 1.0, 3.0))
    assert summary["inverse_consistency_mm_mean"] == pytest.approx(math.sqrt(8.0))
    assert summary["inverse_consistency_mm_p95"] == pytest.approx(math.sqrt(8.0))


@pytest.mark.parametrize("q", [0.0, 0.3, 0.95, 1.0])
def test_quantile_is_numpys_linear_percentile(q):
    values = torch.from_numpy(np.random.default_rng(1).standard_normal(1001))
    assert float(quantile(values, q)) == pytest.approx(float(np.percentile(values.numpy(), 100 * q)), abs=1e-12)
    stats = field_statistics(values.float())
    assert stats["p95"] == pytest.approx(float(np.percentile(values.numpy(), 95)), abs=1e-6)


def test_bad_arguments_are_refused():
    disp = torch.zeros(1, 3, *SHAPE)
    with pytest.raises(ValueError, match="iterations"):
        invert_displacement(disp, iterations=0)
    with pytest.raises(ValueError, match="shape"):
        invert_displacement(torch.zeros(3, *SHAPE))
    with pytest.raises(ValueError, match="differ"):
        inverse_residual(disp, torch.zeros(1, 3, 4, 4, 4))


# --- velocity fields: the exact inverse ----------------------------------------------------------


def test_the_negated_velocity_inverts_the_flow():
    velocity = smooth_random_field(SHAPE, sigma=5.0, max_displacement=3.0, seed=2)
    forward = integrate_velocity(velocity)
    inverse = invert_velocity(velocity)
    torch.testing.assert_close(inverse, integrate_velocity(-velocity))
    assert float(inverse_consistency(forward, inverse).mean()) < 0.1
    assert float(inverse_residual(forward, inverse).mean()) < 0.1


def test_a_velocity_transform_gives_its_exact_inverse_and_a_displacement_field_the_fixed_point_one():
    init = smooth_random_field(SHAPE, sigma=5.0, max_displacement=3.0, seed=3)
    ctx = _context()
    velocity = StationaryVelocity(SHAPE, init=init, smoothing=2, steps=6)
    found = invert_transform(velocity, ctx)
    assert found.method == "exact" and found.iterations == 0
    exact = integrate_velocity(-smooth_parameters(velocity.param.detach(), 2), 6)  # same grid: no resampling
    torch.testing.assert_close(found.field, exact)
    assert float(inverse_consistency(velocity.field(ctx).detach(), found.field).mean()) < 0.1

    dense = DenseDisplacement(SHAPE, init=init, smoothing=2)
    found = invert_transform(dense, ctx)
    assert found.method == "newton" and float(found.residual.mean()) < 1e-3
    torch.testing.assert_close(found.field, invert_displacement(dense.field(ctx).detach()).field)


def test_the_default_hook_says_no_exact_inverse_and_composed_fields_fall_back():
    ctx = _context()
    assert TransformModule().inverse_field(ctx) is None
    composed = ComposedDisplacement(DenseDisplacement(None), compose_every=2,
                                    init=smooth_random_field(SHAPE, sigma=5.0, max_displacement=2.0, seed=5))
    composed.start_level(ctx)
    found = invert_transform(composed, ctx)
    assert found.method == "newton" and float(found.residual.mean()) < 1e-3


def test_an_affine_then_velocity_transform_inverts_both_exactly():
    """x -> A(x + u(x)) inverts to y -> z + w(z) with z = A^-1 y and w the velocity's inverse."""
    ctx = _context()
    velocity = StationaryVelocity(SHAPE, init=smooth_random_field(SHAPE, sigma=5.0, max_displacement=2.0, seed=6))
    matrix = torch.eye(4, dtype=torch.float64)
    matrix[:3, :3] += torch.tensor([[0.04, 0.02, 0.0], [-0.03, 0.02, 0.0], [0.0, 0.01, -0.03]], dtype=torch.float64)
    matrix[:3, 3] = torch.tensor([1.0, -0.5, 0.5], dtype=torch.float64)
    transform = AffineThenDense(velocity, matrix, SHAPE)
    found = invert_transform(transform, ctx)
    assert found.method == "exact"
    forward = transform.field(ctx).detach()
    assert float(_interior(inverse_consistency(forward, found.field)).mean()) < 0.1
    assert float(_interior(found.residual).mean()) < 0.1
    # the residual's inverse alone would be wrong by about the affine's displacement
    wrong = velocity.inverse_field(ctx)
    assert float(_interior(inverse_residual(forward, wrong)).mean()) > 0.5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_every_inverse_tensor_stays_on_the_cuda_device():
    device = torch.device("cuda")
    disp = smooth_random_field(SHAPE, sigma=5.0, max_displacement=3.0, seed=4).to(device)
    found = invert_displacement(disp)
    assert found.field.device.type == "cuda" and found.residual.device.type == "cuda"
    assert inverse_consistency(disp, found.field, (1.0, 2.0, 3.0)).device.type == "cuda"
    assert quantile(found.residual, 0.95).device.type == "cuda"
    velocity = StationaryVelocity(SHAPE, init=disp, device=device)
    assert velocity.inverse_field(_context()).device.type == "cuda"
    cpu = invert_displacement(disp.cpu())
    torch.testing.assert_close(found.field.cpu(), cpu.field, rtol=0, atol=1e-4)


# --- the API ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair():
    rng = np.random.default_rng(0)
    image = gaussian_filter(rng.random(SHAPE), 2.0).astype(np.float32)
    return warped_pair(image, sigma=5.0, max_displacement=2.0, seed=3)


FAST = {"levels": (2, 1), "iterations": (8, 4), "progress": False}


def test_register_with_inverse_returns_the_exact_inverse_of_a_velocity_field(pair):
    result = register(pair.fixed, pair.moving, diffeomorphic=True, inverse=True, spacing=(1.0, 1.0, 2.0), **FAST)
    record = result.inverse
    assert record["method"] == "exact"
    assert result.inverse_disp.shape == result.disp.shape and result.inverse_disp.dtype == np.float32
    forward = torch.from_numpy(np.moveaxis(result.disp, -1, 0))[None]
    inverse = torch.from_numpy(np.moveaxis(result.inverse_disp, -1, 0))[None]
    summary = inverse_consistency_summary(forward, inverse, (1.0, 1.0, 2.0))
    assert record["inverse_consistency_mm_mean"] == pytest.approx(summary["inverse_consistency_mm_mean"], rel=1e-5)
    assert record["inverse_consistency_mm_mean"] < 0.1
    assert record["residual_voxels_mean"] < 0.1
    assert result.inverse_field() is result.inverse_disp  # already computed: returned as it is


def test_register_without_inverse_computes_the_fixed_point_inverse_on_request(pair):
    result = register(pair.fixed, pair.moving, **FAST)
    assert result.inverse_disp is None and result.inverse is None
    inverse = result.inverse_field()
    expected, record = invert_field(result.disp)
    np.testing.assert_array_equal(inverse, expected)
    assert result.inverse["method"] == "newton" == record["method"]
    assert result.inverse["residual_voxels_mean"] < 1e-3
    eager = register(pair.fixed, pair.moving, inverse=True, **FAST)
    np.testing.assert_array_equal(eager.inverse_disp, inverse)


def test_apply_field_with_inverse_brings_a_warped_image_back():
    """warp(moving, u) is moving in the fixed space; warping that by the inverse of u gives moving back."""
    rng = np.random.default_rng(1)
    image = gaussian_filter(rng.random(SHAPE), 3.0).astype(np.float32)
    disp = np.moveaxis(smooth_random_field(SHAPE, sigma=5.0, max_displacement=2.0, seed=7)[0].numpy(), 0, -1)
    there = apply_field(image, disp)
    back = apply_field(there, disp, inverse=True)
    inverse, _ = invert_field(disp)
    np.testing.assert_array_equal(back, apply_field(there, inverse))
    error = np.abs(back - image)[4:-4, 4:-4, 4:-4]
    assert error.mean() < 0.02 * (image.max() - image.min())
    assert error.mean() < 0.25 * np.abs(there - image)[4:-4, 4:-4, 4:-4].mean()


# --- the command line ------------------------------------------------------------------------------


AFFINE = np.diag([1.5, 1.2, 2.0, 1.0])
AFFINE[:3, 3] = (-20.0, 10.0, 5.0)
QUICK = ["--levels", "2,1", "--iterations", "6,3", "-q", "--no-figure"]


@pytest.fixture(scope="module")
def files(tmp_path_factory, pair):
    directory = tmp_path_factory.mktemp("inverse")
    paths = {}
    for name, array in (("fixed", pair.fixed), ("moving", pair.moving)):
        paths[name] = directory / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(array, AFFINE), str(paths[name]))
    return paths


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def test_register_inverse_writes_the_inverse_field_on_the_moving_grid_and_its_record(files, tmp_path):
    out = tmp_path / "out"
    result = run_cli(["register", files["fixed"], files["moving"], "-o", out, "--inverse", "--itk-field", *QUICK])
    assert result.rc == 0, result.err
    inverse_file = out / "inverse_disp_fixed_moving.nii.gz"
    image = nib.load(str(inverse_file))
    np.testing.assert_allclose(image.affine, AFFINE)
    inverse = np.asarray(image.dataobj)
    disp = np.asarray(nib.load(str(out / "disp_fixed_moving.nii.gz")).dataobj)
    assert inverse.shape == disp.shape
    np.testing.assert_allclose(inverse, invert_field(disp)[0], atol=1e-5)  # default: a displacement field
    metrics = _metrics(out)
    record = metrics["inverse"]
    assert record["method"] == "newton" and record["residual_voxels_mean"] < 1e-3
    assert 0 <= record["inverse_consistency_mm_mean"] <= record["inverse_consistency_mm_max"]
    assert metrics["outputs"]["inverse_disp"] == str(inverse_file)
    assert set(metrics["sha256"]) >= {"inverse_disp", "itk_inverse_field"}
    assert (out / "itk_inverse_disp_fixed_moving.nii.gz").is_file()


def test_the_summary_line_reports_the_inverse_consistency(files, tmp_path):
    quiet = [a for a in QUICK if a != "-q"]
    result = run_cli(["register", files["fixed"], files["moving"], "-o", tmp_path / "out", "--inverse", *quiet])
    assert result.rc == 0, result.err
    mean = _metrics(tmp_path / "out")["inverse"]["inverse_consistency_mm_mean"]
    assert f"inverse consistency {mean:.3f} mm" in result.out


def test_register_inverse_with_a_velocity_field_is_exact_and_the_figure_says_so(files, tmp_path):
    out = tmp_path / "out"
    quick = [a for a in QUICK if a != "--no-figure"]
    result = run_cli(["register", files["fixed"], files["moving"], "-o", out, "--inverse", "--diffeomorphic", *quick])
    assert result.rc == 0, result.err
    assert _metrics(out)["inverse"]["method"] == "exact"
    assert (out / "report_fixed_moving.png").is_file()


def test_figure_notes_state_the_inverse_consistency():
    from dirio.apps.workflow import figure_notes

    class Result:
        stages = [{"stage": "dense"}]
        inverse = {"method": "exact", "inverse_consistency_mm_mean": 0.0123, "inverse_consistency_mm_p95": 0.0456,
                   "residual_voxels_mean": 0.001}

    (line,) = figure_notes(Result())
    assert "0.012 mm" in line and "p95 0.046 mm" in line and "exact" in line
    Result.inverse = None
    assert figure_notes(Result()) == []


def test_register_inverse_refuses_a_moving_image_on_another_grid(files, tmp_path):
    other = tmp_path / "other.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((16, 20, 14), np.float32), AFFINE), str(other))
    out = tmp_path / "out"
    result = run_cli(["register", files["fixed"], other, "-o", out, "--inverse", "--resample", *QUICK])
    assert result.rc == 2
    assert result.err.count("\n") == 1 and "--inverse needs the moving image on the fixed grid" in result.err
    assert "other.nii.gz" in result.err
    assert not out.exists() or not any(out.iterdir())


def test_warp_inverse_warps_a_fixed_grid_image_into_the_moving_space(files, pair, tmp_path):
    disp = np.moveaxis(smooth_random_field(SHAPE, sigma=5.0, max_displacement=2.0, seed=7)[0].numpy(), 0, -1)
    field = tmp_path / "disp.nii.gz"
    nib.save(nib.Nifti1Image(disp, AFFINE), str(field))
    out = tmp_path / "back.nii.gz"
    result = run_cli(["warp", files["fixed"], field, "-o", out, "--inverse"])
    assert result.rc == 0, result.err
    assert "residual" in result.out
    warped = np.asarray(nib.load(str(out)).dataobj)
    np.testing.assert_allclose(warped, apply_field(pair.fixed, disp, inverse=True), atol=1e-5)
    # the same as warping by the inverse field file without --inverse
    inverse_file = tmp_path / "inverse_disp.nii.gz"
    nib.save(nib.Nifti1Image(invert_field(disp)[0], AFFINE), str(inverse_file))
    plain = tmp_path / "plain.nii.gz"
    assert run_cli(["warp", files["fixed"], inverse_file, "-o", plain]).rc == 0
    np.testing.assert_allclose(np.asarray(nib.load(str(plain)).dataobj), warped, atol=1e-5)
