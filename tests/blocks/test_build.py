"""`edgeserve tasks pack`: what a pack holds, its reported error, alignment, LoRA input."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from blocks.conftest import BLOCK
from blocks.finetunes import LINEARS, common_change, make_finetune, reconstruct
from edgeserve.arch.spec import ModelFormatError
from edgeserve.blocks.build import pack_tasks
from edgeserve.blocks.pack import TaskPack
from edgeserve.cli import main


def linears(path) -> dict[str, torch.Tensor]:
    """The weights packed as blocks: the layers' linears, the head and the embeddings."""
    return {k: v for k, v in load_file(str(path / "model.safetensors")).items()
            if v.dim() == 2 and (k in ("lm_head.weight", "model.embed_tokens.weight")
                                 or any(f".{n}." in k for n in LINEARS))}


def merged_lora(base, adapter) -> dict[str, torch.Tensor]:
    """LoRA merged by hand: W + alpha / r * B @ A."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    out = linears(base)
    for name in out:
        a = lora.get(f"base_model.model.{name.removesuffix('.weight')}.lora_A.weight")
        if a is not None:
            b = lora[f"base_model.model.{name.removesuffix('.weight')}.lora_B.weight"]
            out[name] = out[name] + cfg["lora_alpha"] / cfg["r"] * (b @ a)
    return out


def test_full_budget_packs_are_exact(store, finetunes, tmp_path):
    base, fts = finetunes
    reports = pack_tasks(store / "base", list(fts.values()), store, block=BLOCK, budget=1.0)
    assert [r.task for r in reports] == list(fts)
    for r in reports:
        assert r.change_error == 0 and r.weight_error == 0 and not r.unpacked
        rebuilt = linears(reconstruct(base, store / r.task, tmp_path / r.task))
        expected = merged_lora(base, fts[r.task]) if r.task == "task-c" else linears(fts[r.task])
        for name, w in expected.items():
            assert torch.allclose(rebuilt[name], w, rtol=0, atol=1e-6), name
    assert 0 < reports[0].zero_blocks <= 2 * 7 * 2          # 2 pruned per linear weight
    assert reports[1].zero_blocks == 0


@pytest.mark.parametrize("aligned", [True, False])
def test_reported_error_is_the_reconstruction_error(store, finetunes, tmp_path, aligned):
    base, fts = finetunes
    reports = pack_tasks(store / "base", [fts["task-a"], fts["task-b"]], store, block=BLOCK,
                         budget=0.1, aligned=aligned)
    w0 = linears(base)
    for r in reports:
        pack = TaskPack.read(store / r.task)
        total = sum(math.prod(w.shape) for w in w0.values()) // (BLOCK[0] * BLOCK[1])
        assert pack.num_blocks == round(0.1 * total)           # the budget, to the block
        rebuilt, target = linears(reconstruct(base, store / r.task, tmp_path / r.task)), \
            linears(fts[r.task])
        lost = sum(float((rebuilt[n].double() - target[n].double()).pow(2).sum()) for n in w0)
        change = sum(float((target[n].double() - w0[n].double()).pow(2).sum()) for n in w0)
        assert 0 < r.change_error < 1
        assert r.change_error == pytest.approx(math.sqrt(lost / change), rel=1e-6)


def test_alignment_shares_blocks_that_tasks_changed_alike(store, finetunes, tmp_path):
    base, _ = finetunes
    common = common_change(base, 21, fraction=0.15, scale=0.1)
    # A little noise everywhere: no two tasks' blocks are equal, only alike.
    fts = [make_finetune(base, tmp_path / f"t{i}", 30 + i, fraction=0.1, scale=0.05,
                         common=common, noise=1e-4) for i in range(4)]
    kept = {}
    for aligned, prefix in ((True, "al"), (False, "un")):
        names = [f"{prefix}{i}" for i in range(4)]
        reports = pack_tasks(store / "base", fts, store, block=BLOCK, budget=0.1,
                             aligned=aligned, names=names)
        packs = [TaskPack.read(store / n) for n in names]
        kept[prefix] = (set().union(*(p.keys for p in packs)), reports)
    union_aligned, aligned_reports = kept["al"]
    union_free, free_reports = kept["un"]
    assert len(union_aligned) < 0.6 * len(union_free)
    assert all(r.shared_blocks > 0 for r in aligned_reports)
    for a, f in zip(aligned_reports, free_reports, strict=True):
        assert a.change_error < 1.5 * f.change_error


def test_errors_are_clear(store, finetunes, tmp_path):
    _, fts = finetunes
    with pytest.raises(ModelFormatError, match="tiles none"):
        pack_tasks(store / "base", [fts["task-a"]], store, block=(48, 48))
    # 16x32 does not tile down_proj (64x112): it stays the base's, and the change is reported
    (report,) = pack_tasks(store / "base", [fts["task-a"]], store, block=(16, 32), budget=1.0)
    assert sorted(report.unpacked) == [f"model.layers.{n}.mlp.down_proj.weight" for n in (0, 1)]
    with pytest.raises(ValueError, match="cannot be a task id"):
        pack_tasks(store / "base", [fts["task-a"]], store, block=BLOCK, names=["base"])
    from hf_models import make_model

    other = make_model("llama", tmp_path / "other", seed=1, hidden_size=32)
    with pytest.raises(ModelFormatError, match="not a fine-tune of this base"):
        pack_tasks(store / "base", [other], store, block=BLOCK)
    shutil.copytree(fts["task-a"], store / "taken")
    with pytest.raises(FileExistsError, match="is a model"):
        pack_tasks(store / "base", [fts["task-a"]], store, block=BLOCK, names=["taken"])


def test_changed_norms_are_packed_whole(store, finetunes, tmp_path):
    _, fts = finetunes
    from safetensors.torch import save_file

    ft = tmp_path / "normed"
    shutil.copytree(fts["task-b"], ft)
    tensors = load_file(str(ft / "model.safetensors"))
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 1.5
    save_file(tensors, str(ft / "model.safetensors"), metadata={"format": "pt"})
    (report,) = pack_tasks(store / "base", [ft], store, block=BLOCK, budget=0.1)
    assert report.unpacked == {}
    pack = TaskPack.read(store / "normed")
    assert list(pack.vectors) == ["model.norm.weight"]
    rebuilt = load_file(str(reconstruct(store / "base", store / "normed", tmp_path / "r")
                            / "model.safetensors"))
    assert torch.equal(rebuilt["model.norm.weight"], tensors["model.norm.weight"])


def test_command_line(store, finetunes, capsys):
    _, fts = finetunes
    rc = main(["tasks", "pack", "base", str(fts["task-a"]), str(fts["task-c"]), "--models",
               str(store), "--block", "16", "--budget", "10%", "--name", "one",
               "--name", "two"])
    out = capsys.readouterr().out
    assert rc == 0 and "one" in out and "two" in out and "change err" in out
    assert TaskPack.read(store / "two").base == "base"
    rc = main(["tasks", "pack", "base", str(fts["task-a"]), "--models", str(store),
               "--name", "x", "--name", "y"])
    assert rc == 1 and "--name given 2 times" in capsys.readouterr().err
    rc = main(["tasks", "pack", "nope", str(fts["task-a"]), "--models", str(store)])
    assert rc == 1 and "not a model of the store" in capsys.readouterr().err
