"""Multi-process `jax.distributed` on localhost CPU, and the single-host no-op.

Two subprocesses (4 CPU devices each, gloo collectives) form one 8-device mesh; a sharded
forward + gradient of the tiny decoder must equal the single-process result.
"""
from pathlib import Path

import jax
import numpy as np
import pytest

import distributed_worker as W
from two_process import failure_message, run_two_processes
from calm_jax import distributed
from calm_jax.models import flatten, init_params

pytestmark = pytest.mark.usefixtures("fast_compile")


@pytest.mark.slow
def test_two_process_sharded_step_matches_single_process(tmp_path):
  out = tmp_path / "result.npz"
  codes, logs = run_two_processes(Path(W.__file__), [out], tmp_path)
  assert codes == [0, 0], failure_message(codes, logs)
  got = dict(np.load(out))

  cfg = W.tiny_config()
  tokens = W.tokens(cfg.vocab_size)
  params = init_params(cfg, 0)
  (loss, logits), grads = jax.jit(W.grad_fn(cfg))(params, tokens)

  np.testing.assert_array_equal(got["tokens"], tokens)  # the batch was reassembled in order
  np.testing.assert_allclose(got["loss"], float(loss), rtol=1e-5)
  np.testing.assert_allclose(got["logits"], np.asarray(logits), rtol=1e-5, atol=1e-5)
  for name, g in flatten(grads).items():
    np.testing.assert_allclose(got[f"grads/{name}"], np.asarray(g), rtol=1e-4, atol=1e-6, err_msg=name)
  local_slices, local_rows, q_embed_shard = got["info"]
  assert (local_slices, local_rows) == (2, 4)  # each process fed half the batch
  assert q_embed_shard == cfg.hidden_size // 2  # q's embed dim split over fsdp=2


def test_single_host_is_a_noop(monkeypatch):
  for var in distributed.ENV_VARS:
    monkeypatch.delenv(var, raising=False)
  assert distributed.detected_cluster() is None
  assert distributed.maybe_initialize_distributed() is False
  assert not jax.distributed.is_initialized()
  assert distributed.is_main_process()
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "1")
  monkeypatch.setenv("JAX_PROCESS_ID", "0")
  assert distributed.maybe_initialize_distributed() is False  # one process: nothing to join


def test_incomplete_environment_is_an_error(monkeypatch):
  for var in distributed.ENV_VARS:
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
  with pytest.raises(ValueError, match=r"JAX_NUM_PROCESSES, JAX_PROCESS_ID missing"):
    distributed.maybe_initialize_distributed()
  monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
  monkeypatch.setenv("JAX_PROCESS_ID", "0")
  with pytest.raises(ValueError, match=r"must be integers"):
    distributed.maybe_initialize_distributed()
