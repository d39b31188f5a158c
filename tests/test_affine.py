"""Affine pre-alignment: the transform models, their geometry, world/ITK export, recovery of known
affines and the composition with the dense stage."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dirio.api import register
from dirio.core.fields import compose, identity_grid, resize_field, sample
from dirio.core.filters import gaussian_smooth
from dirio.methods.affine import AffineConfig, register_affine, world_matrix, write_itk_transform
from dirio.transforms.affine import AffineTransform, affine_displacement, compose_affine_field, parameter_count
from dirio.losses.similarity import make_similarity

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "elastix-lung-ct"


pytestmark = pytest.mark.usefixtures("one_thread")


def blob_object(shape, radius, seed=0):
    """Smooth random texture inside a soft ball of ``radius`` voxels (zero outside), about [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(1, 1, *shape, generator=generator)
    image = gaussian_smooth(noise, 2.0) + 0.5 * gaussian_smooth(noise, 1.0)
    image = (image - image.min()) / (image.max() - image.min())
    grid = identity_grid(shape).unsqueeze(0)
    centre = torch.tensor([(n - 1) / 2 for n in shape]).view(1, len(shape), *([1] * len(shape)))
    distance = ((grid - centre) ** 2).sum(1, keepdim=True).sqrt()
    return image * torch.sigmoid((radius - distance) / 1.5)


def rotation(axis_a, axis_b, degrees, ndim=3):
    """Rotation by ``degrees`` in the plane of two voxel axes."""
    t = math.radians(degrees)
    r = np.eye(ndim)
    r[axis_a, axis_a] = r[axis_b, axis_b] = math.cos(t)
    r[axis_a, axis_b], r[axis_b, axis_a] = -math.sin(t), math.sin(t)
    return r


def homogeneous(linear, shape, translation):
    """Voxel matrix of ``y = L (x - c) + c + t`` about the grid centre ``c``."""
    ndim = len(shape)
    centre = np.array([(n - 1) / 2 for n in shape])
    matrix = np.eye(ndim + 1)
    matrix[:ndim, :ndim] = linear
    matrix[:ndim, ndim] = centre + np.asarray(translation) - linear @ centre
    return matrix


def moving_from(fixed, matrix):
    """The moving image for which ``matrix`` (fixed voxel -> moving voxel) is the right answer:
    ``moving(y) = fixed(M^-1 y)``."""
    shape = fixed.shape[2:]
    inverse = torch.from_numpy(np.linalg.inv(matrix))
    coords = identity_grid(shape).unsqueeze(0) + affine_displacement(inverse, shape)
    return sample(fixed, coords, padding="zeros")


def mean_endpoint_error(a, b):
    return float((a - b).norm(dim=1).mean())


# --- geometry --------------------------------------------------------------------------------------


def test_parameter_counts_of_the_families():
    assert [parameter_count(f, 3) for f in ("translation", "rigid", "similarity", "affine")] == [3, 6, 7, 12]
    assert [parameter_count(f, 2) for f in ("translation", "rigid", "similarity", "affine")] == [2, 3, 4, 6]


def test_displacement_is_the_voxel_matrix_on_every_pyramid_level():
    """u(x) = A x + b - x on the full grid, and the level fields are the full field resampled
    (an affine field is linear, so trilinear resizing is exact)."""
    shape = (12, 10, 14)
    model = AffineTransform("affine", shape, spacing=(1.0, 1.5, 2.0))
    with torch.no_grad():
        model.param.copy_(torch.linspace(-2, 3, 12))
    matrix = model.voxel_matrix().detach().numpy()
    grid = identity_grid(shape, dtype=torch.float64).numpy()
    expected = np.einsum("ij,j...->i...", matrix[:3, :3] - np.eye(3), grid) + matrix[:3, 3].reshape(3, 1, 1, 1)
    full = model.displacement(shape).detach()
    assert np.allclose(full[0].numpy(), expected, atol=1e-4)
    half = model.displacement((6, 5, 7)).detach()
    assert torch.allclose(half, resize_field(full, (6, 5, 7)), atol=1e-4)


def test_rigid_model_is_a_rotation_in_millimetres_for_anisotropic_voxels():
    """With voxel size h, the physical linear part diag(h) A diag(h)^-1 is orthogonal with det 1."""
    spacing = (1.0, 2.5, 0.7)
    model = AffineTransform("rigid", (20, 16, 24), spacing=spacing)
    with torch.no_grad():
        model.param.copy_(torch.tensor([1.0, -2.0, 0.5, 3.0, -4.0, 2.0]))
    a = model.voxel_matrix().detach().numpy()[:3, :3]
    physical = np.diag(spacing) @ a @ np.diag(1 / np.array(spacing))
    assert np.allclose(physical @ physical.T, np.eye(3), atol=1e-6)
    assert np.linalg.det(physical) == pytest.approx(1.0, abs=1e-6)
    assert not np.allclose(a, np.eye(3), atol=1e-3)  # it does rotate


def test_affine_then_dense_composition_matches_the_interpolated_composition():
    """compose_affine_field(M, u) = u + a(x + u) equals field.compose(a, u) inside the grid."""
    shape = (16, 18, 20)
    matrix = torch.from_numpy(homogeneous(rotation(0, 2, 4.0) * 1.02, shape, (1.5, -2.0, 0.5)))
    u = 1.5 * torch.sin(identity_grid(shape).unsqueeze(0) / 3.0)
    exact = compose_affine_field(matrix, u)
    interpolated = compose(affine_displacement(matrix, shape), u)
    inside = (slice(None), slice(None), slice(4, -4), slice(4, -4), slice(4, -4))
    assert torch.allclose(exact[inside], interpolated[inside], atol=1e-4)


# --- recovery --------------------------------------------------------------------------------------


def test_known_3d_affine_is_recovered_to_subvoxel_accuracy():
    """Rotation about three axes (up to 8 degrees), scaling +-5 % and a 10-voxel translation:
    the recovered displacement is within 0.5 voxel of the truth on average over the grid."""
    shape = (40, 40, 40)
    fixed = blob_object(shape, radius=11)
    linear = rotation(0, 1, 8.0) @ rotation(1, 2, -6.0) @ rotation(0, 2, 5.0) @ np.diag([1.05, 0.95, 1.03])
    matrix = homogeneous(linear, shape, (6.0, -7.0, 4.0))
    assert np.linalg.norm([6.0, -7.0, 4.0]) >= 10.0
    moving = moving_from(fixed, matrix)
    truth = affine_displacement(torch.from_numpy(matrix), shape)
    config = AffineConfig(levels=(2, 1), iterations=(80, 40))
    result = register_affine(fixed, moving, make_similarity("mse"), "affine", config)
    assert mean_endpoint_error(result.displacement, truth) < 0.5
    assert np.abs(result.matrix[:3, :3] - linear).max() < 0.03


def test_rigid_2d_recovery_with_a_35_mm_offset_and_anisotropic_pixels():
    """Centre-of-mass initialisation brings a 35 mm (35-pixel) offset within reach; the rigid fit
    (in mm, pixels of 1 x 0.8 mm) then recovers the rotation and shift to well under a pixel."""
    shape = (128, 150)
    spacing = (1.0, 0.8)
    fixed = blob_object(shape, radius=22, seed=3)
    # Rotation of 9 degrees in mm about the grid centre, expressed in voxels: D^-1 R D.
    d = np.diag(spacing)
    linear = np.linalg.inv(d) @ rotation(0, 1, 9.0, ndim=2) @ d
    matrix = homogeneous(linear, shape, (35.0, -10.0))
    moving = moving_from(fixed, matrix)
    truth = affine_displacement(torch.from_numpy(matrix), shape)
    config = AffineConfig(levels=(4, 2), iterations=(100, 60))
    result = register_affine(fixed, moving, make_similarity("mse"), "rigid", config, spacing=spacing)
    assert mean_endpoint_error(result.displacement, truth) < 0.5


def test_register_writes_the_affine_as_the_whole_field_when_no_dense_iteration_runs():
    """register(affine=...) returns the voxel matrix, and with zero dense iterations the field is
    exactly that matrix's displacement; keep_stages records it as the 'affine' stage."""
    shape = (64, 72)
    fixed = blob_object(shape, radius=18)[0, 0].numpy()
    matrix = homogeneous(np.eye(2), shape, (5.0, -3.0))
    moving = moving_from(torch.from_numpy(fixed)[None, None], matrix)[0, 0].numpy()
    result = register(fixed, moving, affine="translation", similarity="mse", normalise="none", levels=(1,),
                      iterations=(0,), keep_stages=True, progress=False, device="cpu")
    assert result.affine_matrix.shape == (3, 3)
    assert np.allclose(result.affine_matrix[:2, 2], [5.0, -3.0], atol=0.1)
    expected = affine_displacement(torch.from_numpy(result.affine_matrix), shape)[0].permute(1, 2, 0).numpy()
    assert np.allclose(result.disp, expected, atol=1e-4)
    assert [s["stage"] for s in result.stages] == ["affine", "dense"]
    assert np.array_equal(result.stage_fields["affine"], result.stage_fields["dense"])


def test_dense_stage_refines_on_top_of_the_affine():
    """Affine + dense on a pair related by a rotation plus a smooth local warp ends closer to the
    truth than the affine alone (the written field is the composition)."""
    shape = (72, 72)
    fixed = blob_object(shape, radius=24, seed=1)
    matrix = homogeneous(rotation(0, 1, 6.0, ndim=2), shape, (4.0, 3.0))
    grid = identity_grid(shape).unsqueeze(0)
    local = 1.5 * torch.stack([torch.sin(grid[:, 1] / 6.0), torch.cos(grid[:, 0] / 7.0)], dim=1)
    truth = compose_affine_field(torch.from_numpy(matrix), local)
    moving = fixed.clone()
    # moving(x + truth(x)) = fixed(x): invert numerically by a fixed-point iteration on the grid.
    inverse = -truth
    for _ in range(30):
        inverse = -sample(truth, grid + inverse, padding="border")
    moving = sample(fixed, grid + inverse, padding="zeros")
    affine_only = register(fixed[0, 0].numpy(), moving[0, 0].numpy(), affine="affine", similarity="mse",
                           normalise="none", levels=(1,), iterations=(0,), progress=False, device="cpu")
    both = register(fixed[0, 0].numpy(), moving[0, 0].numpy(), affine="affine", similarity="mse",
                    normalise="none", levels=(2, 1), iterations=(60, 40), regularizers={"diffusion": 0.05},
                    progress=False, device="cpu")
    inside = (slice(12, -12), slice(12, -12))
    true_np = truth[0].permute(1, 2, 0).numpy()
    error_affine = np.linalg.norm(affine_only.disp - true_np, axis=-1)[inside].mean()
    error_both = np.linalg.norm(both.disp - true_np, axis=-1)[inside].mean()
    assert error_both < 0.6 * error_affine


# --- world coordinates and ITK ----------------------------------------------------------------------


def fixed_affine():
    """A voxel -> RAS affine with anisotropic spacing, a flipped axis and an offset origin."""
    affine = np.diag([-1.2, 0.9, 2.5, 1.0])
    affine[:3, 3] = [30.0, -12.0, 100.0]
    return affine


def test_world_matrix_maps_fixed_world_points_to_moving_world_points():
    matrix = homogeneous(rotation(0, 1, 5.0) * 1.01, (20, 22, 24), (2.0, -1.0, 3.0))
    affine = fixed_affine()
    world = world_matrix(matrix, affine)
    voxel = np.array([3.0, 7.0, 11.0, 1.0])
    assert np.allclose(world @ (affine @ voxel), affine @ (matrix @ voxel))


def test_itk_transform_file_resamples_like_the_affine_displacement(tmp_path):
    """SimpleITK.Resample(moving, fixed, transform read from the .tfm) equals warping the moving
    image with the affine displacement (ITK transforms map fixed to moving points, in LPS)."""
    sitk = pytest.importorskip("SimpleITK")
    from dirio.io.images import ras_affine_to_itk

    shape = (20, 22, 24)
    matrix = homogeneous(rotation(0, 2, 6.0) @ np.diag([1.03, 0.98, 1.0]), shape, (1.5, -2.0, 1.0))
    affine = fixed_affine()
    path = tmp_path / "affine.tfm"
    assert write_itk_transform(path, matrix, affine)
    moving = blob_object(shape, radius=8, seed=2)
    expected = sample(moving, identity_grid(shape).unsqueeze(0) + affine_displacement(torch.from_numpy(matrix), shape),
                      padding="zeros")[0, 0].numpy()

    spacing, origin, direction = ras_affine_to_itk(affine, 3)
    image = sitk.GetImageFromArray(moving[0, 0].numpy().transpose(2, 1, 0))  # ITK arrays are (k, j, i)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    resampled = sitk.Resample(image, image, sitk.ReadTransform(str(path)), sitk.sitkLinear, 0.0)
    got = sitk.GetArrayFromImage(resampled).transpose(2, 1, 0)
    inside = (slice(3, -3),) * 3
    assert np.abs(got[inside] - expected[inside]).max() < 1e-3


# --- the lung pair (real data) ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def lung_pair():
    if not (DATA / "baseline.nii.gz").exists():
        pytest.skip(f"lung data not found at {DATA} (../shared/data beside the repository)")
    from dirio.io.images import load_image, resample_to_grid

    fixed = load_image(DATA / "baseline.nii.gz")
    moving = load_image(DATA / "followup.nii.gz")
    fixed_mask = load_image(DATA / "baseline_mask.nii.gz", labels=True)
    moving_mask = resample_to_grid(load_image(DATA / "followup_mask.nii.gz", labels=True), fixed, labels=True)
    moving_on_fixed = resample_to_grid(moving, fixed)
    rows = np.genfromtxt(DATA / "landmarks_10pairs.csv", delimiter=",", names=True)
    fixed_points = np.stack([rows[f"baseline_{a}"] for a in "ijk"], axis=1)
    moving_points = np.stack([rows[f"followup_{a}"] for a in "ijk"], axis=1)
    mapped = np.c_[moving_points, np.ones(len(moving_points))] @ (np.linalg.inv(fixed.affine) @ moving.affine).T
    return fixed, moving_on_fixed, fixed_mask, moving_mask, fixed_points, mapped[:, :3]


def test_masked_affine_on_the_lung_pair_removes_the_35_mm_offset(lung_pair):
    """The follow-up scan resampled onto the baseline grid through the image headers is 35 mm away
    (landmark TRE); the masked affine stage (lung masks, MIND) brings the landmarks within 6 mm."""
    from dirio.evaluation.landmarks import tre

    fixed, moving, fixed_mask, moving_mask, fixed_points, moving_points = lung_pair
    every_second = (slice(None, None, 2),) * 3  # half resolution keeps the test fast
    spacing = [2 * h for h in fixed.spacing]
    result = register(fixed.data[every_second], moving.data[every_second], preset="lung-ct", affine="affine",
                      fixed_mask=fixed_mask.data[every_second], moving_mask=moving_mask.data[every_second],
                      spacing=spacing, levels=(2,), iterations=(0,), progress=False, device="cpu")
    before = tre(fixed_points / 2, moving_points / 2, np.zeros_like(result.disp), spacing).mean()
    after = tre(fixed_points / 2, moving_points / 2, result.disp, spacing).mean()
    assert before > 30.0
    assert after < 6.0


# --- command line --------------------------------------------------------------------------------------


def test_cli_writes_the_composed_field_and_the_affine_files(tmp_path):
    """`dirio register --affine translation --init convex` writes the affine JSON (voxel and world
    matrices), an ITK .tfm when SimpleITK is present, per-stage records in metrics.json, and a
    field that is the composition (with zero dense iterations: affine after the discrete step)."""
    import json

    from dirio.apps.cli import main
    from dirio.io.images import save_image
    from dirio.io.fields import load_field

    shape = (64, 72)
    fixed = blob_object(shape, radius=18, seed=4)[0, 0].numpy()
    matrix = homogeneous(np.eye(2), shape, (4.0, -3.0))
    moving = moving_from(torch.from_numpy(fixed)[None, None], matrix)[0, 0].numpy()
    affine = np.diag([0.8, 1.1, 1.0, 1.0])
    save_image(tmp_path / "fixed.nii.gz", fixed, affine)
    save_image(tmp_path / "moving.nii.gz", moving, affine)
    out = tmp_path / "out"
    code = main([
        "register", str(tmp_path / "fixed.nii.gz"), str(tmp_path / "moving.nii.gz"), "-o", str(out), "--ndim", "2",
        "--similarity", "mse", "--normalise", "none", "--affine", "translation", "--init", "convex",
        "--convex-spacing", "4", "--convex-radius", "2", "--levels", "1", "--iterations", "0", "-q", "--no-figure",
    ])
    assert code == 0
    record = json.loads((out / "affine_fixed_moving.json").read_text())
    voxel = np.array(record["voxel_matrix"])
    assert np.allclose(voxel[:2, 2], [4.0, -3.0], atol=0.15)
    assert np.allclose(np.array(record["world_ras"]), world_matrix(voxel, affine))
    metrics = json.loads((out / "metrics.json").read_text())
    assert [s["stage"] for s in metrics["stages"]] == ["affine", "convex", "dense"]
    disp = load_field(out / "disp_fixed_moving.nii.gz", ndim=2)
    # The discrete step after an exact translation finds (nearly) nothing left to do.
    expected = affine_displacement(torch.from_numpy(voxel), shape)[0].permute(1, 2, 0).numpy()
    assert np.abs(disp - expected)[8:-8, 8:-8].mean() < 0.3
    try:
        import SimpleITK  # noqa: F401
    except ImportError:
        return
    assert (out / "affine_fixed_moving.tfm").exists()
