"""docs/audit.schema.json: a real JSON Schema (draft 2020-12) of the report, generated from the
report's models, committed up to date, and met by written reports (and broken by wrong ones)."""
from __future__ import annotations

import copy
import json
import typing

import numpy as np
import pytest

from domainsr.audit import AuditThresholds, audit_heldout, audit_output, write_report
from domainsr.audit.results import RegionKind
from domainsr.audit.schema import REGION_KINDS, report_schema, schema_text

from .conftest import OpticalDegradation, planted
from .schema_check import SCHEMA_PATH, check_report, report_errors


def test_the_committed_schema_is_the_generated_one():
    committed = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    assert committed == report_schema(), "regenerate: python -m domainsr.audit.schema > docs/audit.schema.json"
    assert SCHEMA_PATH.read_text(encoding="utf-8") == schema_text()


def test_the_schema_is_draft_2020_12_with_the_contracts_region_kinds():
    from jsonschema import Draft202012Validator

    schema = report_schema()
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$defs"]["Region"]["properties"]["kind"]["enum"] == list(REGION_KINDS)
    assert tuple(typing.get_args(RegionKind)) == REGION_KINDS  # the models write only the contract's kinds
    assert {"verdict", "regions", "metrics", "provenance"} <= set(schema["required"])
    assert "reference" not in schema["$defs"]["AuditMetrics"].get("required", [])  # left out when None


@pytest.fixture(scope="module")
def reports(s2_crop, tmp_path_factory):
    """Reports written for a real Sentinel-2 crop: a reference-free output audit of a planted square
    (re-degraded with the true operator) and a held-out audit of the same model."""
    from domainsr.audit import interpolation_enhancer
    from domainsr.degrade import noise_free_operator

    out = tmp_path_factory.mktemp("schema-reports")
    cubic = interpolation_enhancer("cubic", 4, (2, 2))
    model = planted(cubic, (slice(40, 52), slice(60, 72)), np.full(4, 900.0))
    deg = OpticalDegradation()
    lr = s2_crop.derive(deg(np.asarray(s2_crop.data, np.float32), np.random.default_rng(0)),
                        geometry=s2_crop.geometry.scaled([0.5, 0.5]), mask=None)
    th = AuditThresholds(tta="off")
    free = noise_free_operator(deg, (2, 2), 4)
    result = audit_output(model(lr), lr, degradation=free, thresholds=th)
    _, js_output = write_report(result, out, stem="output")
    held = audit_heldout(s2_crop, model, deg, scale=(2, 2), thresholds=th)
    _, js_held = write_report(held, out, stem="heldout")
    return {"output": json.loads(js_output.read_text()), "held-out": json.loads(js_held.read_text())}


def test_written_reports_validate(reports):
    for report in reports.values():
        check_report(report)
    assert reports["output"]["regions"], "the planted square is flagged (the schema is checked on a region)"


def test_wrong_reports_do_not_validate(reports):
    good = reports["held-out"]
    region = good["regions"][0] if good["regions"] else None

    def broken(change) -> list[str]:
        data = copy.deepcopy(good)
        change(data)
        return report_errors(data)

    assert broken(lambda d: d.pop("verdict"))
    assert broken(lambda d: d.update(verdict="ok"))
    assert broken(lambda d: d.update(surprise=1))  # unknown keys are errors, as in the models
    assert broken(lambda d: d["grid"].update(sr_shape="128x128"))
    assert not broken(lambda d: d["metrics"]["lr_consistency"]["lr_psnr"].update(model_mean=None))  # inf -> null
    if region is not None:
        assert broken(lambda d: d["regions"][0].update(kind="lr-inconsistency"))  # the old kind names
        assert broken(lambda d: d["regions"][0].update(world={"space": "RAS+ mm"}))
        assert not broken(lambda d: d["regions"][0].update(world={}))  # no known geometry
