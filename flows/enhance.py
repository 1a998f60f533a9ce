"""The batch enhancement flow: list a store's items, skip those already enhanced with the same
model and config (the run key in each output's provenance file), enhance the rest as tasks
(retries on transient errors, a per-item time limit), audit each output without a reference,
publish a table and a markdown artifact linking outputs and audit reports, and end in a state
that counts what succeeded and what failed.

Run it from the CLI (``domainsr enhance``), from Python (``enhance_flow(config=...)``), or as a
scheduled deployment (``prefect.yaml``, ``domainsr schedule``). No image logic lives here: every
step is a call into the application layer :mod:`domainsr.app` and :mod:`domainsr.stores`.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.states import Completed, Failed, State

from domainsr.app import (
    ItemResult,
    RunSpec,
    config_from_model,
    enhance_item,
    parse_scale,
    plan_run,
    report,
    split_done,
    summarize,
)
from domainsr.bands import parse_band_map
from domainsr.config import EnhanceConfig, load_enhance_config
from domainsr.errors import ConfigError, DomainSRError
from domainsr.stores import SCHEMES, Item, Store, expand, open_store
from flows.common import (
    api_for_workers,
    artifact_key,
    drain_worker_queues,
    link,
    local_dask_workers,
    retry_if_transient,
    task_runner_for,
)


def build_run(config: str | None = None, *, inputs: Sequence[str] | None = None, out: str | None = None,
              model: str | None = None, scale: str | int | Sequence[int] | None = None,
              bands: Sequence[str] | None = None, force: bool = False, task_runner: str | None = None,
              dask_address: str | None = None, run_audit: bool | None = None, suffix: str | None = None,
              overwrite: bool = False, band_map: str | dict[int, str] | None = None, domain: str | None = None
              ) -> tuple[RunSpec, Store]:
    """The run and its store from a config file or a model name, with command-line overrides
    (``suffix``, ``overwrite``, ``band_map`` and ``domain`` override ``store.output_suffix``,
    ``store.overwrite``, ``band_map`` and ``domain``)."""
    if (config is None) == (model is None):
        raise ConfigError("give either a config file (--config) or a model (--model), not both or neither")
    if config is not None:
        cfg = load_enhance_config(config)
        source = str(config)
        if scale is not None or bands:
            upd: dict[str, Any] = {}
            if scale is not None:
                upd["model"] = cfg.model.model_copy(update={"scale": parse_scale(scale)})
            if bands:
                upd["bands"] = list(bands)
            cfg = cfg.model_copy(update=upd)
    else:
        cfg = config_from_model(model, scale, bands)
        source = "command line"
    cfg = _output_overrides(cfg, suffix, overwrite, band_map)
    if domain is not None:
        cfg = cfg.model_copy(update={"domain": domain})
    runner_upd: dict[str, Any] = {}
    if task_runner:
        runner_upd["task_runner"] = task_runner
    if dask_address:
        runner_upd.update(task_runner="dask", dask_address=dask_address)
    if runner_upd:
        cfg = cfg.model_copy(update={"runner": cfg.runner.model_copy(update=runner_upd)})
    if run_audit is not None:
        cfg = cfg.model_copy(update={"run_audit": run_audit})
    cfg = _threads_for_local_dask(cfg)
    spec = plan_run(_validated(cfg, source), source, force=force)
    output = out or (expand(cfg.store.output) if cfg.store.output else None)
    sources = list(inputs) if inputs else [cfg.store.input or ""]
    kwargs: dict[str, Any] = {"domain": cfg.domain, "output_format": cfg.output.format,
                              "default_output": expand(str(cfg.output.dir))}  # a URL's ?output= wins
    if not any(_remote(s) for s in sources):  # output naming and overwriting: the local store's
        kwargs.update(output_suffix=cfg.store.output_suffix, overwrite=cfg.store.overwrite,
                      nifti_domain=_model_domain(spec.model))
    store = open_store(list(inputs), output=output, **kwargs) if inputs else open_store(
        cfg.store, output=output, **kwargs)
    return spec, store


def _model_domain(model: dict[str, Any]) -> str | None:
    """A checkpoint's medical domain (``mri``/``ct``): how a NIfTI input, which names no modality,
    is read when the task names no domain (a CT model reads it in HU); else ``None``."""
    if model.get("kind") != "checkpoint" or not model.get("path"):
        return None
    from domainsr.models.checkpoints import read_card

    domain = read_card(model["path"]).domain
    return domain if domain in ("mri", "ct") else None


def _output_overrides(cfg: EnhanceConfig, suffix: str | None, overwrite: bool,
                      band_map: str | dict[int, str] | None) -> EnhanceConfig:
    store: dict[str, Any] = {}
    if suffix is not None:
        store["output_suffix"] = suffix
    if overwrite:
        store["overwrite"] = True
    upd: dict[str, Any] = {"store": cfg.store.model_copy(update=store)} if store else {}
    if band_map:
        upd["band_map"] = parse_band_map(band_map)
    return cfg.model_copy(update=upd) if upd else cfg


def _validated(cfg: EnhanceConfig, source: str) -> EnhanceConfig:
    """``cfg`` validated again after the overrides (a bad --suffix or --band-map is a ConfigError)."""
    from pydantic import ValidationError

    try:
        return EnhanceConfig.model_validate(cfg.model_dump())
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid settings: {problems}", source) from exc


def _remote(source: str) -> bool:
    scheme = source.split("://", 1)[0].lower() if "://" in source else ""
    return scheme in SCHEMES


def _threads_for_local_dask(cfg: EnhanceConfig) -> EnhanceConfig:
    """A local Dask cluster shares this machine's cores between its workers."""
    r = cfg.runner
    if r.task_runner != "dask" or r.dask_address or cfg.tiling.threads is not None:
        return cfg
    from domainsr.engine.inferer import physical_cores

    threads = max(1, physical_cores() // (local_dask_workers(r) * r.dask_threads_per_worker))
    return cfg.model_copy(update={"tiling": cfg.tiling.model_copy(update={"threads": threads})})


@task(name="plan-run", cache_policy=NO_CACHE, persist_result=False)
def plan_task(config: str | None, inputs: list[str] | None, out: str | None, model: str | None,
              scale: int | list[int] | str | None, bands: list[str] | None, force: bool, task_runner: str | None,
              dask_address: str | None, run_audit: bool | None, suffix: str | None = None, overwrite: bool = False,
              band_map: str | dict[int, str] | None = None, domain: str | None = None) -> tuple[RunSpec, Store]:
    spec, store = build_run(config, inputs=inputs, out=out, model=model, scale=scale, bands=bands, force=force,
                            task_runner=task_runner, dask_address=dask_address, run_audit=run_audit,
                            suffix=suffix, overwrite=overwrite, band_map=band_map, domain=domain)
    get_run_logger().info("task %r, model %s, run key %s, store %s", spec.name, spec.model.get("name"),
                          spec.run_key, store.public_name)
    return spec, store


@task(name="list-items", cache_policy=NO_CACHE, persist_result=False)
def list_task(store: Store, spec: RunSpec) -> tuple[list[Item], list[ItemResult]]:
    """The store's items matching the config's query, split into to-do and settled (already done
    with this run key, or refused: an output that would replace an input or a file not ours)."""
    items = store.list_items(spec.config.store.query or None)
    todo, done = split_done(store, items, spec)
    refused = sum(r.status == "failed" for r in done)
    get_run_logger().info("%d item(s): %d to enhance, %d already done with run key %s, %d refused",
                          len(items), len(todo), len(done) - refused, spec.run_key, refused)
    return todo, done


@task(name="enhance-item", task_run_name="enhance-{item.id}", cache_policy=NO_CACHE, persist_result=False,
      retries=1, retry_delay_seconds=10, retry_condition_fn=retry_if_transient)
def enhance_item_task(store: Store, item: Item, spec: RunSpec) -> ItemResult:
    """Read, enhance, audit and write one item (writes are atomic; never cached)."""
    result = enhance_item(store, item, spec)
    get_run_logger().info("%s: %s -> %s (audit: %s, %.1f s)", item.id, result.message, result.output,
                          result.verdict or "off", result.seconds)
    return result


class Batch:
    """The items of a run and their store, as the per-item subflow's one parameter.

    Prefect stores a flow's parameters in its database verbatim; iterating a Batch (which is how
    Prefect serialises an object it does not know) yields only what may be stored: the store's
    public name, the item ids and the task name, never input paths (a medical export folder is
    often named after the patient) or store credentials.
    """

    __slots__ = ("items", "spec", "store")

    def __init__(self, store: Store, items: list[Item], spec: RunSpec) -> None:
        self.store, self.items, self.spec = store, items, spec

    def __iter__(self) -> Any:
        yield "store", self.store.public_name
        yield "items", [i.id for i in self.items]
        yield "task", self.spec.name


@flow(name="domainsr-enhance-items", validate_parameters=False)
def enhance_items_flow(batch: Batch) -> list[ItemResult]:
    """Every item as its own task on this flow's task runner; a failed item is reported, the
    others go on."""
    store, items, spec = batch.store, batch.items, batch.spec
    r = spec.config.runner
    task = enhance_item_task.with_options(retries=r.retries, retry_delay_seconds=r.retry_delay_s)
    report("items", spec.name, 0, len(items))
    large = _to_split(store, items, spec)
    futures = {task.submit(store, item, spec): item for item in items if item.id not in large}
    results: dict[str, ItemResult] = {}
    logger = get_run_logger()
    for item in large.values():  # here, while the other items run: their bands go to every worker
        results[item.id] = _settled(item, split_item_task(store, item, spec, return_state=True), logger)
        report("items", spec.name, len(results), len(items))
    for n, future in enumerate(as_completed(list(futures)), len(large) + 1):
        item = futures[future]
        future.wait()  # sets the future's final state (its .state could still be read from the API)
        results[item.id] = _settled(item, future.state, logger, future)
        report("items", spec.name, n, len(items))
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    drain_worker_queues(ctx.task_runner if ctx else None)  # Dask workers: their logs reach the API now
    return [results[i.id] for i in items]


def _settled(item: Item, state: State, logger: Any, future: Any = None) -> ItemResult:
    """The item's result from its task's final state (a failure: logged, with its message)."""
    if state.is_completed():
        return state.result()
    exc = state.result(raise_on_failure=False) if state.is_final() else _not_run(future)
    message = str(exc) if isinstance(exc, BaseException) else (state.message or state.name)
    logger.error("%s failed: %s", item.id, message)
    return ItemResult(item.id, item.kind, "failed", message=message,
                      error=type(exc).__name__ if isinstance(exc, BaseException) else state.name)


def _to_split(store: Store, items: list[Item], spec: RunSpec) -> dict[str, Item]:
    """With the dask runner (``runner.dask_split``): the items to split across the workers, the
    single-file rasters that stream (:func:`~domainsr.app.enhance.streams`)."""
    r = spec.config.runner
    if r.task_runner != "dask" or not r.dask_split:
        return {}
    from domainsr.app.enhance import streams
    from domainsr.limits import memory_budget

    def large(item: Item) -> bool:
        try:
            return item.kind == "raster" and streams(store, item, spec)
        except Exception:  # noqa: BLE001 - an unreadable file: its own task reports why
            return False

    with memory_budget(r.memory_budget_gb):
        return {i.id: i for i in items if large(i)}


@task(name="enhance-item-split", task_run_name="enhance-{item.id}", cache_policy=NO_CACHE, persist_result=False,
      retries=1, retry_delay_seconds=10, retry_condition_fn=retry_if_transient)
def split_item_task(store: Store, item: Item, spec: RunSpec) -> ItemResult:
    """One large raster, in this process, its bands of tile rows on every Dask worker
    (:func:`domainsr.app.split.enhance_item_split`); streamed here when its plan cannot be split."""
    from prefect.context import FlowRunContext

    from domainsr.app.split import enhance_item_split
    from domainsr.engine.split import SplitUnavailable

    ctx = FlowRunContext.get()
    try:
        result = enhance_item_split(store, item, spec, ctx.task_runner.client)
    except SplitUnavailable as exc:
        get_run_logger().info("%s: %s; streamed on one machine", item.id, exc)
        result = enhance_item(store, item, spec)
    get_run_logger().info("%s: %s -> %s (audit: %s, %.1f s)", item.id, result.message, result.output,
                          result.verdict or "off", result.seconds)
    return result


def _not_run(future: Any) -> BaseException:
    """Why a task never reached a final state: the Dask cluster could not run it (e.g. its scheduler
    or workers run other code than this flow and cannot unpickle the task)."""
    wrapped = getattr(future, "wrapped_future", None)
    try:
        cause = wrapped.exception(timeout=1) if wrapped is not None else None
    except Exception as exc:  # noqa: BLE001 - the future itself is lost with its worker
        cause = exc
    detail = " ".join(str(cause).split()) if cause is not None else "no result came back"
    return DomainSRError(f"the task did not run on the Dask cluster: {detail} (do the scheduler and the "
                         "workers run this version of DomainSR? restart them after an upgrade)")


def _markdown(summary: dict[str, Any], spec: RunSpec) -> str:
    lines = [f"# DomainSR enhancement: {spec.name}", "",
             (f"Model **{summary['model']}**, run key `{spec.run_key}`, config `{spec.source}`, output "
             f"{link(summary['output'], summary['output'])}."), "",
             (f"**{summary['enhanced']} enhanced, {summary['skipped']} skipped (already done), "
             f"{summary['failed']} failed** of {summary['total']} item(s)."), "",
             "| item | status | output | audit | report | risk map | note |",
             "|---|---|---|---|---|---|---|"]
    for r in summary["items"]:
        ex = r["extras"]
        risk = next((v for k, v in ex.items() if k.startswith("risk")), None)
        note = (r["message"] or "").replace("|", "/").replace("\n", " ")[:200]
        lines.append(f"| {r['item_id']} | {r['status']} | {link(r['output'])} | {r['verdict'] or '-'} | "
                     f"{link(ex.get('audit.html'), 'audit')} | {link(risk, 'risk')} | {note} |")
    return "\n".join(lines) + "\n"


@task(name="publish-artifacts", cache_policy=NO_CACHE, persist_result=False)
def publish_task(summary: dict[str, Any], spec: RunSpec) -> None:
    """A table artifact (one row per item) and a markdown artifact with links to every output,
    audit report and risk map, both keyed by the task name so runs form a history."""
    rows = [{"item": r["item_id"], "kind": r["kind"], "status": r["status"], "output": r["output"] or "",
             "audit": r["verdict"] or "", "report": r["extras"].get("audit.html", ""), "seconds": r["seconds"],
             "message": r["message"]} for r in summary["items"]]
    key = artifact_key("domainsr-enhance", spec.name)
    desc = (f"{summary['enhanced']} enhanced, {summary['skipped']} skipped, {summary['failed']} failed "
            f"(run key {spec.run_key})")
    create_table_artifact(table=rows or [{"item": "", "status": "no items"}], key=key, description=desc)
    create_markdown_artifact(markdown=_markdown(summary, spec), key=f"{key}-report", description=desc)


@flow(name="domainsr-enhance", validate_parameters=True)
def enhance_flow(config: str | None = None, inputs: list[str] | None = None, out: str | None = None,
                 model: str | None = None, scale: int | list[int] | str | None = None, bands: list[str] | None = None,
                 force: bool = False, task_runner: str | None = None, dask_address: str | None = None,
                 run_audit: bool | None = None, suffix: str | None = None, overwrite: bool = False,
                 band_map: str | dict[int, str] | None = None, domain: str | None = None) -> State:
    """Enhance every item of a store (a config's ``store`` or ``inputs``) into ``out``.

    ``config``: a task config (``configs/*.yaml``), or ``model`` (a checkpoint or registry name)
    with ``scale``. ``force`` redoes items already done. ``task_runner``/``dask_address``
    override the config's runner; ``run_audit`` its audit switch; ``suffix``, ``overwrite`` and
    ``band_map`` its ``store.output_suffix``, ``store.overwrite`` and ``band_map``; ``domain`` (mri, ct,
    optical) its ``domain``: what inputs whose files do not say are (a NIfTI names no modality). Ends Completed,
    or Failed when any item failed (or was refused); the message counts both and the state's data
    is the summary (one row per item).
    """
    spec, store = plan_task(config, inputs, out, model, scale, bands, force, task_runner, dask_address, run_audit,
                            suffix, overwrite, band_map, domain)
    todo, done = list_task(store, spec)
    results = list(done)
    if todo:
        runner = task_runner_for(spec.config.runner)
        with api_for_workers(spec.config.runner):  # Dask workers report to this flow's API
            results += enhance_items_flow.with_options(task_runner=runner)(Batch(store, todo, spec))
    output = str(getattr(store, "output", "") or "") or None
    summary = summarize(results, spec, output)
    publish_task(summary, spec)
    message = (f"{summary['enhanced']} enhanced, {summary['skipped']} skipped, {summary['failed']} failed "
               f"of {summary['total']} item(s)")
    if summary["failed"]:
        return Failed(message=message, data=summary)
    return Completed(message=message, data=summary)
