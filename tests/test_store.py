"""The model store: listing, and ids that cannot reach outside it."""

from __future__ import annotations

import json

import pytest

from edgeserve.store import ModelStore, UnknownModel


def model(path):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    return path


def test_ids_name_folders_inside_the_store(tmp_path):
    store = ModelStore(tmp_path / "store")
    inside = model(tmp_path / "store" / "good")
    outside = model(tmp_path / "elsewhere")
    (tmp_path / "store" / "escape").symlink_to(outside)        # a link leading out
    (tmp_path / "store" / "alias").symlink_to(inside)          # a link that stays inside
    (tmp_path / "store" / ".hidden").mkdir()
    assert store.path("good") == inside.resolve()
    for bad in ("escape", "../elsewhere", "..", "good/../good", "/etc", "", ".hidden",
                "a" * 200, "good\x00"):
        with pytest.raises(UnknownModel):
            store.path(bad)
    assert store.path("alias") == inside.resolve()          # an alias within the store is fine
    assert [m.id for m in store.list()] == ["alias", "good"]


def test_parent_of_derived_models(tmp_path):
    store = ModelStore(tmp_path)
    child = model(tmp_path / "child")
    model(tmp_path / "base")
    (child / "edgeserve.json").write_text(json.dumps({"parent": "base"}))
    assert {m.id: m.parent for m in store.list()} == {"base": None, "child": "base"}
