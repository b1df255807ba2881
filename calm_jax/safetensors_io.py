"""Streaming, memory-mapped safetensors reader and writer (no torch).

Reader: tensors are numpy views of a read-only memory map, so a tensor costs memory only
when touched. Writer: shards are planned from (name, shape, dtype) up front, so each header is
written first and tensors are then streamed to disk one at a time, in one pass.
Used by `calm_jax.hf` for whole models and by `merging/` for tensor-by-tensor merges (which add
reads and writes past the page cache: `merging/direct_io.py`).
"""
from __future__ import annotations

import json
import math
import mmap
import struct
from pathlib import Path
from typing import Iterable

import ml_dtypes
import numpy as np

from calm_jax.errors import UserError

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


class CheckpointError(UserError):
  """A checkpoint that is missing, corrupt, pickled or does not match what was expected."""


def dtype_code(dtype) -> str:
  dt = np.dtype(dtype)
  if dt not in CODES:
    raise CheckpointError(f"dtype {dt} cannot be stored in safetensors")
  return CODES[dt]


def is_float_code(code: str) -> bool:
  """Whether a safetensors dtype code is a floating-point type (F64 ... F8_E5M2, BF16)."""
  return code.startswith("F") or code == "BF16"


def parse_size(size) -> int:
  """'2GB' / '500MB' / 123 -> bytes (decimal units, as transformers uses); a ValueError naming the
  value for anything else (a typo like '2XB', zero or a negative size)."""
  s = str(size).strip().upper()
  n = None
  for unit, mult in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6),
                     ("KB", 10**3), ("B", 1), ("", 1)):
    if s.endswith(unit):
      try:
        n = int(float(s[: len(s) - len(unit)]) * mult)
      except ValueError:
        continue
      break
  if isinstance(size, bool) or n is None or n < 1:
    raise ValueError(f"size {size!r}: expected a positive byte count or a size like 2GB, 500MB, 64KiB")
  return n


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
    # As the format requires (and the `safetensors` library checks): the tensors tile the data
    # buffer, no two share a byte and none is skipped; else one tensor could read another's bytes.
    at = 0
    for name, (dt, shape, begin) in sorted(self.entries.items(), key=lambda kv: (kv[1][2], math.prod(kv[1][1]))):
      if begin != at:
        what = "overlaps the tensor before it" if begin < at else f"leaves bytes {at}..{begin} unused before it"
        raise CheckpointError(f"{self.path}: tensor {name} (data_offsets start {begin}) {what}: corrupt header")
      at = begin + math.prod(shape) * dt.itemsize
    if self.data_start + at != size:
      raise CheckpointError(f"{self.path}: the header indexes {at} bytes of data, the file holds "
                            f"{size - self.data_start}: corrupt or truncated")
    self._mmap = None

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
    start, end = self.span(name)
    return self._mmap[start: end].view(dt).reshape(shape)

  def span(self, name) -> tuple[int, int]:
    """The tensor's byte range in the file."""
    dt, shape, begin = self.entries[name]
    start = self.data_start + begin
    return start, start + math.prod(shape) * dt.itemsize

  def release(self, name) -> None:
    """Drops the tensor's pages from this process's resident set (they stay in the page cache).

    Streaming consumers call this after each tensor so RSS stays bounded by a few tensors.
    """
    if self._mmap is None or name not in self.entries:
      return
    start, end = self.span(name)
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
      outside = [f for f in files if Path(f).name != f or f in (".", "..")]
      if outside:
        raise CheckpointError(f"{index}: shard file names must be plain names inside {self.dir}, got {outside}")
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


class ShardedWriter:
  """Writes tensors, in the planned order, into HF-named shards plus the index.

  `write(name, array)` must be called once per planned tensor, in order; `close()` writes the
  index (only when there is more than one shard, as transformers does). `open_file(path)` makes
  each shard's file (anything with write and close; default a buffered file).
  """

  def __init__(self, out_dir, specs, max_shard_size="2GB", metadata=None, open_file=None):
    self.open_file = open_file or (lambda path: open(path, "wb"))
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
    self.file = self.open_file(self.dir / self.names[i])
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
