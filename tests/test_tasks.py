"""Synthetic task suite: answers, splits, mixtures, batching and evaluation."""

import re
from collections import Counter

import numpy as np
import pytest

from calm_jax.tasks import (
  SPLITS,
  TASKS,
  Example,
  Mixture,
  encode_batch,
  evaluate,
  get_task,
  make_eval_set,
  max_seq_len,
)
from calm_jax.tokenizers import CharTokenizer

TOK = CharTokenizer()


def _kv_map():
  return TASKS["kv_lookup"].kv.mapping


def _expected(prompt: str) -> str:
  """An independent solver: parse the prompt and compute the answer with plain Python."""
  tag, _, rest = prompt.partition(":")
  assert rest.endswith("="), prompt
  body = rest[:-1]
  if tag == "add":
    a, b = re.fullmatch(r"(\d+)\+(\d+)", body).groups()
    return str(int(a) + int(b))
  if tag == "sub":
    a, b = re.fullmatch(r"(\d+)-(\d+)", body).groups()
    assert int(a) >= int(b)
    return str(int(a) - int(b))
  if tag == "kv":
    return str(_kv_map()[re.fullmatch(r"[a-z]+", body).group()])
  if tag == "rev":
    return "".join(reversed(body))
  if tag == "sort":
    return "".join(sorted(body))
  if tag == "copy":
    return body
  if tag == "cnt":
    c, s = re.fullmatch(r"([a-z])\|([a-z]+)", body).groups()
    return str(sum(ch == c for ch in s))
  if tag == "max":
    return str(max(int(x) for x in body.split(",")))
  if tag == "up":
    return body.upper()
  raise AssertionError(f"no independent solver for {prompt!r}")


def test_registry_has_the_suite():
  assert len(TASKS) >= 7
  for name in ["addition", "subtraction", "kv_lookup", "reverse", "sort", "copy", "count"]:
    assert get_task(name).name == name
  tags = {TASKS[n].sample(np.random.default_rng(0)).prompt.split(":")[0] for n in TASKS}
  assert len(tags) == len(TASKS)  # every task has its own tag


def test_unknown_task_lists_known_names():
  with pytest.raises(KeyError, match="known tasks: .*addition"):
    get_task("nope")


def test_get_task_with_overrides():
  kv = get_task("kv_lookup", n_keys=8, map_seed=3)
  assert len(kv.kv.mapping) == 8 and kv is not TASKS["kv_lookup"]
  assert get_task("kv_lookup", n_keys=8, map_seed=3).kv.mapping == kv.kv.mapping
  assert get_task("kv_lookup", n_keys=8, map_seed=4).kv.mapping != kv.kv.mapping


@pytest.mark.parametrize("name", sorted(TASKS))
def test_answers_are_correct_and_short(name):
  task = TASKS[name]
  rng = np.random.default_rng(123)
  for _ in range(200):
    ex = task.sample(rng)
    assert ex.task == name
    assert ex.answer == _expected(ex.prompt), ex
    assert len(ex.prompt) <= task.max_prompt_chars <= 24
    assert 1 <= len(ex.answer) <= task.max_answer_chars <= 8
    TOK.encode(ex.prompt + ex.answer)  # every character is in the vocabulary
    assert task.verify(ex.answer, ex.answer) and task.verify(f" {ex.answer}\n", ex.answer)
    assert not task.verify(ex.answer + "0", ex.answer)


def test_kv_map_is_fixed_by_seed_and_not_in_prompt():
  kv = TASKS["kv_lookup"]
  assert kv.kv.mapping == get_task("kv_lookup", n_keys=kv.n_keys).kv.mapping
  ex = kv.sample(np.random.default_rng(0))
  assert re.fullmatch(r"kv:[a-z]{3}=", ex.prompt)  # the value is not in the prompt


@pytest.mark.parametrize("name", sorted(TASKS))
def test_splits_deterministic_disjoint_and_seeded(name):
  task = TASKS[name]
  n = 40
  splits = {s: task.split(s, n, seed=0) for s in SPLITS}
  for s in SPLITS:
    assert len(splits[s]) == n
    assert len({e.prompt for e in splits[s]}) == n  # unique within a split
    assert task.split(s, n, seed=0) == splits[s]  # deterministic
    assert task.split(s, n, seed=1) != splits[s]  # seed matters
  if task.memorization:
    # kv_lookup: every split queries the memorised map.
    assert all(e.prompt[3:-1] in task.kv.mapping for s in SPLITS for e in splits[s])
    return
  prompts = {s: {e.prompt for e in splits[s]} for s in SPLITS}
  assert not prompts["train"] & prompts["val"]
  assert not prompts["train"] & prompts["test"]
  assert not prompts["val"] & prompts["test"]
  # Disjoint across seeds too: split membership depends only on the prompt.
  other_train = {e.prompt for e in task.split("train", 200, seed=7)}
  assert not other_train & (prompts["val"] | prompts["test"])


def test_split_too_small_raises():
  with pytest.raises(ValueError, match="distinct"):
    get_task("kv_lookup", n_keys=4).split("test", 5, seed=0)
  with pytest.raises(ValueError, match="unknown split"):
    TASKS["addition"].split("dev", 3)


def test_mixture_weights_and_domain_ids():
  weights = {"addition": 0.5, "reverse": 0.3, "kv_lookup": 0.2, "count": 0.0}
  mix = Mixture(weights, seed=0)
  assert mix.domains == ("addition", "count", "kv_lookup", "reverse")  # sorted, stable
  exs = mix.examples(0, 4000)
  freq = Counter(e.task for e in exs)
  for name, w in weights.items():
    assert abs(freq[name] / len(exs) - w) < 0.03, (name, freq)
  for e in exs:
    assert e.domain_id == mix.domains.index(e.task) == mix.domain_id(e.task)
    assert TASKS[e.task].in_split(e.prompt, "train")
  # Stateless and deterministic: example i depends only on (seed, i).
  assert mix.examples(100, 5) == exs[100:105]
  assert Mixture(dict(reversed(list(weights.items()))), seed=0).examples(0, 50) == exs[:50]
  assert Mixture(weights, seed=1).examples(0, 50) != exs[:50]
  # Held-out split streams stay out of training data.
  test_mix = Mixture(["addition", "reverse"], seed=0, split="test")
  assert all(TASKS[e.task].split_of(e.prompt) == "test" for e in test_mix.examples(0, 200))


def test_mixture_explicit_domains_and_errors():
  mix = Mixture({"reverse": 1.0}, domains=["addition", "reverse"])
  assert {e.domain_id for e in mix.examples(0, 20)} == {1}
  with pytest.raises(ValueError, match="not in domains"):
    Mixture({"sort": 1.0}, domains=["addition"])
  with pytest.raises(ValueError, match="weights"):
    Mixture({"sort": -1.0, "copy": 1.0})
  with pytest.raises(KeyError, match="known tasks"):
    Mixture({"sorting": 1.0})


def test_encode_batch_masks_answer_and_eos():
  mix = Mixture(sorted(TASKS), seed=3)
  exs = mix.examples(0, 64)
  T = max_seq_len(TASKS)
  batch = encode_batch(exs, TOK, T)
  B = len(exs)
  for k in ["tokens", "inputs", "targets", "attention_mask"]:
    assert batch[k].shape == (B, T) and batch[k].dtype == np.int32
  assert batch["loss_mask"].dtype == np.float32 and batch["domain"].dtype == np.int32
  np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])
  np.testing.assert_array_equal(batch["domain"], [e.domain_id for e in exs])
  for b, ex in enumerate(exs):
    row = batch["tokens"][b]
    n = len(ex.prompt) + len(ex.answer) + 2
    assert row[0] == TOK.bos_id and batch["length"][b] == n
    assert TOK.decode(row[1 : 1 + len(ex.prompt)]) == ex.prompt
    assert batch["prompt_len"][b] == 1 + len(ex.prompt)
    assert (row[n:] == TOK.pad_id).all() and batch["attention_mask"][b].sum() == n
    mask = batch["loss_mask"][b].astype(bool)
    masked = batch["targets"][b][mask].tolist()
    assert masked == TOK.encode(ex.answer) + [TOK.eos_id]  # exactly answer + eos
    assert TOK.decode(masked[:-1]) == ex.answer
    assert np.flatnonzero(mask).tolist() == list(range(len(ex.prompt), n - 1))


def test_encode_batch_too_long_raises():
  ex = Example("copy:abcdefgh=", "abcdefgh", "copy")
  encode_batch([ex], TOK, 1 + 14 + 8 + 1)
  with pytest.raises(ValueError, match="seq_len"):
    encode_batch([ex], TOK, 1 + 14 + 8)


def _oracle(examples_by_prompt, wrong_tasks=()):
  """A fake generate_fn that answers right (answer + eos + junk), except for `wrong_tasks`."""

  def generate(prompts, max_new_tokens):
    out = []
    for p in prompts:
      assert p[0] == TOK.bos_id
      ex = examples_by_prompt[TOK.decode(p)]
      answer = "x" if ex.task in wrong_tasks else ex.answer
      ids = TOK.encode(answer) + [TOK.eos_id] + TOK.encode("zz")
      assert len(TOK.encode(ex.answer)) + 1 <= max_new_tokens
      out.append(ids)
    return out

  return generate


def test_evaluate_oracle_wrong_and_partial():
  exs = make_eval_set(["addition", "reverse", "kv_lookup"], 10, split="test", seed=0)
  assert Counter(e.task for e in exs) == {"addition": 10, "reverse": 10, "kv_lookup": 10}
  by_prompt = {e.prompt: e for e in exs}
  scores = evaluate(_oracle(by_prompt), TOK, exs, batch_size=7)
  assert scores == {"addition": 1.0, "reverse": 1.0, "kv_lookup": 1.0, "overall": 1.0}

  wrong = _oracle(by_prompt, wrong_tasks={"addition", "reverse", "kv_lookup"})
  assert evaluate(wrong, TOK, exs, batch_size=8)["overall"] == 0.0

  scores, records = evaluate(
    _oracle(by_prompt, wrong_tasks={"reverse"}), TOK, exs, batch_size=4, return_predictions=True
  )
  assert scores["addition"] == 1.0 and scores["reverse"] == 0.0 and scores["kv_lookup"] == 1.0
  assert scores["overall"] == pytest.approx(20 / 30)
  assert len(records) == 30 and [r["prompt"] for r in records] == [e.prompt for e in exs]
  rec = next(r for r in records if r["task"] == "addition")
  assert rec["prediction"] == rec["answer"] and rec["correct"]


def test_evaluate_checks_generate_output_length():
  exs = make_eval_set(["copy"], 3)
  with pytest.raises(ValueError, match="returned 0 sequences"):
    evaluate(lambda prompts, n: [], TOK, exs)


def test_make_eval_set_caps_memorization_and_labels_domains():
  exs = make_eval_set(["kv_lookup", "sort"], 100, split="val")
  freq = Counter(e.task for e in exs)
  assert freq["kv_lookup"] == TASKS["kv_lookup"].n_keys and freq["sort"] == 100
  assert {e.domain_id for e in exs if e.task == "kv_lookup"} == {0}
  assert {e.domain_id for e in exs if e.task == "sort"} == {1}


def test_interleaved_keeps_each_parts_split_and_tag():
  """A mixed task's prompts come from every part, and each lies in the split its own part puts it
  in, so a mixed test set holds no prompt that a part's training split (an expert's data) has."""
  from calm_jax.tasks import Interleaved, split_of
  parts = [get_task("addition", max_digits=2), get_task("max"), get_task("subtraction", max_digits=2)]
  mixed = Interleaved("mixed", parts)
  test = mixed.split("test", 300, seed=0)
  tags = Counter(ex.prompt.split(":")[0] for ex in test)
  assert tags == {"add": 100, "max": 100, "sub": 100}  # equal shares, whatever each part's prompt space
  assert len({ex.prompt for ex in test}) == 300 and [e.prompt for e in test] != sorted(e.prompt for e in test)
  assert len(Counter(ex.prompt.split(":")[0] for ex in mixed.split("val", 7, seed=1))) == 3
  by_tag = {"add": "addition", "max": "max", "sub": "subtraction"}
  for ex in test:
    assert ex.task == "mixed" and split_of(by_tag[ex.prompt.split(":")[0]], ex.prompt) == "test"
    assert mixed.verify(ex.answer, ex.answer)
  # the same prompt under the mixed name alone would often land elsewhere: the split is the part's
  assert any(split_of("mixed", ex.prompt) != "test" for ex in test)
  assert mixed.max_prompt_chars == max(p.max_prompt_chars for p in parts)


def test_interleaved_errors_name_the_culprit():
  from calm_jax.tasks import Interleaved
  with pytest.raises(ValueError, match="'addition' and 'addition_3d'.*'add'"):
    a3 = get_task("addition", max_digits=3)
    a3.name = "addition_3d"
    Interleaved("m", [get_task("addition"), a3])
  with pytest.raises(ValueError, match="at least one part"):
    Interleaved("m", [])
  with pytest.raises(ValueError, match="no part has the tag of 'rev:abc='"):
    Interleaved("m", [get_task("addition")]).split_of("rev:abc=")
