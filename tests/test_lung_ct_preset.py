"""The ``lung-ct`` preset as a method: automatic lung masks, an affine stage, ConvexAdam's discrete +
coupled convex initialisation, then MIND-SSC continuous optimisation with the constant -> cosine ->
linear schedule (issue 20; benchmarks/lung_validation.py for its accuracy).

On a small chest phantom in HU whose lungs are moved by a known smooth field, the preset must run
its stages in that order, bring the lungs closer than the convex initialisation alone, and not fold.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from dirio.api import apply_field, register
from dirio.evaluation.jacobian import fraction_nonpositive_jacobian
from test_lung_mask import chest_phantom

pytestmark = pytest.mark.usefixtures("one_thread")


def _breathing(shape, amplitude=2.5):
    """A smooth known field ``(*S, 3)`` in voxels: cranio-caudal motion (axis 2) growing toward the
    base of the lungs (low k), and a small lateral expansion."""
    i, j, k = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")
    base = 1.0 - k / (shape[2] - 1)
    field = np.zeros((*shape, 3), np.float32)
    field[..., 2] = -amplitude * base**1.5
    field[..., 1] = 0.04 * (j - shape[1] / 2) * base
    return ndimage.gaussian_filter(field, sigma=(2, 2, 2, 0))


def test_lung_ct_masks_aligns_initialises_and_refines_a_known_breathing_motion():
    moving, lungs = chest_phantom(seed=3)
    true = _breathing(moving.shape)
    fixed = apply_field(moving, true).astype(np.float32)  # fixed(x) = moving(x + true(x))
    settings = dict(preset="lung-ct", levels=(2,), iterations=(40,), affine_options={"iterations": (20, 10)},
                    device="cpu", progress=False, keep_stages=True)
    result = register(fixed, moving, **settings)

    assert [s["stage"] for s in result.stages] == ["lung-mask", "affine", "convex", "dense"]
    assert result.stages[0]["used"]
    inside = ndimage.binary_erosion(apply_field(lungs.astype(np.float32), true) > 0.5, iterations=2)
    error = lambda disp: float(np.linalg.norm(np.asarray(disp) - true, axis=-1)[inside].mean())
    before = error(np.zeros_like(true))
    convex = error(result.stage_fields["convex"])
    final = error(result.disp)
    assert final < 0.5 * before, (before, convex, final)
    assert final < convex, (convex, final)
    assert fraction_nonpositive_jacobian(np.asarray(result.disp)) == 0.0
