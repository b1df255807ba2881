"""What every entry point does around its `main`.

- SIGTERM is handled as Ctrl-C (KeyboardInterrupt), so a job a scheduler stops cleans up as an
  interrupted one does: temporary outputs removed, locks released.
- A `--config.<key>` override naming no key of the config is refused before any work, with the
  closest valid keys (ml_collections would raise a bare AttributeError from inside flag parsing).
- An error a user causes (`calm_jax.errors.UserError`: bad input, refused operations) and the
  machine's state (a full disk, a read-only output) end the run with one line naming the culprit
  and exit status 2, not a traceback; an interruption exits with 130.
"""
from __future__ import annotations

import difflib
import importlib.util
import re
import signal
import sys


def _interrupt(signum, frame):
  raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def _fail(prog: str, message: str, code: int = 2):
  print(f"{prog}: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


def _load_config(spec: str):
  """The ConfigDict `--config=path[:arg]` names, loaded as ml_collections' config flag does; None
  when it cannot be loaded here (ml_collections then reports that itself)."""
  path, _, arg = spec.partition(":")
  try:
    mod_spec = importlib.util.spec_from_file_location("_calm_jax_checked_config", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()
  except Exception:  # noqa: BLE001  (reported by the real flag parser)
    return None


def check_config_overrides(argv, prog: str) -> None:
  """Refuses `--config.a.b=v` where a.b is no key of the config file's `get_config(arg)`."""
  import ml_collections
  spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if spec is None and "--config" in argv[:-1]:
    spec = argv[argv.index("--config") + 1]
  if not spec:
    return
  config = None
  for arg in argv:
    m = re.match(r"--(?:no)?config\.([^=\s]+)", arg)
    if not m:
      continue
    if config is None:
      config = _load_config(spec)
      if config is None:
        return
    node, walked = config, []
    for part in m.group(1).split("."):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        keys = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        close = difflib.get_close_matches(part, keys, n=3, cutoff=0.5)
        where = "config" + "".join(f".{w}" for w in walked)
        hint = f"; did you mean {', '.join(repr('.'.join(walked + [c])) for c in close)}?" if close else (
            f"; {where} has {', '.join(keys[:20])}" if keys else f"; {where} is a value, not a group")
        _fail(prog, f"{arg}: unknown config key {'.'.join(walked + [part])!r}{hint}")
      node = node[part]
      walked.append(part)


def run(main, prog: str, reexec_module: str | None = None, where=lambda: None) -> None:
  """Runs an absl `main` as an entry point (see the module docstring); `reexec_module`: re-execute
  the process under the tuned allocator first (`calm_jax.malloc.reexec_tuned`); `where()`: the
  output the run writes, named when the machine refuses a write that names no file."""
  if reexec_module:
    from calm_jax.malloc import reexec_tuned
    reexec_tuned(reexec_module)
  signal.signal(signal.SIGTERM, _interrupt)
  check_config_overrides(sys.argv[1:], prog)
  from absl import app

  from calm_jax.errors import UserError, os_message

  def guarded(argv):
    try:
      return main(argv)
    except UserError as e:
      _fail(prog, str(e))
    except KeyboardInterrupt as e:
      _fail(prog, f"interrupted ({e or 'SIGINT'}); temporary outputs were removed", 130)
    except OSError as e:
      message = os_message(e, where())
      if message is None:
        raise
      _fail(prog, message)

  app.run(guarded)
