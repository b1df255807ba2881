"""Our decoder as an lm-evaluation-harness model, `calm_jax`, scoring as lm-eval's `hf` model does.

lm-eval (0.4.13) knows a model only once its module is imported (its registry reads no entry points),
so `lm_eval --model calm_jax` alone fails. Run lm-eval's own command line through this module instead:

  python -m calm_jax.lm_eval_model --model calm_jax --model_args pretrained=DIR,dtype=float32 \\
      --tasks TASKS --include_path DIR_WITH_YAML --batch_size 8

Every argument goes to lm-eval's CLI unchanged (`run`, `ls`, `validate` work as with `lm-eval`).
From Python: `import calm_jax.lm_eval_model`, then `lm_eval.simple_evaluate(model="calm_jax", ...)`.

model_args: pretrained (a directory, or a model name `calm_jax.hub.model_dir` resolves), dtype
(float32 | bfloat16 | float16 | auto = the checkpoint's), batch_size (8), max_length (default: config.json's
max_position_embeddings), max_gen_toks (256), add_bos_token, prefix_token_id, tokenizer (a directory).

The conventions are those of lm-eval's HFLM (lm_eval/models/huggingface.py), so that scores equal the
`hf` model's on the same checkpoint: the HF tokenizer's own special tokens unless add_bos_token says;
context/continuation split by encoding them jointly (trailing context spaces move to the continuation);
left truncation to max_length; empty contexts conditioned on bos (else eos); rolling windows for
perplexity; generation stops at the generation config's eos and the text is cut at the first `until`
string. Log-likelihoods come from `calm_jax.scoring.score`, generations from `calm_jax.decoding.generate`.
Not supported: sampling (do_sample=True raises), batch_size=auto (the default is used), data parallelism.
Generation runs each batch to eos or max_gen_toks: `until` strings cut the text but do not stop decoding.
"""
from __future__ import annotations

import json
import logging
import os
import sys

try:
  import lm_eval.models  # noqa: F401  lm-eval's own models first: its registry loads them only while empty
  from lm_eval import utils as lm_utils
  from lm_eval.api.model import TemplateLM
  from lm_eval.api.registry import register_model
  from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
except ImportError as e:
  raise ImportError(f"calm_jax.lm_eval_model needs lm-evaluation-harness: pip install -e '.[eval]' ({e})") from e

from tqdm import tqdm

log = logging.getLogger(__name__)


def cli_main(argv=None) -> None:
  """lm-eval's command line (`lm-eval ...`) with the `calm_jax` model registered; argv None = sys.argv."""
  from lm_eval.__main__ import cli_evaluate
  if argv is not None:
    sys.argv = [sys.argv[0], *argv]
  cli_evaluate()


if __name__ == "__main__":
  # Run as `python -m`, this file is `__main__`; importing it under its real name registers the model once
  # (a second class registered as "calm_jax" from `__main__` would collide with any later import).
  from calm_jax.lm_eval_model import cli_main as _cli_main
  _cli_main()
  sys.exit(0)

# Arguments lm-eval passes to every model (simple_evaluate's device/max_batch_size, the CLI's
# --trust_remote_code): accepted and ignored, JAX places the model on its default backend.
_IGNORED_ARGS = ("device", "max_batch_size", "trust_remote_code")
_GREEDY_ONLY = ("temperature", "top_p", "top_k")  # meaningless without sampling, as in HF's generate
# generation_config.json settings HF's greedy `generate` would apply and ours does not (neutral values).
_HF_GEN_PROCESSORS = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "min_new_tokens": None,
                      "min_length": 0, "encoder_repetition_penalty": 1.0, "bad_words_ids": None,
                      "suppress_tokens": None, "begin_suppress_tokens": None, "forced_eos_token_id": None}


def _generation_config(directory) -> dict:
  path = os.path.join(directory, "generation_config.json")
  if not os.path.isfile(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


@register_model("calm_jax")
class CalmJaxLM(TemplateLM):
  """A `calm_jax.hf.load`-able checkpoint behind lm-eval's `LM` interface (module docstring)."""

  def __init__(self, pretrained, dtype="float32", batch_size=8, max_length=None, max_gen_toks=256,
               add_bos_token=None, prefix_token_id=None, tokenizer=None, **kwargs):
    super().__init__()
    unknown = sorted(set(kwargs) - set(_IGNORED_ARGS))
    if unknown:
      raise TypeError(f"calm_jax model: unknown model_args {unknown}; supported: pretrained, dtype, batch_size, "
                      "max_length, max_gen_toks, add_bos_token, prefix_token_id, tokenizer")
    import transformers

    from calm_jax import hf
    from calm_jax.hub import model_dir
    from calm_jax.tokenizers import HFTokenizer, load_tokenizer

    self.pretrained = model_dir(pretrained)
    tok = load_tokenizer(self.pretrained if tokenizer is None else tokenizer)
    if not isinstance(tok, HFTokenizer):
      raise ValueError(f"calm_jax model: {tok!r} is not a Hugging Face tokenizer; lm-eval's conventions (special "
                       "tokens, chat templates) need one")
    self.add_bos_token = None if add_bos_token is None else bool(add_bos_token)
    # As HFLM: the tokenizer is built with add_bos_token (it decides whether encode prepends bos at all).
    self.tokenizer = tok.hf if self.add_bos_token is None else transformers.AutoTokenizer.from_pretrained(
        tok.directory, local_files_only=True, add_bos_token=self.add_bos_token)
    self.model = hf.load(self.pretrained, dtype=None if dtype in (None, "auto") else dtype)  # auto: the checkpoint's
    self._params = self.model.params()
    self._max_length = None if max_length is None else int(max_length)
    self._max_gen_toks = int(max_gen_toks)
    self.custom_prefix_token_id = None if prefix_token_id is None else int(prefix_token_id)
    if str(batch_size).startswith("auto"):
      log.warning("calm_jax model: batch_size=%s is not supported, using 8", batch_size)
      batch_size = 8
    self._batch_size = int(batch_size)
    if self._batch_size < 1:
      raise ValueError(f"calm_jax model: batch_size must be >= 1, got {batch_size}")
    # HF's generate stops at the generation config's eos ids (config.json's when it has none).
    gen = _generation_config(self.pretrained)
    eos = gen.get("eos_token_id")
    eos = self.model.config.eos_token_ids if eos is None else (eos if isinstance(eos, list) else [eos])
    self._gen_eos = [int(e) for e in eos]
    self._gen_differs = {k: gen[k] for k, neutral in _HF_GEN_PROCESSORS.items() if gen.get(k, neutral) != neutral}

  # Properties lm-eval and TemplateLM read.

  @property
  def eot_token_id(self) -> int:
    return self.tokenizer.eos_token_id

  @property
  def prefix_token_id(self) -> int:
    """The token an empty context (and the first rolling window) is conditioned on: HFLM's choice."""
    if self.custom_prefix_token_id is not None:
      return self.custom_prefix_token_id
    if self.tokenizer.bos_token_id is not None:
      return self.tokenizer.bos_token_id
    return self.tokenizer.eos_token_id

  @property
  def max_length(self) -> int:
    return self._max_length or self.model.config.max_position_embeddings

  @property
  def max_gen_toks(self) -> int:
    return self._max_gen_toks

  @property
  def batch_size(self) -> int:
    return self._batch_size

  @property
  def tokenizer_name(self) -> str:
    return self.tokenizer.name_or_path.replace("/", "__")

  def get_model_info(self) -> dict:
    """What lm-eval records in results["config"]."""
    import jax
    n = sum(int(x.size) for x in jax.tree.leaves(self._params))
    return {"model_num_parameters": n, "model_dtype": str(self.model.dtype), "model_path": str(self.pretrained)}

  # Tokenization, as HFLM's tok_encode / tok_batch_encode / tok_decode.

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                 **kwargs) -> list[int]:
    if add_special_tokens is not None:
      special = {"add_special_tokens": add_special_tokens}
    elif string.startswith(self.tokenizer.decode(self.prefix_token_id)):  # already has its bos (chat templates)
      special = {"add_special_tokens": False}
    elif self.add_bos_token is not None:
      special = {"add_special_tokens": self.add_bos_token}
    else:
      special = {}
    ids = list(self.tokenizer.encode(string, **special))
    return ids[-left_truncate_len:] if left_truncate_len else ids

  def _encode_batch(self, strings) -> list[list[int]]:
    """HFLM's tok_batch_encode without padding: whether to add specials is decided by the first string."""
    bos = getattr(self.tokenizer, "bos_token", None)
    if bos is not None and strings[0].startswith(bos):
      special = {"add_special_tokens": False}
    elif self.add_bos_token is not None:
      special = {"add_special_tokens": self.add_bos_token}
    else:
      special = {}
    return [list(self.tokenizer.encode(s, **special)) for s in strings]

  def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
    return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

  # Requests.

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
    """(log p(continuation | context), all continuation tokens greedy) per (strings, context ids, cont ids)."""
    from calm_jax.scoring import score

    rows, targets, truncated = [], [], 0
    for strings, context, continuation in requests:
      if not context or not continuation:
        raise ValueError(f"calm_jax model: request {strings!r} encodes to {len(context)} context and "
                         f"{len(continuation)} continuation tokens; both must be non-empty (as in HFLM)")
      if len(continuation) > self.max_length:
        raise ValueError(f"calm_jax model: continuation of {len(continuation)} tokens exceeds max_length "
                         f"{self.max_length}")
      row = (context + continuation)[-(self.max_length + 1):]  # HFLM's left truncation
      truncated += len(row) < len(context) + len(continuation)
      rows.append(row)
      targets.append([0] * (len(row) - len(continuation)) + [1] * len(continuation))
    if truncated:
      log.warning("%d of %d requests exceed max_length %d tokens: their contexts are truncated from the left",
                  truncated, len(rows), self.max_length)
    with tqdm(total=len(rows), disable=disable_tqdm, desc="Running loglikelihood requests") as bar:
      total, _, greedy = score(self.model, rows, targets, batch_size=self.batch_size, params=self._params,
                               progress=bar.update)
    out = [(float(t), bool(g)) for t, g in zip(total, greedy)]
    for (strings, _, _), answer in zip(requests, out):
      if strings is not None:
        self.cache_hook.add_partial("loglikelihood", strings, answer)
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """Log-likelihood of whole strings: HFLM's disjoint windows of max_length tokens, summed per string."""
    windows, owner = [], []
    for i, (string,) in enumerate(req.args for req in requests):
      pairs = lm_utils.get_rolling_token_windows(token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                                                 max_seq_len=self.max_length, context_len=1)
      for context, continuation in map(lm_utils.make_disjoint_window, pairs):
        windows.append((None, context, continuation))
        owner.append(i)
    scored = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm) if windows else []
    totals = [0.0] * len(requests)
    for i, (lp, _) in zip(owner, scored):
      totals[i] += lp
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
    return totals

  def _greedy_check(self, kwargs: dict) -> None:
    """Raises for generation settings ours would not honour (after lm-eval's normalize_gen_kwargs)."""
    if kwargs.get("do_sample"):
      raise NotImplementedError(f"calm_jax model: generate_until is greedy only; got {kwargs} (do_sample=True)")
    if kwargs.get("num_beams", 1) != 1:
      raise NotImplementedError(f"calm_jax model: beam search is not supported (num_beams={kwargs['num_beams']})")
    other = sorted(set(kwargs) - {"do_sample", "num_beams", *_GREEDY_ONLY})
    if other:
      raise ValueError(f"calm_jax model: generation kwargs {other} are not supported (greedy decoding with `until`, "
                       "`max_gen_toks` only)")

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Greedy continuations, batched by identical gen_kwargs and cut at the first `until` string (or eos)."""
    from calm_jax.decoding import generate

    if self._gen_differs and requests:
      log.warning("calm_jax model: %s/generation_config.json sets %s, which HF's generate applies and ours does not",
                  self.pretrained, self._gen_differs)
    re_ords = Collator([req.args for req in requests], sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
                       group_by="gen_kwargs", group_fn=lambda r: r[1])
    eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
    res = []
    bar = tqdm(total=len(requests), disable=disable_tqdm, desc="Running generate_until requests")
    for chunk in re_ords.get_batched(n=self.batch_size, batch_fn=None):
      contexts, all_gen_kwargs = zip(*chunk)
      if not isinstance(all_gen_kwargs[0], dict):
        raise ValueError(f"calm_jax model: gen_kwargs must be a dict, got {all_gen_kwargs[0]!r}")
      kwargs = dict(normalize_gen_kwargs(all_gen_kwargs[0], self.max_gen_toks))
      until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
      max_gen_toks = kwargs.pop("max_gen_toks")
      self._greedy_check(kwargs)
      max_ctx_len = self.max_length - max_gen_toks
      if max_ctx_len <= 0:
        raise ValueError(f"calm_jax model: max_gen_toks={max_gen_toks} leaves no room for a prompt in max_length "
                         f"{self.max_length}")
      # An empty prompt is conditioned on the prefix token (HF would generate from padding alone).
      prompts = [p[-max_ctx_len:] or [self.prefix_token_id] for p in self._encode_batch(list(contexts))]
      outs = generate(self.model, prompts, max_new_tokens=max_gen_toks, eos_token_id=self._gen_eos,
                      params=self._params)
      for context, toks in zip(contexts, outs):
        s = postprocess_generated_text(generation=self.tok_decode(toks), stop=until, think_end_token=None)
        res.append(s)
        self.cache_hook.add_partial("generate_until", (context, all_gen_kwargs[0]), s)
        bar.update(1)
    bar.close()
    return re_ords.get_original(res)

  def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """The tokenizer's chat template, as HFLM applies it (a template that rejects a system turn gets none)."""
    import jinja2

    def render(history):
      return self.tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                continue_final_message=not add_generation_prompt)

    if self.tokenizer.chat_template is None:
      raise ValueError(f"calm_jax model: the tokenizer of {self.pretrained} has no chat template; run without "
                       "--apply_chat_template")
    try:
      return render(chat_history)
    except jinja2.exceptions.TemplateError:
      log.warning("Failed to apply chat template. removing the system role in chat history.")
      return render([m for m in chat_history if m["role"] != "system"])
