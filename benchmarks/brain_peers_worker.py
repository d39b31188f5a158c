"""Worker of ``benchmarks/brain_validation.py``: one peer registration (ANTs SyN, dipy SyN, greedy or
FireANTs) on a NIfTI pair.

Runs in a separate Python environment that has antspyx, dipy, picsl-greedy and/or fireants (NOT
dependencies of dirio) and calls only their public APIs at their documented defaults:

* ``ants``: ``ants.registration(fixed, moving, type_of_transform="SyN")`` (affine + SyN, every other
  parameter at its default); the forward transforms are composed into one displacement field with
  ``ants.apply_transforms(..., compose=prefix)``; the peer's own warped image is ``warpedmovout``.
* ``dipy``: ``SymmetricDiffeomorphicRegistration(CCMetric(3)).optimize(fixed, moving)`` (default
  ``level_iters`` [100, 100, 25], no prior affine: identity grid-to-world for both images);
  the field is ``mapping.get_forward_field()``, the warped image ``mapping.transform(moving)``.
* ``greedy``: picsl-greedy ``Greedy3D().execute("-d 3 -i fixed moving -m NCC 2x2x2 -o warp")``: the
  deformable registration of greedy's documentation with the NCC 2x2x2 metric its examples use and every
  other option at its default (iterations 100x100, smoothing 1.732vox 0.7071vox, no affine: the images are
  affinely aligned); the warp is an ITK displacement image (LPS mm), converted like ANTs'; the warped
  image is greedy's own reslice (``-rf fixed -rm moving out -r warp``).
* ``fireants``: ``GreedyRegistration(scales=[4, 2, 1], iterations=[200, 100, 50], loss_type="cc",
  cc_kernel_size=5, deformation_type="compositive", smooth_grad_sigma=1, optimizer="Adam",
  optimizer_lr=0.5)`` (the brain example of its README; no affine), ``optimize()``; the field from
  ``get_warped_coordinates`` (``grid_sample`` coordinates, x = i), the warped image from ``evaluate``.

Writes ``--out`` (.npz): ``disp`` ``(*S, 3)`` float32 displacement in voxels of the fixed grid, axis
order (i, j, k), pull convention ``warped(x) = moving(x + disp(x))`` (dirio's); ``warped`` ``S``
float32, the peer's own warped moving image; ``wall_seconds``, ``cpu_seconds`` (getrusage self +
children of the registration call and the field conversion); ``settings`` (text).

    /tmp/antsenv/bin/python benchmarks/brain_peers_worker.py {ants,dipy,greedy,fireants} FIXED.nii.gz MOVING.nii.gz OUT.npz
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time

import numpy as np


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def physical_to_voxel(disp_physical: np.ndarray, direction: np.ndarray, spacing) -> np.ndarray:
    """``(*S, 3)`` ITK physical displacement (mm, LPS) -> voxel displacement: ``diag(1/spacing) D^T u``."""
    matrix = np.diag(1.0 / np.asarray(spacing, dtype=np.float64)) @ np.asarray(direction, dtype=np.float64).T
    return np.einsum("ij,...j->...i", matrix, disp_physical).astype(np.float32)


def run_ants(fixed_path: str, moving_path: str) -> tuple[np.ndarray, np.ndarray, str]:
    """ANTs SyN at defaults; returns (disp voxels ``(*S, 3)``, warped ``S``, settings text)."""
    import ants

    fixed = ants.image_read(fixed_path)
    moving = ants.image_read(moving_path)
    reg = ants.registration(fixed, moving, type_of_transform="SyN")
    with tempfile.TemporaryDirectory() as tmp:
        composed = ants.apply_transforms(fixed, moving, transformlist=reg["fwdtransforms"], compose=f"{tmp}/comp")
        field = ants.image_read(composed)
        disp_physical = field.numpy()  # (*S, 3), physical (LPS) components
    disp = physical_to_voxel(disp_physical, fixed.direction, fixed.spacing)
    settings = (f"antspyx {ants.__version__}: ants.registration(fixed, moving, type_of_transform='SyN') "
                "(defaults); field = composition of its fwdtransforms "
                f"{['SyN warp' if t.endswith('.nii.gz') else 'affine' for t in reg['fwdtransforms']]}")
    return disp, reg["warpedmovout"].numpy().astype(np.float32), settings


def run_dipy(fixed_path: str, moving_path: str) -> tuple[np.ndarray, np.ndarray, str]:
    """dipy SyN (CC) at defaults; returns (disp voxels ``(*S, 3)``, warped ``S``, settings text)."""
    import dipy
    import nibabel as nib
    from dipy.align.imwarp import SymmetricDiffeomorphicRegistration
    from dipy.align.metrics import CCMetric

    fixed = np.asarray(nib.load(fixed_path).dataobj, dtype=np.float64)
    moving = np.asarray(nib.load(moving_path).dataobj, dtype=np.float64)
    sdr = SymmetricDiffeomorphicRegistration(CCMetric(3))
    mapping = sdr.optimize(fixed, moving)  # grid-to-world identity for both: world units = voxels
    disp = np.asarray(mapping.get_forward_field(), dtype=np.float32)
    warped = np.asarray(mapping.transform(moving), dtype=np.float32)
    settings = (f"dipy {dipy.__version__}: SymmetricDiffeomorphicRegistration(CCMetric(3)) defaults "
                f"(level_iters {list(sdr.level_iters)}), optimize(fixed, moving), no prior affine")
    return disp, warped, settings


def run_greedy(fixed_path: str, moving_path: str) -> tuple[np.ndarray, np.ndarray, str]:
    """greedy (picsl-greedy) deformable with NCC 2x2x2, other options at their defaults."""
    import SimpleITK as sitk
    from importlib.metadata import version
    from picsl_greedy import Greedy3D

    command = "-d 3 -i {fixed} {moving} -m NCC 2x2x2 -o {warp}"
    with tempfile.TemporaryDirectory() as tmp:
        greedy = Greedy3D()
        greedy.execute(command.format(fixed=fixed_path, moving=moving_path, warp=f"{tmp}/warp.nii.gz"))
        greedy.execute(f"-d 3 -rf {fixed_path} -rm {moving_path} {tmp}/warped.nii.gz -r {tmp}/warp.nii.gz")
        field = sitk.ReadImage(f"{tmp}/warp.nii.gz")
        disp_physical = sitk.GetArrayFromImage(field).transpose(2, 1, 0, 3)  # (k, j, i, 3) -> (i, j, k, 3)
        direction = np.asarray(field.GetDirection(), dtype=np.float64).reshape(3, 3)
        warped = sitk.GetArrayFromImage(sitk.ReadImage(f"{tmp}/warped.nii.gz")).transpose(2, 1, 0)
    disp = physical_to_voxel(disp_physical, direction, field.GetSpacing())
    settings = f"picsl-greedy {version('picsl_greedy')}: greedy {command.format(fixed='FIXED', moving='MOVING', warp='WARP')}"
    return disp, warped.astype(np.float32), settings


def run_fireants(fixed_path: str, moving_path: str) -> tuple[np.ndarray, np.ndarray, str]:
    """FireANTs greedy (compositive) registration with the brain example's settings, no affine."""
    import torch
    from importlib.metadata import version
    from fireants.io import BatchedImages, Image
    from fireants.registration.greedy import GreedyRegistration

    fixed = BatchedImages([Image.load_file(fixed_path, device="cpu")])  # its default device is CUDA
    moving = BatchedImages([Image.load_file(moving_path, device="cpu")])
    options = dict(scales=[4, 2, 1], iterations=[200, 100, 50], loss_type="cc", cc_kernel_size=5,
                   deformation_type="compositive", smooth_grad_sigma=1, optimizer="Adam", optimizer_lr=0.5)
    reg = GreedyRegistration(fixed_images=fixed, moving_images=moving, **options)
    reg.optimize()
    with torch.no_grad():
        coords = reg.get_warped_coordinates(fixed, moving)[0].double().numpy()  # (K, J, I, 3), x = i
        warped = reg.evaluate(fixed, moving)[0, 0].float().numpy().transpose(2, 1, 0)
    shape = coords.shape[:3][::-1]  # (I, J, K)
    voxels = np.stack([(coords[..., c] + 1.0) / 2.0 * (shape[c] - 1) for c in range(3)], -1).transpose(2, 1, 0, 3)
    identity = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    settings = f"fireants {version('fireants')}: GreedyRegistration({options}) on CPU, no affine"
    return (voxels - identity).astype(np.float32), warped, settings


PEERS = {"ants": run_ants, "dipy": run_dipy, "greedy": run_greedy, "fireants": run_fireants}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("peer", choices=sorted(PEERS))
    parser.add_argument("fixed")
    parser.add_argument("moving")
    parser.add_argument("out")
    args = parser.parse_args(argv)
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    disp, warped, settings = PEERS[args.peer](args.fixed, args.moving)
    wall, cpu = time.perf_counter() - wall0, cpu_seconds() - cpu0
    np.savez_compressed(args.out, disp=disp, warped=warped, wall_seconds=wall, cpu_seconds=cpu, settings=settings)
    print(f"{args.peer}: wall {wall:.1f} s, cpu {cpu:.1f} s")


if __name__ == "__main__":
    main()
