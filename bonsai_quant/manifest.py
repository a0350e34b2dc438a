"""sha256 manifests: of every file in a pack, and of every tensor inside its safetensors files.

Per-tensor digests let `verify` name the tensor a corrupted byte belongs to, not just the file. Both kinds
are computed in one sequential read of each file.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .checkpoint import read_header
from .errors import BonsaiError
from .shards import read_json

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
_CHUNK = 1 << 22


def _digest_file(path: Path) -> tuple[str, dict[str, str]]:
    file_hash, tensors = hashlib.sha256(), {}
    with open(path, "rb") as f:
        if path.suffix != ".safetensors":
            while chunk := f.read(_CHUNK):
                file_hash.update(chunk)
            return file_hash.hexdigest(), tensors
        header = read_header(path)
        head = f.read(8)
        (n,) = struct.unpack("<Q", head)
        file_hash.update(head + f.read(n))
        for info in sorted(header.values(), key=lambda i: i.offset):
            tensor_hash, left = hashlib.sha256(), info.nbytes
            while left:
                chunk = f.read(min(left, _CHUNK))
                tensor_hash.update(chunk)
                file_hash.update(chunk)
                left -= len(chunk)
            tensors[info.name] = tensor_hash.hexdigest()
    return file_hash.hexdigest(), tensors


def _files(folder: Path) -> list[Path]:
    """Every file under folder but its own manifest (a release lists its packs' manifests too)."""
    own = folder / MANIFEST_NAME
    # Ordered by the relative path as text, the order check_manifest reads the files in: where two packs hold a
    # tensor of the same name, the entry of the last one is kept, so writer and checker must agree on which
    # is last (Path order puts `transformer/` before `transformer-packed-mflux/`, text order after).
    return sorted((p for p in folder.rglob("*") if p.is_file() and p != own),
                  key=lambda p: p.relative_to(folder).as_posix())


def _manifest_text(manifest: dict) -> str:
    return json.dumps(manifest, indent=2, sort_keys=True) + "\n"


def digest_files(paths: list[Path]) -> list[tuple[str, dict[str, str]]]:
    """`_digest_file` of each path, in order; files are hashed side by side (hashlib releases the GIL on large
    buffers, and a pack's digests are otherwise a single core's sequential read of every byte)."""
    if len(paths) < 2:
        return [_digest_file(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(len(paths), os.cpu_count() or 1)) as pool:
        return list(pool.map(_digest_file, paths))


def write_manifest(folder: Path, known: dict[str, tuple[int, str, dict[str, str]]] | None = None) -> dict:
    """`known`: {relative path: (bytes, sha256, per-tensor sha256)} of files whose bytes this run has already
    checked against those digests (a release's packs, verified against their own manifests), taken instead of
    hashing the files again while their size matches."""
    files, tensors = {}, {}
    paths = _files(folder)
    sizes = {p: p.stat().st_size for p in paths}
    rel = {p: p.relative_to(folder).as_posix() for p in paths}
    reused = {p: known[rel[p]] for p in paths if known and rel[p] in known and known[rel[p]][0] == sizes[p]}
    fresh = [p for p in paths if p not in reused]
    hashed = dict(zip(fresh, digest_files(fresh)))
    for path in paths:
        digest, per_tensor = reused[path][1:] if path in reused else hashed[path]
        files[rel[path]] = {"bytes": sizes[path], "sha256": digest}
        tensors.update({name: {"file": rel[path], "sha256": d} for name, d in per_tensor.items()})
    manifest = {"format_version": FORMAT_VERSION, "files": files, "tensors": tensors}
    (folder / MANIFEST_NAME).write_text(_manifest_text(manifest))
    return manifest


def listed_digests(folder: Path, prefix: str) -> dict[str, tuple[int, str, dict[str, str]]]:
    """A checked manifest's entries as `write_manifest(known=...)` takes them, each path under `prefix/`
    (the data files only: the manifest itself is hashed by whoever lists it)."""
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    per_file: dict[str, dict[str, str]] = {}
    for name, entry in manifest["tensors"].items():
        per_file.setdefault(entry["file"], {})[name] = entry["sha256"]
    return {f"{prefix}/{rel}": (e["bytes"], e["sha256"], per_file.get(rel, {})) for rel, e in manifest["files"].items()}


def check_manifest(folder: Path, hashes: bool = True) -> list[str]:
    """Problems found, naming files and tensors; empty when every byte matches the manifest.

    `hashes=False` is the cheap look readers take: every listed file present with its listed size, no hashing
    and no complaint about files the manifest does not list."""
    path = folder / MANIFEST_NAME
    try:
        manifest = read_json(path, BonsaiError, missing="missing; a pack made by bonsai-quant convert lists every "
                                                         "file's sha256 there")
    except BonsaiError as e:
        return [str(e)]
    try:
        files, tensors = manifest["files"], manifest["tensors"]
        if not (isinstance(files, dict) and isinstance(tensors, dict) and all(
                isinstance(e, dict) and type(e.get("bytes")) is int and isinstance(e.get("sha256"), str)
                for e in files.values())):
            raise TypeError
    except (KeyError, TypeError):
        return [f"{path}: not a bonsai-quant manifest (needs 'files' and 'tensors')"]
    problems, computed = [], {}
    on_disk = {p.relative_to(folder).as_posix() for p in _files(folder)}
    if hashes:
        for extra in sorted(on_disk - set(files)):
            problems.append(f"{folder / extra}: not listed in {MANIFEST_NAME}")
    for rel, entry in sorted(files.items()):
        file = folder / rel
        if rel not in on_disk:
            problems.append(f"{file}: listed in {MANIFEST_NAME} but missing")
            continue
        size = file.stat().st_size
        if size != entry["bytes"]:
            problems.append(f"{file}: {size} bytes, {MANIFEST_NAME} says {entry['bytes']} (truncated or replaced)")
            continue
        if not hashes:
            continue
        try:
            digest, per_tensor = _digest_file(file)
        except BonsaiError as e:
            problems.append(str(e))
            continue
        computed[rel] = (entry["bytes"], digest, per_tensor)
        if digest == entry["sha256"]:
            continue
        changed = [name for name, d in per_tensor.items()
                   if not isinstance(tensors.get(name), dict) or tensors[name].get("sha256") != d]
        if changed:
            problems += [f"{file}: tensor {name!r} differs from its sha256 in {MANIFEST_NAME}" for name in changed]
        else:
            problems.append(f"{file}: sha256 differs from {MANIFEST_NAME} (header bytes changed)")
    if hashes and not problems:
        problems += _entries_not_as_written(path, manifest, computed)
    return problems


def _entries_not_as_written(path: Path, manifest: dict, computed: dict) -> list[str]:
    """With every file matching, the manifest itself must be exactly what write_manifest writes for them: a
    changed per-tensor digest, version or byte of layout is damage too, even where it cannot hide a change."""
    tensors = {name: {"file": rel, "sha256": d} for rel, (_, _, per) in computed.items() for name, d in per.items()}
    listed = manifest["tensors"]
    wrong = sorted(n for n in set(tensors) | set(listed) if listed.get(n) != tensors.get(n))
    if wrong:
        return [f"{path}: the entry of tensor {n!r} is not its sha256 in {listed.get(n, {}).get('file', 'any file')}"
                if isinstance(listed.get(n), dict) else f"{path}: the entry of tensor {n!r} is not its sha256"
                for n in wrong]
    expected = {"format_version": FORMAT_VERSION, "tensors": tensors,
                "files": {rel: {"bytes": b, "sha256": d} for rel, (b, d, _) in computed.items()}}
    if path.read_text(errors="replace") != _manifest_text(expected):
        return [f"{path}: not as bonsai-quant writes it for these files (format_version {FORMAT_VERSION}, sorted "
                "keys, two-space indent); it was edited"]
    return []
