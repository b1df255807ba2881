"""Core 2 trainer: freezing, resume after SIGKILL, sharded step, launch end to end, bad input."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from calm_jax import sharding
from calm_jax.experiment import build_decoder
from calm_jax.tasks import mixture_batches, task_registry
from calm_jax.tokenizers import CharTokenizer
from calm_jax.train import CheckpointMismatchError, NonFiniteError, lm_batch_loss, lm_loss, train
from calm_jax.variables import LoRAParam
from configs.pretrain import get_config

ROOT = Path(__file__).resolve().parents[1]
TOK = CharTokenizer()


def one_device_mesh():
  return sharding.make_mesh([("data", 1), ("fsdp", 1), ("tensor", 1)], devices=jax.devices()[:1])


def batches(c):
  return mixture_batches(c.data.tasks, batch_size=c.batch_size, tokenizer=TOK, seed=c.seed,
                         registry=task_registry(c.data.task_args))[2]


def tiny_config(steps=6, **kw):
  c = get_config("tiny")
  c.steps = steps
  c.log_every = 1
  c.checkpoint.every = 1000
  c.optimizer.warmup_steps = 0
  for k, v in kw.items():
    c[k] = v
  return c


class WithBias(nnx.Module):
  """The decoder plus a trainable logit bias of another Variable type (a stand-in adapter)."""

  def __init__(self, decoder):
    self.decoder = decoder
    self.bias = LoRAParam(jnp.zeros((decoder.config.vocab_size,)), axes=("vocab",))

  def __call__(self, tokens, mask):
    return self.decoder(tokens, mask) + self.bias[...]


def bias_loss(model, batch, rng):
  return lm_loss(model(batch["inputs"], batch["attention_mask"]), batch["targets"], batch["loss_mask"])


def test_freezing_only_the_trainable_type_changes(tmp_path):
  c = tiny_config(steps=5)
  model = WithBias(build_decoder(c.model, TOK, 0))
  before = jax.tree.map(np.array, model.decoder.params())
  batch_fn = batches(c)
  r = train(model, trainable=LoRAParam, loss_fn=bias_loss, batch_fn=batch_fn, config=c, workdir=tmp_path,
            mesh=one_device_mesh(),
            quiet=True)
  after = jax.tree.map(np.array, r.model.decoder.params())
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(a, b)  # bit-identical
  assert np.abs(np.asarray(r.model.bias[...])).max() > 0  # the adapter did train
  # The checkpointed optimizer state holds only the trainable subset: adam's mu and nu of
  # shape [vocab], and nothing shaped like a base weight.
  ckpt_dir = tmp_path / "checkpoints" / "5"
  assert ckpt_dir.exists()
  from calm_jax.train.checkpoint import Checkpointer
  meta = json.loads((tmp_path / "checkpoints" / "meta.json").read_text())
  ck = Checkpointer(tmp_path, every=1, keep=1, meta=meta)
  restored = ck.manager.restore(5)
  opt_leaves = jax.tree.leaves(restored["default"]["opt_state"] if "default" in restored else restored["opt_state"])
  shapes = sorted(np.shape(x) for x in opt_leaves)
  assert shapes.count((TOK.vocab_size,)) == 2 and all(s in ((), (TOK.vocab_size,)) for s in shapes), shapes


def test_every_parameter_trains_or_is_frozen_on_purpose(tmp_path):
  """A parameter type the caller did not name (here the stand-in adapter's LoRAParam, when the base's
  Param trains) is refused by name, as is a frozen regex that freezes nothing; naming it frozen runs."""
  from calm_jax.train import CoverageError, check_coverage
  c = tiny_config(steps=2)
  model = WithBias(build_decoder(c.model, TOK, 0))
  with pytest.raises(CoverageError, match=r"neither trainable \(Param\) nor frozen: bias \(LoRAParam\)"):
    train(model, trainable=nnx.Param, loss_fn=bias_loss, batch_fn=batches(c), config=c, workdir=tmp_path / "a",
          mesh=one_device_mesh(), quiet=True)
  assert not (tmp_path / "a" / "checkpoints").exists()
  check_coverage(model, nnx.Param, frozen=LoRAParam)  # frozen on purpose: fine
  check_coverage(model, LoRAParam)  # the base's Param is frozen by default
  with pytest.raises(CoverageError, match=r"config.frozen regexes \['layers/qq'\] match no trainable parameter"):
    check_coverage(model, nnx.Param, frozen=LoRAParam, frozen_regexes=["layers/qq"])
  with pytest.raises(TypeError, match="nnx.Variable types"):
    check_coverage(model, "LoRAParam")


def test_frozen_regex_keeps_matching_params(tmp_path):
  c = tiny_config(steps=3, frozen=["layers/.*"])
  model = build_decoder(c.model, TOK, 0)
  before = jax.tree.map(np.array, model.params())
  batch_fn = batches(c)
  r = train(model, trainable=nnx.Param, loss_fn=lm_batch_loss, batch_fn=batch_fn, config=c, workdir=tmp_path,
            mesh=one_device_mesh(),
            quiet=True)
  after = jax.tree.map(np.array, r.model.params())
  for name in before["layers"]:
    np.testing.assert_array_equal(before["layers"][name], after["layers"][name])
  assert not np.array_equal(before["embed"], after["embed"])


@pytest.mark.slow  # tens of seconds: kept out of `make test-fast`
def test_sharded_step_matches_one_device(tmp_path):
  c = tiny_config(steps=3)
  batch_fn = batches(c)
  ref = train(build_decoder(c.model, TOK, 0), trainable=nnx.Param, loss_fn=lm_batch_loss, batch_fn=batch_fn, config=c,
              workdir=tmp_path / "one", mesh=one_device_mesh(), quiet=True)
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
  got = train(build_decoder(c.model, TOK, 0), trainable=nnx.Param, loss_fn=lm_batch_loss, batch_fn=batch_fn, config=c,
              workdir=tmp_path / "eight", mesh=mesh, quiet=True)
  q = got.model.layers.q[...]
  assert len(q.sharding.device_set) == 8 and q.sharding.spec != jax.P()  # really sharded
  for a, b in zip(jax.tree.leaves(ref.model.params()), jax.tree.leaves(got.model.params())):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4)
  assert abs(ref.metrics["loss"] - got.metrics["loss"]) < 1e-4


def test_non_finite_loss_stops_with_clear_message(tmp_path):
  c = tiny_config(steps=3)
  batch_fn = batches(c)

  def nan_loss(model, batch, rng):
    loss, m = lm_batch_loss(model, batch, rng)
    return loss * jnp.nan, m

  with pytest.raises(NonFiniteError, match="non-finite metrics at step 1"):
    train(build_decoder(c.model, TOK, 0), trainable=nnx.Param, loss_fn=nan_loss, batch_fn=batch_fn, config=c,
          workdir=tmp_path, mesh=one_device_mesh(), quiet=True)


def test_batch_not_divisible_by_data_axis(tmp_path):
  c = tiny_config(steps=2, batch_size=12)
  mesh = sharding.make_mesh([("data", 8), ("fsdp", 1), ("tensor", 1)])
  with pytest.raises(sharding.ShardingError, match="batch_size 12 is not divisible by the data-parallel size 8"):
    train(build_decoder(c.model, TOK, 0), trainable=nnx.Param, loss_fn=lm_batch_loss, batch_fn=lambda s: None, config=c,
          workdir=tmp_path, mesh=mesh, quiet=True)
  assert not (tmp_path / "checkpoints").exists()


def test_mesh_not_dividing_devices():
  with pytest.raises(sharding.ShardingError, match="do.*not divide|multiply to"):
    sharding.make_mesh([("data", 3), ("fsdp", -1)])


# --- launch.train end to end (subprocesses: a real CLI run on one CPU device) -------------

def run_train(workdir, *overrides, timeout=300):
  cmd = [sys.executable, "-m", "launch.train", "--config=configs/pretrain.py:tiny", f"--workdir={workdir}",
         *overrides]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_launch_train_end_to_end(tmp_path):
  p = run_train(tmp_path / "w")
  assert p.returncode == 0, p.stderr[-3000:]
  w = tmp_path / "w"
  rows = [json.loads(l) for l in (w / "metrics.jsonl").read_text().splitlines()]
  assert rows and rows[-1]["step"] == 30 and np.isfinite(rows[-1]["loss"])
  assert rows[-1]["loss"] < rows[0]["loss"]
  assert (w / "checkpoints" / "30").exists()
  res = json.loads((w / "results.json").read_text())
  assert set(res["accuracy"]) >= {"addition", "reverse", "overall"}
  assert all(0.0 <= v <= 1.0 for v in res["accuracy"].values())
  assert "overall" in p.stdout and "results:" in p.stdout
  assert json.loads((w / "config.json").read_text())["method"] == "pretrain"
  # The base is an HF directory that transformers loads and that gives our logits.
  import torch
  import transformers
  from calm_jax import hf
  ours = hf.load(w / "hf")
  ref = transformers.AutoModelForCausalLM.from_pretrained(w / "hf").eval()
  ids = np.array([[1] + TOK.encode("add:12+7=")])
  with torch.no_grad():
    np.testing.assert_allclose(ref(torch.tensor(ids)).logits.numpy(), np.asarray(ours(ids)), atol=1e-4)


def test_unknown_config_key_fails_before_work(tmp_path):
  p = run_train(tmp_path / "w", "--config.no_such_key=1")
  assert p.returncode != 0
  assert "no_such_key" in p.stderr
  assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_workdir_with_another_models_checkpoint(tmp_path):
  p = run_train(tmp_path / "w", "--config.steps=10")
  assert p.returncode == 0, p.stderr[-2000:]
  (tmp_path / "w" / "results.json").unlink()  # not a finished base: it would be reused
  p = run_train(tmp_path / "w", "--config.model.hidden_size=48")
  assert p.returncode != 0
  assert "belongs to another run" in p.stderr
  assert sorted(os.listdir(tmp_path / "w" / "checkpoints")) == ["10", "meta.json"]  # nothing new


def hf_tensors(d):
  from calm_jax.safetensors_io import CheckpointReader
  r = CheckpointReader(d)
  return {k: np.array(r.get(k)) for k in r.keys()}


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted(tmp_path):
  args = ("--config.steps=40", "--config.checkpoint.every=5", "--config.log_every=5")
  full = run_train(tmp_path / "full", *args)
  assert full.returncode == 0, full.stderr[-2000:]

  killed = tmp_path / "killed"
  cmd = [sys.executable, "-m", "launch.train", "--config=configs/pretrain.py:tiny", f"--workdir={killed}", *args]
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  while not (killed / "checkpoints" / "15").exists():
    assert proc.poll() is None, "the run ended before it could be killed"
    assert time.time() < deadline
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  steps = sorted(int(s) for s in os.listdir(killed / "checkpoints") if s.isdigit())
  assert steps and max(steps) < 40 and not (killed / "hf").exists()

  resumed = run_train(killed, *args)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert f"resumed from" in resumed.stdout
  a, b = hf_tensors(tmp_path / "full" / "hf"), hf_tensors(killed / "hf")
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
