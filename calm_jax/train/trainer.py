"""The one training loop every method uses.

A method hands over an NNX model, the Variable type(s) that train (`SVFParam`, `LoRAParam`, ...;
`nnx.Param` for the base itself), a loss `loss_fn(model, batch, rng) -> (loss, metrics)` and a
deterministic `batch_fn(step) -> numpy batch`. The trainer splits the model into the trainable
state (those types, minus paths matching `config.frozen` regexes) and the frozen rest: gradients
and optimizer state exist only for the former, the latter travels through the jitted step
untouched. Every parameter must be one or the other on purpose (`check_coverage`). State is
sharded on the config's mesh, checkpointed with orbax (trainable + optimizer + step; the data
position is the step), and resumed from the workdir.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from calm_jax import sharding
from calm_jax.atomic import atomic_write_text
from calm_jax.errors import UserError
from calm_jax.fingerprint import structure_fingerprint
from calm_jax.train.checkpoint import Checkpointer
from calm_jax.train.metrics import MetricWriter, check_finite
from calm_jax.train.optim import make_optimizer, schedule
from calm_jax.train.workdir import identity, run_in_workdir


@dataclasses.dataclass
class TrainResult:
  model: nnx.Module
  step: int
  metrics: dict
  eval: dict
  seconds: float
  resumed_from: int | None


def path_name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


class CoverageError(UserError):
  """A parameter that is neither trainable nor frozen on purpose, or a frozen regex that freezes nothing."""


def _types(types) -> tuple[type, ...]:
  types = types if isinstance(types, (tuple, list)) else (types,)
  bad = [t for t in types if not (isinstance(t, type) and issubclass(t, nnx.Variable))]
  if bad:
    raise TypeError(f"trainable / frozen take nnx.Variable types (e.g. calm_jax.variables.LoRAParam), got {bad}")
  return tuple(types)


def trainable_filter(trainable, frozen_regexes=()):
  """NNX filter: exact Variable type in `trainable` (a type or tuple), path matching no frozen regex."""
  types = _types(trainable)
  pats = [re.compile(r) for r in frozen_regexes]

  def filt(path, var):
    return type(var) in types and not any(p.fullmatch(path_name(path)) for p in pats)

  return filt


def check_coverage(model, trainable, frozen=(), frozen_regexes=()) -> None:
  """Every parameter either trains or is frozen on purpose, and every frozen regex freezes something.

  Trainable: exact type in `trainable`, path matching no regex of `frozen_regexes`. Frozen on
  purpose: the base (`nnx.Param` itself, unless it is what trains), a type in `frozen`, or a path a
  regex matches. Anything else, e.g. a method's parameter type the caller forgot, is an error naming
  it, as is a regex that matches no trainable-typed parameter (a typo freezes nothing otherwise).
  """
  types, frozen_types = _types(trainable), (nnx.Param,) + _types(frozen)
  pats = [(r, re.compile(r)) for r in frozen_regexes]
  used, neither, names = set(), [], []
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    name = path_name(path)
    kind = type(var)
    if kind in types:
      names.append(name)
      used.update(r for r, p in pats if p.fullmatch(name))
    elif kind not in frozen_types and not any(p.fullmatch(name) for _, p in pats):
      neither.append(f"{name} ({kind.__name__})")
  if neither:
    shown = ", ".join(neither[:8]) + (f", ... {len(neither) - 8} more" if len(neither) > 8 else "")
    raise CoverageError(f"parameters neither trainable ({', '.join(t.__name__ for t in types)}) nor frozen: {shown}; "
                        "pass their type to train(trainable=...) or train(frozen=...)")
  unused = [r for r, _ in pats if r not in used]
  if unused:
    raise CoverageError(f"config.frozen regexes {unused} match no trainable parameter; trainable parameters: "
                        f"{', '.join(names[:12])}{' ...' if len(names) > 12 else ''}")


def config_to_json(config) -> str:
  try:
    return config.to_json_best_effort(indent=2, sort_keys=True)
  except AttributeError:
    return json.dumps(config, indent=2, default=str)


def split_trainable(model, filt):
  graphdef, trainable, frozen = nnx.split(model, filt, ...)
  if not jax.tree.leaves(trainable):
    raise CoverageError("no trainable parameters: the trainable types / config.frozen select nothing in this model")
  return graphdef, trainable, frozen


def train(model: nnx.Module, *, trainable, loss_fn: Callable, batch_fn: Callable[[int], dict], config, workdir,
          frozen=(), eval_fn: Callable[[nnx.Module, int], dict] | None = None, meta: dict | None = None,
          mesh=None, quiet: bool = False) -> TrainResult:
  """Trains the `trainable` Variable type(s) of `model` for `config.steps` steps; resumes from
  `workdir/checkpoints` if present. `frozen`: other parameter types kept frozen on purpose (the
  base's `nnx.Param` always is, unless it is what trains).

  Config keys: steps, batch_size, seed, frozen (regexes), optimizer (see optim.make_optimizer),
  mesh (`sharding.mesh_shape`), rules, log_every, eval_every, checkpoint.every, checkpoint.keep,
  tensorboard, resume_with_changes. The config is validated before any work; the workdir must be
  new, empty or one of our runs, and is locked for the run (`workdir.run_in_workdir`); a checkpoint
  there is resumed only if it is of the same config (`workdir.identity`).
  """
  validate_config(config)
  with run_in_workdir(workdir, config) as workdir:
    return _train(model, trainable=trainable, loss_fn=loss_fn, batch_fn=batch_fn, config=config, workdir=workdir,
                  frozen=frozen, eval_fn=eval_fn, meta=meta, mesh=mesh, quiet=quiet)


def _train(model, *, trainable, loss_fn, batch_fn, config, workdir: Path, frozen, eval_fn, meta, mesh,
           quiet) -> TrainResult:
  t0 = time.time()
  mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh, batch_size=int(config.batch_size))
  rules = sharding.rules_from_config(config.rules)
  dp = sharding.data_parallel_size(mesh)
  if int(config.batch_size) % dp:
    raise sharding.ShardingError(f"batch_size {config.batch_size} is not divisible by the data-parallel size {dp} "
                                 f"(mesh {dict(zip(mesh.axis_names, mesh.axis_sizes))})")
  check_coverage(model, trainable, frozen, config.frozen)
  graphdef, trainable, frozen = split_trainable(model, trainable_filter(trainable, config.frozen))

  meta = {**(meta or {}), "method": config.get("method", ""),
          "trainable": structure_fingerprint(nnx.to_pure_dict(trainable)),
          "frozen": structure_fingerprint(nnx.to_pure_dict(frozen)), "config": identity(config)}
  ckpt = Checkpointer(workdir, every=config.checkpoint.every, keep=config.checkpoint.keep, meta=meta)
  changes = ckpt.check_compatible(bool(config.resume_with_changes))
  if jax.process_index() == 0:  # the config of the first steps is never overwritten
    name = f"config.resumed-{ckpt.latest_step()}.json" if changes else "config.json"
    if changes or ckpt.latest_step() is None or not (workdir / "config.json").exists():
      atomic_write_text(workdir / name, config_to_json(config))

  trainable = jax.device_put(trainable, sharding.shardings_for_state(trainable, mesh, rules))
  frozen = jax.device_put(frozen, sharding.shardings_for_state(frozen, mesh, rules))
  total = int(config.steps)
  tx = make_optimizer(config.optimizer, total)
  lr_at = schedule(config.optimizer, total)
  with jax.set_mesh(mesh):
    opt_state = jax.jit(tx.init)(trainable)
  replicated = jax.sharding.NamedSharding(mesh, jax.P())
  t_sh = jax.tree.map(lambda x: x.sharding, trainable)
  # Scalars (step counts) come out of init without a mesh: pin every leaf to one on `mesh`.
  o_sh = jax.tree.map(lambda x: x.sharding if isinstance(x.sharding, jax.sharding.NamedSharding)
                      and x.sharding.mesh == mesh else replicated, opt_state)
  opt_state = jax.device_put(opt_state, o_sh)
  f_sh = jax.tree.map(lambda x: x.sharding, frozen)

  start = 0
  resumed = None
  restored = ckpt.restore({"trainable": nnx.to_pure_dict(trainable), "opt_state": opt_state,
                           "step": np.zeros((), np.int64), "data_position": np.zeros((), np.int64)})
  if restored is not None:
    nnx.replace_by_pure_dict(trainable, restored["trainable"])
    trainable = jax.device_put(trainable, t_sh)
    opt_state = jax.device_put(restored["opt_state"], o_sh)
    start = resumed = int(restored["step"])
    if not quiet:
      print(f"resumed from {ckpt.dir} at step {start}")

  if not quiet and jax.process_index() == 0:
    n = sum(np.size(x) for x in jax.tree.leaves(trainable))
    print(f"training {n:,} parameters of {config.get('method', '') or 'the model'} on mesh "
          f"{dict(zip(mesh.axis_names, mesh.axis_sizes))} ({mesh.size} device(s), {jax.process_count()} process(es))")
  base_key = jax.random.key(int(config.seed))
  batch_sh = sharding.batch_sharding(mesh)

  step_fn = make_step(graphdef, tx, loss_fn, in_shardings=(t_sh, o_sh, f_sh, batch_sh, None),
                      out_shardings=(t_sh, o_sh, None))

  writer = MetricWriter(workdir, tensorboard=config.tensorboard)
  log_every = int(config.log_every)
  eval_every = int(config.eval_every)
  metrics: dict[str, Any] = {}
  evals: dict[str, Any] = {}
  bar = tqdm(range(start, total), initial=start, total=total, desc=config.get("method", "train"),
             disable=quiet or jax.process_index() != 0, mininterval=2.0)
  with jax.set_mesh(mesh):
    for step in bar:
      batch = sharding.shard_batch(process_rows(batch_fn(step)), mesh)
      trainable, opt_state, m = step_fn(trainable, opt_state, frozen, batch, jax.random.fold_in(base_key, step))
      done = step + 1
      log = done % log_every == 0 or done == total
      if log or done % ckpt.every == 0:  # every logged state and every saved one is checked first
        now = {k: float(v) for k, v in jax.device_get(m).items()}
        check_finite(done, now, nonfinite_params=int(now.pop(NONFINITE)))
      if log:
        metrics = {**now, "lr": float(lr_at(step))}
        writer.write(done, metrics)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}")
      if eval_fn is not None and eval_every and (done % eval_every == 0 or done == total):
        evals = eval_fn(nnx.merge(graphdef, trainable, frozen), done)
        writer.write(done, {f"eval/{k}": v for k, v in evals.items()})
        if not quiet:
          tqdm.write(f"step {done}: " + ", ".join(f"{k}={v:.4f}" for k, v in evals.items()))
      ckpt.maybe_save(done, {"trainable": nnx.to_pure_dict(trainable), "opt_state": opt_state,
                             "step": np.asarray(done, np.int64), "data_position": np.asarray(done, np.int64)},
                      force=done == total)
  writer.close()
  ckpt.close()
  model = nnx.merge(graphdef, trainable, frozen)
  return TrainResult(model, total, metrics, evals, time.time() - t0, resumed)


NONFINITE = "nonfinite_params"  # a step's NaN / Inf count over the updated trainable state


def make_step(graphdef, tx, loss_fn: Callable, *, in_shardings=None, out_shardings=None):
  """The jitted training step `(trainable, opt_state, frozen, batch, rng) -> (trainable, opt_state, metrics)`:
  value_and_grad of `loss_fn(model, batch, rng)` over the trainable state only, the optax update, and the
  count of non-finite values in the result; the trainable and optimizer states are donated."""
  kw = {} if in_shardings is None else dict(in_shardings=in_shardings, out_shardings=out_shardings)

  @functools.partial(jax.jit, donate_argnums=(0, 1), **kw)
  def step_fn(trainable, opt_state, frozen, batch, rng):
    def loss_of(tr):
      return loss_fn(nnx.merge(graphdef, tr, frozen), batch, rng)

    (loss, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    nonfinite = sum(jnp.sum(~jnp.isfinite(x)) for x in jax.tree.leaves(trainable))
    return trainable, opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads), **metrics,
                                  NONFINITE: nonfinite}

  return step_fn


class TrainConfigError(UserError):
  """A training config value that cannot run (a negative step count, a NaN learning rate, ...)."""


def validate_config(config) -> None:
  """Refuses, naming every bad key, the training configs that would train nothing or nonsense."""
  problems = []

  def integer(key, value, low):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
      problems.append(f"{key}={value!r} (an integer >= {low})")

  def number(key, value, low, high=math.inf, open_high=False):
    ok = isinstance(value, (int, float, np.floating)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or value > high or (open_high and value == high):
      problems.append(f"{key}={value!r} (a finite number in [{low}, {high}{')' if open_high else ']'})")

  integer("steps", config.steps, 1)
  integer("batch_size", config.batch_size, 1)
  integer("log_every", config.log_every, 1)
  integer("eval_every", config.eval_every, 0)
  integer("checkpoint.every", config.checkpoint.every, 1)
  integer("checkpoint.keep", config.checkpoint.keep, 1)
  o = config.optimizer
  number("optimizer.lr", o.lr, 0.0)
  integer("optimizer.warmup_steps", o.warmup_steps, 0)
  number("optimizer.final_lr_fraction", o.final_lr_fraction, 0.0)
  number("optimizer.weight_decay", o.weight_decay, 0.0)
  number("optimizer.clip_norm", o.clip_norm, 0.0)
  number("optimizer.b1", o.b1, 0.0, 1.0, open_high=True)
  number("optimizer.b2", o.b2, 0.0, 1.0, open_high=True)
  number("optimizer.eps", o.eps, 0.0)
  if problems:
    raise TrainConfigError(f"config{(' ' + config.method) if config.get('method') else ''}: "
                           f"{'; '.join(problems)}; nothing was run")


def process_rows(batch):
  """This process's rows of a global batch (all of it on one host)."""
  n, i = jax.process_count(), jax.process_index()
  if n == 1:
    return batch
  return jax.tree.map(lambda x: x[i * (x.shape[0] // n):(i + 1) * (x.shape[0] // n)], batch)
