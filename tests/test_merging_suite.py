"""The merging experiment on the trained tiny base (`configs/merge/suite.py:tiny`, fine-tunes long
enough to move the models): MetaGPT's λ_t equal the closed form computed with numpy from the
checkpoints on disk, `launch.eval` re-scores the merged models from their HF directories alone and
gets the reported accuracies, and merging does what it is for — the merge keeps a task that the
other task's fine-tune forgot. Then the same experiment on "the user's" models and JSONL eval files
(`config.models`, `config.data.eval`), against numpy, transformers and the 1-device run, and its bad input."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from merging.suite import normalized_accuracy

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("addition", "max")


def test_normalized_accuracy_skips_tasks_the_finetune_fails():
  assert normalized_accuracy({"a": 0.5, "b": 0.2}, {"a": 1.0, "b": 0.0}) == pytest.approx(0.5)
  assert normalized_accuracy({"a": 0.5, "b": 0.9}, {"a": 0.5, "b": 0.6}) == pytest.approx((1.0 + 1.5) / 2)


@pytest.fixture(scope="module")
def suite(tiny_base_dir, tmp_path_factory):
  """The tiny suite with 60 fine-tuning steps of 32 per task and the merged models kept."""
  workdir = tmp_path_factory.mktemp("merge_suite")
  p = subprocess.run([sys.executable, "-m", "launch.train", "--config=configs/merge/suite.py:tiny",
                      f"--workdir={workdir}", f"--config.base_workdir={tiny_base_dir}",
                      "--config.finetune.steps=60", "--config.finetune.batch_size=32", "--config.eval.n_per_task=100",
                      "--config.merge.keep=True"], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  assert "normalized" in p.stdout and (workdir / "results.png").stat().st_size > 0
  return workdir, json.loads((workdir / "results.json").read_text())


def weights(hf_dir: Path) -> dict:
  return {k: v.astype(np.float64) for f in sorted(hf_dir.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_metagpt_lambdas_are_the_closed_form_of_the_saved_checkpoints(suite, tiny_base_dir):
  """λ_t = ‖θ_t − θ_0‖² / Σ_k ‖θ_k − θ_0‖² over the whole parameter vector, from the files."""
  workdir, res = suite
  base = weights(tiny_base_dir / "hf")
  sq = [sum(np.sum((w[k] - base[k]) ** 2) for k in base)
        for w in (weights(workdir / "finetuned" / t / "hf") for t in TASKS)]
  np.testing.assert_allclose(res["metagpt_lambdas"]["metagpt"], np.asarray(sq) / sum(sq), rtol=1e-5)
  assert abs(sq[0] - sq[1]) > 0.01 * sum(sq)  # the two fine-tunes moved by different amounts: λ is not 1/2


@pytest.mark.parametrize("row,dirname", [("metagpt", "metagpt"), ("task_arithmetic λ=0.2", "task_arithmetic_lam0.2")])
def test_launch_eval_rescores_a_merged_model_from_its_directory(suite, tmp_path, row, dirname):
  workdir, res = suite
  merged = workdir / "merged" / dirname
  p = subprocess.run([sys.executable, "-m", "launch.eval", f"--model={merged}", f"--tasks={','.join(TASKS)}",
                      "--n_per_task=100", f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                     timeout=300)
  assert p.returncode == 0, p.stderr[-2000:]
  acc = json.loads((tmp_path / "results.json").read_text())["accuracy"]
  assert {t: acc[t] for t in TASKS} == res["merged"][row]


def test_the_merge_keeps_what_a_single_finetune_forgets(suite):
  """Fine-tuning on max wipes out most of the base's addition; MetaGPT's merge of the two fine-tunes
  keeps addition far above that (measured: 15 % after the max fine-tune, 60 % merged, base 81 %),
  and keeps max within a few points of its own fine-tune (79 vs 84)."""
  _, res = suite
  forgot = res["finetuned_all"]["max"]["addition"]
  merged = res["merged"]["metagpt"]
  assert res["base"]["addition"] - forgot >= 0.4  # the forgetting the merge has to undo is real
  assert merged["addition"] - forgot >= 0.3
  assert merged["max"] >= res["finetuned"]["max"] - 0.1


# --- the same experiment on one's own fine-tunes and eval files (`config.models`, merging/suite_files.py) ----------
# The suite's two fine-tunes above stand in for the user's models; their eval files are JSONL written from each
# task's test split. A record's file:line is its `source` in the predictions, so the tests can tell which records
# the run held out for choosing λ.

N_RECORDS = 60  # per eval file; val_fraction 0.5 -> 30 val, 30 test
USER_ROWS = ("task_arithmetic λ=0.2", "task_arithmetic λ=0.6", "metagpt", "metagpt+ties")


def write_eval_files(where: Path, n: int = N_RECORDS) -> dict:
  """{task: JSONL path} of `n` distinct test-split examples each, with the base's task settings."""
  from calm_jax.tasks import get_task, task_registry
  from configs.merge.suite import get_config
  registry = task_registry(get_config().data.task_args)
  out = {}
  for task in TASKS:
    examples = (registry.get(task) or get_task(task)).split("test", n, seed=1)
    out[task] = where / f"{task}_eval.jsonl"
    out[task].write_text("".join(json.dumps({"question": e.prompt, "answer": e.answer}) + "\n" for e in examples))
  return out


def user_command(base, models: dict, evals: dict, workdir, *extra) -> list[str]:
  return [sys.executable, "-m", "launch.train", "--config=configs/merge/suite.py", f"--workdir={workdir}",
          f"--config.base={base}", f"--config.models={json.dumps({t: str(d) for t, d in models.items()})}",
          f"--config.data.eval={json.dumps({t: str(p) for t, p in evals.items()})}",
          "--config.data.fields.prompt=question", "--config.eval.max_new_tokens=16",
          "--config.merge.lambdas=(0.2, 0.6)", '--config.merge.methods=("task_arithmetic", "metagpt", "metagpt+ties")',
          *extra]


@pytest.fixture(scope="module")
def user_run(suite, tiny_base_dir, tmp_path_factory):
  """The command on the suite's fine-tunes (as the user's directories) and JSONL eval files, one device,
  merged models kept: (workdir, results, inputs)."""
  workdir, _ = suite
  files = tmp_path_factory.mktemp("user_files")
  evals = write_eval_files(files)
  models = {t: workdir / "finetuned" / t / "hf" for t in TASKS}
  inputs = dict(base=Path(tiny_base_dir) / "hf", models=models, evals=evals)
  out = files / "run"
  p = subprocess.run(user_command(inputs["base"], models, evals, out, "--config.merge.keep=True"), cwd=ROOT,
                     capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  assert "normalized" in p.stdout and (out / "results.png").stat().st_size > 0
  return out, json.loads((out / "results.json").read_text()), inputs


def test_user_task_arithmetic_rows_are_base_plus_lambda_sum_of_task_vectors(user_run):
  """Each task-arithmetic row's merged model, read back from its HF directory, is θ_0 + λ Σ_t (θ_t − θ_0)
  computed with numpy from the user's files; the "(val λ)" row is the grid row with the best validation
  normalized accuracy (ties: the smaller λ)."""
  out, res, inputs = user_run
  base = weights(inputs["base"])
  tuned = [weights(inputs["models"][t]) for t in res["tasks"]]
  assert res["tasks"] == list(TASKS)
  for lam in (0.2, 0.6):
    merged = weights(out / "merged" / f"task_arithmetic_lam{lam}")
    assert merged.keys() == base.keys()
    for k in base:
      np.testing.assert_allclose(merged[k], base[k] + lam * sum(w[k] - base[k] for w in tuned), rtol=1e-5,
                                 atol=1e-6, err_msg=k)
  val = res["selected_lambda"]["val_normalized"]
  best = max(sorted(val, key=lambda r: float(r.split("=")[1])), key=lambda r: val[r])
  assert res["selected_lambda"]["row"] == best and res["merged"]["task_arithmetic (val λ)"] == res["merged"][best]
  assert set(res["merged"]) == {*USER_ROWS, "task_arithmetic (val λ)"}


def greedy_torch(model_dir: Path, prompts: list[str], max_new_tokens: int = 16) -> list[str]:
  """Greedy answers of the HF checkpoint under transformers (PyTorch `generate`; prompts of one length in
  one batch, so no padding), with the character vocabulary read from char_tokenizer.json: the reference
  for our decoder, decoding loop and tokenizer."""
  import torch
  from transformers import LlamaForCausalLM
  chars = json.loads((model_dir / "char_tokenizer.json").read_text())["chars"]
  model = LlamaForCausalLM.from_pretrained(model_dir).eval()
  answers = {}
  for n in sorted({len(p) for p in prompts}):
    same = [p for p in prompts if len(p) == n]
    ids = torch.tensor([[1] + [chars.index(c) for c in p] for p in same])  # <bos> + characters
    with torch.no_grad():
      out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=2, pad_token_id=0)
    for p, row in zip(same, out[:, n + 1:].tolist()):
      row = row[:row.index(2)] if 2 in row else row  # up to <eos>
      answers[p] = "".join(chars[i] for i in row if i > 3)
  return [answers[p] for p in prompts]


def test_user_finetune_rows_are_an_independent_count(user_run):
  """The table's accuracy of each fine-tune on its own task (and of the base) equals a count over greedy
  answers of the checkpoint under transformers, on the test records the run reports: the records of the
  eval file it did not hold out for validation (N_RECORDS - n_val of them, none twice)."""
  out, res, inputs = user_run
  for task in TASKS:
    lines = inputs["evals"][task].read_text().splitlines()
    ev = res["eval"][task]
    assert ev["n_val"] == N_RECORDS // 2 and ev["n_test"] == N_RECORDS - ev["n_val"]
    for row, model in ((f"fine-tuned on {task}", inputs["models"][task]), ("base", inputs["base"])):
      preds = [p for p in map(json.loads, (out / "predictions" / f"{row.replace(' ', '_')}.jsonl").read_text()
                                              .splitlines()) if p["task"] == task]
      sources = [p["source"] for p in preds]
      assert len(preds) == ev["n_test"] and len(set(sources)) == len(sources)
      records = []
      for p in preds:
        path, line = p["source"].rsplit(":", 1)
        assert path == str(inputs["evals"][task])
        records.append(json.loads(lines[int(line) - 1]))
      answers = greedy_torch(model, [r["question"] for r in records])
      assert answers == [p["generated"] for p in preds], row
      hits = sum(a.strip() == r["answer"] for a, r in zip(answers, records))
      accuracy = res["finetuned"][task] if row != "base" else res["base"][task]
      assert accuracy == pytest.approx(hits / len(preds)), row
  assert res["finetuned_all"]["max"]["max"] == res["finetuned"]["max"]
  assert 0 < res["finetuned"]["max"] < 1  # a count that can be wrong either way


def test_user_run_on_8_devices_equals_1_device(user_run, tmp_path):
  """The same command on 8 fake CPU devices with the merges sharded over all of them (mesh=all) gives the
  1-device table, predictions and MetaGPT λ's (these to fp32 summation order)."""
  import os
  out, res, inputs = user_run
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  p = subprocess.run(user_command(inputs["base"], inputs["models"], inputs["evals"], tmp_path / "run",
                                  "--config.merge.mesh=all"), cwd=ROOT, env=env, capture_output=True, text=True,
                     timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  res8 = json.loads((tmp_path / "run" / "results.json").read_text())
  for key in ("base", "finetuned", "finetuned_all", "merged", "normalized", "average", "selected_lambda", "eval"):
    assert res8[key] == res[key], key
  for row, lam in res["metagpt_lambdas"].items():
    np.testing.assert_allclose(res8["metagpt_lambdas"][row], lam, rtol=1e-6)
  assert not (tmp_path / "run" / "merged").exists()  # merge.keep unset: not kept on one's own models
  for f in (out / "predictions").iterdir():
    assert (tmp_path / "run" / "predictions" / f.name).read_text() == f.read_text(), f.name


# --- bad input: named, nothing written (no model is loaded: these are fast) ----------------------------------------

def fake_model(d: Path, hidden: int = 8) -> Path:
  """An HF directory with a llama config.json and two tensors (headers are all the checks read)."""
  from safetensors.numpy import save_file
  d.mkdir(parents=True)
  (d / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
  save_file({"model.embed_tokens.weight": np.zeros((10, hidden), np.float32),
             "model.layers.0.mlp.up_proj.weight": np.zeros((2 * hidden, hidden), np.float32)},
            d / "model.safetensors")
  return d


@pytest.fixture
def bad_setup(tmp_path):
  """(config, workdir): a base, two fine-tunes of its shape and two eval files; tests spoil one thing."""
  from configs.merge.suite import get_config
  base = fake_model(tmp_path / "base")
  for t in ("math", "code"):
    fake_model(tmp_path / f"ft_{t}")
    (tmp_path / f"{t}.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}", "answer": str(i)}) + "\n"
                                                 for i in range(6)))
  c = get_config()
  c.base = str(base)
  c.models = {t: str(tmp_path / f"ft_{t}") for t in ("math", "code")}
  c.data.eval = {t: str(tmp_path / f"{t}.jsonl") for t in ("math", "code")}
  return c, tmp_path / "w"


def run_refused(config, workdir, *words):
  from calm_jax.errors import UserError
  from merging.suite import run
  with pytest.raises(UserError) as e:
    run(config, workdir)
  for w in words:
    assert w in str(e.value), str(e.value)
  written = sorted(p.name for p in workdir.iterdir()) if workdir.exists() else []
  assert written in ([], ["calm_jax_run.json"]), written  # at most the entry point's run marker


def test_user_missing_eval_file_is_named(bad_setup, tmp_path):
  c, w = bad_setup
  c.data.eval.code = str(tmp_path / "nope.jsonl")
  run_refused(c, w, "config.data.eval['code']", "nope.jsonl: no such file")


def test_user_eval_task_without_a_model_is_named(bad_setup, tmp_path):
  c, w = bad_setup
  c.data.eval = {**c.data.eval.to_dict(), "chat": str(tmp_path / "math.jsonl")}
  run_refused(c, w, "config.data.eval has task(s) ['chat'] with no model")
  c.data.eval = {"math": str(tmp_path / "math.jsonl")}
  run_refused(c, w, "config.models has task(s) ['code'] with no eval file")
  c.models = {}
  run_refused(c, w, "config.data.eval / data.val are set but config.models is not")


def test_user_model_of_another_shape_is_named(bad_setup, tmp_path):
  c, w = bad_setup
  c.models.code = str(fake_model(tmp_path / "wide", hidden=16))
  run_refused(c, w, "config.models['code']", str(tmp_path / "wide"), "shape mismatch",
              "model.layers.0.mlp.up_proj.weight")


def test_user_missing_model_and_bad_metric_are_named(bad_setup, tmp_path):
  c, w = bad_setup
  c.models.math = str(tmp_path / "no_such_dir")
  run_refused(c, w, "config.models['math']", "no_such_dir")
  c.models.math = str(tmp_path / "ft_math")
  c.eval.metric = "ppl"
  run_refused(c, w, "eval.metric='ppl'")


def test_user_workdir_inside_a_model_is_refused_and_left_absent(bad_setup, tmp_path):
  c, _ = bad_setup
  w = tmp_path / "ft_math" / "run"
  run_refused(c, w, "overlaps config.models['math']")
  assert sorted(p.name for p in (tmp_path / "ft_math").iterdir()) == ["config.json", "model.safetensors"]


def test_user_validation_records(bad_setup, tmp_path):
  """val_fraction: a seeded half of each file for λ, the rest reported, disjoint and together the file;
  data.val: the val files, and the whole eval file reported."""
  from merging.suite_files import read_task_data
  c, _ = bad_setup
  data = read_task_data(c, ["math", "code"])
  for t in ("math", "code"):
    val, test = [r.source for r in data[t].val], [r.source for r in data[t].test]
    assert len(val) == 3 and sorted(val + test, key=lambda s: int(s.rsplit(":", 1)[1])) == [
        f"{tmp_path / t}.jsonl:{i}" for i in range(1, 7)]
  assert [r.source for r in read_task_data(c, ["math", "code"])["math"].val] == [r.source for r in data["math"].val]
  c.data.seed = 1
  assert [r.source for r in read_task_data(c, ["math", "code"])["math"].val] != [r.source for r in data["math"].val]
  c.data.val = {"math": str(tmp_path / "code.jsonl"), "code": str(tmp_path / "math.jsonl")}
  data = read_task_data(c, ["math", "code"])
  assert [r.source for r in data["math"].val] == [f"{tmp_path / 'code'}.jsonl:{i}" for i in range(1, 7)]
  assert len(data["math"].test) == 6
