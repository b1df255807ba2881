"""String registry of runnable methods: `config.method` names one.

Method packages register a `run(config, workdir) -> results dict` function here; the core
never imports a method package (the launch entry points do).
"""
from __future__ import annotations

from typing import Callable

_METHODS: dict[str, Callable] = {}


def register_method(name: str):
  def deco(fn):
    if name in _METHODS and _METHODS[name] is not fn:
      raise ValueError(f"method {name!r} registered twice")
    _METHODS[name] = fn
    return fn
  return deco


def get_method(name: str) -> Callable:
  if name not in _METHODS:
    raise KeyError(f"unknown method {name!r}; registered: {', '.join(sorted(_METHODS)) or 'none'}")
  return _METHODS[name]


def methods() -> list[str]:
  return sorted(_METHODS)
