"""Nothing a user owns is lost or silently wrong: each defect below failed before its fix.

Merges that would write NaN / Inf, a training run pointed at a model directory, an output that is
an input spelled another way, two jobs on one output, resumes and reuses of another config, a
non-finite state checkpointed, corrupt or hostile safetensors, fingerprints blind to a row swap,
and the messages (not tracebacks) a user gets for their mistakes. The kill matrix is in
tests/test_kill.py; docs/reliability.md lists every case.
"""
import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import merge_zoo
import numpy as np
import pytest
from flax import nnx

import merging
from calm_jax import hf
from calm_jax.atomic import OutputError, OutputExistsError, atomic_dir, clean_stale_siblings, exclusive
from calm_jax.errors import UserError
from calm_jax.fingerprint import fingerprint
from calm_jax.safetensors_io import CheckpointError, CheckpointReader, SafetensorsFile
from merging.options import MergeError

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
METAGPT = "configs/merge/metagpt.py"


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
  return merge_zoo.make_zoo(tmp_path_factory.mktemp("zoo"))


def launch(module, *args, timeout=300):
  return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout, env=ENV)


def merge_cmd(zoo, out, *extra, config="configs/merge/task_arithmetic.py"):
  base, fts = zoo
  return ("launch.merge", f"--config={config}", f"--config.base={base}",
          f"--config.models={','.join(map(str, fts))}", f"--config.out={out}", "--config.progress=False", *extra)


def tree_bytes(d: Path) -> dict:
  return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def siblings(out: Path) -> list[str]:
  return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


# --- 1. a merge never writes non-finite weights -------------------------------------------------

@pytest.mark.parametrize("extra,words", [
    (("--config.lam=nan",), "lam=nan: must be a finite number"),
    (("--config.weights=1,inf,1",), "weights[1]=inf: must be a finite number"),
    (("--config.lam=1e8", "--config.out_dtype=float16"), "NaN or Inf in float16"),
])
def test_merge_refuses_non_finite_results(zoo, tmp_path, extra, words):
  out = tmp_path / "out"
  p = launch(*merge_cmd(zoo, out, *extra))
  assert p.returncode == 2, p.stderr[-2000:]
  assert words in p.stderr and "Traceback" not in p.stderr
  assert not out.exists() and not siblings(out)


def test_merge_checks_every_cast_tensor_in_the_pytree_api(zoo):
  base, fts = zoo
  trees = [merge_zoo.read(d) for d in (base, *fts)]
  with pytest.raises(MergeError, match=r"merged tensor .* NaN or Inf in float16"):
    merging.merge(trees[0], trees[1:], "task_arithmetic", lam=1e8, out_dtype="float16")
  with pytest.raises(MergeError, match="lam=inf"):
    merging.merge(trees[0], trees[1:], "task_arithmetic", lam=float("inf"))


def test_mergekit_yaml_nan_weight_is_refused(zoo, tmp_path):
  base, fts = zoo
  yml = tmp_path / "m.yml"
  yml.write_text(f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
                 + "".join(f"  - model: {d}\n    parameters:\n      weight: {w}\n" for d, w in zip(fts, ("1", ".nan", "1"))))
  out = tmp_path / "out"
  p = launch("launch.merge", f"--mergekit_yaml={yml}", f"--out={out}")
  assert p.returncode == 2 and "weight" in p.stderr and "finite" in p.stderr, p.stderr[-2000:]
  assert not out.exists()


# --- 2. a training workdir that is not one of our runs is refused -------------------------------

def test_train_refuses_a_model_directory_as_workdir(tiny_llama_dir, tmp_path):
  import shutil
  model_dir = shutil.copytree(tiny_llama_dir, tmp_path / "model")
  before = tree_bytes(model_dir)
  p = launch("launch.train", "--config=configs/pretrain.py:tiny", f"--workdir={model_dir}")
  assert p.returncode == 2, p.stderr[-2000:]
  assert "config.json" in p.stderr and "a Hugging Face model directory" in p.stderr and "not a run of ours" in p.stderr
  assert tree_bytes(model_dir) == before  # not a byte changed (no config.json overwritten, no marker)
  hf.load(model_dir)


# --- 3. the output can never be an input, however spelled ---------------------------------------

def test_output_spelled_through_dotdot_or_a_link_is_still_the_input(zoo, tmp_path):
  base, fts = zoo
  before = tree_bytes(fts[0])
  (tmp_path / "sub").mkdir()
  sneaky = f"{tmp_path}/sub/../../{fts[0].parent.name}/{fts[0].name}"
  os.symlink(fts[0], tmp_path / "link")
  for out in (sneaky, tmp_path / "link", fts[0].parent):  # ../, a symlink, a directory holding the input
    p = launch(*merge_cmd(zoo, out, "--config.overwrite=True"))
    assert p.returncode == 2 and ("is one of the inputs" in p.stderr or "overlaps the input" in p.stderr), p.stderr
  assert tree_bytes(fts[0]) == before
  model = hf.load(fts[0])
  with pytest.raises(OutputError, match="is one of the inputs"):  # hf.save over the directory it copies from
    hf.save(model, f"{fts[0]}/../{fts[0].name}", copy_from=fts[0], overwrite=True)
  assert tree_bytes(fts[0]) == before


# --- 4. one job per output / workdir --------------------------------------------------------------

def test_a_second_merge_to_the_same_output_fails_while_the_first_runs(zoo, tmp_path):
  out, ready = tmp_path / "out", tmp_path / "ready"
  first = subprocess.Popen([sys.executable, str(ROOT / "tests" / "kill_driver.py"), "merge-stats", str(ready), "--",
                            *merge_cmd(zoo, out, config=METAGPT)], cwd=ROOT, env={**ENV, "CALM_JAX_NO_REEXEC": "1"},
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 120
    while not ready.exists():
      assert first.poll() is None and time.time() < deadline, first.communicate()[1][-2000:]
      time.sleep(0.05)
    second = launch(*merge_cmd(zoo, out, "--config.overwrite=True"))
    assert second.returncode == 2 and "in use by another job" in second.stderr, second.stderr[-2000:]
    assert f"pid {first.pid}" in second.stderr
    Path(str(ready) + ".go").touch()
    assert first.wait(timeout=120) == 0, first.communicate()[1][-2000:]
  finally:
    first.kill()
  assert merge_zoo.read(out)  # the first one's output, complete
  assert not [p for p in out.parent.iterdir() if p.name.endswith(".lock")]  # lock files are removed


def test_two_trainings_in_one_workdir(tmp_path):
  with exclusive(tmp_path / "w", what="workdir"):
    p = launch("launch.train", "--config=configs/pretrain.py:tiny", f"--workdir={tmp_path / 'w'}")
  assert p.returncode == 2 and "workdir" in p.stderr and "in use by another job" in p.stderr, p.stderr[-2000:]
  assert not (tmp_path / "w" / "metrics.jsonl").exists()


# --- 5. resume and reuse respect the config -------------------------------------------------------

@pytest.mark.parametrize("override,words", [
    ("--config.steps=-5", "steps=-5"),
    ("--config.optimizer.lr=nan", "optimizer.lr=nan"),
    ("--config.checkpoint.keep=0", "checkpoint.keep=0"),
    ("--config.batch_size=0", "batch_size=0"),
])
def test_invalid_training_configs_run_nothing(tmp_path, override, words):
  w = tmp_path / "w"
  p = launch("launch.train", "--config=configs/pretrain.py:tiny", f"--workdir={w}", override)
  assert p.returncode == 2 and words in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
  assert not (w / "hf").exists() and not (w / "results.json").exists() and not (w / "checkpoints").exists()


@pytest.mark.slow
def test_finished_run_is_not_reused_for_another_config(tmp_path):
  w = tmp_path / "w"
  assert launch("launch.train", "--config=configs/pretrain.py:tiny", f"--workdir={w}").returncode == 0
  before = tree_bytes(w / "hf")
  p = launch("launch.train", "--config=configs/pretrain.py:tiny", f"--workdir={w}", "--config.model.hidden_size=64")
  assert p.returncode == 2 and "model.hidden_size: recorded 32, now 64" in p.stderr, p.stderr[-2000:]
  assert tree_bytes(w / "hf") == before
  same = launch("launch.train", "--config=configs/pretrain.py:tiny", f"--workdir={w}", "--config.log_every=3")
  assert same.returncode == 0 and "reusing the finished base" in same.stdout  # logging is not the run's identity


@pytest.mark.slow
def test_resume_refuses_another_config_unless_told_and_keeps_the_first_config(tmp_path):
  w = tmp_path / "w"
  args = ("--config=configs/pretrain.py:tiny", f"--workdir={w}", "--config.reuse=False", "--config.steps=10",
          "--config.checkpoint.every=5")
  assert launch("launch.train", *args).returncode == 0
  first = (w / "config.json").read_text()
  for change, key in (("--config.optimizer.lr=0.01", "optimizer.lr"), ("--config.seed=3", "seed"),
                      ("--config.batch_size=8", "batch_size")):
    p = launch("launch.train", *args, change)
    assert p.returncode == 2 and key in p.stderr and "resume_with_changes" in p.stderr, p.stderr[-2000:]
    assert (w / "config.json").read_text() == first
  p = launch("launch.train", *args[:3], "--config.steps=20", "--config.checkpoint.every=5",
             "--config.resume_with_changes=True")
  assert p.returncode == 0 and "resumed from" in p.stdout, p.stderr[-2000:]
  meta = json.loads((w / "checkpoints" / "meta.json").read_text())
  assert meta["resumed_with_changes"][0]["step"] == 10
  assert any(c.startswith("steps: recorded 10, now 20") for c in meta["resumed_with_changes"][0]["changes"])
  assert (w / "config.json").read_text() == first and json.loads((w / "config.resumed-10.json").read_text())["steps"] == 20


def test_a_non_finite_step_is_never_checkpointed(tmp_path):
  from calm_jax.experiment import build_decoder
  from calm_jax.tasks import mixture_batches, task_registry
  from calm_jax.tokenizers import CharTokenizer
  from calm_jax.train import NonFiniteError, lm_batch_loss, train
  from configs.pretrain import get_config
  c = get_config("tiny")
  c.steps, c.log_every, c.checkpoint.every = 8, 100, 2
  tok = CharTokenizer()
  batch_fn = mixture_batches(c.data.tasks, batch_size=c.batch_size, tokenizer=tok,
                             registry=task_registry(c.data.task_args))[2]

  def loss(model, batch, rng):  # poisons step 3's update; the next save (step 4) must not happen
    value, m = lm_batch_loss(model, batch, rng)
    return value * jnp.where(batch["poison"][0] > 0, jnp.nan, 1.0), m  # NaN gradients: NaN parameters

  def poisoned(step):
    b = batch_fn(step)
    b["poison"] = np.full((c.batch_size,), float(step == 2), np.float32)
    return b

  with pytest.raises(NonFiniteError, match="non-finite metrics at step 4"):
    train(build_decoder(c.model, tok, 0), trainable=nnx.Param, loss_fn=loss, batch_fn=poisoned, config=c,
          workdir=tmp_path, quiet=True)
  assert sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()) == [2]


# --- safetensors that lie, and fingerprints that see ----------------------------------------------

def _write_raw(path: Path, header: dict, data: bytes):
  blob = json.dumps(header).encode()
  path.write_bytes(len(blob).to_bytes(8, "little") + blob + data)


def test_overlapping_offsets_holes_and_trailing_bytes_are_refused(tmp_path):
  f32 = np.arange(8, dtype=np.float32).tobytes()
  _write_raw(tmp_path / "a.safetensors", {"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                                           "y": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, f32[:24])
  with pytest.raises(CheckpointError, match=r"a.safetensors: tensor y .* overlaps"):
    SafetensorsFile(tmp_path / "a.safetensors")
  _write_raw(tmp_path / "b.safetensors", {"x": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, f32[:16])
  with pytest.raises(CheckpointError, match=r"b.safetensors: tensor x .* unused"):
    SafetensorsFile(tmp_path / "b.safetensors")
  _write_raw(tmp_path / "c.safetensors", {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, f32[:12])
  with pytest.raises(CheckpointError, match=r"c.safetensors: the header indexes 8 bytes of data, the file holds 12"):
    SafetensorsFile(tmp_path / "c.safetensors")


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/x.safetensors"])
def test_index_entries_outside_the_model_directory_are_refused(zoo, tmp_path, shard):
  import shutil
  d = shutil.copytree(zoo[1][0], tmp_path / "m")
  index = d / "model.safetensors.index.json"
  data = json.loads(index.read_text())
  name = next(iter(data["weight_map"]))
  data["weight_map"][name] = shard
  index.write_text(json.dumps(data))
  with pytest.raises(CheckpointError, match="must be plain names inside"):
    CheckpointReader(d)


def test_an_integer_weight_is_refused_by_name(tiny_llama_dir, tmp_path):
  import shutil

  from safetensors.numpy import load_file, save_file
  d = shutil.copytree(tiny_llama_dir, tmp_path / "m")
  tensors = load_file(d / "model.safetensors")
  tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"].astype(np.int32)
  save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
  with pytest.raises(CheckpointError, match=r"model.layers.0.mlp.up_proj.weight .* is I32, a weight must be floating"):
    hf.load(d)


def test_fingerprints_see_a_row_swap_but_not_the_load_dtype(tiny_llama_dir):
  params = hf.load(tiny_llama_dir).params()
  swapped = jax.tree.map(lambda x: x, params)
  swapped["embed"] = params["embed"][jnp.array([1, 0] + list(range(2, params["embed"].shape[0])))]
  assert float(jnp.sum(swapped["embed"])) == pytest.approx(float(jnp.sum(params["embed"])))  # moments agree
  assert fingerprint(swapped) != fingerprint(params)
  assert fingerprint(hf.load(tiny_llama_dir, dtype="bfloat16").params()) == fingerprint(params)


# --- temporary outputs of a job that died ---------------------------------------------------------

def test_stale_temp_siblings_of_dead_jobs_are_removed_by_the_next_writer(tmp_path):
  out = tmp_path / "out"
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
  pid = int(dead.stdout)  # a process that has exited
  from calm_jax.atomic import _HOST
  stale = [tmp_path / f".out.tmp-{_HOST}-{pid}-abcd1234", tmp_path / f".out.old-{_HOST}-{pid}-abcd1234"]
  live = tmp_path / f".out.tmp-{_HOST}-{os.getpid()}-abcd1234"   # a live job's
  other = tmp_path / f".out.tmp-otherhost-{pid}-abcd1234"        # another host's: cannot tell
  for p in (*stale, live, other):
    p.mkdir()
    (p / "part.safetensors").write_bytes(b"x")
  with atomic_dir(out) as tmp:
    (tmp / "f").write_text("done")
  assert (out / "f").read_text() == "done"
  assert all(not p.exists() for p in stale) and live.exists() and other.exists()
  assert clean_stale_siblings(out) == []


# --- messages, not tracebacks ---------------------------------------------------------------------

@pytest.mark.parametrize("edit,words", [
    ({"num_attention_heads": 0}, "num_attention_heads=0: expected a positive integer"),
    ({"hidden_size": "thirty-two"}, "hidden_size='thirty-two': expected a positive integer"),
    ({"rms_norm_eps": -1e-6}, "rms_norm_eps=-1e-06: expected a positive number"),
])
def test_bad_config_values_are_named(tiny_llama_dir, tmp_path, edit, words):
  import shutil
  d = shutil.copytree(tiny_llama_dir, tmp_path / "m")
  cfg = json.loads((d / "config.json").read_text())
  cfg.update(edit)
  (d / "config.json").write_text(json.dumps(cfg))
  p = launch("launch.eval", f"--model={d}", "--tasks=copy", "--n_per_task=2")
  assert p.returncode == 2 and words in p.stderr and "config.json" in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_config_json_that_is_a_directory(tiny_llama_dir, tmp_path):
  import shutil
  d = shutil.copytree(tiny_llama_dir, tmp_path / "m")
  (d / "config.json").unlink()
  (d / "config.json").mkdir()
  with pytest.raises(UserError, match="config.json: is a directory"):
    hf.load(d)


@pytest.mark.parametrize("arg,words", [
    ("--config.typo=1", "unknown config key 'typo'"),
    ("--config.model.hiden_size=1", "did you mean 'model.hidden_size'"),
    ("--config.optimizer.lr.x=1", "config.optimizer.lr is a value"),
])
def test_unknown_config_keys_are_named_with_the_closest(tmp_path, arg, words):
  p = launch("launch.train", "--config=configs/pretrain.py:tiny", f"--workdir={tmp_path / 'w'}", arg)
  assert p.returncode == 2 and words in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("extra,words", [
    (("--config.max_shard_size=2XB",), "max_shard_size: size '2XB'"),
    (("--config.chunk=-3",), "chunk=-3"),
])
def test_merge_size_options_are_checked_before_work(zoo, tmp_path, extra, words):
  out = tmp_path / "out"
  p = launch(*merge_cmd(zoo, out, *extra))
  assert p.returncode == 2 and words in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
  assert not out.exists()


def test_corrupt_adapter_config_is_named(tmp_path):
  from calm_jax.lora import AdapterError, load_adapter
  d = tmp_path / "adapter"
  d.mkdir()
  (d / "adapter_config.json").write_text("{not json")
  with pytest.raises(AdapterError, match=r"adapter_config.json: corrupt adapter config"):
    load_adapter(d)


def test_output_under_a_file_or_read_only_is_refused_before_the_statistics_pass(zoo, tmp_path, monkeypatch):
  base, fts = zoo
  (tmp_path / "afile").write_text("x")
  with pytest.raises(OutputError, match="is not a directory"):
    merging.merge_checkpoints(base, fts, tmp_path / "afile" / "out", "metagpt", progress=False)
  import merging.engine as engine
  stats = []
  monkeypatch.setattr(engine.Merger, "prepare", lambda self: stats.append(1))
  real_access = os.access
  monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path / "ro" else real_access(p, mode))
  (tmp_path / "ro").mkdir()
  with pytest.raises(OutputError, match=r"ro is not writable"):
    merging.merge_checkpoints(base, fts, tmp_path / "ro" / "out", "metagpt", progress=False)
  assert not stats  # refused before any reading


def test_a_full_disk_is_one_line_naming_the_output(zoo, tmp_path):
  """ENOSPC while the merge writes (simulated: the shard file's write fails as a full disk's does)."""
  out = tmp_path / "out"
  code = ("import errno, runpy, sys\n"
          "from merging import direct_io\n"
          "def full(self, data):\n"
          "  raise OSError(errno.ENOSPC, 'No space left on device')\n"
          "direct_io.DirectFile.write = full\n"
          f"sys.argv = {list(merge_cmd(zoo, out))!r}\n"
          "runpy.run_module('launch.merge', run_name='__main__')\n")
  p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                     env={**ENV, "CALM_JAX_NO_REEXEC": "1"})
  assert p.returncode == 2 and "no space left on the device" in p.stderr and str(out) in p.stderr, p.stderr[-2000:]
  assert "Traceback" not in p.stderr and not out.exists() and not siblings(out)


def test_an_input_shrinking_under_the_merge_is_an_error_naming_it(zoo, tmp_path):
  import shutil
  base, fts = zoo
  victim = shutil.copytree(fts[2], tmp_path / "victim")
  shard = sorted(victim.glob("*.safetensors"))[-1]
  out, ready = tmp_path / "out", tmp_path / "ready"
  cmd = list(merge_cmd(zoo, out, config=METAGPT))  # a statistics pass reads every tensor first
  cmd[3] = f"--config.models={fts[0]},{fts[1]},{victim}"
  proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "kill_driver.py"), "merge-read", str(ready), "--",
                           *cmd], cwd=ROOT, env={**ENV, "CALM_JAX_NO_REEXEC": "1"}, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 120
  while not ready.exists():
    assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
    time.sleep(0.05)
  os.truncate(shard, shard.stat().st_size // 2)  # another job rewrites the checkpoint under the merge
  Path(str(ready) + ".go").touch()
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 2, err[-2000:]
  assert "victim" in err and ("shrank while tensor" in err or "truncated" in err) and "Traceback" not in err
  assert not out.exists()
