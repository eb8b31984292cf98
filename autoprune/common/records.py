"""Typed records: frozen dataclasses stored as namespaced, JSON-able attributes.

A study keeps what defines it as Optuna user attributes. Rather than loose keys written in one
place and read back by hand in others, each kind of fact is a frozen dataclass that converts
itself: ``record.to_attrs()`` gives ``{"<namespace>.<field>": value}`` and
``Record.from_attrs(attrs)`` reads it back, with the types restored (tuples stay tuples).

Each field says, in its metadata, what it means for a study (see :func:`spec`):

* ``identity``: two searches with different values are different searches, so ``--resume`` and
  ``export`` refuse to mix them;
* ``sibling``: studies that agree on these searched the same task and are plotted together;
* ``legacy``: the value a study written before the field existed implies, and ``legacy_key``
  the bare key such a study stored it under.

A field whose type is itself a record is stored flat, under that record's own namespace: a
study's ``search.*`` keys hold the search's settings and, inside them, the env's.
"""

from __future__ import annotations

import dataclasses
import operator
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar

from autoprune.errors import AutopruneError

R = TypeVar("R", bound="Record")
_MISSING = dataclasses.MISSING


def spec(default: Any = _MISSING, *, identity: bool = False, sibling: bool = False,
         legacy: Any = _MISSING, legacy_key: str | None = None, default_factory: Any = _MISSING,
         equal: Callable[[Any, Any], bool] = operator.eq):
    """A record field with its meaning for studies (identity, sibling, legacy value and key, and
    ``equal``, when two values count as the same)."""
    meta = {"identity": identity, "sibling": sibling, "legacy": legacy, "legacy_key": legacy_key,
            "equal": equal}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


class Record:
    """Mixin for frozen dataclasses kept in a study under ``namespace``."""

    namespace: ClassVar[str] = ""

    def to_attrs(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out.update(value.to_attrs() if isinstance(value, Record) else {self.key(f.name): _plain(value)})
        return out

    @classmethod
    def _nested(cls) -> dict[str, type[Record]]:
        """Fields that hold a record of their own, by name."""
        hints = typing.get_type_hints(cls)
        return {f.name: hints[f.name] for f in dataclasses.fields(cls)
                if isinstance(hints[f.name], type) and issubclass(hints[f.name], Record)}

    @classmethod
    def key(cls, name: str) -> str:
        return f"{cls.namespace}.{name}" if cls.namespace else name

    @classmethod
    def lookup(cls, attrs: Mapping[str, Any], name: str) -> tuple[bool, Any]:
        """``(found, value)`` of field ``name`` in ``attrs``: under its namespaced key, else its
        ``legacy_key`` (or bare name) as studies made before records stored it, else its
        ``legacy`` value if it has one."""
        f = next(f for f in dataclasses.fields(cls) if f.name == name)
        hint = typing.get_type_hints(cls)[name]
        for key in (cls.key(name), f.metadata.get("legacy_key") or name):
            if key in attrs:
                return True, _typed(attrs[key], hint)
        if f.metadata.get("legacy", _MISSING) is not _MISSING:
            return True, f.metadata["legacy"]
        return False, None

    @classmethod
    def from_attrs(cls: type[R], attrs: Mapping[str, Any]) -> R:
        """Read the record from a study's attributes (or any mapping ``to_attrs`` wrote); a field
        found nowhere (see :meth:`lookup`) takes its default, and a required one is an error."""
        values: dict[str, Any] = {name: kind.from_attrs(attrs) for name, kind in cls._nested().items()}
        for f in dataclasses.fields(cls):
            if f.name in values:
                continue
            found, value = cls.lookup(attrs, f.name)
            if found:
                values[f.name] = value
            elif f.default is _MISSING and f.default_factory is _MISSING:
                raise AutopruneError(f"the study has no {cls.key(f.name)!r}: it was not made by "
                                     "autoprune search")
        return cls(**values)

    @classmethod
    def sibling_keys(cls) -> list[str]:
        nested = cls._nested()
        return [k for f in dataclasses.fields(cls)
                for k in (nested[f.name].sibling_keys() if f.name in nested
                          else [cls.key(f.name)] if f.metadata.get("sibling") else [])]

    def mismatch(self, attrs: Mapping[str, Any]) -> tuple[str, Any, Any] | None:
        """The first identity field that ``attrs`` records with another value, as
        ``(name, theirs, mine)``; fields ``attrs`` lacks are not compared (a run killed while it
        wrote them)."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Record):
                found_inside = value.mismatch(attrs)
                if found_inside:
                    return found_inside
            elif f.metadata.get("identity"):
                found, theirs = self.lookup(attrs, f.name)
                if found and not f.metadata["equal"](theirs, getattr(self, f.name)):
                    return f.name, theirs, getattr(self, f.name)
        return None

    def same(self, attrs: Mapping[str, Any], which: str = "sibling") -> bool:
        """Whether ``attrs`` records the same value for every field marked ``which``."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Record):
                if not value.same(attrs, which):
                    return False
            elif f.metadata.get(which):
                found, theirs = self.lookup(attrs, f.name)
                if not (found and f.metadata["equal"](theirs, getattr(self, f.name))):
                    return False
        return True


def _plain(value: Any) -> Any:
    """JSON-able form: tuples become lists (Optuna stores user attributes as JSON)."""
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _typed(value: Any, hint: Any) -> Any:
    """Undo :func:`_plain` for the field's declared type (lists back to tuples)."""
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _typed(value, args[0])
    return value
