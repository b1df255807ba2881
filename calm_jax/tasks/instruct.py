"""Natural-language tasks for instruction-following models, written as the dataset files users bring.

The synthetic suite (`calm_jax.tasks.suite`) speaks the tiny character base's compact prompts
(`add:12+34=`); a real instruct model is asked in English. These are the tasks the experiments on
SmolLM2-135M-Instruct use (docs/reproductions.md): each record is `{"prompt", "answer", "domain"}`, train and
held-out splits draw from disjoint operands and words, so a test answer is never a training answer.

  python -m launch.make_data --out=data/instruct --tasks=addition,reverse,uppercase,count --n_train=2000
"""
from __future__ import annotations

import json
import os
from typing import Callable

import numpy as np

# Common English words (3-8 letters). Word i is a val word when i % 8 == 0, a test word when i % 8 == 4.
WORDS = tuple("""
apple table river stone cloud garden window bridge candle forest silver market pocket yellow orange purple
rabbit monkey turtle parrot spider dragon tiger zebra camel horse mouse eagle shark whale snake otter
pencil basket bottle button carpet castle cotton dinner doctor engine finger flower guitar hammer helmet
island jacket kettle ladder lemon letter mirror needle office palace paper pepper pillow planet pocket
rocket saddle school season shadow shovel sister spoon summer sunset ticket tomato towel tunnel valley
violin wallet winter wizard anchor arrow badge banana beach bench blanket board bread brick brush cabin
camera canvas carrot cereal chair cheese cherry circle clock coffee collar corner cookie copper crayon
crown desert diamond donkey drawer eleven feather fence field fabric frost galaxy glove grape hammock
harbor honey jelly jungle kitten lantern laptop magnet maple meadow melon metal mitten morning muffin
napkin nickel noodle ocean olive onion oyster paddle panda parcel peach peanut pebble pickle pirate
pizza plate plum pond potato puzzle quilt radio raisin ribbon robot rocket salad sandal scarf shell
shirt shoe silk sock sofa spring squid stair star stove sugar sweater teapot tent thunder tiger toast
tower train tulip umbrella velvet wagon walnut water wheel whistle willow window wolf yogurt zipper
acorn album alley apron attic bacon bagel ballet bamboo barrel beaver berry bishop blossom bucket buffalo
bullet butter cactus canyon cattle cellar chalk chapel cinema clover cobalt comet cousin coyote cradle
cricket cupboard dancer dentist dollar dolphin dune eclipse elbow emerald falcon farmer ferry fiddle
fossil fountain fox gadget garlic geyser ginger goblin gravel gravy hamster harvest hazel heron hockey
igloo insect ivory jasmine jigsaw journal kayak kernel kitchen koala lagoon lobster locket lizard lunch
mammoth mango marble meteor minnow mosaic mustard nectar nephew nugget oatmeal orchid ostrich oven
pancake parade parsley pastry peacock pelican penguin pepper piano pigeon pilgrim plaza poppy pudding
pumpkin quartz rainbow raven recipe reptile riddle salmon sardine satin sausage scooter sculptor seagull
sheriff shrimp sketch sleigh slipper snail sparrow spinach sponge squirrel statue stork sunflower swan
tablet tadpole tango temple thimble thistle timber toffee tortoise trumpet tuxedo unicorn vacuum vanilla
vendor vulture waffle walrus weasel widget wigwam yacht
""".split())
WORDS = tuple(dict.fromkeys(WORDS))  # unique, in order


def _part(i: int) -> str:
  """The split an item (word index, operand hash) belongs to: 3/4 train, 1/8 val, 1/8 test."""
  return "val" if i % 8 == 0 else "test" if i % 8 == 4 else "train"


def _words(rng, split: str, n: int = 1) -> list[str]:
  pool = [w for i, w in enumerate(WORDS) if _part(i) == split]
  return [pool[int(k)] for k in rng.integers(len(pool), size=n)]


def addition(rng, split):
  """2-digit addition; the pair (a, b) belongs to the split of a + 3b."""
  while True:
    a, b = (int(x) for x in rng.integers(10, 100, size=2))
    if _part(a + 3 * b) == split:
      return f"What is {a} + {b}? Reply with the number only.", str(a + b)


def reverse(rng, split):
  (w,) = _words(rng, split)
  return f'Write the word "{w}" backwards, letter by letter reversed. Reply with the reversed word only.', w[::-1]


def uppercase(rng, split):
  words = " ".join(_words(rng, split, int(rng.integers(2, 5))))
  return f"Rewrite this text in capital letters: {words}", words.upper()


def count(rng, split):
  (w,) = _words(rng, split)
  return f'How many letters are in the word "{w}"? Reply with the number only.', str(len(w))


def first_letters(rng, split):
  words = _words(rng, split, int(rng.integers(3, 6)))
  return f"Write the first letter of each word, joined: {' '.join(words)}", "".join(x[0] for x in words)


TASKS: dict[str, Callable] = {"addition": addition, "reverse": reverse, "uppercase": uppercase, "count": count,
                              "first_letters": first_letters}
SPLITS = ("train", "val", "test")


def records(task: str, n: int, split: str, seed: int = 0) -> list[dict]:
  """`n` records of `task` from `split` ("train", or the held-out "val" / "test", drawn apart by seed)."""
  if task not in TASKS:
    raise ValueError(f"unknown instruct task {task!r}; known: {', '.join(TASKS)}")
  if split not in SPLITS:
    raise ValueError(f"split {split!r}: expected one of {SPLITS}")
  rng = np.random.default_rng([seed, SPLITS.index(split), sorted(TASKS).index(task)])
  out = []
  for _ in range(int(n)):
    prompt, answer = TASKS[task](rng, split)
    out.append({"prompt": prompt, "answer": answer, "domain": task})
  return out


def write_files(out_dir, tasks, n_train: int, n_val: int, n_test: int, seed: int = 0) -> dict[str, dict[str, str]]:
  """OUT/{task}_{split}.jsonl for every task and split; returns {task: {split: path}}. Files are written whole
  (temporary name, then renamed)."""
  os.makedirs(out_dir, exist_ok=True)
  paths = {}
  for task in tasks:
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
      if not n:
        continue
      path = os.path.join(out_dir, f"{task}_{split}.jsonl")
      tmp = f"{path}.tmp{os.getpid()}"
      with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records(task, n, split, seed))
      os.replace(tmp, path)
      paths.setdefault(task, {})[split] = path
  return paths
