"""Specification of point mapping (:mod:`dirio.core.points`), point files and their coordinate
conventions (:mod:`dirio.io.points`) and ``dirio transform-points`` (:mod:`dirio.apps.transform_points`).

A field ``u`` maps a fixed-grid point ``x`` to the moving-grid point ``x + u(x)``; ``--inverse``
maps moving-grid points back. The TRE of ``dirio evaluate`` is ``|(x + u(x) - p_moving) * spacing|``
with ``u`` sampled the same way, so mapping the fixed keypoints and measuring against the moving
ones must give the same numbers.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from cli_helpers import run_cli
from dirio.core.fields import warp
from dirio.core.points import displace_points, invert_points, sample_displacement
from dirio.errors import DirioError
from dirio.io.points import PointSet, from_voxels, load_points, ras_lps, save_points, to_voxels
from dirio.testing.synthetic import oblique_affine, smooth_random_field

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (22, 26, 20)
# voxel -> RAS: a 10 degree rotation, anisotropic spacing (1.5, 1.2, 2.0) mm and an offset
SPACING = (1.5, 1.2, 2.0)
AFFINE = oblique_affine(10.0, SPACING, (-20.0, 10.0, 5.0))


def _field(seed: int = 1, max_displacement: float = 2.5) -> np.ndarray:
    return np.moveaxis(smooth_random_field(SHAPE, sigma=5.0, max_displacement=max_displacement, seed=seed)[0].numpy(), 0, -1)


def _interior_points(count: int = 30, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(3.0, np.asarray(SHAPE) - 4.0, size=(count, 3))


# --- mapping ---------------------------------------------------------------------------------------


def test_a_translation_moves_every_point_by_it_both_ways():
    shift = np.array([1.25, -2.0, 0.5])
    disp = np.broadcast_to(shift, (*SHAPE, 3)).astype(np.float32)
    points = _interior_points()
    np.testing.assert_allclose(displace_points(points, disp), points + shift, atol=1e-6)
    back = invert_points(points, disp)
    np.testing.assert_allclose(back.points, points - shift, atol=1e-6)
    assert back.residual.max() < 1e-6


@pytest.mark.parametrize("order", [1, 3])
def test_sampling_is_scipys_map_coordinates_with_prefiltering(order):
    disp = _field()
    points = _interior_points()
    expected = np.stack([ndimage.map_coordinates(disp[..., d].astype(np.float64), points.T, order=order,
                                                 mode="constant") for d in range(3)], axis=1)
    np.testing.assert_array_equal(sample_displacement(disp, points, order), expected)


@pytest.mark.parametrize("order", [1, 3])
def test_forward_then_inverse_returns_every_point(order):
    disp = _field(max_displacement=3.0)
    points = _interior_points()
    moved = displace_points(points, disp, order)
    back = invert_points(moved, disp, order)
    np.testing.assert_allclose(back.points, points, atol=1e-5)
    assert back.residual.max() < 1e-5


def test_a_point_in_a_fold_keeps_a_large_residual():
    """u_i = 3 sin(2 pi i / 10): x -> x + u(x) folds; y = 4 has several preimages and the iteration none."""
    i = np.arange(SHAPE[0], dtype=np.float64)
    disp = np.zeros((*SHAPE, 3), np.float32)
    disp[..., 0] = (3.0 * np.sin(2 * np.pi * i / 10.0))[:, None, None]
    back = invert_points(np.array([[4.0, 10.0, 10.0]]), disp, order=1, iterations=50)
    assert back.iterations == 50 and back.residual[0] > 0.5


def test_the_centroid_of_a_warped_blob_lands_where_the_mapped_point_says():
    """A ball with centroid c in the moving image, pulled into the fixed space by a smooth u, is
    centred at the x with x + u(x) = c (to first order over the ball): the inverse maps c there and
    the forward map brings that centroid back to c."""
    disp = np.moveaxis(smooth_random_field(SHAPE, sigma=12.0, max_displacement=3.0, seed=3)[0].numpy(), 0, -1)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), axis=-1)
    ball = (np.linalg.norm(grid - np.array([10.3, 12.6, 9.4]), axis=-1) <= 4.0).astype(np.int64)
    centre = np.argwhere(ball == 1).mean(axis=0)
    warped = warp(torch.from_numpy(ball)[None, None], torch.from_numpy(np.moveaxis(disp, -1, 0))[None])[0, 0].numpy()
    centroid = np.argwhere(warped == 1).mean(axis=0)
    assert np.linalg.norm(centroid - centre) > 1.5  # the field moved the blob
    assert np.linalg.norm(invert_points(centre[None], disp).points[0] - centroid) < 0.15
    assert np.linalg.norm(displace_points(centroid[None], disp)[0] - centre) < 0.15


# --- files and coordinate spaces -------------------------------------------------------------------


def test_voxel_ras_and_lps_conversions_by_hand():
    affine = np.diag([2.0, 3.0, 4.0, 1.0])
    affine[:3, 3] = (10.0, 20.0, 30.0)
    voxel = np.array([[1.0, 2.0, 3.0]])
    np.testing.assert_allclose(from_voxels(voxel, affine, "ras"), [[12.0, 26.0, 42.0]])
    np.testing.assert_allclose(from_voxels(voxel, affine, "lps"), [[-12.0, -26.0, 42.0]])
    np.testing.assert_allclose(to_voxels(PointSet(np.array([[-12.0, -26.0, 42.0]]), "lps"), affine), voxel)
    np.testing.assert_allclose(ras_lps(ras_lps(voxel)), voxel)
    points = _interior_points()
    for space in ("voxel", "ras", "lps"):
        np.testing.assert_allclose(to_voxels(PointSet(from_voxels(points, AFFINE, space), space), AFFINE), points,
                                   atol=1e-9)


@pytest.mark.parametrize("name,space", [("p.csv", "voxel"), ("p.csv", "ras"), ("p.fcsv", "lps"), ("p.fcsv", "ras"),
                                        ("p.mrk.json", "lps"), ("p.mrk.json", "ras")])
def test_every_format_reads_back_what_it_wrote(tmp_path, name, space):
    points = np.array([[1.5, -2.25, 3.0], [0.1, 0.2, 0.3]])
    labels = None if name.endswith(".csv") else ["A", "B, with a comma"]
    save_points(tmp_path / name, PointSet(points, space, labels))
    read = load_points(tmp_path / name, space=space if name.endswith(".csv") else None)
    np.testing.assert_array_equal(read.points, points)
    assert read.space == space and read.labels == labels


def test_slicer_fcsv_states_its_coordinate_system_also_in_old_numeric_codes(tmp_path):
    body = "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n" \
           "vtkMRMLMarkupsFiducialNode_0,1.29,-40.18,60.15,0,0,0,1,1,1,0,F-1,,\n"
    cases = {"# CoordinateSystem = LPS\n": "lps", "# CoordinateSystem = RAS\n": "ras",
             "# CoordinateSystem = 1\n": "lps", "# CoordinateSystem = 0\n": "ras", "": "ras"}
    for index, (line, space) in enumerate(cases.items()):
        path = tmp_path / f"f{index}.fcsv"
        path.write_text("# Markups fiducial file version = 4.11\n" + line + body)
        read = load_points(path)
        assert read.space == space, line
        np.testing.assert_array_equal(read.points, [[1.29, -40.18, 60.15]])
        assert read.labels == ["F-1"]


def test_slicer_markups_json_as_in_slicers_documentation(tmp_path):
    path = tmp_path / "example.mrk.json"
    path.write_text(json.dumps({"@schema": "markups-schema-v1.0.0.json#", "markups": [
        {"type": "Fiducial", "coordinateSystem": "LPS", "controlPoints": [
            {"label": "F-1", "position": [-53.38, -73.33, 0.0]}, {"label": "F-2", "position": [49.86, -88.58, 0.0]}]}]}))
    read = load_points(path)
    assert read.space == "lps" and read.labels == ["F-1", "F-2"]
    np.testing.assert_array_equal(read.points, [[-53.38, -73.33, 0.0], [49.86, -88.58, 0.0]])


@pytest.mark.parametrize("name,content,message", [
    ("p.fcsv", "# CoordinateSystem = XYZ\n1,2,3,4\n", "unknown coordinate system"),
    ("p.fcsv", "# CoordinateSystem = LPS\n", "no points"),
    ("p.fcsv", "# CoordinateSystem = LPS\nid0,1,zz,3\n", "not a number"),
    ("p.mrk.json", '{"markups": [{"coordinateSystem": "IJK", "controlPoints": []}]}', "coordinateSystem"),
    ("p.mrk.json", '{"markups": [{"coordinateUnits": "um", "controlPoints": []}]}', "coordinateUnits"),
    ("p.mrk.json", '{"markups": [{"controlPoints": [{"positionStatus": "missing"}]}]}', "no position"),
    ("p.mrk.json", "{not json", "not valid JSON"),
    ("p.txt", "1,2,3\n", "point files are"),
])
def test_malformed_point_files_are_one_line_errors_naming_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DirioError, match=message) as error:
        load_points(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_markups_in_voxel_coordinates_are_refused(tmp_path):
    with pytest.raises(DirioError, match="world coordinates"):
        save_points(tmp_path / "p.fcsv", PointSet(np.zeros((1, 3)), "voxel"))
    save_points(tmp_path / "p.fcsv", PointSet(np.zeros((1, 3)), "lps"))
    with pytest.raises(DirioError, match="states its points in LPS"):
        load_points(tmp_path / "p.fcsv", space="ras")


# --- the command line ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A fixed image, a known field and corresponding keypoints (the moving ones off the field by noise)."""
    directory = tmp_path_factory.mktemp("points")
    disp = _field(seed=2, max_displacement=2.5)
    fixed_points = _interior_points(25, seed=4)
    moving_points = displace_points(fixed_points, disp) + np.random.default_rng(5).normal(0, 0.7, fixed_points.shape)
    paths = {"dir": directory, "disp": disp, "fixed_points": fixed_points, "moving_points": moving_points}
    nib.save(nib.Nifti1Image(disp, AFFINE), str(directory / "disp.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.float32), AFFINE), str(directory / "fixed.nii.gz"))
    for name in ("fixed_points", "moving_points"):
        np.savetxt(directory / f"{name}.csv", paths[name], delimiter=",", fmt="%.10f")
    return paths


def _evaluate_tre(case, order: int) -> np.ndarray:
    d = case["dir"]
    result = run_cli(["evaluate", d / "disp.nii.gz", d / "fixed.nii.gz", "--fixed-keypoints", d / "fixed_points.csv",
                      "--moving-keypoints", d / "moving_points.csv", "--tre-order", order])
    assert result.rc == 0, result.err
    return np.asarray(json.loads(result.out)["tre_mm"])


@pytest.mark.parametrize("order", [1, 3])
def test_mapped_points_give_the_tre_of_dirio_evaluate_to_1e4_mm(case, tmp_path, order):
    d = case["dir"]
    moving = np.loadtxt(d / "moving_points.csv", delimiter=",")
    tre = _evaluate_tre(case, order)
    # voxel output: the error vector times the spacing
    out = tmp_path / "mapped.csv"
    result = run_cli(["transform-points", d / "fixed_points.csv", d / "disp.nii.gz", "-o", out, "--order", order])
    assert result.rc == 0, result.err
    assert "25 points mapped fixed -> moving (voxel -> voxel)" in result.out
    mapped = np.loadtxt(out, delimiter=",")
    np.testing.assert_allclose(np.linalg.norm((mapped - moving) * SPACING, axis=1), tre, rtol=0, atol=1e-4)
    # world output (the affine is a rotation times the spacing): plain distances in mm
    out_lps = tmp_path / "mapped_lps.csv"
    assert run_cli(["transform-points", d / "fixed_points.csv", d / "disp.nii.gz", "-o", out_lps, "--order", order,
                    "--output-space", "lps"]).rc == 0
    moving_lps = from_voxels(moving, AFFINE, "lps")
    np.testing.assert_allclose(np.linalg.norm(np.loadtxt(out_lps, delimiter=",") - moving_lps, axis=1), tre,
                               rtol=0, atol=1e-4)


def test_forward_then_inverse_on_the_command_line_returns_the_points(case, tmp_path):
    d = case["dir"]
    there, back = tmp_path / "there.csv", tmp_path / "back.csv"
    assert run_cli(["transform-points", d / "fixed_points.csv", d / "disp.nii.gz", "-o", there]).rc == 0
    result = run_cli(["transform-points", there, d / "disp.nii.gz", "-o", back, "--inverse"])
    assert result.rc == 0, result.err
    assert "moving -> fixed" in result.out and "largest residual" in result.out
    np.testing.assert_allclose(np.loadtxt(back, delimiter=","), case["fixed_points"], atol=1e-4)


def test_slicer_markups_in_and_out_keep_labels_and_state_the_system(case, tmp_path):
    d = case["dir"]
    ras = from_voxels(case["fixed_points"], AFFINE, "ras")
    source = tmp_path / "landmarks.fcsv"
    save_points(source, PointSet(ras, "ras", [f"L{i}" for i in range(len(ras))]))
    out = tmp_path / "mapped.mrk.json"
    result = run_cli(["transform-points", source, d / "disp.nii.gz", "-o", out, "--output-space", "lps"])
    assert result.rc == 0, result.err
    content = json.loads(out.read_text())
    markup = content["markups"][0]
    assert markup["coordinateSystem"] == "LPS" and markup["coordinateUnits"] == "mm"
    assert [p["label"] for p in markup["controlPoints"]] == [f"L{i}" for i in range(len(ras))]
    expected = from_voxels(displace_points(case["fixed_points"], case["disp"]), AFFINE, "lps")
    np.testing.assert_allclose([p["position"] for p in markup["controlPoints"]], expected, atol=1e-6)
    # a world CSV in RAS reads the same
    world = tmp_path / "ras.csv"
    save_points(world, PointSet(ras, "ras"))
    out_voxel = tmp_path / "mapped_voxel.csv"
    assert run_cli(["transform-points", world, d / "disp.nii.gz", "-o", out_voxel, "--space", "ras",
                    "--output-space", "voxel"]).rc == 0
    np.testing.assert_allclose(np.loadtxt(out_voxel, delimiter=","),
                               displace_points(case["fixed_points"], case["disp"]), atol=1e-6)


def test_markups_output_from_voxel_input_is_lps_by_default(case, tmp_path):
    d = case["dir"]
    out = tmp_path / "mapped.fcsv"
    assert run_cli(["transform-points", d / "fixed_points.csv", d / "disp.nii.gz", "-o", out]).rc == 0
    assert "# CoordinateSystem = LPS" in out.read_text()
    assert load_points(out).space == "lps"


@pytest.mark.parametrize("problem", ["outside", "space", "exists", "format"])
def test_user_errors_are_one_line_and_write_nothing(case, tmp_path, problem):
    d = case["dir"]
    source, out = d / "fixed_points.csv", tmp_path / "out.csv"
    extra = []
    if problem == "outside":
        source = tmp_path / "outside.csv"
        np.savetxt(source, [[5.0, 5.0, 5.0], [30.0, 5.0, 5.0]], delimiter=",")
        expected = "point 1 lies at voxel (30, 5, 5), outside the field's grid"
    elif problem == "space":
        source = tmp_path / "p.fcsv"
        save_points(source, PointSet(np.zeros((1, 3)), "lps"))
        extra, expected = ["--space", "voxel"], "leave out --space"
    elif problem == "exists":
        out.write_text("keep me")
        expected = "exists"
    else:
        out, expected = tmp_path / "out.txt", "point files are"
    result = run_cli(["transform-points", source, d / "disp.nii.gz", "-o", out, *extra])
    assert result.rc == 2
    assert result.err.startswith("dirio: error: ") and result.err.count("\n") == 1 and expected in result.err
    if problem == "exists":
        assert out.read_text() == "keep me"
    else:
        assert not out.exists()


def test_two_dimensional_points_in_voxels(tmp_path):
    shape = (16, 18)
    disp = np.moveaxis(smooth_random_field(shape, sigma=4.0, max_displacement=2.0, seed=1)[0].numpy(), 0, -1)
    nib.save(nib.Nifti1Image(disp, np.eye(4)), str(tmp_path / "disp.nii.gz"))
    points = np.array([[3.5, 4.0], [10.0, 12.25]])
    np.savetxt(tmp_path / "p.csv", points, delimiter=",")
    result = run_cli(["transform-points", tmp_path / "p.csv", tmp_path / "disp.nii.gz", "-o", tmp_path / "q.csv",
                      "--ndim", "2"])
    assert result.rc == 0, result.err
    np.testing.assert_allclose(np.loadtxt(tmp_path / "q.csv", delimiter=","), displace_points(points, disp), atol=1e-9)
    assert run_cli(["transform-points", tmp_path / "p.csv", tmp_path / "disp.nii.gz", "-o", tmp_path / "r.csv",
                    "--ndim", "2", "--output-space", "ras"]).rc == 2
