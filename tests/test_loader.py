"""Hugging Face folder -> weight units: dtypes, shards, and clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from hf_models import make_model
from safetensors.torch import load_file

from edgeserve.arch import weight_plan
from edgeserve.arch.spec import ModelFormatError
from edgeserve.checkpoint import HashCache
from edgeserve.loader import LoadContext, LoadReport, read_spec, weight_views
from edgeserve.model import ResidentModel
from edgeserve.pool import BlockPool


def load_into(pool, path, dtype=torch.float32, report=None):
    ctx = LoadContext(pool, dtype, HashCache(path.parent))
    return ResidentModel.load("m", path, ctx, report or LoadReport("m", "cpu"))


def load(path, dtype=torch.float32):
    """The pool, and a view per checkpoint tensor (rows of its fused unit), and the report."""
    pool = BlockPool("cpu", 32 << 20, 4096)
    spec = read_spec(path)
    report = LoadReport("m", "cpu")
    model = load_into(pool, path, dtype, report)
    views = weight_views(pool, model.units, spec, dtype)
    parts = {}
    for name, unit in weight_plan(spec).items():
        for part, first, rows in unit.slices():
            parts[part] = views[name][first:first + rows]
    return pool, parts, report


@pytest.mark.parametrize("ckpt_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16])
def test_checkpoint_dtypes_convert_exactly(tmp_path, ckpt_dtype, compute):
    path = make_model("llama", tmp_path / "m", dtype=ckpt_dtype)
    pool, views, report = load(path, compute)
    tensors = load_file(path / "model.safetensors")
    assert set(views) == set(tensors)
    for name, tensor in tensors.items():
        assert views[name].dtype == compute
        assert torch.equal(views[name], tensor.to(compute)), name
    assert report.bytes_total == report.bytes_from_disk == sum(
        t.numel() * compute.itemsize for t in tensors.values())
    pool.check_integrity()


def test_sharded_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    path = make_model("qwen2", tmp_path / "one")
    AutoModelForCausalLM.from_pretrained(path).save_pretrained(tmp_path / "sharded",
                                                               max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    _, single, _ = load(path)
    _, sharded, _ = load(tmp_path / "sharded")
    assert single.keys() == sharded.keys()
    assert all(torch.equal(single[k], sharded[k]) for k in single)


def test_generation_config_eos(tmp_path):
    path = make_model("llama", tmp_path / "m")
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 7]}))
    assert read_spec(path).eos_token_ids == (5, 7)


def broken(tmp_path, name):
    path = make_model("llama", tmp_path / name)
    return path, path / "model.safetensors"


def test_missing_tensor_is_named(tmp_path):
    from safetensors.torch import save_file

    path, file = broken(tmp_path, "m")
    tensors = load_file(file)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, file)
    with pytest.raises(ModelFormatError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load(path)


def test_wrong_shape_is_named(tmp_path):
    path, _ = broken(tmp_path, "m")
    config = json.loads((path / "config.json").read_text())
    config["intermediate_size"] = 100
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFormatError, match=r"gate_proj\.weight' has shape"):
        load(path)


def test_truncated_file_fails_cleanly_and_frees_memory(tmp_path):
    path, file = broken(tmp_path, "m")
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    pool = BlockPool("cpu", 32 << 20, 4096)
    with pytest.raises(ModelFormatError, match=r"model\.safetensors"):
        load_into(pool, path)
    assert pool.free_bytes == pool.total_bytes
    pool.check_integrity()


def test_missing_weights_file(tmp_path):
    path, file = broken(tmp_path, "m")
    file.unlink()
    with pytest.raises(ModelFormatError, match=r"no model\.safetensors"):
        load(path)
    shutil.rmtree(path)


def test_reader_threads_follow_the_cores(monkeypatch):
    import os

    from edgeserve.config import TierConfig
    from edgeserve.tiers import DiskLoader

    for cores, readers in ((1, 1), (2, 2), (3, 3), (16, 4)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda _, n=cores: set(range(n)),
                            raising=False)
        assert DiskLoader().readers == readers
    assert DiskLoader(readers=6).readers == 6
    with pytest.raises(ValueError, match="readers"):
        TierConfig(readers=0)
