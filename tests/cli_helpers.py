"""Running ``dirio`` in-process in tests, with its exit status and output captured."""

import contextlib
import io
from pathlib import Path
from types import SimpleNamespace

from dirio.apps.cli import main


def run_cli(argv) -> SimpleNamespace:
    """``main(argv)`` with stdout and stderr captured: ``rc``, ``out``, ``err`` (argparse's usage
    errors exit through SystemExit, whose code becomes ``rc``)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as exit_:
            rc = exit_.code
    return SimpleNamespace(rc=rc, out=out.getvalue(), err=err.getvalue())


def assert_one_error_line(result, *fragments: str) -> str:
    """The result of :func:`run_cli` is a usage error: exit status 2 and exactly one line
    ``dirio: error: ...`` on stderr containing every fragment. Returns that line."""
    assert result.rc == 2, (result.rc, result.err)
    lines = result.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("dirio: error: "), result.err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def save_nifti(path, array, affine) -> Path:
    """Write ``array`` with ``affine`` as NIfTI at ``path`` (parents created); returns the path."""
    import nibabel as nib
    import numpy as np

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), affine), str(path))
    return path


def write_smooth_pair(folder, shape, affine, names=("fixed", "moving", "fixed_labels", "moving_labels")):
    """A small smooth random image (0..100), the same image shifted by (0.6, -0.4, 0.3) voxels, one
    label map of its top 40 % for both, and a zero field ``disp.nii.gz``, written into ``folder``
    under ``names`` (``.nii.gz`` added). Returns their paths as ``fixed``, ``moving``,
    ``fixed_labels``, ``moving_labels``, ``field`` and the folder as ``dir``."""
    import numpy as np
    from scipy.ndimage import gaussian_filter, shift

    folder = Path(folder)
    volume = gaussian_filter(np.random.default_rng(0).standard_normal(shape), 2.0)
    volume = ((volume - volume.min()) / np.ptp(volume) * 100).astype(np.float32)
    labels = (volume > np.percentile(volume, 60)).astype(np.uint8)
    arrays = (volume, shift(volume, (0.6, -0.4, 0.3), order=1, mode="nearest"), labels, labels)
    paths = {key: save_nifti(folder / f"{name}.nii.gz", array, affine)
             for key, name, array in zip(("fixed", "moving", "fixed_labels", "moving_labels"), names, arrays)}
    return SimpleNamespace(dir=folder, **paths,
                           field=save_nifti(folder / "disp.nii.gz", np.zeros(tuple(shape) + (3,), np.float32), affine))
