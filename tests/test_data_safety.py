"""A user's data is never lost and a broken pack never passes: sources under --force, interrupted and concurrent
runs, non-finite values, tampered packs (random bit flips, resealed manifests), and hostile input."""

import hashlib
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from bonsai_quant.cli import main
from bonsai_quant.convert import convert
from bonsai_quant.errors import OutputExistsError
from bonsai_quant.manifest import write_manifest
from bonsai_quant.output import atomic_output
from bonsai_quant.recipe import default_recipe, load_recipe
from bonsai_quant.release import check_release, release
from bonsai_quant.verify import verify
from tests.pack_helpers import reseal_in_place

REPO = Path(__file__).resolve().parents[1]


def _tree_digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def model(tiny_ckpt, tmp_path):
    """A private copy of the tiny checkpoint, so that a test which destroyed it would not hide the damage."""
    copy = tmp_path / "models" / "tiny"
    shutil.copytree(tiny_ckpt, copy)
    return copy


@pytest.fixture(scope="module")
def packs(tiny_ckpt, tmp_path_factory):
    """Binary and ternary convert outputs holding every target."""
    root = tmp_path_factory.mktemp("safety")
    out = {}
    for mode in ("binary", "ternary"):
        out[mode] = root / mode
        convert(tiny_ckpt, default_recipe(mode), out[mode], targets=("mlx", "gemlite", "bonsai"), verbose=False)
    return out


# --- 1. --force never reaches a source -----------------------------------------------------------------------

def _out_for(where: str, source: Path, tmp_path: Path) -> Path:
    if where == "is":
        return source
    if where == "holds":
        return source.parent
    if where == "inside":
        return source / "packs"
    link = tmp_path / "link"
    link.symlink_to(source, target_is_directory=True)
    return link


@pytest.mark.parametrize("where", ["is", "holds", "inside", "symlink"])
def test_convert_force_never_replaces_the_model(model, tmp_path, capsys, where):
    before = _tree_digest(model)
    out = _out_for(where, model, tmp_path)
    assert main(["convert", "--model", str(model), "--out", str(out), "--force", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"--out {out} " in err and f"the source {model}" in err
    assert "valid: an output folder outside every source" in err
    assert _tree_digest(model) == before
    assert not (model / "packs").exists()


@pytest.mark.parametrize("where", ["is", "holds", "inside"])
def test_release_force_never_replaces_the_model(model, tmp_path, capsys, where):
    before = _tree_digest(model)
    out = _out_for(where, model, tmp_path)
    assert main(["release", "--model", str(model), "--out", str(out), "--force", "--quiet"]) == 2
    assert f"the source {model}" in capsys.readouterr().err
    assert _tree_digest(model) == before


@pytest.mark.parametrize("where", ["is", "holds", "inside", "symlink"])
def test_repack_force_never_replaces_its_source(packs, tmp_path, capsys, where):
    src = tmp_path / "src" / "bonsai"
    shutil.copytree(packs["ternary"] / "bonsai", src)
    before = _tree_digest(src)
    out = _out_for(where, src, tmp_path)
    assert main(["repack", str(src), "--target", "mlx", "--out", str(out), "--force"]) == 2
    assert f"the source {src}" in capsys.readouterr().err
    assert _tree_digest(src) == before


# --- 2. every gate fails on NaN -----------------------------------------------------------------------------

def test_a_pack_whose_forward_is_nan_fails(packs, tmp_path):
    # Finite but huge kept weights in a resealed pack: every structural check passes and the values are legal
    # bf16, but the forward overflows to Inf and NaN. NaN compares false with any bound, so the gates must test
    # finiteness themselves.
    folder = tmp_path / "mlx"
    shutil.copytree(packs["ternary"] / "mlx", folder)

    def edit(t):
        t["x_embedder.weight"][:, :] = 3e38
    reseal_in_place(folder, edit)
    steps = {s["name"]: s for s in verify(folder)["packs"][0]["steps"]}
    assert [steps[s]["status"] for s in ("integrity", "exactness", "runtime")] == ["pass"] * 3
    assert steps["end-to-end"]["status"] == "fail"
    assert "error is nan (the output holds NaN or Inf)" in steps["end-to-end"]["detail"]
    assert steps["mlx-end-to-end"]["status"] == "fail"
    assert "error is nan (the output holds NaN or Inf)" in steps["mlx-end-to-end"]["detail"]


def test_a_nan_scale_fails(packs, tmp_path):
    folder = tmp_path / "mlx"
    shutil.copytree(packs["ternary"] / "mlx", folder)

    def edit(t):
        t["transformer_blocks.0.attn.to_q.scales"][0, 0] = float("nan")
    reseal_in_place(folder, edit)
    report = verify(folder)
    assert not report["ok"]
    failed = [s for s in report["packs"][0]["steps"] if s["status"] == "fail"]
    assert "transformer_blocks.0.attn.to_q" in failed[0]["detail"]


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_kept_tensor_is_refused_by_convert(tiny_config, tmp_path, value):
    from bonsai_quant.synthetic import write_checkpoint

    src = write_checkpoint(tiny_config, tmp_path / "bad", seed=0)
    file = next(src.glob("*.safetensors"))
    tensors = load_file(str(file))
    tensors["context_embedder.weight"][3, 4] = value
    save_file(tensors, str(file))
    out = tmp_path / "out"
    with pytest.raises(Exception) as e:
        convert(src, default_recipe("ternary"), out, verbose=False)
    assert str(e.value) == (f"context_embedder.weight: non-finite weight {value} at [3, 4]; a checkpoint must "
                            "hold finite weights")
    assert not out.exists() and list(tmp_path.glob(".out.*")) == []


# --- 4. concurrent runs, interruption, stale temporaries -----------------------------------------------------

def test_an_output_that_appears_meanwhile_is_kept(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OutputExistsError, match="appeared while this run worked"):
        with atomic_output(out) as tmp:
            (tmp / "mine").write_text("mine")
            out.mkdir()
            (out / "theirs").write_text("theirs")
    assert [p.name for p in out.iterdir()] == ["theirs"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # this run's temporary is gone


def test_two_converts_to_one_output_keep_the_first(model, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["convert", "--model", str(model), "--out", str(out), "--quiet", "--target", "mlx"]) == 0
    first = _tree_digest(out)
    assert main(["convert", "--model", str(model), "--out", str(out), "--quiet", "--mode", "binary"]) == 2
    assert "already exists; pass --force to replace it" in capsys.readouterr().err
    assert _tree_digest(out) == first


def _cli(*args, env=None):
    return subprocess.Popen([sys.executable, "-m", "bonsai_quant.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}, cwd=REPO)


def test_sigterm_leaves_nothing_behind(tmp_path):
    from bonsai_quant.flux2 import preset_config
    from bonsai_quant.synthetic import write_checkpoint

    # Big enough that convert is still working when the signal arrives.
    config = {**preset_config("tiny"), "num_layers": 4, "num_single_layers": 8}
    src = write_checkpoint(config, tmp_path / "src", seed=0)
    out = tmp_path / "out"
    proc = _cli("convert", "--model", str(src), "--out", str(out), "--quiet")
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".out.partial-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_stale_temporary_of_a_dead_run_is_removed(model, tmp_path, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".out.partial-{dead}-abc123"
    (stale / "mlx").mkdir(parents=True)
    (stale / "mlx" / "model.safetensors").write_bytes(b"\0" * 1000)
    live = tmp_path / f".out.partial-{os.getppid()}-def456"  # a live process's: kept
    live.mkdir()
    assert main(["convert", "--model", str(model), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert f"removed {stale}: the temporary folder of an interrupted run" in err
    assert not stale.exists() and live.exists()


# --- tampering: every kind of change to a pack is caught ------------------------------------------------------

def test_resealed_metadata_change_is_caught(packs, tmp_path):
    folder = tmp_path / "gemlite"
    shutil.copytree(packs["binary"] / "gemlite", folder)
    file = folder / "model.safetensors"
    data = file.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    old = b'"bonsai_producer":"bonsai-quant '
    assert data[8:8 + n].count(old) == 1
    file.write_bytes(data.replace(old, b'"bonsai_producer":"bonsai-quanT ', 1))  # same length: the data stays in place
    (folder / "manifest.json").unlink()
    write_manifest(folder)
    steps = verify(folder)["packs"][0]["steps"]
    assert steps[0]["name"] == "integrity" and steps[0]["status"] == "fail"
    assert "model.safetensors" in steps[0]["detail"] and "header" in steps[0]["detail"]


def test_extra_file_listed_in_the_manifest_is_caught(packs, tmp_path):
    folder = tmp_path / "mlx"
    shutil.copytree(packs["ternary"] / "mlx", folder)
    (folder / "extra.pkl").write_bytes(b"\x80\x04K\x01.")
    (folder / "manifest.json").unlink()
    write_manifest(folder)
    step = verify(folder)["packs"][0]["steps"][0]
    assert step["status"] == "fail" and "extra.pkl" in step["detail"]


def _flip(file: Path, rng: random.Random) -> int:
    data = bytearray(file.read_bytes())
    at = rng.randrange(len(data))
    data[at] ^= 1 << rng.randrange(8)
    file.write_bytes(bytes(data))
    return at


@pytest.mark.parametrize("mode", ["binary", "ternary"])
@pytest.mark.parametrize("target", ["mlx", "gemlite", "bonsai"])
def test_random_single_bit_flips_never_pass(packs, tiny_ckpt, tmp_path, mode, target):
    """Seeded fault injection: one bit of one file, anywhere; half of the trials reseal the manifest, as a
    careful tamperer would. verify --source must fail every time."""
    rng = random.Random(f"{mode}-{target}")
    base = packs[mode] / target
    files = sorted(p.name for p in base.iterdir() if p.is_file())
    for trial in range(6):
        folder = tmp_path / f"t{trial}"
        shutil.copytree(base, folder)
        reseal = trial % 2 == 1
        candidates = [f for f in files if not (reseal and f == "manifest.json")]
        name = candidates[rng.randrange(len(candidates))]
        at = _flip(folder / name, rng)
        if reseal:
            (folder / "manifest.json").unlink()
            write_manifest(folder)
        report = verify(folder, source=tiny_ckpt)
        assert not report["ok"], f"{target}/{name}: flipped a bit at byte {at} (resealed: {reseal}) and verify passed"
        shutil.rmtree(folder)


# --- release folders ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def released(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("rel") / "release"
    release(tiny_ckpt, default_recipe("ternary"), out, targets=("mlx",))
    return out


def test_release_check_names_a_stranger_file(released, tmp_path):
    copy = tmp_path / "release"
    shutil.copytree(released, copy)
    (copy / "notes.txt").write_text("hello")
    result = check_release(copy)
    assert not result["ok"]
    assert result["manifest"][0].startswith(f"{copy / 'notes.txt'}: not part of a release folder (it holds README.md")


def test_release_is_byte_identical_at_any_thread_count(tiny_ckpt, tmp_path):
    outs = []
    for threads in ("1", "2"):
        out = tmp_path / f"t{threads}" / "release"
        proc = _cli("release", "--model", str(tiny_ckpt), "--out", str(out), "--targets", "mlx", "--quiet",
                    env={"OMP_NUM_THREADS": threads})
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        outs.append(_tree_digest(out))
    assert outs[0] == outs[1]


# --- hostile input gets one named error line ------------------------------------------------------------------

def test_out_under_a_file(model, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["convert", "--model", str(model), "--out", str(tmp_path / "file" / "out")]) == 2
    assert f"{tmp_path / 'file'} is a file, not a folder" in capsys.readouterr().err


def test_over_long_output_name(model, tmp_path, capsys):
    out = tmp_path / ("x" * 300)
    assert main(["convert", "--model", str(model), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "File name too long" in err and "Traceback" not in err


def test_full_disk_is_refused_before_the_work(model, tmp_path, capsys, monkeypatch):
    import shutil as sh

    monkeypatch.setattr(sh, "disk_usage", lambda p: sh._ntuple_diskusage(10**12, 10**12 - 1000, 1000))
    assert main(["convert", "--model", str(model), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "0.000 GB free, but" in err and "valid: free space or an --out on another disk" in err
    assert list(tmp_path.iterdir()) == [tmp_path / "models"]


def test_deeply_nested_recipe(tmp_path):
    path = tmp_path / "deep.yaml"
    path.write_text("mode: ternary\nrules: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(Exception, match="nested too deeply") as e:
        load_recipe(path)
    assert str(path) in str(e.value)


def test_five_thousand_digit_integer_in_a_recipe(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("mode: ternary\ngroup_size: " + "9" * 5000 + "\n")
    with pytest.raises(Exception) as e:
        load_recipe(path)
    assert type(e.value).__name__ == "RecipeError" and str(path) in str(e.value)


def test_inspect_of_a_json_list_config(packs, tmp_path, capsys):
    folder = tmp_path / "mlx"
    shutil.copytree(packs["binary"] / "mlx", folder)
    (folder / "quantization_config.json").write_text("[1, 2, 3]")
    assert main(["inspect", str(folder)]) == 2
    err = capsys.readouterr().err
    assert f"{folder / 'quantization_config.json'}" in err and "Traceback" not in err


def test_closed_pipe_exits_quietly(packs):
    proc = subprocess.Popen(f"{sys.executable} -m bonsai_quant.cli plan --json | head -c 1", shell=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    out, err = proc.communicate(timeout=120)
    assert out == "{" or out == "["
    assert "Traceback" not in err and "BrokenPipe" not in err
