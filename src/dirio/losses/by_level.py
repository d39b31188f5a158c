"""Similarity options that change with the pyramid level.

An option of the similarity may be given one value per pyramid level, coarse to fine, instead of one
value for all: ``{"window": (5, 5, 9)}`` is LNCC with a 5-voxel window at the first two levels and a
9-voxel window at the third (``--similarity-options window=5/5/9`` on the command line). The
similarity is then a :class:`SimilarityByLevel`: one similarity object per level, and the engine's
:class:`~dirio.losses.terms.SimilarityTerm` uses the one of the level it runs (``ctx.level``).

A list must have exactly one value per level (:func:`check_level_options`). A preset's lists follow
an override of its levels by shrink factor (:func:`align_to_levels`): ``--preset brain-mri --levels
2,1`` keeps the preset's half- and full-resolution windows at those levels, ``--levels 4,2`` its
quarter- and half-resolution ones.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from dirio.losses.similarity import make_similarity

__all__ = ["SimilarityByLevel", "align_to_levels", "at_level", "check_level_options", "level_count",
           "make_level_similarity", "options_at"]


def _is_list(value: Any) -> bool:
    return isinstance(value, (list, tuple))


def level_count(options: Mapping[str, Any]) -> int | None:
    """How many levels the list-valued options give values for; ``None`` when no option is a list.

    Raises:
        ValueError: two list-valued options of different lengths, or an empty list.
    """
    lengths = {key: len(value) for key, value in options.items() if _is_list(value)}
    if not lengths:
        return None
    if len(set(lengths.values())) > 1 or 0 in lengths.values():
        listed = ", ".join(f"{key} ({n})" for key, n in lengths.items())
        raise ValueError(f"similarity options with one value per level must all have the same, non-zero number "
                         f"of values; got {listed}")
    return next(iter(lengths.values()))


def check_level_options(options: Mapping[str, Any], levels: int) -> None:
    """``ValueError`` unless every list-valued option has exactly ``levels`` values (one per level)."""
    count = level_count(options)
    if count is not None and count != levels:
        keys = ", ".join(key for key, value in options.items() if _is_list(value))
        raise ValueError(f"similarity option(s) {keys} give {count} values (one per pyramid level) but there are "
                         f"{levels} levels: give one value, or {levels} values separated by '/'")


def options_at(options: Mapping[str, Any], level: int) -> dict[str, Any]:
    """The options of level ``level`` (0 = coarsest): each list replaced by its value there."""
    return {key: value[level] if _is_list(value) else value for key, value in options.items()}


def align_to_levels(options: Mapping[str, Any], from_levels: Sequence[float],
                    to_levels: Sequence[float]) -> dict[str, Any]:
    """Options given one value per level of the pyramid ``from_levels`` (shrink factors, coarse to
    fine), refitted to the pyramid ``to_levels``: each new level takes the value of the old level with
    the nearest shrink factor (on a log scale; the finer one on a tie).

    ``{"window": (5, 5, 9)}`` of the levels ``(4, 2, 1)`` gives ``(5, 9)`` for ``(2, 1)``, ``(5, 5)``
    for ``(4, 2)`` and ``(5, 5, 5, 9)`` for ``(8, 4, 2, 1)``. Options that are not lists, and lists
    whose length is not ``len(from_levels)``, are returned as they are.
    """
    old = [float(f) for f in from_levels]
    nearest = [min(range(len(old)), key=lambda i: (round(abs(math.log2(old[i]) - math.log2(float(f))), 9), old[i]))
               for f in to_levels]
    aligned = {}
    for key, value in options.items():
        if _is_list(value) and len(value) == len(old):
            value = tuple(value[i] for i in nearest)
        aligned[key] = value
    return aligned


class SimilarityByLevel:
    """One similarity object per pyramid level, coarse to fine (see the module docstring).

    Args:
        similarities: the levels' similarity objects, all of one family.
    """

    def __init__(self, similarities: Sequence[Any]):
        if not similarities:
            raise ValueError("SimilarityByLevel needs one similarity per level, got none")
        names = {getattr(s, "name", None) for s in similarities}
        if len(names) != 1:
            raise ValueError(f"the levels' similarities must be of one family, got {sorted(map(str, names))}")
        self.similarities = tuple(similarities)
        self.name = names.pop()

    def at(self, level: int) -> Any:
        """The similarity of pyramid level ``level`` (0 = coarsest; beyond the last: the finest)."""
        return self.similarities[min(max(int(level), 0), len(self.similarities) - 1)]

    @property
    def finest(self) -> Any:
        """The finest level's similarity (what a full-resolution score uses)."""
        return self.similarities[-1]

    @property
    def coarsest(self) -> Any:
        """The coarsest level's similarity (what the affine stage, with its own pyramid, uses)."""
        return self.similarities[0]


def make_level_similarity(name: str, options: Mapping[str, Any]) -> Any:
    """``make_similarity(name, **options)``, or a :class:`SimilarityByLevel` when an option is a list."""
    count = level_count(options)
    if count is None:
        return make_similarity(name, **options)
    return SimilarityByLevel([make_similarity(name, **options_at(options, level)) for level in range(count)])


def at_level(similarity: Any, level: int) -> Any:
    """The similarity object to use at pyramid level ``level``: ``similarity`` itself unless it varies by level."""
    return similarity.at(level) if isinstance(similarity, SimilarityByLevel) else similarity
