"""One registry pattern for every pluggable family (similarities, regularizers, transforms, rules,
schedules, optimizers, stages, stopping rules).

A :class:`Registry` maps names to factories (classes or functions). ``create(name, **options)``
checks the name against the known ones and the options against the factory's signature, so an
unknown name or option is a one-line ``ValueError`` that lists the valid choices, before any work.
"""

from __future__ import annotations

import inspect
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Named factories of one family.

    Args:
        family: what the entries are, for messages (``"similarity"``, ``"combination rule"``...).
        hidden_options: options every factory may take that are not the user's to set (e.g. the
            run's ``generator``); they are accepted by :meth:`create` but not listed in messages.
    """

    def __init__(self, family: str, hidden_options: tuple[str, ...] = ()):
        self.family = family
        self.hidden_options = tuple(hidden_options)
        self._entries: dict[str, Callable[..., T]] = {}

    def register(self, name: str, factory: Callable[..., T] | None = None):
        """Add ``factory`` under ``name``; usable as a decorator (``@registry.register("lncc")``)."""
        if factory is None:
            return lambda f: self.register(name, f)
        if name in self._entries:
            raise ValueError(f"{self.family} {name!r} is registered twice")
        self._entries[name] = factory
        return factory

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> tuple[str, ...]:
        """The registered names, in registration order."""
        return tuple(self._entries)

    def get(self, name: str) -> Callable[..., T]:
        """The factory of ``name``; ``ValueError`` listing the choices when unknown."""
        if name not in self._entries:
            raise ValueError(f"unknown {self.family} {name!r}; choose one of {', '.join(self._entries)}")
        return self._entries[name]

    def options(self, name: str) -> list[str]:
        """The option names the factory of ``name`` accepts (its keyword parameters)."""
        factory = self.get(name)
        target = factory.__init__ if inspect.isclass(factory) else factory
        parameters = inspect.signature(target).parameters.values()
        return [p.name for p in parameters if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]

    def accepts_any_option(self, name: str) -> bool:
        factory = self.get(name)
        target = factory.__init__ if inspect.isclass(factory) else factory
        return any(p.kind == p.VAR_KEYWORD for p in inspect.signature(target).parameters.values())

    def check_options(self, name: str, options: dict) -> None:
        """``ValueError`` naming the unknown options of ``name`` and listing the valid ones."""
        if self.accepts_any_option(name):
            return
        valid = self.options(name)
        unknown = sorted(set(options) - set(valid))
        if unknown:
            listed = ", ".join(v for v in valid if v not in self.hidden_options) or "none"
            raise ValueError(
                f"unknown option(s) {', '.join(unknown)} for {self.family} {name!r}; valid options: {listed}"
            )

    def create(self, name: str, **options) -> T:
        """Build ``name`` with ``options`` (checked first)."""
        self.check_options(name, options)
        return self.get(name)(**options)
