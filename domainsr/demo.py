"""The `make demo` job: real sample data in, outputs with correct metadata out."""
from __future__ import annotations

from pathlib import Path

from domainsr.data import fetch_sample_data
from domainsr.io import read_image, write_image


def run_demo(out: Path) -> dict[str, Path]:
    """I/O round trip on the real samples (the SR flow replaces this once the engine lands)."""
    data = fetch_sample_data()
    out = Path(out)
    s2 = read_image(data["sentinel2"])
    rgbn = s2.select(["B02", "B03", "B04", "B08"])
    mni = read_image(data["mni152"])
    return {
        "sentinel2 10 m COG": write_image(rgbn, out / "sentinel2_rgbn.tif"),
        "MNI152 NIfTI": write_image(mni, out / "mni152.nii.gz"),
    }
