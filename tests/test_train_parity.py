"""Our LoRA and SVF training steps against PyTorch ones (benchmarks/train_step.py's two sides), step by step.

On a tiny random llama saved by `transformers`: ours (`calm_jax.lora.LoRAModel` / `svf.model.SVFModel`
with the core trainer's jitted step) and the peer (peft's LoRA / the benchmark's `TorchSVF` on the
transformers model, `torch.optim.AdamW`) start from the same weights and see the same batch. The first
loss checks the forward (LoRA factors through our PEFT export, W' through two different SVDs); the later
ones the gradients, the global-norm clipping and AdamW. Trainable counts are checked against a hand count.
"""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import train_step  # noqa: E402

from conftest import TINY_LLAMA  # noqa: E402

pytestmark = pytest.mark.slow
STEPS = 4
RTOL = 1e-5  # the loss of every step, ours vs PyTorch (they agree to ~1e-6 in fp32 here)


@pytest.fixture(scope="module")
def inputs(tiny_llama_dir, tmp_path_factory):
  out = tmp_path_factory.mktemp("train_parity")
  # weight decay 0.5 and clipping at 0.005 (below the LoRA gradients' norm) so that both act visibly: without
  # either on one side the LoRA losses part by 3e-4 to 1e-3 within 4 steps (measured), 30x the tolerance
  args = train_step.parse(["--rank", "4", "--alpha", "8", "--lr", "1e-2", "--weight-decay", "0.5", "--clip-norm",
                           "0.005", "--batch", "2", "--seq", "16"])
  arrays = train_step.make_inputs(tiny_llama_dir, out, batch=args.batch, seq=args.seq, methods=train_step.METHODS,
                                  rank=args.rank, alpha=args.alpha)
  return args, arrays, out


def hand_count(method, rank):
  """Trainable parameters from TINY_LLAMA's sizes, counted by hand."""
  e, f, layers = TINY_LLAMA["hidden_size"], TINY_LLAMA["intermediate_size"], TINY_LLAMA["num_hidden_layers"]
  d = e // TINY_LLAMA["num_attention_heads"]
  kv = d * TINY_LLAMA["num_key_value_heads"]
  if method == "svf":
    return layers * 3 * min(e, f)
  in_out = [(e, e), (e, kv), (e, kv), (e, e), (e, f), (e, f), (f, e)]  # q k v o gate up down
  return layers * sum(rank * (i + o) for i, o in in_out)


@pytest.mark.parametrize("method", train_step.METHODS)
def test_our_training_steps_match_pytorch(method, inputs, tiny_llama_dir):
  from calm_jax import hf
  args, arrays, out = inputs
  ours = train_step.ours(method, hf.load(tiny_llama_dir), arrays, args, out / "svd_cache")
  peer = train_step.theirs(method, tiny_llama_dir, arrays, args, out / "peft")
  assert ours.n_trainable == peer.n_trainable == hand_count(method, args.rank)
  lo = np.array([ours.step() for _ in range(STEPS)])
  lp = np.array([peer.step() for _ in range(STEPS)])
  # the updates move the loss 10x more than the tolerance: a side that skipped or botched one would show
  assert np.abs(lo[-1] - lo[0]) > 10 * RTOL * abs(lo[0])
  np.testing.assert_allclose(lo, lp, rtol=RTOL)


def test_the_benchmark_names_the_modules_as_our_peft_export_does():
  from calm_jax.peft_format import HF_MODULES
  assert train_step.HF_MODULES == HF_MODULES


def test_torch_svf_with_constant_z_is_the_base(tiny_llama_dir):
  """The peer's W' = U diag(σ⊙m) Vᵀ (Σσ / Σσ⊙m) is W for any constant z: its SVD and rescale are right."""
  import transformers
  model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
  k = min(TINY_LLAMA["hidden_size"], TINY_LLAMA["intermediate_size"])
  zs = {t: np.full((TINY_LLAMA["num_hidden_layers"], k), 0.7) for t in train_step.SVF_TARGETS}
  svf = train_step.TorchSVF(model, zs)
  with torch.no_grad():
    for name, w in svf.weights().items():
      np.testing.assert_allclose(w.numpy(), model.get_parameter(name).numpy(), atol=2e-6)


def test_the_benchmark_runs_end_to_end_and_checks(capsys):
  """The script's own path (flags, inputs, checks, figures, the JSON line) on its --small model, one method."""
  train_step.main(["--small", "--no-alone", "--steps", "1", "--methods=svf"])
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  for method in ("svf",):
    assert result[method]["first_loss_rel_diff"] <= train_step.LOSS_RTOL
    assert result[method]["tokens_per_s_ours"] > 0 and result[method]["tokens_per_s_peer"] > 0
