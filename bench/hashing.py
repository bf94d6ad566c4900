"""Tensor hashing throughput: blake2b (the hash before) against blake3, one thread and many.

Hashes the same 256 MiB of random bytes in memory (no disk) with each, medians of
`--repeats`. Prints one JSON line of GB/s and the ratio to blake2b.

    .venv/bin/python bench/hashing.py [--mib 256] [--repeats 5]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import time
from collections.abc import Callable

import blake3


def rate(fn: Callable[[memoryview], object], data: memoryview, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(data)
        times.append(time.perf_counter() - start)
    return len(data) / statistics.median(times) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    data = memoryview(os.urandom(args.mib << 20))
    gb_s = {
        "blake2b": rate(lambda d: hashlib.blake2b(d, digest_size=16).hexdigest(), data,
                        args.repeats),
        "blake3": rate(lambda d: blake3.blake3(d).hexdigest(), data, args.repeats),
        "blake3_all_cores": rate(
            lambda d: blake3.blake3(d, max_threads=blake3.blake3.AUTO).hexdigest(), data,
            args.repeats)}
    print(json.dumps({"bench": "hashing", "cores": os.cpu_count(),
                      **{k: round(v, 2) for k, v in gb_s.items()},
                      "blake3_vs_blake2b": round(gb_s["blake3"] / gb_s["blake2b"], 2)}))


if __name__ == "__main__":
    main()
