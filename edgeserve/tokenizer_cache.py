"""Tokenizers kept by content, so that loading a model whose tokenizer files equal one
already read (a task and its base, tasks of one base, a model loaded again) parses nothing.

Parsing a large vocabulary takes a tenth of a second or more; hashing its files takes a few
milliseconds, and is done once per file version (inode, size, mtime and ctime).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from pathlib import Path

from edgeserve.tokenizer import Tokenizer

_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
          "chat_template.jinja")


def tokenizer_files(folder: Path) -> list[Path]:
    """The files Tokenizer.from_dir reads from folder, those present."""
    files = [folder / name for name in _FILES if (folder / name).is_file()]
    return files + sorted(folder.glob("additional_chat_templates/*.jinja"))


# A file version: inode, size, and modification and change times (ctime moves on every
# write or touch, which a copy that keeps mtime cannot set back).
Stamp = tuple[int, int, int, int]


def _stamp(path: Path) -> Stamp:
    stat = path.stat()
    return stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


class TokenizerCache:
    """Tokenizer.from_dir by content, keeping the `keep` most recently used (any thread)."""

    def __init__(self, keep: int = 16) -> None:
        self.keep = keep
        self.parsed = 0                       # tokenizers actually read from their files
        self._digests: dict[str, tuple[Stamp, bytes]] = {}      # path -> its last version
        self._tokenizers: OrderedDict[bytes, Tokenizer] = OrderedDict()
        self._lock = threading.Lock()

    def load(self, folder: Path) -> Tokenizer:
        key, stamps = self._key(folder)
        with self._lock:
            found = self._tokenizers.get(key)
            if found is not None:
                self._tokenizers.move_to_end(key)
                return found
        tokenizer = Tokenizer.from_dir(folder)
        if [_stamp(p) for p in tokenizer_files(folder)] != stamps:
            return tokenizer                  # changed while being read: not kept
        with self._lock:
            self.parsed += 1
            self._tokenizers[key] = tokenizer
            while len(self._tokenizers) > self.keep:
                self._tokenizers.popitem(last=False)
        return tokenizer

    def _key(self, folder: Path) -> tuple[bytes, list[Stamp]]:
        whole = hashlib.blake2b(digest_size=16)
        stamps = []
        for path in tokenizer_files(folder):
            stamp = _stamp(path)
            stamps.append(stamp)
            whole.update(path.relative_to(folder).as_posix().encode() + b"\0")
            whole.update(self._digest(path, stamp))
        return whole.digest(), stamps

    def _digest(self, path: Path, stamp: Stamp) -> bytes:
        known = self._digests.get(str(path))
        if known is not None and known[0] == stamp:
            return known[1]
        with path.open("rb") as f:
            digest = hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=16)).digest()
        self._digests[str(path)] = (stamp, digest)
        return digest

