"""Our decoder on a real pretrained model (SmolLM2-135M-Instruct: llama, 30 layers, GQA, tied
embeddings, vocab 49,152), against transformers' PyTorch model loaded from the same directory.

The model comes from `launch.fetch` (a GGUF inside a PyPI wheel, dequantized once and cached
for the whole test run by the `smollm2_dir` fixture).
"""
import json

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from calm_jax import decoding, hf  # noqa: E402
from calm_jax.tokenizers import load_tokenizer  # noqa: E402

pytestmark = pytest.mark.slow

CHAT = ["What is the capital of France?", "Write a haiku about the sea.", "Name three prime numbers.",
        "Explain in one sentence what a neural network is."]
PLAIN = ["The quick brown fox", "def fibonacci(n):\n    ", "In 1969, the first humans", "Water boils at"]
NEW_TOKENS = 48
# bf16, in units u = 2^-7 * max|logit| (docs/architecture.md, "Numerics"). A bf16 forward rounds about ten
# times per layer; the error of the logits against the fp32 computation on the same bf16 weights grows
# like a random walk over the layers, so the 3-layer budget of 4 u (measured 2.4 u) scales by sqrt(L / 3):
# 12.6 u at 30 layers. Measured on this model: ours 4.6 u, transformers' own bf16 5.5 u.
BF16_UNITS_3_LAYERS = 4.0
BF16_RMS_RATIO = 1.5  # ours no less accurate than transformers (RMS error vs fp32, as for the tiny models)


def bf16_budget_units(num_layers: int) -> float:
  return BF16_UNITS_3_LAYERS * float(np.sqrt(max(num_layers, 3) / 3))


@pytest.fixture(scope="module")
def tok(smollm2_dir):
  return load_tokenizer(smollm2_dir)


@pytest.fixture(scope="module")
def torch_fp32(smollm2_dir):
  return transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ours_fp32(smollm2_dir):
  return hf.load(smollm2_dir, dtype="float32")


def _chat_ids(tok, text):
  out = tok.hf.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
  return list(out["input_ids"] if hasattr(out, "keys") else out)


def _left_padded(rows, pad):
  t = max(map(len, rows))
  ids = np.full((len(rows), t), pad, np.int64)
  mask = np.zeros((len(rows), t), np.int64)
  for i, r in enumerate(rows):
    ids[i, t - len(r):] = r
    mask[i, t - len(r):] = 1
  return ids, mask


def _batch(tok):
  rows = [_chat_ids(tok, p) for p in CHAT[:2]] + [tok.encode(p) for p in PLAIN[:2]]
  ids, mask = _left_padded(rows, tok.pad_id)
  positions = np.maximum(mask.cumsum(-1) - 1, 0)
  return ids, mask, positions


def _torch_logits(model, ids, mask, positions):
  with torch.no_grad():
    out = model(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), position_ids=torch.as_tensor(positions))
  return out.logits.float().numpy()


def test_fetched_directory_is_a_standard_hf_model(smollm2_dir, tok):
  """What launch.fetch promises: sharded safetensors + index, a llama config with tied embeddings,
  the chat template, and the provenance note."""
  index = json.loads((smollm2_dir / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 1
  cfg = json.loads((smollm2_dir / "config.json").read_text())
  assert (cfg["model_type"], cfg["num_hidden_layers"], cfg["vocab_size"], cfg["tie_word_embeddings"]) == \
      ("llama", 30, 49152, True)
  assert "dequantized" in (smollm2_dir / "FETCHED.md").read_text()
  assert "<|im_start|>assistant" in tok.hf.apply_chat_template([{"role": "user", "content": "hi"}],
                                                               add_generation_prompt=True, tokenize=False)


def test_fp32_logits_match_transformers(tok, torch_fp32, ours_fp32):
  """Chat-templated and plain prompts in one left-padded batch: every valid position's logits within
  1e-5 x max|logit| of transformers."""
  ids, mask, positions = _batch(tok)
  ref = _torch_logits(torch_fp32, ids, mask, positions)
  ours = np.asarray(ours_fp32(ids, attention_mask=mask, positions=positions))
  valid = mask.astype(bool)
  scale = float(np.abs(ref[valid]).max())
  assert scale > 5  # real logits, not a degenerate model
  err = float(np.abs(ours[valid] - ref[valid]).max())
  print(f"fp32 max |ours - transformers| {err:.2e} = {err / scale:.2e} x max|logit| ({scale:.1f})")
  assert err <= 1e-5 * scale


def test_greedy_chat_answers_match_transformers_generate(tok, torch_fp32, ours_fp32):
  """4 chat prompts x 48 new tokens, greedy, stopping at <|im_end|>: the same tokens as transformers."""
  rows = [_chat_ids(tok, p) for p in CHAT]
  ids, mask = _left_padded(rows, tok.pad_id)
  with torch.no_grad():
    out = torch_fp32.generate(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                              max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=tok.eos_id,
                              pad_token_id=tok.pad_id)
  theirs = []
  for row in out[:, ids.shape[1]:].tolist():
    theirs.append(row[:row.index(tok.eos_id) + 1] if tok.eos_id in row else row)
  ours = decoding.generate(ours_fp32, rows, max_new_tokens=NEW_TOKENS, eos_token_id=tok.eos_id)
  assert ours == theirs
  assert "Paris" in tok.decode(ours[0])  # a real instruction model answers


def test_bf16_logits_within_depth_aware_tolerance(smollm2_dir, tok):
  """bf16 weights (rounded from the fp32 checkpoint by both loaders): ours against the fp32 computation
  on the same bf16 weights within the depth-aware budget, and no less accurate than transformers' bf16."""
  ids, mask, positions = _batch(tok)
  ref_bf16 = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.bfloat16).eval()
  theirs = _torch_logits(ref_bf16, ids, mask, positions)
  exact = _torch_logits(ref_bf16.to(torch.float32), ids, mask, positions)  # bf16 weights, fp32 arithmetic
  del ref_bf16
  model = hf.load(smollm2_dir, dtype="bfloat16")
  assert model.dtype == jnp.bfloat16
  ours = np.asarray(model(ids, attention_mask=mask, positions=positions), np.float32)
  valid = mask.astype(bool)
  ours, theirs, exact = ours[valid], theirs[valid], exact[valid]
  unit = 2.0 ** -7 * float(np.abs(exact).max())
  err_ours, err_theirs = np.abs(ours - exact).max() / unit, np.abs(theirs - exact).max() / unit
  print(f"bf16 max error: ours {err_ours:.2f} u, transformers {err_theirs:.2f} u (u = {unit:.4f})")
  assert err_ours <= bf16_budget_units(model.config.num_layers)

  def rms(x):
    return float(np.sqrt(np.mean(np.square(x))))

  assert rms(ours - exact) <= BF16_RMS_RATIO * rms(theirs - exact)


def test_training_rows_with_the_real_chat_template(tok):
  """A prompt/answer record through SmolLM2's ChatML template: the prompt is exactly the template's generation
  prompt, and the tokens trained on are exactly the answer and the turn's end, `Paris<|im_end|>` + newline."""
  from calm_jax.data import Record, encode_record
  enc = encode_record(Record(prompt="What is the capital of France?", answer="Paris", source="t:1"), tok,
                      max_len=512)
  prompt = _chat_ids(tok, "What is the capital of France?")
  assert enc.ids[:enc.prompt_len].tolist() == prompt
  trained = enc.ids[enc.loss_mask.astype(bool)].tolist()
  assert enc.loss_mask[:enc.prompt_len].sum() == 0
  assert tok.hf.decode(trained) == "Paris<|im_end|>\n"
  assert trained[-2:] == [tok.eos_id, *tok.hf.encode("\n", add_special_tokens=False)]
