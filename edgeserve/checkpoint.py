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
import queue
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import blake3
import torch

from edgeserve.arch.spec import ModelFormatError

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
          "I8": torch.int8, "U8": torch.uint8}          # quantized weights (quant/format.py)
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


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """One tensor of a checkpoint read into a new CPU tensor."""
    buf = torch.empty(info.nbytes, dtype=torch.uint8)
    read_into(info.path, info.start, buf.numpy().data)
    return buf.view(info.dtype).view(info.shape)


ALGORITHM = "blake3"          # tensor content hashes; "blake2b" for older caches and packs


class Hasher(Protocol):
    def update(self, data: Any, /) -> object: ...
    def hexdigest(self) -> str: ...


def tensor_hasher(t: TensorInfo, algorithm: str = ALGORITHM) -> Hasher:
    """A hash of a tensor's dtype and shape, to be fed its raw bytes in order.

    Content keys decide which bytes a model computes with, so the hash is cryptographic:
    a crafted checkpoint cannot collide with another's tensor. blake3 runs at several
    GB/s on one core (SIMD), fast enough to hash while the bytes stream from disk."""
    prefix = f"{t.dtype}|{t.shape}|".encode()
    if algorithm == "blake3":
        return blake3.blake3(prefix)
    if algorithm == "blake2b":
        return hashlib.blake2b(prefix, digest_size=16)
    raise ValueError(f"hash algorithm {algorithm!r} is not blake3 or blake2b")


HASH_CHUNK = 2 << 20   # bytes per read of a hashing pass: three buffers stay in the cache


def hash_file(path: Path, algorithm: str = ALGORITHM, chunk: int = HASH_CHUNK,
              only: set[str] | None = None) -> dict[str, str]:
    """Content hash of every tensor of a file (or of those named in `only`). The next
    chunk is read while a thread hashes this one (three buffers in rotation). Small
    chunks: three 32 MiB buffers, new for every file, cost more in page faults than the
    hashing itself (a 63 MB file: 72-320 ms against 21-27 ms with 2 MiB chunks)."""
    tensors = [t for t in read_header(path) if only is None or t.name in only]
    hashers = {t.name: tensor_hasher(t, algorithm) for t in tensors}
    buffers = [bytearray(chunk) for _ in range(3)]
    # At most one chunk waits and one is being hashed: the third buffer is free to read.
    work: queue.Queue[tuple[Hasher, memoryview] | None] = queue.Queue(maxsize=1)

    def hash_chunks() -> None:
        while (item := work.get()) is not None:
            item[0].update(item[1])

    thread = threading.Thread(target=hash_chunks, name="edgeserve-hash", daemon=True)
    thread.start()
    try:
        i = 0
        for t in tensors:
            for offset in range(t.start, t.end, chunk):
                view = memoryview(buffers[i % 3])[:min(chunk, t.end - offset)]
                read_into(path, offset, view)
                work.put((hashers[t.name], view))
                i += 1
    finally:
        work.put(None)
        thread.join()
    return {name: h.hexdigest() for name, h in hashers.items()}


def hash_rest(path: Path, have: dict[str, str], algorithm: str) -> dict[str, str]:
    """Every tensor's hash of path: those in `have`, the others computed now."""
    if not have:
        return hash_file(path, algorithm)
    rest = {t.name for t in read_header(path)} - set(have)
    return have | (hash_file(path, algorithm, only=rest) if rest else {})


class StreamHashes:
    """Tensor hashes computed by the reader threads of a load while the bytes stream in,
    so that a file seen for the first time is not read twice. Each tensor is hashed once,
    by the first reader that claims it."""

    def __init__(self, algorithm: str = ALGORITHM) -> None:
        self.algorithm = algorithm
        self._claimed: set[tuple[Path, str]] = set()
        self._done: dict[Path, dict[str, str]] = {}
        self._lock = threading.Lock()

    def claim(self, t: TensorInfo) -> Hasher | None:
        """A hasher for t, or None when another reader hashes it."""
        with self._lock:
            if (t.path, t.name) in self._claimed:
                return None
            self._claimed.add((t.path, t.name))
        return tensor_hasher(t, self.algorithm)

    def know(self, path: Path, hashes: dict[str, str]) -> None:
        """Hashes computed before the read (a probe's): those tensors are not hashed again."""
        with self._lock:
            self._claimed.update((path, name) for name in hashes)
            self._done.setdefault(path, {}).update(hashes)

    def finish(self, t: TensorInfo, h: Hasher) -> None:
        digest = h.hexdigest()
        with self._lock:
            self._done.setdefault(t.path, {})[t.name] = digest

    def complete(self, path: Path) -> dict[str, str]:
        """Every tensor's hash of path: those streamed, then the rest read now (tensors the
        load did not need, usually none)."""
        with self._lock:
            have = dict(self._done.get(path, {}))
        return hash_rest(path, have, self.algorithm)


class HashCache:
    """Tensor hashes per checkpoint file and hash algorithm, kept in the store and
    recomputed only when the file changes (its size or modification time). Entries made
    before blake3 (no algorithm recorded) stay valid as blake2b entries."""

    def __init__(self, root: Path) -> None:
        self.root = root / ".edgeserve" / "hashes"
        self.computed = 0            # files hashed for loads (tests read it; not idle hashing)
        self.streamed = 0            # of which hashed while a load read them, in one pass
        self.probed = 0              # files of which a few tensors were hashed (`some`)
        self._some: dict[tuple[str | int, ...], dict[str, str]] = {}   # those hashes
        self._lock = threading.Lock()

    def _entry(self, path: Path, algorithm: str) -> Path:
        digest = hashlib.blake2b(str(path.resolve()).encode(), digest_size=12).hexdigest()
        suffix = "" if algorithm == "blake2b" else f".{algorithm}"
        return self.root / f"{digest}{suffix}.json"

    @staticmethod
    def stamp(path: Path) -> list[int]:
        stat = path.stat()
        return [stat.st_size, stat.st_mtime_ns]

    def cached(self, path: Path, algorithm: str = ALGORITHM) -> dict[str, str] | None:
        """The file's hashes if cached and still current, else None (nothing is read)."""
        try:
            cached = json.loads(self._entry(path, algorithm).read_text())
            if cached["stamp"] == self.stamp(path) and cached["path"] == str(path.resolve()) \
                    and cached.get("algorithm", "blake2b") == algorithm:
                return dict(cached["tensors"])
        except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
            pass
        return None

    def get(self, path: Path, algorithm: str = ALGORITHM) -> dict[str, str]:
        """Every tensor's hash of path: cached, else computed (those `some` hashed already
        are not hashed again) and cached."""
        hashes = self.cached(path, algorithm)
        if hashes is None:
            stamp = self.stamp(path)
            hashes = hash_rest(path, self.partial(path, algorithm, stamp), algorithm)
            self.computed += 1
            self.put(path, hashes, algorithm, stamp)
        return hashes

    def partial(self, path: Path, algorithm: str, stamp: list[int]) -> dict[str, str]:
        """The hashes `some` computed for the file as it was at stamp (not cached)."""
        with self._lock:
            return dict(self._some.get((str(path.resolve()), algorithm, *stamp), {}))

    def some(self, path: Path, names: set[str], algorithm: str = ALGORITHM) -> dict[str, str]:
        """The hashes of the tensors named: from the cache, else of those tensors alone
        (not cached: an entry holds a whole file; kept for its `get`)."""
        hashes = self.cached(path, algorithm)
        if hashes is not None or not names:
            return {n: h for n, h in (hashes or {}).items() if n in names}
        stamp = self.stamp(path)
        at: tuple[str | int, ...] = (str(path.resolve()), algorithm, *stamp)
        have = self.partial(path, algorithm, stamp)
        if missing := names - set(have):
            have |= hash_file(path, algorithm, only=missing)
            self.probed += 1
            if self.cached(path, algorithm) is None:   # else a load put the whole file
                with self._lock:
                    self._some[at] = have
        return {n: have[n] for n in names}

    def put(self, path: Path, hashes: dict[str, str], algorithm: str = ALGORITHM,
            stamp: list[int] | None = None) -> None:
        """Keep hashes computed elsewhere (stamp: the file's, taken before it was read)."""
        entry = self._entry(path, algorithm)
        with self._lock:                # hashes of some of its tensors: now in the entry
            self._some = {at: h for at, h in self._some.items() if at[0] != str(path.resolve())}
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = entry.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_text(json.dumps({"path": str(path.resolve()), "algorithm": algorithm,
                                       "stamp": stamp or self.stamp(path),
                                       "tensors": hashes}))
            tmp.replace(entry)
        except OSError:
            pass                     # a read-only store: hash again next time


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
