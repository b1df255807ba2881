"""moa/: stacked experts, routers, routing modes, training (only LoRA/router state trains),
new-domain extension, saving, bad input. Tiny random decoders; the router-accuracy claim on the
trained base is in test_moa_suite.py."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calm_jax import lora as L
from calm_jax.experiment import build_decoder
from calm_jax.models.decoder import forward
from calm_jax.tokenizers import CharTokenizer
from moa import evaluate as E
from moa import routers as R
from moa.experts import add_expert, load_experts, select_expert, stack_loras
from moa.model import MoAModel, load_moa, moa_loss, save_moa
from moa.suite import labelled_batches

pytestmark = pytest.mark.usefixtures("fast_compile")
TOK = CharTokenizer()
DOMAINS = ["addition", "count", "sort"]


def tiny_model_cfg():
  from configs.pretrain import get_config
  return get_config("tiny").model


@pytest.fixture(scope="module")
def setup():
  dec = build_decoder(tiny_model_cfg(), TOK, 0)
  cfg = dec.config
  spec1 = L.LoRASpec.create(cfg, "layers/(q|v|o|down)", rank=4, alpha=8)
  rng = np.random.default_rng(0)
  loras = []
  for i in range(len(DOMAINS)):
    lo = L.init_lora(cfg, spec1, seed=i)
    loras.append({n: {"a": f["a"], "b": jnp.asarray(0.5 * rng.standard_normal(f["b"].shape), jnp.float32)}
                  for n, f in lo.items()})
  experts, spec = stack_loras(loras, [spec1] * len(DOMAINS))
  return dec, spec1, loras, experts, spec


def batch_of(domains_idx, seed=0):
  from calm_jax.tasks import Mixture, max_seq_len
  mix = Mixture({d: 1.0 for d in DOMAINS}, seed=seed, domains=DOMAINS)
  ex = []
  i = 0
  for d in domains_idx:  # first examples of the wanted domains, in order
    while True:
      e = mix.example(i)
      i += 1
      if e.domain_id == d:
        ex.append(e)
        break
  from calm_jax.tasks import encode_batch
  return encode_batch(ex, TOK, max_seq_len(list(mix.tasks.values())))


def test_stacking_and_selection(setup):
  dec, spec1, loras, experts, spec = setup
  assert spec.num_experts == 3 and experts["q"]["a"].shape == (2, 3, 32, 4)
  for i, lo in enumerate(loras):
    for a, b in zip(jax.tree.leaves(select_expert(experts, i)), jax.tree.leaves(lo)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_heterogeneous_labelled_forward_equals_each_alone(setup):
  """A mixed-domain batch (each example its labelled expert) = each example alone with its LoRA."""
  dec, spec1, loras, experts, spec = setup
  model = MoAModel(dec, spec, experts)
  b = batch_of([2, 0, 1, 0])
  logits, rlogits = model.labelled_forward(b)
  assert rlogits.shape == (2, 4, 3)
  for i, d in enumerate(b["domain"]):
    alone = L.LoRAModel(dec, spec1, lora=loras[d])(b["inputs"][i:i + 1], b["attention_mask"][i:i + 1])
    v = b["attention_mask"][i].astype(bool)
    np.testing.assert_allclose(np.asarray(logits[i])[v], np.asarray(alone[0])[v], atol=1e-5)
    other = L.LoRAModel(dec, spec1, lora=loras[(d + 1) % 3])(b["inputs"][i:i + 1], b["attention_mask"][i:i + 1])
    assert np.abs(np.asarray(other[0])[v] - np.asarray(logits[i])[v]).max() > 1e-3  # experts really differ


def test_router_logits_match_numpy(setup):
  """Router = linear on the RMS-normalised mean of the layer input over prompt tokens."""
  dec, spec1, loras, experts, spec = setup
  model = MoAModel(dec, spec, experts, seed=3)
  b = batch_of([0, 1, 2])
  _, rlogits = model.labelled_forward(b)
  extra = L.lora_extra(experts, 2, experts=b["domain"])
  _, aux = forward(dec.config, dec.params(), jnp.asarray(b["inputs"]), valid=jnp.asarray(b["attention_mask"] > 0),
                   hooks=spec.hooks(), extra=extra, return_hidden=True)
  hidden = np.asarray(aux["hidden"])
  r = jax.tree.map(np.asarray, model.routers())
  for layer in range(2):
    for i in range(3):
      m = hidden[layer, i, :b["prompt_len"][i]].mean(0)
      m = m / np.sqrt(np.mean(m * m) + 1e-6)
      np.testing.assert_allclose(np.asarray(rlogits[layer, i]), m @ r["w"][layer] + r["b"][layer], rtol=1e-4,
                                 atol=1e-5)


def test_routing_modes(setup):
  """layer: self-consistent with the stream it routes; vote / last / soft top-k against numpy."""
  dec, spec1, loras, experts, spec = setup
  routers = R.init_routers(dec.config, 3, seed=7)
  routers = {"w": routers["w"] * 10.0, "b": routers["b"]}  # distinct choices per layer, unsaturated
  b = batch_of([0, 1, 2, 0, 1, 2])
  pv = np.arange(b["inputs"].shape[1])[None] < b["prompt_len"][:, None]
  tokens, valid = jnp.asarray(b["inputs"]), jnp.asarray(pv)
  hard, probs = R.route(dec.config, R.MoAHooks(spec.targets, spec.scale, 0.0, 1), dec.params(), experts, routers,
                        tokens, valid)
  probs = np.asarray(probs)
  layer = np.asarray(hard["layer"])
  np.testing.assert_array_equal(layer, probs.argmax(-1))
  assert (layer[0] != layer[1]).any() # layers disagree somewhere: vote/last matter
  # Feeding the per-layer decisions as fixed routes reproduces the routers' inputs and choices.
  _, aux = forward(dec.config, dec.params(), tokens, valid=valid, hooks=spec.hooks(),
                   extra=L.lora_extra(experts, 2, experts=layer), return_hidden=True)
  np.testing.assert_allclose(np.asarray(jax.nn.softmax(R.all_logits(routers, aux["hidden"], valid), -1)), probs,
                             atol=1e-5)
  votes = np.stack([np.bincount(layer[:, i], minlength=3) for i in range(6)])
  want_vote = [np.lexsort((probs.mean(0)[i], votes[i]))[-1] for i in range(6)]
  np.testing.assert_array_equal(np.asarray(hard["vote"]), np.broadcast_to(want_vote, (2, 6)))
  np.testing.assert_array_equal(np.asarray(hard["last"]), np.broadcast_to(probs[-1].argmax(-1), (2, 6)))
  # Soft top-2: the last router's input depends on layer 0's soft mixture, so use this pass's probabilities.
  soft, p2 = R.route(dec.config, R.MoAHooks(spec.targets, spec.scale, 0.0, 2), dec.params(), experts, routers,
                     tokens, valid)
  w = np.asarray(soft["last"][0])
  p_last = np.asarray(p2)[-1]
  top = np.argsort(-p_last, -1)[:, :2]
  want = np.zeros_like(p_last)
  for i in range(6):
    want[i, top[i]] = p_last[i, top[i]] / p_last[i, top[i]].sum()
  np.testing.assert_allclose(w, want, atol=1e-5)
  with pytest.raises(ValueError, match="unknown routing mode 'first'"):
    E.moa_route(dec, spec, experts, routers, "first")


def tiny_train_config(steps):
  from configs.moa.common import lora_training
  c = lora_training(steps=steps, batch_size=8)
  c.log_every, c.checkpoint.every = 1, steps
  return c


@pytest.mark.parametrize("train_experts", [False, True])
def test_only_router_and_lora_state_trains(setup, tmp_path, train_experts):
  from calm_jax import sharding
  from calm_jax.train import train
  from calm_jax.train.checkpoint import Checkpointer
  from calm_jax.variables import LoRAParam, RouterParam
  dec, spec1, loras, experts, spec = setup
  model = MoAModel(dec, spec, experts)
  before_base = jax.tree.map(np.array, dec.params())
  before_experts = jax.tree.map(np.array, model.factors())
  before_routers = jax.tree.map(np.array, model.routers())
  c = tiny_train_config(4)
  mesh = sharding.make_mesh([("data", 1), ("fsdp", 1), ("tensor", 1)], devices=jax.devices()[:1])
  trainable, frozen = ((RouterParam, LoRAParam), ()) if train_experts else (RouterParam, LoRAParam)
  r = train(model, trainable=trainable, frozen=frozen, loss_fn=moa_loss(1.0),
            batch_fn=labelled_batches(DOMAINS, c, TOK, {}, 8), config=c, workdir=tmp_path, mesh=mesh, quiet=True)
  for a, b in zip(jax.tree.leaves(before_base), jax.tree.leaves(r.model.base.params())):
    np.testing.assert_array_equal(a, b)
  experts_moved = any(not np.array_equal(a, np.asarray(b)) for a, b in
                      zip(jax.tree.leaves(before_experts), jax.tree.leaves(r.model.factors())))
  assert experts_moved == train_experts
  assert all(not np.array_equal(a, np.asarray(b)) for a, b in
             zip(jax.tree.leaves(before_routers), jax.tree.leaves(r.model.routers())))
  meta = json.loads((tmp_path / "checkpoints" / "meta.json").read_text())
  restored = Checkpointer(tmp_path, every=1, keep=1, meta=meta).manager.restore(4)
  state = restored["default"] if "default" in restored else restored
  trained = jax.tree.leaves(r.model.routers()) + (jax.tree.leaves(r.model.factors()) if experts_moved else [])
  opt_shapes = sorted(np.shape(x) for x in jax.tree.leaves(state["opt_state"]) if np.ndim(x))
  assert opt_shapes == sorted(2 * [np.shape(x) for x in trained])  # adam mu, nu of exactly the trained leaves
  assert {"router_ce", "router_accuracy", "lm_loss"} <= set(r.metrics)


def test_new_domain_extension(setup):
  """Adding an expert keeps the others bit for bit, extends routers by one column, and routes to it."""
  dec, spec1, loras, experts, spec = setup
  new = L.init_lora(dec.config, spec1, seed=9)
  new = {n: {"a": f["a"], "b": 0.1 * jnp.ones_like(f["b"])} for n, f in new.items()}
  grown, spec2 = add_expert(experts, spec, new, spec1)
  assert spec2.num_experts == 4
  for a, b in zip(jax.tree.leaves(grown), jax.tree.leaves(experts)):
    np.testing.assert_array_equal(np.asarray(a)[:, :3], np.asarray(b))
  routers = R.init_routers(dec.config, 3, seed=1)
  r2 = R.extend_routers(routers, seed=2)
  np.testing.assert_array_equal(np.asarray(r2["w"][..., :3]), np.asarray(routers["w"]))
  assert r2["w"].shape == (2, 32, 4) and r2["b"].shape == (2, 4)
  b = batch_of([0, 1])
  tok, mask = jnp.asarray(b["inputs"]), jnp.asarray(b["attention_mask"] > 0)
  got = L.apply(dec.config, spec2.hooks(), dec.params(), L.lora_extra(grown, 2, experts=np.array([3, 3])), tok, mask)
  want = L.LoRAModel(dec, spec1, lora=new)(tok, mask)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
  with pytest.raises(L.AdapterError, match="cannot add"):
    add_expert(experts, spec, L.init_lora(dec.config, L.LoRASpec.create(dec.config, "layers/q", rank=4)),
               L.LoRASpec.create(dec.config, "layers/q", rank=4, alpha=8))


def test_bad_input(setup, tmp_path):
  dec, spec1, loras, experts, spec = setup
  model = MoAModel(dec, spec, experts)
  b = batch_of([0, 1])
  b["domain"] = np.array([0, 3], np.int32)
  with pytest.raises(ValueError, match=r"domain label out of range \[0, 3\): value 3 at position 1"):
    model.labelled_forward(b)
  spec_r2 = L.LoRASpec.create(dec.config, "layers/(q|v|o|down)", rank=2, alpha=8)
  with pytest.raises(L.AdapterError, match="mismatched rank: adapter 0 has rank 4, adapter 1 has rank 2"):
    stack_loras([loras[0], L.init_lora(dec.config, spec_r2)], [spec1, spec_r2])
  # Adapters saved on another base are refused when stacking.
  p0 = L.save_adapter(tmp_path / "a0", loras[0], spec1, dec.params())
  other = jax.tree.map(lambda x: x + 0.01, dec.params())
  p1 = L.save_adapter(tmp_path / "a1", loras[1], spec1, other)
  with pytest.raises(L.AdapterError, match=r"a1: adapter belongs to base [0-9a-f]+, the experts' base is"):
    load_experts([p0, p1], dec.params())
  got, gspec, _ = load_experts([p0, p0], dec.params())
  assert gspec.num_experts == 2


def test_save_load_moa(setup, tmp_path):
  dec, spec1, loras, experts, spec = setup
  model = MoAModel(dec, spec, experts, seed=5)
  out = save_moa(tmp_path / "moa", model, metadata={"domains": DOMAINS})
  got = load_moa(out, dec)
  for a, b in zip(jax.tree.leaves((model.factors(), model.routers())), jax.tree.leaves((got.factors(), got.routers()))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  other = build_decoder(tiny_model_cfg(), TOK, 1)
  with pytest.raises(L.AdapterError, match="adapter belongs to base"):
    load_moa(out, other)
