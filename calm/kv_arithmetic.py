"""CALM's Table 1 at small scale (method "calm_kv_arithmetic", configs/calm/kv_arithmetic.py).

1. m_A (small) learns KV-substitution over all keys (with `slot_fill`, also writing each key's
   value into the key's blank slots); m_B (larger) learns numeric arithmetic
   and never sees a key. Both from scratch, with the core trainer.
2. CALM composes them (both frozen) and trains only the composition on D_C: KV-arithmetic
   (and KV-substitution) over the held-in 20% of the keys; with `calm.twin_loss` its loss also
   pulls the composed anchor toward the anchor's own reading of each prompt's numeric twin, and
   with `m_b.zero_key_embeddings` the anchor's key-token rows are zero (docs/calm.md, "The twin
   loss and zero key rows").
3. All three are scored (greedy, exact match) on KV-substitution and numeric arithmetic
   (test splits) and on KV-arithmetic over expressions built only from held-out keys.

Ablations (config.ablation): "random_augment" (m_A left at its random init), "encoder" (m_A
reads only the prompt), "lora" (LoRA on m_B with about as many parameters, same D_C).
"""
from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from calm.compose import Composed
from calm.decoding import generate as calm_generate
from calm.kv_tasks import KeyValueTable, kv_registry
from calm.probe import value_digit_probe
from calm_jax import lora as lora_lib
from calm_jax.experiment import bar_chart, build_decoder, print_table, write_results
from calm_jax.models import decoder as dec
from calm_jax.registry import register_method
from calm_jax.tasks import evaluate, make_eval_set, max_seq_len, mixture_batches
from calm_jax.train import lm_batch_loss, lm_loss, train
from calm_jax.variables import ComposeParam, LoRAParam

TASKS = ("kv_substitution", "numeric_arithmetic", "kv_arithmetic")
PAPER = {"m_A": {"kv_substitution": 0.981, "numeric_arithmetic": 0.042, "kv_arithmetic": 0.007},
         "m_B": {"kv_substitution": 0.0, "numeric_arithmetic": 0.737, "kv_arithmetic": 0.0},
         "calm": {"kv_substitution": 0.929, "numeric_arithmetic": 0.720, "kv_arithmetic": 0.843}}
# Which keys each evaluation draws from: KV-arithmetic only over keys CALM never trained on.
EVAL_KEYS = {"kv_substitution": "all", "numeric_arithmetic": "all", "kv_arithmetic": "held_out"}


def calm_batch_loss(model, batch, rng):
  logits = model(batch["inputs"], batch["attention_mask"], batch["prompt_len"])
  return lm_loss(logits, batch["targets"], batch["loss_mask"])


def twin_loss(weight: float, rows_of, layers=None):
  """CALM's loss plus `weight` × a hidden-state match (`calm.twin_loss`, on in the config's default
  `:objective=twin`; not in the paper):
  on rows with keys or numbers (`rows_of(batch)`: [B] 0/1), the composed anchor's output at every
  connected layer j is pulled toward the anchor's own layer-j output on the prompt's numeric twin
  (`KeyValueTable.numeric_twin`, batch["twin"]), relative squared error over valid positions
  (`layers`: only these connected layers; None: all):

    L = CE + w · Σ_j Σ_{b,t} r_b ‖h_j − h*_j‖² / Σ_{b,t} r_b ‖h*_j‖².

  The twin carries only held-in keys' values (those D_C's answers already imply). It asks the
  composition for the anchor's reading of each operand where the anchor reads it, the target that
  CE alone reaches only through the anchor's arithmetic."""
  from calm.compose import anchor_hidden, forward, prompt_mask

  def loss(model, batch, rng):
    spec, p = model.spec, model.params()
    valid = jnp.asarray(batch["attention_mask"]).astype(bool)
    aug_valid = prompt_mask(valid, jnp.asarray(batch["prompt_len"])) if spec.aug_mode == "encoder" else None
    logits, _, hidden = forward(spec, p, jnp.asarray(batch["inputs"]), valid=valid, aug_valid=aug_valid,
                                return_hidden=True)
    ce, metrics = lm_loss(logits, batch["targets"], batch["loss_mask"])
    target = anchor_hidden(spec, jax.lax.stop_gradient(p["anchor"]), jnp.asarray(batch["twin"]), valid=valid)
    w = (valid * jnp.asarray(rows_of(batch), jnp.float32)[:, None])[..., None]
    match = sum(jnp.sum(w * (hidden[j] - target[j]) ** 2) / jnp.maximum(jnp.sum(w * target[j] ** 2), 1e-9)
                for j in hidden if layers is None or j in layers)
    return ce + weight * match, {**metrics, "ce": ce, "twin_match": match}
  return loss


def _eval_sets(config, registries) -> list:
  """Test examples per task, each from the key set the table scores it on."""
  out = []
  for name in TASKS:
    reg = registries[EVAL_KEYS[name]]
    out += make_eval_set([name], int(config.eval.n_per_task), split="test", seed=int(config.seed), registry=reg,
                         domains=TASKS)
  return out


def _score(generate_fn, tokenizer, examples, registries, batch_size) -> dict[str, float]:
  reg = {name: registries[EVAL_KEYS[name]][name] for name in TASKS}
  acc = evaluate(generate_fn, tokenizer, examples, batch_size=batch_size, registry=reg)
  return {name: acc[name] for name in TASKS}


def _with_slot_targets(batch_fn, table, tokenizer, domains):
  """m_A's batches with the operand slots supervised too (`KeyValueTable.slot_targets`). Numeric
  prompts (if the mixture has them) train only their slots, never their answers: m_A learns what
  each operand's digits are, not arithmetic."""
  numeric = domains.index("numeric_arithmetic") if "numeric_arithmetic" in domains else -1

  def fn(step):
    batch = batch_fn(step)
    batch["loss_mask"] = np.where((batch["domain"] == numeric)[:, None], 0.0, batch["loss_mask"]).astype(np.float32)
    targets, mask = table.slot_targets(tokenizer, batch["inputs"], numbers=numeric >= 0)
    batch["targets"] = np.where(mask > 0, targets, batch["targets"]).astype(batch["targets"].dtype)
    batch["loss_mask"] = np.maximum(batch["loss_mask"], mask)
    return batch
  return fn


def zero_embeddings(model, token_ids):
  """`model` with the input-embedding rows of `token_ids` set to zero (`m_b.zero_key_embeddings`).

  m_B never sees a key, so those rows get no gradient and keep their random init (decayed): noise
  that the anchor normalises to full scale wherever a key stands. Zeroing them after training equals
  initialising them at zero (a zero row gets no gradient and no decay), so the anchor reads a key
  as nothing, and the composition can write `#` there for keys it never trained on."""
  p = model.params()
  p["embed"] = p["embed"].at[jnp.asarray(token_ids)].set(0)
  return dec.Decoder(model.config, params=p)


def _with_twin(batch_fn, table, tokenizer):
  """CALM's batches with each row's numeric twin (`twin_loss`)."""
  def fn(step):
    batch = batch_fn(step)
    batch["twin"] = table.numeric_twin(tokenizer, batch["inputs"])
    return batch
  return fn


def _decoder_generate(model):
  from calm_jax.decoding import generate
  return lambda prompts, n: generate(model, prompts, max_new_tokens=n)


@register_method("calm_kv_arithmetic")
def run(config, workdir) -> dict:
  t0 = time.time()
  workdir = Path(workdir)
  seed = int(config.seed)
  table = KeyValueTable(int(config.kv.n_keys), int(config.kv.key_len), float(config.kv.held_in_fraction), seed)
  tokenizer = table.tokenizer()
  registries = kv_registry(table, int(config.kv.operands), str(config.kv.ops))
  seq_len = max_seq_len(list(registries["all"].values()))
  ablation = str(config.ablation)
  if ablation not in ("none", "random_augment", "encoder", "lora"):
    raise ValueError(f"unknown ablation {ablation!r}: none, random_augment, encoder or lora")
  examples = {name: registries["all"][name].sample(np.random.default_rng(0)) for name in TASKS}
  print(f"{table.n_keys} keys, {len(table.held_in)} held in for CALM, e.g. " +
        ", ".join(f"{table.pretty(ex.prompt)} -> {ex.answer}" for ex in examples.values()))

  def fit(model, part, trainable, tasks, registry, loss_fn, init_offset):
    c = config[part]
    _, _, batch_fn = mixture_batches(dict(tasks), batch_size=c.batch_size, tokenizer=tokenizer,
                                     seed=seed + init_offset, registry=registry, seq_len=seq_len)
    if part == "m_a" and c.slot_fill:
      batch_fn = _with_slot_targets(batch_fn, table, tokenizer, sorted(tasks))
    if part == "calm" and c.twin_loss > 0:
      batch_fn = _with_twin(batch_fn, table, tokenizer)
    return train(model, trainable=trainable, loss_fn=loss_fn, batch_fn=batch_fn, config=c, workdir=workdir / part,
                 meta={"part": part, "seed": seed}).model

  # 1. The two frozen bases, trained from scratch on their own tasks.
  m_a = build_decoder(config.m_a.model, tokenizer, seed * 1000 + 1)
  if ablation != "random_augment":
    m_a = fit(m_a, "m_a", nnx.Param, dict(config.m_a.data), registries["all"], lm_batch_loss, 1)
  # The ceiling of any composition: how well a linear map fitted on the held-in keys reads held-out values.
  probe = value_digit_probe(m_a, tokenizer, table, seed=seed)
  print("m_A value digits, linear probe fitted on held-in keys, held-out accuracy per digit place: "
        f"{[round(a, 3) for a in probe['concat']]} (all layers and slots), best single "
        f"{[round(a, 3) for a in probe['best_single']]}")
  m_b = build_decoder(config.m_b.model, tokenizer, seed * 1000 + 2)
  m_b = fit(m_b, "m_b", nnx.Param, {"numeric_arithmetic": 1.0}, registries["all"], lm_batch_loss, 2)
  if config.m_b.zero_key_embeddings:
    m_b = zero_embeddings(m_b, table.key_token_ids(tokenizer))

  examples = _eval_sets(config, registries)
  bs = int(config.eval.batch_size)
  results = {"m_A": _score(_decoder_generate(m_a), tokenizer, examples, registries, bs),
             "m_B": _score(_decoder_generate(m_b), tokenizer, examples, registries, bs)}

  # 2. The composition (or the LoRA control) on D_C over the held-in keys.
  tasks = dict(config.calm.data.tasks)
  if ablation == "lora":
    composed = Composed(m_b, [m_a], **_compose_kwargs(config))
    n_compose = sum(np.size(x) for x in jax.tree.leaves(composed.compose_params()))
    spec, rank = _lora_matching(m_b.config, str(config.lora.targets), n_compose)
    model = lora_lib.LoRAModel(m_b, spec, seed=seed)
    model = fit(model, "calm", LoRAParam, tasks, registries["held_in"], lm_batch_loss, 3)
    trained = int(lora_lib.count_params(model.factors()))
    results["calm"] = _score(_decoder_generate(model.merged()), tokenizer, examples, registries, bs)
  else:
    model = Composed(m_b, [m_a], seed=seed, **_compose_kwargs(config))
    loss_fn = calm_batch_loss
    if config.calm.twin_loss > 0:
      # the twin match on every row but substitution's (its twin ends in `>`, a prompt the anchor never saw)
      sub = sorted(tasks).index("kv_substitution") if "kv_substitution" in tasks else -1
      layers = tuple(config.calm.twin_layers) or None
      loss_fn = twin_loss(float(config.calm.twin_loss), lambda b: jnp.asarray(b["domain"]) != sub, layers)
    model = fit(model, "calm", ComposeParam, tasks, registries["held_in"], loss_fn, 3)
    trained = int(sum(np.size(x) for x in jax.tree.leaves(model.compose_params())))
    spec, params = model.spec, model.params()
    gen = lambda prompts, n: calm_generate(spec, params, prompts, max_new_tokens=n)
    results["calm"] = _score(gen, tokenizer, examples, registries, bs)

  seconds = time.time() - t0
  out = {**results, "seconds": seconds, "ablation": ablation, "trained_params": trained,
         "n_keys": table.n_keys, "held_in_keys": len(table.held_in), "seed": seed,
         "m_A_value_probe": probe,
         "params": {"m_A": _count(m_a), "m_B": _count(m_b)}, "paper": PAPER}
  if jax.process_index() == 0:
    write_results(workdir, out)
    label = "CALM" if ablation == "none" else f"CALM ({ablation})"
    groups = {"m_A": results["m_A"], "m_B": results["m_B"], label: results["calm"]}
    bar_chart(workdir / "results.png", groups, f"KV arithmetic (CALM Table 1, small scale): {seconds / 60:.1f} min")
    print_table("ours: accuracy (%), KV-arithmetic over held-out keys", groups)
    print_table("paper Table 1 (%)", {"m_A": PAPER["m_A"], "m_B": PAPER["m_B"], "CALM": PAPER["calm"]})
    print(f"trained parameters: {trained:,}; total {seconds:.0f} s")
    print(f"results: {workdir / 'results.json'}  chart: {workdir / 'results.png'}")
  return out


def _count(model) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(model.params())))


def _compose_kwargs(config) -> dict:
  c = config.calm.compose
  layers = lambda x: [list(x)] if len(x) else None
  return dict(augment_layers=layers(c.augment_layers), anchor_layers=layers(c.anchor_layers),
              num_heads=c.num_heads or None, aug_mode="encoder" if config.ablation == "encoder" else "iterative",
              cross_rope=bool(c.cross_rope), cross_null=bool(c.cross_null))


def _lora_matching(cfg, targets: str, n_params: int):
  """The LoRA spec on `targets` whose parameter count is closest to n_params (the paper's control)."""
  best = None
  for rank in range(1, 257):
    spec = lora_lib.LoRASpec.create(cfg, targets=targets, rank=rank)
    n = lora_lib.count_params(lora_lib.init_lora(cfg, spec, 0))
    if best is None or abs(n - n_params) < abs(best[2] - n_params):
      best = (spec, rank, n)
    if n > n_params:
      break
  return best[0], best[1]
