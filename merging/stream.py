"""Streaming merge of Hugging Face safetensors checkpoints, tensor by tensor.

Inputs are read tensor by tensor (`StreamingReader`: single file or shards + index), copied into
memory rather than mapped, so a file that shrinks under the merge is an error naming it, not a bus
error; a tensor costs memory only while it is merged, and peak memory is a few tensors (the base,
one per model, fp32 temporaries) plus the write buffer, not the model. Methods with global statistics
(MetaGPT, global TIES trim) read the inputs once more per statistics pass (see `engine`).

The output is an HF directory: config.json and the tokenizer / generation files copied from
the base, sharded safetensors + index, and `merge_report.json`; it is written under a
temporary name and renamed into place, so a failed or killed merge leaves no output directory.

The merge is a pipeline (`pipeline=True`, the default): while tensor i is computed, threads read
the inputs of the tensors after it (`engine.Prefetcher`, every pass) and another writes
tensor i-1 (`BackgroundWriter`), so reading, computing and writing overlap; the result is the
serial one bit for bit.

Several hosts (`jax.distributed`, mesh="all"): every process runs the same merge over the same
input files (a shared filesystem) and reads only its devices' slices of each tensor; merged
tensors are gathered to the hosts and process 0 alone writes the output, which exists for every
process when the call returns.
"""
from __future__ import annotations

import contextlib
import functools
import json
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from calm_jax import malloc
from calm_jax.hub import model_dir
from calm_jax.atomic import atomic_dir, check_output, exclusive
from calm_jax.safetensors_io import AUX_FILES, ShardedWriter, parse_size
from merging.direct_io import BackgroundWriter, DirectFile, StreamingReader
from merging.engine import Merger, is_float
from merging.options import MergeError, resolve_checked

REPORT_NAME = "merge_report.json"
CHUNK = 1 << 22  # entries per piece of a large tensor (16 MB of fp32 temporaries per model)
IO_THREADS = 4  # concurrent direct reads (`CheckpointSource`)
RUN_BYTES = 256 << 20  # the most one direct read fetches (adjacent tensors in one request)


_READING, _CONSUMED = object(), object()


class CheckpointSource:
  """`engine.Source` over HF directories (model -1 is the base).

  With `direct` (the default) read threads read each upcoming tensor that is not in the page
  cache already past it (`StreamingReader.read_direct_run`), into memory that `get` then hands
  out, at most one largest tensor's inputs ahead (that memory counts in RSS); `get` waits for a read in
  flight. Cold inputs of the 0.48B benchmark: 4.3-4.5 s to read this way, 6.9-8.1 s through the page
  cache. A tensor not read ahead (the first, one the merge reached first, one in the page cache)
  is copied from the file when `get` asks for it (`StreamingReader.read`), and where the file system
  refuses O_DIRECT the read-ahead only asks the OS to fill the page cache. Reads are large and concurrent: tensors stored one after the other
  are read in one request (`StreamingReader.runs`), in `io_threads` threads (one file per model
  at once). On the benchmark VM's disk four concurrent 64 MB direct reads moved 1.6-2.2 GB/s, one
  at a time 0.9-1.6 GB/s, four concurrent 8 MB ones 0.9-1.0 GB/s. Call `close` when done.
  """

  def __init__(self, base_dir, model_dirs: Sequence, direct: bool = True, io_threads: int = IO_THREADS):
    self.dirs = [Path(d) for d in model_dirs] + [Path(base_dir)]  # index -1 is the base
    self.readers = [StreamingReader(d) for d in self.dirs]
    self.num_models = len(model_dirs)
    self.direct = direct
    self._read: dict = {}  # (model, name) -> array read ahead, _READING, or _CONSUMED (served from the map)
    self._cv = threading.Condition()
    self._pool = ThreadPoolExecutor(io_threads, thread_name_prefix="merge-read") if direct else None

  def close(self) -> None:
    """Stops the read threads (reads not started are dropped)."""
    if self._pool is not None:
      self._pool.shutdown(wait=True, cancel_futures=True)
      self._pool = None

  def names(self, i):
    return self.readers[i].location

  def shape(self, i, name):
    return self.readers[i].shape(name)

  def dtype(self, i, name):
    return self.readers[i].dtype(name)

  def read_ahead(self, largest: int) -> int | None:
    """Bytes to read ahead, given the largest item's (`engine.Prefetcher`): direct reads land in
    memory, so one largest item (a double buffer: peak RSS stays a few tensors); None, the engine's
    default, for the page cache."""
    return largest if self.direct else None

  def get(self, i, name):
    """Model i's tensor: read ahead, else read now (and kept until `release`: a tensor merged in
    pieces asks for it once per piece)."""
    with self._cv:
      while self._read.get((i, name)) is _READING:
        self._cv.wait()
      x = self._read.setdefault((i, name), _CONSUMED)
    if x is not _CONSUMED:
      return x
    x = self.readers[i].read(name, self._pool)
    with self._cv:
      if self._read.get((i, name)) is _CONSUMED:
        self._read[(i, name)] = x
    return x

  def prefetch(self, i, names):
    """Starts reading model i's tensors `names` (consecutive in the merge's order) ahead: `direct`,
    each run of them stored one after the other in one read, in a read thread; else asks the OS
    to read them into the page cache. A hint that `engine.Prefetcher` calls from its thread."""
    if not (self.direct and self._pool is not None):
      for name in names:
        self.readers[i].prefetch(name)
      return
    with self._cv:
      names = [n for n in names if (i, n) not in self._read]
      self._read.update(((i, n), _READING) for n in names)
    for run in self.readers[i].runs(names, RUN_BYTES):
      try:
        self._pool.submit(self._read_ahead, i, run)
      except RuntimeError:  # closed: the map serves them
        self._settle(i, run, {})

  def _settle(self, i, names, arrays: dict):
    """Hands out what a read thread read (`arrays`, by name); the rest of `names` comes from the map."""
    with self._cv:
      for name in names:
        if self._read.get((i, name)) is _READING:  # else released meanwhile: dropped
          if name in arrays:
            self._read[(i, name)] = arrays[name]
          else:
            del self._read[(i, name)]
      self._cv.notify_all()

  def _read_ahead(self, i, run):
    """A read thread's job: a run of tensors into memory, except those already in the page cache
    (cheaper to map than to read from the disk again) or where O_DIRECT is refused (the map)."""
    reader, arrays = self.readers[i], {}
    try:
      cold = [[]]
      for name in run:
        if reader.in_page_cache(name):
          cold.append([])
        else:
          cold[-1].append(name)
      for part in filter(None, cold):
        arrays.update(reader.read_direct_run(part) or {})
    except Exception:  # a hint: the consumer reads (and reports errors) itself
      pass
    finally:
      self._settle(i, run, arrays)
    for name in run:
      if name not in arrays:
        reader.prefetch(name)

  def origin(self, i):
    return f"{'the base' if i < 0 else f'model {i}'} ({self.dirs[i]})"

  def release(self, name):
    """Drops the tensor, read ahead or mapped, in every model (after it is merged / counted)."""
    with self._cv:
      for i in range(-1, self.num_models):
        self._read.pop((i, name), None)  # one still being read is dropped when it arrives
    for r in self.readers:
      r.release(name)

  def where(self, i, name):
    r = self.readers[i]
    return f"tensor {name} in {r.file_of(name) if name in r else r.dir}"


def _config(d: Path) -> dict:
  path = d / "config.json"
  try:
    return json.loads(path.read_text())
  except FileNotFoundError:
    raise MergeError(f"{path}: not found (every model directory needs its config.json)") from None
  except (ValueError, UnicodeDecodeError) as e:
    raise MergeError(f"{path}: not valid JSON ({e})") from None


def check_architectures(base_dir: Path, model_dirs: Sequence[Path]) -> dict:
  """Same `model_type` (and `architectures`) everywhere; returns the base's config."""
  base = _config(base_dir)
  for d in model_dirs:
    cfg = _config(d)
    for key in ("model_type", "architectures"):
      if cfg.get(key) != base.get(key):
        raise MergeError(f"architecture mismatch: {d / 'config.json'} has {key}={cfg.get(key)!r}, "
                         f"the base ({base_dir / 'config.json'}) has {base.get(key)!r}")
  return base


def to_host(x) -> np.ndarray:
  """The full value of a (possibly multi-host sharded) array on this host; a collective when the
  array spans several processes, so every process must call it."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def merge_checkpoints(base, models: Sequence, out, method: str = "metagpt", *, overwrite: bool = False,
                      max_shard_size="2GB", progress: bool = True, mesh=None, pipeline: bool = True,
                      low_memory: bool | None = None, chunk: int | None = CHUNK, **options) -> Path:
  """Merges HF checkpoint directories `models` onto `base` into the HF directory `out`.

  Options are those of `merging.merge` (method, weights, lam, density, drop_rate, sparsify,
  convention, trim, vote, normalize, rescale, seed, include, exclude, vocab_policy, out_dtype).
  `mesh` ("all" or a `jax.sharding.Mesh`; default one device) shards each tensor over the devices.
  `pipeline=False` reads, computes and writes one tensor after the other (the serial reference;
  same output). `low_memory=True` makes glibc return freed buffers at once: the smallest peak RSS,
  the slowest (`calm_jax.malloc`); None (default): True unless the process started under the
  tuned allocator (`launch.merge` does), which is faster at a small peak RSS already.
  `chunk`: a tensor above 2 × chunk entries goes through the kernels in pieces of at most that
  many (`engine`; None: whole tensors). Returns `out`. Raises `MergeError` / `CheckpointError` on
  bad input before any output exists.
  """
  main = jax.process_index() == 0
  base_dir, model_dirs = model_dir(base), [model_dir(m) for m in models]  # directories, fetched names, Hub ids
  # before any work, on every process, so all fail alike before any collective
  opts = resolve_checked(method, len(model_dirs), options)
  try:
    parse_size(max_shard_size)
  except ValueError as e:
    raise MergeError(f"max_shard_size: {e}") from None
  if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1):
    raise MergeError(f"chunk={chunk!r}: expected a positive number of entries per piece, or None (whole tensors)")
  out = check_output(out, overwrite=overwrite, inputs=[base_dir, *model_dirs])
  with exclusive(out) if main else contextlib.nullcontext():  # a second merge into `out` fails at once
    return _merge(base_dir, model_dirs, out, opts, main, overwrite=overwrite, max_shard_size=max_shard_size,
                  progress=progress, mesh=mesh, pipeline=pipeline, low_memory=low_memory, chunk=chunk)


def _merge(base_dir, model_dirs, out, opts, main, *, overwrite, max_shard_size, progress, mesh, pipeline,
           low_memory, chunk) -> Path:
  method = opts.method
  low_memory = not malloc.is_tuned() if low_memory is None else low_memory
  if low_memory:
    malloc.return_freed_memory()
  base_cfg = check_architectures(base_dir, model_dirs)
  # direct reads allocate in the read-ahead thread: under glibc's defaults that thread's arena keeps
  # what the main thread frees (peak RSS above one model in tests/test_merging_memory.py)
  source = CheckpointSource(base_dir, model_dirs, direct=low_memory or malloc.is_tuned())
  try:
    merger = Merger(source, opts, progress=progress, mesh=mesh, prefetch=pipeline, chunk=chunk)
    merger.report.set_models(model_dirs)
    merger.report.data["base"] = str(base_dir)
    merger.report.data["allocator"] = "low_memory" if low_memory else "tuned" if malloc.is_tuned() else "default"
    merger.report.data["chunk"] = merger.chunk
    merger.prepare()  # statistics passes: before the output directory exists
    out_dtype = merger.opts.out_dtype
    specs = [(p.name, p.shape, np.dtype(out_dtype) if out_dtype and is_float(p.dtype) else p.dtype)
             for p in merger.plans]
    if out_dtype:
      base_cfg["dtype"] = out_dtype
      base_cfg.pop("torch_dtype", None)
    if not main:  # the collectives of every tensor, in the same order as process 0; it writes
      for p, tensor in merger.merged():
        to_host(tensor)
        merger.done(p)
      multihost_utils.sync_global_devices("merge_checkpoints: written")
      return out
    with atomic_dir(out, overwrite=overwrite) as tmp:
      for f in AUX_FILES:
        if (base_dir / f).exists():
          shutil.copy2(base_dir / f, tmp / f)
      (tmp / "config.json").write_text(json.dumps(base_cfg, indent=2))
      # to_host (a collective on several hosts) stays in this thread, in plan order; the writer
      # thread gets host memory, and frees a kept tensor's mapped pages once it is written.
      with ShardedWriter(tmp, specs, max_shard_size, metadata={"merge_method": method},
                         open_file=DirectFile) as writer, \
          BackgroundWriter(writer, threaded=pipeline) as background:
        for p, tensor in merger.merged():
          background.write(p.name, to_host(tensor).reshape(p.shape), then=functools.partial(merger.done, p))
      merger.report.write(tmp / REPORT_NAME)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("merge_checkpoints: written")
    return out
  finally:
    source.close()
