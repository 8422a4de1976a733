"""The CPU allocator settings: forwards stop page-faulting on their activations."""
import os
import subprocess
import sys
import textwrap

import pytest

from engine import Engine
from engine.config import EngineConfig

# Three 24 MiB activations ([32, 128, 1536] fp32, a MiniLM FFN at 32 x 128 tokens) alive at once, then all
# freed, 40 times, in a fresh process each (the settings are process-wide and cannot be undone). glibc's
# defaults trim the freed heap top (its adaptive trim threshold is twice the largest freed mmap'ed block), so
# the next step page-faults it in again; with the memory kept, no step faults (0 in every run we made).
WORKLOAD = textwrap.dedent("""
    import resource, sys, torch
    if sys.argv[1] == "keep":
        from engine.allocator import keep_freed_memory
        assert keep_freed_memory()
    torch.set_num_threads(1)
    def step():
        a = torch.ones(32, 128, 1536); b = a + 1; c = b * 2
        return float(c[0, 0, 0])
    for _ in range(12):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(40):
        step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")
ACTIVATION_PAGES = 6144  # one 24 MiB tensor in 4 KiB pages


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_kept_memory_is_reused_without_page_faults():
    env = {"PATH": os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1"}
    faults = {mode: int(subprocess.run([sys.executable, "-c", WORKLOAD, mode], check=True, capture_output=True,
                                       text=True, env=env).stdout) for mode in ("default", "keep")}
    # how often glibc's defaults fault depends on the environment (12k under pytest, 49k-736k from a shell)
    assert faults["default"] > ACTIVATION_PAGES, f"the workload no longer shows the problem here: {faults}"
    assert faults["keep"] < ACTIVATION_PAGES // 4, faults


def test_engine_applies_it_on_cpu_unless_disabled(monkeypatch):
    calls = []
    monkeypatch.setattr("engine.engine.keep_freed_memory", lambda: calls.append(1) or True)
    Engine(EngineConfig(device="cpu"))
    Engine(EngineConfig(device="cpu", keep_freed_memory=False))
    assert calls == [1]
