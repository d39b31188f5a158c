"""The registry of transforms by name (what ``Settings`` and checkpoints refer to)."""

from __future__ import annotations

from dirio.core.registry import Registry
from dirio.transforms.affine import AffineThenDense, AffineTransform
from dirio.transforms.base import Transform
from dirio.transforms.dense import DenseDisplacement, StationaryVelocity
from dirio.transforms.network import NetworkTransform
from dirio.transforms.symmetric import SymmetricTransform

TRANSFORMS: Registry[Transform] = Registry("transform")
TRANSFORMS.register("displacement", DenseDisplacement)
TRANSFORMS.register("velocity", StationaryVelocity)
TRANSFORMS.register("symmetric", SymmetricTransform)
TRANSFORMS.register("affine", AffineTransform)
TRANSFORMS.register("affine-then-dense", AffineThenDense)
TRANSFORMS.register("network", NetworkTransform)
