"""The merge kernels sharded over the 8 fake CPU devices give the single-device results.

Tensors whose size divides by 8 are split over a 1-D mesh (the norm-like odd-sized leaf stays on
one device); merged tensors and the report (λ's, squared norms, TIES thresholds, kept counts)
must equal the unsharded run.
"""
import jax
import numpy as np
import pytest

import merging

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
  assert_same(reports[0], reports[1])
