"""The model store: a folder whose subfolders are models in Hugging Face layout."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from edgeserve.blocks.pack import TASK_FILE
from edgeserve.gguf import entries as gguf_entries
from edgeserve.quant.cache import cached_schemes
from edgeserve.quant.format import SCHEMES

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+-]{0,127}$")


def valid_id(model_id: str) -> bool:
    return isinstance(model_id, str) and bool(_ID_RE.match(model_id)) and ".." not in model_id


def split_tag(model_id: str) -> tuple[str, str | None]:
    """'NAME:int8' -> ('NAME', 'int8'); an id without a known tag -> (id, None)."""
    name, sep, tag = model_id.rpartition(":")
    return (name, tag) if sep and name and tag in SCHEMES else (model_id, None)


class UnknownModel(LookupError):
    def __init__(self, model_id: str, store: Path) -> None:
        self.model_id = model_id
        super().__init__(f"model '{model_id}' is not in the store {store}")


@dataclass(frozen=True, slots=True)
class StoredModel:
    id: str
    path: Path
    created: int            # folder modification time, seconds
    parent: str | None      # the base model of a derived model, else None
    size_bytes: int
    tag: str | None = None  # int8 / int4: a quantized variant of the model at `path`


class ModelStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, model_id: str) -> Path:
        """The folder of model_id; UnknownModel unless it is a model folder inside the store.
        A tagged id ('NAME:int8') names the folder of NAME."""
        if not valid_id(model_id):
            raise UnknownModel(str(model_id), self.root)
        root = self.root.resolve()
        name, tag = split_tag(model_id)
        path = (root / name).resolve()
        # resolve() follows symlinks: a link that leads out of the store is refused.
        if path.parent != root or not ((path / "config.json").is_file()
                                       or (path / TASK_FILE).is_file()):
            if gguf_entries.find(root, name) is not None:      # made by prepare()
                return gguf_entries.folder(root, name, dequantize=tag is not None)
            raise UnknownModel(model_id, self.root)
        return path

    def prepare(self, model_id: str) -> Path:
        """path(), after converting a GGUF model into its folder if needed (slow the first
        time: call it off the event loop)."""
        path = self.path(model_id)
        name, tag = split_tag(model_id)
        gguf = None if path.parent == self.root.resolve() else gguf_entries.find(self.root, name)
        if gguf is None:
            return path
        return gguf_entries.prepare(self.root, name, gguf, dequantize=tag is not None)

    def list(self) -> list[StoredModel]:
        if not self.root.is_dir():
            return []
        models = []
        for child in sorted(self.root.iterdir()):
            gguf_name = gguf_entries.model_name(child)
            if gguf_name is not None:
                source = gguf_entries.find(self.root, gguf_name)
                if source is not None:
                    models.append(StoredModel(gguf_name, self.path(gguf_name),
                                              int(source.stat().st_mtime), None,
                                              source.stat().st_size))
                    float32 = gguf_entries.folder(self.root, gguf_name, dequantize=True)
                    models += _variants(self.root, gguf_name, float32)
                continue
            try:
                path = self.path(child.name)
            except UnknownModel:
                continue
            models.append(StoredModel(child.name, path, int(path.stat().st_mtime),
                                      _parent(path), _size(path)))
            models += _variants(self.root, child.name, path)
        return models


def _variants(root: Path, name: str, path: Path) -> list[StoredModel]:
    """Quantized variants once they exist in the store (made by their first load)."""
    return [StoredModel(f"{name}:{scheme}", path, int(folder.stat().st_mtime), name,
                        _size(folder), scheme)
            for scheme, folder in cached_schemes(root, path).items()]


def _parent(path: Path) -> str | None:
    if (path / TASK_FILE).is_file():
        try:
            return str(json.loads((path / TASK_FILE).read_text())["base"])
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            return None
    try:
        meta = json.loads((path / "edgeserve.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    parent = meta.get("parent") if isinstance(meta, dict) else None
    return parent if isinstance(parent, str) else None


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors") if f.is_file())
