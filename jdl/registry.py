"""One small registry per kind of part (models, optimizers, schedules, ...).

A registry maps a plain name to a constructor. Looking up an unknown name raises
`ConfigError` listing the known names, so every CLI flag that picks a part by
name gets the same one-line error for free.
"""
from typing import Dict, Iterator, TypeVar

from jdl.errors import ConfigError

T = TypeVar("T")


class Registry:
  """Name -> object table for one kind of part.

  Arguments:
    kind: what the entries are, used in error messages ("model", "optimizer").
  """

  def __init__(self, kind: str):
    self.kind = kind
    self._entries: Dict[str, object] = {}

  def register(self, name: str, obj: T = None):
    """Adds `obj` under `name`; with `obj` omitted, works as a decorator."""
    if obj is None:
      return lambda o: self.register(name, o)
    if name in self._entries:
      raise KeyError(f"{self.kind} {name!r} registered twice")
    self._entries[name] = obj
    return obj

  def lookup(self, name: str):
    """Returns the entry for `name` or raises ConfigError listing valid names."""
    try:
      return self._entries[name]
    except KeyError:
      raise ConfigError(
          f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}"
      ) from None

  def names(self):
    return sorted(self._entries)

  def __contains__(self, name) -> bool:
    return name in self._entries

  def __iter__(self) -> Iterator[str]:
    return iter(self.names())

  def __len__(self) -> int:
    return len(self._entries)
