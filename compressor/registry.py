"""Name → object registries (stages, losses, importance criteria, runners).

Registering a name twice is an error, not a silent overwrite; an unknown name lists the known ones.
"""

from collections.abc import Callable, Iterator
from difflib import get_close_matches
from typing import Generic, TypeVar

from compressor.errors import CompressorError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, what: str):
        self.what = what
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            self.add(name, obj)
            return obj

        return decorator

    def add(self, name: str, obj: T) -> None:
        if name in self._items:
            raise ValueError(f"{self.what} '{name}' is already registered ({self._items[name]!r})")
        self._items[name] = obj

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            hint = get_close_matches(name, self._items, n=1)
            did_you_mean = f" Did you mean '{hint[0]}'?" if hint else ""
            raise CompressorError(
                f"unknown {self.what} '{name}'; known: {', '.join(sorted(self._items))}.{did_you_mean}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))
