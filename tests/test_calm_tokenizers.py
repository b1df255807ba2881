"""CALM across tokenizers (calm/spans.py, the own-stream path of calm/compose.py, calm/text_decoding.py):
no leakage past an anchor token's last character (caught when the mask is planted one character late), the
same-tokenizer case equal to today's causal mask and logits bit for bit, cached decoding equal to a full
forward over the final tokens, the character-level augmenting model's rows equal to its tokenization of the
whole text, and the compose config on users' files."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import calm.compose as compose_mod
from calm.compose import AugStream, Composed, forward
from calm.spans import TIES, composed_prompt, encode_composed, extend, pad_keys, segment_ids
from calm.text_decoding import generate
from calm_jax.data import Record
from calm_jax.data.records import DataError
from calm_jax.models import Decoder, DecoderConfig, init_params
from calm_jax.models import decoder as dec
from calm_jax.models.layers import attention_mask
from calm_jax.tokenizers import CharTokenizer, load_tokenizer

pytestmark = pytest.mark.usefixtures("fast_compile")

CHAR = CharTokenizer()
CORPUS = ["What is 2+3? It is 5.", "the cat sat on the mat", "Reverse the word: hello -> olleh",
          "Uppercase this: abc -> ABC", "Answer: 12, 13 and 14.", "one two three four five six seven"] * 20


def _trained_bpe(path):
  """A small byte-level BPE (the `tokenizers` trainer on a fixed corpus): a real BPE with offsets, offline."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                          pad_token="<pad>").save_pretrained(path)
  return path


@pytest.fixture(scope="module", params=["bpe", pytest.param("smollm2", marks=pytest.mark.slow)])
def bpe(request, tmp_path_factory):
  """A BPE tokenizer: a small trained one (fast) and SmolLM2's, with its chat template (slow: a fetch)."""
  if request.param == "smollm2":
    return load_tokenizer(request.getfixturevalue("smollm2_dir"))
  return load_tokenizer(_trained_bpe(tmp_path_factory.mktemp("bpe")))


def decoder(tok, width, layers, heads, kv, seed):
  cfg = DecoderConfig.make(model_type="llama", vocab_size=tok.vocab_size, hidden_size=width,
                           intermediate_size=2 * width, num_hidden_layers=layers, num_attention_heads=heads,
                           num_key_value_heads=kv, max_position_embeddings=512, bos_token_id=tok.bos_id,
                           eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
  return Decoder(cfg, params=init_params(cfg, seed, std=0.3))


def composition(anchor_tok, aug_tok, own=True):
  """A tiny anchor and augmenting model over their tokenizers, random non-zero composition parameters (W_O too),
  so the cross-attention moves the anchor's logits."""
  return Composed(decoder(anchor_tok, 32, 2, 4, 2, 0), [decoder(aug_tok, 16, 4, 2, 1, 1)], augment_layers=[[2, 4]],
                  anchor_layers=[[1, 2]], seed=3, zero_output=False, own_tokens=[own])


def batch(rows, t_len, s_len, anchor_pad, aug_pad):
  """Right-padded arrays of composed records (tokens, valid, end keys; the augmenting model's AugStream)."""
  tokens = np.full((len(rows), t_len), anchor_pad, np.int32)
  valid = np.zeros((len(rows), t_len), bool)
  a_tok, a_valid = np.full((len(rows), s_len), aug_pad, np.int32), np.zeros((len(rows), s_len), bool)
  for i, r in enumerate(rows):
    n, s = len(r.anchor.ids), len(r.augs[0][0])
    tokens[i, :n], valid[i, :n] = r.anchor.ids, True
    a_tok[i, :s], a_valid[i, :s] = r.augs[0][0], True
  ends = np.stack([pad_keys(r.ends, t_len, left=False) for r in rows])
  a_ends = np.stack([pad_keys(r.augs[0][1], s_len, left=False) for r in rows])
  stream = AugStream(jnp.asarray(a_tok), jnp.asarray(a_valid), jnp.broadcast_to(jnp.arange(s_len), a_tok.shape),
                     jnp.asarray(a_ends))
  return jnp.asarray(tokens), jnp.asarray(valid), jnp.asarray(ends), stream


def logits_of(model, rows, t_len=96, s_len=160):
  """The composed logits of the rows, traced afresh (so a patched cross_mask is what runs)."""
  tokens, valid, ends, stream = batch(rows, t_len, s_len, model.anchor.config.pad_token_id,
                                      model.augments[0].config.pad_token_id)
  fn = jax.jit(lambda p: forward(model.spec, p, tokens, valid=valid, streams=(stream,), ends=ends)[0])
  return np.asarray(fn(model.params()))


PROMPT, ANSWER = "What is 2+3?", " It is 5, the cat sat."


def _variants(text_at, n):
  """(position, text with the character at position replaced) for every position of a text of length n."""
  out = []
  for c in range(n):
    old = text_at[c]
    out.append((c, text_at[:c] + ("q" if old != "q" else "z") + text_at[c + 1:]))
  return out


def leak_check(anchor_tok, aug_tok, *, prompt_changes: bool, chat_template="auto"):
  """For every changed character c (of the answer, and of the prompt when `prompt_changes`), the anchor's logits
  at every position t whose tokens up to t are unchanged and whose span ends before c, against the original's.
  Returns (number of positions compared, largest difference) over all variants."""
  model = composition(anchor_tok, aug_tok)
  enc = lambda p, a: encode_composed(Record(prompt=p, answer=a, source="mem:1"), anchor_tok, [aug_tok],
                                     chat_template=chat_template, max_len=96)
  base = enc(PROMPT, ANSWER)
  variants = [(c + len(PROMPT) + 1, enc(PROMPT, a)) for c, a in _variants(ANSWER, len(ANSWER))]
  if prompt_changes:
    variants += [(c, enc(p, ANSWER)) for c, p in _variants(PROMPT, len(PROMPT))]
  out = logits_of(model, [base] + [v for _, v in variants])
  compared, worst = 0, 0.0
  for i, (c, v) in enumerate(variants, start=1):
    # the character changed is c (0-based in the prompt; answer characters end at len(prompt) + 1 + index + 1)
    # anchor token t has read it iff its character end (key // TIES) reaches c + 1
    for t in range(min(len(v.anchor.ids), len(base.anchor.ids))):
      same = (np.array_equal(v.anchor.ids[:t + 1], base.anchor.ids[:t + 1])
              and np.array_equal(v.ends[:t + 1], base.ends[:t + 1]))
      if same and int(base.ends[t]) // TIES < c + 1:
        compared += 1
        worst = max(worst, float(np.max(np.abs(out[i, t] - out[0, t]))))
  return compared, worst


@pytest.mark.slow
def test_no_leak_char_anchor_bpe_augment(bpe):
  """The BPE model augments a character-level anchor: no character past anchor token t's end moves its logits
  (changes in the answer; the prompt is tokenized whole, module docstring of calm/spans.py)."""
  compared, worst = leak_check(CHAR, bpe, prompt_changes=False)
  assert compared > 200
  assert worst == 0.0


@pytest.mark.slow
def test_no_leak_bpe_anchor_char_augment(bpe):
  """The character-level model augments a BPE anchor: the same, with changes in the prompt too."""
  compared, worst = leak_check(bpe, CHAR, prompt_changes=True)
  assert compared > 100
  assert worst == 0.0


@pytest.mark.slow
def test_planted_off_by_one_mask_is_caught(bpe, monkeypatch):
  """A mask one character late (anchor t reads augmenting tokens ending at its end + 1) leaks, and the check sees it."""
  right = compose_mod.cross_mask
  monkeypatch.setattr(compose_mod, "cross_mask", lambda q, k, v: right(q + TIES, k, v))
  for anchor_tok, aug_tok in ((CHAR, bpe), (bpe, CHAR)):
    compared, worst = leak_check(anchor_tok, aug_tok, prompt_changes=False)
    assert compared > 50 and worst > 1e-3


def _same_rows(tok, chat_template):
  """Records encoded for an augmenting model that reads the anchor's own tokenization (aug row = anchor row)."""
  recs = [Record(prompt=PROMPT, answer=ANSWER, source="mem:1"), Record(prompt="Hi", answer=" ok", source="mem:2")]
  rows = []
  for r in recs:
    cr = encode_composed(r, tok, [None], chat_template=chat_template, max_len=96)
    rows.append(type(cr)(cr.anchor, cr.ends, ((cr.anchor.ids, cr.ends, cr.anchor.prompt_len),)))
  return rows


def assert_mask_is_todays(tok, chat_template):
  rows = _same_rows(tok, chat_template)
  assert all(np.all(np.diff(r.ends.astype(np.int64)) > 0) for r in rows)  # keys increase strictly
  for left in (False, True):
    t = 64
    valid = np.zeros((len(rows), t), bool)
    for i, r in enumerate(rows):
      n = len(r.anchor.ids)
      if left:
        valid[i, t - n:] = True
      else:
        valid[i, :n] = True
    ends = np.stack([pad_keys(r.ends, t, left=left) for r in rows])
    got = compose_mod.cross_mask(jnp.asarray(ends), jnp.asarray(ends), jnp.asarray(valid))
    want = attention_mask(jnp.arange(t), jnp.asarray(valid))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_same_tokenizer_mask_is_todays_mask():
  """Identical tokenizations: `aug_end[s] <= anchor_end[t]` is the causal slot mask, right- and left-padded."""
  assert_mask_is_todays(CHAR, "auto")


@pytest.mark.slow
@pytest.mark.parametrize("chat_template", ["auto", False])
def test_same_tokenizer_mask_is_todays_mask_bpe(chat_template, bpe):
  """The same with a BPE, plain and (SmolLM2) chat-template layouts: template tokens tie at one character."""
  assert_mask_is_todays(bpe, chat_template)


@pytest.mark.slow
def test_same_tokenizer_composed_logits_bit_equal():
  """The own-stream path fed the anchor's tokens equals today's shared path bit for bit."""
  shared = composition(CHAR, CHAR, own=False)
  own = Composed(shared.anchor, shared.augments, augment_layers=[[2, 4]], anchor_layers=[[1, 2]],
                 compose_params=shared.compose_params(), own_tokens=[True])
  rows = _same_rows(CHAR, "auto")
  tokens, valid, ends, stream = batch(rows, 48, 48, 0, 0)
  stream = stream._replace(positions=jnp.broadcast_to(jnp.arange(48), tokens.shape))
  want = np.asarray(shared(tokens, valid))
  got = np.asarray(own(tokens, valid, streams=[stream], ends=ends))
  np.testing.assert_array_equal(got, want)
  alone = np.asarray(dec.forward(shared.anchor.config, shared.anchor.params(), tokens, valid=valid)[0])
  assert np.max(np.abs(want - alone)) > 1e-2  # the composition is live


@pytest.mark.slow
def test_char_augment_rows_are_its_tokenization_of_the_text(bpe):
  """Segment by segment, the character-level model gets exactly its tokens of the whole text (prompt + the anchor's
  decoded answer), and each BPE piece of a BPE augment decodes to the anchor token's text."""
  rec = Record(prompt=PROMPT, answer=ANSWER, source="mem:1")
  cr = encode_composed(rec, bpe, [CHAR], chat_template=False, max_len=256)
  answer_text = bpe.hf.decode(cr.anchor.ids[cr.anchor.prompt_len:].tolist(), skip_special_tokens=True)
  ids = cr.augs[0][0].tolist()
  assert ids == [CHAR.bos_id] + CHAR.encode(PROMPT + answer_text)
  assert answer_text == ANSWER
  # and the other way round: the BPE augment reads each anchor character alone
  cr = encode_composed(rec, CHAR, [bpe], chat_template=False, max_len=256)
  tail = cr.augs[0][0][cr.augs[0][2]:].tolist()
  assert tail == [i for ch in ANSWER for i in bpe.encode(ch)]
  assert segment_ids(CHAR, "aé") == [CHAR.encode("a")[0], CHAR.unk_id]


@pytest.mark.slow
def test_chat_record_and_unknown_characters_are_refused(bpe):
  from calm_jax.data import Message
  chat = Record(messages=(Message("user", "hi"), Message("assistant", "yo")),
                source="f.jsonl:3")
  with pytest.raises(DataError, match="f.jsonl:3.*prompt/answer"):
    encode_composed(chat, bpe, [CHAR], max_len=64)
  with pytest.raises(DataError, match="f.jsonl:4"):
    encode_composed(Record(prompt="naïve", answer="x", source="f.jsonl:4"), bpe, [CHAR], max_len=64)


@pytest.mark.slow
@pytest.mark.parametrize("direction", ["char_anchor", "bpe_anchor"])
def test_decoding_with_both_caches_equals_full_forward(direction, bpe):
  """Greedy decoding across tokenizers (prefill, then one step per anchor token with the augmenting model's pieces
  appended to its cache, grown on the way) equals the argmax of one teacher-forced forward over the final rows,
  and its logits match that forward's."""
  anchor_tok, aug_tok = (CHAR, bpe) if direction == "char_anchor" else (bpe, CHAR)
  model = composition(anchor_tok, aug_tok)
  recs = [Record(prompt=PROMPT, answer="", source="mem:1"), Record(prompt="Uppercase this: abc ->", answer="",
                                                                   source="mem:2")]
  prompts = [composed_prompt(r, anchor_tok, [aug_tok], chat_template="auto") for r in recs]
  n = 16
  # aug_reserve=0: the augmenting cache starts at the prompt's length and is enlarged on the way
  out, kept = generate(model.spec, model.params(), prompts, anchor_tok, [aug_tok], max_new_tokens=n, eos_ids=(),
                       pad_id=anchor_tok.pad_id, aug_pad_ids=[aug_tok.pad_id], return_logits=True, aug_reserve=0)
  assert [len(o) for o in out] == [n] * len(recs)
  full_forward = jax.jit(lambda p, ids, stream, keys: forward(model.spec, p, ids, streams=(stream,), ends=keys)[0])
  for p, gen, lg in zip(prompts, out, kept):
    (ids, keys), augs = extend(p, anchor_tok, [aug_tok], gen[:-1])
    a_ids, a_keys = augs[0]
    assert len(a_ids) > len(p.augs[0][0])  # the augmenting model read the continuation
    stream = AugStream(jnp.asarray(a_ids)[None], jnp.ones((1, len(a_ids)), bool), jnp.arange(len(a_ids))[None],
                       jnp.asarray(a_keys)[None])
    full = full_forward(model.params(), jnp.asarray(ids)[None], stream, jnp.asarray(keys)[None])[0]
    start = len(p.anchor[0]) - 1
    ref = np.asarray(full[start:start + n])
    assert ref.argmax(-1).tolist() == gen
    # fp32 rounding of two reduction orders (cached steps vs one pass over a chat-template prompt of ~40 tokens);
    # the tolerance test_decoding.py uses for cached log-probs against a full forward
    np.testing.assert_allclose(lg, ref, rtol=1e-5, atol=1e-4)


def _bpe_anchor_dir(smollm2_dir, path):
  """A tiny random llama over SmolLM2's vocabulary, with SmolLM2's tokenizer files and chat template."""
  import shutil

  import torch
  from transformers import LlamaConfig, LlamaForCausalLM
  torch.manual_seed(0)
  cfg = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                    pad_token_id=2, tie_word_embeddings=True, initializer_range=0.1)
  LlamaForCausalLM(cfg).save_pretrained(path)
  for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
    if (smollm2_dir / f).exists():
      shutil.copy(smollm2_dir / f, path / f)
  return path


def test_compose_config_on_files_across_tokenizers(tmp_path, smollm2_dir, tiny_base_dir):
  """configs/calm/compose.py:tiny on users' JSONL files: a BPE anchor (SmolLM2's tokenizer and chat template) and
  the character-level tiny base as augmenting model train and decode; W/compose and W/results.json are written."""
  from safetensors.numpy import load_file

  from calm_jax.registry import get_method
  from configs.calm.compose import get_config
  import calm.compose_files  # noqa: F401  (registers calm_compose)

  words = ["abc", "hello", "cat", "dog", "tree", "moon", "star", "blue", "red", "fish"]
  rows = [{"prompt": f"Reverse: {w}", "answer": w[::-1]} for w in words]
  (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:7]))
  (tmp_path / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[7:]))
  c = get_config("tiny")
  c.anchor = str(_bpe_anchor_dir(smollm2_dir, tmp_path / "anchor"))
  c.augmenting = (str(tiny_base_dir / "hf"),)
  c.data.train, c.data.val = str(tmp_path / "train.jsonl"), str(tmp_path / "val.jsonl")
  work = tmp_path / "w"
  out = get_method("calm_compose")(c, work)
  res = json.loads((work / "results.json").read_text())
  assert res["own_tokens"] == [True] and res["n"] == 3 and res["metric"] == "exact"
  assert set(res) >= {"anchor", "composed", "compose", "final_loss", "trained_params"}
  assert len(res["examples"]) == 3 and all(isinstance(e["generated"], str) for e in res["examples"])
  assert np.isfinite(res["final_loss"]) and out["composed"] == res["composed"]
  saved = load_file(str(work / "compose" / "compose.safetensors"))
  assert sum(v.size for v in saved.values()) == res["trained_params"]
  assert np.abs(saved["0/o"]).max() > 0  # W_O left its zero init: the composition trained
  meta = json.loads((work / "compose" / "compose.json").read_text())
  assert meta["own_tokens"] == [True] and meta["data_identity"]["data.train.blake2b"]


def test_compose_config_refuses_bad_settings(tmp_path):
  from calm_jax.errors import UserError
  from calm_jax.registry import get_method
  from configs.calm.compose import get_config
  import calm.compose_files  # noqa: F401

  c = get_config("tiny")
  c.augmenting = ()
  with pytest.raises(UserError, match="config.augmenting is empty"):
    get_method("calm_compose")(c, tmp_path / "a")
  c = get_config("tiny")
  c.eval.metric = "choice"
  with pytest.raises(UserError, match="'exact' or 'number'"):
    get_method("calm_compose")(c, tmp_path / "b")
  assert not any((tmp_path / d / "results.json").exists() for d in ("a", "b"))
