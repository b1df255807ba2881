"""`calm_jax.malloc.reexec_tuned`: an entry point re-executes itself once under TUNED, same pid and
arguments; the user's own GLIBC_TUNABLES or CALM_JAX_NO_REEXEC leave it as it was started."""
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from calm_jax.malloc import TUNED

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
print(json.dumps({"stage": "before", "pid": os.getpid()}), flush=True)
from calm_jax.malloc import is_tuned, reexec_tuned
reexec_tuned()
print(json.dumps({"stage": "after", "pid": os.getpid(), "tunables": os.environ.get("GLIBC_TUNABLES"),
                  "tuned": is_tuned(), "argv": sys.argv[2:]}))
"""
GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def run(tmp_path, env_extra):
  script = tmp_path / "entry.py"
  script.write_text(SCRIPT)
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "CALM_JAX_NO_REEXEC")} | env_extra
  out = subprocess.run([sys.executable, str(script), str(ROOT), "--flag=a b", "x"], env=env, capture_output=True,
                       text=True, check=True).stdout
  return [json.loads(line) for line in out.splitlines()]


@pytest.mark.skipif(not GLIBC, reason="glibc tunables exist only on glibc Linux")
def test_reexec_under_tuned_once_same_pid_and_args(tmp_path):
  lines = run(tmp_path, {})
  assert [x["stage"] for x in lines] == ["before", "before", "after"]  # the script ran twice, then went on
  assert lines[0]["pid"] == lines[1]["pid"] == lines[2]["pid"]
  assert lines[2]["tunables"] == TUNED and lines[2]["tuned"]
  assert lines[2]["argv"] == ["--flag=a b", "x"]


@pytest.mark.parametrize("env", [{"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, {"CALM_JAX_NO_REEXEC": "1"}])
def test_user_choice_is_kept(tmp_path, env):
  lines = run(tmp_path, env)
  assert [x["stage"] for x in lines] == ["before", "after"]
  assert lines[1]["tunables"] == env.get("GLIBC_TUNABLES") and not lines[1]["tuned"]
