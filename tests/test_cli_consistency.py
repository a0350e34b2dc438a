"""One command line: every subcommand describes itself, target options have one spelling (the other an alias),
sizes print in units a reader takes in at a glance."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from bonsai_quant.cli import build_parser
from bonsai_quant.figures import size_text


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_subcommand_has_a_description():
    subs = _subparsers()
    assert {"convert", "calibrate", "sensitivity", "plan", "inspect", "repack", "release", "verify", "distill",
            "eval", "generate"} <= set(subs)
    for name, p in subs.items():
        assert p.description and len(p.description) > 40, name


@pytest.mark.parametrize("command, extra, dest", [
    ("convert", [], "target"), ("plan", [], "target"), ("distill", ["--out", "x"], "target"),
    ("release", [], "targets")])
def test_target_and_targets_are_one_option(command, extra, dest):
    parser = build_parser()
    for spelling in ("--target", "--targets"):
        args = parser.parse_args([command, *extra, spelling, "bonsai,mlx"])
        assert getattr(args, dest) == ("bonsai", "mlx"), (command, spelling)


def test_convert_help_lists_every_target(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["convert", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--target TARGET, --targets TARGET" in text and "mlx,gemlite,bonsai" in text


def test_sizes_print_in_sensible_units():
    assert [size_text(n) for n in (0, 812, 45_300, 999_960, 1_000_000, 6_713_000, 999_999_999, 1_430_000_000)] == \
        ["0 bytes", "812 bytes", "45.3 kB", "1.00 MB", "1.00 MB", "6.71 MB", "1.000 GB", "1.430 GB"]


def test_help_loads_neither_torch_nor_numpy():
    """`bonsai-quant --help` and every subcommand's help answer at once: torch (seconds to import on a small
    machine) loads only when a command runs, and OpenMP's wait policy is set before it does."""
    code = ("import os, sys; from bonsai_quant.cli import build_parser, main; build_parser()\n"
            "try:\n    main(['distill', '--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted({'torch', 'numpy'} & set(sys.modules)), os.environ.get('OMP_WAIT_POLICY'))")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.splitlines()[-1] == "[] PASSIVE"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_cli_keeps_freed_memory_for_reuse():
    """convert and verify allocate the same few-MB temporaries chunk after chunk: the CLI sets glibc's
    thresholds so they are reused rather than zeroed again by the kernel (results are unchanged either way)."""
    code = ("from bonsai_quant import cpu_settings as c\n"
            "try:\n    c.prepare(); from bonsai_quant.cli import main; main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(c.keep_freed_memory(), c.MMAP_THRESHOLD, c.TRIM_THRESHOLD)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == f"True {32 << 20} {256 << 20}"
