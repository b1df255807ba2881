"""Parity of the streaming merge with mergekit on the same tiny llama checkpoints.

mergekit runs as a subprocess (its `mergekit-yaml` click entry point, every YAML in one
process: each process start costs ~6 s of torch/transformers imports) with `dtype: float32`,
on CPU, without tokenizer copy or model card. The fine-tuned models are sparse perturbations
of a `transformers` base (`merge_zoo`), so task vectors hold exact zeros and magnitudes that
differ by model and tensor, but no exact magnitude ties at a TIES threshold. Our Python-API merges
split tensors of over 600 entries into pieces (`chunk=300`), the path a large model's tensors take;
the same merges from the YAML take whole tensors.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import merge_zoo
import numpy as np
import pytest
import yaml

import merging
from merging.mergekit_yaml import from_mergekit, run_mergekit_yaml

pytest.importorskip("mergekit")
pytestmark = pytest.mark.usefixtures("fast_compile")

ROOT = Path(__file__).resolve().parents[1]
W_TA = [0.5, 1.0, -0.3]
W_TIES = [1.0, 0.6, 0.8]
DENSITY = [0.5, 0.3, 0.7]


def mk_config(method, base, fts, weights, densities=None, parameters=None, with_base=True):
  models = []
  for i, f in enumerate(fts):
    p = {"weight": float(weights[i])}
    if densities is not None:
      p["density"] = float(densities[i])
    models.append({"model": str(f), "parameters": p})
  cfg = {"merge_method": method, "models": models, "dtype": "float32"}
  if with_base:
    cfg["base_model"] = str(base)
  if parameters:
    cfg["parameters"] = parameters
  return cfg


# name: (our method and options, mergekit config (given the λ's of our MetaGPT run))
CASES = {
  "linear": (
    dict(method="average", weights=[1.0, 2.0, 0.5]),
    lambda b, f, lam: mk_config("linear", b, f, [1.0, 2.0, 0.5], with_base=False)),
  "task_arithmetic": (
    dict(method="task_arithmetic", weights=W_TA, lam=0.8),
    lambda b, f, lam: mk_config("task_arithmetic", b, f, W_TA, parameters={"normalize": False, "lambda": 0.8})),
  "ties": (
    dict(method="ties", convention="mergekit", weights=W_TIES, density=DENSITY),
    lambda b, f, lam: mk_config("ties", b, f, W_TIES, DENSITY)),
  "ties_sum": (
    dict(method="ties", convention="mergekit", weights=W_TIES, density=DENSITY, normalize="none", lam=1.3),
    lambda b, f, lam: mk_config("ties", b, f, W_TIES, DENSITY, parameters={"normalize": False, "lambda": 1.3})),
  "metagpt": (
    dict(method="metagpt"),
    lambda b, f, lam: mk_config("task_arithmetic", b, f, lam, parameters={"normalize": False, "lambda": 1.0})),
  "metagpt_ties": (
    dict(method="metagpt", sparsify="ties", convention="mergekit", density=DENSITY),
    lambda b, f, lam: mk_config("ties", b, f, lam, DENSITY, parameters={"normalize": False})),
}
MERGEKIT_DRIVER = """
import sys
from mergekit.scripts.run_yaml import main
for config, out in zip(sys.argv[1::2], sys.argv[2::2]):
    main([config, out, "--no-copy-tokenizer", "--no-write-model-card", "--quiet"], standalone_mode=False)
"""


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
  """{case: (our output dir, mergekit output dir, our report, our output from the same YAML)}.

  mergekit runs in a subprocess while we merge; our `launch.merge --mergekit_yaml` CLI runs
  the `merge_method: metagpt` extension in another.
  """
  root = tmp_path_factory.mktemp("mk")
  base, fts = merge_zoo.make_zoo(root)

  def ours(name):
    opts = dict(CASES[name][0])
    out = merging.merge_checkpoints(base, fts, root / f"ours_{name}", opts.pop("method"), progress=False,
                                    max_shard_size="16KB", chunk=300, **opts)  # large tensors' path
    return out, json.loads((out / "merge_report.json").read_text())

  results = {"metagpt": ours("metagpt")}
  lam = results["metagpt"][1]["lambdas"]
  args = []
  for name, (_, build) in CASES.items():
    cfg = root / f"{name}.yml"
    cfg.write_text(yaml.safe_dump(build(base, fts, lam)))  # floats dump as repr: λ round-trips exactly
    args += [str(cfg), str(root / f"mk_{name}")]
  metagpt_yml = root / "metagpt_ext.yml"
  metagpt_yml.write_text(yaml.safe_dump({"merge_method": "metagpt", "base_model": str(base), "dtype": "float32",
                                         "models": [{"model": str(base)}] + [{"model": str(f)} for f in fts]}))
  env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "JAX_PLATFORMS": "cpu"}
  procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
           for cmd in ([sys.executable, "-c", MERGEKIT_DRIVER, *args],
                       [sys.executable, "-m", "launch.merge", f"--mergekit_yaml={metagpt_yml}",
                        f"--out={root / 'cli_metagpt'}"])]
  try:
    results.update({name: ours(name) for name in CASES if name != "metagpt"})
    from_yaml = {name: run_mergekit_yaml(root / f"{name}.yml", root / f"yaml_{name}", progress=False)
                 for name in CASES}
    errors = [p.communicate(timeout=300)[1] for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, err in zip(procs, errors):
    assert p.returncode == 0, err[-4000:]
  from_yaml["metagpt_ext"] = root / "cli_metagpt"
  return {n: (results[n][0], root / f"mk_{n}", results[n][1], from_yaml[n]) for n in CASES} | {
    "metagpt_ext": (root / "cli_metagpt", root / "mk_metagpt", None, root / "cli_metagpt")}


def max_diff(a_dir, b_dir):
  a, b = merge_zoo.read(a_dir), merge_zoo.read(b_dir)
  assert set(a) == set(b)
  return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a)


@pytest.mark.slow  # tens of seconds: kept out of `make test-fast`
def test_cli_runs_under_the_tuned_allocator(merged):
  """`python -m launch.merge` re-executes itself under calm_jax.malloc.TUNED (glibc Linux), so its
  merge keeps freed buffers for reuse (low_memory unset -> False); the report says so."""
  import platform
  report = json.loads((merged["metagpt_ext"][0] / "merge_report.json").read_text())
  tuned = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc" and "GLIBC_TUNABLES" not in os.environ
  assert report["allocator"] == ("tuned" if tuned else "low_memory")


@pytest.mark.parametrize("case", list(CASES))
def test_equals_mergekit(merged, case):
  ours_dir, mk_dir, report, _ = merged[case]
  worst = max_diff(ours_dir, mk_dir)
  assert worst <= 1e-6, (case, worst)
  if case.startswith("ties") or case == "metagpt_ties":
    kept = report["kept_fraction"]
    assert all(0 < k < 0.7 for k in kept), kept  # the trim did something


@pytest.mark.parametrize("case", list(CASES) + ["metagpt_ext"])
def test_mergekit_yaml_input(merged, case):
  """The same YAML through `--mergekit_yaml` gives mergekit's result (metagpt_ext: our extension, via the CLI)."""
  _, mk_dir, _, yaml_dir = merged[case]
  worst = max_diff(yaml_dir, mk_dir)
  assert worst <= 1e-6, (case, worst)


def test_mergekit_yaml_refuses_unsupported(tmp_path):
  base = {"merge_method": "ties", "base_model": "b", "models": [{"model": "m", "parameters": {"weight": 1.0}}]}
  for edit, pattern in [({"slices": []}, "unsupported mergekit key"), ({"merge_method": "slerp"}, "not supported"),
                        ({"models": [{"model": "m"}]}, "requires parameters.weight"),
                        ({"models": [{"model": "m", "parameters": {"weight": [0, 1]}}]}, "gradients")]:
    with pytest.raises(merging.MergeError, match=pattern):
      from_mergekit({**base, **edit})
  assert from_mergekit({**base, "dtype": "bfloat16"})[3] == {
    "convention": "mergekit", "weights": [1.0], "lam": 1.0, "normalize": "weight", "density": [1.0],
    "out_dtype": "bfloat16"}


def test_metagpt_lambdas_reported(merged):
  lam = merged["metagpt"][2]["lambdas"]
  assert abs(sum(lam) - 1) < 1e-12 and lam[0] < lam[1] < lam[2]  # perturbation scales grow with the index
  assert merged["metagpt_ties"][2]["lambdas"] == lam  # λ from the original task vectors, not the trimmed ones


def test_output_loads_in_transformers(merged):
  import torch
  from transformers import LlamaForCausalLM
  ours_dir = merged["metagpt"][0]
  model = LlamaForCausalLM.from_pretrained(ours_dir).eval()
  with torch.no_grad():
    logits = model(torch.arange(3, 11)[None]).logits
  assert torch.isfinite(logits).all()
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  for k, v in merge_zoo.read(ours_dir).items():
    np.testing.assert_array_equal(sd[k], v)
