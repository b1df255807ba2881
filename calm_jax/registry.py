"""String registry of runnable methods: `config.method` names one.

Method packages register a `run(config, workdir) -> results dict` function here; the core
never imports a method package (the launch entry points do). However a method is started (an
entry point, a test, another method running it for a part), its workdir is checked, locked and
marked as one of our runs for the duration (`calm_jax.train.workdir.run_in_workdir`).
"""
from __future__ import annotations

import functools
from typing import Callable

_METHODS: dict[str, Callable] = {}


def register_method(name: str):
  def deco(fn):
    if name in _METHODS:
      raise ValueError(f"method {name!r} registered twice")

    @functools.wraps(fn)
    def run(config, workdir):
      if workdir is None:  # an evaluation that writes nothing
        return fn(config, workdir)
      from calm_jax.train.workdir import run_in_workdir
      with run_in_workdir(workdir, config):
        return fn(config, workdir)

    _METHODS[name] = run
    return run
  return deco


def get_method(name: str) -> Callable:
  if name not in _METHODS:
    raise KeyError(f"unknown method {name!r}; registered: {', '.join(sorted(_METHODS)) or 'none'}")
  return _METHODS[name]


def methods() -> list[str]:
  return sorted(_METHODS)
