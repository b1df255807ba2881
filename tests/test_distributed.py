"""Multi-process `jax.distributed` on localhost CPU, and the single-host no-op.

Two subprocesses (4 CPU devices each, gloo collectives) form one 8-device mesh; a sharded
forward + gradient of the tiny decoder must equal the single-process result.
"""
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import distributed_worker as W
from calm_jax import distributed
from calm_jax.models import flatten, init_params

pytestmark = pytest.mark.usefixtures("fast_compile")

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 120


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(out_path):
    port = free_port()
    procs, logs = [], []
    for pid in range(2):
        env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
        env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid),
                   JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1", PYTHONPATH=str(ROOT))
        log = open(out_path.with_name(f"process{pid}.log"), "w+")
        procs.append(subprocess.Popen([sys.executable, str(Path(__file__).with_name("distributed_worker.py")),
                                       str(out_path)], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
        logs.append(log)
    # If one process fails, the other would wait for it until JAX's own timeouts (minutes):
    # stop both as soon as either fails, or at the deadline.
    deadline = time.monotonic() + TIMEOUT_S
    timed_out = False
    while any(p.poll() is None for p in procs):
        timed_out = time.monotonic() > deadline
        if timed_out or any(p.poll() not in (None, 0) for p in procs):
            for p in procs:
                if p.poll() is None:
                    p.kill()
            break
        time.sleep(0.2)
    codes = [p.wait() for p in procs]
    texts = []
    for log in logs:
        log.seek(0)
        texts.append(log.read())
        log.close()
    if timed_out:
        pytest.fail(f"two-process run did not finish in {TIMEOUT_S}s:\n" + "\n---\n".join(texts))
    return codes, texts


def test_two_process_sharded_step_matches_single_process(tmp_path):
    out = tmp_path / "result.npz"
    codes, logs = run_two_processes(out)
    assert codes == [0, 0], "\n---\n".join(f"process {i} (exit {c}):\n{log[-4000:]}"
                                           for i, (c, log) in enumerate(zip(codes, logs)))
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
