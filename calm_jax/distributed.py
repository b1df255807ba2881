"""Multi-host start-up: `jax.distributed.initialize()` when (and only when) a job spans hosts.

Call `maybe_initialize_distributed()` first thing in an entry point, before anything touches
a JAX device. A multi-process job is recognised from

* `JAX_COORDINATOR_ADDRESS` + `JAX_NUM_PROCESSES` + `JAX_PROCESS_ID` (any launcher), or
* a cluster JAX detects by itself (SLURM, Open MPI, Cloud TPU pods, Kubernetes with the
  `jax[k8s]` extra) reporting more than one process.

On a single host it does nothing, so the same launch command works on a laptop, in Colab,
and on a pod. On CPU, cross-process collectives use gloo (JAX's default).
"""
from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)

ENV_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def _explicit_env() -> dict | None:
  """(coordinator_address, num_processes, process_id) from JAX_* variables, or None."""
  present = [v for v in ENV_VARS if os.environ.get(v)]
  if not present:
    return None
  if len(present) != len(ENV_VARS):
    missing = sorted(set(ENV_VARS) - set(present))
    raise ValueError(f"multi-host environment is incomplete: {', '.join(present)} set but {', '.join(missing)} "
                     "missing")
  try:
    n, pid = int(os.environ["JAX_NUM_PROCESSES"]), int(os.environ["JAX_PROCESS_ID"])
  except ValueError:
    raise ValueError(f"JAX_NUM_PROCESSES={os.environ['JAX_NUM_PROCESSES']!r} and "
                     f"JAX_PROCESS_ID={os.environ['JAX_PROCESS_ID']!r} must be integers") from None
  return dict(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"], num_processes=n, process_id=pid)


def detected_cluster() -> str | None:
  """Name of the cluster environment JAX's own auto-detection would use with >1 process, else None.

  Uses `jax._src.clusters.ClusterEnv` (the registry behind `jax.distributed.initialize()`'s
  auto-detection; there is no public API for "is this a multi-host job?").
  """
  try:
    from jax._src.clusters import ClusterEnv
  except ImportError:  # pragma: no cover - layout changed in a future JAX
    return None
  for env in ClusterEnv._cluster_types:
    if getattr(env, "opt_in_only_method", False):
      continue
    try:
      if env.is_env_present() and env.get_process_count() > 1:
        return env.__name__
    except Exception as e:  # a half-configured environment: not a multi-host job we can start
      log.debug("cluster detection via %s failed: %s", env.__name__, e)
  return None


def maybe_initialize_distributed() -> bool:
  """Initialises `jax.distributed` on a multi-host job; returns whether it is initialised.

  Idempotent (a second call is a no-op) and a no-op on a single host.
  """
  if jax.distributed.is_initialized():
    return True
  explicit = _explicit_env()
  if explicit is not None:
    if explicit["num_processes"] <= 1:
      return False
    log.info("initialising jax.distributed from JAX_* variables: %s", explicit)
    jax.distributed.initialize(**explicit)
    return True
  cluster = detected_cluster()
  if cluster is None:
    return False
  log.info("initialising jax.distributed via %s", cluster)
  jax.distributed.initialize()
  return True


def is_main_process() -> bool:
  """True on process 0, the one that writes logs, configs and exported checkpoints."""
  return jax.process_index() == 0
