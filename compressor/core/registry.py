"""The one registration pattern: a named table filled by `register`, used as a decorator or a call.

Stages, importance criteria, layer-family handlers and runtime targets are each one `Registry`;
everything that lists them (the recipe's stage union and its error text, the criterion names,
the support list, the target names) reads the table, so a new entry is one registration.
"""
from __future__ import annotations

from typing import Callable, Generic, TypeVar

from compressor.core.errors import CompressorError

T = TypeVar("T")


class Registry(dict, Generic[T]):
    """name -> entry, in registration order. `key(entry)` names an entry registered without a name."""

    def __init__(self, kind: str, key: Callable[[T], str] | None = None):
        super().__init__()
        self.kind = kind
        self._key = key or (lambda entry: entry.name)

    def register(self, entry: T | None = None, *, name: str | None = None):
        """Add `entry` under `name` (default: its key) and return it; without an entry, a decorator.
        Registering a name again replaces the entry (re-importing a module is harmless)."""
        if entry is None:
            return lambda late: self.register(late, name=name)
        self[name or self._key(entry)] = entry
        return entry

    def lookup(self, name: str) -> T:
        """The entry, or a one-line error naming the registered ones (`get` stays dict's)."""
        try:
            return self[name]
        except KeyError:
            raise CompressorError(f"unknown {self.kind} '{name}'; choose from {', '.join(self)}") from None

    def names(self) -> tuple[str, ...]:
        return tuple(self)
