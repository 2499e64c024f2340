"""`from_pretrained` with a Mesh reads only the slices each process owns: every shard is bit-identical to the
eager loader (whole tensors read, converted, cast, then sliced), the lazy conversions never copy, slices
read only their bytes, and a 2-process job (jax.distributed + gloo on 127.0.0.1) loads the same values."""
import json
import os
import sys

import ml_dtypes
import numpy as np
import pytest

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))
MESHES = [{"fsdp": 8}, {"fsdp": 2, "tensor": 2, "expert": 2}, {"fsdp": 4, "tensor": 2}]


def random_model(preset, seed=0):
  """A tiny preset with every weight random (numpy: much faster than init_model's eager init)."""
  import jax.numpy as jnp
  from flax import nnx
  from internvl_jax import InternVL, zoo
  graphdef, state = nnx.split(nnx.eval_shape(lambda: InternVL(zoo.get(preset), rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)
  for _, v in nnx.to_flat_state(state):
    v.set_value(jnp.asarray(rng.standard_normal(v.get_value().shape, np.float32)))
  return nnx.merge(graphdef, state)


def eager_load(path, dtype=np.float32):
  """The loader before lazy reads: each parameter's whole tensors read, converted, cast; no mesh."""
  from internvl_jax.checkpoint import pretrained as checkpoint
  from internvl_jax.checkpoint import safetensors_io
  from internvl_jax.checkpoint.keys import canonical_hf_key, specs
  cfg, layout = checkpoint.load_config(path)
  ckpt = safetensors_io.Checkpoint(path)
  name = {(canonical_hf_key(k) if layout == "hf" else k): k for k in ckpt.keys()}
  return {p: np.asarray(spec.load([ckpt.get(name[k]) for k in spec.keys]), dtype=dtype)
          for p, spec in specs(cfg, layout).items()}


def assert_shards_equal(model, want):
  from flax import nnx
  n = 0
  for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    for shard in v.get_value().addressable_shards:
      got = np.asarray(shard.data)
      assert got.dtype == want[p].dtype, p
      np.testing.assert_array_equal(got, want[p][shard.index], err_msg=str(p))
      n += 1
  return n


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """(preset, layout) -> (folder, model): saved in bfloat16 over several files (experts span files)."""
  import internvl_jax as ij
  out = {}
  for preset in ("tiny-dense", "tiny-moe", "tiny-6b"):
    model = random_model(preset)
    for layout in ("hf", "original"):
      folder = str(tmp_path_factory.mktemp(f"{preset}_{layout}"))
      ij.save_pretrained(model, folder, layout=layout, dtype=ml_dtypes.bfloat16, max_shard_size=60_000)
      out[preset, layout] = (folder, model)
  return out


@pytest.mark.parametrize("preset", ["tiny-dense", "tiny-moe", "tiny-6b"])
@pytest.mark.parametrize("layout", ["hf", "original"])
def test_sharded_load_is_bit_identical(checkpoints, preset, layout, monkeypatch):
  import jax
  import internvl_jax as ij
  from flax import nnx
  from internvl_jax import sharding
  from internvl_jax.checkpoint import pretrained as checkpoint
  from internvl_jax.checkpoint import safetensors_io
  from internvl_jax.checkpoint.keys import specs
  path, saved = checkpoints[preset, layout]
  want = eager_load(path)
  saved = {p: np.asarray(v.get_value()).astype(ml_dtypes.bfloat16).astype(np.float32)
           for p, v in nnx.to_flat_state(nnx.state(saved, nnx.Param))}
  assert all(np.array_equal(want[p], saved[p]) for p in want)  # the reference itself round-trips
  cfg, _ = checkpoint.load_config(path)
  ckpt = safetensors_io.Checkpoint(path)
  sources = checkpoint.tensor_sources(ckpt, layout)
  lazy = {p: spec.load([sources[k] for k in spec.keys]) for p, spec in specs(cfg, layout).items()}
  for i, shape in enumerate(MESHES):
    if i == 2:  # tiny read chunks: every read splits, along strided axes too
      monkeypatch.setattr(safetensors_io, "READ_CHUNK", 200)
    model = ij.from_pretrained(path, mesh=sharding.make_mesh(shape))
    assert assert_shards_equal(model, want) >= 8 * len(want)
    # One process reads the box of all its shards; each shard read alone, as by a process holding
    # only that device, must match too.
    for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
      for index in v.get_value().sharding.devices_indices_map(want[p].shape).values():
        np.testing.assert_array_equal(checkpoint.read(ckpt, lazy[p][index], np.float32), want[p][index])
  gate = model.language_model.layers[0].mlp.gate.get_value()
  assert gate.sharding.spec != jax.sharding.PartitionSpec(*[None] * gate.ndim)
  bf16 = ij.from_pretrained(path, dtype="bfloat16", mesh=sharding.make_mesh(MESHES[0]))
  assert_shards_equal(bf16, {p: w.astype(ml_dtypes.bfloat16) for p, w in want.items()})


def test_conversions_are_views_of_the_files(checkpoints):
  """Every parameter's lazy conversion is a view (or a Stacked of views) into the mapped files: no
  conversion copies, so no shard read ever reads a whole tensor."""
  from internvl_jax.checkpoint import pretrained as checkpoint
  from internvl_jax.checkpoint import safetensors_io
  from internvl_jax.checkpoint.keys import Stacked, specs
  for path, _ in checkpoints.values():
    cfg, layout = checkpoint.load_config(path)
    ckpt = safetensors_io.Checkpoint(path)
    sources = checkpoint.tensor_sources(ckpt, layout)
    for p, spec in specs(cfg, layout).items():
      lazy = spec.load([sources[k] for k in spec.keys])
      for part in (lazy.parts if isinstance(lazy, Stacked) else [lazy]):
        assert ckpt.file_of(part) is not None, (path, p)


@pytest.mark.parametrize("preset", ["InternVL3.5-1B", "InternVL3.5-38B", "InternVL3.5-30B-A3B"])
def test_released_shapes_convert_without_copies(tmp_path, preset):
  """The same at released sizes (InternViT-6B, MoE experts): a sparse file holds the header and no data."""
  from internvl_jax import zoo
  from internvl_jax.checkpoint import pretrained as checkpoint
  from internvl_jax.checkpoint import safetensors_io
  from internvl_jax.checkpoint.keys import Stacked, specs
  cfg = zoo.get(preset)
  for layout in ("hf", "original"):
    table = specs(cfg, layout)
    header, offset = {}, 0
    for spec in table.values():
      for key, shape in zip(spec.keys, spec.shapes):
        header[key] = dict(dtype="BF16", shape=list(shape), data_offsets=[offset, offset + 2 * int(np.prod(shape))])
        offset = header[key]["data_offsets"][1]
    blob = json.dumps(header).encode()
    folder = tmp_path / layout
    folder.mkdir()
    with open(folder / "model.safetensors", "wb") as f:
      f.write(len(blob).to_bytes(8, "little") + blob)
      f.truncate(8 + len(blob) + offset)
    ckpt = safetensors_io.Checkpoint(str(folder))
    sources = checkpoint.tensor_sources(ckpt, layout)
    for p, spec in table.items():
      lazy = spec.load([sources[k] for k in spec.keys])
      for part in (lazy.parts if isinstance(lazy, Stacked) else [lazy]):
        assert ckpt.file_of(part) is not None, (layout, p)


def test_fused_in_memory_experts_load_sharded(checkpoints, tmp_path):
  """transformers' state_dict() spelling with fused experts (gate_up_proj [E, 2I, d], down_proj [E, d, I])
  loads on a mesh with the same values as the per-expert checkpoint."""
  import internvl_jax as ij
  from internvl_jax import sharding
  from internvl_jax.checkpoint import pretrained as checkpoint
  from internvl_jax.checkpoint import safetensors_io
  path, _ = checkpoints["tiny-moe", "hf"]
  ckpt = safetensors_io.Checkpoint(path)
  tensors, fused = {}, {}
  for k in ckpt.keys():
    head, sep, tail = k.partition(".mlp.experts.")
    if sep:
      x, proj, _ = tail.split(".")
      fused.setdefault(head, {}).setdefault(proj, {})[int(x)] = ckpt.get(k)
    else:
      tensors[k] = ckpt.get(k)
  for head, p in fused.items():
    e = range(len(p["down_proj"]))
    tensors[head + ".mlp.experts.gate_up_proj"] = np.stack([np.concatenate([p["gate_proj"][x], p["up_proj"][x]])
                                                            for x in e])
    tensors[head + ".mlp.experts.down_proj"] = np.stack([p["down_proj"][x] for x in e])
  rename = lambda k: ("lm_head.weight" if k == "language_model.lm_head.weight" else
                      "model." + k.replace("language_model.model.", "language_model.", 1))
  safetensors_io.write(str(tmp_path), [(rename(k), v.shape, v.dtype, lambda v=v: v) for k, v in tensors.items()])
  with open(os.path.join(path, "config.json")) as f, open(tmp_path / "config.json", "w") as g:
    g.write(f.read())
  assert "model.language_model.layers.0.mlp.experts.gate_up_proj" in safetensors_io.Checkpoint(str(tmp_path)).keys()
  assert checkpoint.load_config(str(tmp_path))[1] == "hf"
  model = ij.from_pretrained(str(tmp_path), mesh=sharding.make_mesh(MESHES[1]))
  assert_shards_equal(model, eager_load(path))


def test_a_slice_reads_only_its_span(tmp_path, monkeypatch):
  from internvl_jax.checkpoint import safetensors_io
  w = np.arange(1000 * 64, dtype=np.float32).reshape(1000, 64)
  safetensors_io.write(str(tmp_path), [("w", w.shape, w.dtype, lambda: w)])
  ckpt = safetensors_io.Checkpoint(str(tmp_path))
  reads = []
  preadv = os.preadv
  monkeypatch.setattr(os, "preadv", lambda fd, bufs, off: reads.append(sum(map(len, bufs))) or preadv(fd, bufs, off))
  view = ckpt.view("w")
  out = np.empty((100, 64), np.float64)
  ckpt.read_into(view[100:200], out)
  np.testing.assert_array_equal(out, w[100:200])
  assert sum(reads) == 100 * 64 * 4
  reads.clear()
  monkeypatch.setattr(safetensors_io, "READ_CHUNK", 4096)
  out = np.empty((64, 1000 - 10), np.float32)
  ckpt.read_into(view.T[:, 10:], out)  # a transposed view, split into reads of at most 4 KiB
  np.testing.assert_array_equal(out, w.T[:, 10:])
  assert max(reads) <= 4096 and sum(reads) <= w.nbytes


# ------------------------------------------------------------------------------------- two processes

def test_two_processes_load_their_own_shards(checkpoints, coordinated, tmp_path):
  import internvl_jax as ij
  from flax import nnx
  cases = []
  for key in (("tiny-moe", "original"), ("tiny-6b", "hf")):
    path, _ = checkpoints[key]
    ref = str(tmp_path / f"{key[0]}_{key[1]}.npz")
    single = ij.from_pretrained(path)  # one process, no mesh
    np.savez(ref, **{"/".join(map(str, p)): np.asarray(v.get_value())
                     for p, v in nnx.to_flat_state(nnx.state(single, nnx.Param))})
    cases.append((path, ref))
  # PYTHONPATH: a script's sys.path starts at its own folder, and the package must come from this checkout.
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "PYTHONPATH": os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
  outs = coordinated(lambda port: [([sys.executable, HERE, str(port), str(i), json.dumps(cases)], env)
                                   for i in range(2)], timeout=120)
  for code, _, err in outs:
    assert code == 0, err[-3000:]
  results = [json.loads(out.strip().splitlines()[-1]) for _, out, _ in outs]
  assert [r["process"] for r in results] == [0, 1]
  assert all(r["devices"] == [8, 4] and r["shards"] > 0 for r in results)
  assert results[0]["subset"][0] > 0 and results[0]["subset"][1] > 0 and results[1]["subset"] == [0, 0]
  assert all(r["package"] == os.path.dirname(ij.__file__) for r in results)


def worker(port: int, process_id: int, cases) -> None:
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
  import internvl_jax as ij
  from flax import nnx
  from internvl_jax import sharding

  def check(model, ref):
    want = np.load(ref)
    return assert_shards_equal(model, {p: want["/".join(map(str, p))]
                                       for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))})

  mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
  shards = sum(check(ij.from_pretrained(path, mesh=mesh), ref) for path, ref in cases)
  # A mesh over process 0's devices only: process 1 owns no shard and must read nothing.
  reads, preadv = [], os.preadv
  os.preadv = lambda fd, bufs, off: reads.append(sum(map(len, bufs))) or preadv(fd, bufs, off)
  path, ref = cases[0]
  subset = check(ij.from_pretrained(path, mesh=sharding.make_mesh({"fsdp": 4}, devices=jax.devices()[:4])), ref)
  print(json.dumps(dict(process=jax.process_index(), devices=[jax.device_count(), jax.local_device_count()],
                        shards=shards, subset=[subset, sum(reads)], package=os.path.dirname(ij.__file__))))
  jax.distributed.shutdown()


if __name__ == "__main__":
  worker(int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3]))
