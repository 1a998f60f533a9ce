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


def test_band_map_and_output_settings(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: x\nmodel: {name: cubic, scale: 2}\nband_map: {1: B02, 2: B03, 3: B04, 4: B08}\n"
                 "store: {output_suffix: .x2, overwrite: true}\n")
    cfg = load_enhance_config(p)
    assert cfg.band_map == {1: "B02", 2: "B03", 3: "B04", 4: "B08"}
    assert (cfg.store.output_suffix, cfg.store.overwrite) == (".x2", True)
    p.write_text("name: x\nmodel: {name: cubic, scale: 2}\nband_map: '1=B02,2=B03'\n")
    assert load_enhance_config(p).band_map == {1: "B02", 2: "B03"}
    defaults = load_enhance_config(tmp_path / "c.yaml").store
    assert (defaults.output_suffix, defaults.overwrite) == ("_sr", False)
    for bad, key in (("band_map: {0: B02}", "band_map"), ("band_map: '1=B02,2=b2'", "band_map"),
                     ("store: {output_suffix: ../up}", "output_suffix"), ("store: {overwrite: maybe}", "overwrite")):
        p.write_text(f"name: x\nmodel: {{name: cubic, scale: 2}}\n{bad}\n")
        with pytest.raises(ConfigError, match=key):
            load_enhance_config(p)
