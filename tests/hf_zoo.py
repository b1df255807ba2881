"""Tiny random `transformers` (PyTorch) models of every family we support: the test references.

Not a test module (no `test_` prefix): `tests/test_models.py` and `tests/test_hf_io.py` import it.
Each case is (model_type, extra config kwargs, what our `DecoderConfig` must then say), so a
test can first check that the feature under test is really switched on.
"""
import numpy as np
import torch
import transformers

SEQ_LEN = 24
# initializer_range 0.1 rather than HF's 0.02: with 0.02 attention is nearly uniform and the
# logits are ~0.5, so a wrong RoPE or window changes them by only ~1e-3; at 0.1 the logits are
# O(3) and every feature tested here moves them by O(1) (measured), far above the tolerances.
BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=0)

LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                   high_freq_factor=4.0, original_max_position_embeddings=16)  # < SEQ_LEN
CASES = {
  # name: (model_type, config kwargs, expected DecoderConfig fields)
  "llama_gqa": ("llama", {}, dict(num_kv_heads=2, num_heads=4, rope_type="default")),
  "llama3_rope": ("llama", dict(rope_parameters=LLAMA3_ROPE),
                  dict(rope_type="llama3", rope_factor=8.0, rope_original_max_positions=16)),
  "llama_linear_rope": ("llama", dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0)),
                        dict(rope_type="linear", rope_factor=4.0)),
  "llama_bias": ("llama", dict(attention_bias=True, mlp_bias=True),
                 dict(qkv_bias=True, o_bias=True, mlp_bias=True)),
  "mistral_window": ("mistral", dict(sliding_window=5), dict(layer_windows=(5, 5, 5))),
  "qwen2_tied": ("qwen2", dict(tie_word_embeddings=True),
                 dict(tie_word_embeddings=True, qkv_bias=True, o_bias=False, layer_windows=(0, 0, 0))),
  "qwen2_mixed_window": ("qwen2", dict(use_sliding_window=True, sliding_window=5,
                                       layer_types=["full_attention", "sliding_attention", "full_attention"]),
                         dict(layer_windows=(0, 5, 0), qkv_bias=True)),
}

CLASSES = {
  "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
  "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
  "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
}


def build(name: str, seed: int = 0) -> torch.nn.Module:
  """The seeded fp32 model of case `name`, in eval mode.

  HF initialises biases to 0 and norm weights to 1, which would hide a dropped bias or a
  `(1 + w)` norm convention; both are randomised here.
  """
  model_type, kw, _ = CASES[name]
  cfg_cls, model_cls = CLASSES[model_type]
  torch.manual_seed(seed)
  model = model_cls(cfg_cls(**{**BASE, **kw})).eval()
  with torch.no_grad():
    for pname, p in model.named_parameters():
      if pname.endswith(".bias"):
        p.copy_(0.1 * torch.randn_like(p))
      elif "norm" in pname:
        p.add_(0.1 * torch.randn_like(p))
  return model


def input_ids(batch: int = 2, seq: int = SEQ_LEN, seed: int = 0) -> np.ndarray:
  return np.random.RandomState(seed).randint(3, BASE["vocab_size"], (batch, seq)).astype(np.int64)


def torch_logits(model, ids, attention_mask=None) -> np.ndarray:
  """fp32 numpy logits of a PyTorch model (whatever its dtype)."""
  with torch.no_grad():
    mask = None if attention_mask is None else torch.as_tensor(np.asarray(attention_mask))
    out = model(torch.as_tensor(np.asarray(ids)), attention_mask=mask)
  return out.logits.float().numpy()


def torch_hidden(model, ids) -> list[np.ndarray]:
  with torch.no_grad():
    out = model(torch.as_tensor(np.asarray(ids)), output_hidden_states=True)
  return [h.float().numpy() for h in out.hidden_states]
