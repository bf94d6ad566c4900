"""A GGUF file opened with the `gguf` package: metadata and tensors, with clean errors.

The reader maps the file (no copy); a tensor's `data` is a numpy view of its bytes. Every
way the file can be unreadable (bad magic, unknown tensor type, truncated data) becomes a
GGUFError naming the file and the cause.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, ReaderTensor

from edgeserve.arch.spec import ModelFormatError

# Tensor types this project reads; anything else is refused by name.
FLOAT_TYPES = ("F32", "F16", "BF16")
QUANT_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")
SUPPORTED_TYPES = FLOAT_TYPES + QUANT_TYPES


class GGUFError(ModelFormatError):
    """A GGUF file that cannot be served; the message names the file and the cause."""


@dataclass(frozen=True, slots=True)
class GGUFTensor:
    name: str
    type: str                    # GGML type name: "F32", "Q4_1", ...
    shape: tuple[int, ...]       # torch order: (rows, cols) for a matrix, (E, rows, cols)
    data: np.ndarray             # the raw bytes or values, as the gguf package reads them


_UNKNOWN_TYPE = re.compile(r"(\d+)\)? is not a valid GGMLQuantizationType")


class GGUFFile:
    """One GGUF file: `metadata` (key -> Python value) and `tensors` (name -> GGUFTensor)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            reader = GGUFReader(self.path, "r")
        except ValueError as e:
            raise GGUFError(f"{self.path}: {_explain(e)}") from e
        except (OSError, KeyError, IndexError, TypeError) as e:
            raise GGUFError(f"{self.path}: not a readable GGUF file ({e})") from e
        self.metadata: dict[str, Any] = {}
        for key, field in reader.fields.items():
            if key.startswith("GGUF."):
                continue
            self.metadata[key] = _value(field)
        try:
            self.tensors = {t.name: _tensor(t) for t in reader.tensors}
        except GGUFError as e:
            raise GGUFError(f"{self.path}: {e}") from e

    @property
    def architecture(self) -> str:
        return str(self.get("general.architecture"))

    def get(self, key: str, default: Any = ...) -> Any:
        """A metadata value; GGUFError naming the key when it is missing and no default."""
        if key in self.metadata:
            return self.metadata[key]
        if default is ...:
            raise GGUFError(f"{self.path}: metadata key '{key}' is missing")
        return default

    def arch(self, key: str, default: Any = ...) -> Any:
        """A metadata value under the architecture's prefix ("llama.block_count", ...)."""
        return self.get(f"{self.architecture}.{key}", default)


def _explain(e: ValueError) -> str:
    text = str(e)
    unknown = _UNKNOWN_TYPE.search(text)
    if unknown:
        return (f"tensor type {unknown.group(1)} is unknown (supported: "
                f"{', '.join(SUPPORTED_TYPES)})")
    if "reshape" in text or "buffer" in text or "out of bounds" in text:
        return f"truncated: the file ends before its tensor data does ({text})"
    return f"not a readable GGUF file ({text})"


def _value(field: Any) -> Any:
    """The Python value of a metadata field (strings decoded, arrays as lists)."""
    kind = field.types[0] if field.types else None
    if kind == GGUFValueType.ARRAY:
        inner = field.types[-1]
        if inner == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="replace")
                    for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    if kind == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    value = field.parts[field.data[0]].tolist()
    return value[0] if isinstance(value, list) and len(value) == 1 else value


def _tensor(t: ReaderTensor) -> GGUFTensor:
    kind = GGMLQuantizationType(t.tensor_type)
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    expected = int(t.n_bytes)
    if t.data.nbytes != expected:
        raise GGUFError(f"tensor '{t.name}': truncated ({t.data.nbytes} of {expected} bytes)")
    return GGUFTensor(t.name, kind.name, shape, t.data)
