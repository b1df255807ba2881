"""One process of the two-process `jax.distributed` test (started by test_distributed.py).

Joins the job through `maybe_initialize_distributed()` (JAX_COORDINATOR_ADDRESS /
JAX_NUM_PROCESSES / JAX_PROCESS_ID), builds a data=2 x fsdp=2 x tensor=2 mesh over both
processes' 4 CPU devices, runs one sharded forward + gradient of the tiny decoder, and
process 0 writes the gathered loss, logits and gradients to an .npz file.

  python tests/distributed_worker.py OUT.npz
"""
import sys

import numpy as np

LOCAL_DEVICES = 4
MESH = [("data", 2), ("fsdp", 2), ("tensor", 2)]
BATCH, LENGTH = 8, 12


def tiny_config():
  from calm_jax.models import DecoderConfig
  return DecoderConfig.make(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2)


def tokens(vocab_size):
  return np.random.default_rng(0).integers(0, vocab_size, (BATCH, LENGTH)).astype(np.int32)


def grad_fn(cfg):
  """value_and_grad of the next-token loss, with the logits as aux."""
  import jax
  import jax.numpy as jnp
  from calm_jax.models import forward

  def loss(params, toks):
    logits, _ = forward(cfg, params, toks[:, :-1])
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, toks[:, 1:, None], axis=-1)), logits
  return jax.value_and_grad(loss, has_aux=True)


def main(out_path):
  import jax
  jax.config.update("jax_num_cpu_devices", LOCAL_DEVICES)
  from calm_jax import distributed
  assert distributed.maybe_initialize_distributed()
  assert distributed.maybe_initialize_distributed()  # idempotent
  from jax.experimental import multihost_utils

  from calm_jax import sharding as S
  from calm_jax.models import flatten, init_params

  assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 8, LOCAL_DEVICES)
  cfg = tiny_config()
  mesh = S.make_mesh(MESH)
  p_sh, b_sh = S.param_shardings(cfg, mesh), S.batch_sharding(mesh)
  full = tokens(cfg.vocab_size)
  # This process's rows of the global batch, in global order.
  rows = sorted({idx[0].start for idx in b_sh.addressable_devices_indices_map(full.shape).values()})
  per = BATCH // S.data_parallel_size(mesh)
  local = np.concatenate([full[r:r + per] for r in rows])
  with jax.set_mesh(mesh):
    # Every process draws the same host params and places its own shards.
    params = jax.device_put(init_params(cfg, 0), p_sh)
    batch = S.shard_batch({"tokens": local}, mesh)
    step = jax.jit(grad_fn(cfg), in_shardings=(p_sh, b_sh), out_shardings=((None, None), p_sh))
    (loss, logits), grads = step(params, batch["tokens"])
  assert not params["embed"].is_fully_addressable  # really spread over both processes
  # Global (cross-process) arrays gather to their full value with tiled=True.
  gathered = multihost_utils.process_allgather(
    {"loss": loss, "logits": logits, "grads": grads, "tokens": batch["tokens"]}, tiled=True)
  if distributed.is_main_process():
    flat = {f"grads/{k}": v for k, v in flatten(gathered.pop("grads")).items()}
    info = np.array([len(rows), local.shape[0], params["layers"]["q"].addressable_shards[0].data.shape[1]])
    np.savez(out_path, **gathered, **flat, info=info)
  multihost_utils.sync_global_devices("done")
  print(f"process {jax.process_index()} done", flush=True)


if __name__ == "__main__":
  main(sys.argv[1])
