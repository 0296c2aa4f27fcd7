"""A small name -> object registry with did-you-mean errors (timm/diffusers style)."""
from __future__ import annotations

import difflib
import fnmatch
from typing import Any, Callable, Iterator

from brainenc.exceptions import ConfigError


class Registry:
    """Map names to objects (classes, factories, functions).

    Examples
    --------
    >>> BACKBONES = Registry("backbone")
    >>> @BACKBONES.register("toy")
    ... def make_toy():
    ...     return "toy"
    >>> BACKBONES.get("toy")()
    'toy'
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Any] = {}
        self._meta: dict[str, dict] = {}

    def register(self, name: str, obj: Any = None, *, overwrite: bool = False, **meta) -> Callable:
        """Register ``obj`` under ``name``; usable as a decorator when ``obj`` is None."""

        def _add(o):
            if name in self._items and not overwrite:
                raise ConfigError(f"{self.kind} {name!r} is already registered")
            self._items[name] = o
            self._meta[name] = dict(meta)
            return o

        if obj is not None:
            return _add(obj)
        return _add

    def get(self, name: str) -> Any:
        """Return the object registered as ``name`` or raise with close matches."""
        try:
            return self._items[name]
        except KeyError:
            close = difflib.get_close_matches(name, list(self._items), n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            known = ", ".join(sorted(self._items)) or "(none)"
            raise ConfigError(f"unknown {self.kind} {name!r}.{hint} Known: {known}") from None

    def meta(self, name: str) -> dict:
        self.get(name)
        return dict(self._meta[name])

    def list(self, pattern: str = "*") -> list[str]:
        """Sorted registered names matching a glob ``pattern``."""
        return sorted(n for n in self._items if fnmatch.fnmatch(n, pattern))

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self)} entries)"
