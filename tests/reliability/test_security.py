"""Security: outputs cannot escape the output root; tampered or pickled checkpoints are refused."""
from __future__ import annotations

import json
import os
import pathlib
import shutil
from pathlib import Path

import pytest
import torch

from domainsr.errors import ModelError, StoreError
from domainsr.models.checkpoints import load_checkpoint, sha256_file
from domainsr.models.names import SHIPPED_DIR
from domainsr.stores.base import Item
from domainsr.stores.local import LocalStore

CKPT = "sentinel2-rgbn-x2"


@pytest.fixture()
def store(tmp_path) -> LocalStore:
    (tmp_path / "in").mkdir()
    return LocalStore(tmp_path / "in", tmp_path / "out")


@pytest.mark.parametrize("item_id", ["../escape", "..", "a/../../b", "/etc/passwd", "sub/name",
                                     "..\\win", "", ".hidden"])
def test_output_names_escaping_the_root_are_refused(store, item_id):
    item = Item(id=item_id, uri="x.tif", kind="raster")
    with pytest.raises(StoreError, match="unsafe|refused"):
        store.output_path(item)
    with pytest.raises(StoreError):
        store.open_output(item)


def test_safe_name_lands_inside_the_root(store, tmp_path):
    out = store.output_path(Item(id="scene_1", uri="x.tif", kind="raster"))
    assert out == (tmp_path / "out").resolve() / "scene_1_sr.tif"


@pytest.mark.parametrize("label", ["../audit.html", "/tmp/x", "a/b"])
def test_extra_labels_escaping_the_root_are_refused(store, tmp_path, label):
    item = Item(id="scene_1", uri="x.tif", kind="raster")
    out = store.open_output(item)
    out.write_bytes(b"img")
    src = tmp_path / "report.html"
    src.write_text("<html></html>")
    with pytest.raises(StoreError):
        store.commit(item, "run1", extras={label: src})
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["scene_1_sr.tif"]
    assert not (tmp_path / "audit.html").exists()


def test_symlink_in_output_root_pointing_outside_is_refused(store, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (tmp_path / "out").mkdir()
    os.symlink(outside / "scene_1_sr.tif", tmp_path / "out" / "scene_1_sr.tif")
    with pytest.raises(StoreError, match="outside"):
        store.output_path(Item(id="scene_1", uri="x.tif", kind="raster"))


@pytest.fixture()
def ckpt_copy(tmp_path) -> Path:
    dst = tmp_path / CKPT
    shutil.copytree(SHIPPED_DIR / CKPT, dst)
    return dst


def test_intact_copy_loads(ckpt_copy):
    model, card = load_checkpoint(ckpt_copy)
    assert card.name == CKPT and not model.training


@pytest.mark.parametrize("where", [0.0, 0.5, 1.0])
def test_tampered_weights_are_refused(ckpt_copy, where):
    pt = ckpt_copy / f"{CKPT}.pt"
    raw = bytearray(pt.read_bytes())
    pos = min(int(where * len(raw)), len(raw) - 1)
    raw[pos] ^= 0x01
    pt.write_bytes(bytes(raw))
    with pytest.raises(ModelError, match="sha256") as err:
        load_checkpoint(ckpt_copy)
    assert pt.name in str(err.value)


class _Payload:
    """Unpickling this runs code (touches a marker file): what ``weights_only`` must stop."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_pickled_object_is_refused_even_with_a_matching_checksum(ckpt_copy, tmp_path):
    pt, card_path = ckpt_copy / f"{CKPT}.pt", ckpt_copy / f"{CKPT}.json"
    marker = tmp_path / "code_ran"
    state = torch.load(pt, map_location="cpu", weights_only=True)
    state["payload"] = _Payload(marker)
    torch.save(state, pt)
    card = json.loads(card_path.read_text())
    card["weights_sha256"] = sha256_file(pt)  # an attacker who can rewrite both files
    card_path.write_text(json.dumps(card))
    with pytest.raises(ModelError, match="refused") as err:
        load_checkpoint(ckpt_copy)
    assert pt.name in str(err.value)
    assert not marker.exists()
    torch.load(pt, map_location="cpu", weights_only=False)  # the payload is live: full unpickling runs it
    assert marker.exists()
