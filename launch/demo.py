"""`make demo`: the embedded default experiments end to end on CPU.

Pretrain the tiny base on the synthetic suite (reused if already in the workdir), load it back
from its HF directory and answer a few prompts with the KV-cache decoder; then every method's
experiment with its shipped config: merging (configs/merge/suite.py), Transformer²
(configs/svf/suite.py) and Mixture-of-LoRAs (configs/moa/suite.py) on that base, and CALM's
key-value arithmetic (configs/calm/kv_arithmetic.py, its own m_A and m_B). Each writes
results.json + results.png into its directory under --workdir; a finished step is reused.
"""
from absl import flags, logging

_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "where every experiment writes its results")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from pathlib import Path

  from calm_jax import hf
  from calm_jax.decoding import generate
  from calm_jax.registry import get_method
  from calm_jax.tasks import TASKS, task_registry
  from calm_jax.tokenizers import load_tokenizer
  from configs.pretrain import get_config
  from launch.methods import import_methods

  import_methods()
  root = Path(_WORKDIR.value)
  base = root / "base"
  print(f"== 1. tiny base: {base}")
  base_config = get_config()
  get_method("pretrain")(base_config, base)

  print("== 2. the base, loaded back from its HF directory, answers test prompts greedily")
  model = hf.load(base / "hf")
  tok = load_tokenizer(base / "hf")
  tasks = {**TASKS, **task_registry(base_config.data.task_args)}  # the base's own settings (2-digit arithmetic)
  examples = [tasks[t].split("test", 1, seed=1)[0] for t in ("addition", "subtraction", "reverse", "sort", "max")]
  outs = generate(model, [[tok.bos_id] + tok.encode(e.prompt) for e in examples], max_new_tokens=10)
  for e, o in zip(examples, outs):
    got = tok.decode([i for i in o if i != tok.eos_id])
    print(f"  {e.prompt:<22} -> {got:<10} (expected {e.answer}) {'ok' if got == e.answer else 'wrong'}")

  from configs.calm.kv_arithmetic import get_config as calm_config
  from configs.merge.suite import get_config as merge_config
  from configs.moa.suite import get_config as moa_config
  from configs.svf.suite import get_config as svf_config
  steps = [("merge", "merging: per-task fine-tunes of the base merged with every method", merge_config),
           ("svf", "Transformer²: SVF experts and two-pass adaptation", svf_config),
           ("moa", "Mixture-of-LoRAs: domain experts and routers", moa_config),
           ("calm", "CALM: key-value arithmetic by composing a key-value model with an arithmetic model", calm_config)]
  for i, (name, what, make) in enumerate(steps, 3):
    out = root / name
    print(f"== {i}. {what}: {out}")
    if (out / "results.json").exists():
      print(f"  reusing {out / 'results.json'} (delete it to rerun)")
      continue
    config = make()
    if "base_workdir" in config:  # CALM trains its own m_A and m_B
      config.base_workdir = str(base)
    get_method(config.method)(config, out)

  print("\nresults:")
  for p in sorted(root.glob("*/results.json")):
    print(f"  {p}  (chart: {p.with_suffix('.png')})")


if __name__ == "__main__":
  from launch.common import run
  run(main, "launch.demo", reexec_module="launch.demo")  # tuned glibc allocator: faster XLA steps on the CPU
