"""Orbax checkpoints of training state: trainable parameters, optimizer, step, data position.

Only the trainable state is saved (a frozen base is rebuilt from its own source); a
`meta.json` beside the steps records what the state belongs to, so a workdir holding another
model's checkpoint is refused before any work.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from calm_jax.atomic import atomic_write_text


class CheckpointMismatchError(ValueError):
  pass


class Checkpointer:
  def __init__(self, workdir, *, every: int, keep: int, meta: dict):
    self.dir = Path(workdir).absolute() / "checkpoints"
    self.meta = meta
    self.every = max(int(every), 1)
    self.manager = ocp.CheckpointManager(
        self.dir,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False),
    )

  def check_compatible(self) -> None:
    """Raises if the workdir holds a checkpoint of something else (different model/method/base)."""
    meta_path = self.dir / "meta.json"
    if self.manager.latest_step() is None:
      return
    if not meta_path.exists():
      raise CheckpointMismatchError(f"{self.dir} holds checkpoints without meta.json; use a fresh --workdir")
    old = json.loads(meta_path.read_text())
    diffs = [k for k in sorted(set(old) | set(self.meta)) if old.get(k) != self.meta.get(k)]
    if diffs:
      detail = ", ".join(f"{k}: checkpoint has {old.get(k)!r}, this run has {self.meta.get(k)!r}" for k in diffs)
      raise CheckpointMismatchError(f"workdir checkpoint at {self.dir} belongs to another run ({detail}); "
                                    "use a fresh --workdir")

  def latest_step(self):
    return self.manager.latest_step()

  def restore(self, abstract_state):
    """Restores the latest step into the structure (and shardings) of `abstract_state`."""
    step = self.manager.latest_step()
    if step is None:
      return None
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                          abstract_state)
    return self.manager.restore(step, args=ocp.args.StandardRestore(target))

  def maybe_save(self, step: int, state, force: bool = False) -> bool:
    if not force and step % self.every:
      return False
    if self.manager.latest_step() == step:
      return False
    if jax.process_index() == 0 and not (self.dir / "meta.json").exists():
      self.dir.mkdir(parents=True, exist_ok=True)
      atomic_write_text(self.dir / "meta.json", json.dumps(self.meta, indent=2, sort_keys=True))
    self.manager.save(step, args=ocp.args.StandardSave(state), force=True)
    self.manager.wait_until_finished()
    return True

  def close(self):
    self.manager.close()
