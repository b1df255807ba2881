"""Users' dataset files -> validated `Record`s, each knowing the file and line it came from.

Formats, by extension: `.jsonl` (one JSON object a line, blank lines skipped), `.json` (a list of
objects, or an object with exactly one list-valued key such as {"data": [...]}), `.csv` (a header row;
values stay strings, except that list-valued fields, `messages` and `choices`, are JSON-encoded cells),
and `.parquet` (read with pyarrow). JSONL, JSON and CSV are read with the stdlib so that an error names
the exact line; Parquet and Hub rows are named by their 0-based row index, as pandas and pyarrow count.

A string that is no existing path and looks like a Hugging Face Hub dataset name (`owner/name`, or
`owner/name:config` for a named configuration) is loaded with `datasets.load_dataset(name, config,
split=split or "train")`; that needs the `datasets` package and network access (or its cache).

Two record schemas:

 prompt_answer  {"prompt": str, "answer": str}; field names are configurable (`fields={"prompt":
                "question", "answer": "solution"}`). With `choices` (a non-empty list of non-empty
                strings) the answer may be the correct choice's text or its int index; either becomes
                `label`, and `answer` the choice's text.
 chat           {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]} with at
                least one assistant message, none with empty content.

Both may carry a `domain` string (the MoA / Transformer² label). Every problem is a `DataError` raised
before any record is returned, naming the file, the line (or row) and the field.
"""
from __future__ import annotations

import bisect
import codecs
import csv
import dataclasses
import io
import json
import os
import re
from typing import Any, Iterator, Mapping, NamedTuple

from calm_jax.errors import UserError

__all__ = ["DataError", "Message", "Record", "read_records", "FORMATS", "EXTENSIONS", "ROLES"]

FORMATS = ("auto", "prompt_answer", "chat")
EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")
ROLES = ("system", "user", "assistant")
FIELDS = ("prompt", "answer", "messages", "domain", "choices")  # the keys `fields` may rename
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?$")


class DataError(UserError):
  """A dataset file (or the data config) that cannot be used; the message names file, line and field."""


class Message(NamedTuple):
  """One chat turn."""

  role: str
  content: str


@dataclasses.dataclass(frozen=True)
class Record:
  """One validated example. `source` ("train.jsonl:12") is where it came from, for later error messages.

  prompt_answer records set prompt and answer; chat records set messages. `label` is the index of the
  correct choice when `choices` is set.
  """

  prompt: str | None = None
  answer: str | None = None
  messages: tuple[Message, ...] | None = None
  domain: str | None = None
  choices: tuple[str, ...] | None = None
  label: int | None = None
  source: str = ""

  @property
  def file(self) -> str:
    """The file (or Hub name) part of `source`."""
    return self.source.rsplit(":", 1)[0]


def read_records(path_or_name, *, format: str = "auto", fields: Mapping[str, str] | None = None,
                 split: str | None = None) -> list[Record]:
  """All records of a dataset file or Hub dataset, validated (`DataError` on the first bad one).

  `format`: "auto" (chat if the first record has the messages field, else prompt_answer),
  "prompt_answer" or "chat". `fields`: {our name: the file's name} for prompt, answer, messages,
  domain, choices. `split`: the Hub split (default "train"); local files have none.
  """
  if format not in FORMATS:
    raise DataError(f"unknown data format {format!r}; expected one of {FORMATS}")
  fields = dict(fields or {})
  unknown = sorted(set(fields) - set(FIELDS))
  if unknown:
    raise DataError(f"data fields {unknown} are not known; the fields that can be renamed are {FIELDS}")
  names = {k: str(fields.get(k, k)) for k in FIELDS}
  name = os.fspath(path_or_name)
  rows = _rows(name, split)
  records = []
  schema = format
  for source, row in rows:
    if schema == "auto":
      schema = "chat" if names["messages"] in row else "prompt_answer"
    records.append(_record(row, source, schema, names, csv_cells=name.lower().endswith(".csv")))
  if not records:
    raise DataError(f"{name}: no records (the file is empty)")
  return records


# ---- reading rows: (source, dict) pairs -------------------------------------------------------------


def _rows(name: str, split: str | None) -> list[tuple[str, dict]]:
  if os.path.isdir(name):
    raise DataError(f"{name} is a directory; expected a {', '.join(EXTENSIONS)} file or a Hub dataset name")
  if not os.path.exists(name):
    if name.lower().endswith(EXTENSIONS) or not _HUB_NAME.match(name):
      raise DataError(f"{name}: no such file")
    return list(_hub_rows(name, split))
  if split is not None:
    raise DataError(f"{name}: split={split!r} applies to Hub datasets only; give each split its own file")
  ext = os.path.splitext(name)[1].lower()
  if ext not in EXTENSIONS:
    raise DataError(f"{name}: unknown file extension {ext or '(none)'!r}; expected one of {EXTENSIONS}")
  if ext == ".parquet":
    return list(_parquet_rows(name))
  text = _read_text(name)
  return list({".jsonl": _jsonl_rows, ".json": _json_rows, ".csv": _csv_rows}[ext](name, text))


def _read_text(name: str) -> str:
  """The file as text; non-UTF-8 bytes are an error naming their line."""
  with open(name, "rb") as f:
    data = f.read()
  if data.startswith(codecs.BOM_UTF8):
    data = data[len(codecs.BOM_UTF8):]
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    raise DataError(f"{name}:{line}: not UTF-8 text (byte {data[e.start]:#04x}); save the file as UTF-8") from None


def _jsonl_rows(name: str, text: str) -> Iterator[tuple[str, dict]]:
  for i, line in enumerate(text.split("\n"), start=1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{name}:{i}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
      raise DataError(f"{name}:{i}: the line is a JSON {_kind(row)}, expected an object (one record a line)")
    yield f"{name}:{i}", row


def _json_rows(name: str, text: str) -> Iterator[tuple[str, dict]]:
  try:
    top = json.loads(text)
  except json.JSONDecodeError as e:
    raise DataError(f"{name}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
  if isinstance(top, dict):
    lists = [k for k, v in top.items() if isinstance(v, list)]
    if len(lists) != 1:
      raise DataError(f"{name}: expected a list of records or an object with one list-valued key; "
                      f"found an object with keys {sorted(top)[:8]}")
    key = lists[0]
  elif isinstance(top, list):
    key = None
  else:
    raise DataError(f"{name}: the file is a JSON {_kind(top)}; expected a list of records")
  newlines = [m.start() for m in re.finditer("\n", text)]
  for pos, row in _json_list_items(text, key):
    line = bisect.bisect_left(newlines, pos) + 1
    if not isinstance(row, dict):
      raise DataError(f"{name}:{line}: the record is a JSON {_kind(row)}, expected an object")
    yield f"{name}:{line}", row


def _json_list_items(text: str, key: str | None) -> list[tuple[int, Any]]:
  """(offset, value) of each element of the top-level list, or of the list under top-level `key`.

  The text was already parsed once, so it is valid JSON; this second pass only finds where each
  element starts, for the line numbers in error messages.
  """
  dec = json.JSONDecoder()
  ws = re.compile(r"[ \t\n\r]*")
  i = ws.match(text, 0).end()
  if key is not None:  # walk the object's members up to `key`
    i = ws.match(text, i + 1).end()
    while True:
      k, i = dec.raw_decode(text, i)
      i = ws.match(text, ws.match(text, i).end() + 1).end()  # past ':'
      if k == key:
        break
      _, i = dec.raw_decode(text, i)
      i = ws.match(text, ws.match(text, i).end() + 1).end()  # past ','
  items = []
  i = ws.match(text, i + 1).end()  # past '['
  while text[i] != "]":
    value, end = dec.raw_decode(text, i)
    items.append((i, value))
    i = ws.match(text, end).end()
    if text[i] == ",":
      i = ws.match(text, i + 1).end()
  return items


def _csv_rows(name: str, text: str) -> Iterator[tuple[str, dict]]:
  reader = csv.reader(io.StringIO(text, newline=""), strict=True)
  header, last = None, 0
  try:
    for row in reader:
      start, last = last + 1, reader.line_num  # a quoted cell may span lines: name the row's first
      if not row:
        continue
      if header is None:
        header = row
        dupes = sorted({h for h in header if header.count(h) > 1})
        if dupes:
          raise DataError(f"{name}:{start}: the header repeats the column(s) {dupes}")
        continue
      if len(row) != len(header):
        raise DataError(f"{name}:{start}: the row has {len(row)} values but the header has {len(header)} columns")
      yield f"{name}:{start}", dict(zip(header, row))
  except csv.Error as e:
    raise DataError(f"{name}:{reader.line_num}: not valid CSV ({e})") from None


def _parquet_rows(name: str) -> Iterator[tuple[str, dict]]:
  try:
    import pyarrow.parquet as pq
  except ImportError:
    raise DataError(f"{name}: reading Parquet needs the pyarrow package (pip install pyarrow)") from None
  try:
    rows = pq.read_table(name).to_pylist()
  except Exception as e:  # pyarrow's errors (ArrowInvalid, OSError) for a file that is not Parquet
    raise DataError(f"{name}: not a readable Parquet file ({type(e).__name__}: {_first_line(e)})") from None
  for i, row in enumerate(rows):
    yield f"{name}:row {i}", row


def _hub_rows(name: str, split: str | None) -> Iterator[tuple[str, dict]]:
  repo, _, config = name.partition(":")
  split = split or "train"
  try:
    import datasets

    ds = datasets.load_dataset(repo, config or None, split=split)
  except Exception as e:  # import, network, missing repo/config/split: all one "cannot load" for the user
    raise DataError(f"{name}: not a local file, and loading it as a Hugging Face Hub dataset (split {split!r}) "
                    f"failed: {type(e).__name__}: {_first_line(e)}") from e
  for i, row in enumerate(ds):
    yield f"{name}[{split}]:row {i}", dict(row)


# ---- rows -> records -------------------------------------------------------------------------------


def _record(row: dict, source: str, schema: str, names: dict[str, str], csv_cells: bool) -> Record:
  domain = row.get(names["domain"])
  if domain is not None and not (csv_cells and domain == ""):  # an empty CSV cell: no domain
    _need_str(domain, source, names["domain"], empty_ok=False)
  else:
    domain = None
  if schema == "chat":
    return Record(messages=_messages(row, source, names["messages"], csv_cells), domain=domain, source=source)
  prompt = _need_str(_field(row, source, names["prompt"]), source, names["prompt"], empty_ok=True)
  answer = _field(row, source, names["answer"])
  choices = row.get(names["choices"])
  if choices is None or (csv_cells and choices == ""):
    return Record(prompt=prompt, answer=_need_str(answer, source, names["answer"]), domain=domain, source=source)
  choices, label = _choices(choices, answer, source, names, csv_cells)
  return Record(prompt=prompt, answer=choices[label], domain=domain, choices=choices, label=label, source=source)


def _field(row: dict, source: str, field: str):
  if field not in row:
    have = ", ".join(map(repr, list(row)[:8]))
    raise DataError(f"{source}: missing field {field!r} (the record has {have or 'no fields'}); "
                    "map your column names with data.fields")
  return row[field]


def _need_str(value, source: str, field: str, empty_ok: bool = False) -> str:
  if not isinstance(value, str):
    raise DataError(f"{source}: field {field!r} is a {_kind(value)} ({_short(value)}), expected a string "
                    "(quote it in the file; values are not converted)")
  if not empty_ok and not value.strip():
    raise DataError(f"{source}: field {field!r} is empty")
  return value


def _csv_list(value, source: str, field: str):
  """A list-valued field in a CSV cell is a JSON array; anything else stays what it was (and fails later)."""
  if isinstance(value, str) and value.lstrip().startswith("["):
    try:
      return json.loads(value)
    except json.JSONDecodeError as e:
      raise DataError(f"{source}: field {field!r} is not a valid JSON array ({e.msg})") from None
  return value


def _choices(choices, answer, source: str, names: dict[str, str], csv_cells: bool) -> tuple[tuple[str, ...], int]:
  field = names["choices"]
  if csv_cells:
    choices = _csv_list(choices, source, field)
  if not isinstance(choices, (list, tuple)) or not choices:
    raise DataError(f"{source}: field {field!r} must be a non-empty list of strings, got a {_kind(choices)}")
  for j, c in enumerate(choices):
    _need_str(c, source, f"{field}[{j}]")
  choices = tuple(choices)
  if isinstance(answer, int) and not isinstance(answer, bool):
    if not 0 <= answer < len(choices):
      raise DataError(f"{source}: field {names['answer']!r} is index {answer}, out of range for "
                      f"{len(choices)} choices (0..{len(choices) - 1})")
    return choices, answer
  _need_str(answer, source, names["answer"])
  if answer not in choices:
    raise DataError(f"{source}: field {names['answer']!r} ({_short(answer)}) is not one of the choices "
                    f"{_short(list(choices))}; give the correct choice's text or its 0-based index")
  return choices, choices.index(answer)


def _messages(row: dict, source: str, field: str, csv_cells: bool) -> tuple[Message, ...]:
  messages = _field(row, source, field)
  if csv_cells:
    messages = _csv_list(messages, source, field)
  if not isinstance(messages, (list, tuple)) or not messages:
    raise DataError(f"{source}: field {field!r} must be a non-empty list of messages, got a {_kind(messages)}")
  out = []
  for j, m in enumerate(messages):
    where = f"{field}[{j}]"
    if not isinstance(m, dict):
      raise DataError(f"{source}: field {where!r} is a {_kind(m)}, expected an object with role and content")
    for key in ("role", "content"):
      if key not in m:
        raise DataError(f"{source}: missing field {f'{where}.{key}'!r}")
    role = _need_str(m["role"], source, f"{where}.role")
    if role not in ROLES:
      raise DataError(f"{source}: field {where + '.role'!r} is {role!r}; expected one of {ROLES}")
    content = _need_str(m["content"], source, f"{where}.content", empty_ok=role != "assistant")
    out.append(Message(role, content))
  if not any(m.role == "assistant" for m in out):
    raise DataError(f"{source}: field {field!r} has no assistant message, so nothing would be trained on")
  return tuple(out)


def _kind(value) -> str:
  """The JSON name of a value's type."""
  if value is None:
    return "null"
  if isinstance(value, bool):
    return "boolean"
  if isinstance(value, (int, float)):
    return "number"
  return {str: "string", list: "array", tuple: "array", dict: "object"}.get(type(value), type(value).__name__)


def _short(value, n: int = 60) -> str:
  s = repr(value)
  return s if len(s) <= n else s[: n - 3] + "..."


def _first_line(e: BaseException) -> str:
  s = str(e).strip()
  return s.splitlines()[0] if s else "(no message)"
