"""Builds the CPU kernel library (matmul.c, decode.c, attention.c) on first use with the
system C compiler.

The library is compiled for the machine it runs on (-march=native) and cached per user,
keyed by the source, the compiler, the flags and the CPU's features, so a changed source,
compiler or machine builds anew. A build writes a temporary file beside the cache entry and
renames it into place: processes building at once each finish with a whole library.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shlex
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("matmul.c")
SOURCES = (SOURCE, *(Path(__file__).with_name(n) for n in ("decode.c", "attention.c")))
HEADERS = tuple(Path(__file__).with_name(h) for h in ("simd.h", "tile.h", "vec.h", "decode.h"))
# OpenMP from the same runtime as torch: the library's NEEDED libgomp.so.1 resolves to the
# copy torch has already loaded.
FLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-fopenmp", "-std=gnu11")
PORTABLE = tuple(f for f in FLAGS if f != "-march=native")     # the plain vector paths
SERIAL = tuple(f for f in PORTABLE if f != "-fopenmp")          # without OpenMP: one thread
# Tried in turn: a compiler that rejects -march=native (some take -mcpu) still builds the
# portable vector paths, and one without OpenMP (Apple's clang) the serial ones.
LADDER = (FLAGS, PORTABLE, SERIAL)
TIMEOUT = 120.0                 # seconds a build may take (a few are usual)


class BuildError(RuntimeError):
    """The library could not be built: no compiler, or the compiler failed."""


def cpu_features() -> str:
    """The CPU's feature flags (the first processor's line of /proc/cpuinfo), else its name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def compiler_version(cc: list[str]) -> str:
    """The first line of `cc --version`; BuildError when there is no such compiler."""
    try:
        done = subprocess.run([*cc, "--version"], capture_output=True, text=True,
                              timeout=TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BuildError(f"no C compiler {shlex.join(cc)!r}: {e}") from e
    if done.returncode != 0:
        raise BuildError(f"C compiler {shlex.join(cc)!r} failed: {done.stderr.strip()[:200]}")
    return (done.stdout.splitlines() or [""])[0]


def cache_key(cc: list[str], version: str, flags: tuple[str, ...]) -> str:
    h = hashlib.blake2b(digest_size=12)
    for part in (*(s.read_bytes() for s in SOURCES), *(h.read_bytes() for h in HEADERS),
                 shlex.join(cc).encode(), version.encode(),
                 " ".join(flags).encode(), cpu_features().encode()):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


def library(cc_command: str, cache: Path, flags: tuple[str, ...] = FLAGS) -> Path:
    """The built library for this machine: from the cache, or compiled into it now."""
    cc = shlex.split(cc_command)
    if not cc:
        raise BuildError("no C compiler: CC is empty")
    path = cache / f"matmul-{cache_key(cc, compiler_version(cc), flags)}.so"
    if path.exists():
        return path
    try:
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp", dir=cache)
    except OSError as e:
        raise BuildError(f"cannot write the kernel cache {cache}: {e}") from e
    os.close(fd)
    try:
        done = subprocess.run([*cc, *flags, "-o", tmp, *map(str, SOURCES), "-lm"],
                              capture_output=True, text=True, timeout=TIMEOUT, check=False)
        if done.returncode != 0:
            raise BuildError(f"{shlex.join(cc)} could not build {SOURCE.name}: "
                             f"{done.stderr.strip()[-500:]}")
        os.replace(tmp, path)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BuildError(f"building {SOURCE.name} with {shlex.join(cc)} failed: {e}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def first_library(cc_command: str, cache: Path,
                  ladder: tuple[tuple[str, ...], ...] = LADDER) -> tuple[Path, tuple[str, ...]]:
    """The first of the ladder's builds that succeeds, and its flags; BuildError naming the
    first failure when none does (no compiler at all fails at once)."""
    errors: list[BuildError] = []
    for flags in ladder:
        try:
            return library(cc_command, cache, flags), flags
        except BuildError as e:
            if not shlex.split(cc_command) or str(e).startswith("no C compiler"):
                raise
            errors.append(e)
    raise errors[0]
