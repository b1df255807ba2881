"""Scoring a model's answers against a dataset's references: the pure parts of `launch.eval --metric`.

  exact   normalised exact match: Unicode NFKC, lower case, punctuation removed, whitespace collapsed
  number  the last number of each side, or the one after `####` (GSM8K's answer line) where there is one
  choice  the choice with the highest log-likelihood (acc) and with the highest log-likelihood per
          character of the choice (acc_norm), as lm-evaluation-harness reports them
  ppl     exp(total negative log-likelihood of the answer tokens / their count) over the whole file
"""
from __future__ import annotations

import math
import re
import string
import unicodedata
from decimal import Decimal, InvalidOperation
from typing import Sequence

import numpy as np

METRICS = ("exact", "number", "choice", "ppl")
_PUNCT = str.maketrans({c: " " for c in string.punctuation})
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def normalize(text: str) -> str:
  return " ".join(unicodedata.normalize("NFKC", text).lower().translate(_PUNCT).split())


def exact(prediction: str, reference: str) -> bool:
  return normalize(prediction) == normalize(reference)


def last_number(text: str) -> Decimal | None:
  """The number after the last `####` in `text` if it has one (GSM8K's answer line), else the last number
  (commas as thousands separators)."""
  marked = "####" in text
  found = _NUMBER.findall(text.rsplit("####", 1)[1] if marked else text)
  if not found:
    return None
  try:
    return Decimal((found[0] if marked else found[-1]).replace(",", ""))
  except InvalidOperation:
    return None


def number(prediction: str, reference: str) -> bool:
  ref = last_number(reference)
  return ref is not None and last_number(prediction) == ref


def choice_accuracy(logliks: Sequence[Sequence[float]], choices: Sequence[Sequence[str]],
                    labels: Sequence[int]) -> tuple[float, float, list[int], list[int]]:
  """(acc, acc_norm, argmax per record, length-normalised argmax per record)."""
  picks = [int(np.argmax(ll)) for ll in logliks]
  picks_norm = [int(np.argmax([v / max(len(c), 1) for v, c in zip(ll, ch)])) for ll, ch in zip(logliks, choices)]
  n = max(len(labels), 1)
  return (sum(p == y for p, y in zip(picks, labels)) / n, sum(p == y for p, y in zip(picks_norm, labels)) / n,
          picks, picks_norm)


def perplexity(nll: Sequence[float], counts: Sequence[int]) -> float:
  """Corpus perplexity: exp(sum of NLL / number of scored tokens)."""
  total = int(np.sum(counts))
  return math.exp(float(np.sum(nll)) / total) if total else float("nan")
