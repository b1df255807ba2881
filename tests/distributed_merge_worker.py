"""One process of the two-process streaming-merge test (started by test_merging_multihost.py).

Joins the job through `maybe_initialize_distributed()`, then runs `merge_checkpoints` with
mesh="all" (the 8 devices of both processes) over the checkpoints in ROOT: every tensor is
split over both hosts, and process 0 writes the output directory.

  python tests/distributed_merge_worker.py ROOT OUT METHOD_JSON
"""
import json
import sys

LOCAL_DEVICES = 4


def main(root, out, options_json):
  import jax
  jax.config.update("jax_num_cpu_devices", LOCAL_DEVICES)
  from calm_jax import distributed
  assert distributed.maybe_initialize_distributed()
  from pathlib import Path

  from merging.stream import merge_checkpoints

  assert (jax.process_count(), jax.device_count()) == (2, 8)
  root = Path(root)
  options = json.loads(options_json)
  merge_checkpoints(root / "base", [root / f"ft{i}" for i in range(3)], out, progress=False, mesh="all", **options)
  assert (Path(out) / "config.json").exists()  # written by process 0, visible to all on return
  print(f"process {jax.process_index()} done", flush=True)


if __name__ == "__main__":
  main(*sys.argv[1:])
