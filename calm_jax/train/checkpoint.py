"""Orbax checkpoints of training state: trainable parameters, optimizer, step, data position.

Only the trainable state is saved (a frozen base is rebuilt from its own source); a
`meta.json` beside the steps records what the state belongs to (the structure of the trainable and
frozen state, and the run's config identity: `calm_jax.train.workdir.identity`), so a workdir
holding another run's checkpoint is refused before any work, naming what differs. Orbax's
temporary directories of a save that was killed are removed when the next run opens the workdir.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from calm_jax.atomic import atomic_write_text
from calm_jax.errors import UserError
from calm_jax.train.workdir import differences


class CheckpointMismatchError(UserError):
  pass


class Checkpointer:
  def __init__(self, workdir, *, every: int, keep: int, meta: dict):
    self.dir = Path(workdir).absolute() / "checkpoints"
    self.meta = meta
    self.every = max(int(every), 1)
    self.manager = ocp.CheckpointManager(
        self.dir,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False,
                                             cleanup_tmp_directories=True),
    )

  def check_compatible(self, resume_with_changes: bool = False) -> list[str]:
    """Raises if the workdir holds a checkpoint of something else: another model, method or base
    (always), or another config identity (unless `resume_with_changes`; then the differences are
    returned and recorded in meta.json)."""
    meta_path = self.dir / "meta.json"
    if self.manager.latest_step() is None:
      return []
    if not meta_path.exists():
      raise CheckpointMismatchError(f"{self.dir} holds checkpoints without meta.json; use a fresh --workdir")
    old = json.loads(meta_path.read_text())
    structural = [k for k in sorted((set(old) | set(self.meta)) - {"config", "resumed_with_changes"})
                  if old.get(k) != self.meta.get(k)]
    if structural:
      detail = ", ".join(f"{k}: checkpoint has {old.get(k)!r}, this run has {self.meta.get(k)!r}" for k in structural)
      raise CheckpointMismatchError(f"workdir checkpoint at {self.dir} belongs to another run ({detail}); "
                                    "use a fresh --workdir")
    diff = differences(old["config"], self.meta["config"]) if "config" in old and "config" in self.meta else []
    if diff and not resume_with_changes:
      raise CheckpointMismatchError(
          f"workdir checkpoint at {self.dir} belongs to another run of a different config ({'; '.join(diff[:8])}"
          f"{'; ...' if len(diff) > 8 else ''}); use a fresh --workdir, or set --config.resume_with_changes=True "
          "to resume with the new values (recorded in checkpoints/meta.json)")
    if diff and jax.process_index() == 0:
      old.setdefault("resumed_with_changes", []).append({"step": int(self.manager.latest_step()), "changes": diff})
      old["config"] = self.meta["config"]
      atomic_write_text(meta_path, json.dumps(old, indent=2, sort_keys=True))
    return diff

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
