"""Validate written audit reports against the committed JSON Schema (docs/audit.schema.json).

Call :func:`check_report` on every ``report.json`` / ``*.audit.json`` a test writes (the contract:
every report validates). Not a test module: tests/audit imports it (``from .schema_check import
check_report``); tests/cli has the ``check_report`` fixture (its conftest loads this file by path).
"""
from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "docs" / "audit.schema.json"


@cache
def validator() -> Any:
    """A draft 2020-12 validator of the committed schema (the schema itself checked first)."""
    from jsonschema import Draft202012Validator

    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def report_errors(report: dict[str, Any] | str | Path) -> list[str]:
    """Every way ``report`` (a parsed report, or the path of one) breaks the schema: ``"path: message"``."""
    data = report if isinstance(report, dict) else json.loads(Path(report).read_text(encoding="utf-8"))
    return sorted(f"{'/'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
                  for e in validator().iter_errors(data))


def check_report(report: dict[str, Any] | str | Path) -> dict[str, Any]:
    """Assert that ``report`` validates against docs/audit.schema.json; returns it parsed."""
    data = report if isinstance(report, dict) else json.loads(Path(report).read_text(encoding="utf-8"))
    errors = report_errors(data)
    assert not errors, f"{report if not isinstance(report, dict) else 'report'} breaks docs/audit.schema.json:\n" \
        + "\n".join(errors[:20])
    return data
