"""Sharing granularity: bytes stored for the multimodel fine-tunes, per tensor vs per group.

Units are tensor groups (q/k/v fused, gate/up fused): one matmul each instead of three or
two, which decode speed needs. The cost is sharing: a fine-tune that changes q_proj alone
also stores its own k and v. This prints both totals for the six models of
bench/multimodel.py (run that first to make them).

    .venv/bin/python bench/granularity.py
"""

from __future__ import annotations

import json
from pathlib import Path

from edgeserve.arch import weight_plan
from edgeserve.checkpoint import hash_file, read_header
from edgeserve.loader import read_spec

STORE = Path(__file__).parent / "out" / "multimodel-store-lora"


def main() -> None:
    per_tensor: dict[str, int] = {}
    per_group: dict[tuple[str, ...], int] = {}
    total = 0
    for model in sorted(p for p in STORE.iterdir() if (p / "config.json").is_file()):
        file = model / "model.safetensors"
        hashes = hash_file(file)
        sizes = {t.name: t.nbytes for t in read_header(file)}
        total += sum(sizes.values())
        per_tensor |= {hashes[n]: sizes[n] for n in sizes}
        for unit in weight_plan(read_spec(model)).values():
            key = tuple(hashes[p] for p in unit.parts)
            per_group[key] = sum(sizes[p] for p in unit.parts)
    print(json.dumps({"bench": "granularity", "models_gb": round(total / 1e9, 3),
                      "stored_per_tensor_gb": round(sum(per_tensor.values()) / 1e9, 3),
                      "stored_per_group_gb": round(sum(per_group.values()) / 1e9, 3),
                      "group_overhead": round(sum(per_group.values())
                                              / sum(per_tensor.values()), 3)}))


if __name__ == "__main__":
    main()
