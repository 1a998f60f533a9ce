"""Self-supervised thick-slice SR (``--model self-supervised``) on real volumes with truth.

    .venv/bin/python benchmarks/selfsup.py --budget 180                  # MNI152 x4, CT x4
    .venv/bin/python benchmarks/selfsup.py --cases mni152 --factors 3 4 --budget 180 480

Protocol: an isotropic (or near-isotropic) volume is the truth; thick slices x``K`` are simulated
along its last axis with the slice profile the method assumes for the domain (MRI: Gaussian,
FWHM = K output slices; CT: box of K slices, i.e. contiguous thick slices); the volume is cropped
to a multiple of ``K`` along that axis. The self-supervised SR is trained on the simulated scan
alone (its in-plane slices; no truth) within the budget and applied through-plane through the
patch engine, exactly as ``domainsr enhance`` does. Every output (SR and the interpolations along
the thick axis: linear, cubic, lanczos) is scored against the truth on the whole volume's
foreground (voxels above 5 % of the truth's robust range) without a 2 LR px border, PSNR on the
truth's foreground range (``domainsr.train.scoring.score``). ``train s`` is wall time of the whole
training (setup and validations included), ``cpu s`` its process CPU time; ``infer s`` the engine's.
``val gain`` is the card's own held-out in-plane figure (what the method sees without truth).
The load average is printed: this machine class is shared, so wall times vary.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from domainsr.app.models import slicewise_descriptor
from domainsr.data import fetch_sample_data
from domainsr.degrade import build_degradation
from domainsr.engine import PatchInferer, enhance_image
from domainsr.image import SpatialImage
from domainsr.io.nifti import read_nifti
from domainsr.models import build_model
from domainsr.models.descriptor import from_checkpoint
from domainsr.train.scoring import BASELINES, score
from domainsr.train.selfsup import parse_settings, train_self_supervised

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "domainsr" / "data"
CASES = {"mni152": "mri", "cranium_ct": "ct"}


def truth(case: str) -> SpatialImage:
    """The reference volume of ``case`` (CT as HU)."""
    if case == "mni152":
        return read_nifti(fetch_sample_data()["mni152"])
    img = read_nifti(CACHE / "invesalius" / "cranium_ct.nii.gz")
    return img.derive(img.data.astype(np.float32), domain="ct", units="HU")


def simulate(hr: SpatialImage, k: int) -> tuple[SpatialImage, SpatialImage]:
    """(truth cropped to a multiple of ``k`` along the last axis, its thick-slice version)."""
    n = hr.spatial_shape[2] // k * k
    data = np.ascontiguousarray(hr.data[..., :n], dtype=np.float32)
    ref = hr.derive(data, geometry=hr.geometry.cropped((0, 0, 0), (*hr.spatial_shape[:2], n)), mask=None)
    spec = ({"kind": "ct", "scale": [1, 1, k], "hu_range": None} if hr.domain == "ct"
            else {"kind": "mri", "scale": [1, 1, k], "profile": "gaussian", "fwhm": float(k)})
    lr = build_degradation(spec)(data, None)
    return ref, ref.derive(lr, geometry=ref.geometry.scaled((1, 1, 1 / k)), mask=None)


def foreground(ref: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(ref, [0.5, 99.5])
    return ref[0] > lo + 0.05 * (hi - lo)


def run_case(case: str, k: int, budget: float, threads: int) -> dict[str, Any]:
    ref, lr = simulate(truth(case), k)
    pair = type("Pair", (), {"hr": ref.data, "lr": lr.data, "valid": foreground(ref.data)})()
    row: dict[str, Any] = {"case": case, "domain": ref.domain, "K": k, "budget_s": budget,
                           "lr_shape": list(lr.spatial_shape), "load": round(os.getloadavg()[0], 2)}
    with torch.no_grad():
        for name in BASELINES:
            net = build_model(name, spatial_dims=3, in_channels=1, scale=(1, 1, k))
            out = net(torch.from_numpy(lr.data)[None]).float()[0].numpy()
            row[name] = round(score([out], [pair], (1, 1, k))[0], 3)
    with tempfile.TemporaryDirectory() as tmp:
        c0, t0 = time.process_time(), time.perf_counter()
        res = train_self_supervised(lr, 2, k, parse_settings(kwargs={"budget": budget}), tmp, threads=threads)
        row.update(train_s=round(time.perf_counter() - t0, 1), cpu_s=round(time.process_time() - c0, 1),
                   steps=res.steps, best_step=res.best_step, val_gain=round(res.card.metrics["val"].gain_db, 3))
        model = from_checkpoint(res.checkpoint)
        model.prepare(lr)
        model = slicewise_descriptor(model, 2)
        t0 = time.perf_counter()
        with torch.inference_mode():
            sr = enhance_image(lr, PatchInferer(model, threads=threads))
        row["infer_s"] = round(time.perf_counter() - t0, 1)
    row["selfsup"] = round(score([sr.data], [pair], (1, 1, k))[0], 3)
    best = max(BASELINES, key=lambda b: row[b])
    row.update(best_interp=best, gain_db=round(row["selfsup"] - row[best], 3))
    return row


def table(rows: list[dict[str, Any]]) -> str:
    cols = ["case", "K", "budget_s", "train_s", "cpu_s", "infer_s", "steps", "val_gain", "linear", "cubic", "lanczos",
            "selfsup", "best_interp", "gain_db", "load"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--factors", nargs="+", type=int, default=[4])
    ap.add_argument("--budget", nargs="+", type=float, default=[180.0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = ap.parse_args()
    rows = []
    for case in args.cases:
        for k in args.factors:
            for b in args.budget:
                rows.append(run_case(case, k, b, args.threads))
                print(json.dumps(rows[-1]), flush=True)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
