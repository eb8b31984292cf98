"""A string-keyed registry, one per extension point (models, datasets, importance, ...).

The CLI's choices, its ``--help`` text, validation and the parametrised tests all read from the
same registry, so a new entry is offered, checked and tested without editing a list elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from autoprune.errors import AutopruneError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to factories (or objects) of one kind.

    Args:
        kind: what the entries are, used in error messages ("model", "dataset", ...).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._help: dict[str, str] = {}

    def register(self, name: str, help: str = "") -> Callable[[T], T]:
        """Decorator that files ``obj`` under ``name``; a second entry of one name is a bug."""

        def add(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            doc = help or (getattr(obj, "__doc__", None) or "").strip().split("\n")[0]
            self._help[name] = doc
            return obj

        return add

    def get(self, name: str) -> T:
        """The entry for ``name``; an unknown name is a user error that lists the known ones."""
        try:
            return self._entries[name]
        except KeyError:
            raise AutopruneError(
                f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        return list(self._entries)

    def describe(self, name: str) -> str:
        return self._help.get(name, "")

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
