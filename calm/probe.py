"""Linear probes of the augmenting model's knowledge: can a linear map fitted on the held-in keys
read the *values* of held-out keys out of m_A's states?

A composition connection is linear in m_A's states (RMSNorm aside): what reaches the anchor at a
position is W_O·W_V·f_proj(m_A states). So if no linear map fitted on the keys CALM trains on can
decode the held-out keys' value digits from m_A's states, the composition cannot carry them
either, and KV-arithmetic over held-out keys is out of reach whatever the training. The probe is
ridge regression onto one-hot digits (one probe per digit place), scored on the held-out keys.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from calm_jax.models import decoder as dec


def ridge_digit_accuracy(states, digits, train, ridge: float = 1.0) -> np.ndarray:
  """states [N, F], digits [N, P] (0..9), train [N] bool -> held-out accuracy per digit place [P]."""
  x = np.concatenate([np.asarray(states, np.float64), np.ones((len(states), 1))], 1)
  gram = x[train].T @ x[train] + ridge * np.eye(x.shape[1])
  acc = []
  for p in range(digits.shape[1]):
    w = np.linalg.solve(gram, x[train].T @ np.eye(10)[digits[train, p]])
    acc.append(float(np.mean(np.argmax(x[~train] @ w, 1) == digits[~train, p])))
  return np.asarray(acc)


def value_digit_probe(model, tokenizer, table, ridge: float = 1.0, seed: int = 0) -> dict:
  """Held-out accuracy per digit place of probes on m_A's states over the first operand of
  KV-substitution prompts, fitted on the held-in keys: {"concat": [P] (every layer and position
  of the operand together: what the connections can read at its last slot), "best_single": [P]
  (the best one layer and position)}."""
  rng = np.random.default_rng(seed)
  second = [table.keys[i] for i in rng.integers(0, table.n_keys, table.n_keys)]
  bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
  prompts = [bos + tokenizer.encode(table.key_text(k) + "+" + table.key_text(o) + ">")
             for k, o in zip(table.keys, second)]
  _, aux = dec.forward(model.config, model.params(), jnp.asarray(prompts, jnp.int32), return_hidden=True)
  operand = range(len(bos), len(bos) + len(tokenizer.encode(table.key_text(table.keys[0]))))
  hidden = np.asarray(aux["hidden"])[1:, :, list(operand)]  # [L, N, positions, E]
  values = np.asarray([table.values[k] for k in table.keys])
  digits = np.stack([values // 10 ** p % 10 for p in reversed(range(table.width))], 1)
  train = np.isin(np.asarray(table.keys), np.asarray(table.held_in))
  single = np.stack([ridge_digit_accuracy(hidden[l, :, t], digits, train, ridge)
                     for l in range(hidden.shape[0]) for t in range(hidden.shape[2])])
  concat = hidden.transpose(1, 0, 2, 3).reshape(len(values), -1)
  return {"concat": ridge_digit_accuracy(concat, digits, train, ridge).tolist(),
          "best_single": single.max(0).tolist()}
