"""Task packs over a quantized base: the blocks stay in the compute dtype and replace the
base's dequantized values, so a task equals its base's int4 weights with its blocks in."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from blocks.conftest import BLOCK
from blocks.finetunes import make_finetune, reconstruct, save_weights
from blocks.test_tasks import logits_of, rel_err, server
from hf_models import make_model, reference
from safetensors.torch import load_file

from edgeserve.blocks.build import pack_tasks
from edgeserve.quant.format import dequantize


def dequantized_copy(folder: Path, config_from: Path, out: Path) -> Path:
    """The float checkpoint a quantized folder stands for."""
    shutil.copytree(config_from, out, ignore=shutil.ignore_patterns("*.safetensors"))
    info = json.loads((folder / "quant.json").read_text())
    stored = load_file(folder / "model.safetensors")
    tensors = {n: t for n, t in stored.items() if n.rsplit(".", 1)[0] not in info["tensors"]}
    for name, scheme in info["tensors"].items():
        parts = {k: stored[f"{name}.{k}"] for k in ("qweight", "scale", "min")
                 if f"{name}.{k}" in stored}
        tensors[name] = dequantize(scheme, parts)
    return save_weights(out, tensors)


async def test_task_over_an_int4_base(tmp_path: Path) -> None:
    store = tmp_path / "store"
    base = make_model("llama", store / "base", seed=3, intermediate_size=128)  # int4 linears
    tuned = make_finetune(base, tmp_path / "task-q", 21)
    pack_tasks(store / "base", [tuned], store, block=BLOCK, budget=0.3)
    ids = torch.randint(0, 320, (19,), generator=torch.Generator().manual_seed(5)).tolist()
    async with server(store) as es:
        report = await es.load("task-q:int4")
        assert report.scheme == "mixed"           # int4 linears, int8 embeddings and head
        schemes = es.models["task-q:int4"].schemes
        assert {s for n, s in schemes.items() if "layers" in n} == {"int4"}
        got = await logits_of(es, "task-q:int4", ids)
        await es.load("base:int4")
        plain = await logits_of(es, "base:int4", ids)
        for pool in es.pools.values():
            pool.check_integrity()
        folder = Path(report.source)
        shared = es.models["task-q:int4"].units["model.layers.0.mlp.down_proj.weight"]
        assert shared is es.models["base:int4"].units["model.layers.0.mlp.down_proj.weight"]
    deq = dequantized_copy(folder, store / "base", tmp_path / "deq")
    ref = reference(reconstruct(deq, store / "task-q", tmp_path / "ref"))
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0]
    # The same stored values multiplied in float on both sides: float32 rounding only.
    assert rel_err(got, expected) < 1e-4
    assert rel_err(plain, expected) > 0.1                               # the blocks do count
