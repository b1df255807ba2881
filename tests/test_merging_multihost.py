"""A streaming merge run by two `jax.distributed` processes (4 CPU devices each, mesh="all"):
every tensor is split over both hosts, process 0 writes, and the output equals the merge of the
same checkpoints by one process on one device."""
import json
from pathlib import Path

import numpy as np
import pytest

import distributed_merge_worker as W
import merge_zoo
from two_process import failure_message, run_two_processes
from merging.stream import merge_checkpoints

# MetaGPT+TIES: both statistics passes (global norms, global TIES threshold) run across hosts.
# (DARE's per-element counter masks on a mesh are covered on one host in test_merging_mesh.py.)
CASES = {"metagpt_ties": dict(method="metagpt", sparsify="ties", density=0.4)}
# Zoos: every tensor size divides by the 8 devices, or (width 36) the norm vectors do not and run
# zero-padded over both hosts.
ZOOS = {"even": {}, "odd_norms": dict(hidden_size=36, num_attention_heads=2, num_key_value_heads=2)}


@pytest.mark.slow
@pytest.mark.parametrize("zoo", ZOOS)
@pytest.mark.parametrize("case", CASES)
def test_two_host_merge_equals_one_process(tmp_path, case, zoo):
  merge_zoo.make_zoo(tmp_path, **ZOOS[zoo])
  out = tmp_path / "two_hosts"
  codes, logs = run_two_processes(Path(W.__file__), [tmp_path, out, json.dumps(CASES[case])], tmp_path)
  assert codes == [0, 0], failure_message(codes, logs)
  assert "process 1 done" in logs[1]
  ref = merge_checkpoints(tmp_path / "base", [tmp_path / f"ft{i}" for i in range(3)], tmp_path / "one",
                          progress=False, **CASES[case])
  got, want = merge_zoo.read(out), merge_zoo.read(ref)
  assert set(got) == set(want)
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-7, err_msg=name)
  odd = [name for name in want if want[name].size % 8]
  assert len(odd) == (5 if zoo == "odd_norms" else 0), odd  # 2 layers x 2 norms + the final norm
  reports = [json.loads((d / "merge_report.json").read_text()) for d in (out, ref)]
  for key in ("lambdas", "sq_norms", "weights"):
    if key in reports[1]:
      assert reports[0][key] == pytest.approx(reports[1][key], rel=1e-6), key
  assert not list(tmp_path.glob(".two_hosts*"))  # no temporary left behind
