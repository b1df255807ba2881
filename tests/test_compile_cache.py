"""calm_jax.compile_cache: a second process loads a compiled kernel from the directory."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = """
import sys
import jax, jax.numpy as jnp
from jax import monitoring
from calm_jax import compile_cache
hits = []
monitoring.register_event_duration_secs_listener(
    lambda event, secs, **kw: hits.append(event) if event.endswith("cache_retrieval_time_sec") else None)
print(compile_cache.enable(sys.argv[1]))
jax.jit(lambda x: jnp.sin(x) * 2 + 1)(jnp.ones(7)).block_until_ready()
print(len(hits))
"""


def run(arg):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", SCRIPT, arg], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  where, hits = proc.stdout.split()[-2:]
  return where, int(hits)


def test_second_process_loads_the_kernel(tmp_path):
  """Even a sub-second compile is kept (jax's default keeps only those over 1 s); "" is off."""
  cache = tmp_path / "xla"
  assert run(str(cache)) == (str(cache), 0)
  assert any(cache.iterdir())
  where, hits = run(str(cache))
  assert where == str(cache) and hits >= 1  # the jit (and jnp.ones' own program) loaded
  assert run("") == ("None", 0)
