"""Registration metrics: the Learn2Reg evaluator's numbers, with textbook variants beside them.

Modules: :mod:`~dirio.evaluation.overlap` (label warp, Dice, DSC30), :mod:`~dirio.evaluation.surface`
(surface distances, HD95), :mod:`~dirio.evaluation.landmarks` (TRE), :mod:`~dirio.evaluation.jacobian`
(Learn2Reg Jacobian, SDlogJ variants, folding, NDV), :mod:`~dirio.evaluation.evaluate` (every
metric of a field as one JSON-ready dict) and :mod:`~dirio.evaluation.aggregate` (the evaluator's
per-case structure and aggregates). What reproduces the Learn2Reg evaluator (``evaluation.py`` /
``utils.py`` of the challenge's evaluation code, MICCAI 2021-2023, eval_version 2.0) is said in
each module.

Every function takes numpy arrays. A displacement field is in the on-disk (Learn2Reg) layout
``(*S, ndim)`` with ``S = (D, H, W)`` (3D) or ``(H, W)`` (2D), in **voxel units of the fixed
grid**, pull convention ``warped(x) = moving(x + u(x))``. Fields are converted to float64
before any computation, as the evaluator does when it reads a NIfTI file with nibabel's
``get_fdata``.
"""
