"""Registries of methods and ensembles: name -> entry, filled by the classes themselves.

A method class registers itself under its ``name`` when it is defined (``__init_subclass__``),
an ensemble class under each of its presets' names; the CLI's choices, the benchmark sweeps,
the planner's labels and the tests all read these registries, so a new method or ensemble is
one file (or one class in a user's script) and appears everywhere at once.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """An ordered name -> entry mapping that refuses silent redefinition by another class."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> None:
        if not isinstance(name, str) or not name or name != name.strip():
            raise ValueError(f"{self.what} names must be non-empty strings, got {name!r}")
        old = self._entries.get(name)
        if old is not None and _qualname(old) != _qualname(entry):
            raise ValueError(
                f"{self.what} {name!r} is already registered by {_qualname(old)}; "
                f"choose another name for {_qualname(entry)}"
            )
        self._entries[name] = entry  # the same class redefined (a reload) replaces itself

    def remove(self, name: str) -> None:
        """Forget ``name`` (e.g. a method a test defined for itself)."""
        self._entries.pop(name, None)

    def get_entry(self, name: str) -> T:
        """The entry called ``name``; a clear error listing the known names otherwise."""
        if name not in self._entries:
            raise ValueError(f"unknown {self.what} {name!r}; choose from {', '.join(self)}")
        return self._entries[name]

    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.what}: {', '.join(self)})"


def _qualname(entry: object) -> str:
    cls = getattr(entry, "cls", entry)
    return f"{getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', repr(cls))}"
