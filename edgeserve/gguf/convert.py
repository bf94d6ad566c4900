"""A GGUF file -> a Hugging Face model folder that edgeserve loads like any other.

The folder (config.json, generation_config.json, tokenizer.json, tokenizer_config.json,
model.safetensors, quant.json, gguf.json) follows the pre-quantized checkpoint layout of
quant/format.py: linear weights stored as Q8_0 become int8 and Q4_0 / Q4_1 become int4,
exactly; Q4_K becomes int4 with its scales rounded to float16 and Q5_K / Q6_K int8
re-quantized in groups of 32 (gguf.json records the error either adds); float ones stay
float. Every other tensor (embeddings, norms, biases) is
dequantized to float32 or kept in its float dtype. With `dequantize=True` every tensor is
float, which makes a plain checkpoint (a reference for comparisons and benchmarks).

A folder is written once per version of its file (size and modification time) into a
temporary folder renamed into place, so readers never see half a conversion.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from edgeserve.gguf import blocks
from edgeserve.gguf.config import architecture, hf_config
from edgeserve.gguf.names import (
    DERIVED,
    fused_group,
    heads_of,
    hf_names,
    is_linear,
    unpermute,
)
from edgeserve.gguf.reader import FLOAT_TYPES, SUPPORTED_TYPES, GGUFError, GGUFFile, GGUFTensor
from edgeserve.gguf.vocab import build_tokenizer, end_of_generation_ids, tokenizer_config
from edgeserve.quant.format import QUANT_FILE, QuantInfo, pack_int4, quantize
from edgeserve.quant.format import dequantize as dequantize_scheme

log = logging.getLogger(__name__)
FORMAT = 2                # of the converted folder: 2 = quant/format.py's format 2
REPORT_FILE = "gguf.json"
_lock = threading.Lock()


@dataclass
class Conversion:
    """What became of each GGUF tensor type: scheme and, where re-quantized, the error."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    schemes: dict[str, str] = field(default_factory=dict)       # HF weight name -> int4/int8
    types: dict[str, dict[str, Any]] = field(default_factory=dict)

    def note(self, gguf_type: str, became: str, error: float | None = None) -> None:
        entry = self.types.setdefault(gguf_type, {"tensors": 0, "became": {}})
        entry["tensors"] += 1
        entry["became"][became] = entry["became"].get(became, 0) + 1
        if error is not None:
            entry["max_relative_error"] = max(entry.get("max_relative_error", 0.0), error)


def _own_scheme(t: GGUFTensor, dequantize: bool) -> str | None:
    """The scheme a tensor maps onto by itself (None: float)."""
    if dequantize or not is_linear(t.name) or t.type in FLOAT_TYPES:
        return None
    return "int4" if t.type in blocks.INT4_TYPES else "int8"


def plan_schemes(f: GGUFFile, dequantize: bool = False) -> dict[str, str | None]:
    """GGUF tensor name -> the scheme it is stored in: its own, unless the tensors fused
    with it (q/k/v, gate/up) differ; then int8 for all (int4 and float parts re-quantized),
    as one unit holds one scheme."""
    own = {t.name: _own_scheme(t, dequantize)
           for t in f.tensors.values() if t.name not in DERIVED}
    groups: dict[str, set[str | None]] = {}
    for gname, scheme in own.items():
        groups.setdefault(fused_group(gname), set()).add(scheme)
    return {g: s if len(groups[fused_group(g)]) == 1 else "int8" for g, s in own.items()}


def tensor_names(f: GGUFFile) -> dict[str, list[str]]:
    """GGUF tensor -> its Hugging Face names; GGUFError naming the first tensor of an
    unsupported type or an unknown name."""
    hf_arch, _ = architecture(f)
    experts = int(f.arch("expert_count", 0) or 0)
    out = {}
    for t in f.tensors.values():
        if t.type not in SUPPORTED_TYPES:
            raise GGUFError(f"{f.path}: tensor '{t.name}' has type {t.type}, which is not "
                            f"supported (supported: {', '.join(SUPPORTED_TYPES)})")
        if t.name in DERIVED:
            continue
        names = hf_names(t.name, hf_arch, experts)
        if names is None:
            raise GGUFError(f"{f.path}: tensor '{t.name}' is not one this project knows")
        out[t.name] = names
    return out


def convert_tensors(f: GGUFFile, dequantize: bool = False) -> Conversion:
    """Every tensor of the file under its Hugging Face name, in edgeserve's layouts."""
    _, permuted = architecture(f)
    heads = int(f.arch("attention.head_count"))
    kv_heads = int(f.arch("attention.head_count_kv", heads))
    names = tensor_names(f)
    out = Conversion()
    for gname, scheme in plan_schemes(f, dequantize).items():
        n = heads_of(names[gname][0], heads, kv_heads) if permuted else None
        fix = (lambda x, n=n: unpermute(x, n)) if n is not None else (lambda x: x)
        _convert_one(out, f.tensors[gname], names[gname], fix, scheme)
    return out


def _convert_one(out: Conversion, t: GGUFTensor, names: list[str],
                 fix: Callable[[torch.Tensor], torch.Tensor], scheme: str | None) -> None:
    """Store t under names: one name, or one per expert of a stacked (E, rows, cols) t."""
    values: dict[str, torch.Tensor]
    if scheme is None:
        float_value = blocks.float_values(t) if t.type in FLOAT_TYPES else blocks.dequantize(t)
        if names[0].endswith("shared_expert_gate.weight"):
            float_value = float_value.reshape(1, -1)    # llama.cpp keeps it as a vector
        values = {"": fix(float_value)}
        out.note(t.type, str(float_value.dtype).removeprefix("torch."))
    else:
        values, error = _quantized(t, fix, scheme)
        out.note(t.type, scheme, error)
    for e, name in enumerate(names):
        if scheme is not None:
            out.schemes[name] = scheme
        for suffix, value in values.items():
            if len(names) > 1:                # rows of expert e
                value = value.reshape(len(names), -1, value.shape[-1])[e]
            out.tensors[name + suffix] = value.contiguous()


def _quantized(t: GGUFTensor, fix: Callable[[torch.Tensor], torch.Tensor], scheme: str
               ) -> tuple[dict[str, torch.Tensor], float | None]:
    """t's components in scheme, and the relative error (Frobenius) they add to its values;
    None where they are its own, bit for bit (Q8_0 as int8, Q4_0 and Q4_1 as int4)."""
    exact = t.type in blocks.EXACT_TYPES and (scheme == "int8") == (t.type == "Q8_0")
    w = None
    if exact or (scheme == "int4" and t.type in blocks.INT4_TYPES):
        q = blocks.int8(t) if scheme == "int8" else blocks.int4(t)
        codes = fix(q.codes)
        values = {".qweight": codes if scheme == "int8" else pack_int4(codes),
                  ".scale": fix(q.scale), ".min": fix(q.min)}
    else:
        w = fix(blocks.dequantize(t).reshape(-1, t.shape[-1]))
        values = {f".{k}": v for k, v in quantize(scheme, w).items()}
    if exact:
        return values, None
    if w is None:                       # re-chosen codes (Q4_K): the values they stand for
        w = fix(blocks.dequantize(t).reshape(-1, t.shape[-1]))
    back = dequantize_scheme(scheme, {k[1:]: v for k, v in values.items()})
    return values, float((back - w).norm() / w.norm().clamp_min(1e-30))


def _stamp(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"source": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "format": FORMAT}


def is_current(folder: Path, gguf: Path, dequantize: bool) -> bool:
    try:
        report = json.loads((folder / REPORT_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(report, dict) and report.get("stamp") == _stamp(gguf) \
        and report.get("dequantized") == dequantize


def ensure_folder(gguf: Path, folder: Path, dequantize: bool = False) -> Path:
    """folder holding the conversion of gguf, converting it first unless current."""
    with _lock:
        if is_current(folder, gguf, dequantize):
            return folder
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            write_folder(GGUFFile(gguf), tmp, dequantize)
            tmp.chmod(0o755)                  # mkdtemp made it private
            if folder.exists():
                shutil.rmtree(folder)
            tmp.rename(folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return folder


def write_folder(f: GGUFFile, folder: Path, dequantize: bool = False) -> dict[str, Any]:
    """Write the Hugging Face folder of f into folder; returns gguf.json's content."""
    tensor_names(f)                   # refuses unsupported tensors before any work
    config = hf_config(f)
    tokenizer = build_tokenizer(f)
    conversion = convert_tensors(f, dequantize)
    save_file(conversion.tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    _json(folder / "config.json", config)
    _json(folder / "generation_config.json", {"eos_token_id": end_of_generation_ids(f),
                                              **({"bos_token_id": config["bos_token_id"]}
                                                 if "bos_token_id" in config else {})})
    tokenizer.save(str(folder / "tokenizer.json"))
    _json(folder / "tokenizer_config.json", tokenizer_config(f))
    source = f"{f.path.name}: " + ", ".join(_describe(k, v) for k, v in conversion.types.items())
    if conversion.schemes:
        kinds = set(conversion.schemes.values())
        info = QuantInfo(kinds.pop() if len(kinds) == 1 else "mixed", conversion.schemes, source)
        (folder / QUANT_FILE).write_text(info.to_json() + "\n")
    report = {"stamp": _stamp(f.path), "dequantized": dequantize, "types": conversion.types,
              "summary": source}
    _json(folder / REPORT_FILE, report)
    log.info("converted %s", source)
    return report


def _describe(gguf_type: str, entry: dict[str, Any]) -> str:
    text = f"{gguf_type} x{entry['tensors']} -> {'/'.join(sorted(entry['became']))}"
    if "max_relative_error" in entry:
        text += f" (re-quantized, relative error <= {entry['max_relative_error']:.2%})"
    elif set(entry["became"]) & {"int8", "int4"}:
        text += " (exact)"
    return text


def summary(folder: Path) -> str:
    """What the conversion in folder made of each GGUF tensor type; "" for other folders."""
    try:
        report = json.loads((folder / REPORT_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return ""
    return str(report.get("summary", "")) if isinstance(report, dict) else ""


def _json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
