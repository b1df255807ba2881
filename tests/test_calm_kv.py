"""The key-value arithmetic data of CALM's Table 1, and the whole experiment at :tiny size."""
import json

import numpy as np
import pytest

from calm.kv_tasks import KeyValueTable, kv_registry
from calm_jax.tokenizers import CharTokenizer


def test_table_keys_values_and_split():
  t = KeyValueTable(50, 3, 0.2, seed=4)
  assert len(set(t.keys)) == 50 and all(len(k) == 3 and k.isalpha() and k.islower() for k in t.keys)
  assert sorted(t.values.values()) == list(range(1, 51))  # distinct integers 1..N
  assert len(t.held_in) == 10 and set(t.held_in).isdisjoint(t.held_out)
  assert set(t.held_in) | set(t.held_out) == set(t.keys)
  other = KeyValueTable(50, 3, 0.2, seed=5)  # the seed changes the map and the held-in keys
  assert other.keys != t.keys and set(other.held_in) != set(t.held_in)
  with pytest.raises(ValueError, match="held_in_fraction"):
    KeyValueTable(50, 3, 1.0)
  with pytest.raises(ValueError, match="n_keys"):
    KeyValueTable(800, 2)


def _python_expression(table, text):
  """A prompt's expression (without its last character) as Python source: keys -> their values,
  `#017` -> 17; parsed with the table's own key spellings, not with the task code."""
  spelled = {table.key_text(k): str(table.values[k]) for k in table.keys}
  out, keys, i = [], [], 0
  while i < len(text):
    if text[i] in "+-*":
      out.append(text[i])
      i += 1
      continue
    j = i
    while j < len(text) and text[j] not in "+-*":
      j += 1
    operand = text[i:j]
    if operand in spelled:
      keys.append(next(k for k in table.keys if table.key_text(k) == operand))
      out.append(spelled[operand])
    else:
      out.append(str(int(operand.lstrip("#"))))
    i = j
  return "".join(out), keys


@pytest.mark.parametrize("operands,ops", [(2, "+"), (3, "+-*")])
def test_tasks_agree_with_python_arithmetic(operands, ops):
  t = KeyValueTable(30, 3, 0.2, seed=1)
  reg = kv_registry(t, operands, ops)
  tok = t.tokenizer()
  rng = np.random.default_rng(0)
  for _ in range(50):
    ex = reg["held_out"]["kv_arithmetic"].sample(rng)
    assert ex.prompt.endswith("=")
    numeric, keys = _python_expression(t, ex.prompt[:-1])
    assert len(keys) == operands and all(k in t.held_out for k in keys)
    assert int(ex.answer) == eval(numeric)  # Python's own precedence is the reference
    sub = reg["all"]["kv_substitution"].sample(rng)
    assert sub.prompt.endswith(">")
    assert sub.answer == _python_expression(t, sub.prompt[:-1])[0]
    num = reg["all"]["numeric_arithmetic"].sample(rng)
    numeric, keys = _python_expression(t, num.prompt[:-1])
    assert not keys and int(num.answer) == eval(numeric)
    for e in (ex, sub, num):
      assert len(tok.encode(e.prompt)) <= reg["all"][e.task].max_prompt_chars
      assert len(tok.encode(e.answer)) <= reg["all"][e.task].max_answer_chars
  # one token per key, then blank slots; numbers as '#' and zero-padded digits
  assert len(tok.encode(t.key_text(t.keys[0]))) == 3 == len(tok.encode(t.number_text(7)))
  assert t.number_text(7) == "#07" and t.key_text(t.keys[0]).endswith("__")
  assert tok.vocab_size == len(CharTokenizer().chars) + 30
  # a held-in expression set is finite and used whole
  assert reg["held_in"]["kv_arithmetic"].num_prompts == 6 ** operands * len(ops) ** (operands - 1)


def test_lora_control_matches_parameter_count():
  from calm_jax import lora
  from calm.kv_arithmetic import _lora_matching
  from calm_jax.models import DecoderConfig
  cfg = DecoderConfig.make(model_type="llama", vocab_size=100, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
  spec, rank = _lora_matching(cfg, "layers/(q|k|v|o|gate|up|down)", 40_000)
  n = lora.count_params(lora.init_lora(cfg, spec, 0))
  per_rank = lora.count_params(lora.init_lora(cfg, lora.LoRASpec.create(cfg, rank=1), 0))
  assert abs(n - 40_000) <= per_rank / 2 and spec.rank == rank


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["twin", "paper"])
def test_experiment_tiny_end_to_end(tmp_path, fast_compile, objective):
  from calm.kv_arithmetic import run
  from configs.calm.kv_arithmetic import get_config
  config = get_config(f"tiny,objective={objective}")  # batch 16 over the 8 fake devices' data axis
  run(config, tmp_path)
  saved = json.loads((tmp_path / "results.json").read_text())
  assert (tmp_path / "results.png").stat().st_size > 0
  for model in ("m_A", "m_B", "calm"):
    assert set(saved[model]) == {"kv_substitution", "numeric_arithmetic", "kv_arithmetic"}
    assert all(0.0 <= v <= 1.0 for v in saved[model].values())
  assert saved["held_in_keys"] == 4 and saved["n_keys"] == 20
  # only the composition trained: its size is the ComposeParam count of the connections (norms,
  # projection + bias, Q K V O, and the null slot's key: heads x head_dim = e_b); `twin` adds one
  # into the anchor's embedding output
  e_a, e_b = config.m_a.model.hidden_size, config.m_b.model.hidden_size
  assert config.calm.compose.cross_null
  n_conn = {"twin": 2, "paper": 1}[objective]
  assert len(config.calm.compose.anchor_layers) == n_conn
  assert saved["trained_params"] == n_conn * (e_a + e_a * e_b + e_b + e_b + 4 * e_b * e_b + e_b)
  rows = [json.loads(line) for line in (tmp_path / "calm" / "metrics.jsonl").read_text().splitlines()]
  if objective == "twin":  # the CALM stage's loss is the cross-entropy plus 100 x the logged twin term
    assert tuple(config.calm.compose.anchor_layers)[0] == 0 and config.m_b.zero_key_embeddings
    assert rows and all(np.isfinite(r["twin_match"]) and r["twin_match"] > 0 for r in rows)
    assert all(abs(r["loss"] - (r["ce"] + 100.0 * r["twin_match"])) < 1e-3 * max(1.0, r["loss"]) for r in rows)
  else:
    assert rows and all("twin_match" not in r for r in rows)


def test_value_probe_reads_linear_digits_and_not_noise():
  from calm.probe import ridge_digit_accuracy
  rng = np.random.default_rng(0)
  values = rng.permutation(200) + 1
  digits = np.stack([values // 100, values // 10 % 10, values % 10], 1)
  train = np.zeros(200, bool)
  train[:100] = True
  # states linear in the digits (a random embedding per place and digit, plus noise): decodable
  emb = rng.standard_normal((3, 10, 48))
  linear = sum(emb[p][digits[:, p]] for p in range(3)) + 0.1 * rng.standard_normal((200, 48))
  assert ridge_digit_accuracy(linear, digits, train).min() >= 0.95
  # states that identify each key but carry its value only through a random lookup: not decodable
  lookup = rng.standard_normal((200, 48))
  acc = ridge_digit_accuracy(lookup, digits, train)
  assert acc[1:].max() <= 0.3  # tens and units near chance (0.1)


def test_slot_targets_ask_each_slot_for_its_digit():
  # m_A's slot supervision: the k-th slot after a key -> the key's k-th (zero-padded) value digit;
  # with numbers=True a number's slots -> the digit written there; nothing anywhere else.
  t = KeyValueTable(200, 3, 0.2, seed=1)
  tok = t.tokenizer()
  k1, k2 = t.keys[3], t.keys[150]
  text = t.key_text(k1) + "+#047+" + t.key_text(k2) + "="
  assert text.endswith("___=")
  ids = np.asarray([tok.encode(text), tok.encode("#305+" + t.key_text(k1) + "+#621=")])
  for numbers in (False, True):
    targets, mask = t.slot_targets(tok, ids, numbers=numbers)
    for row in range(2):
      chars = [tok.decode([int(i)]) for i in ids[row]]
      want = {}
      for pos, c in enumerate(chars):
        if len(c) == 1 and ord(c) >= 0xE000:  # a key token: its three slots follow
          key = t.keys[ord(c) - 0xE000]
          for j, digit in enumerate(f"{t.values[key]:03d}"):
            want[pos + 1 + j] = digit
        if c == "#" and numbers:
          for j in range(1, 4):
            want[pos + j] = chars[pos + j]
      got = {pos: tok.decode([int(targets[row, pos])]) for pos in np.flatnonzero(mask[row])}
      assert got == want
      assert np.all(targets[row][mask[row] == 0] == -1)
  assert t.values[k1] != t.values[k2]


def test_numeric_twin_writes_each_key_as_its_number():
  t = KeyValueTable(30, 3, 0.2, seed=2)
  tok = t.tokenizer()
  k1, k2 = t.keys[3], t.keys[17]
  prompts = [t.key_text(k1) + "+" + t.key_text(k2) + "=", t.number_text(7) + "+" + t.number_text(12) + "="]
  ids = np.asarray([tok.encode(p) for p in prompts])
  twin = t.numeric_twin(tok, ids)
  want = [t.number_text(t.values[k1]) + "+" + t.number_text(t.values[k2]) + "=", prompts[1]]
  assert [tok.decode(list(r)) for r in twin] == want


def test_twin_loss_matches_numpy(fast_compile):
  """The twin term against numpy: relative squared error of the composed stream to the anchor's own
  stream on the twin, summed over connected layers, over valid positions of the selected rows."""
  import jax
  import jax.numpy as jnp
  from calm import Composed
  from calm.compose import anchor_hidden, forward
  from calm.kv_arithmetic import twin_loss
  from calm_jax.experiment import build_decoder
  from calm_jax.train import lm_loss
  from configs.calm.kv_arithmetic import get_config
  c = get_config("tiny")
  t = KeyValueTable(20, 3, 0.2, seed=0)
  tok = t.tokenizer()
  m = Composed(build_decoder(c.m_b.model, tok, 2), [build_decoder(c.m_a.model, tok, 1)], seed=0, zero_output=False,
               augment_layers=[(1, 2)], anchor_layers=[(0, 2)])
  reg = kv_registry(t)
  exs = [reg["held_in"]["kv_arithmetic"].sample(np.random.default_rng(i)) for i in range(3)]
  exs.append(reg["all"]["numeric_arithmetic"].sample(np.random.default_rng(9)))
  from calm_jax.tasks import encode_batch
  batch = encode_batch(exs, tok, 16)
  batch["twin"] = t.numeric_twin(tok, batch["inputs"])
  rows = np.asarray([1, 0, 1, 1], np.float32)
  loss, metrics = twin_loss(0.5, lambda b: rows)(m, batch, jax.random.key(0))
  p = m.params()
  valid = np.asarray(batch["attention_mask"]).astype(bool)
  logits, _, hid = forward(m.spec, p, jnp.asarray(batch["inputs"]), valid=jnp.asarray(valid), return_hidden=True)
  tgt = anchor_hidden(m.spec, p["anchor"], jnp.asarray(batch["twin"]), valid=jnp.asarray(valid))
  w = (valid * rows[:, None])[..., None]
  match = sum(float(np.sum(w * (np.asarray(hid[j]) - np.asarray(tgt[j])) ** 2) / np.sum(w * np.asarray(tgt[j]) ** 2))
              for j in (0, 2))
  ce = float(lm_loss(logits, batch["targets"], batch["loss_mask"])[0])
  assert match > 0.01
  np.testing.assert_allclose(float(metrics["twin_match"]), match, rtol=1e-4)
  np.testing.assert_allclose(float(loss), ce + 0.5 * match, rtol=1e-4)
  # the encoder ablation: m_A reads only the prompt, in the twin loss as in the model's own forward
  enc = Composed(m.anchor, m.augments, seed=0, zero_output=False, augment_layers=[(1, 2)], anchor_layers=[(0, 2)],
                 aug_mode="encoder")
  _, me = twin_loss(0.5, lambda b: rows)(enc, batch, jax.random.key(0))
  enc_ce = float(lm_loss(enc(batch["inputs"], batch["attention_mask"], batch["prompt_len"]), batch["targets"],
                         batch["loss_mask"])[0])
  np.testing.assert_allclose(float(me["ce"]), enc_ce, rtol=1e-5)
  assert abs(enc_ce - ce) > 1e-4  # the prompt-only read differs from the iterative one
  # `layers`: only those connected layers' terms
  _, m0 = twin_loss(0.5, lambda b: rows, layers=(0,))(m, batch, jax.random.key(0))
  match0 = float(np.sum(w * (np.asarray(hid[0]) - np.asarray(tgt[0])) ** 2) / np.sum(w * np.asarray(tgt[0]) ** 2))
  np.testing.assert_allclose(float(m0["twin_match"]), match0, rtol=1e-4)
  assert match0 < match
  # a numeric row alone: its twin is itself, so the term is the composition's own change of the stream
  only_numeric = np.asarray([0, 0, 0, 1], np.float32)
  _, m2 = twin_loss(1.0, lambda b: only_numeric)(m, batch, jax.random.key(0))
  zero = Composed(m.anchor, m.augments, seed=0, zero_output=True, augment_layers=[(1, 2)], anchor_layers=[(0, 2)])
  _, m3 = twin_loss(1.0, lambda b: only_numeric)(zero, batch, jax.random.key(0))
  assert float(m2["twin_match"]) > 1e-4 and float(m3["twin_match"]) < 1e-10


def test_zero_key_embeddings_touch_only_key_rows(fast_compile):
  """The anchor with its key rows zeroed: those rows are 0, every other parameter is bit-identical,
  and on a prompt without keys its logits are unchanged."""
  import jax
  import jax.numpy as jnp
  from calm.kv_arithmetic import zero_embeddings
  from calm_jax.experiment import build_decoder
  from calm_jax.models import decoder as dec
  from configs.calm.kv_arithmetic import get_config
  t = KeyValueTable(20, 3, 0.2, seed=0)
  tok = t.tokenizer()
  m = build_decoder(get_config("tiny").m_b.model, tok, 2)
  z = zero_embeddings(m, t.key_token_ids(tok))
  ids = t.key_token_ids(tok)
  assert len(ids) == 20 and len(set(ids)) == 20
  before, after = m.params(), z.params()
  assert float(jnp.max(jnp.abs(before["embed"][jnp.asarray(ids)]))) > 0
  assert float(jnp.max(jnp.abs(after["embed"][jnp.asarray(ids)]))) == 0.0
  keep = np.setdiff1d(np.arange(before["embed"].shape[0]), ids)
  np.testing.assert_array_equal(np.asarray(before["embed"])[keep], np.asarray(after["embed"])[keep])
  for a, b in zip(jax.tree.leaves({k: v for k, v in before.items() if k != "embed"}),
                  jax.tree.leaves({k: v for k, v in after.items() if k != "embed"})):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  numeric = jnp.asarray([tok.encode(t.number_text(7) + "+" + t.number_text(12) + "=")])
  np.testing.assert_array_equal(np.asarray(dec.forward(m.config, before, numeric)[0]),
                                np.asarray(dec.forward(z.config, after, numeric)[0]))
  keyed = jnp.asarray([tok.encode(t.key_text(t.keys[0]) + "+" + t.number_text(12) + "=")])
  assert not np.allclose(np.asarray(dec.forward(m.config, before, keyed)[0]), np.asarray(dec.forward(z.config, after, keyed)[0]))
