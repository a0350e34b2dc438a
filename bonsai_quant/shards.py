"""Opening the files of a checkpoint or pack folder: only regular files, and only shards the folder holds.

An index names its shards; a name is taken only as a plain file name beside the index, so an index cannot
make us read (and quote in an error) a file elsewhere on the disk. The shard itself may be a symlink, as in
a Hugging Face cache snapshot, whose files link into the cache's `blobs/`. Files are opened non-blocking and
checked with fstat, so a FIFO or device answers with an error instead of waiting forever for a writer.
Kept free of torch: the MLX runtime reads packs through it too.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from .errors import BonsaiError

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def open_regular(path: Path, error: type[BonsaiError], missing: str = "file not found",
                 valid: str = "a safetensors file, or a symlink to one"):
    """`path` opened for binary reading if it is, or links to, a regular file; else `error` naming it."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise error(f"{path}: {missing}") from None
    except IsADirectoryError:  # some systems refuse to open a folder at all
        raise error(f"{path}: not a regular file (a folder); valid: {valid}") from None
    except OSError as e:
        raise error(f"{path}: cannot be opened ({e.strerror})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = next((what for test, what in _KINDS if test(mode)), "not a file")
        raise error(f"{path}: not a regular file ({kind}); valid: {valid}")
    return os.fdopen(fd, "rb")


def read_json(path: Path, error: type[BonsaiError], missing: str = "file not found"):
    """The JSON value in a regular file, or `error` naming the file (and the line of a syntax error)."""
    with open_regular(path, error, missing, valid="a JSON file") as f:
        raw = f.read()
    try:
        return json.loads(raw)
    except UnicodeDecodeError:
        raise error(f"{path}: not UTF-8 text; valid: a JSON file") from None
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def shard_path(index: Path, name, error: type[BonsaiError]) -> Path:
    """The shard an index entry names, which must be a plain `.safetensors` file name beside the index."""
    plain = (isinstance(name, str) and name.endswith(".safetensors") and name not in (".safetensors",)
             and "/" not in name and "\\" not in name and "\0" not in name)
    if not plain:
        raise error(f"{index}: shard {name!r} is not a file name in this folder; valid: a plain file name "
                    "ending in .safetensors, beside the index")
    return index.parent / name


def read_weight_map(index: Path, error: type[BonsaiError]) -> dict[str, Path]:
    """tensor name -> shard path of a safetensors index, every shard checked by `shard_path`."""
    data = read_json(index, error)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise error(f"{index}: not a safetensors index (needs a 'weight_map' object of tensor name -> shard "
                    "file name)")
    return {name: shard_path(index, file, error) for name, file in weight_map.items()}
