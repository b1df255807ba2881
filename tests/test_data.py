"""Users' dataset files: reading and validation, loss masks (plain and chat template), truncation, batches."""
import json
import logging
import sys
import types

import ml_collections
import numpy as np
import pytest

from calm_jax.data import (
  DataError,
  Message,
  Record,
  RecordBatches,
  encode_record,
  encode_records,
  load_dataset_config,
  read_records,
  split_records,
)
from calm_jax.tasks import Example, encode_batch
from calm_jax.tokenizers import CharTokenizer, HFTokenizer

TOK = CharTokenizer()
# CharTokenizer ids, by hand: <pad>=0 <bos>=1 <eos>=2, digits 4..13, "a"=14 .. "z"=39
A, PAD, BOS, EOS = 14, 0, 1, 2


def _ids(text):
  """Hand ids of lowercase text."""
  assert text.isalpha() and text.islower()
  return [A + ord(c) - ord("a") for c in text]


def _write(path, text):
  path.write_text(text, encoding="utf-8")
  return str(path)


# ---- reading --------------------------------------------------------------------------------------


def test_jsonl_skips_blank_lines_maps_fields_and_names_lines(tmp_path):
  path = _write(tmp_path / "train.jsonl",
                '{"question": "q1", "solution": "s1", "domain": "math"}\n\n   \n{"question": "q2", "solution": "s2"}\n')
  recs = read_records(path, fields={"prompt": "question", "answer": "solution"})
  assert recs == [Record(prompt="q1", answer="s1", domain="math", source=f"{path}:1"),
                  Record(prompt="q2", answer="s2", source=f"{path}:4")]


def test_json_list_and_wrapped_object_give_each_records_line(tmp_path):
  body = '[\n  {"prompt": "a",\n   "answer": "b"},\n\n  {"prompt": "c", "answer": "d"}\n]\n'
  listed = _write(tmp_path / "l.json", body)
  wrapped = _write(tmp_path / "w.json", '{"version": 2, "name": "x",\n "data": ' + body + "}")
  assert [(r.prompt, r.answer, r.source) for r in read_records(listed)] == [
    ("a", "b", f"{listed}:2"), ("c", "d", f"{listed}:5")]
  assert [(r.prompt, r.answer, r.source) for r in read_records(wrapped)] == [
    ("a", "b", f"{wrapped}:3"), ("c", "d", f"{wrapped}:6")]


def test_csv_values_stay_strings_and_lines_count_multiline_cells(tmp_path):
  path = _write(tmp_path / "d.csv",
                'prompt,answer,domain,choices\n'
                '"two\nlines",007,,\n'
                'pick,b,letters,"[""a"", ""b""]"\n')
  r1, r2 = read_records(path)
  assert (r1.prompt, r1.answer, r1.domain, r1.choices, r1.source) == ("two\nlines", "007", None, None, f"{path}:2")
  assert (r2.answer, r2.choices, r2.label, r2.domain, r2.source) == ("b", ("a", "b"), 1, "letters", f"{path}:4")


def test_parquet_rows_and_types(tmp_path):
  pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
  path = str(tmp_path / "d.parquet")
  pq.write_table(pa.table({"q": ["x", "y"], "a": ["1", "2"]}), path)
  recs = read_records(path, fields={"prompt": "q", "answer": "a"})
  assert [(r.prompt, r.answer, r.source) for r in recs] == [("x", "1", f"{path}:row 0"), ("y", "2", f"{path}:row 1")]
  bad = str(tmp_path / "bad.parquet")
  pq.write_table(pa.table({"prompt": ["x", "y"], "answer": ["1", None]}), bad)
  with pytest.raises(DataError, match=r"bad\.parquet:row 1: field 'answer' is a null"):
    read_records(bad)


def test_auto_format_reads_chat_and_choices(tmp_path):
  chat = _write(tmp_path / "c.jsonl", json.dumps({"messages": [
    {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "yo"}], "domain": "talk"}) + "\n")
  (r,) = read_records(chat)
  assert r.messages == (Message("system", "be brief"), Message("user", "hi"), Message("assistant", "yo"))
  assert (r.prompt, r.answer, r.domain) == (None, None, "talk")
  mc = _write(tmp_path / "m.jsonl", '{"prompt": "p", "choices": ["x", "y", "z"], "answer": 2}\n'
                                    '{"prompt": "p", "choices": ["x", "y", "z"], "answer": "y"}\n')
  assert [(r.answer, r.label) for r in read_records(mc)] == [("z", 2), ("y", 1)]


def test_hub_names_go_through_datasets_and_fail_clearly(tmp_path, monkeypatch):
  calls = []

  def load_dataset(repo, config, split):
    calls.append((repo, config, split))
    if repo == "owner/missing":
      raise ConnectionError("offline: cannot reach the Hub")
    return [{"prompt": "p", "answer": "a"}]

  monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
  (r,) = read_records("owner/name:main", split="test")
  assert (r.prompt, r.answer, r.source) == ("p", "a", "owner/name:main[test]:row 0")
  with pytest.raises(DataError, match=r"owner/missing: not a local file.*Hub.*offline"):
    read_records("owner/missing")
  assert calls == [("owner/name", "main", "test"), ("owner/missing", None, "train")]
  with pytest.raises(DataError, match="no such file"):
    read_records(str(tmp_path / "absent.jsonl"))


BAD = [  # (file name, content, read_records kwargs, line named, field named)
  ("missing.jsonl", '{"prompt": "a", "answer": "b"}\n{"prompt": "x"}\n', {}, 2, "answer"),
  ("mapped.jsonl", '{"q": "a", "answer": "b"}\n', {"fields": {"prompt": "q", "answer": "sol"}}, 1, "sol"),
  ("number.jsonl", '{"prompt": "a", "answer": 7}\n', {}, 1, "answer"),
  ("empty_answer.jsonl", '\n{"prompt": "a", "answer": "  "}\n', {}, 2, "answer"),
  ("null.json", '[\n{"prompt": "a", "answer": "b"},\n{"prompt": null, "answer": "b"}\n]', {}, 3, "prompt"),
  ("domain.jsonl", '{"prompt": "a", "answer": "b", "domain": 3}\n', {}, 1, "domain"),
  ("bad_json.jsonl", '{"prompt": "a", "answer": "b"}\n\n{"prompt": "a", answer: "b"}\n', {}, 3, None),
  ("bad_json.json", '[{"prompt": "a",\n "answer": "b"}\n {"prompt": "c", "answer": "d"}]', {}, 3, None),
  ("not_utf8.jsonl", b'{"prompt": "a", "answer": "b"}\n{"prompt": "\xff", "answer": "b"}\n', {}, 2, None),
  ("no_assistant.jsonl", '{"messages": [{"role": "user", "content": "hi"}]}\n', {}, 1, "messages"),
  ("empty_turn.jsonl", '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}\n',
   {}, 1, "messages[1].content"),
  ("role.jsonl", '{"messages": [{"role": "bot", "content": "hi"}]}\n', {}, 1, "messages[0].role"),
  ("index.jsonl", '{"prompt": "a", "choices": ["x", "y"], "answer": 2}\n', {}, 1, "answer"),
  ("not_a_choice.jsonl", '{"prompt": "a", "choices": ["x", "y"], "answer": "z"}\n', {}, 1, "answer"),
  ("no_choices.jsonl", '{"prompt": "a", "choices": [], "answer": "z"}\n', {}, 1, "choices"),
  ("cells.csv", 'prompt,answer\na,b\nc,\n', {}, 3, "answer"),
  ("columns.csv", 'prompt,answer\na,b\nc,d,e\n', {}, 3, None),
  ("chat_first.jsonl", '{"messages": [{"role": "assistant", "content": "x"}]}\n{"prompt": "a", "answer": "b"}\n',
   {}, 2, "messages"),
]


@pytest.mark.parametrize("name,content,kwargs,line,field", BAD, ids=[b[0] for b in BAD])
def test_bad_records_name_file_line_and_field(tmp_path, name, content, kwargs, line, field):
  path = tmp_path / name
  path.write_bytes(content if isinstance(content, bytes) else content.encode())
  with pytest.raises(DataError) as e:
    read_records(str(path), **kwargs)
  msg = str(e.value)
  assert f"{path}:{line}:" in msg, msg
  if field is not None:
    assert repr(field) in msg, msg
  assert "\n" not in msg


@pytest.mark.parametrize("name,content,what", [
  ("empty.jsonl", "\n\n", "no records"), ("empty.csv", "prompt,answer\n", "no records"),
  ("empty.json", "[]", "no records"), ("data.txt", "hello", "unknown file extension"),
  ("two_lists.json", '{"a": [], "b": []}', "one list-valued key"),
])
def test_bad_files_name_the_file(tmp_path, name, content, what):
  path = _write(tmp_path / name, content)
  with pytest.raises(DataError, match=what) as e:
    read_records(path)
  assert path in str(e.value)


def test_unknown_format_or_field_name_is_refused(tmp_path):
  path = _write(tmp_path / "d.jsonl", '{"prompt": "a", "answer": "b"}\n')
  with pytest.raises(DataError, match="unknown data format 'alpaca'"):
    read_records(path, format="alpaca")
  with pytest.raises(DataError, match="'question'"):
    read_records(path, fields={"question": "q"})


# ---- encoding without a template --------------------------------------------------------------------


def test_plain_encoding_mask_and_batch_by_hand():
  rec = Record(prompt="ab", answer="c", domain="d1", source="f.jsonl:1")
  e = encode_record(rec, TOK, max_len=8)
  assert e.ids.tolist() == [BOS, A, A + 1, A + 2, EOS]
  assert e.loss_mask.tolist() == [0, 0, 0, 1, 1]  # on the answer and eos
  assert (e.prompt_len, e.truncated, e.domain) == (3, False, "d1")
  batch = RecordBatches([e], batch_size=1, seq_len=7, pad_id=PAD, seed=0).batch(0)
  assert batch["tokens"].tolist() == [[1, 14, 15, 16, 2, 0, 0]]
  assert batch["targets"].tolist() == [[14, 15, 16, 2, 0, 0, 0]]
  assert batch["loss_mask"].tolist() == [[0, 0, 1, 1, 0, 0, 0]]  # positions predicting "c" and eos
  assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0, 0]]
  assert (batch["prompt_len"].tolist(), batch["length"].tolist(), batch["domain"].tolist()) == ([3], [5], [0])


def test_batches_equal_encode_batch_row_by_row():
  recs = [Record(prompt=p, answer=a, source=f"f:{i}") for i, (p, a) in
          enumerate([("add:1+2=", "3"), ("rev:abc=", "cba"), ("x", "yz"), ("", "q")])]
  batches = RecordBatches(encode_records(recs, TOK, max_len=16), batch_size=4, seq_len=16, pad_id=PAD, seed=3)
  got = batches.batch(0)
  for b, i in enumerate(batches.indices(0)):
    want = encode_batch([Example(recs[i].prompt, recs[i].answer, "t")], TOK, 16)
    for key, value in want.items():
      assert np.array_equal(got[key][b], value[0]), key
      assert got[key].dtype == value.dtype, key


def test_empty_prompt_without_bos_and_unknown_characters_are_data_errors():
  nobos = CharTokenizer()
  nobos.bos_id = None
  with pytest.raises(DataError, match=r"f\.jsonl:4: field 'prompt' is empty"):
    encode_record(Record(prompt="", answer="a", source="f.jsonl:4"), nobos, max_len=8)
  with pytest.raises(DataError, match=r"f\.jsonl:5: field 'answer'.*'é'"):
    encode_record(Record(prompt="a", answer="é", source="f.jsonl:5"), TOK, max_len=8)
  chat = Record(messages=(Message("user", "a"), Message("assistant", "b")), source="c.jsonl:1")
  with pytest.raises(DataError, match=r"c\.jsonl:1: a chat record needs a chat template"):
    encode_record(chat, TOK, max_len=8)
  with pytest.raises(DataError, match="has no chat template"):
    encode_record(Record(prompt="a", answer="b", source="x:1"), TOK, chat_template=True, max_len=8)


def test_truncation_by_hand_and_logged_once(caplog):
  long_prompt = Record(prompt="abcdef", answer="xy", source="f.jsonl:1")
  e = encode_record(long_prompt, TOK, max_len=6)  # full: bos abcdef xy eos = 10 tokens
  assert e.ids.tolist() == _ids("def") + _ids("xy") + [EOS]  # prompt cut on the left
  assert e.loss_mask.tolist() == [0, 0, 0, 1, 1, 1]
  assert (e.prompt_len, e.truncated, e.answer_truncated) == (3, True, False)
  long_answer = Record(prompt="ab", answer="uvwxyz", source="f.jsonl:2")
  e = encode_record(long_answer, TOK, max_len=4)  # one prompt token kept, the answer cut on the right
  assert e.ids.tolist() == _ids("b") + _ids("uvw")
  assert e.loss_mask.tolist() == [0, 1, 1, 1]
  assert (e.prompt_len, e.truncated, e.answer_truncated) == (1, True, True)

  fits = Record(prompt="a", answer="b", source="f.jsonl:3")
  with caplog.at_level(logging.WARNING, logger="calm_jax.data"):
    out = encode_records([long_prompt, fits, long_answer], TOK, max_len=6)
  assert [e.truncated for e in out] == [True, False, True]
  lines = [r.getMessage() for r in caplog.records if r.name.startswith("calm_jax.data")]
  assert len(lines) == 1 and lines[0].startswith("2 of 3 records of f.jsonl were truncated to max_len=6"), lines
  assert "(1 of them lost answer tokens)" in lines[0]
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="calm_jax.data"):
    encode_records([fits], TOK, max_len=6)
  assert not caplog.records


# ---- chat templates ----------------------------------------------------------------------------------

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def chat_tok_dir(tmp_path_factory):
  """A character-level HF tokenizer (BPE without merges) with ChatML specials and template, saved to disk."""
  from tokenizers import Tokenizer as RawTokenizer
  from tokenizers import decoders, models
  from transformers import PreTrainedTokenizerFast

  specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
  chars = "abcdefghijklmnopqrstuvwxyz0123456789 \n?:=+.,"
  raw = RawTokenizer(models.BPE(vocab={t: i for i, t in enumerate(specials + list(chars))}, merges=[]))
  raw.decoder = decoders.Fuse()
  hf = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                               additional_special_tokens=specials[3:])
  hf.chat_template = CHATML
  path = tmp_path_factory.mktemp("chat_tok")
  hf.save_pretrained(path)
  return path


def _spans(e):
  """Decoded runs of consecutive trained tokens."""
  runs, cur = [], []
  for i, m in zip(e.ids.tolist(), e.loss_mask.tolist()):
    if m:
      cur.append(i)
    elif cur:
      runs.append(cur)
      cur = []
  return runs + ([cur] if cur else [])


def test_chat_template_trains_on_exactly_the_answer(chat_tok_dir):
  tok = HFTokenizer(chat_tok_dir)
  e = encode_record(Record(prompt="what is 1+1?", answer="2", source="f:1"), tok, max_len=64)
  decode = lambda ids: tok.hf.decode(ids, skip_special_tokens=False)  # noqa: E731
  assert decode(e.ids) == "<|im_start|>user\nwhat is 1+1?<|im_end|>\n<|im_start|>assistant\n2<|im_end|>\n"
  assert [decode(run) for run in _spans(e)] == ["2<|im_end|>\n"]
  assert decode(e.ids[: e.prompt_len]) == "<|im_start|>user\nwhat is 1+1?<|im_end|>\n<|im_start|>assistant\n"
  # False: the plain layout even though a template exists
  plain = encode_record(Record(prompt="ab", answer="c", source="f:1"), tok, chat_template="false", max_len=64)
  assert plain.ids.tolist() == [tok.bos_id] + tok.encode("abc") + [tok.eos_id]
  assert plain.loss_mask.tolist() == [0, 0, 0, 1, 1]


def test_multi_turn_chat_masks_every_assistant_turn(chat_tok_dir):
  tok = HFTokenizer(chat_tok_dir)
  rec = Record(messages=(Message("system", "be short"), Message("user", "1+1"), Message("assistant", "2"),
                         Message("user", "and 2+2"), Message("assistant", "4 of course")), source="c:1")
  e = encode_record(rec, tok, max_len=200)
  decode = lambda ids: tok.hf.decode(ids, skip_special_tokens=False)  # noqa: E731
  assert [decode(run) for run in _spans(e)] == ["2<|im_end|>\n", "4 of course<|im_end|>\n"]
  untrained = decode([i for i, m in zip(e.ids.tolist(), e.loss_mask.tolist()) if not m])
  assert untrained == ("<|im_start|>system\nbe short<|im_end|>\n<|im_start|>user\n1+1<|im_end|>\n"
                       "<|im_start|>assistant\n<|im_start|>user\nand 2+2<|im_end|>\n<|im_start|>assistant\n")
  assert decode(e.ids[: e.prompt_len]).endswith("1+1<|im_end|>\n<|im_start|>assistant\n")


def test_template_that_is_not_prefix_stable_is_refused(chat_tok_dir):
  tok = HFTokenizer(chat_tok_dir)
  # the generation prompt ("?") is not how the rendered conversation continues
  tok.hf.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                          "{% if add_generation_prompt %}?{% endif %}")
  with pytest.raises(DataError, match=r"f\.jsonl:7: the chat template of HFTokenizer.*not prefix-stable"):
    encode_record(Record(prompt="a", answer="b", source="f.jsonl:7"), tok, max_len=64)


def test_answer_empty_after_templating_is_refused(chat_tok_dir):
  """A template that drops what it is given (here: trims, and the answer is whitespace inside a chat record)
  leaves only its end-of-turn marker to train on: refused naming the record, not trained on silently."""
  tok = HFTokenizer(chat_tok_dir)
  tok.hf.chat_template = CHATML.replace("{{ m['content'] }}", "{{ m['content'] | trim }}")
  rec = Record(messages=(Message("user", "1+1"), Message("assistant", " \n ")), source="f.jsonl:3")
  with pytest.raises(DataError, match=r"f\.jsonl:3: the answer of assistant turn 1 is empty after templating"):
    encode_record(rec, tok, max_len=64)
  # the same template with a real answer is fine, and trains on exactly it and the marker
  ok = encode_record(Record(prompt="1+1", answer=" 2 ", source="f.jsonl:4"), tok, max_len=64)
  assert [tok.hf.decode(r, skip_special_tokens=False) for r in _spans(ok)] == ["2<|im_end|>\n"]


# ---- batches and splits -------------------------------------------------------------------------------


def _letters(n, domains=(None,)):
  return [Record(prompt=chr(ord("a") + i), answer="z", domain=domains[i % len(domains)], source=f"f:{i + 1}")
          for i in range(n)]


def test_batches_are_pure_in_seed_and_step_and_cover_each_epoch():
  enc = encode_records(_letters(7), TOK, max_len=4)
  one = RecordBatches(enc, batch_size=3, seq_len=5, pad_id=PAD, seed=11)
  other = RecordBatches(enc, batch_size=3, seq_len=5, pad_id=PAD, seed=11)
  steps = list(range(14))  # 42 examples: 6 epochs of 7
  first = {s: one.batch(s) for s in steps}
  second = {s: other(s) for s in reversed(steps)}
  for s in steps:
    for key in first[s]:
      assert np.array_equal(first[s][key], second[s][key]), (s, key)
  stream = [int(row[1]) - A for s in steps for row in first[s]["tokens"]]  # the prompt letter of each row
  for epoch in range(6):
    assert stream[7 * epoch: 7 * (epoch + 1)] == np.random.default_rng([11, epoch]).permutation(7).tolist()
  assert [b["tokens"].tolist() for b in first.values()] != [
    RecordBatches(enc, 3, 5, PAD, seed=12)(s)["tokens"].tolist() for s in steps]


def test_domain_ids_follow_sorted_names():
  recs = [Record(prompt="a", answer="b", domain=d, source=f"f:{i}") for i, d in enumerate(["math", "code", None])]
  enc = encode_records(recs, TOK, max_len=4)
  batches = RecordBatches(enc, batch_size=3, seq_len=4, pad_id=PAD, seed=0)
  assert batches.domains == ("code", "math")
  got = {int(i): int(d) for i, d in zip(batches.indices(0), batches.batch(0)["domain"])}
  assert got == {0: 1, 1: 0, 2: -1}
  with pytest.raises(DataError, match=r"f:0: domain 'math' is not one of the domains \('code',\)"):
    RecordBatches(enc, 3, 4, PAD, domains=["code"])
  with pytest.raises(DataError, match="seq_len is 3"):
    RecordBatches(enc, 3, 3, PAD)


def test_split_records_is_seeded_disjoint_and_covering():
  recs = _letters(20)
  train, val = split_records(recs, 0.25, seed=4)
  assert len(val) == 5 and len(train) == 15
  assert sorted(r.source for r in train + val) == sorted(r.source for r in recs)
  assert not {r.source for r in train} & {r.source for r in val}
  assert [r.source for r in train] == [r.source for r in recs if r in train]  # file order kept
  assert split_records(recs, 0.25, seed=4) == (train, val)
  assert any(split_records(recs, 0.25, seed=s)[1] != val for s in range(5, 10))
  with pytest.raises(DataError, match="val_fraction"):
    split_records(recs, 1.0, seed=0)


def test_load_dataset_config(tmp_path):
  train = _write(tmp_path / "train.jsonl", "".join(
    json.dumps({"q": chr(ord("a") + i), "s": "x", "domain": "even" if i % 2 == 0 else "odd"}) + "\n"
    for i in range(10)))
  test = _write(tmp_path / "test.csv", "q,s,domain\nk,y,zeta\n")
  cfg = ml_collections.ConfigDict(dict(train=train, test=test, val_fraction=0.2, seed=1, format="prompt_answer",
                                       fields=dict(prompt="q", answer="s"), chat_template="auto"))
  data = load_dataset_config(cfg, TOK, max_len=8)
  assert (len(data.records["train"]), len(data.records["val"]), len(data.records["test"])) == (8, 2, 1)
  assert data.domains == ("even", "odd", "zeta")
  val = data.batches("val", batch_size=2)(0)
  want = {"even": 0, "odd": 1}
  assert sorted(val["domain"].tolist()) == sorted(want[r.domain] for r in data.records["val"])
  assert data.batches("test", 1)(0)["domain"].tolist() == [2]
  cfg.val = train
  with pytest.raises(DataError, match="both set"):
    load_dataset_config(cfg, TOK, max_len=8)
