"""Held-out fidelity audit of a shipped checkpoint on the real sample data, one command each:

    python benchmarks/audit_shipped.py sentinel2-rgbn-x2      # Sentinel-2 scene, bottom 30 % of rows
    python benchmarks/audit_shipped.py mri-t1-x2              # MNI152 T1, held-out slab
    python benchmarks/audit_shipped.py ct-slices-x4-3d        # InVesalius head CT, held-out rows

The card says which region was held out of training; only that region is audited. Writes
``<out>/<model>.audit.html`` + ``.json`` and a risk map aligned with the output.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from domainsr.audit import AuditThresholds, audit_checkpoint, write_report, write_risk_map
from domainsr.models.checkpoints import load_checkpoint
from domainsr.train.sources import open_source


def main(argv: list[str] | None = None) -> dict[str, str]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="shipped checkpoint name (direct application: S2 x2, MRI x2, CT x4 3D)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/audits"))
    ap.add_argument("--tta", default="flips", choices=["off", "flips", "dihedral"])
    args = ap.parse_args(argv)
    _, card = load_checkpoint(args.model)
    ref = open_source(card.training_data.source)  # the card's own training image (its held-out region)
    result = audit_checkpoint(ref, args.model, region="test", thresholds=AuditThresholds(tta=args.tta))
    html, js = write_report(result, args.out, stem=f"{args.model}.audit")
    risk = write_risk_map(result, args.out / f"{args.model}.risk{'.tif' if card.domain == 'optical' else '.nii.gz'}")
    print(f"verdict: {result.verdict} ({'; '.join(result.reasons)})")
    print(f"regions flagged: {len(result.regions)}")
    print(f"report: {html}\njson:   {js}\nrisk:   {risk}")
    return {"html": str(html), "json": str(js), "risk": str(risk)}


if __name__ == "__main__":
    main()
