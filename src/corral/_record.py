"""A small immutable value type.

corral's policy objects sit on the start-up path of every `corral run`, where importing
`dataclasses` alone costs more than the whole sandbox launch on slow hosts. `Record` gives the
same value semantics (keyword construction done by each class, equality, hashing, repr,
`replace`) with nothing to import.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Self


class Record:
    """Immutable value object. Subclasses declare `__slots__` and set fields with `_set`."""

    __slots__ = ()

    def _set(self, **fields: Any) -> None:
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable; use .replace({name}=...)")

    @classmethod
    def _fields(cls) -> tuple[str, ...]:
        names: list[str] = []
        for klass in reversed(cls.__mro__):
            names.extend(klass.__dict__.get("__slots__", ()))
        return tuple(names)

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._fields()}

    def replace(self, **changes: Any) -> Self:
        fields = self.as_dict()
        unknown = set(changes) - set(fields)
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field(s) {sorted(unknown)}")
        fields.update(changes)
        return type(self)(**fields)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n in self._fields())

    def __hash__(self) -> int:
        return hash((type(self).__name__, *(getattr(self, n) for n in self._fields())))

    def __repr__(self) -> str:
        inner = ", ".join(f"{n}={getattr(self, n)!r}" for n in self._fields())
        return f"{type(self).__name__}({inner})"
