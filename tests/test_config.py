from __future__ import annotations

import pytest

from domainsr.config import load_enhance_config
from domainsr.errors import ConfigError


def test_misspelt_key_is_an_error(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: x\ndomain: optical\nmodel: {name: bicubic, scale: 2}\ntilling: {tile: 256}\n")
    with pytest.raises(ConfigError) as err:
        load_enhance_config(p)
    assert "tilling" in str(err.value) and "c.yaml" in str(err.value)


def test_valid_config(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: x\ndomain: optical\nmodel: {name: cubic, scale: 2}\ntiling: {tile: 256}\n")
    cfg = load_enhance_config(p)
    assert cfg.tiling.tile == 256 and cfg.model.scale == 2
