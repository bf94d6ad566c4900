"""The task pack format: parse, write, read back, refuse what is malformed."""

from __future__ import annotations

import json

import pytest
import torch

from edgeserve.arch.spec import ModelFormatError
from edgeserve.blocks.pack import PackedWeight, TaskPack, block_key, is_task_dir, parse_block


def test_parse_block():
    assert parse_block("64") == (64, 64)
    assert parse_block("32x64") == (32, 64)
    assert parse_block(16) == (16, 16)
    for bad in ("0", "x", "8x8x8", "-4", "a"):
        with pytest.raises(ValueError):
            parse_block(bad)


def test_block_key_is_content():
    a = torch.arange(16.0).view(4, 4)
    assert block_key(a) == block_key(a.clone())
    assert block_key(a) != block_key(a + 1)
    assert block_key(a) != block_key(a.to(torch.bfloat16))


def test_round_trip(tmp_path):
    tile = torch.ones(4, 4)
    key = block_key(tile)
    pack = TaskPack("t", "base", (4, 4), "float32",
                    {"w": PackedWeight((8, 12), ((0, 1, key), (1, 2, key)), ((1, 0),))},
                    budget=0.5, aligned=False)
    pack.write(tmp_path / "t", {key: tile})
    assert is_task_dir(tmp_path / "t")
    back = TaskPack.read(tmp_path / "t")
    assert back == pack
    assert back.keys == {key} and back.num_blocks == 2


def test_write_refuses_missing_blocks(tmp_path):
    pack = TaskPack("t", "base", (4, 4), "float32", {"w": PackedWeight((4, 4), ((0, 0, "k"),))})
    with pytest.raises(ValueError, match="no data"):
        pack.write(tmp_path / "t", {})
    assert not is_task_dir(tmp_path / "t")


@pytest.mark.parametrize("change, match", [
    (lambda raw: raw.update(version=99), "version"),
    (lambda raw: raw.update(format="other"), "format"),
    (lambda raw: raw["weights"]["w"].update(shape=[9, 12]), "multiple of the block"),
    (lambda raw: raw["weights"]["w"]["blocks"].append([5, 0, "k"]), "outside"),
    (lambda raw: raw.pop("base"), "malformed"),
])
def test_malformed_packs_are_refused(tmp_path, change, match):
    tile = torch.ones(4, 4)
    pack = TaskPack("t", "base", (4, 4), "float32",
                    {"w": PackedWeight((8, 12), ((0, 1, block_key(tile)),))})
    pack.write(tmp_path / "t", {block_key(tile): tile})
    raw = json.loads((tmp_path / "t" / "task.json").read_text())
    change(raw)
    (tmp_path / "t" / "task.json").write_text(json.dumps(raw))
    with pytest.raises(ModelFormatError, match=match):
        TaskPack.read(tmp_path / "t")
