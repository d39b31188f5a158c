"""dirio: Deformable Image Registration by Instance Optimization."""

__version__ = "0.1.0"
