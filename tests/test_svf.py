"""Transformer² pieces on tiny random models: SVD + cache, the SVF parametrisation, REINFORCE,
CEM, expert files, and the expert trainer (only z trains). References are independent numpy
formulas (numpy's own SVD, hand-written policy-gradient gradients) and the plain decoder."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from calm_jax import hf
from calm_jax.decoding import generate_arrays
from calm_jax.fingerprint import fingerprint
from calm_jax.models import Decoder, DecoderConfig, init_params
from calm_jax.models.decoder import forward
from calm_jax.tokenizers import CharTokenizer
from svf import decompose as dec
from svf.adapt import candidate_fitness, population_fitness, stack_experts

candidate_fitness = jax.jit(candidate_fitness, static_argnames=("cfg", "f", "eos_id", "pad_id"))
from svf.cem import cem
from svf.expert import ExpertMismatchError, load_expert, save_expert
from svf.model import SVFModel, adapted_params, compose_stack, mix
from svf.objectives import reinforce_loss, rollout_logits

pytestmark = pytest.mark.usefixtures("fast_compile")


def tiny(seed=0, layers=2, vocab=64):
  cfg = DecoderConfig.make(model_type="llama", vocab_size=vocab, hidden_size=32, intermediate_size=48,
                           num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                           bos_token_id=1, eos_token_id=2, pad_token_id=0)
  return Decoder(cfg, params=init_params(cfg, seed, std=0.1))


@pytest.fixture(scope="module")
def base():
  return tiny()


def test_svd_reconstructs_every_target_matrix(base):
  params = base.params()
  factors = dec.decompose(params, "both")
  assert sorted(factors) == sorted(f"layers/{n}" for n in dec.CANDIDATES)
  for name, f in factors.items():
    w = np.asarray(dec.as_matrix(name, params["layers"][name.split("/")[1]]))
    k = min(w.shape[1:])
    assert f.u.shape == w.shape[:2] + (k,) and f.v.shape == (w.shape[0], w.shape[2], k) and f.s.shape == (w.shape[0], k)
    np.testing.assert_allclose(np.asarray(dec.reconstruct(f)), w, atol=2e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(f.s), np.linalg.svd(w, compute_uv=False), rtol=1e-5, atol=1e-6)
    # orthonormal columns
    np.testing.assert_allclose(np.einsum("lrk,lrj->lkj", f.u, f.u), np.broadcast_to(np.eye(k), (w.shape[0], k, k)),
                               atol=1e-5)


@pytest.mark.parametrize("refine", [0, 12, 256])
def test_gram_svd_stack_against_float64(refine):
  """svd_stack("gram") on matrices with known spectra: σ from 1 down to 0.01, then 8 tiny ones
  (3e-4, 1e-4) that the Gram's eigenvalues (error ~ε·σ_max² ≈ 1e-7) cannot tell apart. With the
  smallest directions re-solved exactly (`refine` ≥ 8) σ is within ~ε·σ_max of the true values;
  without (refine=0) the tiny σ are far off. Always: W rebuilt, V orthonormal, σ descending; U
  orthonormal on the re-solved block."""
  rng = np.random.default_rng(0)
  for rows, k in [(96, 96), (160, 64)]:
    true = np.concatenate([np.linspace(1.0, 0.01, k - 8), [3e-4] * 4, [1e-4] * 4])
    true = true * (1 + 1e-3 * rng.standard_normal(k))
    w = []
    for _ in range(3):
      q1, _ = np.linalg.qr(rng.standard_normal((rows, k)))
      q2, _ = np.linalg.qr(rng.standard_normal((k, k)))
      w.append(q1 @ np.diag(true) @ q2.T)
    w = np.asarray(w, np.float32)
    u, s, v = map(np.asarray, dec.svd_stack(jnp.asarray(w), algorithm="gram", refine=refine))
    s64 = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    err = np.abs(s - s64).max()
    assert np.all(np.diff(s, axis=-1) <= 0)
    np.testing.assert_allclose(np.einsum("nrk,nk,nck->nrc", u, s, v), w, atol=2e-6)
    np.testing.assert_allclose(np.einsum("nck,ncj->nkj", v, v), np.broadcast_to(np.eye(k), (3, k, k)), atol=1e-5)
    if refine:
      assert err < 2e-6, (rows, k, err)
      r = min(refine, k)
      uu = np.einsum("nrk,nrj->nkj", u[:, :, -r:], u[:, :, -r:])
      np.testing.assert_allclose(uu, np.broadcast_to(np.eye(r), uu.shape), atol=1e-5)
    else:
      assert err > 2e-5, (rows, k, err)


def test_gram_svd_reconstructs_and_matches_numpy(base):
  """The "gram" algorithm (eigh of WᵀW, the smallest directions re-solved): W rebuilt to fp32
  tolerance, σ against numpy's SVD to ~ε·σ_max (≤ 2e-6·σ_max), orthonormal V, orthonormal U
  columns wherever σ_i is not tiny, and the same SVF weights as the LAPACK factors."""
  params = base.params()
  gram, ref = dec.decompose(params, "both", algorithm="gram"), dec.decompose(params, "both")
  for name, f in gram.items():
    w = np.asarray(dec.as_matrix(name, params["layers"][name.split("/")[1]]))
    k = f.s.shape[-1]
    np.testing.assert_allclose(np.asarray(dec.reconstruct(f)), w, atol=2e-6, rtol=0, err_msg=name)
    s_np = np.linalg.svd(w, compute_uv=False)
    assert np.all(np.abs(np.asarray(f.s) - s_np) <= 2e-6 * s_np.max(axis=-1, keepdims=True)), name
    np.testing.assert_allclose(np.einsum("lck,lcj->lkj", f.v, f.v), np.broadcast_to(np.eye(k), (w.shape[0], k, k)),
                               atol=1e-5, err_msg=name)
    big = np.asarray(f.s) >= 0.1 * np.asarray(f.s)[:, :1]
    uu = np.einsum("lrk,lrj->lkj", f.u, f.u)
    for l in range(w.shape[0]):
      b = big[l]
      np.testing.assert_allclose(uu[l][np.ix_(b, b)], np.eye(b.sum()), atol=1e-4, err_msg=name)
    # an SVF update U diag(σ⊙m) Vᵀ agrees between the two factorisations
    m = np.linspace(0.2, 1.5, k, dtype=np.float32)
    upd = lambda g: np.einsum("lrk,lk,lck->lrc", g.u, np.asarray(g.s) * m, g.v)
    np.testing.assert_allclose(upd(f), upd(ref[name]), atol=5e-6, err_msg=name)
  with pytest.raises(ValueError, match="algorithm"):
    dec.decompose(params, "mlp", algorithm="qr")


def test_svd_on_a_mesh_equals_one_device(base):
  params = base.params()
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:2]), ("data",))  # 3·L = 6 MLP matrices split over 2
  one, sharded = dec.decompose(params, "mlp"), dec.decompose(params, "mlp", mesh=mesh)
  for n in one:
    np.testing.assert_allclose(np.asarray(dec.reconstruct(sharded[n])), np.asarray(dec.reconstruct(one[n])), atol=2e-6)


def test_target_presets_and_bad_regex(base):
  names = [f"layers/{k}" for k in base.params()["layers"]]
  assert dec.select_targets(names, "mlp") == ["layers/gate", "layers/up", "layers/down"]
  assert dec.select_targets(names, "attention") == ["layers/q", "layers/k", "layers/v", "layers/o"]
  assert dec.select_targets(names, r"layers/(q|v)") == ["layers/q", "layers/v"]
  with pytest.raises(ValueError, match=r"layers/mlp_proj.*matches no target matrix"):
    dec.select_targets(names, "layers/mlp_proj")
  with pytest.raises(ValueError, match="not a valid regex"):
    dec.select_targets(names, "layers/(")


def test_svd_cache_is_computed_once_and_keyed(base, tmp_path, monkeypatch):
  params = base.params()
  first = dec.cached_decompose(params, "mlp", tmp_path)
  files = list(tmp_path.glob("svd-*.safetensors"))
  assert len(files) == 1 and fingerprint(params) in files[0].name
  monkeypatch.setattr(dec, "decompose", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
  again = dec.cached_decompose(params, "mlp", tmp_path)
  for n in first:
    for a, b in zip(first[n], again[n]):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  other = tiny(seed=1).params()  # another base: another key, so it is decomposed, not served from the cache
  with pytest.raises(AssertionError, match="recomputed"):
    dec.cached_decompose(other, "mlp", tmp_path)
  assert not list(tmp_path.glob(".*tmp*"))  # nothing half-written left behind


@pytest.mark.parametrize("f", ["sigmoid", "identity"])
def test_constant_mask_gives_the_base_model(base, f):
  factors = dec.decompose(base.params(), "both")
  zs = {n: jnp.full(fac.s.shape, 0.7) for n, fac in factors.items()}  # m constant (0.7 or sigmoid(0.7))
  tokens = jnp.asarray(np.random.default_rng(0).integers(3, 64, (2, 9)), jnp.int32)
  fwd = jax.jit(forward, static_argnums=0)
  want = fwd(base.config, base.params(), tokens)[0]
  got = fwd(base.config, adapted_params(base.params(), factors, zs, f), tokens)[0]
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
  model = SVFModel(base, factors, f=f, init=0.7, noise=0.0)
  np.testing.assert_allclose(np.asarray(model(tokens)), np.asarray(want), atol=1e-5)


def test_compose_matches_numpy_formula(base):
  w = np.asarray(base.params()["layers"]["gate"])  # [L, E, F]
  fac = dec.decompose(base.params(), "layers/gate")["layers/gate"]
  z = np.random.default_rng(1).normal(0, 1, fac.s.shape).astype(np.float32)
  got = np.asarray(compose_stack(fac, jnp.asarray(z), "sigmoid"))
  for l in range(w.shape[0]):
    u, s, vt = np.linalg.svd(w[l].astype(np.float64), full_matrices=False)
    m = 1 / (1 + np.exp(-z[l].astype(np.float64)))
    ref = u @ np.diag(s * m) @ vt * (s.sum() / (s * m).sum())
    np.testing.assert_allclose(got[l], ref, atol=2e-6)


def test_mix_convention_is_on_raw_z():
  stacked = {"layers/up": jnp.asarray(np.random.default_rng(0).normal(size=(3, 2, 4)), jnp.float32)}
  a = np.array([0.2, 0.5, 0.3], np.float32)
  np.testing.assert_allclose(np.asarray(mix(stacked, a)["layers/up"]),
                             np.einsum("k,klr->lr", a, np.asarray(stacked["layers/up"])), rtol=1e-6)
  al = np.random.default_rng(1).random((3, 2)).astype(np.float32)  # per layer
  want = np.stack([np.einsum("k,kr->r", al[:, l], np.asarray(stacked["layers/up"])[:, l]) for l in range(2)])
  np.testing.assert_allclose(np.asarray(mix(stacked, al)["layers/up"]), want, rtol=1e-6)


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("kl_coef,baseline", [(0.0, False), (0.3, False), (0.1, True)])
def test_reinforce_loss_and_gradient_match_numpy(kl_coef, baseline):
  rng = np.random.default_rng(0)
  b, n, v = 3, 4, 5
  logits = rng.normal(size=(b, n, v)).astype(np.float32)
  ref = rng.normal(size=(b, n, v)).astype(np.float32)
  tokens = rng.integers(0, v, (b, n)).astype(np.int32)
  mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]], np.float32)
  r = np.array([1.0, -1.0, 1.0], np.float32)
  # numpy: loss = mean_b(-A_b Σ_t logp + λ Σ_t KL(ref‖θ)); d/dlogits = (-A_b (onehot - p) + λ (p - p_ref)) mask / B
  lp, lref = _np_log_softmax(logits.astype(np.float64)), _np_log_softmax(ref.astype(np.float64))
  tok_lp = np.take_along_axis(lp, tokens[..., None], -1)[..., 0]
  adv = r - r.mean() if baseline else r
  kl = (np.exp(lref) * (lref - lp)).sum(-1)
  want = np.mean(-adv * (tok_lp * mask).sum(-1) + kl_coef * (kl * mask).sum(-1))
  onehot = np.eye(v)[tokens]
  p, pref = np.exp(lp), np.exp(lref)
  want_grad = (-adv[:, None, None] * (onehot - p) + kl_coef * (p - pref)) * mask[..., None] / b

  def loss(x):
    return reinforce_loss(x, jnp.asarray(ref), jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(r),
                          kl_coef=kl_coef, baseline=baseline)[0]

  val, grad = jax.value_and_grad(loss)(jnp.asarray(logits))
  np.testing.assert_allclose(float(val), want, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grad), want_grad, atol=1e-6)


def test_rollout_logprobs_equal_the_decoders(base):
  """The teacher-forced recomputation (with gradient) gives the log-probs the sampler recorded."""
  params = base.params()
  prompt = jnp.asarray([[0, 0, 1, 5, 6], [1, 7, 8, 9, 10]], jnp.int32)
  valid = prompt != 0
  valid = valid.at[1, 0].set(True)
  gen_fn = jax.jit(generate_arrays, static_argnames=("cfg", "max_new_tokens", "eos_ids", "pad_id"))
  gen, lps, lengths = gen_fn(base.config, params, prompt, valid, jax.random.key(3), max_new_tokens=6,
                             temperature=1.0, eos_ids=(2,), pad_id=0)
  mask = jnp.arange(6)[None] < lengths[:, None]
  logits = jax.jit(rollout_logits, static_argnums=0)(base.config, params, prompt, valid, gen, mask)
  lp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), gen[..., None], -1)[..., 0]
  np.testing.assert_allclose(np.asarray(lp * mask), np.asarray(lps * mask), atol=2e-5)


def test_cem_finds_a_known_optimum():
  """Three experts (the suite's K), the paper's settings, a quadratic with its optimum inside [0, 1]^3."""
  target = np.array([0.2, 0.9, 0.5], np.float32)
  for seed in range(3):
    calls = []

    def fitness(pop):
      calls.append(pop.shape)
      d = -np.sum((pop - target) ** 2, axis=1)
      return d, np.zeros_like(d)

    res = cem(fitness, 3, iters=50, seed=seed, init_mean=1 / 3)
    np.testing.assert_allclose(res.best, target, atol=0.01)
    assert all(s == (32, 3) for s in calls)  # one call per iteration for the whole population
    assert [h["primary"] for h in res.history] == sorted(h["primary"] for h in res.history)  # elitism: never worse


def test_cem_tie_break_and_bad_input():
  # accuracy ties everywhere: the tie-break (here -|x - 0.7|) decides
  res = cem(lambda p: (np.ones(len(p)), -np.abs(p[:, 0] - 0.7)), 1, iters=30, seed=1)
  assert abs(res.best[0] - 0.7) < 0.02
  with pytest.raises(ValueError, match="K=0"):
    cem(lambda p: (p[:, 0], p[:, 0]), 0, iters=1)
  with pytest.raises(ValueError, match="at least one SVF expert"):
    stack_experts({})


def test_vmapped_population_equals_a_python_loop(base):
  factors = dec.decompose(base.params(), "mlp")
  rng = np.random.default_rng(0)
  experts = {f"e{k}": {n: rng.normal(0, 2.0, f.s.shape).astype(np.float32) for n, f in factors.items()}
             for k in range(3)}
  stacked = stack_experts(experts)
  prompts = jnp.asarray(rng.integers(3, 64, (4, 6)), jnp.int32)
  valid = jnp.ones((4, 6), bool)
  answers = jnp.asarray(rng.integers(3, 64, (4, 3)), jnp.int32).at[:, -1].set(2)
  amask = jnp.ones((4, 3), bool).at[0, 2].set(False)
  for shape in [(4, 3), (4, 3, base.config.num_layers)]:
    pop = jnp.asarray(rng.random(shape), jnp.float32)
    acc, ll = population_fitness(base.config, base.params(), factors, "sigmoid", stacked, pop, prompts, valid,
                                 answers, amask, eos_id=2, pad_id=0)
    for i in range(shape[0]):
      a, l = candidate_fitness(base.config, base.params(), factors, "sigmoid", stacked, pop[i], prompts, valid,
                               answers, amask, eos_id=2, pad_id=0)
      assert float(acc[i]) == float(a)
      np.testing.assert_allclose(float(ll[i]), float(l), rtol=1e-5)
    assert len(set(np.round(np.asarray(ll), 5))) > 1  # candidates really differ


def test_candidate_fitness_scores_a_known_answer(base):
  """Fitness accuracy counts exactly the rows whose greedy continuation is the whole answer."""
  factors = dec.decompose(base.params(), "mlp")
  # three experts with constant z: any mix gives constant m, i.e. the base model
  stacked = stack_experts({f"e{k}": {n: np.full(f.s.shape, 0.1 * (k + 1), np.float32) for n, f in factors.items()}
                           for k in range(3)})
  rng = np.random.default_rng(0)
  prompts = jnp.asarray(rng.integers(3, 64, (4, 6)), jnp.int32)
  valid = jnp.ones((4, 6), bool)
  gen_fn = jax.jit(generate_arrays, static_argnames=("cfg", "max_new_tokens", "eos_ids", "pad_id"))
  gen, _, _ = gen_fn(base.config, base.params(), prompts, valid, jax.random.key(0), max_new_tokens=3,
                     eos_ids=(), pad_id=0)  # the base's own greedy tokens
  answers = np.array(gen)
  eos = min(set(range(1, 64)) - set(answers.reshape(-1).tolist()))  # an eos the base does not emit here
  amask = np.ones((4, 3), bool)
  answers[1, 0] = (answers[1, 0] + 1) % 64  # row 1: wrong first token
  answers[2, 2], amask[2, 2] = 0, False     # row 2: answer is 2 tokens, the model goes on -> wrong
  acc, _ = candidate_fitness(base.config, base.params(), factors, "sigmoid", stacked, jnp.asarray([0.2, 0.5, 0.3]),
                             prompts, valid, jnp.asarray(answers, jnp.int32), jnp.asarray(amask), eos_id=eos, pad_id=0)
  assert float(acc) == 0.5  # rows 0 and 3


def test_parse_label_longest_prefix_else_other():
  from svf.dispatch import OTHER, format_prompt, parse_label
  labels = ["kv", "kva", "add"]
  assert parse_label(" kva+x", labels) == "kva" and parse_label("kv:", labels) == "kv"
  assert parse_label("addx", labels) == "add" and parse_label("xadd", labels) == OTHER
  assert format_prompt("copy:{head}=", "add:12+3=", 3) == "copy:add="
  assert format_prompt("cls:{prompt}=", "add:1+2=") == "cls:add:1+2=="


def test_expert_files_roundtrip_and_refuse_another_base(base, tmp_path):
  factors = dec.decompose(base.params(), "mlp")
  shapes = {n: tuple(f.s.shape) for n, f in factors.items()}
  zs = {n: np.random.default_rng(0).normal(size=s).astype(np.float32) for n, s in shapes.items()}
  fp = fingerprint(base.params())
  path = save_expert(tmp_path / "e.safetensors", zs, base_fingerprint=fp, targets="layers/(gate|up|down)",
                     f="sigmoid", task="addition")
  assert path.stat().st_size < 4096
  got = load_expert(path, base_fingerprint=fp, shapes=shapes, f="sigmoid")
  for n in zs:
    np.testing.assert_array_equal(got[n], zs[n])
  other = fingerprint(tiny(seed=5).params())
  with pytest.raises(ExpertMismatchError, match="trained on base .*allow_transfer"):
    load_expert(path, base_fingerprint=other, shapes=shapes, f="sigmoid")
  assert load_expert(path, base_fingerprint=other, shapes=shapes, f="sigmoid", allow_transfer=True)  # same shapes
  bigger = {n: (s[0] + 1, s[1]) for n, s in shapes.items()}  # a deeper model: no transfer
  with pytest.raises(ExpertMismatchError, match="z shapes do not fit"):
    load_expert(path, base_fingerprint=other, shapes=bigger, f="sigmoid", allow_transfer=True)
  with pytest.raises(ExpertMismatchError, match="f='sigmoid'"):
    load_expert(path, base_fingerprint=fp, shapes=shapes, f="identity")
  with pytest.raises(ExpertMismatchError, match="adapts"):
    load_expert(path, base_fingerprint=fp, shapes={"layers/q": (2, 32)}, f="sigmoid")
  (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
  with pytest.raises(ExpertMismatchError, match="junk.safetensors"):
    load_expert(tmp_path / "junk.safetensors", base_fingerprint=fp, shapes=shapes, f="sigmoid")


@pytest.fixture(scope="module")
def char_base_dir(tmp_path_factory):
  """A random decoder over the char tokenizer saved as an HF dir (BASE/hf), for trainer runs."""
  tok = CharTokenizer()
  cfg = DecoderConfig.make(model_type="llama", vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=48,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=64, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                           pad_token_id=tok.pad_id)
  root = tmp_path_factory.mktemp("char_base")
  hf.save(Decoder(cfg, params=init_params(cfg, 0, std=0.1)), root / "hf")
  tok.save(root / "hf")
  return root


@pytest.mark.slow  # tens of seconds: kept out of `make test-fast`
@pytest.mark.parametrize("objective", ["reinforce", "ntp"])
def test_expert_training_updates_only_z(char_base_dir, tmp_path, objective):
  import orbax.checkpoint as ocp
  from configs.svf.expert import get_config
  from svf.train import run
  before = hf.load(char_base_dir / "hf").params()
  c = get_config(f"task=addition,tiny,objective={objective}")
  c.base_workdir = str(char_base_dir)
  c.quiet = True
  # the default mesh on the test session's 8 fake devices: batch 8 split 8 ways
  c.optimizer.clip_norm = 0.0 if objective == "ntp" else 1e-3
  c.optimizer.lr = 0.05  # big enough that z visibly moves in 4 steps
  res = run(c, tmp_path)
  assert res["params"] == 2 * 3 * 32  # L × 3 MLP matrices × min(E, F)
  # the base on disk and the base inside the trained model: bit-identical
  after = hf.load(char_base_dir / "hf").params()
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), before, after)
  mgr = ocp.CheckpointManager(tmp_path / "checkpoints")
  state = mgr.restore(mgr.latest_step())
  z_leaves = jax.tree.leaves(state["trainable"])
  assert sorted(z.shape for z in z_leaves) == [(2, 32)] * 3
  opt = [x for x in jax.tree.leaves(state["opt_state"]) if np.size(x) > 1]
  assert opt and all(x.shape == (2, 32) for x in opt)  # Adam moments of z only: nothing base-sized
  assert sum(np.size(x) for x in jax.tree.leaves(state["opt_state"])) <= 2 * 3 * 2 * 32 + 4
  z0 = 0.1
  assert any(np.abs(np.asarray(z) - z0).max() > 0.05 for z in z_leaves)  # z trained (noise is 0.01)
  meta = json.loads((tmp_path / "results.json").read_text())
  assert meta["steps"] == 4 and 0 <= meta["test_accuracy"] <= 1
  # the expert file belongs to this base and loads back into a fresh SVF model
  from svf.train import attach_expert, load_svf_model
  model = load_svf_model(c, char_base_dir / "hf")
  zs = attach_expert(model, tmp_path / "expert.safetensors")
  assert set(zs) == {"layers/gate", "layers/up", "layers/down"}
