"""GGUF files in the model store: `NAME.gguf`, or a folder `NAME/` holding one `.gguf`.

Either is the model NAME. Its Hugging Face folder is made on its first load into the
store's cache, `models/.edgeserve/gguf/NAME/`, and remade when the file changes.
"""

from __future__ import annotations

from pathlib import Path

from edgeserve.gguf.convert import ensure_folder

SUFFIX = ".gguf"


def cache_root(store: Path) -> Path:
    return store / ".edgeserve" / "gguf"


def find(store: Path, name: str) -> Path | None:
    """The GGUF file that is model `name` in the store, if any (links leading out refused)."""
    root = store.resolve()
    candidates = [root / f"{name}{SUFFIX}"]
    folder = root / name
    if folder.is_dir() and not (folder / "config.json").is_file():
        inside = sorted(folder.glob(f"*{SUFFIX}"))
        if len(inside) == 1:
            candidates.append(inside[0])
    for path in candidates:
        real = path.resolve()
        if path.is_file() and root in real.parents:
            return real
    return None


def model_name(entry: Path) -> str | None:
    """The model id an entry of the store stands for, when it is a GGUF entry."""
    if entry.is_file() and entry.suffix == SUFFIX:
        return entry.stem
    if entry.is_dir() and find(entry.parent, entry.name) is not None:
        return entry.name
    return None


def folder(store: Path, name: str, dequantize: bool = False) -> Path:
    """Where model `name`'s converted folder lives (made or not). The dequantized one (all
    float32) is the source that tagged ids (`NAME:int8`) are quantized from."""
    return cache_root(store.resolve()) / (f"{name}.f32" if dequantize else name)


def prepare(store: Path, name: str, gguf: Path, dequantize: bool = False) -> Path:
    """The converted folder of `gguf`, converting it first unless current."""
    return ensure_folder(gguf, folder(store, name, dequantize), dequantize)
