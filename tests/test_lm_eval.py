"""lm-eval's `calm_jax` model (calm_jax/lm_eval_model.py) against lm-eval's own `hf` model on the same
checkpoint, SmolLM2-135M-Instruct: a local multiple-choice task through `simple_evaluate`, rolling
log-likelihoods over several windows, greedy generations cut at `until` strings, the CLI wrapper and
the import guard. The `hf` model (transformers, PyTorch) is the independent reference.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("torch")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from calm_jax.lm_eval_model import CalmJaxLM  # noqa: E402  (the import registers "calm_jax")

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TASK = "calm_jax_mc"
RTOL = 1e-4  # fp32 both sides; measured max relative difference of a log-likelihood ~3e-5
QUESTIONS = [
    ("What is the capital of France?", ["Paris", "London", "Berlin", "Madrid"], 0),
    ("What is the capital of Japan?", ["Beijing", "Seoul", "Tokyo", "Bangkok"], 2),
    ("What is 2 + 2?", ["3", "4", "5", "22"], 1),
    ("What is 3 + 5?", ["6", "7", "9", "8"], 3),
    ("What is 10 - 3?", ["7", "13", "3", "10"], 0),
    ("What colour is the sky on a clear day?", ["green", "red", "blue", "black"], 2),
    ("What colour is grass?", ["purple", "green", "orange", "white"], 1),
    ("What is the opposite of hot?", ["warm", "big", "fast", "cold"], 3),
    ("How many legs does a dog have?", ["four", "two", "six", "eight"], 0),
    ("Which animal says meow?", ["dog", "cow", "cat", "duck"], 2),
    ("What is the first month of the year?", ["March", "January", "July", "December"], 1),
    ("What do bees make?", ["milk", "silk", "wool", "honey"], 3),
]
TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""
ROLLING = [
    "The history of the city goes back thousands of years. Farmers settled by the river, traders followed, and "
    "by the middle ages a bridge, a market and a cathedral stood where the roads met. Today about two million "
    "people live there, and visitors come for the museums, the food and the old town by the water. The river "
    "still floods every few springs, and the oldest houses keep a line on their walls to show how high it rose.",
    "A short one.",
    "",
]
MAX_LENGTH = 64  # the rolling text is 89 tokens: two windows, the second with a full-length context


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
  """A directory with the multiple-choice task's YAML and its JSONL (for TaskManager's include_path)."""
  path = tmp_path_factory.mktemp("lm_eval_task")
  data = path / "mc.jsonl"
  data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
  (path / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data=data, cache=path / "hf_datasets"))
  return path


@pytest.fixture(scope="module")
def models(smollm2_dir):
  """(ours, hf) with a small max_length, so that rolling windows and prompt truncation happen."""
  ours = CalmJaxLM(pretrained=str(smollm2_dir), dtype="float32", max_length=MAX_LENGTH, batch_size=4)
  ref = HFLM(pretrained=str(smollm2_dir), dtype="float32", device="cpu", max_length=MAX_LENGTH, batch_size=4)
  return ours, ref


def _evaluate(model, smollm2_dir, task_dir):
  """(metrics, log-likelihood per doc and choice) of `model` on the task through simple_evaluate."""
  out = lm_eval.simple_evaluate(model=model, model_args=f"pretrained={smollm2_dir},dtype=float32", tasks=[TASK],
                                task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
                                batch_size=8, device="cpu", log_samples=True)
  samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
  return out["results"][TASK], np.array([[r[0] for r in s["filtered_resps"]] for s in samples])


def test_multiple_choice_matches_hf(smollm2_dir, task_dir):
  ours, ours_ll = _evaluate("calm_jax", smollm2_dir, task_dir)
  ref, ref_ll = _evaluate("hf", smollm2_dir, task_dir)
  assert ours_ll.shape == ref_ll.shape == (len(QUESTIONS), 4)
  np.testing.assert_allclose(ours_ll, ref_ll, rtol=RTOL)
  for metric in ("acc,none", "acc_norm,none"):
    assert ours[metric] == ref[metric], (metric, ours, ref)
  assert ours["acc,none"] >= 0.5, ours  # easy questions: the model (and so the comparison) is not guessing


def test_loglikelihood_rolling_matches_hf(models):
  ours, ref = models
  assert len(ours.tok_encode(ROLLING[0])) > MAX_LENGTH  # several windows
  reqs = [Instance("loglikelihood_rolling", {}, (s,), i) for i, s in enumerate(ROLLING)]
  got, want = ours.loglikelihood_rolling(reqs, disable_tqdm=True), ref.loglikelihood_rolling(reqs, disable_tqdm=True)
  np.testing.assert_allclose(got, want, rtol=RTOL)
  assert got[2] == 0.0  # the empty string: no windows


def test_loglikelihood_matches_hf(models):
  """Request shapes the task above does not make: empty context, trailing space, a context longer than
  max_length (left-truncated), a chat-templated context (it starts with bos: no special tokens added)."""
  ours, ref = models
  chat = ref.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
  pairs = [("", "Hello world"), ("The colour of the sky is ", "blue"), (" ".join(["word"] * 80), " word"),
           (chat, "The capital of France is Paris.")]
  reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
  got, want = ours.loglikelihood(reqs, disable_tqdm=True), ref.loglikelihood(reqs, disable_tqdm=True)
  np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=RTOL)
  assert [g[1] for g in got] == [w[1] for w in want]


def test_generate_until_matches_hf(models):
  ours, ref = models
  chat = ref.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
  assert ours.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}]) == chat
  assert ours.tokenizer_name == ref.tokenizer_name and ours.chat_template(True) == ref.chat_template(True)
  cut = {"until": ["."], "max_gen_toks": 24}
  lines = {"until": ["\n"], "max_gen_toks": 16, "do_sample": False}
  args = [("The capital of France is", cut), ("Once upon a time", cut), ("My favourite food is", lines),
          (chat, lines), ("1, 2, 3, 4,", cut)]
  reqs = [Instance("generate_until", {}, a, i) for i, a in enumerate(args)]
  got, want = ours.generate_until(reqs, disable_tqdm=True), ref.generate_until(reqs, disable_tqdm=True)
  assert got == want
  assert all("." not in g for g, (_, kw) in zip(got, args) if kw is cut) and any(got)


def test_generate_until_refuses_sampling(models):
  ours, _ = models
  with pytest.raises(NotImplementedError, match="greedy only"):
    ours.generate_until([Instance("generate_until", {}, ("Hi", {"do_sample": True, "temperature": 0.7}), 0)])


def test_cli_wrapper(smollm2_dir, task_dir):
  """`python -m calm_jax.lm_eval_model` is lm-eval's CLI with the model registered (chat template on)."""
  cmd = [sys.executable, "-m", "calm_jax.lm_eval_model", "--model", "calm_jax", "--model_args",
         f"pretrained={smollm2_dir}", "--tasks", TASK, "--include_path", str(task_dir), "--limit", "4",
         "--batch_size", "8", "--apply_chat_template"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert TASK in proc.stdout and "acc_norm" in proc.stdout, proc.stdout[-3000:]


def test_import_without_lm_eval():
  """calm_jax never needs lm_eval; the adapter without it says how to install it."""
  code = ("import sys; sys.modules['lm_eval'] = None\n"
          "import calm_jax, calm_jax.scoring\n"
          "try:\n  import calm_jax.lm_eval_model\nexcept ImportError as e:\n  print(e)\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "pip install -e '.[eval]'" in proc.stdout, proc.stdout
