"""Transformer² on a model and dataset files of one's own: the SVF expert on JSONL files (1 and 8 devices), the
REINFORCE reward as the data's metric, adaptation on test records, the real classification prompt on
SmolLM2-135M-Instruct, and bad input (clear errors, nothing written)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from calm_jax.data import DataError, Record
from calm_jax.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


class _Chars:
  """A tokenizer of one id per character (id = ord), enough to decode hand-made completions."""
  eos_id = 0

  def decode(self, ids):
    return "".join(chr(i) for i in ids)


def _ids(text, width):
  row = [ord(c) for c in text][:width]
  return row + [7] * (width - len(row))


def test_reinforce_reward_is_the_metric_on_completions():
  """+1 where the completion scores under the data's metric, -1 where not (hand-judged), through the host
  verifier the jitted REINFORCE step calls: the completion ends at its first EOS, rows map to their records."""
  from svf.on_files import make_record_verifier, metric_reward
  refs = ["Paris", "The answer is 42.", "  Hello, World!", "1,234"]
  texts = ["paris.", "42", "hello world", "1234"]
  assert metric_reward(texts, refs, "exact").tolist() == [1, -1, 1, -1]      # case/punctuation fold; 42 != sentence
  assert metric_reward(texts, refs, "number").tolist() == [-1, 1, -1, 1]    # no number in a ref or text -> -1
  # the verifier: record indices pick the references; text after the EOS (id 0) or past `lengths` is ignored
  verify = make_record_verifier(_Chars(), refs, "exact", eos_ids=(0,))
  w = 16
  tokens = np.array([_ids("paris", w), _ids("hello world", w), _ids("Paris", w), _ids("parisx", w)])
  tokens[0, 5] = 0          # EOS right after "paris", junk after it
  tokens[0, 6:] = ord("z")
  lengths = np.array([12, 11, 5, 5])  # row 3: "paris" once cut to its length
  index = np.array([0, 2, 1, 0])      # row 2 answers record 1 ("The answer is 42.") with "Paris"
  assert verify(tokens, lengths, index).tolist() == [1, 1, -1, 1]
  with pytest.raises(KeyError):
    metric_reward(["x"], ["x"], "ppl")


def test_references_the_metric_cannot_match_are_refused():
  from svf.on_files import check_references
  ok = [Record(prompt="q", answer="7", source="a.jsonl:1")]
  check_references(ok, "exact")
  check_references(ok, "number")
  with pytest.raises(DataError, match=r"b\.jsonl:3.*empty after the exact metric"):
    check_references(ok + [Record(prompt="q", answer="?!", source="b.jsonl:3")], "exact")
  with pytest.raises(DataError, match=r"c\.jsonl:2.*no number"):
    check_references([Record(prompt="q", answer="seven", source="c.jsonl:2")], "number")


def _write_task(path: Path, task_name: str, n_train: int, n_val: int, seed: int = 0):
  """A suite task's prompts as JSONL records (the val ones from the task's test split), field "question"."""
  from calm_jax.tasks import get_task
  task, rng = get_task(task_name), np.random.default_rng(seed)
  for name, split, n in ((f"{task_name}_train.jsonl", "train", n_train), (f"{task_name}_val.jsonl", "test", n_val)):
    rows = [task.sample_split(rng, split) for _ in range(n)]
    (path / name).write_text("".join(json.dumps({"question": e.prompt, "answer": e.answer, "domain": task_name})
                                     + "\n" for e in rows))
  return path / f"{task_name}_train.jsonl", path / f"{task_name}_val.jsonl"


def _expert_cmd(base_hf, train, val, workdir, *extra):
  return [sys.executable, "-m", "launch.train", "--config=configs/svf/expert.py", f"--workdir={workdir}",
          f"--config.base={base_hf}", f"--config.data.train={train}", f"--config.data.val={val}",
          "--config.data.fields.prompt=question", "--config.eval.metric=exact", "--config.objective=ntp",
          "--config.optimizer.lr=3e-2", "--config.steps=60", "--config.eval_every=20", *extra]


@pytest.fixture(scope="module")
def count_expert(tiny_base_dir, tmp_path_factory):
  """An SVF expert of the tiny base trained on `count` records (a task the base never learned), one device."""
  tmp = tmp_path_factory.mktemp("svf_count")
  train, val = _write_task(tmp, "count", 2000, 100)
  base_hf = Path(tiny_base_dir) / "hf"
  proc = subprocess.run(_expert_cmd(base_hf, train, val, tmp / "run"), cwd=ROOT, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return {"dir": tmp, "run": tmp / "run", "train": train, "val": val, "base_hf": base_hf,
          "results": json.loads((tmp / "run" / "results.json").read_text())}


def test_svf_expert_on_dataset_files_beats_the_base(count_expert):
  """The expert lifts exact match on its val file by >= 20 points over the base (measured 0 -> 43 %); the base's
  score equals `launch.eval --data` on the same file; the finished run is not reused for another train file."""
  res, tmp = count_expert["results"], count_expert["dir"]
  assert res["split"] == "val" and res["metric"] == "exact" and res["n"] == 100 and res["objective"] == "ntp", res
  assert res["accuracy"] >= res["base_accuracy"] + 0.20, res
  assert (count_expert["run"] / "expert.safetensors").exists()
  p = subprocess.run([sys.executable, "-m", "launch.eval", f"--model={count_expert['base_hf']}",
                      f"--data={count_expert['val']}", "--metric=exact", f"--out={tmp / 'base_eval'}",
                      '--fields={"prompt": "question"}'], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-3000:]
  assert json.loads((tmp / "base_eval" / "results.json").read_text())["accuracy"] == res["base_accuracy"]
  train = count_expert["train"]
  original = train.read_text()
  try:  # the same file name with other records
    train.write_text("".join(original.splitlines(True)[:500]))
    again = subprocess.run(_expert_cmd(count_expert["base_hf"], train, count_expert["val"], count_expert["run"]),
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
  finally:
    train.write_text(original)
  assert again.returncode == 2 and "trained on other data" in again.stderr and "blake2b" in again.stderr, \
      again.stderr[-2000:]


def test_svf_expert_on_dataset_files_on_8_devices(count_expert, tmp_path):
  """The same run on 8 fake devices (batch split 8 ways) beats the base by the same margin, and its z equal
  the 1-device run's (same batches, same steps: only the reduction order differs)."""
  from safetensors.numpy import load_file
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  c = count_expert
  proc = subprocess.run(_expert_cmd(c["base_hf"], c["train"], c["val"], tmp_path / "run8"), cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "8 device(s)" in proc.stdout, proc.stdout[-2000:]
  res = json.loads((tmp_path / "run8" / "results.json").read_text())
  assert res["accuracy"] >= res["base_accuracy"] + 0.20, res
  one, eight = load_file(str(c["run"] / "expert.safetensors")), load_file(str(tmp_path / "run8" / "expert.safetensors"))
  assert sorted(one) == sorted(eight)
  for k in one:
    np.testing.assert_allclose(eight[k], one[k], atol=1e-4, err_msg=k)


def test_adaptation_on_test_records(count_expert, tmp_path):
  """Adaptation on a mixed test file (count + addition records with domains) with the count expert: the
  classification expert (trained here on the count expert's train file + an "other" file) routes >= 75 % of
  the records right and scores >= the base; CEM leaves its shots out of every score; prompt dispatch is
  skipped on the character-level base, saying why."""
  from calm_jax.registry import get_method
  from configs.svf.adapt import get_config
  import svf.adapt  # noqa: F401  (registers svf_adapt)
  c = count_expert
  add_train, add_val = _write_task(tmp_path, "addition", 300, 40, seed=1)
  test = tmp_path / "test.jsonl"
  test.write_text("".join(c["val"].read_text().splitlines(True)[:40]) + add_val.read_text())
  cfg = get_config()
  cfg.base = str(c["base_hf"])
  cfg.experts = {"count": str(c["run"] / "expert.safetensors")}
  cfg.data.test = str(test)
  cfg.data.fields.prompt = "question"
  cfg.classifier.data = {"other": str(add_train)}
  cfg.classifier.train.steps = 60
  cfg.classifier.train.data.fields.prompt = "prompt"
  cfg.strategies = ["prompt", "classifier", "cem"]
  cfg.cem.update(iters=2, n_shots=4, population=8, elites=2)
  cfg.eval.max_new_tokens = 8
  out = get_method("svf_adapt")(cfg, tmp_path / "adapt")
  res = json.loads((tmp_path / "adapt" / "results.json").read_text())
  assert res["n"] == 76 and res["cem_shots"] == 4, res
  assert "skipped" in res["strategies"]["prompt"]
  cls = res["strategies"]["classifier"]
  assert cls["dispatch_accuracy"] >= 0.75, cls  # measured 0.816 (60 classifier steps)
  assert cls["accuracy"] >= res["base"], res
  assert 0.0 <= res["strategies"]["cem"]["accuracy"] <= 1.0 and len(res["strategies"]["cem"]["alpha"]) == 1
  assert out["expert_alone"]["count"] > res["base"]


def test_bad_input_is_refused_and_nothing_is_written(count_expert, tmp_path):
  """Answers the metric cannot match after normalisation, a base without a tokenizer, an expert of another
  base: errors naming the culprit, and the workdir holds nothing but the run marker every method's workdir gets."""
  import shutil

  from calm_jax.registry import get_method
  from configs.svf.adapt import get_config as adapt_config
  from configs.svf.expert import get_config as expert_config
  import svf.adapt  # noqa: F401
  import svf.train  # noqa: F401
  c = count_expert
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"question": "cnt:a|a=", "answer": "1"}) + "\n"
                 + json.dumps({"question": "cnt:b|b=", "answer": "..."}) + "\n")
  cfg = expert_config()
  cfg.base, cfg.data.train, cfg.data.fields.prompt = str(c["base_hf"]), str(bad), "question"
  with pytest.raises(DataError, match=r"bad\.jsonl:2.*empty after the exact metric"):
    get_method("svf_expert")(cfg, tmp_path / "w1")
  assert [p.name for p in (tmp_path / "w1").iterdir()] == ["calm_jax_run.json"]

  no_tok = tmp_path / "no_tokenizer"
  shutil.copytree(c["base_hf"], no_tok)
  (no_tok / "char_tokenizer.json").unlink()
  cfg.base, cfg.data.train = str(no_tok), str(c["train"])
  with pytest.raises(UserError, match=f"{no_tok} has no tokenizer"):
    get_method("svf_expert")(cfg, tmp_path / "w2")
  assert [p.name for p in (tmp_path / "w2").iterdir()] == ["calm_jax_run.json"]

  # another base: the tiny base with one weight changed (same shapes, another fingerprint)
  from safetensors.numpy import load_file, save_file
  other = tmp_path / "other_base"
  shutil.copytree(c["base_hf"], other)
  weights = load_file(str(other / "model.safetensors"))
  name = sorted(weights)[0]
  weights[name] = weights[name] * 1.01
  save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
  expert = c["run"] / "expert.safetensors"
  acfg = adapt_config()
  acfg.base, acfg.experts, acfg.data.test = str(other), {"count": str(expert)}, str(c["val"])
  acfg.data.fields.prompt = "question"
  acfg.svf.cache_dir = str(tmp_path / "svd_cache")
  with pytest.raises(UserError, match=f"{expert} was trained on base"):
    get_method("svf_adapt")(acfg, tmp_path / "w3")
  assert [p.name for p in (tmp_path / "w3").iterdir()] == ["calm_jax_run.json"]


# Hand-written prompts over four categories (none of them is a few-shot example below).
DISPATCH_PROMPTS = {
    "math": ["What is 17 + 25?", "Compute 8 times 7.", "What is 100 minus 36?", "Add 45 and 19.",
             "How much is 12 divided by 4?"],
    "reverse": ["Reverse the word 'garden'.", "Write 'pencil' backwards.", "Spell the word 'monkey' in reverse order.",
                "What is 'river' reversed?", "Reverse the letters of 'candle'."],
    "uppercase": ["Write 'hello world' in capital letters.", "Convert 'good morning' to uppercase.",
                  "Make 'blue sky' all caps.", "Rewrite 'open the door' in upper case.",
                  "Capitalize every letter of 'quiet night'."],
    "other": ["What is the capital of France?", "Name a fruit that is yellow.", "Who wrote Romeo and Juliet?",
              "What color is grass?", "Tell me a fun fact about cats."],
}
DISPATCH_SHOTS = {
    "math": ["What is 6 + 9?", "Multiply 3 by 11.", "What is 50 minus 8?", "Divide 90 by 3."],
    "reverse": ["Reverse the word 'table'.", "Write 'apple' backwards.", "What is 'stone' spelled in reverse?",
                "Reverse the letters of 'cloud'."],
    "uppercase": ["Write 'red apple' in capital letters.", "Convert 'big house' to uppercase.",
                  "Make 'fast car' all caps.", "Rewrite 'green tea' in upper case."],
    "other": ["What is the tallest mountain?", "Who painted the Mona Lisa?", "Name an animal that can fly.",
              "What do bees make?"]}
# Measured with the shipped template (docs/svf.md): four examples per category FEWSHOT_MEASURED, zero-shot
# ZEROSHOT_MEASURED; the bound is a regression bound one prompt below the measurement.
FEWSHOT_MEASURED, ZEROSHOT_MEASURED = 0.95, 0.25


def test_prompt_dispatch_on_smollm2(smollm2_dir):
  """The paper's classification prompt on SmolLM2-135M-Instruct: category names scored by log-likelihood, with
  the shipped few-shot template, classify the hand-written prompts at least as well as docs/svf.md records."""
  from calm_jax import hf
  from calm_jax.tokenizers import load_tokenizer
  from configs.svf.adapt import get_config
  from svf.dispatch import interleave_examples, score_categories
  model, tok = hf.load(smollm2_dir), load_tokenizer(smollm2_dir)
  prompts = [p for ps in DISPATCH_PROMPTS.values() for p in ps]
  truth = [label for label, ps in DISPATCH_PROMPTS.items() for _ in ps]
  cats = list(DISPATCH_PROMPTS)
  dispatch = get_config().dispatch
  acc = {}
  for name, ex in (("few", interleave_examples(DISPATCH_SHOTS)), ("zero", ())):
    got, ll = score_categories(model, tok, prompts, cats, template=dispatch.category_template, examples=ex,
                               example_template=dispatch.example_template, chat_template=dispatch.chat_template,
                               per_token=dispatch.per_token, calibrate=dispatch.calibrate)
    assert ll.shape == (len(prompts), len(cats)) and np.all(np.isfinite(ll))
    acc[name] = float(np.mean([g == t for g, t in zip(got, truth)]))
  n = len(prompts)
  assert acc["few"] >= FEWSHOT_MEASURED - 1 / n - 1e-9, acc
  assert acc["zero"] >= ZEROSHOT_MEASURED - 1 / n - 1e-9, acc
