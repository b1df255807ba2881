"""CALM composition on tiny random decoders: init equals the anchor, no leakage through the
cross mask, the cross-attention against a numpy reference, iterative decoding against repeated
teacher-forced forwards, frozen bases under training, two augmenting models, bad input."""
import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from calm import Composed, CompositionError, forward, generate, prompt_mask
from calm.compose import compose_param_specs
from calm_jax.models import Decoder, DecoderConfig, init_params
from calm_jax.models import decoder as dec
from calm_jax.train import lm_loss, train
from calm_jax.train.trainer import split_trainable, trainable_filter
from calm_jax.train.optim import make_optimizer
from calm_jax.variables import ComposeParam
from configs.common import add_common

pytestmark = pytest.mark.usefixtures("fast_compile")

V = 40


def cfg(width, layers, heads, kv, vocab=V, **kw):
  return DecoderConfig.make(model_type="llama", vocab_size=vocab, hidden_size=width, intermediate_size=2 * width,
                            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                            max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0, **kw)


ANCHOR = cfg(32, 4, 4, 2)
AUG = cfg(16, 8, 2, 1)  # narrower and deeper: 2 default connections (layers 4, 8 -> anchor 1, 3)
AUG2 = cfg(24, 4, 3, 3)


def decoder(c, seed):
  return Decoder(c, params=init_params(c, seed, std=0.3))


def composed(augs=(AUG,), zero_output=False, **kw):
  return Composed(decoder(ANCHOR, 0), [decoder(a, 10 + i) for i, a in enumerate(augs)], seed=3,
                  zero_output=zero_output, **kw)


def tokens(b, t, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(3, V, (b, t)), jnp.int32)


def test_default_connections():
  m = composed()
  assert m.spec.connections == (((4, 1), (8, 3)),)
  assert compose_param_specs(m.spec)[0]["proj"].shape == (2, 16, 32)


def test_init_equals_anchor_exactly():
  m = composed(zero_output=True)
  toks = tokens(3, 11)
  valid = jnp.asarray(np.arange(11)[None] < np.array([[11], [7], [4]]))
  got = jax.jit(lambda p: forward(m.spec, p, toks, valid=valid)[0])(m.params())
  want = jax.jit(lambda p: dec.forward(ANCHOR, p, toks, valid=valid)[0])(m.anchor.params())
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # and the connection is live once W_O is not zero
  live = composed(zero_output=False)
  assert float(jnp.max(jnp.abs(live(toks, valid) - want))) > 1e-2


def numpy_rotate(x, theta=10000.0):
  """Rotary of x [T, H, D] at positions 0..T-1, rotate-half convention, written out pairwise."""
  t, _, d = x.shape
  out = np.empty_like(x)
  for i in range(d // 2):
    ang = np.arange(t)[:, None] * theta ** (-2 * i / d)
    a, b = x[..., i], x[..., i + d // 2]
    out[..., i] = a * np.cos(ang) - b * np.sin(ang)
    out[..., i + d // 2] = b * np.cos(ang) + a * np.sin(ang)
  return out


def numpy_cross(h, s, cp, c, heads, eps=1e-6, rope=False):
  """Reference f_cross(f_proj(s), h) for one row, with the causal loop written out."""
  def norm(x, w):
    return w * x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps)
  kv_in = norm(s, cp["aug_norm"][c]) @ cp["proj"][c] + cp["proj_bias"][c]
  x = norm(h, cp["q_norm"][c])
  t, e = h.shape
  q = np.einsum("te,ehd->thd", x, cp["q"][c])
  k = np.einsum("te,ehd->thd", kv_in, cp["k"][c])
  v = np.einsum("te,ehd->thd", kv_in, cp["v"][c])
  if rope:
    q, k = numpy_rotate(q), numpy_rotate(k)
  out = np.zeros((t, heads, q.shape[-1]))
  null = cp.get("null_k")
  for i in range(t):  # query i reads keys 0..i (and the null slot, value 0, when there is one)
    sc = np.einsum("hd,shd->hs", q[i], k[:i + 1]) / np.sqrt(q.shape[-1])
    if null is not None:
      sc = np.concatenate([np.einsum("hd,hd->h", q[i], null[c])[:, None] / np.sqrt(q.shape[-1]), sc], 1)
    p = np.exp(sc - sc.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out[i] = np.einsum("hs,shd->hd", p[:, -(i + 1):], v[:i + 1])
  return np.einsum("thd,hde->te", out, cp["o"][c])


@pytest.mark.parametrize("rope,null", [(False, False), (True, False), (True, True)])
def test_cross_attention_matches_numpy_reference(rope, null):
  # One connection after the anchor's last layer: composed logits = unembed(H_B,L + f_cross).
  m = composed(augment_layers=[[5]], anchor_layers=[[4]], cross_rope=rope, cross_null=null)
  toks = tokens(2, 9, seed=1)
  params = m.params()
  if null:  # a live null key (it starts at zero)
    params["compose"] = ({**params["compose"][0], "null_k": jnp.asarray(
        np.random.default_rng(5).standard_normal(params["compose"][0]["null_k"].shape), jnp.float32)},)
  p = jax.tree.map(np.asarray, params)
  _, ha = dec.forward(AUG, m.params()["augments"][0], toks, return_hidden=True)
  _, hb = dec.forward(ANCHOR, m.params()["anchor"], toks, return_hidden=True)
  got = np.asarray(forward(m.spec, params, toks)[0])
  for r in range(2):
    hr = np.asarray(hb["hidden"][4][r], np.float64)
    h = hr + numpy_cross(hr, np.asarray(ha["hidden"][5][r], np.float64), p["compose"][0], 0, ANCHOR.num_heads,
                         rope=rope)
    f = p["anchor"]["final_norm"] * h / np.sqrt(np.mean(h * h, -1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(got[r], f @ p["anchor"]["lm_head"], atol=2e-4, rtol=1e-4)


def test_connection_into_the_embedding_output():
  # Anchor layer 0: the update lands on the embeddings, and all four anchor layers run on it.
  m = composed(augment_layers=[[3]], anchor_layers=[[0]])
  toks = tokens(2, 9, seed=4)
  p = jax.tree.map(np.asarray, m.params())
  _, ha = dec.forward(AUG, m.params()["augments"][0], toks, return_hidden=True)
  h0 = np.asarray(dec.embed(m.params()["anchor"], toks), np.float64)
  u = np.stack([numpy_cross(h0[r], np.asarray(ha["hidden"][3][r], np.float64), p["compose"][0], 0,
                            ANCHOR.num_heads) for r in range(2)])
  h0 = h0 + u
  positions = jnp.broadcast_to(jnp.arange(9), (2, 9))
  h, _, _ = dec.run_layers(ANCHOR, m.params()["anchor"]["layers"], jnp.asarray(h0, jnp.float32),
                           positions=positions, kv_valid=jnp.ones((2, 9), bool), cache=None, layer_ids=np.arange(4))
  want = np.asarray(dec.unembed(ANCHOR, m.params()["anchor"], h))
  np.testing.assert_allclose(np.asarray(m(toks)), want, atol=2e-4, rtol=1e-4)
  prompts = [[1, 5, 9, 12], [1, 22, 7]]
  assert generate(m.spec, m.params(), prompts, max_new_tokens=5, eos_token_id=[]) == reference_greedy(m, prompts, 5)


def test_no_leakage_from_future_augmenting_positions():
  m = composed()
  toks = tokens(2, 12, seed=2)
  base = np.asarray(m(toks))
  for t in (0, 4, 9):
    changed = toks.at[:, t + 1:].set((toks[:, t + 1:] + 7) % (V - 3) + 3)
    got = np.asarray(m(changed))
    np.testing.assert_array_equal(got[:, :t + 1], base[:, :t + 1])
  # m_A's past does reach the anchor: changing position 0 moves later logits beyond the anchor's own change
  anchor_only = np.asarray(m.anchor(toks))
  assert np.max(np.abs(base - anchor_only)) > 1e-2


def test_padding_is_masked():
  m = composed()
  toks = tokens(2, 10, seed=3)
  valid = jnp.asarray(np.arange(10)[None] < np.array([[10], [6]]))
  a = np.asarray(m(toks, valid))
  b = np.asarray(m(toks.at[1, 6:].set(5), valid))
  np.testing.assert_array_equal(a[1, :6], b[1, :6])


def reference_greedy(m, prompts, n, aug_mode="iterative", width=16):
  """Argmax of repeated full teacher-forced forwards (no cache; right-padded to one width)."""
  @jax.jit
  def full(p, toks, length, prompt_len):
    valid = jnp.arange(width)[None] < length
    aug_valid = prompt_mask(valid, prompt_len[None]) if aug_mode == "encoder" else None
    return forward(m.spec, p, toks, valid=valid, aug_valid=aug_valid)[0][0, length - 1]

  p = m.params()
  out = []
  for prompt in prompts:
    seq = list(prompt)
    for _ in range(n):
      toks = jnp.asarray([seq + [0] * (width - len(seq))], jnp.int32)
      seq.append(int(jnp.argmax(full(p, toks, len(seq), len(prompt)))))
    out.append(seq[len(prompt):])
  return out


@pytest.mark.parametrize("augs,aug_mode,rope", [((AUG,), "iterative", False), ((AUG, AUG2), "iterative", False),
                                               ((AUG,), "encoder", False), ((AUG,), "iterative", True)])
def test_iterative_decoding_matches_teacher_forced_argmax(augs, aug_mode, rope):
  # With cross_rope the cached keys are rotated at their (left-padded) positions; the null slot is
  # visible from the first step.
  m = composed(augs=augs, aug_mode=aug_mode, cross_rope=rope, cross_null=rope)
  prompts = [[1, 5, 9, 12, 30, 7], [1, 22], [1, 3, 3, 17]]
  got = generate(m.spec, m.params(), prompts, max_new_tokens=7, eos_token_id=[])
  want = reference_greedy(m, prompts, 7, aug_mode)
  assert got == want
  if aug_mode == "encoder":  # the ablation is a different model once tokens are generated
    assert want != reference_greedy(m, prompts, 7)


def train_config(steps=3):
  c = ml_collections.ConfigDict()
  c.method = "calm_test"
  add_common(c, steps=steps, batch_size=4)
  c.optimizer.lr = 1e-2
  c.optimizer.weight_decay = 0.1
  c.optimizer.name = "adamw"
  c.tensorboard = False
  c.log_every = 1
  return c


def batch_fn(step):
  rng = np.random.default_rng(step)
  toks = rng.integers(3, V, (4, 10)).astype(np.int32)
  mask = np.ones((4, 10), np.float32)
  mask[:, :4] = 0
  return {"inputs": toks, "targets": np.roll(toks, -1, 1), "loss_mask": mask, "attention_mask": np.ones((4, 10), np.int32),
          "prompt_len": np.full((4,), 5, np.int32)}


def loss_fn(model, batch, rng):
  return lm_loss(model(batch["inputs"], batch["attention_mask"], batch["prompt_len"]), batch["targets"],
                 batch["loss_mask"])


@pytest.mark.parametrize("augs", [(AUG,), (AUG, AUG2)])
def test_training_touches_only_composition(augs, tmp_path):
  m = composed(augs=augs, zero_output=True)
  before = jax.tree.map(np.asarray, m.params())
  config = train_config()
  # What the trainer differentiates and keeps optimizer state for: the composition parameters only.
  _, trainable, frozen = split_trainable(m, trainable_filter(ComposeParam))
  t_leaves = jax.tree.leaves(trainable)
  assert sum(x.size for x in t_leaves) == sum(x.size for x in jax.tree.leaves(before["compose"]))
  opt_leaves = [x for x in jax.tree.leaves(make_optimizer(config.optimizer, 3).init(trainable)) if x.ndim]
  assert sorted(x.shape for x in opt_leaves) == sorted([x.shape for x in t_leaves] * 2)
  mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), devices=jax.devices()[:1],
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  result = train(m, trainable=ComposeParam, loss_fn=loss_fn, batch_fn=batch_fn, config=config, workdir=tmp_path,
                 quiet=True, mesh=mesh)
  after = jax.tree.map(np.asarray, result.model.params())
  for k in ("anchor", "augments"):
    for x, y in zip(jax.tree.leaves(before[k]), jax.tree.leaves(after[k])):
      assert x.tobytes() == y.tobytes()
  changed = [not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(before["compose"]),
                                                        jax.tree.leaves(after["compose"]))]
  assert all(changed)  # W_O moves off zero and, through it, everything else gets a gradient
  assert np.isfinite(result.metrics["loss"])


def test_bad_input():
  anchor = decoder(ANCHOR, 0)
  with pytest.raises(CompositionError, match="vocabulary size 50 differs"):
    Composed(anchor, [decoder(cfg(16, 4, 2, 1, vocab=50), 1)])
  other_eos = dataclasses.replace(AUG, eos_token_ids=(3,))
  with pytest.raises(CompositionError, match="eos_token_ids"):
    Composed(anchor, [Decoder(other_eos, params=init_params(other_eos, 1))])
  aug = decoder(AUG, 1)
  with pytest.raises(CompositionError, match="2 augmenting layers .* but 1 anchor layers"):
    Composed(anchor, [aug], augment_layers=[[4, 8]], anchor_layers=[[2]])
  with pytest.raises(CompositionError, match=r"augmenting layers \[9\] out of range 1..8"):
    Composed(anchor, [aug], augment_layers=[[9]], anchor_layers=[[2]])
  with pytest.raises(CompositionError, match=r"anchor layers \[5\] out of range 0..4"):
    Composed(anchor, [aug], augment_layers=[[4]], anchor_layers=[[5]])
  with pytest.raises(CompositionError, match="1 augmenting models but 2 augment_layers lists"):
    Composed(anchor, [aug], augment_layers=[[4], [8]])
  with pytest.raises(CompositionError, match="num_heads 3 must divide"):
    Composed(anchor, [aug], num_heads=3)
  with pytest.raises(ValueError, match="needs prompt_len"):
    Composed(anchor, [aug], aug_mode="encoder")(tokens(1, 4))


def test_hidden_states_at_connected_layers():
  """forward(return_hidden) gives the composed stream after each connected anchor layer: with zero
  output the anchor's own layer outputs (anchor_hidden, checked against a layer-by-layer run of the
  decoder), and with a live composition the last one is what the logits are read from."""
  from calm.compose import anchor_hidden
  m = composed(zero_output=True, augment_layers=[(2, 4, 8)], anchor_layers=[(0, 1, 4)])
  toks = tokens(2, 9)
  p = m.params()
  logits, _, hidden = forward(m.spec, p, toks, return_hidden=True)
  assert sorted(hidden) == [0, 1, 4]
  want = anchor_hidden(m.spec, p["anchor"], toks)
  cfg_a = m.spec.anchor
  h = dec.embed(p["anchor"], toks)
  pos = jnp.broadcast_to(jnp.arange(9), (2, 9))
  ref = {0: h}
  for layer in range(cfg_a.num_layers):
    one = jax.tree.map(lambda x: x[layer:layer + 1], p["anchor"]["layers"])
    h, _, _ = dec.run_layers(cfg_a, one, h, positions=pos, kv_valid=jnp.ones((2, 9), bool), cache=None,
                             layer_ids=np.arange(layer, layer + 1))
    ref[layer + 1] = h
  for j in (0, 1, 4):
    np.testing.assert_allclose(np.asarray(hidden[j]), np.asarray(ref[j]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(want[j]), np.asarray(ref[j]), rtol=1e-5, atol=1e-5)
  live = composed(augment_layers=[(2, 4, 8)], anchor_layers=[(0, 1, 4)])
  lp = live.params()
  logits, _, hidden = forward(live.spec, lp, toks, return_hidden=True)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(dec.unembed(live.spec.anchor, lp["anchor"], hidden[4])),
                             rtol=1e-5, atol=1e-5)
  assert float(jnp.max(jnp.abs(hidden[0] - ref[0]))) > 1e-3  # the live composition changes the stream
