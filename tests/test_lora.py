"""calm_jax.lora: B = 0 is the base, ours = peft on the same factors, merged = unmerged (and in
transformers), per-example experts = each example alone, training touches only LoRAParam,
save/load round trip and the bad-input errors."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding

from calm_jax import hf, lora as L
from calm_jax.models.decoder import forward, nest
from calm_jax.tokenizers import CharTokenizer
from calm_jax.variables import LoRAParam

pytestmark = pytest.mark.usefixtures("fast_compile")

ALL = "layers/(q|k|v|o|gate|up|down)"
HF_NAMES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
            "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def random_lora(cfg, spec, seed):
  """Factors with B != 0 (a trained-looking adapter), so deltas are visible in the logits."""
  lora = L.init_lora(cfg, spec, seed)
  rng = np.random.default_rng(seed + 100)
  return {n: {"a": f["a"], "b": jnp.asarray(0.3 * rng.standard_normal(f["b"].shape), jnp.float32)}
          for n, f in lora.items()}


def tokens_and_mask(cfg, b=3, t=9, seed=0):
  rng = np.random.default_rng(seed)
  tok = rng.integers(3, cfg.vocab_size, (b, t)).astype(np.int32)
  mask = np.ones((b, t), bool)
  mask[1, -3:] = False  # right padding in one row
  return jnp.asarray(tok), jnp.asarray(mask)


def base_logits(cfg, params, tok, mask):
  """The plain decoder, jitted like ours (eager op-by-op dispatch rounds differently)."""
  return np.asarray(jax.jit(lambda p, t, m: forward(cfg, p, t, valid=m)[0])(params, tok, mask))


def ours(cfg, params, spec, lora, tok, mask, **route):
  return np.asarray(L.apply(cfg, spec.hooks(), params, L.lora_extra(lora, cfg.num_layers, **route), tok, mask))


@pytest.fixture(scope="module")
def base(tiny_llama_dir):
  model = hf.load(tiny_llama_dir)
  return model.config, model.params()


def test_targets_regex_selects_and_rejects(base):
  cfg, _ = base
  assert L.select_targets(cfg, "layers/(q|v)") == ("q", "v")
  assert L.select_targets(cfg, "layers/.*") == L.TARGETABLE
  with pytest.raises(ValueError, match=r"'layers/qkv' matches no parameter; candidates: layers/q, layers/k"):
    L.select_targets(cfg, "layers/qkv")
  with pytest.raises(ValueError, match="rank must be >= 1"):
    L.LoRASpec.create(cfg, "layers/q", rank=0)


def test_specs_carry_logical_axes(base):
  cfg, _ = base
  s = L.lora_specs(cfg, L.LoRASpec.create(cfg, "layers/(q|o)", rank=4, num_experts=3))
  assert s["q/a"].axes == ("layers", "experts", "embed", "lora_rank") and s["q/a"].shape == (2, 3, 32, 4)
  assert s["q/b"].axes == ("layers", "experts", "lora_rank", "heads", "head_dim") and s["q/b"].shape == (2, 3, 4, 4, 8)
  assert s["o/a"].shape == (2, 3, 4, 8, 4) and s["o/b"].axes == ("layers", "experts", "lora_rank", "embed")


def test_b_zero_equals_base(base):
  cfg, params = base
  spec = L.LoRASpec.create(cfg, ALL, rank=4, alpha=8)
  lora = L.init_lora(cfg, spec, seed=1)
  assert all(np.abs(np.asarray(f["a"])).max() > 0 for f in lora.values())  # A is random, B = 0
  tok, mask = tokens_and_mask(cfg)
  ref = base_logits(cfg, params, tok, mask)
  # Equal up to fp32 rounding: the two programs are compiled separately and XLA may fuse (and so
  # round) the shared matmuls differently; a trained-looking B moves logits by > 0.1 (next test).
  np.testing.assert_allclose(ours(cfg, params, spec, lora, tok, mask), ref, rtol=0, atol=1e-6)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 32)), jnp.float32)
  np.testing.assert_array_equal(np.asarray(L.lora_delta(x, lora["q"]["a"][0], lora["q"]["b"][0], 2.0)), 0.0)


def peft_model(tiny_llama_dir, spec, lora):
  """transformers + peft LoRA with our factors copied in (peft layout: A [r, in], B [out, r])."""
  from peft import LoraConfig, get_peft_model
  from transformers import LlamaForCausalLM

  model = LlamaForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
  pcfg = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=0.0,
                    target_modules=[HF_NAMES[n].split(".")[1] for n in spec.targets])
  pm = get_peft_model(model, pcfg).eval()
  with torch.no_grad():
    for n in spec.targets:
      a = np.asarray(lora[n]["a"])
      b = np.asarray(lora[n]["b"])
      for layer in range(a.shape[0]):
        mod = pm.base_model.model.model.layers[layer].get_submodule(HF_NAMES[n])
        mod.lora_A["default"].weight.copy_(torch.from_numpy(a[layer].reshape(-1, spec.rank).T.copy()))
        mod.lora_B["default"].weight.copy_(torch.from_numpy(b[layer].reshape(spec.rank, -1).T.copy()))
  return pm


def test_matches_peft_and_merged_equals_unmerged(base, tiny_llama_dir, tmp_path):
  cfg, params = base
  spec = L.LoRASpec.create(cfg, ALL, rank=4, alpha=8)
  lora = random_lora(cfg, spec, 0)
  tok, mask = tokens_and_mask(cfg)
  got = ours(cfg, params, spec, lora, tok, mask)
  plain = base_logits(cfg, params, tok, mask)
  assert np.abs(got - plain).max() > 0.1  # the adapter really changes the logits
  pm = peft_model(tiny_llama_dir, spec, lora)
  with torch.no_grad():
    ref = pm(input_ids=torch.from_numpy(np.asarray(tok)).long(),
             attention_mask=torch.from_numpy(np.asarray(mask)).long()).logits.numpy()
  valid = np.asarray(mask)
  np.testing.assert_allclose(got[valid], ref[valid], atol=1e-4)
  # Merged into the weights (ours) equals the unmerged forward.
  merged = L.merge_lora(cfg, params, lora, spec.scale)
  np.testing.assert_allclose(base_logits(cfg, merged, tok, mask)[valid], got[valid], atol=1e-4)
  # Exported as an HF checkpoint, transformers loads it and agrees with peft's merge_and_unload.
  out = L.save_merged(cfg, params, lora, spec.scale, tmp_path / "merged")
  from transformers import LlamaForCausalLM
  tm = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  ref_merged = pm.merge_and_unload()
  for n in spec.targets:
    w_ours = tm.model.layers[1].get_submodule(HF_NAMES[n]).weight.detach().numpy()
    w_peft = ref_merged.model.layers[1].get_submodule(HF_NAMES[n]).weight.detach().numpy()
    np.testing.assert_allclose(w_ours, w_peft, atol=1e-6)
  with torch.no_grad():
    tl = tm(input_ids=torch.from_numpy(np.asarray(tok)).long(),
            attention_mask=torch.from_numpy(np.asarray(mask)).long()).logits.numpy()
  np.testing.assert_allclose(tl[valid], got[valid], atol=1e-4)


def test_delta_formula_numpy():
  """lora_delta against numpy: single, gathered per-example experts, soft mixture of outputs."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((4, 5, 6)).astype(np.float32)
  a = rng.standard_normal((3, 6, 2)).astype(np.float32)
  b = rng.standard_normal((3, 2, 4, 3)).astype(np.float32)  # out dims (4, 3): like q's (heads, head_dim)
  s = 0.7
  per = np.stack([s * (x @ a[e]) @ b[e].reshape(2, 12) for e in range(3)], 1)  # [B, X, T, 12]
  got = np.asarray(L.lora_delta(jnp.asarray(x), jnp.asarray(a[1]), jnp.asarray(b[1]), s))
  np.testing.assert_allclose(got.reshape(4, 5, 12), per[:, 1], rtol=1e-5, atol=1e-5)
  idx = np.array([2, 0, 1, 2])
  got = np.asarray(L.lora_delta(jnp.asarray(x), jnp.asarray(a), jnp.asarray(b), s, jnp.asarray(idx)))
  np.testing.assert_allclose(got.reshape(4, 5, 12), per[np.arange(4), idx], rtol=1e-5, atol=1e-5)
  w = rng.dirichlet(np.ones(3), 4).astype(np.float32)
  got = np.asarray(L.lora_delta(jnp.asarray(x), jnp.asarray(a), jnp.asarray(b), s, jnp.asarray(w)))
  np.testing.assert_allclose(got.reshape(4, 5, 12), np.einsum("bx,bxto->bto", w, per), rtol=1e-5, atol=1e-5)


def test_heterogeneous_batch_equals_each_example_alone(base):
  cfg, params = base
  spec = L.LoRASpec.create(cfg, ALL, rank=4, alpha=8, num_experts=3)
  lora = random_lora(cfg, spec, 3)
  tok, mask = tokens_and_mask(cfg, b=4)
  experts = np.array([2, 0, 1, 2], np.int32)
  batch = ours(cfg, params, spec, lora, tok, mask, experts=experts)
  single = L.LoRASpec.create(cfg, ALL, rank=4, alpha=8)
  for i, e in enumerate(experts):
    one = {n: {p: f[p][:, e] for p in f} for n, f in lora.items()}
    alone = ours(cfg, params, single, one, tok[i:i + 1], mask[i:i + 1])[0]
    v = np.asarray(mask[i])
    np.testing.assert_allclose(batch[i][v], alone[v], atol=1e-5)
  # One-hot weights = the index; soft weights differ from every single expert.
  onehot = np.eye(3, dtype=np.float32)[experts]
  np.testing.assert_allclose(ours(cfg, params, spec, lora, tok, mask, weights=onehot), batch, atol=1e-5)
  # Per-layer routing: layer 0 and 1 take different experts.
  per_layer = np.stack([experts, (experts + 1) % 3])
  pl = ours(cfg, params, spec, lora, tok, mask, experts=per_layer)
  assert np.abs(pl - batch).max() > 1e-2
  # Merging expert i equals routing every example to i.
  merged = L.merge_lora(cfg, params, lora, spec.scale, expert=1)
  np.testing.assert_allclose(base_logits(cfg, merged, tok, mask),
                             ours(cfg, params, spec, lora, tok, mask, experts=np.ones(4, np.int32)), atol=1e-4)


def test_expert_index_out_of_range(base):
  cfg, params = base
  model = L.LoRAModel(hf.Decoder(cfg, params=params), L.LoRASpec.create(cfg, "layers/q", rank=2, num_experts=3))
  tok, mask = tokens_and_mask(cfg)
  with pytest.raises(ValueError, match=r"expert index out of range \[0, 3\): value 3 at position 1"):
    model(tok, mask, experts=np.array([0, 3, 1]))
  with pytest.raises(L.AdapterError, match="pass expert= to merge"):
    L.merge_lora(cfg, params, model.factors(), 1.0)


def test_dropout_only_with_rng(base):
  cfg, params = base
  spec = L.LoRASpec.create(cfg, ALL, rank=4, alpha=8, dropout=0.5)
  lora = random_lora(cfg, spec, 0)
  model = L.LoRAModel(hf.Decoder(cfg, params=params), spec, lora=lora)
  tok, mask = tokens_and_mask(cfg)
  no_drop = ours(cfg, params, L.LoRASpec.create(cfg, ALL, rank=4, alpha=8), lora, tok, mask)
  np.testing.assert_allclose(np.asarray(model(tok, mask)), no_drop, atol=1e-6)  # eval: off
  d1 = np.asarray(model(tok, mask, rng=jax.random.key(0)))
  d2 = np.asarray(model(tok, mask, rng=jax.random.key(1)))
  assert np.abs(d1 - no_drop).max() > 1e-3 and np.abs(d1 - d2).max() > 1e-3
  np.testing.assert_array_equal(d1, np.asarray(model(tok, mask, rng=jax.random.key(0))))  # seeded


def test_training_changes_only_lora(tmp_path):
  """calm_jax.train with trainable=LoRAParam: base bit-identical, factors move, loss drops,
  optimizer state shaped like the factors only."""
  from calm_jax import sharding
  from calm_jax.experiment import build_decoder
  from calm_jax.tasks import mixture_batches, task_registry
  from calm_jax.train import lm_batch_loss, train
  from calm_jax.variables import LoRAParam
  from configs.pretrain import get_config

  tok = CharTokenizer()
  c = get_config("tiny")
  c.steps, c.log_every, c.checkpoint.every = 8, 1, 8
  c.optimizer.lr, c.optimizer.warmup_steps = 1e-2, 0
  dec = build_decoder(c.model, tok, 0)
  spec = L.LoRASpec.create(dec.config, "layers/(q|v|down)", rank=2, alpha=4)
  model = L.LoRAModel(dec, spec, seed=0)
  before = jax.tree.map(np.array, dec.params())
  _, _, batch_fn = mixture_batches(c.data.tasks, batch_size=c.batch_size, tokenizer=tok,
                                   registry=task_registry(c.data.task_args))
  mesh = sharding.make_mesh([("data", 1), ("fsdp", 1), ("tensor", 1)], devices=jax.devices()[:1])
  r = train(model, trainable=LoRAParam, loss_fn=lm_batch_loss, batch_fn=batch_fn, config=c, workdir=tmp_path,
            mesh=mesh, quiet=True)
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(r.model.base.params())):
    np.testing.assert_array_equal(a, b)
  assert all(np.abs(np.asarray(f["b"])).max() > 0 for f in r.model.factors().values())
  from calm_jax.train.checkpoint import Checkpointer
  meta = json.loads((tmp_path / "checkpoints" / "meta.json").read_text())
  restored = Checkpointer(tmp_path, every=1, keep=1, meta=meta).manager.restore(8)
  state = restored["default"] if "default" in restored else restored
  factor_shapes = {np.shape(x) for x in jax.tree.leaves(r.model.factors())}
  opt_shapes = [np.shape(x) for x in jax.tree.leaves(state["opt_state"]) if np.ndim(x)]
  assert opt_shapes and set(opt_shapes) <= factor_shapes
  assert len(opt_shapes) == 2 * len(jax.tree.leaves(r.model.factors()))  # adam mu, nu per factor
  assert isinstance(r.model.lora.q.a, LoRAParam)


def test_save_load_round_trip_and_errors(base, tmp_path):
  cfg, params = base
  spec = L.LoRASpec.create(cfg, "layers/(q|down)", rank=4, alpha=16)
  lora = random_lora(cfg, spec, 5)
  out = L.save_adapter(tmp_path / "ad", lora, spec, params, metadata={"domain": "count"})
  got, gspec, meta = L.load_adapter(out, params, rank=4, cfg=cfg)
  assert gspec == spec and meta["domain"] == "count" and L.count_params(got) == L.count_params(lora)
  for a, b in zip(jax.tree.leaves(lora), jax.tree.leaves(got)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(L.AdapterError, match="adapter has rank 4, expected rank 8"):
    L.load_adapter(out, params, rank=8)
  other = jax.tree.map(lambda x: x * 1.01, params)
  with pytest.raises(L.AdapterError, match="adapter belongs to base [0-9a-f]{16}, this base is [0-9a-f]{16}"):
    L.load_adapter(out, other)
  with pytest.raises(L.AdapterError, match="not an adapter directory"):
    L.load_adapter(tmp_path)
  with pytest.raises(L.AdapterError, match=r"missing down/b"):
    L.check_lora(cfg, spec, {"q": lora["q"], "down": {"a": lora["down"]["a"]}})
  with pytest.raises(L.AdapterError, match=r"q/a: shape \(2, 32, 4\), expected \(2, 32, 8\)"):
    L.check_lora(cfg, L.LoRASpec.create(cfg, "layers/(q|down)", rank=8), lora)
  # An existing output is not overwritten unless asked.
  with pytest.raises(FileExistsError):
    L.save_adapter(out, lora, spec, params)


def test_sharded_heterogeneous_forward_matches_one_device(base):
  """Base and expert factors placed by their logical axes on 8 fake devices (data 2, fsdp 2,
  tensor 2; experts replicated, rank unsplit) give the 1-device logits."""
  from calm_jax import sharding
  cfg, params = base
  spec = L.LoRASpec.create(cfg, ALL, rank=4, alpha=8, num_experts=3)
  lora = random_lora(cfg, spec, 4)
  tok, mask = tokens_and_mask(cfg, b=4)
  experts = np.array([2, 0, 1, 2], np.int32)
  ref = ours(cfg, params, spec, lora, tok, mask, experts=experts)
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
  p_sh = sharding.param_shardings(cfg, mesh)
  l_sh = nest({k: NamedSharding(mesh, sharding.logical_to_spec(s.axes, sharding.DEFAULT_RULES, mesh, s.shape))
               for k, s in L.lora_specs(cfg, spec).items()})
  sp, sl = jax.device_put(params, p_sh), jax.device_put(lora, l_sh)
  assert len(sl["gate"]["b"].sharding.device_set) == 8 and sl["gate"]["b"].sharding.spec != jax.P()
  with jax.set_mesh(mesh):
    got = ours(cfg, sp, spec, sl, jax.device_put(tok, sharding.batch_sharding(mesh)),
               jax.device_put(mask, sharding.batch_sharding(mesh)), experts=experts)
  np.testing.assert_allclose(got, ref, atol=2e-5)
