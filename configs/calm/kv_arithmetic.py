"""CALM's key-value arithmetic (paper Table 1) at small scale: m_A, m_B and CALM trained here.

  python -m launch.train --config=configs/calm/kv_arithmetic.py --workdir=runs/calm_kv
  python -m launch.train --config=configs/calm/kv_arithmetic.py:ablation=encoder --workdir=...
      ablation: none | random_augment | encoder | lora;  objective: twin (default) | paper
  python -m launch.train --config=configs/calm/kv_arithmetic.py:objective=paper --workdir=...   # the paper's loss alone
  python -m launch.train --config=configs/calm/kv_arithmetic.py:tiny --workdir=/tmp/x   # the pipeline in seconds

`--config.seed=N` changes the key map, the held-in keys, the data and every initialisation.
Writes DIR/results.json ({"m_A"|"m_B"|"calm": {task: accuracy}, "seconds": s}) and DIR/results.png.
"""
import ml_collections

from configs.common import add_common, parse_arg


def _model(width, layers, heads, kv_heads):
  return ml_collections.ConfigDict(dict(
      model_type="llama", hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=64, rope_theta=10000.0,
      tie_word_embeddings=False, init_std=0.02, dtype="float32"))


def _part(steps, batch_size, lr, model=None):
  c = ml_collections.ConfigDict()
  add_common(c, steps=steps, batch_size=batch_size)
  c.optimizer.lr = lr
  c.optimizer.warmup_steps = min(100, steps // 10)
  c.optimizer.weight_decay = 0.01
  c.optimizer.final_lr_fraction = 0.05
  c.log_every = 100
  c.tensorboard = False
  c.checkpoint.every = 1000
  if model is not None:
    c.model = model
  return c


def get_config(arg=None):
  arg = parse_arg(arg, tiny=False, ablation="none", objective="twin")
  if arg.objective not in ("twin", "paper"):
    raise ValueError(f"objective={arg.objective!r}: 'twin' (the default) or 'paper'")
  c = ml_collections.ConfigDict()
  c.method = "calm_kv_arithmetic"
  c.seed = 0
  c.ablation = arg.ablation
  # N keys -> the distinct values 1..N; CALM trains on expressions over 20% of them. An operand is a
  # head token (a key's own token, or `#` for a number) then digit slots, blank after a key (kv_tasks.py).
  c.kv = ml_collections.ConfigDict(dict(n_keys=200, key_len=3, held_in_fraction=0.2, operands=2, ops="+"))
  # m_A small (KV-substitution), m_B larger (numeric arithmetic), as PaLM2-XXS / -XS in the paper.
  c.m_a = _part(2500, 64, 3e-3, _model(64, 4, 4, 2))
  c.m_a.method = "calm_kv_arithmetic/m_a"
  # m_A also writes each key's value into the key's blank slots (kv_tasks.KeyValueTable.slot_targets),
  # so its states hold the value where the anchor reads the operand's digits.
  c.m_a.slot_fill = True
  # Its data: KV-substitution, plus numeric prompts whose slots (only) it learns to read: a number's
  # digits are its value. No arithmetic answer is ever in m_A's loss.
  c.m_a.data = ml_collections.ConfigDict(dict(kv_substitution=1.0, numeric_arithmetic=0.0))
  c.m_b = _part(5000, 64, 3e-3, _model(128, 4, 4, 2))  # its arithmetic "clicks" at ~3000 steps
  c.m_b.method = "calm_kv_arithmetic/m_b"
  # True: the anchor's embedding rows of the key tokens (which it never sees) are zero, not random
  # (kv_arithmetic.zero_embeddings; the same as initialising them at zero).
  c.m_b.zero_key_embeddings = False
  c.calm = _part(2500, 64, 3e-3)
  c.calm.method = "calm_kv_arithmetic/calm"  # ComposeParam trains (LoRAParam in the LoRA ablation)
  # D_C over the held-in keys: KV-arithmetic (paper §3.2 / Fig. 1) plus KV-substitution (§4.1's wording),
  # plus the anchor's own numeric arithmetic so the composition learns to leave it alone (no keys in it).
  c.calm.data = ml_collections.ConfigDict(dict(tasks={"kv_arithmetic": 1.0, "kv_substitution": 0.25,
                                                      "numeric_arithmetic": 0.25}))
  # Connections (1-based layer outputs); [] = every 4th m_A layer -> evenly spaced anchor layers from 1.
  # Here every m_A layer feeds the anchor layer of the same depth (both have 4). cross_rope / cross_null
  # (compose.py; extensions, off in the library): rotary positions in the cross-attention and a null
  # slot; with them the composition reads each slot's digit at its own position (docs/calm.md).
  c.calm.compose = ml_collections.ConfigDict(dict(augment_layers=(1, 2, 3, 4), anchor_layers=(1, 2, 3, 4),
                                                  num_heads=0, cross_rope=True, cross_null=True))
  # > 0: add that weight × a hidden-state match to the anchor's reading of each prompt's numeric twin
  # (kv_arithmetic.twin_loss; a training aid beyond the paper's loss, off = the paper's D_C objective).
  c.calm.twin_loss = 0.0
  c.calm.twin_layers = ()  # the connected anchor layers it matches; () = all
  c.lora = ml_collections.ConfigDict(dict(targets="layers/(q|k|v|o|gate|up|down)"))
  c.eval = ml_collections.ConfigDict(dict(n_per_task=500, batch_size=256))
  if arg.tiny:
    c.kv.n_keys = 20
    for part, steps in (("m_a", 20), ("m_b", 20), ("calm", 10)):
      c[part].steps = steps
      c[part].batch_size = 16
      c[part].log_every = 5
    c.m_a.model.update(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1)
    c.m_b.model.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2)
    c.calm.compose.augment_layers = (2,)
    c.calm.compose.anchor_layers = (1,)
    c.eval.update(n_per_task=16, batch_size=64)
  if arg.objective == "twin":
    # The default (docs/calm.md, "The twin loss and zero key rows"): two additions to the paper's recipe,
    # without which the composition stays at the floor on KV-arithmetic here (`:objective=paper` runs the
    # paper's alone):
    # 1. m_A's last layer also feeds the anchor's embedding output (a connection at anchor layer 0), and
    #    D_C's loss adds the twin term: on KV-arithmetic and numeric rows, the composed anchor's output at
    #    every connected layer is pulled toward the anchor's own on the prompt's numeric twin
    #    (`{qzf}___+{abc}___=` -> `#017+#042=`; held-in keys only, whose values D_C's substitution
    #    answers state); weight 100 against the answer-token cross-entropy;
    # 2. the anchor's embedding rows of the key tokens, which it never sees, are zero instead of random
    #    noise, so "write `#` here" is the same update for every key, held out or not.
    last = c.m_a.model.num_hidden_layers
    c.calm.compose.augment_layers = (last,) + tuple(c.calm.compose.augment_layers)
    c.calm.compose.anchor_layers = (0,) + tuple(c.calm.compose.anchor_layers)
    c.calm.twin_loss = 100.0
    c.calm.twin_layers = ()
    c.m_b.zero_key_embeddings = True
    # 16 cross-attention heads of size 8 (the anchor's 4 of size 32 reach 78.6 % instead of 86.4 %)
    c.calm.compose.num_heads = 16 if not arg.tiny else 0
  return c
