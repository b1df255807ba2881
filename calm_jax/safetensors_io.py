"""Streaming, memory-mapped safetensors reader and writer (no torch).

Reader: tensors are numpy views of a read-only memory map, so a tensor costs memory only
when touched. Writer: shards are planned from (name, shape, dtype) up front, so each header is
written first and tensors are then streamed to disk one at a time, in one pass.
Used by `calm_jax.hf` for whole models and by `merging/` for tensor-by-tensor merges, which
read ahead (`SafetensorsFile.prefetch`) and write behind (`BackgroundWriter`) the tensor they compute.
"""
from __future__ import annotations

import functools
import json
import math
import mmap
import os
import struct
import threading
import weakref
from pathlib import Path
from typing import Iterable, Iterator

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
CODES = {v: k for k, v in DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Files copied from a source HF directory when saving a derived model (`calm_jax.hf`, the merge).
AUX_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
             "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "char_tokenizer.json",
             "generation_config.json", "task_settings.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
MAX_HEADER = 100 * 1024 * 1024
MIN_READAHEAD = 128 << 10   # Linux's default read-ahead window (read_ahead_kb = 128)


@functools.lru_cache(maxsize=None)
def _readahead_bytes(dev: int) -> int:
  """The most one WILLNEED hint reads on block device `dev`.

  Linux caps each hint at max(read-ahead window, largest request) (`force_page_cache_ra`), so a
  tensor is hinted in chunks of that size: larger chunks would be cut short, smaller ones cost
  more syscalls and requests. Read from sysfs; the default window where the device is unknown
  (overlayfs, tmpfs, not Linux).
  """
  dev_dir = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
  for queue in (dev_dir / "queue", dev_dir / ".." / "queue"):  # a disk, or a partition's disk
    try:
      kb = max(int((queue / f).read_text()) for f in ("read_ahead_kb", "max_sectors_kb"))
    except (OSError, ValueError):
      continue
    return min(max(kb << 10, MIN_READAHEAD), 64 << 20)
  return MIN_READAHEAD


class CheckpointError(ValueError):
  """A checkpoint that is missing, corrupt, pickled or does not match what was expected."""


def dtype_code(dtype) -> str:
  dt = np.dtype(dtype)
  if dt not in CODES:
    raise CheckpointError(f"dtype {dt} cannot be stored in safetensors")
  return CODES[dt]


def parse_size(size) -> int:
  """'2GB' / '500MB' / 123 -> bytes (decimal units, as transformers uses)."""
  if isinstance(size, int):
    return size
  s = str(size).strip().upper()
  for unit, mult in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6),
                     ("KB", 10**3), ("B", 1)):
    if s.endswith(unit):
      return int(float(s[: -len(unit)]) * mult)
  return int(s)


class SafetensorsFile:
  """One .safetensors file: validated header, tensors as memory-mapped numpy arrays."""

  def __init__(self, path):
    self.path = Path(path)
    try:
      size = self.path.stat().st_size
    except FileNotFoundError:
      raise CheckpointError(f"{self.path}: file not found") from None
    with open(self.path, "rb") as f:
      head = f.read(8)
      if len(head) < 8:
        raise CheckpointError(f"{self.path}: truncated (no safetensors header)")
      (n,) = struct.unpack("<Q", head)
      if n > MAX_HEADER or 8 + n > size:
        raise CheckpointError(f"{self.path}: corrupt or truncated safetensors header (header size {n}, file size {size})")
      try:
        header = json.loads(f.read(n))
      except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{self.path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
      raise CheckpointError(f"{self.path}: corrupt safetensors header (not a JSON object)")
    self.metadata = header.pop("__metadata__", None) or {}
    self.data_start = 8 + n
    self.entries = {}
    for name, e in header.items():
      code = e.get("dtype") if isinstance(e, dict) else None
      if code not in DTYPES:
        raise CheckpointError(f"{self.path}: tensor {name} has unsupported dtype {code!r}")
      try:
        shape = tuple(int(d) for d in e["shape"])
        begin, end = (int(x) for x in e["data_offsets"])
      except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{self.path}: tensor {name}: corrupt header entry {json.dumps(e)}") from None
      if min(shape, default=0) < 0 or not 0 <= begin <= end:
        raise CheckpointError(f"{self.path}: tensor {name}: corrupt header entry {json.dumps(e)}")
      if end - begin != math.prod(shape) * DTYPES[code].itemsize:
        raise CheckpointError(f"{self.path}: tensor {name}: byte range {end - begin} does not fit shape {shape} {code}")
      if self.data_start + end > size:
        raise CheckpointError(f"{self.path}: truncated: tensor {name} ends at byte {self.data_start + end}, "
                              f"file has {size}")
      self.entries[name] = (DTYPES[code], shape, begin)
    self._mmap = None
    self._direct = None  # O_DIRECT descriptor once opened; -1 where the file system refuses it

  def keys(self) -> list[str]:
    return list(self.entries)

  def shape(self, name) -> tuple[int, ...]:
    return self.entries[name][1]

  def dtype(self, name) -> np.dtype:
    return self.entries[name][0]

  def get(self, name) -> np.ndarray:
    """A read-only view of the tensor (no copy)."""
    if name not in self.entries:
      raise CheckpointError(f"{self.path}: no tensor {name}")
    if self._mmap is None:
      self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
    dt, shape, _ = self.entries[name]
    start, end = self._span(name)
    return self._mmap[start: end].view(dt).reshape(shape)

  def _span(self, name) -> tuple[int, int]:
    """The tensor's byte range in the file."""
    dt, shape, begin = self.entries[name]
    start = self.data_start + begin
    return start, start + math.prod(shape) * dt.itemsize

  def prefetch(self, name) -> None:
    """Asks the OS to read the tensor's bytes into the page cache, and returns without waiting.

    A hint for streaming consumers, called from a background thread for the tensors after the
    one being processed, so the disk reads them meanwhile (`posix_fadvise(WILLNEED)`, which
    releases the GIL; a no-op where it does not exist). The pages land in the page cache, not in
    this process's resident set (they are mapped when `get`'s view is read).
    """
    if name not in self.entries or not hasattr(os, "posix_fadvise"):
      return
    start, end = self._span(name)
    fd = os.open(self.path, os.O_RDONLY)
    try:
      chunk = _readahead_bytes(os.fstat(fd).st_dev)
      for off in range(start, end, chunk):
        os.posix_fadvise(fd, off, min(chunk, end - off), os.POSIX_FADV_WILLNEED)
    finally:
      os.close(fd)

  def in_page_cache(self, name) -> bool:
    """Whether the tensor's bytes look resident in the page cache: three probe reads (start,
    middle, end) that may not wait for the disk (RWF_NOWAIT) all succeed. False where unsupported."""
    if name not in self.entries or not hasattr(os, "RWF_NOWAIT"):
      return False
    start, end = self._span(name)
    probe = bytearray(1)
    fd = os.open(self.path, os.O_RDONLY)
    try:
      for at in {start, (start + end) // 2, max(start, end - 1)}:
        if os.preadv(fd, [probe], at, os.RWF_NOWAIT) != 1:
          return False
      return True
    except OSError:  # EAGAIN: not resident; EOPNOTSUPP: the file system cannot tell
      return False
    finally:
      os.close(fd)

  def read_direct(self, name) -> np.ndarray | None:
    """The tensor read past the page cache (O_DIRECT) into a new aligned array; None where the file
    system refuses O_DIRECT (then read `get`'s memory map).

    For streaming consumers that read each byte once: on the 2-core benchmark VM, reading the 0.48B
    merge benchmark's inputs (cold) took 4.3-4.5 s this way against 6.9-8.1 s through the page cache.
    """
    got = self.read_direct_run([name])
    return None if got is None else got[name]

  def read_direct_run(self, names) -> dict[str, np.ndarray] | None:
    """Tensors stored one after the other (`CheckpointReader.runs`) read past the page cache in one
    request, as views of one aligned buffer (freed once no view is left); None as `read_direct`.
    Large requests are what a disk is fast at: four threads reading the benchmark inputs moved
    0.9-1.0 GB/s in 8 MB requests, 1.6-2.2 GB/s in 64 MB ones."""
    if self._direct is None:
      try:
        self._direct = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
        weakref.finalize(self, os.close, self._direct)
      except (OSError, AttributeError):
        self._direct = -1
    if self._direct < 0 or not names or any(n not in self.entries for n in names):
      return None
    start, end = self._span(names[0])[0], max(self._span(n)[1] for n in names)
    lo, hi = start // DirectFile.BLOCK * DirectFile.BLOCK, -(-end // DirectFile.BLOCK) * DirectFile.BLOCK
    raw = np.empty(hi - lo + DirectFile.BLOCK, np.uint8)
    skip = -raw.ctypes.data % DirectFile.BLOCK
    buf, got = raw[skip: skip + hi - lo], 0
    try:
      while got < end - lo:
        n = os.preadv(self._direct, [memoryview(buf[got:])], lo + got)
        if n <= 0:
          raise CheckpointError(f"{self.path}: truncated while reading tensor {names[0]}")
        got += n
    except OSError:  # EINVAL: O_DIRECT opened but not supported for reads here
      self._direct = -1
      return None
    out = {}
    for name in names:
      (a, b), (dt, shape, _) = self._span(name), self.entries[name]
      out[name] = buf[a - lo: b - lo].view(dt).reshape(shape)
    return out

  def release(self, name) -> None:
    """Drops the tensor's pages from this process's resident set (they stay in the page cache).

    Streaming consumers call this after each tensor so RSS stays bounded by a few tensors.
    """
    if self._mmap is None or name not in self.entries:
      return
    start, end = self._span(name)
    page = mmap.PAGESIZE
    lo, hi = (start // page) * page, -(-end // page) * page
    hi = min(hi, len(self._mmap))
    if hi > lo and hasattr(self._mmap._mmap, "madvise"):
      self._mmap._mmap.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


class CheckpointReader:
  """All tensors of an HF model directory: `model.safetensors`, or shards + index."""

  def __init__(self, model_dir):
    self.dir = Path(model_dir)
    if not self.dir.is_dir():
      raise CheckpointError(f"{self.dir}: not a directory")
    index = self.dir / INDEX_NAME
    if index.exists():
      try:
        weight_map = json.loads(index.read_bytes())["weight_map"]
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
          raise TypeError("weight_map must map tensor names to file names")
      except (ValueError, KeyError, TypeError, AttributeError) as e:  # ValueError: bad JSON or UTF-8
        raise CheckpointError(f"{index}: corrupt index ({type(e).__name__}: {e})") from None
      files = sorted(set(weight_map.values()))
    elif (self.dir / SINGLE_NAME).exists():
      weight_map, files = None, [SINGLE_NAME]
    else:
      found = sorted(p.name for p in self.dir.glob("*.safetensors"))
      pickled = sorted(p.name for p in self.dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
      if not found and pickled:
        raise CheckpointError(f"{self.dir}: only pickled weights ({', '.join(pickled)}); pickled checkpoints are "
                              "refused (convert them to safetensors first)")
      if not found:
        raise CheckpointError(f"{self.dir}: no safetensors weights found")
      weight_map, files = None, found
    self.files = {f: SafetensorsFile(self.dir / f) for f in files}
    self.location: dict[str, str] = {}
    for f, st in self.files.items():
      for name in st.keys():
        if name in self.location:
          raise CheckpointError(f"{self.dir}: tensor {name} appears in both {self.location[name]} and {f}")
        self.location[name] = f
    if weight_map is not None:
      for name, f in weight_map.items():
        if self.location.get(name) != f:
          raise CheckpointError(f"{index}: tensor {name} is listed in {f} but is not stored there")

  def keys(self) -> list[str]:
    return list(self.location)

  def __contains__(self, name) -> bool:
    return name in self.location

  def file_of(self, name) -> Path:
    return self.dir / self.location[name]

  def shape(self, name):
    return self.files[self.location[name]].shape(name)

  def dtype(self, name):
    return self.files[self.location[name]].dtype(name)

  def get(self, name) -> np.ndarray:
    if name not in self.location:
      raise CheckpointError(f"{self.dir}: missing tensor {name}")
    return self.files[self.location[name]].get(name)

  def prefetch(self, name) -> None:
    if name in self.location:
      self.files[self.location[name]].prefetch(name)

  def read_direct_run(self, names) -> dict[str, np.ndarray] | None:
    """`SafetensorsFile.read_direct_run` of a run from `runs`."""
    return self.files[self.location[names[0]]].read_direct_run(names) if names[0] in self.location else None

  def runs(self, names, max_bytes: int, max_gap: int = 1 << 20) -> list[list[str]]:
    """`names` (in order) cut into runs that one read can fetch: tensors of one file, each starting
    at most `max_gap` bytes after the previous one ends, at most `max_bytes` from the first byte
    to the last (a bigger tensor is a run alone). Unknown names are left out."""
    out, prev = [], None
    for name in names:
      if name not in self.location:
        continue
      f = self.files[self.location[name]]
      start, end = f._span(name)
      if prev and prev[0] is f and 0 <= start - prev[2] <= max_gap and end - prev[1] <= max_bytes:
        out[-1].append(name)
        prev = (f, prev[1], end)
      else:
        out.append([name])
        prev = (f, start, end)
    return out

  def in_page_cache(self, name) -> bool:
    return name in self.location and self.files[self.location[name]].in_page_cache(name)

  def release(self, name) -> None:
    if name in self.location:
      self.files[self.location[name]].release(name)

  def nbytes(self) -> int:
    return sum(math.prod(s.shape(n)) * s.dtype(n).itemsize for s in self.files.values() for n in s.keys())


def plan_shards(specs: Iterable[tuple[str, tuple, np.dtype]], max_shard_bytes: int) -> list[list[tuple]]:
  """Greedy split of tensors, in order, into shards of at most max_shard_bytes (a bigger tensor gets its own)."""
  shards, cur, cur_bytes = [], [], 0
  for name, shape, dtype in specs:
    nb = math.prod(shape) * np.dtype(dtype).itemsize
    if cur and cur_bytes + nb > max_shard_bytes:
      shards.append(cur)
      cur, cur_bytes = [], 0
    cur.append((name, tuple(shape), np.dtype(dtype)))
    cur_bytes += nb
  if cur or not shards:
    shards.append(cur)
  return shards


class DirectFile:
  """A new file written past the page cache (O_DIRECT), for outputs this process never reads back.

  Through the page cache every output page is allocated, zero-filled or copied into and kept
  until the kernel writes it back: in the 0.48B-parameter benchmark merge, `write` took 22% of the
  CPU time (copy_folio_from_iter_atomic). Here bytes go into one page-aligned staging buffer that
  is written out in whole blocks (the device DMAs from it); `close` writes the zero-padded last
  block and truncates the file to its true size. Where the file system refuses O_DIRECT (tmpfs,
  some FUSE or network mounts: the open or a probe write fails), it is an ordinary buffered file
  (`direct` False); the bytes on disk are the same either way.
  """
  BLOCK = 4096  # a multiple of every device's logical block size in use

  def __init__(self, path, buffer_bytes: int = 8 << 20):
    self.path, self.size, self.fill = Path(path), 0, 0
    self.direct, self.fd = False, None
    if hasattr(os, "O_DIRECT"):
      try:
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        self.buf = mmap.mmap(-1, max(self.BLOCK, buffer_bytes // self.BLOCK * self.BLOCK))
        os.pwrite(self.fd, memoryview(self.buf)[:self.BLOCK], 0)  # the probe: EINVAL where unsupported
        self.direct = True
      except OSError:
        if self.fd is not None:
          os.close(self.fd)
          self.fd = None
    if not self.direct:
      self.file = open(self.path, "wb")
    else:
      self.view = memoryview(self.buf)

  def write(self, data) -> None:
    data = memoryview(data).cast("B")
    self.size += len(data)
    if not self.direct:
      self.file.write(data)
      return
    while len(data):
      n = min(len(data), len(self.buf) - self.fill)
      self.view[self.fill:self.fill + n] = data[:n]
      self.fill, data = self.fill + n, data[n:]
      if self.fill == len(self.buf):
        self._flush(self.fill)

  def _flush(self, n: int) -> None:
    """Writes the first n bytes of the staging buffer (n a multiple of BLOCK) at the file's end."""
    done = 0
    while done < n:
      w = os.write(self.fd, self.view[done:n])
      if w <= 0 or w % self.BLOCK:
        raise OSError(f"{self.path}: short direct write ({w} of {n - done} bytes)")
      done += w
    self.fill = 0

  def close(self) -> None:
    if not self.direct:
      self.file.close()
      return
    if self.fd is None:
      return
    try:
      if self.fill:
        padded = -(-self.fill // self.BLOCK) * self.BLOCK
        self.view[self.fill:padded] = bytes(padded - self.fill)
        self._flush(padded)
      os.ftruncate(self.fd, self.size)
    finally:
      os.close(self.fd)
      self.fd = None
      self.view.release()
      self.buf.close()


class ShardedWriter:
  """Writes tensors, in the planned order, into HF-named shards plus the index.

  `write(name, array)` must be called once per planned tensor, in order; `close()` writes the
  index (only when there is more than one shard, as transformers does). Shards are `DirectFile`s
  (past the page cache) unless `direct=False`.
  """

  def __init__(self, out_dir, specs, max_shard_size="2GB", metadata=None, direct: bool = True):
    self.direct = direct
    self.dir = Path(out_dir)
    self.metadata = {"format": "pt", **(metadata or {})}
    self.shards = plan_shards(specs, parse_size(max_shard_size))
    n = len(self.shards)
    self.names = [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    self.order = [(i, s) for i, shard in enumerate(self.shards) for s in shard]
    self.pos = 0
    self.file = None
    self.weight_map: dict[str, str] = {}
    self.total = 0

  def _open(self, i):
    header, off = {}, 0
    for name, shape, dt in self.shards[i]:
      nb = math.prod(shape) * dt.itemsize
      header[name] = {"dtype": dtype_code(dt), "shape": list(shape), "data_offsets": [off, off + nb]}
      off += nb
    header["__metadata__"] = self.metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    self.file = DirectFile(self.dir / self.names[i]) if self.direct else open(self.dir / self.names[i], "wb")
    self.file.write(struct.pack("<Q", len(blob)) + blob)
    self.shard_index = i

  def write(self, name, array) -> None:
    if self.pos >= len(self.order):
      raise CheckpointError(f"unexpected tensor {name}: all planned tensors are written")
    i, (want, shape, dt) = self.order[self.pos]
    arr = np.asarray(array)
    if name != want or arr.shape != shape or arr.dtype != dt:
      raise CheckpointError(f"writer expected tensor {want} {shape} {dt}, got {name} {arr.shape} {arr.dtype}")
    if self.file is None or self.shard_index != i:
      if self.file is not None:
        self.file.close()
      self._open(i)
    self.file.write(np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data)  # no copy
    self.weight_map[name] = self.names[i]
    self.total += arr.nbytes
    self.pos += 1

  def close(self) -> None:
    if self.pos != len(self.order):
      missing = [s[0] for _, s in self.order[self.pos:]]
      raise CheckpointError(f"writer closed with {len(missing)} tensors unwritten: {missing[:5]}")
    if self.file is not None:
      self.file.close()
      self.file = None
    if len(self.names) > 1:
      index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(self.weight_map.items()))}
      (self.dir / INDEX_NAME).write_text(json.dumps(index, indent=2))

  def __enter__(self):
    return self

  def __exit__(self, exc_type, *a):
    if exc_type is None:
      self.close()
    elif self.file is not None:
      self.file.close()


class BackgroundWriter:
  """Runs `writer.write` (a `ShardedWriter`) in one background thread, so the caller computes
  tensor i + 1 while tensor i goes to disk.

  One tensor at most is in flight: `write` first waits for the previous one (re-raising its error
  in the caller), so memory holds one output tensor more than a serial writer. The array handed
  over must be host memory that nobody modifies afterwards (numpy); `then()`, if given, runs in
  the thread once it is written (e.g. frees the input pages it was read from). Leaving the `with`
  block waits for the write in flight and, on a normal exit, re-raises its error; on an error in
  the caller it only waits, so that nothing writes into the output directory while an
  atomic-output wrapper removes it. `threaded=False` writes inline (the serial reference).
  """

  def __init__(self, writer, threaded: bool = True):
    self.writer = writer
    self._job = None      # (name, array, then) handed to the thread, None once written
    self._error = None    # what the last job raised, re-raised by `wait`
    self._stop = False
    self._cv = threading.Condition()
    self._thread = None
    if threaded:
      self._thread = threading.Thread(target=self._run, name="safetensors-writer", daemon=True)
      self._thread.start()

  def _run(self) -> None:
    while True:
      with self._cv:
        while self._job is None and not self._stop:
          self._cv.wait()
        if self._job is None:
          return
        name, array, then = self._job
      error = None
      try:
        self.writer.write(name, array)
        if then is not None:
          then()
      except BaseException as e:  # handed to the caller
        error = e
      name = array = then = None  # free the tensor now, not when the next one arrives
      with self._cv:
        self._job, self._error = None, error
        self._cv.notify_all()

  def wait(self) -> None:
    """Waits for the write in flight; re-raises its error."""
    with self._cv:
      while self._job is not None:
        self._cv.wait()
      error, self._error = self._error, None
    if error is not None:
      raise error

  def write(self, name, array, then=None) -> None:
    if self._thread is None:
      self.writer.write(name, array)
      if then is not None:
        then()
      return
    self.wait()
    with self._cv:
      self._job = (name, array, then)
      self._cv.notify_all()

  def close(self) -> None:
    """Waits for the last write (re-raising its error) and ends the thread."""
    try:
      self.wait()
    finally:
      self._end()

  def _end(self) -> None:
    if self._thread is not None:
      with self._cv:
        self._stop = True
        self._cv.notify_all()
      self._thread.join()
      self._thread = None

  def __enter__(self):
    return self

  def __exit__(self, exc_type, *a):
    if exc_type is None:
      self.close()
      return
    try:
      self.wait()
    except BaseException:
      pass  # the caller's error wins
    finally:
      self._end()


def iter_tensors(reader: CheckpointReader) -> Iterator[tuple[str, np.ndarray]]:
  for name in reader.keys():
    yield name, reader.get(name)
