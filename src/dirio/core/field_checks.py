"""What a usable displacement field is: finite everywhere, and not exploded.

The one definition of an *exploded* field: some displacement component is longer than the image
along its axis, ``|u_d(x)| > S_d`` voxels for an image of ``S_d`` voxels along axis ``d``. Such a
displacement sends the voxel outside the image from wherever it starts, so no registration of the
pair can want it; it is what a diverged optimisation (an absurd learning rate) or a broken network
produces. A field with NaN or Inf values is not usable either.

Every stage that produces a field checks it here (:func:`field_problem`) before anything is written,
and its caller words the cause (the learning rate, the checkpoint).
"""

from __future__ import annotations

import numpy as np
import torch


def field_problem(disp: torch.Tensor | np.ndarray, channels_last: bool = False) -> str | None:
    """Why a displacement field is unusable, or ``None`` when it is finite and not exploded.

    Args:
        disp: ``(B, ndim, *S)`` tensor or array in voxels of its grid ``S``; with
            ``channels_last``, ``(*S, ndim)`` (the Learn2Reg layout of :func:`field_to_numpy`).
    Returns:
        A short text, e.g. ``"12288 of 12288 values are NaN or Inf"`` or ``"displacements up to
        1.2e+26 voxels along axis 0, beyond the image's 16 voxels (an exploded field)"``; ``None``
        for a usable field.
    """
    values = torch.as_tensor(disp).detach()
    if channels_last:
        values = values.movedim(-1, 0)[None]
    shape = tuple(int(n) for n in values.shape[2:])
    finite = torch.isfinite(values)
    if not bool(finite.all()):
        return f"{int((~finite).sum())} of {values.numel()} values are NaN or Inf"
    for axis, size in enumerate(shape):
        largest = float(values[:, axis].abs().max()) if values.numel() else 0.0
        if largest > size:
            return (f"displacements up to {largest:.3g} voxels along axis {axis}, beyond the image's "
                    f"{size} voxels (an exploded field)")
    return None
