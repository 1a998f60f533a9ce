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
torch.set_num_threads(1)
net = torch.nn.Sequential(*[torch.nn.Conv2d(16, 16, 3, padding=1) for _ in range(6)]).eval()
x = torch.rand(1, 16, 512, 512)  # 16 MiB activations: above glibc's initial 128 KiB mmap threshold
out = {}
def work():  # as in a Prefect task thread started after the CLI's tuning
    with torch.inference_mode():
        for i in range(3):
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            net(x)
            out[i] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
t = threading.Thread(target=work)
t.start(); t.join()
print(json.dumps({"tuned": tuned, "faults": out[2]}))
"""


def _probe(setting: str) -> dict:
    # a clean environment: earlier tests' settings (threads, preloads, GLIBC_TUNABLES) stay out
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "PYTHONPATH", "VIRTUAL_ENV")}
    env["DOMAINSR_MALLOC_TUNING"] = setting
    res = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, check=True,
                         timeout=120)
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_tuned_allocator_reuses_activation_memory_in_a_later_thread() -> None:
    """Forward passes of a conv stack: stock glibc faults each layer's output in again (fresh
    mmaps); tuned, most of the freed memory is reused."""
    tuned, stock = _probe("1"), _probe("0")
    assert tuned["tuned"] is True and stock["tuned"] is False
    assert stock["faults"] > 4 * 2**20 // os.sysconf("SC_PAGE_SIZE")  # more than one 16 MiB activation
    assert tuned["faults"] < 0.5 * stock["faults"]


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
