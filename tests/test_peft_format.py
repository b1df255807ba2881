"""PEFT LoRA adapters both ways, against `peft` itself: ours -> PEFT directory -> `PeftModel` logits equal
ours; an adapter trained by peft -> our factors -> our logits equal `PeftModel`'s."""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import hf_zoo  # noqa: E402

from calm_jax import hf  # noqa: E402
from calm_jax.lora import AdapterError, LoRASpec, apply, init_lora, lora_extra  # noqa: E402
from calm_jax.peft_format import PEFT_CONFIG, PEFT_WEIGHTS, load_peft, save_peft  # noqa: E402

TOL = 1e-5  # max |ours - peft| on logits of magnitude ~3


def _ours(model, spec, lora, ids, experts=None):
  extra = lora_extra(jax.tree.map(jnp.asarray, lora), model.config.num_layers,
                     experts=None if experts is None else jnp.asarray(experts))
  valid = jnp.ones(ids.shape, bool)
  return np.asarray(apply(model.config, spec.hooks(), model.params(), extra, jnp.asarray(ids), valid))


def _random_lora(cfg, spec, seed):
  lora = init_lora(cfg, spec, seed)
  keys = iter(jax.random.split(jax.random.key(seed + 1), 64))
  # b != 0: a real update, of the size a trained adapter has (a perturbation of the base, not a new model)
  return jax.tree.map(lambda x: 0.1 * jax.random.normal(next(keys), x.shape), lora)


def _peft_logits(torch_model, path, ids):
  m = peft.PeftModel.from_pretrained(torch_model, str(path)).eval()
  with torch.no_grad():
    return m(torch.as_tensor(np.asarray(ids))).logits.float().numpy()


@pytest.mark.parametrize("targets,alpha", [("layers/(q|k|v|o|gate|up|down)", 16.0), ("layers/(q|v)", 4.0)])
def test_our_adapter_loads_in_peft_with_the_same_logits(zoo_saved, tmp_path, targets, alpha):
  torch_model, path = zoo_saved("llama_gqa")
  model = hf.load(path)
  spec = LoRASpec.create(model.config, targets, rank=4, alpha=alpha)
  lora = _random_lora(model.config, spec, 0)
  out = save_peft(tmp_path / "peft", lora, spec, model.config, base_model=str(path))
  ids = hf_zoo.input_ids(batch=2)
  ours = _ours(model, spec, lora, ids)
  base = hf_zoo.torch_logits(torch_model, ids)
  assert np.abs(ours - base).max() > 0.1  # the adapter changes the model
  theirs = _peft_logits(hf_zoo.build("llama_gqa"), out, ids)
  print(f"max |ours - peft| {np.abs(ours - theirs).max():.2e}, max|logit| {np.abs(theirs).max():.2f}")
  assert np.abs(ours - theirs).max() <= TOL
  assert json.loads((out / PEFT_CONFIG).read_text())["r"] == 4


@pytest.mark.slow
def test_each_moa_expert_exports_as_its_own_adapter(zoo_saved, tmp_path):
  _, path = zoo_saved("llama_gqa")
  model = hf.load(path)
  spec = LoRASpec.create(model.config, "layers/(q|v|down)", rank=2, alpha=4.0, num_experts=3)
  lora = _random_lora(model.config, spec, 1)
  ids = hf_zoo.input_ids(batch=2)
  for x in (0, 2):
    out = save_peft(tmp_path / f"expert{x}", lora, spec, model.config, expert=x)
    ours = _ours(model, spec, lora, ids, experts=[x, x])
    theirs = _peft_logits(hf_zoo.build("llama_gqa"), out, ids)
    print(f"max |ours - peft| {np.abs(ours - theirs).max():.2e}, max|logit| {np.abs(theirs).max():.2f}")
  assert np.abs(ours - theirs).max() <= TOL
  with pytest.raises(AdapterError, match="pass expert="):
    save_peft(tmp_path / "all", lora, spec, model.config)


@pytest.mark.parametrize("rslora", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_a_peft_trained_adapter_imports_with_the_same_logits(zoo_saved, tmp_path, rslora):
  """peft trains a LoRA (3 SGD steps from its own init, so B != 0) on q, v and down; we import it."""
  _, path = zoo_saved("llama_gqa")
  torch.manual_seed(0)
  pm = peft.get_peft_model(hf_zoo.build("llama_gqa"), peft.LoraConfig(
      r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0, use_rslora=rslora))
  opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
  ids = hf_zoo.input_ids(batch=2)
  x = torch.as_tensor(ids)
  for _ in range(3):
    loss = pm(input_ids=x, labels=x).loss
    opt.zero_grad()
    loss.backward()
    opt.step()
  pm.eval()
  pm.save_pretrained(tmp_path / "trained")
  with torch.no_grad():
    theirs = pm(x).logits.float().numpy()

  model = hf.load(path)
  lora, spec, _ = load_peft(tmp_path / "trained", model.config)
  assert spec.targets == ("q", "v", "down") and spec.rank == 4
  ours = _ours(model, spec, lora, ids)
  assert np.abs(ours - hf_zoo.torch_logits(hf_zoo.build("llama_gqa"), ids)).max() > 1e-3  # it trained
  print(f"max |ours - peft| {np.abs(ours - theirs).max():.2e}, max|logit| {np.abs(theirs).max():.2f}")
  assert np.abs(ours - theirs).max() <= TOL


def _peft_dir(tmp_path, config: dict, tensors: dict):
  from safetensors.numpy import save_file
  d = tmp_path / "bad"
  d.mkdir()
  (d / PEFT_CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, **config}))
  save_file(tensors, str(d / PEFT_WEIGHTS))
  return d


@pytest.mark.parametrize("config,match", [({"use_dora": True}, "use_dora=true"),
                                          ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
                                          ({"layers_to_transform": [0]}, "layers_to_transform"),
                                          ({"peft_type": "IA3"}, "peft_type 'IA3'")])
def test_what_our_lora_cannot_express_is_refused_by_name(zoo_saved, tmp_path, config, match):
  _, path = zoo_saved("llama_gqa")
  d = _peft_dir(tmp_path, config, {"x": np.zeros(1, np.float32)})
  with pytest.raises(AdapterError, match=f"adapter_config.json: .*{match}"):
    load_peft(d, hf.load_config(path))


def test_missing_layer_and_wrong_shape_are_named(zoo_saved, tmp_path):
  _, path = zoo_saved("llama_gqa")
  cfg = hf.load_config(path)
  name = "base_model.model.model.layers.{}.self_attn.q_proj.lora_{}.weight"
  tensors = {name.format(i, "A"): np.zeros((2, cfg.hidden_size), np.float32) for i in range(cfg.num_layers)}
  tensors.update({name.format(i, "B"): np.zeros((cfg.num_heads * cfg.head_dim, 2), np.float32) for i in (0, 2)})
  with pytest.raises(AdapterError, match="layer 1 self_attn.q_proj has no lora_B"):
    load_peft(_peft_dir(tmp_path, {}, tensors), cfg)
  tensors[name.format(1, "B")] = np.zeros((7, 2), np.float32)
  shutil.rmtree(tmp_path / "bad")
  with pytest.raises(AdapterError, match=r"lora_B.weight \(7, 2\), expected"):
    load_peft(_peft_dir(tmp_path, {}, tensors), cfg)


def test_an_adapter_for_another_architecture_or_depth_is_named(zoo_saved, tmp_path):
  """A GPT-2 adapter (its `c_attn` names), and an adapter of a deeper model, on our llama base: refused naming the
  tensor and what the base is, before any weight is read."""
  _, path = zoo_saved("llama_gqa")
  cfg = hf.load_config(path)
  gpt2 = {"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": np.zeros((2, 8), np.float32)}
  with pytest.raises(AdapterError, match=rf"unexpected tensor .*c_attn.* for a {cfg.num_layers}-layer llama base"):
    load_peft(_peft_dir(tmp_path, {}, gpt2), cfg)
  shutil.rmtree(tmp_path / "bad")
  deep = {f"base_model.model.model.layers.{cfg.num_layers}.self_attn.q_proj.lora_A.weight":
          np.zeros((2, cfg.hidden_size), np.float32)}
  with pytest.raises(AdapterError, match=rf"layers\.{cfg.num_layers}\..* for a {cfg.num_layers}-layer"):
    load_peft(_peft_dir(tmp_path, {}, deep), cfg)


@pytest.mark.slow
def test_peft_adapters_of_different_targets_ranks_and_alphas_become_one_expert_stack(zoo_saved, tmp_path):
  """Two peft adapters (q/v rank 2 alpha 8; down/o rank 4 alpha 2, rsLoRA): stacked as MoA experts, each
  example routed to expert i gives `PeftModel`'s logits with adapter i."""
  from moa.experts import peft_experts
  _, path = zoo_saved("llama_gqa")
  dirs = []
  for i, (targets, r, alpha, rs) in enumerate([(["q_proj", "v_proj"], 2, 8, False),
                                               (["down_proj", "o_proj"], 4, 2, True)]):
    torch.manual_seed(i)
    pm = peft.get_peft_model(hf_zoo.build("llama_gqa"), peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                                          use_rslora=rs))
    with torch.no_grad():
      for n, p in pm.named_parameters():
        if "lora_B" in n:
          p.normal_(0, 0.1)
    pm.save_pretrained(tmp_path / f"a{i}")
    dirs.append(tmp_path / f"a{i}")
  model = hf.load(path)
  experts, spec, _ = peft_experts(dirs, model.config)
  assert spec.num_experts == 2 and set(spec.targets) == {"q", "v", "o", "down"} and spec.rank == 4
  ids = hf_zoo.input_ids(batch=2)
  ours = _ours(model, spec, experts, ids, experts=[0, 1])
  for row, d in enumerate(dirs):
    theirs = _peft_logits(hf_zoo.build("llama_gqa"), d, ids)
    print(f"expert {row}: max |ours - peft| {np.abs(ours[row] - theirs[row]).max():.2e}")
    assert np.abs(ours[row] - theirs[row]).max() <= TOL


@pytest.mark.slow
def test_merge_lora_folds_a_peft_adapter_as_peft_merge_and_unload_does(zoo_saved, tmp_path):
  """`launch.merge_lora` on a PEFT adapter: the written HF directory, loaded by transformers, gives the
  logits of peft's own `merge_and_unload`; an existing output is refused and left as it was."""
  from calm_jax.errors import UserError
  from calm_jax.lora import merge_adapter_dir

  torch_model, path = zoo_saved("llama_gqa")
  model = hf.load(path)
  spec = LoRASpec.create(model.config, "layers/(q|v|down)", rank=4, alpha=8.0)
  adapter = save_peft(tmp_path / "peft", _random_lora(model.config, spec, 3), spec, model.config,
                      base_model=str(path))
  out = merge_adapter_dir(path, adapter, tmp_path / "merged")
  ids = hf_zoo.input_ids(batch=2)
  reference = peft.PeftModel.from_pretrained(hf_zoo.build("llama_gqa"), str(adapter)).merge_and_unload().eval()
  from transformers import AutoModelForCausalLM
  ours = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
  with torch.no_grad():
    want = reference(torch.as_tensor(np.asarray(ids))).logits.numpy()
    got = ours(torch.as_tensor(np.asarray(ids))).logits.numpy()
  assert np.abs(want - hf_zoo.torch_logits(torch_model, ids)).max() > 0.1  # the adapter changes the model
  assert np.abs(got - want).max() <= TOL
  before = sorted(p.name for p in out.iterdir())
  with pytest.raises((UserError, FileExistsError)):
    merge_adapter_dir(path, adapter, out)
  assert sorted(p.name for p in out.iterdir()) == before
