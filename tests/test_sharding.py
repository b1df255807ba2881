"""Sharded execution on 8 fake CPU devices equals the 1-device result.

Parameters are laid out by the logical-axis rules (`calm_jax.sharding`), the batch over the
data-parallel axes; forward logits and next-token-loss gradients must match an unsharded run.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from calm_jax import sharding as S
from calm_jax.models import Decoder, DecoderConfig, flatten, forward, init_params, param_specs

pytestmark = pytest.mark.usefixtures("fast_compile")

TINY = DecoderConfig.make(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2)
# Every sharded dimension divisible by 8, so tensor=8 really splits heads / kv heads / mlp / vocab.
WIDE = DecoderConfig.make(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=8, num_key_value_heads=8, head_dim=8)

MESHES = {
  "data8": [("data", -1), ("fsdp", 1), ("tensor", 1)],
  "fsdp8": [("data", 1), ("fsdp", -1), ("tensor", 1)],
  "2x2x2": [("data", 2), ("fsdp", 2), ("tensor", 2)],
  "tensor8": [("data", 1), ("fsdp", 1), ("tensor", 8)],
}


def loss_fn(cfg, params, tokens):
  """Next-token cross-entropy; the logits ride along as aux, so one compile gives both."""
  logits, _ = forward(cfg, params, tokens[:, :-1])
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)), logits


def grad_fn(cfg):
  return jax.value_and_grad(functools.partial(loss_fn, cfg), has_aux=True)


@functools.lru_cache(maxsize=None)
def reference(cfg):
  """Params, tokens, and the unsharded (device 0) loss, logits and gradients."""
  params = init_params(cfg, 0)
  tokens = np.asarray(jax.random.randint(jax.random.key(1), (8, 12), 0, cfg.vocab_size), np.int32)
  (loss, logits), grads = jax.jit(grad_fn(cfg))(params, tokens)
  return params, tokens, float(loss), np.asarray(logits), jax.tree.map(np.asarray, grads)


def place(cfg, mesh):
  """The reference params and batch laid out on `mesh` by the default rules."""
  params, tokens, *_ = reference(cfg)
  return jax.device_put(params, S.param_shardings(cfg, mesh)), S.shard_batch({"tokens": tokens}, mesh)


@pytest.mark.parametrize("cfg,mesh_name", [(TINY, "data8"), (TINY, "fsdp8"), (TINY, "2x2x2"),
                                           (TINY, "tensor8"), (WIDE, "tensor8")],
                         ids=["tiny-data8", "tiny-fsdp8", "tiny-2x2x2", "tiny-tensor8", "wide-tensor8"])
def test_sharded_forward_and_grad_match_one_device(cfg, mesh_name):
  mesh = S.make_mesh(MESHES[mesh_name])
  assert mesh.size == 8
  _, _, ref_loss, ref_logits, ref_grads = reference(cfg)
  p_sh, b_sh = S.param_shardings(cfg, mesh), S.batch_sharding(mesh)
  with jax.set_mesh(mesh):
    params, batch = place(cfg, mesh)
    step = jax.jit(grad_fn(cfg), in_shardings=(p_sh, b_sh), out_shardings=((None, None), p_sh))
    (loss, logits), grads = step(params, batch["tokens"])

  np.testing.assert_allclose(np.asarray(logits), ref_logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5, atol=1e-6)
  flat_ref, flat_g = flatten(ref_grads), flatten(grads)
  for name, g in flat_ref.items():
    np.testing.assert_allclose(np.asarray(flat_g[name]), g, rtol=1e-4, atol=1e-6, err_msg=name)

  # The parameters (and gradients) really are laid out by the rules.
  specs = param_specs(cfg)
  for name, arr in flatten(params).items():
    expected = S.logical_to_spec(specs[name].axes, S.DEFAULT_RULES, mesh, specs[name].shape)
    assert arr.sharding.spec == expected, name
    assert flat_g[name].sharding.spec == expected, name
  assert batch["tokens"].addressable_shards[0].data.shape == (8 // S.data_parallel_size(mesh), 12)


def shard_shape(arr):
  return arr.addressable_shards[0].data.shape


def test_params_are_split_as_the_rules_say():
  """Spot checks of real splits, and of the fallback to replicated for indivisible dims."""
  L, E, H, KV, D, F, V = 2, 32, 4, 2, 8, 64, 64
  params, batch = place(TINY, S.make_mesh(MESHES["fsdp8"]))
  assert params["layers"]["q"].sharding.spec == P(None, "fsdp")
  assert shard_shape(params["layers"]["q"]) == (L, E // 8, H, D)
  assert shard_shape(params["embed"]) == (V, E // 8)
  assert shard_shape(params["layers"]["down"]) == (L, F, E // 8)
  assert batch["tokens"].sharding.spec == P("fsdp")

  params, _ = place(TINY, S.make_mesh(MESHES["tensor8"]))
  # 4 heads / 2 kv heads on a tensor axis of 8: replicated, not an error.
  assert params["layers"]["q"].sharding.spec == P()
  assert params["layers"]["k"].sharding.spec == P()
  assert shard_shape(params["layers"]["q"]) == (L, E, H, D)
  # mlp 64 and vocab 64 do divide by 8.
  assert shard_shape(params["layers"]["gate"]) == (L, E, F // 8)
  assert shard_shape(params["lm_head"]) == (E, V // 8)

  params, _ = place(WIDE, S.make_mesh(MESHES["tensor8"]))
  assert shard_shape(params["layers"]["q"]) == (2, 64, 1, 8)
  assert shard_shape(params["layers"]["o"]) == (2, 1, 8, 64)

  params, batch = place(TINY, S.make_mesh(MESHES["2x2x2"]))
  assert params["layers"]["o"].sharding.spec == P(None, "tensor", None, "fsdp")
  assert shard_shape(params["layers"]["o"]) == (L, H // 2, D, E // 2)
  assert batch["tokens"].sharding.spec == P(("data", "fsdp"))


def test_logical_to_spec_rules():
  mesh = S.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
  assert S.logical_to_spec(("layers", "embed", "mlp")) == P(None, "fsdp", "tensor")
  assert S.logical_to_spec(("batch", "length")) == P(("data", "fsdp"))
  # A mesh axis is used at most once per spec.
  assert S.logical_to_spec(("embed", "embed"), mesh=mesh, shape=(4, 4)) == P("fsdp")
  assert S.logical_to_spec(("mlp", "vocab"), mesh=mesh, shape=(4, 4)) == P("tensor")
  # Indivisible dimensions drop the mesh axes that do not divide them.
  assert S.logical_to_spec(("batch",), mesh=mesh, shape=(2,)) == P("data")
  assert S.logical_to_spec(("heads",), mesh=mesh, shape=(3,)) == P()
  # Mesh axes the mesh lacks are dropped; the first rule that fits wins.
  data_only = S.make_mesh([("data", -1)])
  assert S.logical_to_spec(("batch", "embed"), mesh=data_only, shape=(8, 8)) == P("data")
  rules = [("embed", "tensor"), ("embed", "fsdp")] + list(S.DEFAULT_RULES)
  assert S.logical_to_spec(("mlp", "embed"), rules, mesh, (4, 4)) == P("tensor", "fsdp")
  # A rule put in front overrides the defaults, including "replicate".
  replicate_embed = [("embed", None)] + list(S.DEFAULT_RULES)
  assert S.logical_to_spec(("embed", "mlp"), replicate_embed, mesh, (4, 4)) == P(None, "tensor")
  assert S.logical_to_spec(None) == P()
  assert S.logical_to_spec(("lora_rank", "experts", None)) == P()
  # Size-1 mesh axes split nothing and are left out.
  fsdp_only = S.make_mesh(MESHES["fsdp8"])
  assert S.logical_to_spec(("batch", "embed", "mlp"), mesh=fsdp_only, shape=(8, 8, 8)) == P("fsdp")


def test_param_shardings_from_module_config_and_specs_agree():
  mesh = S.make_mesh(MESHES["2x2x2"])
  model = Decoder(TINY, params=reference(TINY)[0])
  from_model = S.param_shardings(model, mesh)
  from_cfg = S.param_shardings(TINY, mesh)
  from_specs = S.param_shardings(param_specs(TINY), mesh)
  assert jax.tree.structure(from_model) == jax.tree.structure(model.params())
  assert from_model == from_cfg == from_specs
  assert all(isinstance(s, NamedSharding) for s in jax.tree.leaves(from_model))


def test_shardings_for_state_with_method_variables():
  """Method Variable types carry `axes` too; Variables without `axes` are replicated."""

  class Adapter(nnx.Module):
    def __init__(self):
      self.a = nnx.LoRAParam(jnp.zeros((32, 4)), axes=("embed", "lora_rank"))
      self.b = nnx.LoRAParam(jnp.zeros((4, 64)), axes=("lora_rank", "mlp"))
      self.router = nnx.Param(jnp.zeros((32, 3)), axes=("embed", "experts"))
      self.count = nnx.BatchStat(jnp.zeros((), jnp.int32))

  mesh = S.make_mesh(MESHES["2x2x2"])
  state = nnx.state(Adapter())
  shardings = S.shardings_for_state(state, mesh)
  assert shardings["a"].get_value().spec == P("fsdp")
  assert shardings["b"].get_value().spec == P(None, "tensor")
  assert shardings["router"].get_value().spec == P("fsdp")
  assert shardings["count"].get_value().spec == P()
  placed = jax.device_put(state, shardings)
  assert placed["a"].get_value().addressable_shards[0].data.shape == (16, 4)
  lora_only = S.shardings_for_state(nnx.state(Adapter(), nnx.LoRAParam), mesh)
  assert set(lora_only.keys()) == {"a", "b"}


def test_bad_mesh_configs_name_the_numbers():
  with pytest.raises(S.ShardingError, match=r"multiply to 3, which does not divide the 8 devices"):
    S.make_mesh([("data", 3)])
  with pytest.raises(S.ShardingError, match=r"multiply to 3, which does not divide the 8 devices"):
    S.make_mesh([("data", -1), ("tensor", 3)])
  with pytest.raises(S.ShardingError, match=r"at most one mesh axis may have size -1"):
    S.make_mesh([("data", -1), ("fsdp", -1)])
  with pytest.raises(S.ShardingError, match=r"multiply to 16, which does not divide the 8 devices"):
    S.make_mesh([("data", 4), ("tensor", 4)])
  with pytest.raises(S.ShardingError, match=r"distinct"):
    S.make_mesh([("data", 2), ("data", 4)])
  with pytest.raises(S.ShardingError, match=r"positive or -1"):
    S.make_mesh([("data", 0), ("fsdp", -1)])
  with pytest.raises(S.ShardingError, match=r"batch size 6 is not divisible by the fixed data-parallel axes"):
    S.make_mesh([("data", -1), ("fsdp", 4)], batch_size=6)
  # An explicit device list is honoured.
  assert S.make_mesh([("data", -1)], devices=jax.devices()[:2]).size == 2


@pytest.mark.parametrize("mesh_cfg,n,batch,want", [
    # fixed 1 x 1 x 1 (a tiny model's config) on 8 devices: replicated on all of them
    ([("data", 1), ("fsdp", 1), ("tensor", 1)], 8, None, {"data": 1, "fsdp": 1, "tensor": 1, "replica": 8}),
    # the default: data takes the rest
    ([("data", -1), ("fsdp", 1), ("tensor", 1)], 8, 16, {"data": 8, "fsdp": 1, "tensor": 1}),
    ([("data", -1), ("fsdp", 1), ("tensor", 1)], 1, 16, {"data": 1, "fsdp": 1, "tensor": 1}),
    # a batch of 6 on 8 devices: the largest data axis that divides it (2), the rest replicated
    ([("data", -1), ("fsdp", 1), ("tensor", 1)], 8, 6, {"data": 2, "fsdp": 1, "tensor": 1, "replica": 4}),
    ([("data", -1), ("tensor", 2)], 8, 6, {"data": 2, "tensor": 2, "replica": 2}),
    # the rest axis is not a batch axis: the batch does not constrain it
    ([("data", 2), ("tensor", -1)], 8, 6, {"data": 2, "tensor": 4}),
    ([("data", 2)], 6, None, {"data": 2, "replica": 3}),
])
def test_mesh_policy_uses_every_device(mesh_cfg, n, batch, want):
  names, sizes = S.mesh_shape(mesh_cfg, n, batch)
  assert dict(zip(names, sizes)) == want
  mesh = S.make_mesh(mesh_cfg, devices=jax.devices()[:n], batch_size=batch)
  assert mesh.size == n and dict(zip(mesh.axis_names, mesh.axis_sizes)) == want
  if batch:  # the batch lays out on it
    x = S.shard_batch({"x": np.arange(batch * 3).reshape(batch, 3)}, mesh)["x"]
    np.testing.assert_array_equal(np.asarray(x), np.arange(batch * 3).reshape(batch, 3))


def test_replicated_mesh_computes_what_one_device_does():
  # every parameter replicated over the replica axis: the same result as one device
  params, batch = place(TINY, S.make_mesh([("data", 1), ("fsdp", 1), ("tensor", 1)]))
  assert params["layers"]["q"].sharding.is_fully_replicated and len(params["layers"]["q"].sharding.device_set) == 8
  one = forward(TINY, jax.device_get(params), np.asarray(batch["tokens"]))[0]
  got = forward(TINY, params, batch["tokens"])[0]
  np.testing.assert_allclose(np.asarray(got), np.asarray(one), atol=1e-5)


def test_bad_batch_and_unknown_logical_axis():
  mesh = S.make_mesh([("data", 4), ("fsdp", 2), ("tensor", 1)])
  with pytest.raises(S.ShardingError, match=r"batch size 6 is not divisible by the data-parallel size 8"):
    S.shard_batch({"tokens": np.zeros((6, 5), np.int32)}, mesh)
  ok = S.shard_batch({"tokens": np.zeros((16, 5), np.int32), "mask": np.ones((16, 5), bool)}, mesh)
  assert ok["tokens"].sharding.spec == P(("data", "fsdp"))
  assert ok["mask"].addressable_shards[0].data.shape == (2, 5)
  with pytest.raises(S.ShardingError, match=r"logical axis 'embd' has no sharding rule"):
    S.logical_to_spec(("embd", "mlp"))
  with pytest.raises(S.ShardingError, match=r"do not match shape"):
    S.logical_to_spec(("embed", "mlp"), shape=(4,))


def test_shard_logical_constrains_under_a_mesh_and_is_a_noop_without():
  x = jnp.ones((8, 4))
  assert S.shard_logical(x, ("batch", None)) is x
  mesh = S.make_mesh(MESHES["2x2x2"])
  with jax.set_mesh(mesh):
    y = jax.jit(lambda x: S.shard_logical(x * 2, ("batch", None)))(x)
  assert y.sharding.spec == P(("data", "fsdp"))
  np.testing.assert_array_equal(np.asarray(y), 2 * np.ones((8, 4)))
