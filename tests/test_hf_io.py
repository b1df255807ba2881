"""Checkpoint I/O: HF directories in and out, safetensors interop, bad input, atomicity.

References are tiny random `transformers` models (`hf_zoo.py`) saved by the test; what we
write must load in `transformers` again and what the `safetensors` package writes must read
in ours (and the reverse).
"""
import json
import os
import shutil

import hf_zoo
import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy
import safetensors.torch
import torch
import transformers

from calm_jax import hf, safetensors_io
from calm_jax.atomic import OutputExistsError
from calm_jax.models import ConfigError, flatten
from calm_jax.safetensors_io import CheckpointError, SafetensorsFile, ShardedWriter

ROUND_TRIP_CASES = ["llama_gqa", "mistral_window", "qwen2_tied"]


@pytest.fixture
def saved(zoo_saved):
  """name -> (HF fp32 model, its save_pretrained directory)."""
  return zoo_saved


def _tree(root):
  """Every path under root's parent with its size: what a failed call must leave unchanged."""
  base = os.path.dirname(os.path.abspath(root))
  out = {}
  for d, _, files in os.walk(base):
    out[os.path.relpath(d, base)] = None
    for f in files:
      p = os.path.join(d, f)
      out[os.path.relpath(p, base)] = os.path.getsize(p)
  return out


def _flat_params(model):
  return {k: np.asarray(v) for k, v in flatten(model.params()).items()}


def _assert_params_equal(a, b):
  fa, fb = _flat_params(a), _flat_params(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    assert fa[k].dtype == fb[k].dtype, k
    np.testing.assert_array_equal(fa[k].view(np.uint8), fb[k].view(np.uint8), err_msg=k)  # bit-exact


def _torch_tensors(path):
  """name -> tensor of every safetensors file in an HF dir, read by the safetensors package."""
  out = {}
  for f in sorted(os.listdir(path)):
    if f.endswith(".safetensors"):
      with safetensors.safe_open(os.path.join(path, f), framework="pt") as st:
        for k in st.keys():
          out[k] = st.get_tensor(k)
  return out


# ---------------------------------------------------------------------------------------------
# Save -> transformers, and round trips


@pytest.mark.parametrize("name", ROUND_TRIP_CASES)
def test_save_loads_in_transformers(saved, name, tmp_path):
  ref_model, path = saved(name)
  out = hf.save(hf.load(path), tmp_path / "out")
  back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
  assert type(back) is type(ref_model)
  ids = hf_zoo.input_ids()
  diff = np.abs(hf_zoo.torch_logits(back, ids) - hf_zoo.torch_logits(ref_model, ids)).max()
  assert diff <= 1e-5
  # The weights come back bit for bit, tied embeddings stay tied.
  ref_sd, back_sd = ref_model.state_dict(), back.state_dict()
  assert ref_sd.keys() == back_sd.keys()
  for k in ref_sd:
    assert torch.equal(ref_sd[k], back_sd[k]), k
  assert back.config.tie_word_embeddings == ref_model.config.tie_word_embeddings
  if ref_model.config.tie_word_embeddings:
    assert "lm_head.weight" not in _torch_tensors(out)
  assert getattr(back.config, "sliding_window", None) == getattr(ref_model.config, "sliding_window", None)


def test_sharded_save_round_trip(saved, tmp_path):
  _, path = saved("llama_gqa")
  model = hf.load(path)
  out = hf.save(model, tmp_path / "sharded", max_shard_size="40KB")
  shards = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
  assert len(shards) >= 3 and "model.safetensors" not in shards
  assert shards == [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  index = json.loads((out / "model.safetensors.index.json").read_text())
  stored = {}
  for f in shards:
    with safetensors.safe_open(out / f, framework="np") as st:
      for k in st.keys():
        stored[k] = (f, st.get_tensor(k).nbytes)
    assert os.path.getsize(out / f) <= 40_000 + 4096  # the data budget plus a header
  assert index["weight_map"] == {k: f for k, (f, _) in stored.items()}
  assert index["metadata"]["total_size"] == sum(nb for _, nb in stored.values())
  assert set(stored) == set(hf.hf_shapes(model.config))
  _assert_params_equal(hf.load(out), model)
  # transformers reads the sharded directory too.
  back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
  ref_sd = saved("llama_gqa")[0].state_dict()
  for k, v in back.state_dict().items():
    assert torch.equal(v, ref_sd[k]), k


def test_bf16_round_trip_exact(saved, tmp_path):
  ref_model, path = saved("qwen2_tied")
  ref_bf16 = {k: v.to(torch.bfloat16) for k, v in ref_model.state_dict().items() if k != "lm_head.weight"}
  hf_zoo.build("qwen2_tied").to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
  model = hf.load(tmp_path / "bf16", dtype=None)
  assert model.dtype == ml_dtypes.bfloat16
  out = hf.save(model, tmp_path / "again", max_shard_size="30KB")
  assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
  _assert_params_equal(hf.load(out, dtype=None), model)
  written = _torch_tensors(out)
  assert written.keys() == ref_bf16.keys()
  for k, v in ref_bf16.items():
    assert written[k].dtype == torch.bfloat16 and torch.equal(written[k], v), k
  # Saving fp32 weights as bf16 rounds exactly as torch does (round to nearest even).
  out32 = hf.save(hf.load(path), tmp_path / "cast", dtype="bfloat16")
  for k, v in _torch_tensors(out32).items():
    assert torch.equal(v, ref_bf16[k]), k


# ---------------------------------------------------------------------------------------------
# Interop with the safetensors package


def _sample_arrays(rng):
  return {
    "f32": rng.standard_normal((3, 5)).astype(np.float32),
    "f16": rng.standard_normal((7,)).astype(np.float16),
    "bf16": rng.standard_normal((2, 3, 4)).astype(ml_dtypes.bfloat16),
    "i32": rng.randint(-9, 9, (4, 1)).astype(np.int32),
    "scalar": np.array(2.5, np.float32),
    "empty": np.zeros((0, 3), np.float32),
  }


def test_our_writer_read_by_safetensors(tmp_path):
  arrays = _sample_arrays(np.random.RandomState(0))
  for max_size, out in (("1GB", tmp_path / "one"), (40, tmp_path / "many")):
    out.mkdir()
    with ShardedWriter(out, [(k, a.shape, a.dtype) for k, a in arrays.items()], max_size) as w:
      for k, a in arrays.items():
        w.write(k, a)
    files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert (len(files) == 1) == (max_size == "1GB")
    got_np, got_pt = {}, {}
    for f in files:
      got_np.update(safetensors.numpy.load_file(out / f))
      got_pt.update(safetensors.torch.load_file(out / f))
      with safetensors.safe_open(out / f, framework="pt") as st:
        assert st.metadata() == {"format": "pt"}
    assert got_np.keys() == arrays.keys() == got_pt.keys()
    for k, a in arrays.items():
      assert got_np[k].dtype == a.dtype and got_np[k].shape == a.shape, k
      np.testing.assert_array_equal(got_np[k], a)
      t = got_pt[k]
      as_np = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 else t.numpy()
      np.testing.assert_array_equal(as_np, a)


def test_safetensors_files_read_by_ours(tmp_path):
  arrays = _sample_arrays(np.random.RandomState(1))
  safetensors.numpy.save_file({k: a for k, a in arrays.items() if k != "bf16"}, tmp_path / "np.safetensors",
                              metadata={"who": "numpy"})
  tensors = {k: torch.from_numpy(np.array(a)) for k, a in arrays.items() if k != "bf16"}
  tensors["bf16"] = torch.from_numpy(arrays["bf16"].view(np.int16)).view(torch.bfloat16)
  safetensors.torch.save_file(tensors, tmp_path / "pt.safetensors")
  for f, names in (("np.safetensors", set(arrays) - {"bf16"}), ("pt.safetensors", set(arrays))):
    st = SafetensorsFile(tmp_path / f)
    assert set(st.keys()) == names
    for k in names:
      got = st.get(k)
      assert got.dtype == arrays[k].dtype and got.shape == arrays[k].shape, (f, k)
      np.testing.assert_array_equal(got, arrays[k])
  assert SafetensorsFile(tmp_path / "np.safetensors").metadata == {"who": "numpy"}


# ---------------------------------------------------------------------------------------------
# Bad input: one clear line naming the culprit, nothing written


@pytest.fixture
def ckpt(saved, tmp_path):
  """A private copy of the llama checkpoint to damage."""
  dst = tmp_path / "ckpt"
  shutil.copytree(saved("llama_gqa")[1], dst)
  return dst


def _refused(path, exc, *needles):
  before = _tree(path)
  with pytest.raises(exc) as info:
    hf.load(path)
  msg = str(info.value)
  assert "\n" not in msg, msg
  for n in needles:
    assert n in msg, (n, msg)
  assert _tree(path) == before
  return msg


def _rewrite(path, edit):
  f = path / "model.safetensors"
  tensors = safetensors.torch.load_file(f)
  edit(tensors)
  safetensors.torch.save_file(tensors, f, metadata={"format": "pt"})


def test_truncated_file(ckpt):
  f = ckpt / "model.safetensors"
  data = f.read_bytes()
  f.write_bytes(data[:-1000])
  _refused(ckpt, CheckpointError, str(f), "truncated", "tensor ")
  f.write_bytes(data[:40])  # inside the header
  _refused(ckpt, CheckpointError, str(f), "header")
  f.write_bytes(b"")
  _refused(ckpt, CheckpointError, str(f), "truncated")


def test_corrupt_header(ckpt):
  f = ckpt / "model.safetensors"
  data = bytearray(f.read_bytes())
  n = int.from_bytes(data[:8], "little")
  header = json.loads(data[8:8 + n])
  name = "model.layers.0.mlp.up_proj.weight"
  del header[name]["data_offsets"]  # valid JSON, not a valid entry
  blob = json.dumps(header, separators=(",", ":")).encode().ljust(n)
  assert len(blob) == n
  f.write_bytes(bytes(data[:8]) + blob + bytes(data[8 + n:]))
  _refused(ckpt, CheckpointError, str(f), name)


def test_wrong_shape(ckpt):
  name = "model.layers.1.mlp.up_proj.weight"
  _rewrite(ckpt, lambda t: t.__setitem__(name, t[name][:-1].clone()))
  _refused(ckpt, CheckpointError, name, "model.safetensors", "shape (95, 64)", "expected (96, 64)")


def test_missing_tensor(ckpt):
  name = "model.layers.2.self_attn.k_proj.weight"
  _rewrite(ckpt, lambda t: t.pop(name))
  _refused(ckpt, CheckpointError, "missing tensor " + name, str(ckpt))


def test_unexpected_tensor(ckpt):
  name = "model.layers.0.self_attn.extra_proj.weight"
  _rewrite(ckpt, lambda t: t.__setitem__(name, torch.zeros(2, 2)))
  _refused(ckpt, CheckpointError, "unexpected tensor " + name, "model.safetensors")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight(ckpt, bad):
  name = "model.layers.1.mlp.down_proj.weight"

  def edit(t):
    t[name] = t[name].clone()
    t[name][3, 4] = bad

  _rewrite(ckpt, edit)
  _refused(ckpt, CheckpointError, name, "NaN or Inf", "model.safetensors")
  assert not np.isfinite(_flat_params(hf.load(ckpt, check_finite=False))["layers/down"]).all()


def test_unknown_model_type(ckpt):
  cfg = json.loads((ckpt / "config.json").read_text())
  cfg["model_type"] = "gpt2"
  (ckpt / "config.json").write_text(json.dumps(cfg))
  _refused(ckpt, ConfigError, "'gpt2'", "config.json", "llama")


def test_corrupt_config_json(ckpt):
  (ckpt / "config.json").write_text('{"model_type": "llama",')
  _refused(ckpt, ConfigError, "config.json", "not valid JSON")


def test_pickled_weights_refused(saved, tmp_path):
  ref_model, _ = saved("llama_gqa")
  path = tmp_path / "pickled"
  ref_model.config.save_pretrained(path)
  torch.save(ref_model.state_dict(), path / "pytorch_model.bin")
  _refused(path, CheckpointError, "pytorch_model.bin", "pickled")
  (path / "pytorch_model.bin").unlink()
  _refused(path, CheckpointError, "no safetensors weights")


@pytest.fixture
def sharded(saved, tmp_path):
  return hf.save(hf.load(saved("llama_gqa")[1]), tmp_path / "sharded", max_shard_size="40KB")


@pytest.mark.parametrize("content", ['{"weight_map": {"a": ', "[1, 2]", '{"metadata": {}}',
                                     '{"weight_map": ["model-00001-of-00002.safetensors"]}', "\xff\xfe"])
def test_corrupt_index(sharded, content):
  index = sharded / "model.safetensors.index.json"
  index.write_bytes(content.encode("latin-1"))
  _refused(sharded, CheckpointError, str(index), "corrupt index")


def test_index_names_missing_shard(sharded):
  last = sorted(f for f in os.listdir(sharded) if f.endswith(".safetensors"))[-1]
  (sharded / last).unlink()
  _refused(sharded, CheckpointError, last, "not found")


def test_index_disagrees_with_shards(sharded):
  index = sharded / "model.safetensors.index.json"
  d = json.loads(index.read_text())
  name = "model.layers.0.self_attn.q_proj.weight"
  files = sorted(set(d["weight_map"].values()))
  d["weight_map"][name] = next(f for f in files if f != d["weight_map"][name])
  index.write_text(json.dumps(d))
  _refused(sharded, CheckpointError, name, str(index))


# ---------------------------------------------------------------------------------------------
# Save side: refuse to clobber, replace atomically, leave nothing behind on failure


def test_existing_output_refused_unless_overwrite(saved, tmp_path):
  model = hf.load(saved("qwen2_tied")[1])
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("precious")
  before = _tree(out)
  with pytest.raises(OutputExistsError) as info:
    hf.save(model, out)
  assert "\n" not in str(info.value) and str(out) in str(info.value)
  assert _tree(out) == before

  hf.save(model, out, overwrite=True)
  assert not (out / "keep.txt").exists()
  _assert_params_equal(hf.load(out), model)
  assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary or trash directory left


def test_bad_save_dtype(saved, tmp_path):
  model = hf.load(saved("qwen2_tied")[1])
  with pytest.raises(ConfigError) as info:
    hf.save(model, tmp_path / "out", dtype="float8")
  assert "float8" in str(info.value) and "\n" not in str(info.value)
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("shard_size", ["2GB", "40KB"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_failed_save_leaves_nothing(saved, tmp_path, monkeypatch, shard_size, overwrite):
  model = hf.load(saved("llama_gqa")[1])
  out = tmp_path / "out"
  if overwrite:
    hf.save(model, out)
  before = _tree(out)
  real_write = ShardedWriter.write
  fail_at = 12 if shard_size == "40KB" else 1  # later shards too: past the first files

  files_at_failure = []

  def flaky(self, name, array):
    if self.pos == fail_at:
      files_at_failure.extend(f for f in os.listdir(self.dir) if f.endswith(".safetensors"))
      raise OSError("No space left on device (simulated)")
    real_write(self, name, array)

  monkeypatch.setattr(safetensors_io.ShardedWriter, "write", flaky)
  with pytest.raises(OSError, match="simulated"):
    hf.save(model, out, max_shard_size=shard_size, overwrite=overwrite)
  assert len(files_at_failure) >= (3 if shard_size == "40KB" else 1)  # it failed mid-way
  assert _tree(out) == before  # an existing output is untouched, a new one never appears
  assert sorted(os.listdir(tmp_path)) == (["out"] if overwrite else [])
