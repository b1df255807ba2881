"""Users' own dataset files: read and validate (records), tokenize with a loss mask (encoding), and batch as a
pure function of (seed, step) (batches). `load_dataset_config` does all three from a config's `data` block.

  data.train          a .jsonl/.json/.csv/.parquet file or a Hub dataset name (required)
  data.val, data.test  optional files; or data.val_fraction of train, drawn with data.seed
  data.format         "auto", "prompt_answer" or "chat"
  data.fields         {our field name: the file's}, e.g. {"prompt": "question", "answer": "solution"}
  data.chat_template  "auto", True or False

A Hub name's splits are "train", "validation" and "test" for train, val and test.
"""
from __future__ import annotations

import dataclasses
import json
import os

from calm_jax.data.batches import RecordBatches, split_records
from calm_jax.data.encoding import (EncodedRecord, encode_prompt, encode_record, encode_records, prompt_and_reference,
                                    template_tokenizer)
from calm_jax.data.records import DataError, Message, Record, read_records

__all__ = [
  "DataError", "Message", "Record", "read_records",
  "EncodedRecord", "encode_record", "encode_records", "encode_prompt", "prompt_and_reference", "template_tokenizer",
  "RecordBatches", "split_records",
  "DataSplits", "load_dataset_config", "data_identity", "named_files",
]

_HUB_SPLITS = {"train": "train", "val": "validation", "test": "test"}


@dataclasses.dataclass(frozen=True)
class DataSplits:
  """The configured splits ("train", and "val"/"test" where configured) as records and as tokens.

  `domains` (sorted, over all splits) defines the domain ids, so train and val batches agree on them.
  """

  records: dict[str, list[Record]]
  encoded: dict[str, list[EncodedRecord]]
  domains: tuple[str, ...]
  max_len: int
  pad_id: int

  @property
  def seq_len(self) -> int:
    """The longest row of any split (<= max_len), rounded up to a multiple of 8: what batches pad to."""
    longest = max(len(e.ids) for recs in self.encoded.values() for e in recs)
    return min(self.max_len, -(-longest // 8) * 8)

  def batches(self, split: str, batch_size: int, seed: int = 0) -> RecordBatches:
    """`split`'s batches, padded to `seq_len`."""
    if split not in self.encoded:
      raise DataError(f"no {split!r} data is configured (have {sorted(self.encoded)})")
    return RecordBatches(self.encoded[split], batch_size, self.seq_len, self.pad_id, seed, domains=self.domains)


def named_files(value, key: str) -> dict[str, str]:
  """{name: file} of a config mapping (a dict or ConfigDict; JSON objects on the command line, e.g.
  `--config.data.domains='{"math": "m.jsonl"}'`), checked; `key` names the setting in errors."""
  value = value.to_dict() if hasattr(value, "to_dict") else value
  if not isinstance(value, dict):
    raise DataError(f"{key}: expected a mapping {{name: file}} (a JSON object on the command line), got {value!r}")
  out = {str(k): v for k, v in value.items()}
  for name, path in out.items():
    if not isinstance(path, str) or not path:
      raise DataError(f"{key}: the file of {name!r} must be a non-empty path, got {path!r}")
  return out


def data_identity(data_cfg) -> dict:
  """What defines a run's data: the `data` block's settings and a blake2b digest of each local file's bytes
  (a Hub dataset: its name), so that a finished run is reused only for the same data."""
  import hashlib
  cfg = data_cfg.to_dict() if hasattr(data_cfg, "to_dict") else dict(data_cfg)
  out = {f"data.{k}": v for k, v in sorted(cfg.items()) if k != "task_args"}
  for split in ("train", "val", "test"):
    path = cfg.get(split)
    if path and os.path.isfile(os.fspath(path)):
      h = hashlib.blake2b(digest_size=16)
      with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
          h.update(chunk)
      out[f"data.{split}.blake2b"] = h.hexdigest()
  return json.loads(json.dumps(out, default=str))


def load_dataset_config(data_cfg, tokenizer, max_len: int) -> DataSplits:
  """Reads, validates, splits and encodes the files of a `data` config block (a ConfigDict or a dict).

  Every file is read and checked before any is tokenized, so a bad val file fails as fast as a bad train one.
  """
  get = data_cfg.get
  if not get("train"):
    raise DataError("data.train is not set; give a dataset file or a Hub dataset name")
  fmt, fields, seed = get("format", "auto"), dict(get("fields", None) or {}), int(get("seed", 0))
  val_fraction = float(get("val_fraction", 0.0) or 0.0)
  if get("val") and val_fraction:
    raise DataError("data.val and data.val_fraction are both set; give one")
  records = {}
  for split in ("train", "val", "test"):
    path = get(split, None)
    if path:
      hub_split = None if os.path.exists(os.fspath(path)) else _HUB_SPLITS[split]
      records[split] = read_records(path, format=fmt, fields=fields, split=hub_split)
  if val_fraction:
    records["train"], records["val"] = split_records(records["train"], val_fraction, seed)
  chat_template = get("chat_template", "auto")
  encoded = {split: encode_records(recs, tokenizer, chat_template=chat_template, max_len=max_len,
                                   name=f"{get('train')} ({split} part)" if val_fraction and split != "test" else None)
             for split, recs in records.items()}
  domains = tuple(sorted({r.domain for recs in records.values() for r in recs if r.domain is not None}))
  return DataSplits(records, encoded, domains, int(max_len), int(tokenizer.pad_id))
