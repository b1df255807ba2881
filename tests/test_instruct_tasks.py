"""The natural-language task files (calm_jax/tasks/instruct.py): answers follow from the prompts as read back
from the text, held-out splits share no item with train or with each other, and the files are the records."""
import json
import re

import pytest

from calm_jax.data import read_records
from calm_jax.tasks import instruct as I


def _item(task, prompt):
  """What the prompt asks about, parsed back from its English."""
  if task == "addition":
    return tuple(int(x) for x in re.findall(r"\d+", prompt))
  if task in ("reverse", "count"):
    return re.search(r'"([a-z]+)"', prompt).group(1)
  return prompt.split(": ", 1)[1]


@pytest.mark.parametrize("task", sorted(I.TASKS))
def test_answers_follow_from_the_prompt_text(task):
  for r in I.records(task, 200, "train") + I.records(task, 50, "test"):
    item = _item(task, r["prompt"])
    expected = {"addition": lambda: str(sum(item)), "reverse": lambda: "".join(reversed(item)),
                "count": lambda: str(len(item)), "uppercase": lambda: item.upper(),
                "first_letters": lambda: "".join(w[0] for w in item.split())}[task]()
    assert r["answer"] == expected and r["domain"] == task, r


@pytest.mark.parametrize("task", ["addition", "reverse", "count"])
def test_held_out_splits_share_nothing_with_train_or_each_other(task):
  items = {s: {_item(task, r["prompt"]) for r in I.records(task, 3000 if s == "train" else 400, s)}
           for s in I.SPLITS}
  assert not items["train"] & items["val"] and not items["train"] & items["test"] and not items["val"] & items["test"]
  assert len(items["test"]) >= 40, len(items["test"])


def test_files_hold_the_records(tmp_path):
  paths = I.write_files(tmp_path, ["reverse", "addition"], n_train=20, n_val=5, n_test=0)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["addition_train.jsonl", "addition_val.jsonl",
                                                         "reverse_train.jsonl", "reverse_val.jsonl"]
  recs = read_records(paths["reverse"]["val"])
  assert [(r.prompt, r.answer, r.domain) for r in recs] == [
      (d["prompt"], d["answer"], d["domain"]) for d in I.records("reverse", 5, "val")]
  assert json.loads((tmp_path / "addition_train.jsonl").read_text().splitlines()[0])["domain"] == "addition"
