"""The method packages that register into `calm_jax.registry` (imported by the entry points)."""
import importlib

METHOD_MODULES = ("calm_jax.pretrain", "merging.suite", "svf.suite", "moa.lora_training", "moa.suite",
                  "calm.kv_arithmetic", "calm.compose_files")


def import_methods() -> None:
  for name in METHOD_MODULES:
    importlib.import_module(name)
