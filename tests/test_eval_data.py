"""`launch.eval --data`: a model scored on a user's dataset file. The metrics against hand computations,
and end to end on SmolLM2-135M-Instruct against transformers' PyTorch model with the same chat template
(greedy generations, log-likelihoods, perplexity)."""
import json
import math
import re
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest

from calm_jax.data import DataError
from calm_jax.data import metrics as M
from calm_jax.evaluate import evaluate_dataset

ROOT = Path(__file__).resolve().parents[1]
QA = [("What is the capital of France? Answer with one word.", "Paris"),
      ("What is 12 + 30? Give only the number.", "The answer is #### 42"),
      ("Name the largest planet of the solar system.", "Jupiter"),
      ("Translate 'merci' from French to English.", "thank you")]
MC = [("What is the capital of France?", ["Paris", "London", "Berlin"], 0),
      ("Which animal barks?", ["a cat", "a dog", "a fish"], 1),
      ("What colour is the sky on a clear day?", ["green", "blue", "red"], 1)]


def _jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


# ---- the metrics, by hand ---------------------------------------------------------------------------------

@pytest.mark.parametrize("pred,ref,same", [("  The  Paris!", "the paris", True), ("Paris.", "paris", True),
                                           ("Pa-ris", "pa ris", True), ("Paris", "Lyon", False),
                                           ("ｐａｒｉｓ", "paris", True), ("paris france", "paris", False)])
def test_exact_normalises_case_punctuation_space_and_width(pred, ref, same):
  assert M.exact(pred, ref) is same


@pytest.mark.parametrize("text,value", [("so 3 + 4 = 7", Decimal(7)), ("#### 1,234", Decimal(1234)),
                                        ("first 5 then #### -3.5 and 9", Decimal("-3.5")),
                                        ("no number here", None), ("it costs $0.75.", Decimal("0.75"))])
def test_last_number_follows_the_gsm8k_convention(text, value):
  assert M.last_number(text) == value


def test_number_compares_values_not_spellings():
  assert M.number("the result is 42.0", "#### 42")
  assert not M.number("the result is 41", "#### 42")
  assert not M.number("42", "no number in the reference")


def test_choice_accuracy_and_length_normalised_by_hand():
  logliks = [[-3.0, -4.0], [-10.0, -12.0], [-2.0, -1.0]]
  choices = [["a", "bbbb"], ["x", "yyyyyyyy"], ["p", "q"]]
  # acc: argmax 0, 0, 1; per character: [-3, -1], [-10, -1.5], [-2, -1] -> 1, 1, 1
  acc, acc_norm, picks, picks_norm = M.choice_accuracy(logliks, choices, [0, 1, 1])
  assert (picks, picks_norm) == ([0, 0, 1], [1, 1, 1])
  assert (acc, acc_norm) == (2 / 3, 2 / 3)


def test_perplexity_is_corpus_level():
  assert M.perplexity([2.0, 4.0], [1, 3]) == pytest.approx(math.exp(6.0 / 4))


# ---- refusals, before any model is loaded ----------------------------------------------------------------

def test_choice_metric_needs_choices_everywhere(tmp_path):
  data = _jsonl(tmp_path / "mc.jsonl", [{"prompt": "q", "answer": "a", "choices": ["a", "b"]},
                                        {"prompt": "q2", "answer": "b"}])
  with pytest.raises(DataError, match=r"mc\.jsonl:2.*'choices'"):
    evaluate_dataset("no-such-model", data, "choice", tmp_path / "out")
  assert not (tmp_path / "out").exists()


def test_unknown_metric_and_existing_output_refused(tmp_path):
  data = _jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "answer": "a"}])
  with pytest.raises(DataError, match="metric 'bleu'"):
    evaluate_dataset("no-such-model", data, "bleu", tmp_path / "out")
  (tmp_path / "done").mkdir()
  (tmp_path / "done" / "results.json").write_text("{}")
  with pytest.raises(FileExistsError, match="already exists"):
    evaluate_dataset("no-such-model", data, "exact", tmp_path / "done")
  assert (tmp_path / "done" / "results.json").read_text() == "{}"


def test_cli_needs_metric_and_out(tmp_path):
  data = _jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "answer": "a"}])
  proc = subprocess.run([sys.executable, "-m", "launch.eval", "--model=x", f"--data={data}"], cwd=ROOT,
                        capture_output=True, text=True)
  assert proc.returncode != 0 and "--data needs --metric and --out" in proc.stderr


# ---- end to end on the real model, against transformers -------------------------------------------------

@pytest.fixture(scope="module")
def reference(smollm2_dir):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
  model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()

  def chat(messages, generation_prompt):
    out = tok.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True,
                                  return_dict=False)
    return list(out)

  def answer_logprob(prompt, answer):
    """Sum of log p over the tokens the assistant turn adds to the templated prompt, and their count."""
    before = chat([{"role": "user", "content": prompt}], True)
    full = chat([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}], False)
    assert full[:len(before)] == before
    with torch.no_grad():
      logp = model(torch.tensor([full])).logits[0].float().log_softmax(-1)
    picked = logp[torch.arange(len(before) - 1, len(full) - 1), torch.tensor(full[len(before):])]
    return float(picked.sum()), len(full) - len(before)

  def greedy(prompts, n):
    rows = [chat([{"role": "user", "content": p}], True) for p in prompts]
    out = []
    for row in rows:  # one at a time: no padding in the reference
      with torch.no_grad():
        gen = model.generate(torch.tensor([row]), max_new_tokens=n, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.eos_token_id)
      out.append(tok.decode(gen[0, len(row):], skip_special_tokens=True).strip())
    return out

  return answer_logprob, greedy


def _hand_normalise(s):
  return " ".join(re.sub(r"[^\w\s]", " ", s.lower()).split())


@pytest.mark.slow
def test_generations_and_exact_number_scores_match_transformers(smollm2_dir, reference, tmp_path):
  _, greedy = reference
  data = _jsonl(tmp_path / "qa.jsonl", [{"question": q, "solution": a} for q, a in QA])
  out = tmp_path / "exact"
  proc = subprocess.run([sys.executable, "-m", "launch.eval", f"--model={smollm2_dir}", f"--data={data}",
                         "--metric=exact", f"--out={out}", "--max_new_tokens=32", "--batch_size=4",
                         '--fields={"prompt": "question", "answer": "solution"}'],
                        cwd=ROOT, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-2000:]
  preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
  theirs = greedy([q for q, _ in QA], 32)
  assert [p["generated"] for p in preds] == theirs
  assert [p["reference"] for p in preds] == [a for _, a in QA]
  assert [p["source"] for p in preds] == [f"{data}:{i}" for i in range(1, len(QA) + 1)]
  hand = [float(_hand_normalise(g) == _hand_normalise(a)) for g, (_, a) in zip(theirs, QA)]
  assert [p["score"] for p in preds] == hand
  results = json.loads((out / "results.json").read_text())
  assert results["n"] == len(QA) and results["accuracy"] == pytest.approx(np.mean(hand))

  number = evaluate_dataset(smollm2_dir, data, "number", tmp_path / "number", max_new_tokens=32, batch_size=4,
                            fields={"prompt": "question", "answer": "solution"})
  hand_num = []
  for g, (_, a) in zip(theirs, QA):
    nums = re.findall(r"-?\d+(?:\.\d+)?", g.replace(",", ""))
    ref = re.findall(r"-?\d+", a.split("####")[-1]) if "####" in a else re.findall(r"-?\d+", a)
    hand_num.append(float(bool(ref) and bool(nums) and float(nums[-1]) == float(ref[-1])))
  assert number["accuracy"] == pytest.approx(np.mean(hand_num))


@pytest.mark.slow
def test_choice_and_ppl_match_transformers_loglikelihoods(smollm2_dir, reference, tmp_path):
  answer_logprob, _ = reference
  data = _jsonl(tmp_path / "mc.jsonl", [{"prompt": q, "choices": c, "answer": y} for q, c, y in MC])
  res = evaluate_dataset(smollm2_dir, data, "choice", tmp_path / "choice")
  preds = [json.loads(line) for line in (tmp_path / "choice" / "predictions.jsonl").read_text().splitlines()]
  theirs = [[answer_logprob(q, c)[0] for c in choices] for q, choices, _ in MC]
  for p, t in zip(preds, theirs):
    np.testing.assert_allclose(p["logliks"], t, rtol=1e-4)
  acc = np.mean([int(np.argmax(t)) == y for t, (_, _, y) in zip(theirs, MC)])
  acc_norm = np.mean([int(np.argmax([v / len(c) for v, c in zip(t, ch)])) == y for t, (_, ch, y) in zip(theirs, MC)])
  assert (res["accuracy"], res["accuracy_norm"]) == (pytest.approx(acc), pytest.approx(acc_norm))

  chat = _jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": q},
                                                        {"role": "assistant", "content": a}]} for q, a in QA])
  ppl = evaluate_dataset(smollm2_dir, chat, "ppl", tmp_path / "ppl")
  lps = [answer_logprob(q, a) for q, a in QA]
  assert ppl["ppl"] == pytest.approx(math.exp(-sum(v for v, _ in lps) / sum(n for _, n in lps)), rel=1e-4)
  assert ppl["tokens"] == sum(n for _, n in lps)
