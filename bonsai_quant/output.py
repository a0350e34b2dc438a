"""Atomic output folders: build in a hidden sibling, rename into place only when complete.

The hidden sibling is named `.<out>.partial-<pid>-<random>`, so that a later run can tell the temporaries of a
dead run of the same output (GBs each at klein size) from those of a run still working, and remove only the
former.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sys
import tempfile
from pathlib import Path

from .errors import BonsaiError, OutputExistsError

_TEMP_KINDS = ("partial", "old")


def _resolved(path: Path) -> Path:
    return Path(os.path.realpath(path))


def check_output(out: Path, force: bool = False, sources: tuple = ()) -> None:
    """Refuse an output that exists (unless `force`) or that is, holds, or lies inside any of `sources`.

    Called before any work, so that a refused run costs nothing; `--force` never reaches a source either.
    """
    out = Path(out)
    real_out = _resolved(out)
    for source in sources:
        if source is None:
            continue
        real_src = _resolved(Path(source))
        if real_out == real_src or real_src.is_relative_to(real_out) or real_out.is_relative_to(real_src):
            where = ("is" if real_out == real_src else "holds" if real_src.is_relative_to(real_out)
                     else "lies inside")
            raise BonsaiError(f"--out {out} {where} the source {source} (resolved: {real_out} and {real_src}); "
                              "valid: an output folder outside every source")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise BonsaiError(f"--out {out}: {parent} is a file, not a folder")
    if (out.exists() or out.is_symlink()) and not force:
        raise OutputExistsError(f"{out}: already exists; pass --force to replace it")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(out: Path, log=None) -> list[Path]:
    """Remove the hidden temporaries of `out` left by runs that are no longer alive; returns what was removed."""
    out = Path(out)
    removed = []
    if not out.parent.is_dir():
        return removed
    for kind in _TEMP_KINDS:
        for path in sorted(out.parent.glob(f".{out.name}.{kind}-*")):
            pid = path.name[len(f".{out.name}.{kind}-"):].split("-", 1)[0]
            if not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
                continue
            size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
            (log or _stderr)(f"removed {path}: the temporary folder of an interrupted run ({size / 1e9:.3f} GB)")
    return removed


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def check_free_space(folder: Path, needed_bytes: int, what: str) -> None:
    """Fail before the work when the disk holding `folder` cannot take `needed_bytes`."""
    folder = Path(folder)
    probe = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    free = shutil.disk_usage(probe).free
    if needed_bytes > free:
        raise BonsaiError(f"{probe}: {free / 1e9:.3f} GB free, but {what} needs {needed_bytes / 1e9:.3f} GB; "
                          "valid: free space or an --out on another disk")


@contextlib.contextmanager
def atomic_output(out: Path, force: bool = False, sources: tuple = (), log=None):
    """Yield a temporary folder beside `out`; on success it becomes `out`, on any failure it is removed.

    An existing `out` is refused unless `force`, and even then it is only replaced once the new folder is
    complete, so a failed run never destroys the previous output. Without `force`, an output that appeared
    while this run worked (another run of the same command) is not replaced either: this run's result is
    discarded with an error.
    """
    out = Path(out)
    check_output(out, force, sources)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out, log)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    except OSError as e:
        raise BonsaiError(f"--out {out}: cannot create a folder there ({e.strerror})") from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the output should look like any folder the user makes
    try:
        yield tmp
        if force and (out.exists() or out.is_symlink()):
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
            os.replace(out, trash / out.name)
            os.replace(tmp, out)
            shutil.rmtree(trash)
        else:
            _rename_no_replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _rename_no_replace(tmp: Path, out: Path) -> None:
    # rename(2) replaces an empty folder but never a non-empty one or a file, so what another run finished in
    # the meantime survives; the exists() check gives the clear message in the common case.
    if out.exists() or out.is_symlink():
        raise OutputExistsError(f"{out}: appeared while this run worked (another run?); it was kept and this "
                                "run's result discarded; pass --force to replace it")
    try:
        os.rename(tmp, out)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise OutputExistsError(f"{out}: appeared while this run worked (another run?); it was kept and "
                                    "this run's result discarded; pass --force to replace it") from None
        raise
