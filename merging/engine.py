"""The merge driver shared by the pytree API and the streaming checkpoint merge.

A `Source` names tensors and hands them out one at a time (a pytree in memory, or memory-mapped
safetensors). `plan` validates the inputs (missing / extra tensors, shapes, vocab sizes) before
any arithmetic; `Merger` runs the passes tensor by tensor, so at most one tensor of each model
is live at a time:

  pass 1  (MetaGPT, global TIES)  per-tensor ‖τ_i‖² and magnitude histograms, summed on the host;
  pass 2  (global TIES only)      the low-bit histogram that makes the threshold exact;
  merge                          `kernels.merge_tensor` per selected tensor, the base value otherwise.

With `chunk` (the streaming merge's default), a tensor of more than 2 × chunk entries goes through
the kernels in flat pieces of at most `chunk` entries: the statistics passes always (their results
are sums), the merge pass where the method is elementwise (`KernelSpec.elementwise`) or a TIES
trim per tensor (its thresholds first, by the global search's histogram passes over the pieces;
not DARE, one random stream per tensor). The temporaries (fp32 task vectors, input copies) are
then those of a piece, not of the embedding, which keeps the heap small and warm: fresh pages
cost a page fault and a zero-fill each.

Every pass reads ahead: where the source can (`Source.prefetch`, memory-mapped checkpoints), a
`Prefetcher` thread asks for the inputs of the next tensors while the current one is computed.
"""
from __future__ import annotations

import dataclasses
import threading
from typing import Callable, Iterator, Mapping, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm import tqdm

from merging import kernels
from merging.options import MergeError, MergeOptions
from merging.report import Report
from merging.stats import ThresholdSearch, metagpt_lambdas, ties_rank


ALIGN = 64  # bytes: the host-array alignment XLA's CPU client needs to use the memory as it is
READ_AHEAD = 1 << 30  # bytes of input the `Prefetcher` asks the OS for ahead of the tensor merged (page cache, not RSS)


def is_float(dtype) -> bool:
  """Floating point, bf16 and fp8 included (ml_dtypes' numpy kind is 'V', not 'f')."""
  return bool(jnp.issubdtype(dtype, jnp.floating))


class Source(Protocol):
  """Tensors of a base and T fine-tuned models. Model index -1 is the base."""
  num_models: int

  def names(self, i: int) -> Mapping[str, object]: ...   # keyed by name; the base's in output order
  def shape(self, i: int, name: str) -> tuple: ...
  def dtype(self, i: int, name: str) -> np.dtype: ...
  def get(self, i: int, name: str): ...                    # numpy or jax array
  def where(self, i: int, name: str) -> str: ...           # "tensor X in FILE", for error messages
  def origin(self, i: int) -> str: ...                     # "model 1 (DIR)", for error messages
  def release(self, name: str) -> None: ...                # done with tensor `name` in every model (frees mmap pages)
  # Optional: `prefetch(i, names)` starts reading tensors (consecutive in plan order) ahead of `get` (a
  # hint, called from a thread);
  # `read_ahead(largest)`: how many bytes to read ahead, given the largest tensor's inputs (None: READ_AHEAD).


@dataclasses.dataclass(frozen=True)
class TensorPlan:
  name: str
  shape: tuple
  dtype: np.dtype
  merge: bool
  reason: str | None = None                 # why a tensor keeps the base value
  crops: tuple | None = None                # per model: index tuple cutting it to the base shape, or None
  vocab: dict | None = None                 # vocab-size mismatch details for the report


def _problem_list(problems: list[str]) -> str:
  shown = "\n  ".join(problems[:20])
  more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
  return f"{len(problems)} problem(s):\n  {shown}{more}"


def _vocab_crop(base_shape, shape):
  """Index cutting `shape` down to `base_shape` when they differ along exactly one axis, else None."""
  if len(shape) != len(base_shape):
    return None
  diff = [a for a, (s, b) in enumerate(zip(shape, base_shape)) if s != b]
  if len(diff) != 1:
    return None
  return tuple(slice(0, b) for b in base_shape)


def plan(source: Source, opts: MergeOptions) -> list[TensorPlan]:
  """Checks every tensor's presence and shape in every model; decides what is merged."""
  base_names = list(source.names(-1))
  base_set = set(base_names)
  problems = []
  for i in range(source.num_models):
    names = set(source.names(i))
    problems += [f"missing tensor {n} in {source.origin(i)} (the base has it: {source.where(-1, n)})"
                 for n in base_names if n not in names]
    problems += [f"unexpected {source.where(i, n)} of {source.origin(i)} (the base has no such tensor)"
                 for n in sorted(names - base_set)]
  out = []
  for name in base_names:
    shape, dtype = tuple(source.shape(-1, name)), np.dtype(source.dtype(-1, name))
    crops, vocab, reason = [None] * source.num_models, None, None
    for i in range(source.num_models):
      if name not in source.names(i):
        continue
      s = tuple(source.shape(i, name))
      if s == shape:
        continue
      crop = _vocab_crop(shape, s) if opts.is_vocab(name) else None
      if crop is None:
        problems.append(f"shape mismatch: {source.where(i, name)} has shape {s}, the base's "
                        f"({source.where(-1, name)}) is {shape}")
        continue
      vocab = vocab or {"base_shape": list(shape), "model_shapes": [list(source.shape(j, name))
                                                                  for j in range(source.num_models)
                                                                  if name in source.names(j)]}
      if opts.vocab_policy == "truncate" and any(a < b for a, b in zip(s, shape)):
        problems.append(f"vocab mismatch: {source.where(i, name)} has shape {s}, smaller than the base's "
                        f"{shape}; it cannot be truncated to the base (use vocab_policy='exclude')")
      crops[i] = crop
      if opts.vocab_policy == "exclude":
        reason = "vocab size differs from the base (vocab_policy=exclude: base value kept)"
    if vocab is not None:
      vocab["policy"] = opts.vocab_policy
    if reason is None and not opts.selected(name):
      reason = "not selected by include/exclude"
    if reason is None and not is_float(dtype):
      reason = f"not floating point ({dtype})"
    out.append(TensorPlan(name, shape, dtype, reason is None, reason,
                          tuple(crops) if any(c is not None for c in crops) else None, vocab))
  if problems:
    raise MergeError(f"cannot merge: {_problem_list(problems)}")
  return out


def merge_mesh(mesh) -> Mesh | None:
  """The 1-D mesh ("x") the kernels shard tensors over: None / "" (one device: the default),
  "all" (every device of every host), or a `jax.sharding.Mesh` (its devices, flattened)."""
  if mesh is None or mesh == "" or mesh == 1:
    return None
  if mesh == "all":
    devices = jax.devices()
  elif isinstance(mesh, Mesh):
    devices = list(mesh.devices.flat)
  else:
    raise MergeError(f"mesh={mesh!r}: expected None, 'all' or a jax.sharding.Mesh")
  return None if len(devices) == 1 else Mesh(np.asarray(devices), ("x",))


def _put(x, sharding, size: int):
  """A flat host tensor as a global array of `size` entries split over the mesh, zero-padded past
  x's own size; each device copies only its slice (so every host reads just its part of the memory map)."""
  def shard(idx):
    start, stop, _ = idx[0].indices(size)
    part = np.asarray(x[start:stop])
    if len(part) < stop - start:
      part = np.concatenate([part, np.zeros(stop - start - len(part), part.dtype)])
    return part
  return jax.make_array_from_callback((size,), sharding, shard)


def _accumulate(total, st):
  """Statistics of two pieces of one tensor combined: sums (in fp64 / int64), except "finite" (all)."""
  if isinstance(total, dict):
    return {k: np.logical_and(v, st[k]) if k == "finite" else _accumulate(v, st[k]) for k, v in total.items()}
  total = np.asarray(total)
  return total.astype(np.float64 if total.dtype.kind == "f" else np.int64) + st


def _aligned(x):
  """(y, k): y a view of x's memory from k entries before it, at an `ALIGN`-byte boundary, or (x, 0).

  XLA on the CPU takes a host array without a copy only at such an address, and tensors in a
  safetensors file sit wherever its header ends (the 0.48B benchmark's: 16 bytes past one). Copying
  every input cost 0.75 s of a 3.6 s cold task-arithmetic merge (memcpy here: 1-2 GB/s); a kernel
  cuts x back out of y (`kernels`, `offsets`), which XLA fuses. Only where the bytes before x are
  part of the same host buffer (the memory map of a file, a direct read's buffer): its root array is
  1-D bytes.
  """
  if not isinstance(x, np.ndarray) or not x.flags.c_contiguous or x.ndim != 1:
    return x, 0
  miss = x.ctypes.data % ALIGN
  if miss == 0 or miss % x.itemsize:
    return x, 0
  root = x
  while isinstance(root.base, np.ndarray):
    root = root.base
  start = x.ctypes.data - root.ctypes.data - miss
  if root.ndim != 1 or root.itemsize != 1 or not root.flags.c_contiguous or start < 0:
    return x, 0
  return root[start: start + miss + x.nbytes].view(x.dtype), miss // x.itemsize


class Prefetcher:
  """One background thread that calls `fetch(batch)` for runs of the items after the one being processed.

  The consumer calls `at(i)` when it starts item i; the thread fetches, in order and once each,
  the items after i while their `size`s (bytes) sum to at most `ahead` (and always item i + 1);
  it never fetches the item the consumer is at or has passed. The budget is in bytes, not items,
  because tensor sizes span four orders of magnitude (norms to embeddings): two items ahead left
  the disk idle behind small tensors (cold cache, 0.48B task arithmetic: merge 8.8-11 s with two
  tensors ahead, 9.3-10.7 s with none, 8.3-8.5 s with 1 GiB into the page cache).

  Items go out in batches (a list of consecutive items per call), so a source can read adjacent
  tensors in one large request: the thread waits until half the budget is free (or the consumer
  needs the next item, or the rest fits) and then passes every item that fits. Fetching is a
  hint: its errors are ignored (the consumer reads, and reports errors, itself). A context
  manager: leaving it stops the thread.
  """

  def __init__(self, fetch: Callable, items: Sequence, size: Callable = lambda item: 1, ahead: int = 2):
    self.fetch, self.items, self.ahead = fetch, items, ahead
    self._end = np.cumsum([0] + [size(item) for item in items])  # _end[j + 1]: bytes of items 0..j
    self._pos, self._stop = 0, False
    self._cv = threading.Condition()
    self._thread = threading.Thread(target=self._run, name="merge-prefetch", daemon=True)

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    with self._cv:
      self._stop = True
      self._cv.notify_all()
    self._thread.join()

  def at(self, i: int) -> None:
    with self._cv:
      self._pos = i
      self._cv.notify_all()

  def _too_far(self, j: int) -> bool:
    return j > self._pos + 1 and self._end[j + 1] - self._end[self._pos + 1] > self.ahead

  def _batch(self, j: int) -> int | None:
    """The end (exclusive) of the batch to fetch from item j now, or None to wait."""
    k = j
    while k < len(self.items) and not self._too_far(k):
      k += 1
    if k > j and (j == self._pos + 1 or k == len(self.items) or 2 * (self._end[k] - self._end[j]) >= self.ahead):
      return k
    return None

  def _run(self) -> None:
    j = 0
    while True:
      with self._cv:
        while True:
          j = max(j, self._pos + 1)  # the consumer reads the items up to its own
          if self._stop or j >= len(self.items):
            return
          k = self._batch(j)
          if k is not None:
            break
          self._cv.wait()
      try:
        self.fetch(self.items[j:k])
      except Exception:
        pass
      j = k


class Merger:
  """Runs the passes over a `Source`; iterate it for (name, merged tensor) in the base's order.

  With a `mesh` (see `merge_mesh`) every tensor is split evenly over the devices and the kernels run
  sharded (XLA partitions the reductions: norms, histograms, sorts); a tensor whose size does not
  divide by the device count (norm vectors, odd sizes) is zero-padded to the next multiple, the
  kernels mask the padding out of their statistics and return the true entries (`kernels`, "Padding";
  such a merged tensor comes back replicated over the mesh). Results equal the single-device ones:
  the kernels are elementwise or per-tensor reductions and the DARE masks are counter-based per
  element. `prefetch` (default on) reads the next tensors' inputs ahead in a background thread
  where the source can (`Prefetcher`).
  """

  def __init__(self, source: Source, opts: MergeOptions, progress: bool = False, mesh=None,
               prefetch: bool = True, chunk: int | None = None):
    self.source, self.opts, self.progress = source, opts, progress
    self.prefetch = prefetch and callable(getattr(source, "prefetch", None))
    self.mesh = merge_mesh(mesh)
    self.chunk = chunk if self.mesh is None else None  # on a mesh each device holds a slice already
    self.sharding = None if self.mesh is None else NamedSharding(self.mesh, P("x"))
    self.plans = plan(source, opts)
    self.report = Report(opts, self.plans)
    self.weights = np.asarray(opts.weights, np.float32)
    self.thresholds = np.zeros(opts.num_models, np.float32)
    self._prepared = False

  def _pieces(self, p: TensorPlan) -> list[slice]:
    """The flat pieces tensor p goes through the kernels in: itself, or (with `chunk`, above 2 ×
    chunk entries, not vocab-cropped) near-equal runs of at most `chunk` entries."""
    size = int(np.prod(p.shape))
    if self.chunk is None or p.crops or size <= 2 * self.chunk:
      return [slice(0, size)]
    step = -(-size // -(-size // self.chunk))
    if self.chunk >= ALIGN:  # every piece as aligned as the tensor (`_aligned`: one compile per length)
      step = min(-(-step // ALIGN) * ALIGN, self.chunk // ALIGN * ALIGN)
    return [slice(a, min(a + step, size)) for a in range(0, size, step)]

  def _stats(self, p: TensorPlan, kernel: Callable, *args, **kw):
    """`kernel`'s statistics of tensor p on the host, summed over its pieces ("finite": all)."""
    total = None
    for piece in self._pieces(p):
      base, models, where = self._inputs(p, piece)
      st = jax.device_get(kernel(base, models, *args, **where, **kw))
      total = st if total is None else _accumulate(total, st)
    return total

  def _tensor_thresholds(self, p: TensorPlan) -> np.ndarray:
    """Per-tensor TIES thresholds of p (each model's k-th largest |τ|, k = max(1, int(d·n)), as
    `kernels.kth_largest`) from the global search's two histogram passes over p's pieces."""
    n = int(np.prod(p.shape))
    search = ThresholdSearch(self.opts.num_models)
    search.add_hi(self._stats(p, kernels.tensor_stats, histogram=True)["hist"], n)
    ranks = [n - max(1, int(d * n)) + 1 if d < 1 else 0 for d in self.opts.kernel.keep]
    bins, rest = search.hi_bins(ranks)
    search.add_lo(self._stats(p, kernels.low_histogram, bins))
    return search.thresholds(ranks, bins, rest)

  def _inputs(self, p: TensorPlan, piece: slice = slice(None)):
    """(base, (model tensors), kernel keywords): cut to the base shape and flattened (the kernels are
    shape-agnostic), or the flat `piece` of that. On one device host arrays go as `_aligned` views
    (keyword `offsets`). On a mesh they are split over the devices, zero-padded to a multiple of the
    device count where their size does not divide (keyword `n`: their true size)."""
    models = []
    for i in range(self.source.num_models):
      x = self.source.get(i, p.name)
      models.append((x[p.crops[i]] if p.crops and p.crops[i] is not None else x).reshape(-1)[piece])
    base = self.source.get(-1, p.name).reshape(-1)[piece]
    if self.sharding is None:
      (base, k), *aligned = map(_aligned, (base, *models))
      offsets = (k, *(j for _, j in aligned))
      return base, tuple(m for m, _ in aligned), {"offsets": offsets} if any(offsets) else {}
    size = -(-base.size // self.mesh.size) * self.mesh.size
    return (_put(base, self.sharding, size), tuple(_put(m, self.sharding, size) for m in models),
            {} if size == base.size else {"n": base.size})

  def _check_finite(self, name, finite) -> None:
    finite = np.asarray(finite)
    if not finite.all():
      bad = [self.source.where(i - 1, name) for i in np.flatnonzero(~finite)]
      raise MergeError(f"NaN or Inf in {'; '.join(bad)}")

  def _check_output(self, p: TensorPlan, nonfinite: int) -> None:
    """A merged (or cast) tensor with NaN / Inf entries is never written: the options made it overflow."""
    if nonfinite:
      opts = self.opts
      dtype = opts.out_dtype or np.dtype(p.dtype).name
      raise MergeError(f"merged tensor {p.name} has {nonfinite} of {int(np.prod(p.shape))} entries NaN or Inf in "
                       f"{dtype} (lam={opts.lam}, weights={list(self.weights)}): the options overflow the "
                       f"output dtype; nothing was written")

  def _fetch(self, plans: list[TensorPlan]) -> None:
    """Reads ahead what processing `plans` reads: every model's tensors, the base's alone where kept."""
    for i in (-1, *range(self.source.num_models)):
      names = [p.name for p in plans if p.merge or i < 0]
      if names:
        self.source.prefetch(i, names)

  def _fetch_bytes(self, p: TensorPlan) -> int:
    """What `_fetch(p)` reads."""
    return int(np.prod(p.shape)) * p.dtype.itemsize * (self.source.num_models + 1 if p.merge else 1)

  def _ahead(self, plans: list[TensorPlan]) -> Iterator[TensorPlan]:
    """`plans` in order, the inputs of the next ones read ahead by a `Prefetcher` thread."""
    if not self.prefetch or len(plans) < 2:
      yield from plans
      return
    budget = getattr(self.source, "read_ahead", lambda largest: None)(max(map(self._fetch_bytes, plans)))
    with Prefetcher(self._fetch, plans, self._fetch_bytes, budget or READ_AHEAD) as ahead:
      for i, p in enumerate(plans):
        ahead.at(i)
        yield p

  def _bar(self, desc, plans=None):
    plans = [p for p in self.plans if p.merge] if plans is None else plans
    return tqdm(self._ahead(plans), desc=desc, total=len(plans), unit="tensor", disable=not self.progress,
                leave=False)

  def prepare(self) -> None:
    """The statistics passes (only for methods that need global statistics)."""
    if self._prepared:
      return
    self._prepared = True
    opts = self.opts
    if not (opts.needs_norms or opts.needs_threshold):
      return
    sq = np.zeros(opts.num_models, np.float64)
    search = ThresholdSearch(opts.num_models) if opts.needs_threshold else None
    for p in self._bar("merge: statistics"):
      st = self._stats(p, kernels.tensor_stats, histogram=search is not None)
      self.source.release(p.name)
      self._check_finite(p.name, st["finite"])
      sq += st["sq"]
      if search is not None:
        search.add_hi(st["hist"], int(np.prod(p.shape)))
    self.report.global_sq_norms(sq)
    if opts.needs_norms:
      lambdas = metagpt_lambdas(sq)
      self.weights = lambdas.astype(np.float32)
      self.report.metagpt(lambdas)
    if search is not None:
      ranks = [ties_rank(search.count, d) for d in opts.density]
      bins, rest = search.hi_bins(ranks)
      for p in self._bar("merge: TIES threshold"):
        search.add_lo(self._stats(p, kernels.low_histogram, bins))
        self.source.release(p.name)
      self.thresholds = search.thresholds(ranks, bins, rest)
      self.report.ties_threshold(self.thresholds, ranks, search.count)

  def merged(self) -> Iterator[tuple[TensorPlan, object]]:
    """The merge pass: (plan, tensor) in the base's order.

    A merged tensor comes flat (reshape it to `plan.shape`; the pytree API does, the streaming
    merge does it on the host copy, for free) and its inputs are already released. A kept tensor
    is the base's value, maybe a view of its memory map: call `done(plan)` once it is used.
    """
    self.prepare()
    opts = self.opts
    # Only DARE's masks use the key: other methods pass one constant key (no per-tensor dispatch).
    key = None if opts.kernel.sparsify == "random" else kernels.tensor_key(opts.seed, "")
    for p in self._bar("merge", self.plans):
      if not p.merge:
        base = self.source.get(-1, p.name)
        if opts.out_dtype and is_float(p.dtype):
          base = base.astype(opts.out_dtype)
          self._check_output(p, int(np.size(base) - np.isfinite(base).sum()))
        yield p, base
        continue
      merged, st = self._merge(p, key)
      self.source.release(p.name)
      self._check_finite(p.name, st["finite"])
      self._check_output(p, int(st["out_nonfinite"]))
      self.report.tensor(p, st)
      yield p, merged

  def _merge(self, p: TensorPlan, key):
    """(p merged, flat; its statistics on the host), in pieces where `_pieces` splits it. `key`:
    None for DARE (per-tensor keys), else the one constant key."""
    opts = self.opts
    spec, thresholds = opts.kernel, self.thresholds
    pieces = self._pieces(p) if spec.elementwise or spec.sparsify == "magnitude" else [slice(None)]
    if len(pieces) > 1 and not spec.elementwise:  # per-tensor TIES trim: the tensor's thresholds first
      spec, thresholds = dataclasses.replace(spec, trim="global"), self._tensor_thresholds(p)
    key = kernels.tensor_key(opts.seed, p.name) if key is None else key
    merged, st = None, None
    for piece in pieces:
      base, models, where = self._inputs(p, piece)
      part, part_st = kernels.merge_tensor(base, models, self.weights, np.float32(opts.lam), thresholds, key,
                                           spec=spec, **where)
      part_st = jax.device_get(part_st)  # the kernel has run: its inputs are not read again
      if len(pieces) == 1:
        return part, part_st
      if merged is None:
        merged = np.empty(int(np.prod(p.shape)), part.dtype)
      merged[piece] = np.asarray(part)
      st = part_st if st is None else _accumulate(st, part_st)
    return merged, st

  def done(self, p: TensorPlan) -> None:
    """The consumer is done with the tensor `merged()` yielded for `p` (frees a kept tensor's pages)."""
    if not p.merge:
      self.source.release(p.name)

  def __iter__(self) -> Iterator[tuple[str, object]]:
    """(name, merged tensor in its shape), in the base's order."""
    for p, tensor in self.merged():
      yield p.name, tensor.reshape(p.shape)
      self.done(p)  # the consumer has used it
