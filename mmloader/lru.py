"""A small bounded LRU mapping, private to the process that uses it."""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Generic, Hashable, Iterator, TypeVar

V = TypeVar("V")


class LRU(Generic[V]):
    """At most ``capacity`` entries; ``get(key, load)`` returns the cached value or stores ``load()``.

    ``on_evict(key, value)``, when given, is called for each least recently used entry pushed out by ``get``
    (e.g. to close a file handle); not for ``pop`` or ``clear``. With ``weigh`` (value → a size, e.g. bytes) and
    ``max_weight``, entries are also pushed out while their total weight exceeds ``max_weight`` (the entry just
    loaded is kept even when it alone weighs more)."""

    def __init__(self, capacity: int, on_evict: Callable[[Hashable, V], None] | None = None,
                 weigh: Callable[[V], int] | None = None, max_weight: int | None = None):
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        if (weigh is None) != (max_weight is None):
            raise ValueError("weigh and max_weight go together")
        self.capacity = capacity
        self._on_evict = on_evict
        self._weigh, self.max_weight = weigh, max_weight
        self.weight = 0
        self._items: OrderedDict[Hashable, V] = OrderedDict()

    def get(self, key: Hashable, load: Callable[[], V]) -> V:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = load()
        self._items[key] = value
        if self._weigh is not None:
            self.weight += self._weigh(value)
        while len(self._items) > self.capacity or (
                self.max_weight is not None and self.weight > self.max_weight and len(self._items) > 1):
            old_key, old = self._items.popitem(last=False)
            if self._weigh is not None:
                self.weight -= self._weigh(old)
            if self._on_evict is not None:
                self._on_evict(old_key, old)
        return value

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def pop(self, key: Hashable) -> V | None:
        """Forget ``key`` (e.g. an entry found invalid); its value, or None if it was not there."""
        value = self._items.pop(key, None)
        if value is not None and self._weigh is not None:
            self.weight -= self._weigh(value)
        return value

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Hashable]:
        """The keys, least recently used first."""
        return iter(list(self._items))

    def values(self) -> list[V]:
        """The values, least recently used first."""
        return list(self._items.values())

    def clear(self) -> None:
        """Forget every entry (``on_evict`` is not called)."""
        self._items.clear()
        self.weight = 0
