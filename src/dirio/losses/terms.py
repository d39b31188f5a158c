"""Terms with roles: the separately kept objectives the engine minimises.

A :class:`Term` has a name, a :class:`Role`, a weight and a function of one :class:`Evaluation`
(the transform's field at the current iteration on a :class:`~dirio.core.context.LevelContext`).
Any number of terms of each role may be given: several similarity terms (MIND plus NCC, one per
pyramid level), any regularizers, supervision terms (Dice of label maps, keypoint distances). The
combination rules (:mod:`dirio.optim.combine`) read the roles, never the order or the names.

Every term is lower-is-better and returns a scalar; the weight is applied by the rule, never
inside the term.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import torch
import torch.nn.functional as F

from dirio.core.fields import resize_image, sample
from dirio.losses.by_level import at_level

if TYPE_CHECKING:  # the contract only, for annotations
    from dirio.transforms.base import Transform
from dirio.core.context import LevelContext, RegularizedField


class Role(str, enum.Enum):
    """What a term is for. The combination rules treat similarity and supervision as data terms
    (the gradient that is kept or projected) and regularizers as the smoothness side."""

    SIMILARITY = "similarity"
    REGULARIZER = "regularizer"
    SUPERVISION = "supervision"


class Evaluation:
    """The transform evaluated once at one iteration: the field and what the terms derive from it.

    Args:
        ctx: the level (or batch) context.
        field: ``(B, ndim, *ctx.shape)`` displacement in voxels of the level grid; ``None``: computed
            as ``transform.field(ctx)`` on first use (a symmetric transform's similarity needs only
            its half maps, :attr:`middle`).
        transform: the transform (for :attr:`regularized` and :attr:`middle`).
    Derived values are computed on first use and shared by all terms of the iteration.
    """

    def __init__(self, ctx: LevelContext, field: torch.Tensor | None, transform: Transform):
        self.ctx = ctx
        self._field = field
        self.transform = transform
        self._middle: tuple[torch.Tensor, torch.Tensor] | None = None
        self._middle_done = False
        self._coords: torch.Tensor | None = None
        self._mask: torch.Tensor | None = None
        self._mask_done = False
        self._regularized: RegularizedField | None = None
        self._regularized_done = False

    @property
    def field(self) -> torch.Tensor:
        """``(B, ndim, *S)`` forward displacement (fixed -> moving) in voxels of the level grid."""
        if self._field is None:
            self._field = self.transform.field(self.ctx)
        return self._field

    @property
    def middle(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(d_f, d_m)``: the half maps of a symmetric transform (``transform.middle(ctx)``, e.g.
        :class:`dirio.transforms.symmetric.SymmetricTransform`), pull displacements from a middle
        space on the level grid into the fixed and the moving image; ``None`` for other transforms."""
        if not self._middle_done:
            middle = getattr(self.transform, "middle", None)
            self._middle = None if middle is None else middle(self.ctx)
            self._middle_done = True
        return self._middle

    def warped_pair(self, fixed: torch.Tensor, moving: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two ``(B, C, *S)`` images (or features) the similarity compares: ``fixed`` and ``moving``
        pulled by the field (``moving(x + u(x))``), or, for a symmetric transform, both pulled into the
        middle space (``fixed(x + d_f(x))``, ``moving(x + d_m(x))``; linear, border padding)."""
        if self.middle is None:
            return fixed, sample(moving, self.coords)
        identity = self.ctx.identity
        fixed_half, moving_half = self.middle
        return sample(fixed, identity + fixed_half), sample(moving, identity + moving_half)

    @property
    def coords(self) -> torch.Tensor:
        """``(B, ndim, *S)`` sampling coordinates ``x + u(x)`` in voxels of the level grid."""
        if self._coords is None:
            self._coords = self.ctx.identity + self.field
        return self._coords

    @property
    def mask(self) -> torch.Tensor | None:
        """The fixed mask times the moving mask pulled into fixed space (either may be absent); for a
        symmetric transform, both masks pulled into the middle space (:attr:`middle`)."""
        if not self._mask_done and self.middle is not None:
            masks = [sample(m, self.ctx.identity + half, mode="linear", padding="zeros")
                     for m, half in zip((self.ctx.fixed_mask, self.ctx.moving_mask), self.middle) if m is not None]
            self._mask = masks[0] * masks[1] if len(masks) == 2 else (masks[0] if masks else None)
            self._mask_done = True
        if not self._mask_done:
            mask = self.ctx.fixed_mask
            if self.ctx.moving_mask is not None:
                warped = sample(self.ctx.moving_mask, self.coords, mode="linear", padding="zeros")
                mask = warped if mask is None else mask * warped
            self._mask, self._mask_done = mask, True
        return self._mask

    @property
    def regularized(self) -> RegularizedField | None:
        """What the regularizers act on: ``transform.regularized(ctx, field)``; a symmetric transform
        regularizes its halves and gets ``None`` for the field (its forward map is not computed for it)."""
        if not self._regularized_done:
            field = self._field if self.middle is not None else self.field
            self._regularized = self.transform.regularized(self.ctx, field)
            self._regularized_done = True
        return self._regularized


@dataclass
class Term:
    """One separately kept objective.

    Attributes:
        name: unique name, used in the log (``history.csv`` columns).
        role: a :class:`Role`.
        function: ``function(evaluation, name) -> scalar tensor``; an object with
            ``prepare(ctx, name)`` gets it called once per level (or batch) before the first
            evaluation (it may store per-level values in ``ctx.cache[name]``).
        weight: the term's weight (finite, >= 0; 0 drops the term and its backward pass).
    """

    name: str
    role: Role
    function: Callable[[Evaluation], torch.Tensor]
    weight: float = 1.0

    def __post_init__(self):
        self.role = Role(self.role)
        weight = float(self.weight)
        if not weight >= 0.0 or weight == float("inf"):
            raise ValueError(f"the weight of term {self.name!r} must be finite and >= 0, got {self.weight!r}")
        self.weight = weight

    def prepare(self, ctx: LevelContext) -> None:
        prepare = getattr(self.function, "prepare", None)
        if prepare is not None:
            prepare(ctx, self.name)


def ordered(terms: Sequence[Term]) -> list[Term]:
    """Terms in evaluation order: similarity, supervision, then regularizers (stable within a role)."""
    rank = {Role.SIMILARITY: 0, Role.SUPERVISION: 1, Role.REGULARIZER: 2}
    names = [t.name for t in terms]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"term names must be unique, {duplicates[0]!r} is given twice")
    return sorted(terms, key=lambda t: rank[t.role])


# --- the term functions --------------------------------------------------------------------------


FEATURE_RESOLUTIONS = ("level", "full", "pooled")
FEATURE_SAMPLINGS = ("exact", "convexadam")


def pool_to_level(features: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Full-grid ``(B, C, *S)`` features averaged over blocks of ``f = round(S / shape)`` voxels per
    axis (ConvexAdam's ``avg_pool3d(features, grid_sp_adam)``) -> ``(B, C, *shape)``.

    Block ``y`` covers the full-grid voxels ``f y .. f y + f - 1`` (voxels left over at the far
    end are dropped); when that gives fewer than ``shape`` blocks (an odd size at a factor-2
    level) the last block is repeated up to ``shape``.
    """
    ndim = features.dim() - 2
    full = features.shape[2:]
    kernel = [max(round(n / m), 1) for n, m in zip(full, shape)]
    pool = F.avg_pool3d if ndim == 3 else F.avg_pool2d
    pooled = pool(features, kernel, stride=kernel)
    missing = [max(m - p, 0) for m, p in zip(shape, pooled.shape[2:])]
    if any(missing):
        pooled = F.pad(pooled, [v for m in reversed(missing) for v in (0, m)], mode="replicate")
    return pooled[(slice(None), slice(None)) + tuple(slice(0, m) for m in shape)]


class SimilarityTerm:
    """An image similarity of :mod:`dirio.losses.similarity` as a term function.

    The fixed and moving features (``similarity.features(image)``, e.g. MIND descriptors) are
    computed once per level in :meth:`prepare`; each evaluation warps the moving features with
    the field and compares them with the fixed ones inside :attr:`Evaluation.mask`. A
    :class:`~dirio.losses.by_level.SimilarityByLevel` (options with one value per pyramid level) is
    resolved to the level's own similarity object (:meth:`similarity_at`).

    ``features_from`` says which images the features are computed on: ``"level"`` (default) the
    level's own images, so a MIND dilation counts level voxels; ``"full"`` the full-grid images
    (``ctx.full_fixed`` / ``ctx.full_moving``), the features then being resampled onto the level
    grid with the pyramid's anti-aliasing; ``"pooled"`` the full-grid features averaged over blocks
    of the level's factor (:func:`pool_to_level`), as ConvexAdam average-pools its full-resolution
    MIND features for its half-resolution Adam stage (they sit at the block centres: use it with a
    transform on the ``align_corners=False`` geometry, ``grid_alignment="centres"``). Falls back to
    the level images when the context has no full-grid images (a training batch).

    ``sampling`` says how the moving features are read at ``x + u(x)``: ``"exact"`` (linear, edge
    values beyond the grid), or ``"convexadam"``, the two quirks of ConvexAdam's Adam stage, kept
    only to reproduce its field: it reads them at ``x + u(x) n / (n - 1)`` (``n`` voxels per axis:
    an ``align_corners=False`` grid plus a displacement normalised by ``(n - 1) / 2``) and as 0
    beyond the grid. Not for symmetric transforms.
    """

    def __init__(self, similarity, features_from: str = "level", sampling: str = "exact"):
        if features_from not in FEATURE_RESOLUTIONS:
            raise ValueError(f"features_from must be one of {', '.join(FEATURE_RESOLUTIONS)}, got {features_from!r}")
        if sampling not in FEATURE_SAMPLINGS:
            raise ValueError(f"feature sampling must be one of {', '.join(FEATURE_SAMPLINGS)}, got {sampling!r}")
        self.similarity = similarity
        self.features_from = features_from
        self.sampling = sampling

    def similarity_at(self, ctx: LevelContext):
        """The similarity object of the context's pyramid level (one per level when its options vary by
        level, :class:`dirio.losses.by_level.SimilarityByLevel`)."""
        return at_level(self.similarity, ctx.level)

    def _features(self, ctx: LevelContext, full: torch.Tensor | None, level: torch.Tensor) -> torch.Tensor:
        similarity = self.similarity_at(ctx)
        if self.features_from != "level" and full is not None and tuple(full.shape[2:]) != tuple(ctx.shape):
            with torch.no_grad():
                if self.features_from == "pooled":
                    return pool_to_level(similarity.features(full), ctx.shape)
                return resize_image(similarity.features(full), ctx.shape)
        return similarity.features(level)

    def prepare(self, ctx: LevelContext, name: str) -> None:
        ctx.cache[name] = (self._features(ctx, ctx.full_fixed, ctx.fixed),
                           self._features(ctx, ctx.full_moving, ctx.moving))

    def __call__(self, evaluation: Evaluation, name: str) -> torch.Tensor:
        fixed_features, moving_features = evaluation.ctx.cache[name]
        similarity = self.similarity_at(evaluation.ctx)
        if self.sampling == "convexadam" and evaluation.middle is None:
            field = evaluation.field
            ndim = field.shape[1]
            n = torch.tensor(field.shape[2:], device=field.device, dtype=field.dtype).view((1, ndim) + (1,) * ndim)
            coords = evaluation.ctx.identity + field * (n / (n - 1).clamp_min(1))
            return similarity(fixed_features, sample(moving_features, coords, padding="zeros"), evaluation.mask)
        fixed, warped = evaluation.warped_pair(fixed_features, moving_features)
        return similarity(fixed, warped, evaluation.mask)


class RegularizerTerm:
    """A regularizer of :mod:`dirio.losses.regularizers` applied to what the transform exposes."""

    def __init__(self, regularizer):
        self.regularizer = regularizer

    def __call__(self, evaluation: Evaluation, name: str) -> torch.Tensor:
        regularized = evaluation.regularized
        if regularized is None:
            raise ValueError(f"the regularizer {name!r} needs a transform with a field to regularize")
        return self.regularizer(regularized.field, regularized.spacing)


class DiceSupervision:
    """Soft Dice loss of label maps: ``1 - mean_l 2 |F_l . W_l| / (|F_l| + |W_l|)`` in [0, 1].

    The labels are taken from ``ctx.extra["fixed_labels"]`` and ``ctx.extra["moving_labels"]``:
    ``(B, L, *S)`` one-hot (or probability) maps of the level grid; the moving maps are warped
    with trilinear interpolation, which makes the loss differentiable (VoxelMorph's
    semi-supervised loss).
    """

    def __init__(self, eps: float = 1e-5):
        self.eps = float(eps)

    def __call__(self, evaluation: Evaluation, name: str) -> torch.Tensor:
        extra = evaluation.ctx.extra
        if "fixed_labels" not in extra or "moving_labels" not in extra:
            raise ValueError(f"the supervision term {name!r} needs fixed and moving label maps")
        fixed, moving = extra["fixed_labels"], extra["moving_labels"]
        warped = sample(moving.float(), evaluation.coords, mode="linear", padding="zeros")
        axes = tuple(range(2, warped.dim()))
        overlap = (fixed * warped).sum(axes)
        total = fixed.sum(axes) + warped.sum(axes)
        return 1.0 - (2.0 * overlap / (total + self.eps)).mean()


class KeypointSupervision:
    """Mean squared distance of corresponding keypoints after the transform, voxels² of the level grid.

    ``ctx.extra["fixed_keypoints"]`` and ``ctx.extra["moving_keypoints"]``: ``(B, N, ndim)`` voxel
    coordinates of the level grid. The field is sampled at the fixed points (trilinear), so the
    loss is ``mean || p_f + u(p_f) - p_m ||^2``, the squared TRE of the Learn2Reg convention.
    """

    def __call__(self, evaluation: Evaluation, name: str) -> torch.Tensor:
        extra = evaluation.ctx.extra
        if "fixed_keypoints" not in extra or "moving_keypoints" not in extra:
            raise ValueError(f"the supervision term {name!r} needs fixed and moving keypoints")
        fixed, moving = extra["fixed_keypoints"], extra["moving_keypoints"]
        ndim = fixed.shape[-1]
        # (B, ndim, N, 1[, 1]) sampling positions: sample() takes voxel coordinates on a grid layout
        coords = fixed.transpose(1, 2).reshape(fixed.shape[0], ndim, fixed.shape[1], *([1] * (ndim - 1)))
        moved = sample(evaluation.field, coords.to(evaluation.field.dtype), mode="linear", padding="border")
        moved = moved.reshape(fixed.shape[0], ndim, -1).transpose(1, 2) + fixed
        return ((moved - moving) ** 2).sum(-1).mean()


class InverseConsistencyTerm:
    """GradICON's regularizer for a network that registers both ways (Tian et al., CVPR 2023):
    ``sum_a sum_c mean((d c_c / d x_a)^2)`` of the displacement ``c(x) = u(x) + v(x + u(x))`` of the
    composed map, where ``u`` is the field of (fixed, moving) and ``v`` that of (moving, fixed).

    ``c`` is the displacement of ``Phi_AB o Phi_BA``; its Jacobian is ``grad(Phi_AB o Phi_BA) - I``, so
    the value is ``mean ||grad(Phi_AB o Phi_BA) - I||_F^2`` (forward differences in voxels of the level
    grid, >= 0, 0 for inverse-consistent maps). The transform must offer ``reverse_field(ctx)`` (every
    :class:`dirio.transforms.network.NetworkTransform` does: the network with its inputs swapped).
    """

    def __call__(self, evaluation: Evaluation, name: str) -> torch.Tensor:
        reverse = getattr(evaluation.transform, "reverse_field", None)
        if reverse is None:
            raise ValueError(f"the regularizer {name!r} needs a transform that registers both ways (a network)")
        backward = reverse(evaluation.ctx)
        composed = evaluation.field + sample(backward, evaluation.coords, mode="linear", padding="border")
        ndim = composed.dim() - 2
        total = composed.new_zeros(())
        for axis in range(ndim):
            difference = composed.narrow(2 + axis, 1, composed.shape[2 + axis] - 1) - composed.narrow(
                2 + axis, 0, composed.shape[2 + axis] - 1)
            total = total + (difference ** 2).mean(dim=tuple(range(2, 2 + ndim))).sum(1).mean()
        return total


def evaluate_terms(terms: Sequence[Term], evaluation: Evaluation) -> dict[str, torch.Tensor]:
    """Every term's scalar loss, in the given order."""
    return {term.name: term.function(evaluation, term.name) for term in terms}


def one_hot(labels: torch.Tensor, label_ids: Sequence[int]) -> torch.Tensor:
    """``(B, 1, *S)`` integer label map -> ``(B, L, *S)`` float one-hot maps of ``label_ids`` (sorted)."""
    ids = torch.as_tensor(list(label_ids), device=labels.device)
    index = torch.searchsorted(ids, labels.long().clamp(min=0))
    hit = (index < len(ids)) & (ids[index.clamp(max=len(ids) - 1)] == labels.long())
    onehot = F.one_hot(torch.where(hit, index, torch.full_like(index, len(ids))), len(ids) + 1)
    return onehot[:, 0, ..., :-1].movedim(-1, 1).float()
