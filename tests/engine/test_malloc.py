"""glibc malloc tuning (domainsr.malloc): freed activations are reused, not faulted in again."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from domainsr import malloc

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")

PROBE = r"""
import json, resource, sys, threading
from domainsr.malloc import tune_malloc
tuned = tune_malloc()  # as the CLI and the warm runner do: before torch and Prefect start threads
import torch
out = {}
def work():  # as in a Prefect task thread started after the CLI's tuning
    for i in range(3):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = torch.ones(25 * 2**20)  # 100 MB, written: every page touched
        del t
        out[i] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
t = threading.Thread(target=work)
t.start(); t.join()
print(json.dumps({"tuned": tuned, "faults": out[2]}))
"""


def _probe(setting: str) -> dict:
    env = {**os.environ, "DOMAINSR_MALLOC_TUNING": setting}
    res = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, check=True,
                         timeout=120)
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_tuned_allocator_reuses_a_freed_100mb_tensor_in_a_later_thread() -> None:
    pages = 100 * 2**20 // os.sysconf("SC_PAGE_SIZE")
    tuned, stock = _probe("1"), _probe("0")
    assert tuned["tuned"] is True and stock["tuned"] is False
    assert stock["faults"] > 0.8 * pages  # stock glibc: a fresh mmap, every page faulted again
    assert tuned["faults"] < 0.05 * pages  # tuned: the freed heap memory is reused


@pytest.mark.parametrize(("value", "off"), [("0", True), ("off", True), ("False", True), ("1", False),
                                            ("", False)])
def test_switch(value: str, off: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOMAINSR_MALLOC_TUNING", value)
    assert malloc.disabled() is off


def test_release_after_an_inferer_run_keeps_the_output(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine tunes on CPU before a run and trims after it; results are unchanged."""
    import numpy as np
    import torch

    from domainsr.engine import PatchInferer

    calls: list[str] = []
    monkeypatch.setattr("domainsr.engine.inferer.tune_malloc", lambda: calls.append("tune") or True)
    monkeypatch.setattr("domainsr.engine.inferer.release_memory", lambda: calls.append("release"))
    net = torch.nn.Upsample(scale_factor=2, mode="nearest")
    x = np.arange(2 * 40 * 40, dtype=np.float32).reshape(2, 40, 40)
    y = PatchInferer(net, scale=2, halo=0, tile=16).run(x)
    assert calls == ["tune", "release"]
    np.testing.assert_array_equal(y, x.repeat(2, 1).repeat(2, 2))
