"""Training data for registration networks: images, pairs and augmentation, as a sampler of batches.

* **Images** (:func:`image_sources`, :func:`load_training_images`): a list of files, shell globs, or
  a Learn2Reg dataset JSON (its ``training`` entries, with each image's label map when the dataset
  has one). Every image is normalised to [0, 1] and all must share one grid.
* **Pairs** (:class:`ImagePairSampler`): ``random`` (an ordered pair of two different images),
  ``atlas`` (the atlas is always fixed, the moving image random) or ``self`` (two independent
  augmentations of the same image: a synthetic deformation whose warped labels are the ground truth).
* **Augmentation** (:class:`Augmentation`): each image of a pair independently gets a random affine
  map, an optional smooth random deformation, then intensity scaling, gamma and Gaussian noise.
  Every draw comes from the sampler's seeded generator, in a fixed order, so a batch is a function of
  the generator state alone (resuming and several processes rely on it, :mod:`dirio.optim.trainer`).
* **Labels**: with ``supervision=True`` the batch carries one-hot maps (``fixed_labels``,
  ``moving_labels``) for :class:`dirio.losses.terms.DiceSupervision`; validation pairs carry the
  integer maps (``fixed_label_map``, ``moving_label_map``).
"""

from __future__ import annotations

import glob
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dirio.core.fields import identity_grid, sample
from dirio.errors import DirioError
from dirio.io.dataset import load_dataset
from dirio.io.images import load_image
from dirio.core.intensity import normalise_intensity
from dirio.losses.terms import one_hot
from dirio.optim.trainer import Batch

PAIR_MODES = ("random", "atlas", "self")


@dataclass(frozen=True)
class TrainingImage:
    """One training image: ``(1, *S)`` float32 intensities in [0, 1] and an optional ``(1, *S)`` int64 label map."""

    name: str
    image: torch.Tensor
    labels: torch.Tensor | None = None


def image_sources(sources: Sequence[str], labels: Sequence[str] | None = None,
                  allow_outside: bool = False) -> list[tuple[str, str | None]]:
    """``(image path, label path or None)`` of every image named by ``sources``.

    Args:
        sources: file paths and shell globs (sorted matches), or a single Learn2Reg dataset JSON
            (its ``training`` images and their labels).
        labels: label maps for file/glob sources, in the same order after expansion (files or globs).
    Raises:
        DirioError: a glob matching nothing, a missing file, or label and image counts that differ.
    """
    if len(sources) == 1 and str(sources[0]).endswith(".json"):
        dataset = load_dataset(sources[0], allow_outside=allow_outside)
        training = dataset.content.get("training")
        if not isinstance(training, list) or not training:
            raise DirioError(f"{sources[0]}: the dataset has no 'training' list of images")
        entries = [dataset.case_image(entry["image"]) for entry in training]
        return [(str(e.image), None if e.labels is None else str(e.labels)) for e in entries]
    images = _expand(sources, "image")
    label_files = _expand(labels, "label map") if labels else []
    if label_files and len(label_files) != len(images):
        raise DirioError(f"{len(images)} images but {len(label_files)} label maps; give one label map per image")
    return [(image, label_files[i] if label_files else None) for i, image in enumerate(images)]


def _expand(patterns: Sequence[str], what: str) -> list[str]:
    files: list[str] = []
    for pattern in patterns:
        if any(c in pattern for c in "*?["):
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise DirioError(f"the {what} pattern {pattern!r} matches no file")
            files.extend(matches)
        elif not Path(pattern).is_file():
            raise DirioError(f"{pattern}: no such {what} file")
        else:
            files.append(pattern)
    return files


def load_training_images(sources: Sequence[tuple[str, str | None]], ndim: int = 3,
                         normalise: str = "percentile") -> list[TrainingImage]:
    """Read and normalise ``(image, labels)`` files (:func:`image_sources`); all on one grid.

    Raises:
        DirioError: unreadable files, or grids that differ (resample the images first).
    """
    images = []
    for path, label_path in sources:
        data = load_image(path, ndim=ndim).data
        if normalise != "none":
            data = normalise_intensity(data, normalise)
        labels = None
        if label_path is not None:
            labels = torch.from_numpy(np.asarray(load_image(label_path, labels=True, ndim=ndim).data).astype(np.int64))[None]
        images.append(TrainingImage(Path(path).name, torch.from_numpy(np.asarray(data, dtype=np.float32))[None],
                                    labels))
    return check_images(images)


def check_images(images: Sequence[TrainingImage]) -> list[TrainingImage]:
    """The images, checked: at least one, one grid for all, label maps on the image grid."""
    if not images:
        raise DirioError("no training images")
    shape = tuple(images[0].image.shape)
    for item in images:
        if tuple(item.image.shape) != shape:
            raise DirioError(f"{item.name}: grid {tuple(item.image.shape[1:])} differs from {shape[1:]} of "
                             f"{images[0].name}; training needs every image on one grid (resample them first)")
        if item.labels is not None and tuple(item.labels.shape) != shape:
            raise DirioError(f"{item.name}: its label map's grid {tuple(item.labels.shape[1:])} differs from the image's")
    return list(images)


def label_ids_of(images: Sequence[TrainingImage]) -> list[int]:
    """The sorted nonzero label ids present in any of the images' label maps."""
    ids: set[int] = set()
    for item in images:
        if item.labels is not None:
            ids.update(int(v) for v in torch.unique(item.labels).tolist() if v != 0)
    return sorted(ids)


@dataclass(frozen=True)
class Augmentation:
    """Random spatial and intensity augmentation of one image (ranges uniform unless said).

    Attributes:
        rotation: degrees, each rotation angle in [-r, r] (one angle in 2D, three in 3D).
        scale: relative, each axis scaled by a factor in [1 - s, 1 + s].
        shear: each off-diagonal element of the linear map in [-h, h].
        translation: fraction of the axis length, each axis in [-t, t].
        elastic: standard deviation (voxels) of a smooth random displacement (0: none): normal noise
            on a control grid of ``elastic_spacing`` voxels, interpolated (bi/trilinear) to the image.
        elastic_spacing: control-point spacing of the smooth displacement, voxels.
        intensity: intensities multiplied by a factor in [1 - i, 1 + i].
        gamma: intensities (clipped to >= 0) raised to ``exp(g')`` with ``g'`` in [-g, g].
        noise: standard deviation of added Gaussian noise (images are in [0, 1]).
    Defaults are mild (rotation 10 degrees, scale 0.1, translation 0.05, intensity 0.1, gamma 0.2,
    noise 0.01; no shear, no elastic); :data:`NO_AUGMENTATION` switches everything off.
    """

    rotation: float = 10.0
    scale: float = 0.1
    shear: float = 0.0
    translation: float = 0.05
    elastic: float = 0.0
    elastic_spacing: float = 8.0
    intensity: float = 0.1
    gamma: float = 0.2
    noise: float = 0.01

    def __post_init__(self):
        for name, value in asdict(self).items():
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"augmentation {name} must be a finite number >= 0, got {value}")
        if self.elastic_spacing <= 0:
            raise ValueError("augmentation elastic_spacing must be > 0")
        if self.scale >= 1:
            raise ValueError(f"augmentation scale must be < 1, got {self.scale}")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def spatial(self) -> bool:
        return any(v > 0 for v in (self.rotation, self.scale, self.shear, self.translation, self.elastic))

    def displacement(self, shape: Sequence[int], generator: torch.Generator) -> torch.Tensor | None:
        """``(1, ndim, *shape)`` random displacement in voxels (pull: ``out(x) = in(x + u(x))``), or ``None``."""
        if not self.spatial:
            return None
        ndim = len(shape)

        def uniform(n, r):
            return (torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1) * r

        angles = uniform(1 if ndim == 2 else 3, math.radians(self.rotation))
        scales = 1 + uniform(ndim, self.scale)
        shears = uniform(ndim * ndim, self.shear).reshape(ndim, ndim)
        shift = uniform(ndim, self.translation) * torch.tensor([float(n) for n in shape], dtype=torch.float64)
        matrix = _rotation(angles, ndim) @ (torch.diag(scales) + shears - torch.diag(torch.diag(shears)))
        grid = identity_grid(shape, dtype=torch.float64)
        centre = torch.tensor([(n - 1) / 2 for n in shape], dtype=torch.float64).reshape(ndim, *([1] * ndim))
        coords = torch.einsum("ij,j...->i...", matrix, grid - centre) + centre + shift.reshape(ndim, *([1] * ndim))
        disp = (coords - grid).float()[None]
        if self.elastic > 0:
            control = [max(2, math.ceil((n - 1) / self.elastic_spacing) + 1) for n in shape]
            noise = torch.randn(1, ndim, *control, generator=generator) * self.elastic
            mode = "bilinear" if ndim == 2 else "trilinear"
            disp = disp + F.interpolate(noise, size=tuple(shape), mode=mode, align_corners=True)
        return disp

    def intensities(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``image`` (any shape) with random gamma, scaling and noise."""
        gamma = math.exp(float((torch.rand(1, generator=generator) * 2 - 1) * self.gamma))
        factor = 1 + float((torch.rand(1, generator=generator) * 2 - 1) * self.intensity)
        out = image.clamp(min=0) ** gamma * factor if self.gamma > 0 else image * factor
        if self.noise > 0:
            out = out + torch.randn(image.shape, generator=generator) * self.noise
        return out


NO_AUGMENTATION = Augmentation(rotation=0, scale=0, shear=0, translation=0, elastic=0, intensity=0, gamma=0, noise=0)


def _rotation(angles: torch.Tensor, ndim: int) -> torch.Tensor:
    def planar(a, i, j, n):
        m = torch.eye(n, dtype=torch.float64)
        c, s = math.cos(float(a)), math.sin(float(a))
        m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
        return m

    if ndim == 2:
        return planar(angles[0], 0, 1, 2)
    return planar(angles[0], 1, 2, 3) @ planar(angles[1], 0, 2, 3) @ planar(angles[2], 0, 1, 3)


def augmented(item: TrainingImage, augmentation: Augmentation, generator: torch.Generator
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One random augmentation of ``item``: ``(1, 1, *S)`` image and ``(1, 1, *S)`` labels (or ``None``)."""
    image, labels = item.image[None].float(), None if item.labels is None else item.labels[None]
    disp = augmentation.displacement(tuple(item.image.shape[1:]), generator)
    if disp is not None:
        coords = identity_grid(disp.shape[2:])[None] + disp
        image = sample(image, coords, mode="linear", padding="zeros")
        if labels is not None:
            labels = sample(labels.float(), coords, mode="nearest", padding="zeros").round().long()
    return augmentation.intensities(image, generator), labels


class ImagePairSampler:
    """Training batches of augmented pairs (module docstring), one :class:`~dirio.optim.trainer.Batch` per call.

    Args:
        images: the training images (one grid).
        mode: ``"random"``, ``"atlas"`` or ``"self"``.
        atlas: the fixed image of ``mode="atlas"`` (not augmented spatially, only in intensity).
        augmentation: applied to every image independently.
        label_ids: with ``supervision``, the labels of the one-hot maps (default: all present).
        supervision: put one-hot label maps into each batch (every image needs labels then).
        label_maps: put the integer label maps into each batch (for validation).
    """

    def __init__(self, images: Sequence[TrainingImage], mode: str = "random", atlas: TrainingImage | None = None,
                 augmentation: Augmentation = Augmentation(), label_ids: Sequence[int] | None = None,
                 supervision: bool = False, label_maps: bool = False):
        if mode not in PAIR_MODES:
            raise DirioError(f"unknown pair mode {mode!r}; choose one of {', '.join(PAIR_MODES)}")
        self.images = check_images(images)
        if mode == "random" and len(self.images) < 2:
            raise DirioError("random pairs need at least two images (or use pairs to an atlas, or self pairs)")
        if mode == "atlas":
            if atlas is None:
                raise DirioError("pairs to an atlas need the atlas image")
            check_images([self.images[0], atlas])
        self.mode, self.atlas, self.augmentation = mode, atlas, augmentation
        self.supervision, self.label_maps = supervision, label_maps
        if supervision or label_maps:
            unlabelled = [i.name for i in [*self.images, *([atlas] if atlas else [])] if i.labels is None]
            if unlabelled:
                raise DirioError(f"{unlabelled[0]}: no label map; Dice supervision and validation Dice need labels "
                                 "for every image")
        self.label_ids = list(label_ids) if label_ids else label_ids_of([*self.images, *([atlas] if atlas else [])])

    def sample(self, generator: torch.Generator, batch_size: int) -> Batch:
        fixed, moving, fixed_labels, moving_labels = [], [], [], []
        count = len(self.images)
        for _ in range(batch_size):
            if self.mode == "self":
                first = second = self.images[int(torch.randint(count, (1,), generator=generator))]
            elif self.mode == "atlas":
                first, second = self.atlas, self.images[int(torch.randint(count, (1,), generator=generator))]
            else:
                i = int(torch.randint(count, (1,), generator=generator))
                j = (i + 1 + int(torch.randint(count - 1, (1,), generator=generator))) % count
                first, second = self.images[i], self.images[j]
            atlas_augmentation = Augmentation(**{**self.augmentation.to_dict(), "rotation": 0, "scale": 0,
                                                 "shear": 0, "translation": 0, "elastic": 0})
            f_image, f_labels = augmented(first, atlas_augmentation if self.mode == "atlas" else self.augmentation,
                                          generator)
            m_image, m_labels = augmented(second, self.augmentation, generator)
            fixed.append(f_image)
            moving.append(m_image)
            fixed_labels.append(f_labels)
            moving_labels.append(m_labels)
        extra = {}
        if self.supervision:
            extra["fixed_labels"] = one_hot(torch.cat(fixed_labels), self.label_ids)
            extra["moving_labels"] = one_hot(torch.cat(moving_labels), self.label_ids)
        if self.label_maps:
            extra["fixed_label_map"] = torch.cat(fixed_labels)
            extra["moving_label_map"] = torch.cat(moving_labels)
        return Batch(torch.cat(fixed), torch.cat(moving), extra)


def fixed_pairs(sampler: ImagePairSampler, count: int, seed: int) -> list[Batch]:
    """``count`` pairs of one pair each, drawn once from ``sampler`` with a generator seeded by ``seed``
    (validation pairs: the same for every epoch and every run with that seed)."""
    generator = torch.Generator().manual_seed(int(seed))
    return [sampler.sample(generator, 1) for _ in range(count)]
