"""What is optimised: transforms mapping a level context to a displacement ``(B, ndim, *S)`` in voxels of
the level grid (Learn2Reg pull convention): dense and stationary velocity fields, greedy composition,
the affine family, symmetric halves, and registration networks (:mod:`dirio.transforms.networks`)."""
