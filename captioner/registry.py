"""A small name -> class registry.

Call contract: ``build(name, **kwargs)`` returns ``registered_class(**kwargs)``; an unknown
name raises :class:`~captioner.errors.ConfigError` listing the valid names; registering a
name twice raises ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from captioner.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to classes (or factories) of one kind.

    Args:
        kind: what is registered, for error messages ("attention", "score").
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator: ``@REG.register("soft") class Soft...``."""

        def add(obj: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = obj
            return obj

        return add

    def get(self, name: str) -> Callable[..., T]:
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; valid names: {', '.join(self.names())}"
            ) from None

    def build(self, name: str, **kwargs: Any) -> T:
        return self.get(name)(**kwargs)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries
