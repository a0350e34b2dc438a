import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from bonsai_quant.checkpoint import Checkpoint, Entry, ShardedWriter, read_header
from bonsai_quant.errors import CheckpointError

try:  # tests/ is on sys.path under pytest's default rootdir-relative imports
    from pack_helpers import watchdog
except ImportError:  # tests/ made a package
    from tests.pack_helpers import watchdog


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


# ---------------------------------------------------------------- shard names, file kinds and data spans

def _index(ckpt):
    path = ckpt / "diffusion_pytorch_model.safetensors.index.json"
    return path, json.loads(path.read_text())


def _point_shard_at(ckpt, new_name):
    """Move the first shard's tensors in the index to `new_name`; returns the shard's original name."""
    path, index = _index(ckpt)
    first = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"] = {n: (new_name if f == first else f) for n, f in index["weight_map"].items()}
    path.write_text(json.dumps(index))
    return first


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_index_entry_outside_the_folder_is_refused_by_name(tiny_ckpt, tmp_path, where):
    ckpt = _copy(tiny_ckpt, tmp_path)
    first = sorted(set(_index(ckpt)[1]["weight_map"].values()))[0]
    shutil.move(ckpt / first, tmp_path / "elsewhere.safetensors")  # a valid shard, just not in the folder
    name = "../elsewhere.safetensors" if where == "parent" else str(tmp_path / "elsewhere.safetensors")
    _point_shard_at(ckpt, name)
    with pytest.raises(CheckpointError) as e:
        Checkpoint(ckpt)
    assert str(e.value) == (f"{ckpt / 'diffusion_pytorch_model.safetensors.index.json'}: shard {name!r} is not a "
                            "file name in this folder; valid: a plain file name ending in .safetensors, beside "
                            "the index")


def test_index_entry_naming_a_non_safetensors_file_is_refused_unread(tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt, tmp_path)
    _point_shard_at(ckpt, "config.json")
    with pytest.raises(CheckpointError, match=r"shard 'config.json' is not a file name in this folder; valid: a "
                                              r"plain file name ending in \.safetensors") as e:
        Checkpoint(ckpt)
    assert "header bytes" not in str(e.value)  # config.json's first 8 bytes, read as a length, are not shown


def test_a_fifo_shard_is_refused_without_waiting_for_a_writer(tiny_ckpt, tmp_path):
    import os
    import threading

    ckpt = _copy(tiny_ckpt, tmp_path)
    shard = sorted(ckpt.glob("*-00002-of-*.safetensors"))[0]
    shard.unlink()
    os.mkfifo(shard)
    outcome = []

    def open_it():
        try:
            Checkpoint(ckpt)
        except CheckpointError as err:
            outcome.append(str(err))

    worker = threading.Thread(target=open_it, daemon=True)
    worker.start()
    worker.join(30)
    if worker.is_alive():  # blocked in open(): give it a writer so the thread ends, then fail
        os.close(os.open(shard, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(30)
        pytest.fail("reading the checkpoint blocks on a FIFO shard")
    assert outcome == [f"{shard}: not a regular file (a FIFO); valid: a safetensors file, or a symlink to one"]


def test_a_folder_where_the_weights_file_should_be_is_named(tiny_ckpt_fp32, tmp_path):
    ckpt = _copy(tiny_ckpt_fp32, tmp_path)
    (ckpt / "diffusion_pytorch_model.safetensors").unlink()
    (ckpt / "diffusion_pytorch_model.safetensors").mkdir()
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.safetensors: not a regular file \(a folder\)"):
        Checkpoint(ckpt)


def test_symlinked_shards_of_a_hub_cache_snapshot_still_work(tiny_ckpt, tmp_path):
    """The Hugging Face cache layout: snapshots/<rev>/transformer/* are symlinks into blobs/."""
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "abc123" / "transformer"
    blobs.mkdir()
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(tiny_ckpt.iterdir())):
        shutil.copy(f, blobs / f"blob{i}")
        (snap / f.name).symlink_to(f"../../../blobs/blob{i}")
    ckpt = Checkpoint(snap)
    assert set(ckpt.validate()) == set(Checkpoint(tiny_ckpt).tensors)
    assert torch.equal(ckpt.load("proj_out.weight"), Checkpoint(tiny_ckpt).load("proj_out.weight"))


def _write_raw(path, header, data):
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def _u8(begin, stop, n=None):
    return {"dtype": "U8", "shape": [stop - begin if n is None else n], "data_offsets": [begin, stop]}


@pytest.mark.parametrize("header, data, message", [
    ({"a": _u8(0, 4), "b": _u8(2, 6)}, 6, "tensor 'b' starts at byte 2 of the data, inside tensor 'a' (bytes 0 to 4)"),
    ({"a": _u8(0, 4), "b": _u8(6, 8)}, 8, "tensor 'b' starts at byte 6 of the data, but tensor 'a' ends at 4: "
                                         "2 bytes belong to no tensor"),
    ({"a": _u8(2, 4)}, 4, "tensor 'a' starts at byte 2 of the data, but the data begins at 0: 2 bytes belong to "
                          "no tensor"),
    ({"a": _u8(-4, 0), "b": _u8(0, 4)}, 4, "tensor 'a' has an invalid header entry"),
    ({"a": {"dtype": "U8", "shape": [2.0], "data_offsets": [0, 2]}}, 2, "tensor 'a' has an invalid header entry"),
    ({"a": {"dtype": "U8", "shape": [-2, -1], "data_offsets": [0, 2]}}, 2, "tensor 'a' has an invalid header entry"),
    ({"a": _u8(0, 2), "__metadata__": {"format": 1}}, 2, "__metadata__ must be an object of strings"),
])
def test_header_spans_and_entries_are_checked_as_safetensors_does(tmp_path, header, data, message):
    from safetensors import safe_open

    path = _write_raw(tmp_path / "x.safetensors", header, bytes(range(data)))
    with pytest.raises(Exception):  # noqa: B017 -- safetensors raises its own, unstable, error types; it refuses it too
        with safe_open(str(path), "pt") as f:
            [f.get_tensor(k) for k in f.keys()]
    with pytest.raises(CheckpointError) as e:
        read_header(path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value)


def test_aliased_tensor_in_a_checkpoint_fails_plan_before_any_work(tiny_ckpt_fp32, tmp_path, capsys):
    from bonsai_quant.cli import main

    ckpt = _copy(tiny_ckpt_fp32, tmp_path)
    file = ckpt / "diffusion_pytorch_model.safetensors"
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    q, k = "transformer_blocks.0.attn.to_q.weight", "transformer_blocks.0.attn.to_k.weight"
    last = max(v["data_offsets"][1] for name, v in header.items() if name != "__metadata__")
    assert header[k]["data_offsets"][1] != last  # its bytes become a gap, not a shorter file
    header[k]["data_offsets"] = header[q]["data_offsets"]
    _write_raw(file, header, raw[8 + n:])
    assert main(["plan", "--mode", "ternary", "--model", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {file}: tensor ") and "inside tensor" in err and err.count("\n") == 1


def test_config_far_larger_than_its_weights_is_refused_before_building_it(tiny_ckpt, tmp_path):
    ckpt = _copy(tiny_ckpt, tmp_path)
    config = json.loads((ckpt / "config.json").read_text())
    config["num_layers"] = 10**6
    (ckpt / "config.json").write_text(json.dumps(config))
    # Without the bound, building 10^6 blocks takes hours and ~180 GB: the watchdog ends it.
    with watchdog(30, "Checkpoint.validate()"), pytest.raises(CheckpointError) as e:
        Checkpoint(ckpt).validate()
    source_bytes = Checkpoint(tiny_ckpt).source_bytes
    assert str(e.value).startswith(f"{ckpt / 'config.json'}: describes ")
    assert "num_layers 1000000" in str(e.value)
    assert f"the safetensors hold {source_bytes:,} bytes of tensors" in str(e.value)


@pytest.mark.parametrize("key, value", [("num_layers", -1), ("num_single_layers", 2.5), ("num_layers", True)])
def test_block_counts_must_be_non_negative_integers(tiny_ckpt, tmp_path, key, value):
    ckpt = _copy(tiny_ckpt, tmp_path)
    config = json.loads((ckpt / "config.json").read_text())
    config[key] = value
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=rf"config\.json: {key} is {value!r}; valid: a whole number >= 0"):
        Checkpoint(ckpt).validate()
