"""Tokenizer interface: the character tokenizer and a locally built Hugging Face one."""

import json
import os

import pytest

from calm_jax.tokenizers import (
  CHAR_TOKENIZER_FILE,
  CharTokenizer,
  HFTokenizer,
  Tokenizer,
  load_tokenizer,
)


def test_char_specials_and_size():
  tok = CharTokenizer()
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
  assert tok.vocab_size <= 128
  assert isinstance(tok, Tokenizer)
  # Deterministic: two instances agree on every id.
  assert CharTokenizer().chars == tok.chars


def test_char_round_trip_covers_task_alphabet():
  tok = CharTokenizer()
  text = "add:123+45= sub:9-3= kv:abc= cnt:a|abca= max:1,2= up:XYZ; (a)[b]>_#/?*."
  ids = tok.encode(text)
  assert len(ids) == len(text)
  assert all(i >= 4 for i in ids)  # no specials from text
  assert tok.decode(ids) == text


def test_char_decode_skips_specials_and_does_not_stop():
  tok = CharTokenizer()
  ids = [tok.bos_id] + tok.encode("ab") + [tok.eos_id] + tok.encode("c") + [tok.pad_id, tok.unk_id]
  assert tok.decode(ids) == "abc"
  with pytest.raises(ValueError, match="out of range"):
    tok.decode([tok.vocab_size])


def test_char_unknown_character_raises_with_name():
  tok = CharTokenizer()
  with pytest.raises(ValueError, match="'é'"):
    tok.encode("abé")


def test_char_save_load(tmp_path):
  tok = CharTokenizer()
  tok.save(tmp_path)
  data = json.loads((tmp_path / CHAR_TOKENIZER_FILE).read_text())
  assert data["chars"] == list(tok.chars)
  loaded = load_tokenizer(tmp_path)
  assert isinstance(loaded, CharTokenizer) and loaded == tok
  assert loaded.encode("rev:abc=") == tok.encode("rev:abc=")


def test_char_load_rejects_bad_file(tmp_path):
  (tmp_path / CHAR_TOKENIZER_FILE).write_text("{not json")
  with pytest.raises(ValueError, match="not valid JSON"):
    CharTokenizer.load(tmp_path)
  (tmp_path / CHAR_TOKENIZER_FILE).write_text(json.dumps({"type": "char", "chars": ["a", "b"]}))
  with pytest.raises(ValueError, match="specials"):
    CharTokenizer.load(tmp_path)


def _tiny_hf_tokenizer(directory, with_bos=True):
  """A real byte-level BPE tokenizer trained in memory, saved as an HF directory."""
  from tokenizers import Tokenizer as RawTokenizer
  from tokenizers import decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast

  raw = RawTokenizer(models.BPE())
  raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  raw.decoder = decoders.ByteLevel()
  specials = ["<pad>", "<s>", "</s>"]
  trainer = trainers.BpeTrainer(
    vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
  )
  corpus = ["add:123+45=168", "the quick brown fox jumps over the lazy dog", "hello world"] * 20
  raw.train_from_iterator(corpus, trainer)
  kwargs = dict(eos_token="</s>", pad_token="<pad>")
  if with_bos:
    kwargs["bos_token"] = "<s>"
  hf = PreTrainedTokenizerFast(tokenizer_object=raw, **kwargs)
  hf.save_pretrained(directory)
  return hf


def test_hf_tokenizer_round_trip(tmp_path):
  hf = _tiny_hf_tokenizer(tmp_path)
  tok = load_tokenizer(tmp_path)
  assert isinstance(tok, HFTokenizer) and isinstance(tok, Tokenizer)
  assert tok.eos_id == hf.convert_tokens_to_ids("</s>")
  assert tok.bos_id == hf.convert_tokens_to_ids("<s>")
  assert tok.pad_id == hf.convert_tokens_to_ids("<pad>")
  assert tok.vocab_size == len(hf)
  for text in ["hello world", "add:123+45=168", "unseen Text, with ÜNICODE!"]:
    ids = tok.encode(text)
    assert tok.bos_id not in ids and tok.eos_id not in ids  # no specials added
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id]) == text

  out = tmp_path / "copy"
  tok.save(out)
  again = load_tokenizer(out)
  assert isinstance(again, HFTokenizer)
  assert again.encode("hello world") == tok.encode("hello world")


def test_hf_tokenizer_without_bos(tmp_path):
  _tiny_hf_tokenizer(tmp_path, with_bos=False)
  tok = load_tokenizer(tmp_path)
  assert tok.bos_id is None
  assert tok.decode(tok.encode("hello")) == "hello"


def test_hf_tokenizer_names_a_missing_dir(tmp_path):
  with pytest.raises(ValueError, match="no model directory"):
    HFTokenizer(os.path.join(tmp_path, "does-not-exist"))


def test_a_model_directory_without_a_tokenizer_is_named(tmp_path):
  """A checkpoint saved without its tokenizer (weights and config.json only) is refused naming the directory and
  the files looked for, not with the transformers conversion traceback."""
  import pytest

  from calm_jax.errors import UserError
  from calm_jax.tokenizers import load_tokenizer
  (tmp_path / "config.json").write_text('{"model_type": "llama"}')
  (tmp_path / "model.safetensors").write_bytes(b"")
  with pytest.raises(UserError, match=rf"{tmp_path} has no tokenizer \(none of .*tokenizer\.json"):
    load_tokenizer(tmp_path)
