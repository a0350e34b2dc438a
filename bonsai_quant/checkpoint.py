"""Reading diffusers checkpoints lazily and writing safetensors shards in bounded memory.

Reading validates every header before any tensor is touched, then streams one tensor at a time through
safetensors' `pread` backend, which (unlike mmap) keeps resident memory at the size of the tensor in hand.
Writing declares the whole layout first, so each shard's header is final before its data is streamed in.
"""

from __future__ import annotations

import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import BonsaiError, CheckpointError
from .flux2 import TensorSpec, check_size, inventory, read_config
from .shards import open_regular, read_weight_map

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "U8": torch.uint8,
          "I8": torch.int8, "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64}
DTYPE_CODES = {v: k for k, v in DTYPES.items()}
SOURCE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_HEADER_BYTES = 100 * 1024 * 1024


def nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    n = dtype.itemsize
    for d in shape:
        n *= d
    return n


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    offset: int = 0  # start of the data, relative to the end of the header

    @property
    def nbytes(self) -> int:
        return nbytes(self.dtype, self.shape)


def _is_count(value) -> bool:
    return type(value) is int and value >= 0  # not bool, not float: what safetensors' usize fields accept


def read_header(path: Path, error: type[BonsaiError] = CheckpointError) -> dict[str, TensorInfo]:
    """Parse and check a safetensors header as safetensors itself does before reading: entries well-formed,
    `__metadata__` an object of strings, tensor data laid end to end from byte 0 with no gap or overlap, and
    ending where the file ends (which catches truncation)."""
    with open_regular(path, error) as f:
        size = os.fstat(f.fileno()).st_size
        raw = f.read(8)
        if len(raw) < 8:
            raise error(f"{path}: truncated ({size} bytes); not a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, MAX_HEADER_BYTES):
            raise error(f"{path}: corrupt safetensors header (claims {n} header bytes in a {size}-byte file)")
        blob = f.read(n)
    try:
        header = json.loads(blob)
    except UnicodeDecodeError:
        raise error(f"{path}: corrupt safetensors header (not UTF-8 JSON)") from None
    except json.JSONDecodeError as e:
        raise error(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise error(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and
                                     all(isinstance(v, str) for v in metadata.values())):
        raise error(f"{path}: corrupt safetensors header (__metadata__ must be an object of strings, got "
                    f"{json.dumps(metadata)[:200]})")
    infos = {}
    for name, entry in header.items():
        try:
            dtype = DTYPES[entry["dtype"]]
            shape, offsets = entry["shape"], entry["data_offsets"]
            if not (isinstance(shape, list) and all(map(_is_count, shape)) and isinstance(offsets, list)
                    and len(offsets) == 2 and all(map(_is_count, offsets))):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise error(f"{path}: tensor {name!r} has an invalid header entry: {entry!r}") from None
        begin, stop = offsets
        info = TensorInfo(name, dtype, tuple(shape), path, begin)
        if stop - begin != info.nbytes:
            raise error(f"{path}: tensor {name!r} spans {stop - begin} bytes but {entry['dtype']}{list(shape)} "
                        f"needs {info.nbytes}")
        infos[name] = info
    end, previous = 0, None
    for info in sorted(infos.values(), key=lambda i: (i.offset, i.nbytes)):
        if info.offset < end:
            raise error(f"{path}: tensor {info.name!r} starts at byte {info.offset} of the data, inside tensor "
                        f"{previous.name!r} (bytes {previous.offset} to {end}); valid: tensors laid end to end")
        if info.offset > end:
            before = f"tensor {previous.name!r} ends at {end}" if previous else "the data begins at 0"
            raise error(f"{path}: tensor {info.name!r} starts at byte {info.offset} of the data, but {before}: "
                        f"{info.offset - end} bytes belong to no tensor; valid: tensors laid end to end")
        end, previous = info.offset + info.nbytes, info
    if 8 + n + end != size:
        raise error(f"{path}: truncated or corrupt: the header describes {8 + n + end} bytes, the file has {size}")
    return infos


def read_folder_headers(folder: Path, single: str, index_name: str,
                        error: type[BonsaiError] = CheckpointError) -> dict[str, TensorInfo]:
    """Headers of a folder's weights: the shards its index names (checked against that index), else the
    single file."""
    index = folder / index_name
    if os.path.lexists(index):
        weight_map = read_weight_map(index, error)
        infos: dict[str, TensorInfo] = {}
        for file in sorted(set(weight_map.values())):
            header = read_header(file, error)
            for name in header:
                if weight_map.get(name) != file:
                    raise error(f"{file}: tensor {name!r} is not listed for this file in {index.name}")
            infos.update(header)
        for name, file in weight_map.items():
            if name not in infos:
                raise error(f"{index}: lists tensor {name!r} in {file.name}, which does not contain it")
        return infos
    if os.path.lexists(folder / single):
        return read_header(folder / single, error)
    raise error(f"{folder}: no {single} or {index_name} found")


def _checkpoint_dir(path: Path) -> Path:
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    if path.is_file():
        raise CheckpointError(f"{path}: expected a diffusers checkpoint folder (config.json + safetensors), got a file")
    if not (path / "config.json").exists() and (path / "transformer" / "config.json").exists():
        return path / "transformer"  # a whole pipeline folder: its transformer lives here
    return path


class Checkpoint:
    """A diffusers FLUX.2 transformer checkpoint: config, validated headers, and lazy tensors."""

    def __init__(self, path: str | Path):
        self.path = _checkpoint_dir(Path(path))
        self.config = read_config(self.path / "config.json")
        self.tensors = self._read_headers()
        self._handles: dict[Path, object] = {}

    def _read_headers(self) -> dict[str, TensorInfo]:
        return read_folder_headers(self.path, WEIGHTS_NAME, INDEX_NAME)

    def validate(self, group_size: int | None = None) -> dict[str, TensorSpec]:
        """Check every tensor against the architecture in config.json; returns the expected specs."""
        source = self.config_source
        # Source weights are 16 or 32 bits each: a config claiming more than the files hold is refused
        # before its architecture is built.
        check_size(self.config, self.source_bytes, 16, source)
        expected = inventory(self.config, source)
        problems = []
        for name in expected:
            if name not in self.tensors:
                problems.append(f"missing tensor {name!r} (expected shape {list(expected[name].shape)})")
        for name, info in self.tensors.items():
            spec = expected.get(name)
            if spec is None:
                problems.append(f"unexpected tensor {name!r} in {info.file.name}: not part of this FLUX.2 config")
            elif info.shape != spec.shape:
                problems.append(f"tensor {name!r} has shape {list(info.shape)}, config.json implies {list(spec.shape)}")
            elif info.dtype not in SOURCE_DTYPES:
                problems.append(f"tensor {name!r} is {info.dtype}; valid: bfloat16, float16, float32")
        if problems:
            more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
            raise CheckpointError(f"{self.path}: does not match its config.json:\n  "
                                  + "\n  ".join(problems[:20]) + more)
        return expected

    def load(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        info = self.tensors[name]
        handle = self._handles.get(info.file)
        if handle is None:
            handle = self._handles[info.file] = safe_open(str(info.file), "pt", backend="pread")
        try:
            return handle.get_tensor(name)
        except Exception as e:  # safetensors' own error types are not stable across versions
            raise CheckpointError(f"{info.file}: cannot read tensor {name!r}: {e}") from None

    @property
    def source_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def config_source(self) -> str:
        """Where the config comes from, for error messages."""
        return str(self.path / "config.json")

    @property
    def config_bytes(self) -> bytes:
        """config.json as the packs copy it (a reader without one on disk supplies its own)."""
        return (self.path / "config.json").read_bytes()


def write_weights(folder: Path, entries: list[Entry], tensor_for, max_shard_bytes: int) -> list[str]:
    """Write `tensor_for(name)` for each entry as the diffusers weight file(s) of `folder`; returns the files."""
    writer = ShardedWriter(folder, entries, WEIGHTS_NAME.removesuffix(".safetensors"), max_shard_bytes)
    try:
        for e in entries:
            writer.write(e.name, tensor_for(e.name))
    except BaseException:
        writer.abort()
        raise
    return writer.close()


class MemoryCheckpoint(Checkpoint):
    """Tensors held in memory, described like a checkpoint on disk (the config is read from `path`): what
    `distill` hands to the convert path, so a trained model is packed by the same code as a file."""

    def __init__(self, path: str | Path, tensors: dict[str, torch.Tensor]):
        self.path = _checkpoint_dir(Path(path))
        self.config = read_config(self.path / "config.json")
        self._memory = tensors
        self.tensors = {name: TensorInfo(name, t.dtype, tuple(t.shape), self.path / "(memory)")
                        for name, t in tensors.items()}
        self._handles = {}

    def load(self, name: str) -> torch.Tensor:
        return self._memory[name]


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return nbytes(self.dtype, self.shape)


@dataclass(frozen=True)
class Shard:
    """One file of a ShardedWriter layout: its name, its exact header bytes, and where each tensor starts."""
    file: str
    header: bytes             # the 8-byte length + JSON header (space-padded to 8 bytes)
    entries: tuple[Entry, ...]
    offsets: tuple[int, ...]  # absolute file offset of each entry's data
    data_bytes: int


def shard_layout(entries: list[Entry], stem: str, max_shard_bytes: int,
                 metadata: dict[str, str] | None = None) -> list[Shard]:
    """The files a ShardedWriter writes, byte for byte up to the tensor data: a pure function of its inputs, so
    that `verify` can rebuild every header of a pack and compare."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    n = len(shards)
    files = [f"{stem}.safetensors"] if n == 1 else [f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    layout = []
    for file, shard in zip(files, shards):
        shard = sorted(shard, key=lambda e: -e.dtype.itemsize)
        header, offset = {}, 0
        if metadata:
            header["__metadata__"] = metadata
        for e in shard:
            header[e.name] = {"dtype": DTYPE_CODES[e.dtype], "shape": list(e.shape),
                              "data_offsets": [offset, offset + e.nbytes]}
            offset += e.nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        head = struct.pack("<Q", len(blob)) + blob
        starts, base = [], len(head)
        for e in shard:
            starts.append(base)
            base += e.nbytes
        layout.append(Shard(file, head, tuple(shard), tuple(starts), offset))
    return layout


def index_text(layout: list[Shard]) -> str | None:
    """The `<stem>.safetensors.index.json` of a sharded layout (None for a single file)."""
    if len(layout) == 1:
        return None
    index = {"metadata": {"total_size": sum(s.data_bytes for s in layout)},
             "weight_map": {e.name: s.file for s in layout for e in s.entries}}
    return json.dumps(index, indent=2, sort_keys=True) + "\n"


class ShardedWriter:
    """Writes declared tensors into `<stem>.safetensors` or `<stem>-0000i-of-0000n.safetensors` + index.

    The layout is fixed up front (`shard_layout`: shard assignment in declaration order, then within a shard
    the widest dtypes first so every tensor starts aligned to its element size), so tensors may be written in
    any order and identical inputs give identical bytes.
    """

    # Bytes written to a shard between background fdatasync calls. Written data otherwise waits in the page
    # cache until close's fsync, and on a disk slower than the quantizer (klein's packs: 2.8-4 GB) most of it
    # was still being written there: tens of seconds in which nothing else ran.
    SYNC_BYTES = 256 << 20

    def __init__(self, directory: Path, entries: list[Entry], stem: str, max_shard_bytes: int,
                 metadata: dict[str, str] | None = None):
        self.directory, self.stem = Path(directory), stem
        self._unsynced: list[int] = []
        self._syncer = ThreadPoolExecutor(max_workers=1)
        self._syncs: list = []
        self.layout = shard_layout(entries, stem, max_shard_bytes, metadata)
        self.files = [s.file for s in self.layout]
        self._where: dict[str, tuple[int, int, Entry]] = {}  # name -> (shard index, offset, entry)
        self._fds: list[int] = []
        self._pending: set[str] = set()
        for i, shard in enumerate(self.layout):
            fd = os.open(self.directory / shard.file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(fd, shard.header)
            os.ftruncate(fd, len(shard.header) + shard.data_bytes)
            self._fds.append(fd)
            self._unsynced.append(0)
            for e, start in zip(shard.entries, shard.offsets):
                self._where[e.name] = (i, start, e)
                self._pending.add(e.name)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shard, offset, entry = self._where[name]
        fd = self._fds[shard]
        if tensor.dtype != entry.dtype or tuple(tensor.shape) != entry.shape:
            raise CheckpointError(f"internal: {name} is {tensor.dtype}{list(tensor.shape)}, "
                                  f"declared {entry.dtype}{list(entry.shape)}")
        data = memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()).cast("B")
        self._unsynced[shard] += len(data)
        while data:
            written = os.pwrite(fd, data, offset)
            data, offset = data[written:], offset + written
        self._pending.discard(name)
        if self._unsynced[shard] >= self.SYNC_BYTES:
            self._unsynced[shard] = 0
            self._syncs.append(self._syncer.submit(os.fdatasync, fd))

    def close(self) -> list[str]:
        """Finish the shards (and the index when sharded); returns the file names written."""
        self._syncer.shutdown(wait=True)
        for sync in self._syncs:
            sync.result()  # an I/O error of a background sync is this write's error
        for fd in self._fds:
            os.fsync(fd)
            os.close(fd)
        self._fds = []
        if self._pending:
            raise CheckpointError(f"internal: tensors declared but never written: {sorted(self._pending)[:5]}")
        files = list(self.files)
        index = index_text(self.layout)
        if index is not None:
            index_name = f"{self.stem}.safetensors.index.json"
            (self.directory / index_name).write_text(index)
            files.append(index_name)
        return files

    def abort(self) -> None:
        self._syncer.shutdown(wait=True)  # no sync may still hold a descriptor closed here
        for fd in self._fds:
            os.close(fd)
        self._fds = []
