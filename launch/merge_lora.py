"""Fold a LoRA adapter (ours or PEFT) into its base: an HF directory that needs no adapter code.

  python -m launch.merge_lora --base=smollm2-135m-instruct --adapter=runs/lora/adapter --out=models/ft
  python -m launch.merge_lora --base=BASE --adapter=runs/moa/experts --expert=2 --out=OUT   # one MoA expert

The output is new (refused if it exists), written atomically, with the base's tokenizer files.
"""
from absl import flags

_BASE = flags.DEFINE_string("base", None, "base model: directory, fetched name or Hub id", required=True)
_ADAPTER = flags.DEFINE_string("adapter", None, "adapter directory (ours or PEFT)", required=True)
_OUT = flags.DEFINE_string("out", None, "HF directory to write", required=True)
_EXPERT = flags.DEFINE_integer("expert", None, "with a stack of experts: which one to merge")
_DTYPE = flags.DEFINE_string("dtype", None, "output dtype (default: the base's)")


def main(argv):
  del argv
  from calm_jax.lora import merge_adapter_dir
  print(merge_adapter_dir(_BASE.value, _ADAPTER.value, _OUT.value, expert=_EXPERT.value, dtype=_DTYPE.value))


if __name__ == "__main__":
  from launch.common import run
  run(main, "launch.merge_lora", where=lambda: _OUT.value)
