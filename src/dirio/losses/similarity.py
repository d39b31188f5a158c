"""The registry of image similarity families and its factory.

Every family implements the contract of :class:`dirio.losses.base.Similarity` and lives in its own
module: ``lncc`` (:mod:`dirio.losses.lncc`), ``ncc`` (:mod:`dirio.losses.ncc`), ``mse``
(:mod:`dirio.losses.mse`), ``mind`` (:mod:`dirio.losses.mind`, MIND-SSC features with MSE) and
``nmi`` (:mod:`dirio.losses.nmi`). :data:`SIMILARITIES` maps these names to the classes;
:func:`make_similarity` builds one by name with its options checked first.
"""

from __future__ import annotations

from dirio.core.registry import Registry
from dirio.losses.base import Similarity
from dirio.losses.lncc import LNCC
from dirio.losses.mind import MINDSSC
from dirio.losses.mse import MSE
from dirio.losses.ncc import NCC
from dirio.losses.nmi import NMI

__all__ = ["SIMILARITIES", "make_similarity"]

# Each family is registered under its class's ``name``, in the order the messages list them.
SIMILARITIES: Registry[Similarity] = Registry("similarity")
for _family in (LNCC, NCC, MSE, MINDSSC, NMI):
    SIMILARITIES.register(_family.name, _family)
del _family


def make_similarity(name: str, **options) -> Similarity:
    """Build a similarity by factory name (``lncc``, ``ncc``, ``mse``, ``mind``, ``nmi``).

    Raises:
        ValueError: unknown name (lists the valid names) or unknown option (lists the valid
            options of that measure), or an invalid option value.
    """
    return SIMILARITIES.create(name, **options)
