"""Write the natural-language task files the experiments on instruct models use (calm_jax/tasks/instruct.py).

  python -m launch.make_data --out=data/instruct --tasks=addition,reverse,uppercase,count --n_train=2000

Writes OUT/{task}_{train,val,test}.jsonl, records {"prompt", "answer", "domain"}.
"""
from absl import app, flags

_OUT = flags.DEFINE_string("out", None, "output directory", required=True)
_TASKS = flags.DEFINE_list("tasks", ["addition", "reverse", "uppercase", "count"], "tasks to write")
_N_TRAIN = flags.DEFINE_integer("n_train", 2000, "train records per task")
_N_VAL = flags.DEFINE_integer("n_val", 200, "val records per task (held-out operands and words)")
_N_TEST = flags.DEFINE_integer("n_test", 200, "test records per task (held out from train and val)")
_SEED = flags.DEFINE_integer("seed", 0, "seed of the draws")


def main(argv):
  del argv
  from calm_jax.tasks.instruct import write_files
  paths = write_files(_OUT.value, _TASKS.value, _N_TRAIN.value, _N_VAL.value, _N_TEST.value, _SEED.value)
  for task, splits in paths.items():
    print(task, " ".join(f"{s}={p}" for s, p in splits.items()))


if __name__ == "__main__":
  app.run(main)
