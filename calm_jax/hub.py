"""Model names -> local HF directories: a directory, a fetched model's name, or a Hub id.

`model_dir(name)` is what every loader calls first, so wherever a model directory is asked for a user
may also write `HuggingFaceTB/SmolLM2-135M-Instruct` (downloaded once with
`huggingface_hub.snapshot_download`: safetensors, JSON and tokenizer files only; offline,
`HF_HUB_OFFLINE=1`, it is found in the local hub cache) or `smollm2-135m-instruct` (a model
`launch.fetch` has fetched into the cache).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from calm_jax.errors import UserError

# What a model directory needs from a Hub repo: weights, config/generation/tokenizer JSON, a
# sentencepiece model, BPE merges, a chat template. Never PyTorch .bin, GGUF or ONNX copies.
MODEL_FILES = ["*.safetensors", "*.json", "tokenizer.model", "*.txt", "*.jinja", "*.tiktoken"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class ModelNotFoundError(UserError, FileNotFoundError):
  """A model name that is no directory, no fetched model and no Hub id that can be had."""


def is_hub_id(name: str) -> bool:
  return bool(_HUB_ID.match(name)) and not name.startswith((".", "/")) and ".." not in name


def model_dir(name) -> Path:
  """The local directory of model `name` (a path, a `launch.fetch` model name, or a Hub id)."""
  path = Path(os.path.expanduser(os.fspath(name)))
  if path.exists():
    if not path.is_dir():
      raise ModelNotFoundError(f"{path} is a file; a model is a directory (config.json, safetensors, tokenizer)")
    return path
  text = os.fspath(name)
  from calm_jax.fetch import MODELS, default_dir, fetched
  if text in MODELS:
    if fetched(default_dir(text)) is not None:
      return default_dir(text)
    raise ModelNotFoundError(f"model {text!r} has not been fetched: run python -m launch.fetch --model={text}")
  if is_hub_id(text):
    return _snapshot(text)
  raise ModelNotFoundError(f"no model directory {text}")


def _snapshot(repo_id: str) -> Path:
  import huggingface_hub
  from huggingface_hub import constants
  try:
    return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=MODEL_FILES))
  except Exception as e:  # noqa: BLE001  (offline, unknown repo, gated, network: all one message)
    offline = constants.HF_HUB_OFFLINE
    how = ("it is not in the local hub cache and HF_HUB_OFFLINE is set: download it on a machine with network "
           f"(huggingface-cli download {repo_id}) into HF_HOME={constants.HF_HOME}, or give a local directory"
           if offline else f"the Hub could not provide it ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
           "check the id, your network and HF_TOKEN, or give a local directory")
    raise ModelNotFoundError(f"no directory {repo_id}, and as a Hub id: {how}") from None
