"""KV-cache generation (`calm_jax.decoding`) against transformers `generate` and against itself."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch

from calm_jax import decoding, hf
from calm_jax.models import Decoder, DecoderConfig, Hooks, forward
from calm_jax.models.decoder import DENSE_EQ

import hf_zoo

VOCAB = hf_zoo.BASE["vocab_size"]
PAD = hf_zoo.BASE["pad_token_id"]
# Zoo cases (seeded tiny models, biases and norms randomised): the mistral window (5) is
# shorter than prompt + generation, and one qwen2 has a sliding and two full layers.
KINDS = ["llama_gqa", "mistral_window", "qwen2_tied", "qwen2_mixed_window"]
PROMPT_LENS = (5, 11, 2, 8)


@pytest.fixture(scope="module")
def models(zoo_saved):
  """kind -> (torch model, our Decoder loaded from its `save_pretrained` directory)."""
  cache = {}

  def get(kind):
    if kind not in cache:
      m, path = zoo_saved(kind)
      cache[kind] = (m, hf.load(path))
    return cache[kind]

  return get


def _prompts(seed=0, lens=PROMPT_LENS):
  rng = np.random.default_rng(seed)
  return [rng.integers(2, VOCAB - 1, n).tolist() for n in lens]


def _left_pad(prompts):
  p = max(map(len, prompts))
  ids = torch.tensor([[PAD] * (p - len(x)) + x for x in prompts])
  mask = torch.tensor([[0] * (p - len(x)) + [1] * len(x) for x in prompts])
  return ids, mask


def _hf_generate(m, prompts, n, eos):
  """HF greedy tokens per row (cut after the first EOS, inclusive) and their log-probs."""
  ids, mask = _left_pad(prompts)
  with torch.no_grad():
    out = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=PAD,
                     eos_token_id=eos, output_scores=True, return_dict_in_generate=True)
  new = out.sequences[:, ids.shape[1]:]
  lps = torch.stack(out.scores, 1).float().log_softmax(-1).gather(-1, new[..., None])[..., 0]
  toks, logps = [], []
  for row, lp in zip(new.tolist(), lps.tolist()):
    k = len(row)
    for j, t in enumerate(row):
      if eos is not None and t in (eos if isinstance(eos, list) else [eos]):
        k = j + 1
        break
    toks.append(row[:k])
    logps.append(lp[:k])
  return toks, logps


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_and_logprobs_match_transformers(models, kind):
  """Left-padded batch of unequal prompts: same greedy tokens and (raw-logit) log-probs as HF."""
  m, model = models(kind)
  prompts = _prompts()
  n = 10
  ours, our_lps = decoding.generate(model, prompts, max_new_tokens=n, eos_token_id=[], return_logprobs=True)
  theirs, their_lps = _hf_generate(m, prompts, n, eos=[])
  assert ours == theirs
  assert all(len(r) == n for r in ours)
  assert len({t for r in ours for t in r}) > 6, "degenerate model: greedy tokens barely vary"
  np.testing.assert_allclose(np.array(our_lps), np.array(their_lps), atol=1e-4)


def test_sliding_window_is_exercised(models):
  """The mistral window really changes the result (else the comparison above proves little)."""
  _, model = models("mistral_window")
  full = Decoder(model.config.replace(layer_windows=(0,) * model.config.num_layers), params=model.params())
  prompts = _prompts()
  assert decoding.generate(model, prompts, max_new_tokens=10, eos_token_id=[]) != \
    decoding.generate(full, prompts, max_new_tokens=10, eos_token_id=[])


def test_eos_stops_rows_like_transformers(models):
  m, model = models("llama_gqa")
  prompts = _prompts(1)
  free = decoding.generate(model, prompts, max_new_tokens=10, eos_token_id=[])
  eos = free[0][3]  # emitted mid-way by row 0: row 0 must stop there, others wherever it appears
  ours = decoding.generate(model, prompts, max_new_tokens=10, eos_token_id=eos)
  theirs, _ = _hf_generate(m, prompts, 10, eos=eos)
  assert ours == theirs
  for row, full in zip(ours, free):
    k = full.index(eos) + 1 if eos in full else len(full)
    assert row == full[:k]
  assert ours[0][-1] == eos and len(ours[0]) <= 4
  # The config's EOS ids are the default; a list of ids works too.
  with_cfg = Decoder(model.config.replace(eos_token_ids=(eos,)), params=model.params())
  assert decoding.generate(with_cfg, prompts, max_new_tokens=10) == ours
  assert decoding.generate(model, prompts, max_new_tokens=10, eos_token_id=[VOCAB - 1, eos]) == \
    decoding.generate(model, prompts, max_new_tokens=10, eos_token_id=(eos, VOCAB - 1))


def test_early_stop_pads_and_lengths(models):
  _, model = models("llama_gqa")
  cfg, params = model.config, model.params()
  prompts = _prompts(1)
  eos = decoding.generate(model, prompts, max_new_tokens=10, eos_token_id=[])[0][0]  # row 0 stops at once
  ids, mask = _left_pad(prompts)
  toks, lps, lengths = jax.jit(
    lambda p, t, v: decoding.generate_arrays(cfg, p, t, v, jax.random.key(0), max_new_tokens=10,
                                             eos_ids=(eos,), pad_id=PAD))(params, ids.numpy(), mask.numpy() > 0)
  assert int(lengths[0]) == 1 and int(toks[0, 0]) == eos
  assert (np.asarray(toks[0, 1:]) == PAD).all() and (np.asarray(lps[0, 1:]) == 0).all()
  assert (np.asarray(lengths[1:]) >= 1).all()


def test_cache_matches_full_forward_argmax(models):
  """Greedy with the KV cache == argmax of full (cache-free) forwards over the growing sequence."""
  n = 8
  for kind in ("llama_gqa", "mistral_window"):
    _, model = models(kind)
    cfg, params = model.config, model.params()
    prompts = _prompts(2)
    ours = decoding.generate(model, prompts, max_new_tokens=n, eos_token_id=[])
    ids, mask = (x.numpy() for x in _left_pad(prompts))
    p = ids.shape[1]
    # Fixed-width buffer, not-yet-generated slots invalid on the right (causal: they change nothing).
    ids = np.concatenate([ids, np.zeros((len(prompts), n), ids.dtype)], 1)
    valid = np.concatenate([mask > 0, np.zeros((len(prompts), n), bool)], 1)
    fwd = jax.jit(lambda t, v: forward(cfg, params, t, valid=v, positions=decoding.hf_positions(v))[0])
    for j in range(n):
      ids[:, p + j] = np.asarray(jnp.argmax(fwd(ids, valid)[:, p + j - 1], -1))
      valid[:, p + j] = True
    assert ours == ids[:, p:].tolist(), kind


def test_batching_and_padding_do_not_change_rows(models):
  """A row's greedy tokens do not depend on its batch-mates, the padding or the buckets."""
  _, model = models("llama_gqa")
  prompts = _prompts(3, lens=(3, 17, 6))
  batched = decoding.generate(model, prompts, max_new_tokens=6, eos_token_id=[])
  alone = [decoding.generate(model, [p], max_new_tokens=6, eos_token_id=[])[0] for p in prompts]
  assert batched == alone
  n_compiled = decoding._generate_jit._cache_size()
  four = prompts + [prompts[0][:2]]  # batch 3 and 4 share a bucket, and so do prompt lengths 17 and 20
  assert decoding.generate(model, four, max_new_tokens=6, eos_token_id=[])[:3] == batched
  assert decoding._generate_jit._cache_size() == n_compiled


def test_sampling_reproducible_and_top_k1_is_greedy(models):
  _, model = models("llama_gqa")
  prompts = _prompts(4)
  kw = dict(max_new_tokens=8, eos_token_id=[], temperature=1.3)
  a = decoding.generate(model, prompts, seed=7, **kw)
  assert a == decoding.generate(model, prompts, seed=7, **kw)
  assert a != decoding.generate(model, prompts, seed=8, **kw)
  greedy = decoding.generate(model, prompts, max_new_tokens=8, eos_token_id=[])
  assert decoding.generate(model, prompts, seed=7, top_k=1, **kw) == greedy
  assert decoding.generate(model, prompts, seed=7, top_p=1e-6, **kw) == greedy  # nucleus of one token


def _next_token_probs(model, prompt, temperature):
  logits = model(np.array([prompt]))[0, -1]
  return np.asarray(jax.nn.softmax(logits / temperature)), np.asarray(jax.nn.log_softmax(logits))


def _assert_follows(samples, probs, label):
  """Chi-square goodness of fit (bins with small expectation pooled) plus a per-token bound."""
  n = len(samples)
  counts = np.bincount(samples, minlength=len(probs))
  assert counts[probs == 0].sum() == 0, f"{label}: sampled a token of probability 0"
  expected = n * probs
  big = expected >= 5
  obs = np.append(counts[big], counts[~big].sum())
  exp = np.append(expected[big], expected[~big].sum())
  if exp[-1] < 5:  # pooled tail still too small: merge it into the smallest big bin
    j = int(np.argmin(exp[:-1]))
    obs[j] += obs[-1]
    exp[j] += exp[-1]
    obs, exp = obs[:-1], exp[:-1]
  stat = ((obs - exp) ** 2 / exp).sum()
  p_value = scipy.stats.chi2.sf(stat, len(exp) - 1)
  assert p_value > 1e-4, f"{label}: chi2={stat:.1f} dof={len(exp) - 1} p={p_value:.2g}"
  sd = np.sqrt(probs * (1 - probs) / n)
  assert (np.abs(counts / n - probs) <= 5 * sd + 1e-3).all(), label


def test_sampling_distribution(models):
  """4096 one-token samples in one batched call follow softmax(logits / T) (and its top-k cut)."""
  _, model = models("llama_gqa")
  prompt = _prompts(5, lens=(7,))[0]
  t = 1.7
  probs, logp = _next_token_probs(model, prompt, t)
  assert probs.max() < 0.5 and (probs > 0.01).sum() >= 10, "choose a flatter prompt for a meaningful test"
  n = 4096
  toks, lps = decoding.generate(model, [prompt] * n, max_new_tokens=1, temperature=t, eos_token_id=[], seed=3,
                                return_logprobs=True)
  samples = np.array([r[0] for r in toks])
  _assert_follows(samples, probs, "temperature")
  # Log-probs are of the raw (untempered) logits at the chosen token.
  np.testing.assert_allclose(np.array([r[0] for r in lps]), logp[samples], atol=1e-5)

  k = 5
  top = np.argsort(-probs)[:k]
  pk = np.zeros_like(probs)
  pk[top] = probs[top] / probs[top].sum()
  toks = decoding.generate(model, [prompt] * n, max_new_tokens=1, temperature=t, top_k=k, eos_token_id=[], seed=4)
  _assert_follows(np.array([r[0] for r in toks]), pk, "top-k")


def test_top_p_restricts_to_nucleus(models):
  _, model = models("llama_gqa")
  prompt = _prompts(5, lens=(7,))[0]
  t, n = 1.0, 2048
  probs, _ = _next_token_probs(model, prompt, t)
  order = np.argsort(-probs)
  cum = np.cumsum(probs[order])
  size = int(np.searchsorted(cum, 0.5)) + 1  # smallest prefix with mass >= 0.5
  top_p = float((cum[size - 2] + cum[size - 1]) / 2)  # strictly inside: no rounding ambiguity at the edge
  nucleus = set(order[:size].tolist())
  pn = np.zeros_like(probs)
  pn[order[:size]] = probs[order[:size]] / probs[order[:size]].sum()
  assert 3 <= size < len(probs) // 2
  assert n * pn[order[size - 1]] >= 10  # so every nucleus token shows up (miss chance < e^-10 each)
  toks = decoding.generate(model, [prompt] * n, max_new_tokens=1, temperature=t, top_p=top_p, eos_token_id=[],
                           seed=5)
  seen = {r[0] for r in toks}
  assert seen <= nucleus
  assert seen == nucleus
  _assert_follows(np.array([r[0] for r in toks]), pn, "top-p")


@dataclasses.dataclass(frozen=True)
class _ScaleDown(Hooks):
  """Scales each layer's MLP down-projection by extra["scale"][layer]."""

  def dense(self, name, x, w, extra, ctx):
    y = jnp.einsum(DENSE_EQ[name], x, w)
    return y * extra["scale"] if name == "down" else y


def test_hooks_and_extra_pass_through(models):
  _, model = models("llama_gqa")
  prompts = _prompts(6)
  scale = jnp.linspace(0.3, -1.5, model.config.num_layers)
  via_hooks = decoding.generate(model, prompts, max_new_tokens=6, eos_token_id=[], hooks=_ScaleDown(),
                                extra={"scale": scale})
  params = model.params()
  params["layers"]["down"] = params["layers"]["down"] * scale[:, None, None]
  assert via_hooks == decoding.generate(model, prompts, max_new_tokens=6, eos_token_id=[], params=params)
  assert via_hooks != decoding.generate(model, prompts, max_new_tokens=6, eos_token_id=[])


def test_generate_arrays_vmaps_over_params(models):
  """A population of parameter sets generates in one vmapped call (what SVF / CEM need)."""
  _, model = models("llama_gqa")
  cfg, base = model.config, model.params()
  pop = jax.tree.map(lambda w: jnp.stack([w, w * 1.1, w * 0.9]), base)
  prompts = _prompts(7)
  ids, mask = (x.numpy() for x in _left_pad(prompts))

  def gen(p):
    return decoding.generate_arrays(cfg, p, ids, mask > 0, jax.random.key(0), max_new_tokens=5, eos_ids=())

  toks, lps, lengths = jax.jit(jax.vmap(gen))(pop)
  for i in range(3):
    one = jax.tree.map(lambda w: w[i], pop)
    t1, l1, n1 = jax.jit(gen)(one)
    np.testing.assert_array_equal(toks[i], t1)
    np.testing.assert_allclose(lps[i], l1, atol=1e-5)
    np.testing.assert_array_equal(lengths[i], n1)
  assert not np.array_equal(toks[0], toks[1])


@pytest.mark.parametrize("kind", ["mistral_window", "qwen2_mixed_window"])
def test_unrolled_and_scanned_layer_loops_agree(models, kind):
  """Decode steps over per-layer buffers ("unroll", the CPU default) equal the layer scan,
  tokens and log-probs, with sliding windows and with a hook reading per-layer `extra`."""
  _, model = models(kind)
  prompts = _prompts(8)
  scale = jnp.linspace(0.5, -1.0, model.config.num_layers)
  for kw in ({}, dict(hooks=_ScaleDown(), extra={"scale": scale})):
    runs = [decoding.generate(model, prompts, max_new_tokens=9, eos_token_id=[], return_logprobs=True,
                              layer_loop=loop, **kw) for loop in ("scan", "unroll")]
    assert runs[0][0] == runs[1][0]
    for a, b in zip(runs[0][1], runs[1][1]):
      np.testing.assert_allclose(a, b, atol=1e-5)
  with pytest.raises(ValueError, match="layer_loop"):
    decoding.generate(model, prompts, layer_loop="loop")


def test_bad_input():
  cfg = DecoderConfig.make(vocab_size=11, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                           num_attention_heads=2)
  model = Decoder(cfg)
  with pytest.raises(ValueError, match="at least one token"):
    decoding.generate(model, [[1, 2], []])
  with pytest.raises(ValueError, match="max_new_tokens"):
    decoding.generate(model, [[1, 2]], max_new_tokens=0)
  with pytest.raises(ValueError, match="sampling"):
    decoding.generate(model, [[1, 2]], temperature=-1.0)
  assert decoding.generate(model, []) == []


def test_bucket():
  assert [decoding.bucket(n, 16) for n in (1, 2, 3, 9, 16, 17, 33)] == [1, 2, 4, 16, 16, 32, 48]
