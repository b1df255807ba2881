"""SVF experts as files: the z vectors (fp32 safetensors, a few KB) plus what they belong to.

Metadata: the base's content fingerprint, the target regex, the mask function f, the task and
the z shapes. Loading onto another base fails unless `allow_transfer` is given and every z
shape matches the new base's factors (cross-model transfer, Transformer² §4.4).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from calm_jax.atomic import atomic_file
from calm_jax.errors import UserError

FORMAT = "svf-expert-v1"


class ExpertMismatchError(UserError):
  pass


def save_expert(path, zs: dict, *, base_fingerprint: str, targets: str, f: str, task: str = "",
                extra: dict | None = None) -> Path:
  """Writes z vectors {target name: [L, k]} and metadata atomically (temp file + rename)."""
  from safetensors.numpy import save_file
  path = Path(path)
  tensors = {name: np.ascontiguousarray(np.asarray(z, np.float32)) for name, z in zs.items()}
  meta = {"format": FORMAT, "base_fingerprint": base_fingerprint, "targets": targets, "f": f, "task": task,
          "shapes": json.dumps({n: list(t.shape) for n, t in tensors.items()}),
          "extra": json.dumps(extra or {})}
  with atomic_file(path) as tmp:
    save_file(tensors, str(tmp), metadata=meta)
  return path


def read_expert(path) -> tuple[dict[str, np.ndarray], dict]:
  """(z vectors, metadata) of an expert file; no compatibility check."""
  from safetensors import safe_open
  path = Path(path)
  if not path.exists():
    raise ExpertMismatchError(f"SVF expert {path} does not exist")
  try:
    with safe_open(str(path), framework="numpy") as fh:
      meta = dict(fh.metadata() or {})
      zs = {k: fh.get_tensor(k) for k in fh.keys()}
  except Exception as e:  # safetensors raises its own error types for corrupt headers
    raise ExpertMismatchError(f"{path} is not a readable safetensors SVF expert: {e}") from None
  if meta.get("format") != FORMAT:
    raise ExpertMismatchError(f"{path} is not an SVF expert (format {meta.get('format')!r}, expected {FORMAT!r})")
  return zs, meta


def load_expert(path, *, base_fingerprint: str, shapes: dict[str, tuple], f: str,
                allow_transfer: bool = False) -> dict[str, np.ndarray]:
  """z vectors of `path` for a base with this fingerprint and these z shapes.

  Raises ExpertMismatchError, naming the file, when the expert was trained on another base
  (unless allow_transfer and every shape matches), targets other matrices, or uses another f.
  """
  zs, meta = read_expert(path)
  if set(zs) != set(shapes):
    raise ExpertMismatchError(f"{path} adapts {sorted(zs)} but this model's SVF targets are {sorted(shapes)}")
  bad = {n: (list(zs[n].shape), list(shapes[n])) for n in zs if tuple(zs[n].shape) != tuple(shapes[n])}
  if bad:
    raise ExpertMismatchError(f"{path}: z shapes do not fit this base (expert, base): {bad}")
  if meta.get("f") != f:
    raise ExpertMismatchError(f"{path} was trained with f={meta.get('f')!r}, this model uses f={f!r}")
  if meta.get("base_fingerprint") != base_fingerprint and not allow_transfer:
    raise ExpertMismatchError(
        f"{path} was trained on base {meta.get('base_fingerprint')}, not this base ({base_fingerprint}); "
        "pass allow_transfer (--config.allow_transfer=True) to apply it across models")
  return zs
