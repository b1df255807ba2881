"""Merging: every method on pytrees against an independent numpy implementation, MetaGPT's closed
form on checkpoints, the streaming merge's bad-input handling and atomicity (SIGKILL).

The numpy references below are written from the papers / the mergekit source, not from
`merging/`: TIES follows the original code (global flatten, k = d − int(d·K), kthvalue, keep
≥, sign of the sum, disjoint mean), DARE uses the masks `merging.kernels.dare_mask` reports.
Leaf sizes match `merge_zoo` (2048, 1024, 32 elements) so kernels compile once per size for
the whole session.
"""
import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import merge_zoo
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

import merging
from calm_jax.atomic import OutputError, OutputExistsError
from calm_jax.models import nest
from merging import MergeError, kernels

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("fast_compile")
SHAPES = {"embed": (64, 32), "layers/q": (32, 32), "layers/up": (32, 64), "norm": (32,)}
T = 3


def flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flat(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = np.asarray(v)
  return out


@pytest.fixture(scope="module")
def trees():
  rng = np.random.default_rng(0)
  base = {k: rng.normal(0, 0.1, s).astype(np.float32) for k, s in SHAPES.items()}
  fts = []
  for i in range(T):
    keep = rng.random(1) * 0.5 + 0.4
    fts.append({k: (v + np.where(rng.random(v.shape) < keep, rng.normal(0, 0.01 * 3 ** i, v.shape), 0)
            ).astype(np.float32) for k, v in base.items()})
  return base, fts


def run(trees, method, **kw):
  base, fts = trees
  merged, report = merging.merge(nest(base), [nest(f) for f in fts], method, **kw)
  return flat(merged), report


# ---- independent numpy references (float64 arithmetic on fp32 task vectors) -----------------

def tvs(base, fts):
  return [{k: (f[k].astype(np.float32) - base[k].astype(np.float32)).astype(np.float64) for k in base}
          for f in fts]


def concat(tv, names):
  return np.concatenate([tv[k].ravel() for k in names])


def split(vec, base):
  out, off = {}, 0
  for k, v in base.items():
    out[k] = vec[off: off + v.size].reshape(v.shape)
    off += v.size
  return out


def np_ties_trim_global(flat_tvs, K):
  """Original TIES code: keep |x| >= the k-th smallest magnitude, k = d - int(d*K), per model row."""
  d = flat_tvs.shape[1]
  k = d - int(d * K)
  kth = np.sort(np.abs(flat_tvs).astype(np.float32), axis=1)[:, k - 1]
  return np.where(np.abs(flat_tvs).astype(np.float32) >= kth[:, None], flat_tvs, 0.0)


def np_elect(trimmed):
  sign = np.sign(trimmed.sum(0))
  sign[sign == 0] = 1
  return np.where(sign > 0, trimmed > 0, trimmed < 0)


def np_ties_paper(base, fts, K, lam, weights=None):
  names = list(base)
  rows = np.stack([concat(tv, names) for tv in tvs(base, fts)])
  trimmed = np_ties_trim_global(rows, K)
  agree = np_elect(trimmed)
  if weights is None:  # disjoint mean
    merged = (trimmed * agree).sum(0) / np.maximum(agree.sum(0), 1)
  else:  # MetaGPT + TIES: Σ λ_t τ̂_t agree_t
    merged = (np.asarray(weights)[:, None] * trimmed * agree).sum(0)
  return {k: base[k] + lam * v for k, v in split(merged, base).items()}


def np_lambdas(tv_list, names):
  sq = np.array([sum(float(np.sum(tv[k] ** 2)) for k in names) for tv in tv_list])
  return sq / sq.sum()


def np_dare(base, fts, p, seed, lam=1.0, weights=None, ties=False):
  """DARE (paper): τ̂ = m ⊙ τ / (1 − p) with the given masks; then TA, or TIES' election + disjoint mean."""
  hats = []
  for i, tv in enumerate(tvs(base, fts)):
    hats.append({k: kernels.dare_mask(seed, k, i, v.shape, 1 - p) * v / (1 - p) for k, v in tv.items()})
  w = np.ones(len(fts)) if weights is None else np.asarray(weights)
  out = {}
  for k in base:
    stack = np.stack([h[k] for h in hats])
    if ties:
      agree = np_elect(stack)
      mixed = (stack * agree).sum(0) / np.maximum(agree.sum(0), 1)
    else:
      mixed = (w.reshape(-1, *[1] * stack[0].ndim) * stack).sum(0)
    out[k] = base[k] + lam * mixed
  return out


def np_ties_mergekit(base, fts, density, weights, lam):
  """mergekit `ties`: per-tensor top-k (k = max(1, int(density·n))), weighted vote, ÷ Σ w·agree."""
  out = {}
  w = np.asarray(weights, np.float64)
  for k in base:
    us = []
    for wi, tv in zip(w, tvs(base, fts)):
      x = tv[k].ravel()
      keep = np.zeros(x.size, bool)
      keep[np.argsort(-np.abs(x), kind="stable")[: max(1, int(density * x.size))]] = True
      us.append(wi * np.where(keep, x, 0))
    u = np.stack(us)
    majority = np.where(u.sum(0) >= 0, 1, -1)
    mask = np.sign(u) == majority
    div = (w[:, None] * mask).sum(0)
    div[div == 0] = 1
    out[k] = base[k] + lam * ((u * mask).sum(0) / div).reshape(base[k].shape)
  return out


def assert_close(ours, ref, atol=2e-6):
  for k in ref:
    np.testing.assert_allclose(ours[k], ref[k], atol=atol, rtol=0, err_msg=k)


# ---- pytree API ----------------------------------------------------------------------------

def test_average_and_task_arithmetic(trees):
  base, fts = trees
  ours, report = run(trees, "average")
  assert_close(ours, {k: np.mean([f[k] for f in fts], axis=0) for k in base})
  w, lam = [0.5, -0.2, 1.5], 0.7
  ours, report = run(trees, "task_arithmetic", weights=w, lam=lam)
  ref = {k: base[k] + lam * sum(wi * tv[k] for wi, tv in zip(w, tvs(base, fts))) for k in base}
  assert_close(ours, ref)
  sq = [sum(float(np.sum(tv[k] ** 2)) for k in base) for tv in tvs(base, fts)]
  np.testing.assert_allclose(report["sq_norms"], sq, rtol=1e-5)
  assert report["tensors"]["layers/q"]["merged"] and len(report["tensors"]["layers/q"]["kept"]) == T


def test_metagpt_closed_form(trees):
  base, fts = trees
  ours, report = run(trees, "metagpt")
  lam = np_lambdas(tvs(base, fts), list(base))
  np.testing.assert_allclose(report["lambdas"], lam, rtol=1e-6)
  assert abs(sum(report["lambdas"]) - 1) < 1e-12
  assert_close(ours, {k: base[k] + sum(l * tv[k] for l, tv in zip(lam, tvs(base, fts))) for k in base})
  # MetaGPT is the λ-weighted average of the fine-tuned models
  assert_close(ours, {k: sum(l * f[k] for l, f in zip(lam, fts)) for k in base})


def test_metagpt_special_cases(trees):
  base, fts = trees
  # one model: λ = 1, the merge is that model
  merged, report = merging.merge(nest(base), [nest(fts[1])], "metagpt")
  assert report["lambdas"] == [1.0]
  assert_close(flat(merged), fts[1])
  # equal norms (permuted task vectors): λ = 1/3 each, the merge is the plain average
  tv = tvs(base, fts)[2]
  perm = np.random.default_rng(1).permutation
  equal = [{k: (base[k] + (v.ravel()[perm(v.size)].reshape(v.shape) if i else v)).astype(np.float32)
            for k, v in tv.items()} for i in range(T)]
  merged, report = merging.merge(nest(base), [nest(e) for e in equal], "metagpt")
  np.testing.assert_allclose(report["lambdas"], [1 / 3] * 3, rtol=1e-6)
  assert_close(flat(merged), {k: np.mean([e[k] for e in equal], axis=0) for k in base})


def test_metagpt_include_exclude(trees):
  base, fts = trees
  ours, report = run(trees, "metagpt", exclude="norm", include=["layers/", "embed"])
  names = ["embed", "layers/q", "layers/up"]
  lam = np_lambdas(tvs(base, fts), names)  # λ over the merged parameters only
  np.testing.assert_allclose(report["lambdas"], lam, rtol=1e-6)
  np.testing.assert_array_equal(ours["norm"], base["norm"])
  assert report["tensors"]["norm"] == {"merged": False, "reason": "not selected by include/exclude"}
  assert_close(ours, {k: base[k] + sum(l * tv[k] for l, tv in zip(lam, tvs(base, fts))) for k in names})


def test_ties_paper_global_trim(trees):
  base, fts = trees
  ours, report = run(trees, "ties", density=0.3, lam=0.9)
  assert_close(ours, np_ties_paper(base, fts, 0.3, 0.9))
  th = report["ties_threshold"]
  d = sum(v.size for v in base.values())
  assert th["exact"] and th["entries_per_model"] == d and th["ranks"] == [d - int(d * 0.3)] * T
  rows = np.stack([concat(tv, list(base)) for tv in tvs(base, fts)]).astype(np.float32)
  np.testing.assert_array_equal(th["thresholds"], np.sort(np.abs(rows), axis=1)[:, d - int(d * 0.3) - 1])


def test_ties_mergekit_convention(trees):
  base, fts = trees
  w = [1.0, 0.5, 0.8]
  ours, _ = run(trees, "ties", convention="mergekit", density=0.4, weights=w, lam=1.2)
  assert_close(ours, np_ties_mergekit(base, fts, 0.4, w, 1.2))


def test_metagpt_with_ties(trees):
  base, fts = trees
  ours, report = run(trees, "metagpt", sparsify="ties", density=0.5)
  lam = np_lambdas(tvs(base, fts), list(base))  # from the original task vectors
  np.testing.assert_allclose(report["lambdas"], lam, rtol=1e-6)
  assert_close(ours, np_ties_paper(base, fts, 0.5, 1.0, weights=lam))


def test_dare_variants(trees):
  base, fts = trees
  ours, report = run(trees, "dare", drop_rate=0.3, seed=7, lam=0.8, weights=[1, 2, 0.5])
  assert_close(ours, np_dare(base, fts, 0.3, 7, lam=0.8, weights=[1, 2, 0.5]))
  nonzero = [np.mean(concat(tv, list(base)) != 0) for tv in tvs(base, fts)]
  np.testing.assert_allclose(report["kept_fraction"], 0.7 * np.array(nonzero), atol=0.03)
  ours, _ = run(trees, "dare_ties", drop_rate=0.3, seed=7)
  assert_close(ours, np_dare(base, fts, 0.3, 7, ties=True))
  ours, report = run(trees, "metagpt", sparsify="dare", drop_rate=0.3, seed=7)
  assert_close(ours, np_dare(base, fts, 0.3, 7, weights=report["lambdas"]))


def test_dare_masks_and_l1_rescale(trees):
  base, fts = trees
  m = kernels.dare_mask(3, "embed", 0, (64, 32), 0.6)
  assert m.shape == (64, 32) and abs(m.mean() - 0.6) < 0.04
  np.testing.assert_array_equal(m, kernels.dare_mask(3, "embed", 0, (64, 32), 0.6))
  assert (m != kernels.dare_mask(4, "embed", 0, (64, 32), 0.6)).any()
  assert (m != kernels.dare_mask(3, "embed", 1, (64, 32), 0.6)).any()
  # mergekit rescale: each kept tensor has the L1 norm of the original task vector
  ours, report = run(trees, "dare", convention="mergekit", drop_rate=0.5, seed=1)
  ref = {}
  for k in base:
    mixed = 0
    for i, tv in enumerate(tvs(base, fts)):
      kept = kernels.dare_mask(1, k, i, tv[k].shape, 0.5) * tv[k]
      mixed = mixed + kept * np.abs(tv[k]).sum() / np.abs(kept).sum()
    ref[k] = base[k] + mixed
  assert_close(ours, ref)


def test_bf16_storage_cast_once(trees):
  base, fts = trees
  b16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in base.items()}
  f16 = [{k: v.astype(ml_dtypes.bfloat16) for k, v in f.items()} for f in fts]
  merged, _ = merging.merge(nest(b16), [nest(f) for f in f16], "task_arithmetic", lam=0.5)
  merged = flat(merged)
  for k in base:
    assert merged[k].dtype == ml_dtypes.bfloat16
    ref = (b16[k].astype(np.float32) + 0.5 * sum(f[k].astype(np.float32) - b16[k].astype(np.float32)
                                                 for f in f16)).astype(ml_dtypes.bfloat16)
    diff = np.abs(merged[k].astype(np.float32) - ref.astype(np.float32))
    assert (diff <= np.abs(ref.astype(np.float32)) * 2 ** -7).all(), k  # at most one bf16 rounding step


def test_one_compile_per_size(trees):
  run(trees, "task_arithmetic", lam=0.3)
  before = kernels.merge_tensor._cache_size()
  run(trees, "task_arithmetic", lam=0.9, weights=[1, 2, 3])  # new values, same spec and sizes
  assert kernels.merge_tensor._cache_size() == before


def test_vocab_policy_pytree(trees):
  base, fts = trees
  big = [dict(f) for f in fts]
  big[1]["embed"] = np.concatenate([fts[1]["embed"], np.ones((3, 32), np.float32)])
  merged, report = merging.merge(nest(base), [nest(f) for f in big], "task_arithmetic")
  ref, _ = run(trees, "task_arithmetic")
  assert_close(flat(merged), ref)
  assert report["vocab"]["embed"]["policy"] == "truncate"
  merged, report = merging.merge(nest(base), [nest(f) for f in big], "task_arithmetic", vocab_policy="exclude")
  np.testing.assert_array_equal(flat(merged)["embed"], base["embed"])
  assert not report["tensors"]["embed"]["merged"] and "vocab" in report["tensors"]["embed"]["reason"]
  small = dict(fts[0], embed=fts[0]["embed"][:60])
  with pytest.raises(MergeError, match=r"leaf embed of finetuned\[0\] has shape \(60, 32\).*cannot be truncated"):
    merging.merge(nest(base), [nest(small)], "task_arithmetic")


def test_bad_options(trees):
  base, fts = trees
  with pytest.raises(MergeError, match="unknown merge option.*densty"):
    merging.merge(nest(base), [nest(f) for f in fts], "ties", densty=0.3)
  with pytest.raises(MergeError, match="do not pass weights"):
    merging.merge(nest(base), [nest(f) for f in fts], "metagpt", weights=[1, 1, 1])
  with pytest.raises(MergeError, match="density"):
    merging.merge(nest(base), [nest(f) for f in fts], "ties", density=0)
  with pytest.raises(MergeError, match="method"):
    merging.merge(nest(base), [nest(f) for f in fts], "slerp")
  bad = dict(fts[0])
  bad["layers/q"] = np.zeros((32, 31), np.float32)
  with pytest.raises(MergeError, match=r"shape mismatch: leaf layers/q of finetuned\[0\]"):
    merging.merge(nest(base), [nest(bad)], "average")
  missing = {k: v for k, v in fts[0].items() if k != "norm"}
  with pytest.raises(MergeError, match=r"missing tensor norm in finetuned\[0\]"):
    merging.merge(nest(base), [nest(missing)], "average")


# ---- streaming checkpoints ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
  return merge_zoo.make_zoo(tmp_path_factory.mktemp("zoo"))


def no_output(out: Path):
  """Neither the output nor a temporary sibling of it exists."""
  return not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_stream_metagpt_closed_form(zoo, tmp_path):
  base, fts = zoo
  out = merging.merge_checkpoints(base, fts, tmp_path / "out", "metagpt", max_shard_size="4KB", progress=False)
  ref_base = safetensors.numpy.load_file(base / "model.safetensors")
  ref_fts = [merge_zoo.read(f) for f in fts]
  sq = np.array([sum(float(np.sum((f[k].astype(np.float64) - ref_base[k]) ** 2)) for k in ref_base)
                 for f in ref_fts])
  report = json.loads((out / "merge_report.json").read_text())
  np.testing.assert_allclose(report["lambdas"], sq / sq.sum(), rtol=1e-6)
  assert report["models"] == [str(f) for f in fts]
  merged = merge_zoo.read(out)
  assert set(merged) == set(ref_base) and (out / "model.safetensors.index.json").exists()
  lam = np.asarray(report["lambdas"])
  for k, b in ref_base.items():
    np.testing.assert_allclose(merged[k], b + sum(l * (f[k] - b) for l, f in zip(lam, ref_fts)), atol=1e-6)
  assert (out / "generation_config.json").exists() and json.loads((out / "config.json").read_text()) == \
    json.loads((base / "config.json").read_text())


def test_stream_config_entry_point(zoo, tmp_path):
  from configs.merge import ties
  from merging.cli import run_config
  base, fts = zoo
  c = ties.get_config("mergekit")
  c.base, c.models, c.out, c.density, c.progress = str(base), ",".join(map(str, fts)), str(tmp_path / "o"), 0.5, False
  run_config(c)
  report = json.loads((tmp_path / "o" / "merge_report.json").read_text())
  assert report["options"]["trim"] == "tensor" and report["options"]["normalize"] == "weight"
  assert report["chunk"] == 1 << 22  # unset: merging.stream.CHUNK
  with pytest.raises(OutputExistsError):
    run_config(c)
  c.overwrite = True
  c.method, c.chunk = "average", 0
  run_config(c)
  report = json.loads((tmp_path / "o" / "merge_report.json").read_text())
  assert report["method"] == "average" and report["chunk"] is None  # 0: whole tensors


def bad_model(zoo, tmp_path, edit, config_edit=None):
  base, fts = zoo
  tensors = merge_zoo.read(fts[1])
  edit(tensors)
  cfg = json.loads((fts[1] / "config.json").read_text())
  if config_edit:
    config_edit(cfg)
  return merge_zoo.write(tmp_path / "bad", tensors, None, config=cfg)


def nan_in(t):
  t["model.layers.1.mlp.down_proj.weight"][3, 5] = np.nan


BAD = {
  "architecture": (lambda t: None, lambda c: c.update(model_type="mistral"),
                   r"architecture mismatch: .*bad/config.json has model_type='mistral'"),
  "missing": (lambda t: t.pop("model.layers.0.self_attn.v_proj.weight"), None,
              r"missing tensor model.layers.0.self_attn.v_proj.weight in model 1 \(.*bad\)"),
  "shape": (lambda t: t.update({"model.layers.1.mlp.up_proj.weight": np.zeros((64, 16), np.float32)}), None,
            r"shape mismatch: tensor model.layers.1.mlp.up_proj.weight in .*bad/model-\d+-of-\d+.safetensors"),
  "nan": (nan_in, None, r"NaN or Inf in tensor model.layers.1.mlp.down_proj.weight in .*bad/model-\d+-of-\d+"),
  "extra": (lambda t: t.update(extra=np.zeros(3, np.float32)), None, r"unexpected tensor extra in .*bad/"),
}


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.parametrize("method", ["metagpt", "average"])  # with and without a statistics pass
def test_stream_bad_input(zoo, tmp_path, case, method):
  base, fts = zoo
  edit, cfg_edit, pattern = BAD[case]
  bad = bad_model(zoo, tmp_path, edit, cfg_edit)
  out = tmp_path / "out"
  with pytest.raises(MergeError, match=pattern):
    merging.merge_checkpoints(base, [fts[0], bad, fts[2]], out, method, progress=False)
  assert no_output(out)


def test_stream_output_exists(zoo, tmp_path):
  base, fts = zoo
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  with pytest.raises(OutputExistsError, match="already exists"):
    merging.merge_checkpoints(base, fts, out, "average", progress=False)
  assert (out / "keep.txt").read_text() == "mine"
  with pytest.raises(OutputError, match="is one of the inputs"):
    merging.merge_checkpoints(base, fts, fts[0], "average", overwrite=True, progress=False)


def test_stream_vocab_policy(zoo, tmp_path):
  base, fts = zoo
  rng = np.random.default_rng(0)
  grow = lambda t: t.update({n: np.concatenate([t[n], rng.normal(size=(2, 32)).astype(np.float32)])
                             for n in ("model.embed_tokens.weight", "lm_head.weight")})
  big = bad_model(zoo, tmp_path, grow, lambda c: c.update(vocab_size=66))
  trunc = merging.merge_checkpoints(base, [fts[0], big], tmp_path / "t", "task_arithmetic", progress=False)
  ref = merging.merge_checkpoints(base, [fts[0], fts[1]], tmp_path / "r", "task_arithmetic", progress=False)
  a, b = merge_zoo.read(trunc), merge_zoo.read(ref)
  for k in b:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  report = json.loads((trunc / "merge_report.json").read_text())
  assert report["vocab"]["lm_head.weight"] == {"base_shape": [64, 32], "model_shapes": [[64, 32], [66, 32]],
                        "policy": "truncate"}
  excl = merging.merge_checkpoints(base, [fts[0], big], tmp_path / "e", "task_arithmetic", vocab_policy="exclude",
                                   progress=False)
  e, base_t = merge_zoo.read(excl), merge_zoo.read(base)
  np.testing.assert_array_equal(e["lm_head.weight"], base_t["lm_head.weight"])
  np.testing.assert_array_equal(e["model.norm.weight"], b["model.norm.weight"])


def test_stream_sigkill_leaves_no_output(zoo, tmp_path):
  """A merge killed while it writes shards leaves no output directory."""
  base, fts = zoo
  out = tmp_path / "out"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.Popen(
    [sys.executable, "-m", "launch.merge", "--config=configs/merge/metagpt.py", f"--config.base={base}",
     f"--config.models={','.join(map(str, fts))}", f"--config.out={out}", "--config.max_shard_size=2KB"],
    cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline, killed = time.time() + 60, False
  while time.time() < deadline and proc.poll() is None:
    tmps = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    if tmps and len(list(tmps[0].glob("*.safetensors"))) >= 2:
      proc.send_signal(signal.SIGKILL)
      killed = True
      break
    time.sleep(0.002)
  proc.wait()
  assert killed, f"merge ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
  assert proc.returncode == -signal.SIGKILL
  assert not out.exists()


PIPELINE_CASES = {
  "task_arithmetic": dict(method="task_arithmetic", exclude=["norm"]),  # kept tensors: written from the map
  "metagpt": dict(method="metagpt"),                                     # statistics pass
  "ties_global": dict(method="ties", density=0.4),                       # both statistics passes
  "dare": dict(method="dare", drop_rate=0.3, seed=5),                    # per-tensor DARE keys
  "average_bf16": dict(method="average", out_dtype="bfloat16", exclude=["lm_head"]),  # kept tensor cast
}


@pytest.mark.parametrize("case", list(PIPELINE_CASES))
def test_stream_pipeline_equals_serial(zoo, tmp_path, monkeypatch, case):
  """Read-ahead (direct reads into memory here: the page cache is said to be cold) + write-behind
  give the serial merge's files (memory maps only) byte for byte, and the same report."""
  from merging.direct_io import StreamingReader
  from merging.stream import CheckpointSource
  base, fts = zoo
  fetched, direct = [], []
  prefetch, read_run = CheckpointSource.prefetch, StreamingReader.read_direct_run
  monkeypatch.setattr(CheckpointSource, "prefetch", lambda self, i, n: fetched.extend(n) or prefetch(self, i, n))
  monkeypatch.setattr(StreamingReader, "in_page_cache", lambda self, n: False)
  monkeypatch.setattr(StreamingReader, "read_direct_run", lambda self, n: direct.append(read_run(self, n))
                      or direct[-1])
  outs = {}
  for pipeline in (False, True):
    fetched.clear()
    outs[pipeline] = merging.merge_checkpoints(base, fts, tmp_path / f"p{pipeline}", progress=False,
                                               max_shard_size="4KB", pipeline=pipeline, **PIPELINE_CASES[case])
    assert bool(fetched) == pipeline
  assert direct and (all(x is not None for x in direct) or all(x is None for x in direct))  # None: no O_DIRECT here
  assert direct[0] is None or any(len(x) > 1 for x in direct)  # adjacent tensors in one read
  files = sorted(p.name for p in outs[False].iterdir())
  assert files == sorted(p.name for p in outs[True].iterdir()) and len(files) > 5
  for f in files:
    if f != "merge_report.json":
      assert (outs[False] / f).read_bytes() == (outs[True] / f).read_bytes(), f
  reports = [json.loads((outs[p] / "merge_report.json").read_text()) for p in (False, True)]
  assert reports[0] == reports[1]


@pytest.mark.parametrize("case", [*PIPELINE_CASES, "ties_mergekit"])
def test_stream_in_pieces_equals_whole_tensors(zoo, tmp_path, case):
  """Tensors merged in flat pieces (`chunk`; 293 entries here, uneven last piece) give the whole-tensor
  merge's tensors: bit for bit where no global statistic is summed, else to fp32 rounding of the
  norms that set MetaGPT's λ. A per-tensor TIES trim gets its thresholds from histograms of the
  pieces first; DARE is not split (one random stream per tensor)."""
  from merging import engine
  base, fts = zoo
  opts = dict(PIPELINE_CASES.get(case, dict(method="ties", convention="mergekit", density=0.4)))
  calls, outs = {}, {}
  for chunk in (None, 300):
    calls[chunk] = {"stats": 0, "merge": 0}
    with pytest.MonkeyPatch.context() as mp:
      for name, kernel in (("stats", engine.kernels.tensor_stats), ("merge", engine.kernels.merge_tensor)):
        def counted(*a, name=name, kernel=kernel, **kw):
          calls[chunk][name] += 1
          return kernel(*a, **kw)
        mp.setattr(engine.kernels, "tensor_stats" if name == "stats" else "merge_tensor", counted)
      outs[chunk] = merging.merge_checkpoints(base, fts, tmp_path / f"c{chunk}", progress=False, chunk=chunk,
                                              **opts)
  split_merge = case != "dare"
  assert (calls[300]["merge"] > calls[None]["merge"] > 0) == split_merge, calls
  needs_stats = case in ("metagpt", "ties_global", "ties_mergekit")  # in pieces: statistics of the pieces
  assert (calls[300]["stats"] > calls[None]["stats"]) == needs_stats, calls
  whole, split = merge_zoo.read(outs[None]), merge_zoo.read(outs[300])
  assert set(whole) == set(split)
  if opts["method"] == "metagpt":
    reports = [json.loads((outs[c] / "merge_report.json").read_text()) for c in (None, 300)]
    np.testing.assert_allclose(reports[1]["lambdas"], reports[0]["lambdas"], rtol=1e-6)
    for k in whole:
      np.testing.assert_allclose(split[k], whole[k], rtol=1e-5, atol=1e-7, err_msg=k)
  else:
    for k in whole:
      np.testing.assert_array_equal(split[k], whole[k], err_msg=k)


def merge_threads():
  return [t for t in threading.enumerate() if t.name in ("safetensors-writer", "merge-prefetch")]


@pytest.mark.parametrize("method", ["task_arithmetic", "metagpt"])
def test_stream_writer_thread_error_propagates(zoo, tmp_path, monkeypatch, method):
  """A write failing in the writer thread (disk full on the 3rd tensor) fails the merge with that
  error, leaves no output directory and no thread behind."""
  from calm_jax.safetensors_io import ShardedWriter
  base, fts = zoo
  calls = []
  write = ShardedWriter.write

  def full_disk(self, name, array):
    calls.append(threading.current_thread().name)
    if len(calls) == 3:
      raise OSError(errno.ENOSPC, "No space left on device")
    write(self, name, array)

  monkeypatch.setattr(ShardedWriter, "write", full_disk)
  out = tmp_path / "out"
  with pytest.raises(OSError, match="No space left on device"):
    merging.merge_checkpoints(base, fts, out, method, progress=False, max_shard_size="4KB")
  assert calls == ["safetensors-writer"] * 3  # written in the background; stopped at the failure
  assert no_output(out)
  assert not merge_threads()


def test_prefetcher_stays_within_its_byte_budget():
  """The read-ahead thread fetches each item once, in order, in batches of consecutive items,
  ahead of the consumer by at most `ahead` bytes of items (always the next item, however big);
  a failing fetch is only a hint; leaving the block ends the thread."""
  from merging.engine import Prefetcher
  sizes = [5, 1, 1, 1, 9, 1, 2, 2, 2, 30, 1, 1, 1, 1, 1, 1]
  seen = []

  def fetch(batch):
    seen.append((batch, ahead._pos))
    if 3 in batch:
      raise OSError("gone")

  ahead = Prefetcher(fetch, list(range(len(sizes))), size=lambda j: sizes[j], ahead=4)
  with ahead:
    for i in range(len(sizes)):
      ahead.at(i)
      time.sleep(0.01)
  order = [j for batch, _ in seen for j in batch]
  assert order == sorted(set(order)) and order[-1] == len(sizes) - 1 and 3 in order
  assert all(batch == list(range(batch[0], batch[-1] + 1)) for batch, _ in seen), seen
  assert all(j > pos and (j == pos + 1 or sum(sizes[pos + 1: j + 1]) <= 4)
             for batch, pos in seen for j in batch), seen
  assert any(len(batch) >= 2 and batch[0] > pos + 1 for batch, pos in seen)  # small items: batched, ahead
  assert not merge_threads()


@pytest.mark.parametrize("n,k", [(1, 1), (1000, 1), (1000, 437), (1000, 1000), (70000, 35000)])
def test_kth_largest_radix_select_equals_sort(n, k):
  """The per-tensor TIES threshold (radix select) equals numpy's sort, ties and zeros included."""
  rng = np.random.default_rng(n + k)
  x = np.abs(rng.standard_normal(n).astype(np.float32))
  x[: n // 10] = x[n // 10 // 2] if n >= 10 else x[:1]  # a run of equal magnitudes
  x[n // 10: n // 5] = 0.0
  got = float(jax.jit(kernels.kth_largest, static_argnums=1)(jnp.asarray(x), k))
  assert got == float(np.sort(x)[n - k])
