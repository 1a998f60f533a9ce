"""The demo flow (``make demo``): the enhancement flow over each of the demo's tasks as subflows
of one run, so the Prefect UI shows them together."""
from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.states import Completed, Failed, State

from flows.enhance import enhance_flow


@flow(name="domainsr-demo")
def demo_flow(runs: list[dict[str, Any]]) -> State:
    """``runs``: ``{"config": path, "inputs": [paths], "out": folder}`` each; ends Failed if any
    item of any run failed. The state's data maps each config's task name to its summary."""
    summaries: dict[str, Any] = {}
    for run in runs:
        state = enhance_flow(config=run["config"], inputs=run["inputs"], out=run["out"], return_state=True)
        data = state.result(raise_on_failure=False)
        if isinstance(data, BaseException):
            return Failed(message=f"{run['config']}: {data}", data={"error": str(data), "summaries": summaries})
        summaries[data["task"]] = data
    failed = sum(s["failed"] for s in summaries.values())
    done = sum(s["enhanced"] + s["skipped"] for s in summaries.values())
    message = f"{done} output(s) ready, {failed} failed"
    return (Failed if failed else Completed)(message=message, data=summaries)
