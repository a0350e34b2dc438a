import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from bonsai_quant.checkpoint import Checkpoint, Entry, ShardedWriter, read_header
from bonsai_quant.errors import CheckpointError


def _copy(src, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def test_sharded_checkpoint_validates_and_streams(tiny_ckpt):
    ckpt = Checkpoint(tiny_ckpt)
    assert len(list(tiny_ckpt.glob("diffusion_pytorch_model-0000*-of-0000*.safetensors"))) > 1
    specs = ckpt.validate()
    assert set(specs) == set(ckpt.tensors)
    w = ckpt.load("transformer_blocks.0.ff.linear_in.weight")
    assert w.dtype == torch.bfloat16 and tuple(w.shape) == (1536, 256)
    assert w.float().std().item() == pytest.approx(1 / 16, rel=0.3)  # ~1/sqrt(in_features)


def test_checkpoint_loads_in_diffusers_unchanged(tiny_ckpt):
    from diffusers import Flux2Transformer2DModel

    model = Flux2Transformer2DModel.from_pretrained(tiny_ckpt, torch_dtype=torch.bfloat16)
    ours = Checkpoint(tiny_ckpt).load("proj_out.weight")
    assert torch.equal(model.proj_out.weight.data, ours)


def test_single_file_fp32_and_pipeline_folder(tiny_ckpt_fp32, tmp_path):
    ckpt = Checkpoint(tiny_ckpt_fp32)
    ckpt.validate()
    assert ckpt.load("x_embedder.weight").dtype == torch.float32
    shutil.copytree(tiny_ckpt_fp32, tmp_path / "pipe" / "transformer")
    assert Checkpoint(tmp_path / "pipe").path == tmp_path / "pipe" / "transformer"


def test_missing_folder_and_missing_weights(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        Checkpoint(tmp_path / "nope")
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "Flux2Transformer2DModel"}))
    with pytest.raises(CheckpointError, match="no diffusion_pytorch_model.safetensors or .*index.json found"):
        Checkpoint(tmp_path)


def test_truncated_shard_is_named(tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt, tmp_path)
    shard = sorted(ckpt.glob("*-00002-of-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[:-1000])
    with pytest.raises(CheckpointError, match=rf"{shard.name}: truncated or corrupt: the header describes {len(data)} bytes, the file has {len(data) - 1000}"):
        Checkpoint(ckpt)


def test_corrupt_header_is_named(tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt, tmp_path)
    shard = sorted(ckpt.glob("*-00001-of-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[10:14] = b"\xff\xfe\x00\x01"
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{shard.name}: corrupt safetensors header"):
        Checkpoint(ckpt)
    shard.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(CheckpointError, match="claims 1000000000000 header bytes"):
        Checkpoint(ckpt)


def test_index_naming_a_missing_shard(tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt, tmp_path)
    shard = sorted(ckpt.glob("*-00003-of-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"{shard.name}: file not found"):
        Checkpoint(ckpt)


def _rewrite_single(ckpt_dir, tmp_path, edit):
    tensors = {}
    src = Checkpoint(ckpt_dir)
    for name in src.tensors:
        tensors[name] = src.load(name)
    edit(tensors)
    dst = tmp_path / "edited"
    dst.mkdir()
    shutil.copy(ckpt_dir / "config.json", dst / "config.json")
    save_file(tensors, str(dst / "diffusion_pytorch_model.safetensors"))
    return dst


def test_missing_extra_wrong_shape_and_dtype_are_all_listed(tiny_ckpt, tmp_path):
    def edit(t):
        del t["proj_out.weight"]
        t["lora.weight"] = torch.zeros(2)
        t["x_embedder.weight"] = torch.zeros(256, 32, dtype=torch.bfloat16)
        t["context_embedder.weight"] = torch.zeros(256, 256, dtype=torch.int32)

    ckpt = Checkpoint(_rewrite_single(tiny_ckpt, tmp_path, edit))
    with pytest.raises(CheckpointError) as e:
        ckpt.validate()
    msg = str(e.value)
    assert "missing tensor 'proj_out.weight' (expected shape [64, 256])" in msg
    assert "unexpected tensor 'lora.weight'" in msg
    assert "tensor 'x_embedder.weight' has shape [256, 32], config.json implies [256, 64]" in msg
    assert "tensor 'context_embedder.weight' is torch.int32; valid: bfloat16, float16, float32" in msg


def test_sharded_writer_round_trips_through_safetensors(tmp_path):
    tensors = {"a": torch.arange(12, dtype=torch.int32).reshape(3, 4), "b": torch.randn(5).to(torch.bfloat16),
               "c": torch.tensor(7, dtype=torch.int32), "d": torch.arange(6, dtype=torch.uint8)}
    entries = [Entry(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    writer = ShardedWriter(tmp_path, entries, "model", max_shard_bytes=50, metadata={"format": "mlx"})
    for name in reversed(list(tensors)):  # any order: the layout is fixed up front
        writer.write(name, tensors[name])
    files = writer.close()
    assert files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                     "model.safetensors.index.json"]
    loaded = {}
    for f in files[:2]:
        loaded.update(load_file(str(tmp_path / f)))
        read_header(tmp_path / f)
    for name, t in tensors.items():
        assert torch.equal(loaded[name], t)
    index = json.loads((tmp_path / files[2]).read_text())
    assert index["weight_map"]["d"] == files[1]


def test_writer_refuses_undeclared_shapes_and_unwritten_tensors(tmp_path):
    writer = ShardedWriter(tmp_path, [Entry("a", torch.float16, (2,)), Entry("b", torch.float16, (2,))], "m", 10**9)
    with pytest.raises(CheckpointError, match="declared torch.float16\\[2\\]"):
        writer.write("a", torch.zeros(3, dtype=torch.float16))
    writer.write("a", torch.zeros(2, dtype=torch.float16))
    with pytest.raises(CheckpointError, match="never written: \\['b'\\]"):
        writer.close()
