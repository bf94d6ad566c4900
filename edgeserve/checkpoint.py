"""Safetensors files read directly: headers, large sequential reads, content hashes.

A file is `u64 header length | JSON header | data`; the header maps each tensor to its
dtype, shape and byte range in the data. Reading ourselves (instead of one tensor at a
time through the library) lets a load issue a few large sequential reads, overlap them
with the copies into the pool, and check every range against the file's real size.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from edgeserve.arch.spec import ModelFormatError

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
MAX_HEADER = 100 << 20


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int           # absolute offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> list[TensorInfo]:
    """The tensors of one file in file order; ModelFormatError naming the file if broken."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ModelFormatError(f"{path}: truncated (no safetensors header)")
            (length,) = struct.unpack("<Q", raw)
            if length > min(MAX_HEADER, size - 8):
                raise ModelFormatError(f"{path}: header length {length} exceeds the file")
            header = json.loads(f.read(length))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFormatError(f"{path}: not a readable safetensors file ({e})") from e
    if not isinstance(header, dict):
        raise ModelFormatError(f"{path}: safetensors header is not an object")
    base = 8 + length
    tensors = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        tensors.append(_info(path, name, meta, base, size))
    return sorted(tensors, key=lambda t: t.start)


def _info(path: Path, name: str, meta: object, base: int, size: int) -> TensorInfo:
    try:
        assert isinstance(meta, dict)
        begin, end = meta["data_offsets"]
        shape = tuple(int(d) for d in meta["shape"])
        dtype_name = meta["dtype"]
    except (AssertionError, KeyError, TypeError, ValueError) as e:
        raise ModelFormatError(f"{path}: malformed entry for tensor '{name}'") from e
    if dtype_name not in DTYPES:
        raise ModelFormatError(f"{path}: tensor '{name}' has unsupported dtype {dtype_name}")
    dtype = DTYPES[dtype_name]
    count = 1
    for d in shape:
        count *= d
    if not 0 <= begin <= end or end - begin != count * dtype.itemsize:
        raise ModelFormatError(f"{path}: tensor '{name}' has inconsistent data_offsets")
    if base + end > size:
        raise ModelFormatError(f"{path}: truncated: tensor '{name}' ends at byte {base + end} "
                               f"but the file has {size}")
    return TensorInfo(name, path, dtype, shape, base + begin, base + end)


def read_into(path: Path, offset: int, buffer: memoryview) -> None:
    """Fill buffer from path at offset (one large read, retried until complete)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        done = 0
        while done < len(buffer):
            n = os.preadv(fd, [buffer[done:]], offset + done)
            if n <= 0:
                raise ModelFormatError(f"{path}: truncated while reading at {offset + done}")
            done += n
    finally:
        os.close(fd)


def hash_file(path: Path, chunk: int = 64 << 20) -> dict[str, str]:
    """Content hash of every tensor of a file: blake2b of dtype, shape and raw bytes."""
    tensors = read_header(path)
    hashes: dict[str, str] = {}
    buffer = bytearray(chunk)
    for t in tensors:
        h = hashlib.blake2b(f"{t.dtype}|{t.shape}|".encode(), digest_size=16)
        offset = t.start
        while offset < t.end:
            n = min(chunk, t.end - offset)
            view = memoryview(buffer)[:n]
            read_into(path, offset, view)
            h.update(view)
            offset += n
        hashes[t.name] = h.hexdigest()
    return hashes


class HashCache:
    """Tensor hashes per checkpoint file, kept in the store and recomputed only when the
    file changes (its size or modification time)."""

    def __init__(self, root: Path) -> None:
        self.root = root / ".edgeserve" / "hashes"
        self.computed = 0            # files hashed by this process (tests read it)

    def _entry(self, path: Path) -> Path:
        digest = hashlib.blake2b(str(path.resolve()).encode(), digest_size=12).hexdigest()
        return self.root / f"{digest}.json"

    def get(self, path: Path) -> dict[str, str]:
        stat = path.stat()
        stamp = [stat.st_size, stat.st_mtime_ns]
        entry = self._entry(path)
        try:
            cached = json.loads(entry.read_text())
            if cached["stamp"] == stamp and cached["path"] == str(path.resolve()):
                return dict(cached["tensors"])
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            pass
        hashes = hash_file(path)
        self.computed += 1
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = entry.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"path": str(path.resolve()), "stamp": stamp,
                                       "tensors": hashes}))
            tmp.replace(entry)
        except OSError:
            pass                     # a read-only store: hash again next time
        return hashes


def chunks(tensors: list[TensorInfo], size: int) -> Iterator[list[TensorInfo]]:
    """Runs of tensors (given in file order), each read with one request of about `size`
    bytes; a large gap of unwanted bytes starts a new run."""
    run: list[TensorInfo] = []
    for t in tensors:
        if run and (t.end - run[0].start > size or t.path != run[0].path
                    or t.start - run[-1].end > size // 4):
            yield run
            run = []
        run.append(t)
    if run:
        yield run
