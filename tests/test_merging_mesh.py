"""The merge kernels sharded over the 8 fake CPU devices give the single-device results.

Every tensor is split over a 1-D mesh, those whose size does not divide by 8 zero-padded (the
kernels mask the padding); merged tensors and the report (λ's, squared norms, TIES thresholds,
kept counts) must equal the unsharded run.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import merging
from merging import kernels
from merging.options import resolve

pytestmark = pytest.mark.usefixtures("fast_compile")

CASES = {
    "metagpt": dict(method="metagpt"),
    "metagpt_ties": dict(method="metagpt", sparsify="ties", density=0.4),
    "metagpt_dare": dict(method="metagpt", sparsify="dare", drop_rate=0.3),
    "ties_paper": dict(method="ties", density=[0.3, 0.5, 0.7]),
    "ties_mergekit": dict(method="ties", convention="mergekit", weights=[1.0, 0.6, 0.8], density=0.5),
    "dare_paper": dict(method="dare", drop_rate=0.5, seed=3),
    "dare_mergekit": dict(method="dare", convention="mergekit", drop_rate=0.4, seed=3),
    "dare_ties": dict(method="dare_ties", drop_rate=0.5),
}


def trees():
  rng = np.random.default_rng(0)
  shapes = {"embed": (64, 24), "layers/q": (24, 24), "layers/mlp": (24, 40), "norm": (7,)}
  base = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
  fts = [{k: v + rng.standard_normal(v.shape).astype(np.float32) * rng.uniform(0.01, 0.1) for k, v in base.items()}
         for _ in range(3)]
  return base, fts


def assert_same(a, b, path=""):
  if isinstance(a, dict):
    assert set(a) == set(b), path
    for k in a:
      assert_same(a[k], b[k], f"{path}/{k}")
  elif isinstance(a, (list, tuple)) and a and not isinstance(a[0], (int, float)):
    for i, (x, y) in enumerate(zip(a, b)):
      assert_same(x, y, f"{path}/{i}")
  elif isinstance(a, (int, float, list, tuple, np.ndarray)) and not isinstance(a, bool):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=1e-5, atol=1e-7,
                               err_msg=path)
  else:
    assert a == b, path


@pytest.mark.parametrize("case", CASES)
def test_sharded_equals_one_device(case):
  assert len(jax.devices()) == 8
  base, fts = trees()
  one, rep1 = merging.merge(base, fts, **CASES[case])
  many, rep8 = merging.merge(base, fts, mesh="all", **CASES[case])
  assert len(many["layers/q"].sharding.device_set) == 8
  for k in base:
    np.testing.assert_allclose(np.asarray(many[k]), np.asarray(one[k]), rtol=1e-6, atol=1e-7, err_msg=k)
  assert_same(rep1, rep8)


def test_streaming_merge_on_a_mesh(tmp_path):
  from jax.sharding import Mesh
  from calm_jax.safetensors_io import CheckpointReader, ShardedWriter
  import json
  base, fts = trees()
  dirs = []
  for i, t in enumerate([base, *fts]):
    d = tmp_path / f"m{i}"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    specs = [(k, v.shape, v.dtype) for k, v in t.items()]
    with ShardedWriter(d, specs) as w:
      for k, v in t.items():
        w.write(k, v)
    dirs.append(d)
  mesh = Mesh(np.asarray(jax.devices()), ("d",))
  outs = [merging.merge_checkpoints(dirs[0], dirs[1:], tmp_path / f"out{m}", "metagpt", sparsify="ties",
                                    progress=False, mesh=m) for m in (None, mesh)]
  r1, r8 = (CheckpointReader(o) for o in outs)
  for k in base:
    np.testing.assert_allclose(r8.get(k), r1.get(k), rtol=1e-6, atol=1e-7, err_msg=k)
  reports = [json.loads((o / "merge_report.json").read_text()) for o in outs]
  assert (reports[0].pop("chunk"), reports[1].pop("chunk")) == (1 << 22, None)  # no pieces on a mesh
  assert_same(reports[0], reports[1])


# Sizes 35, 13, 99, 3: none divides by 8 (3 leaves five devices nothing but padding).
ODD_SHAPES = {"a": (7, 5), "b": (13,), "c": (33, 3), "tiny": (3,)}
ODD_CASES = {**CASES, "task_arithmetic": dict(method="task_arithmetic", weights=[0.5, 1.0, 0.7]),
             "average": dict(method="average", weights=[1.0, 2.0, 0.5])}


def odd_trees():
  """Base and 3 fine-tuned trees of ODD_SHAPES; ~30% of each τ exactly 0 (the padding's value)."""
  rng = np.random.default_rng(1)
  base = {k: rng.standard_normal(s).astype(np.float32) for k, s in ODD_SHAPES.items()}
  fts = [{k: np.where(rng.random(v.shape) < 0.3, v, v + rng.standard_normal(v.shape).astype(np.float32) * 0.05)
          for k, v in base.items()} for _ in range(3)]
  return base, fts


@pytest.fixture
def kernel_calls(monkeypatch):
  """(kernel, devices holding its inputs, input length, n) of every kernel call the engine makes."""
  calls = []
  for name in ("tensor_stats", "low_histogram", "merge_tensor"):
    def spy(base, models, *args, _fn=getattr(kernels, name), _name=name, **kw):
      devices = {len(x.sharding.device_set) if isinstance(x, jax.Array) else 0 for x in (base, *models)}
      calls.append((_name, devices, base.shape[0], kw.get("n")))
      return _fn(base, models, *args, **kw)
    monkeypatch.setattr(kernels, name, spy)
  return calls


@pytest.mark.parametrize("case", ODD_CASES)
def test_odd_sizes_run_sharded_and_equal_one_device(case, kernel_calls):
  base, fts = odd_trees()
  one, rep1 = merging.merge(base, fts, **ODD_CASES[case])
  kernel_calls.clear()
  many, rep8 = merging.merge(base, fts, mesh="all", **ODD_CASES[case])
  opts = resolve(ODD_CASES[case]["method"], 3, **{k: v for k, v in ODD_CASES[case].items() if k != "method"})
  passes = {"merge_tensor"} | ({"tensor_stats"} if opts.needs_norms or opts.needs_threshold else set()) \
      | ({"low_histogram"} if opts.needs_threshold else set())
  assert {c[0] for c in kernel_calls} == passes
  assert len(kernel_calls) == len(passes) * len(base)  # every tensor in every pass
  for name, devices, size, n in kernel_calls:  # every input split over the 8 devices, padded
    assert devices == {8} and size % 8 == 0 and n is not None and 0 < size - n < 8, name
  for k in base:
    assert many[k].shape == base[k].shape, k
    np.testing.assert_allclose(np.asarray(many[k]), np.asarray(one[k]), rtol=1e-6, atol=1e-7, err_msg=k)
  assert_same(rep1, rep8)  # sq_norms, lambdas, TIES thresholds / ranks / entry count, kept, delta norms
  if opts.needs_threshold:
    assert rep8["ties_threshold"]["entries_per_model"] == sum(v.size for v in base.values())


def _padded(x, size):
  return jnp.concatenate([x, jnp.zeros(size - x.shape[0], x.dtype)])


@pytest.mark.parametrize("case", ODD_CASES)
def test_kernels_ignore_padding(case):
  """One device: zero-padded inputs with n give the unpadded kernels' results (histograms, top-k,
  DARE masks and rescale, kept counts included)."""
  base, fts = odd_trees()
  b, ms = jnp.asarray(base["c"].reshape(-1)), tuple(jnp.asarray(f["c"].reshape(-1)) for f in fts)
  n, size = b.shape[0], 112  # 99 entries padded by 13 (more than one device's worth of padding)
  pb, pms = _padded(b, size), tuple(_padded(m, size) for m in ms)
  st, pst = kernels.tensor_stats(b, ms, histogram=True), kernels.tensor_stats(pb, pms, histogram=True, n=n)
  np.testing.assert_array_equal(pst["hist"], st["hist"])
  np.testing.assert_allclose(pst["sq"], st["sq"], rtol=1e-6)
  for bins in (np.zeros(3, np.int32), np.argmax(np.asarray(st["hist"]), axis=1).astype(np.int32)):
    np.testing.assert_array_equal(kernels.low_histogram(pb, pms, bins, n=n), kernels.low_histogram(b, ms, bins))
  opts = resolve(ODD_CASES[case]["method"], 3, **{k: v for k, v in ODD_CASES[case].items() if k != "method"})
  w, lam = jnp.asarray(opts.weights, jnp.float32), np.float32(opts.lam)
  thr = jnp.quantile(jnp.abs(jnp.stack(ms) - b), 0.5, axis=1)  # some global TIES threshold
  key = kernels.tensor_key(opts.seed, "c")
  got, gst = kernels.merge_tensor(pb, pms, w, lam, thr, key, spec=opts.kernel, n=n)
  want, wst = kernels.merge_tensor(b, ms, w, lam, thr, key, spec=opts.kernel)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(gst["kept"], wst["kept"])
  for k in ("sq", "delta_sq"):
    np.testing.assert_allclose(gst[k], wst[k], rtol=1e-6, err_msg=k)
