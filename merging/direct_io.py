"""The streaming merge's I/O past the page cache: reads ahead of the tensor being merged and writes
behind it.

`StreamingReader` is the core `CheckpointReader` plus what a consumer that reads each byte once
wants: page-cache hints (`prefetch`), a residency probe (`in_page_cache`), and reads of runs of
adjacent tensors straight from the disk into memory (`runs`, `read_direct_run`, O_DIRECT).
`DirectFile` writes an output past the page cache; `BackgroundWriter` keeps one write in flight
on a thread. Where a file system refuses O_DIRECT each falls back to the ordinary path, with the
same bytes.
"""
from __future__ import annotations

import functools
import mmap
import os
import threading
import weakref
from pathlib import Path

import numpy as np

from calm_jax.safetensors_io import CheckpointError, CheckpointReader, SafetensorsFile

MIN_READAHEAD = 128 << 10   # Linux's default read-ahead window (read_ahead_kb = 128)
BLOCK = 4096  # a multiple of every device's logical block size in use
ALIGN = 64  # where XLA on the CPU takes a host buffer without a copy (merging.engine.ALIGN)
READ_PIECE = 8 << 20  # bytes per request of `StreamingReader.read` on a thread pool


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


class StreamingReader(CheckpointReader):
  """A `CheckpointReader` that can read ahead: hints, residency probes and direct reads of runs."""

  def __init__(self, model_dir):
    super().__init__(model_dir)
    self._direct: dict[str, int] = {}  # file -> O_DIRECT descriptor once opened; -1 where refused

  def _file(self, name) -> SafetensorsFile:
    return self.files[self.location[name]]

  def prefetch(self, name) -> None:
    """Asks the OS to read the tensor's bytes into the page cache, and returns without waiting.

    A hint for the tensors after the one being processed, called from a background thread, so the
    disk reads them meanwhile (`posix_fadvise(WILLNEED)`, which releases the GIL; a no-op where it
    does not exist). The pages land in the page cache, not in this process's resident set.
    """
    if name not in self.location or not hasattr(os, "posix_fadvise"):
      return
    f = self._file(name)
    start, end = f.span(name)
    fd = os.open(f.path, os.O_RDONLY)
    try:
      chunk = _readahead_bytes(os.fstat(fd).st_dev)
      for off in range(start, end, chunk):
        os.posix_fadvise(fd, off, min(chunk, end - off), os.POSIX_FADV_WILLNEED)
    finally:
      os.close(fd)

  def in_page_cache(self, name) -> bool:
    """Whether the tensor's bytes look resident in the page cache: three probe reads (start,
    middle, end) that may not wait for the disk (RWF_NOWAIT) all succeed. False where unsupported."""
    if name not in self.location or not hasattr(os, "RWF_NOWAIT"):
      return False
    f = self._file(name)
    start, end = f.span(name)
    probe = bytearray(1)
    fd = os.open(f.path, os.O_RDONLY)
    try:
      for at in {start, (start + end) // 2, max(start, end - 1)}:
        if os.preadv(fd, [probe], at, os.RWF_NOWAIT) != 1:
          return False
      return True
    except OSError:  # EAGAIN: not resident; EOPNOTSUPP: the file system cannot tell
      return False
    finally:
      os.close(fd)

  def read(self, name, pool=None) -> np.ndarray:
    """The tensor copied from the file (through the page cache) into a new 64-byte-aligned array,
    in `READ_PIECE` pieces on the threads of `pool` when given (several requests in flight).

    Unlike a view of the memory map, a file that shrinks while it is read (another job rewriting a
    checkpoint) gives a `CheckpointError` naming it, not a bus error that kills the process.
    """
    if name not in self.location:
      raise CheckpointError(f"{self.dir}: missing tensor {name}")
    f = self._file(name)
    start, end = f.span(name)
    dt, shape, _ = f.entries[name]
    raw = np.empty(end - start + ALIGN, np.uint8)
    skip = -raw.ctypes.data % ALIGN
    buf = raw[skip: skip + end - start]
    fd = os.open(f.path, os.O_RDONLY)
    try:
      def piece(lo):
        got, hi = lo, min(lo + READ_PIECE, end - start)
        while got < hi:
          n = os.preadv(fd, [memoryview(buf[got:hi])], start + got)
          if n <= 0:
            raise CheckpointError(f"{f.path}: the file shrank while tensor {name} was read (bytes {start}..{end}); "
                                  "is another job rewriting it?")
          got += n
      offsets = range(0, end - start, READ_PIECE)
      if pool is None or len(offsets) < 2:
        for lo in offsets:
          piece(lo)
      else:
        for f_ in [pool.submit(piece, lo) for lo in offsets]:
          f_.result()
    finally:
      os.close(fd)
    return buf.view(dt).reshape(shape)

  def runs(self, names, max_bytes: int, max_gap: int = 1 << 20) -> list[list[str]]:
    """`names` (in order) cut into runs that one read can fetch: tensors of one file, each starting
    at most `max_gap` bytes after the previous one ends, at most `max_bytes` from the first byte
    to the last (a bigger tensor is a run alone). Unknown names are left out."""
    out, prev = [], None
    for name in names:
      if name not in self.location:
        continue
      f = self._file(name)
      start, end = f.span(name)
      if prev and prev[0] is f and 0 <= start - prev[2] <= max_gap and end - prev[1] <= max_bytes:
        out[-1].append(name)
        prev = (f, prev[1], end)
      else:
        out.append([name])
        prev = (f, start, end)
    return out

  def _direct_fd(self, f: SafetensorsFile) -> int:
    key = str(f.path)
    if key not in self._direct:
      try:
        fd = os.open(f.path, os.O_RDONLY | os.O_DIRECT)
        weakref.finalize(self, os.close, fd)
      except (OSError, AttributeError):
        fd = -1
      self._direct[key] = fd
    return self._direct[key]

  def read_direct_run(self, names) -> dict[str, np.ndarray] | None:
    """Tensors stored one after the other (a run of `runs`) read past the page cache in one
    request, as views of one aligned buffer (freed once no view is left); None where the file
    system refuses O_DIRECT (then read `get`'s memory map). Large requests are what a disk is fast
    at: four threads reading the merge benchmark's inputs moved 0.9-1.0 GB/s in 8 MB requests,
    1.6-2.2 GB/s in 64 MB ones."""
    if not names or any(n not in self.location for n in names):
      return None
    f = self._file(names[0])
    fd = self._direct_fd(f)
    if fd < 0:
      return None
    start, end = f.span(names[0])[0], max(f.span(n)[1] for n in names)
    lo, hi = start // BLOCK * BLOCK, -(-end // BLOCK) * BLOCK
    raw = np.empty(hi - lo + BLOCK, np.uint8)
    skip = -raw.ctypes.data % BLOCK
    buf, got = raw[skip: skip + hi - lo], 0
    try:
      while got < end - lo:
        n = os.preadv(fd, [memoryview(buf[got:])], lo + got)
        if n <= 0:
          raise CheckpointError(f"{f.path}: truncated while reading tensor {names[0]}")
        got += n
    except OSError:  # EINVAL: O_DIRECT opened but not supported for reads here
      self._direct[str(f.path)] = -1
      return None
    out = {}
    for name in names:
      (a, b), (dt, shape, _) = f.span(name), f.entries[name]
      out[name] = buf[a - lo: b - lo].view(dt).reshape(shape)
    return out


class DirectFile:
  """A new file written past the page cache (O_DIRECT), for outputs this process never reads back.

  Through the page cache every output page is allocated, zero-filled or copied into and kept
  until the kernel writes it back: in the 0.48B-parameter benchmark merge, `write` took 22% of the
  CPU time (copy_folio_from_iter_atomic). Here bytes go into one page-aligned staging buffer that
  is written out in whole blocks (the device DMAs from it); `close` writes the zero-padded last
  block and truncates the file to its true size. Where the file system refuses O_DIRECT (tmpfs,
  some FUSE or network mounts: the open or a probe write fails), it is an ordinary buffered file
  (`direct` False); the bytes on disk are the same either way. A `ShardedWriter` file factory.
  """

  def __init__(self, path, buffer_bytes: int = 8 << 20):
    self.path, self.size, self.fill = Path(path), 0, 0
    self.direct, self.fd = False, None
    if hasattr(os, "O_DIRECT"):
      try:
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        self.buf = mmap.mmap(-1, max(BLOCK, buffer_bytes // BLOCK * BLOCK))
        os.pwrite(self.fd, memoryview(self.buf)[:BLOCK], 0)  # the probe: EINVAL where unsupported
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
      if w <= 0 or w % BLOCK:
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
        padded = -(-self.fill // BLOCK) * BLOCK
        self.view[self.fill:padded] = bytes(padded - self.fill)
        self._flush(padded)
      os.ftruncate(self.fd, self.size)
    finally:
      os.close(self.fd)
      self.fd = None
      self.view.release()
      self.buf.close()


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
