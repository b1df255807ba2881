"""The streaming merge's I/O past the page cache (`merging/direct_io.py`): direct reads of single
tensors and of runs of adjacent tensors equal the memory map, runs are cut where one read cannot
fetch them, and `DirectFile` leaves exactly the bytes written, with or without O_DIRECT."""
import errno
import os

import ml_dtypes
import numpy as np
import pytest

from calm_jax.safetensors_io import ShardedWriter
from merging.direct_io import DirectFile, StreamingReader


def _sample_arrays(rng):
  return {
    "f32": rng.standard_normal((3, 5)).astype(np.float32),
    "f16": rng.standard_normal((7,)).astype(np.float16),
    "bf16": rng.standard_normal((2, 3, 4)).astype(ml_dtypes.bfloat16),
    "i32": rng.randint(-9, 9, (4, 1)).astype(np.int32),
    "scalar": np.array(2.5, np.float32),
    "empty": np.zeros((0, 3), np.float32),
  }


def test_direct_read_equals_the_memory_map(tmp_path):
  """A direct read (O_DIRECT: block-aligned reads, the tensor cut out) gives every tensor exactly as
  the memory map does, at odd offsets, across block boundaries, up to the file's unaligned end; and
  refuses (None) once the file system does. `in_page_cache` sees a file just read as resident."""
  rng = np.random.RandomState(1)
  arrays = {**_sample_arrays(rng), "big": rng.standard_normal((3001,)).astype(np.float32),
            "odd": rng.randint(0, 255, (4099,)).astype(np.uint8), "tail": rng.standard_normal((3,)).astype(np.float16)}
  with ShardedWriter(tmp_path, [(k, a.shape, a.dtype) for k, a in arrays.items()]) as w:
    for k, a in arrays.items():
      w.write(k, a)
  r = StreamingReader(tmp_path)
  path = tmp_path / "model.safetensors"
  assert os.path.getsize(path) % 4096  # the last tensor ends off a block boundary
  for k, a in arrays.items():
    got = r.read_direct_run([k])
    if got is None:  # this file system refuses O_DIRECT: the memory map serves
      assert r._direct[str(path)] == -1
      continue
    got = got[k]
    assert got.dtype == a.dtype and got.shape == a.shape, k
    np.testing.assert_array_equal(got, a, err_msg=k)
  path.read_bytes()
  assert r.in_page_cache("big") == hasattr(os, "RWF_NOWAIT")
  r._direct[str(path)] = -1
  assert r.read_direct_run(["big"]) is None


def test_direct_runs_read_adjacent_tensors_as_the_memory_map_does(tmp_path):
  """`StreamingReader.runs` cuts names into runs of adjacent tensors of one file (a new run at a
  shard boundary, a gap, a byte cap, or a name out of file order); `read_direct_run` gives each
  run's tensors exactly as the memory maps do."""
  rng = np.random.RandomState(2)
  arrays = {f"t{i:02d}": rng.standard_normal((int(rng.randint(1, 1200)),)).astype(np.float32) for i in range(16)}
  sizes = {k: a.nbytes for k, a in arrays.items()}
  with ShardedWriter(tmp_path, [(k, a.shape, a.dtype) for k, a in arrays.items()], max_shard_size=20000) as w:
    for k, a in arrays.items():
      w.write(k, a)
  r = StreamingReader(tmp_path)
  assert len(r.files) > 2
  names = list(arrays)
  runs = r.runs(names, max_bytes=1 << 30)
  assert [n for run in runs for n in run] == names
  assert [len({r.location[n] for n in run}) for run in runs] == [1] * len(runs)  # one file each
  assert len(runs) == len(r.files)  # adjacent within a shard: one run per shard
  capped = r.runs(names, max_bytes=max(sizes.values()) + 1)
  assert all(len(run) == 1 or sum(sizes[n] for n in run) <= max(sizes.values()) + 1 for run in capped)
  assert len(capped) > len(runs)
  assert [len(run) for run in r.runs(names[::-1], max_bytes=1 << 30)] == [1] * len(names)  # out of order
  a, b, c = next(run for run in runs if len(run) >= 3)[:3]
  assert r.runs([a, c], max_bytes=1 << 30, max_gap=0) == [[a], [c]]  # b's bytes between them
  assert r.runs([a, c], max_bytes=1 << 30) == [[a, c]]
  for run in capped + runs + [[a, c]]:
    got = r.read_direct_run(run)
    if got is None:  # this file system refuses O_DIRECT
      continue
    assert list(got) == run
    for k in run:
      np.testing.assert_array_equal(got[k], arrays[k], err_msg=k)
      np.testing.assert_array_equal(got[k], r.get(k), err_msg=k)


@pytest.mark.parametrize("refuse", [False, True])
def test_direct_file_writes_the_bytes_given(tmp_path, monkeypatch, refuse):
  """`DirectFile` (O_DIRECT through an 8 KiB staging buffer here) leaves exactly the bytes written:
  empty, sub-block, block-sized and buffer-spanning writes, from bytes and numpy views. Where the
  file system refuses O_DIRECT (the probe write fails, as on tmpfs) it is a buffered file."""
  if refuse:
    def pwrite(*a):
      raise OSError(errno.EINVAL, "Invalid argument")
    monkeypatch.setattr(os, "pwrite", pwrite)
  rng = np.random.default_rng(0)
  for k, sizes in enumerate(([], [1], [4096], [4097, 3], [8192, 5], [12345, 20000, 99, 8192 * 3, 0, 7])):
    blobs = [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]
    f = DirectFile(tmp_path / f"f{k}", buffer_bytes=8192)
    for j, b in enumerate(blobs):
      f.write(b.data if j % 2 else b.tobytes())
    f.close()
    assert (tmp_path / f"f{k}").read_bytes() == b"".join(b.tobytes() for b in blobs), sizes
    if refuse or not hasattr(os, "O_DIRECT"):
      assert not f.direct
