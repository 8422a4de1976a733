"""The CPU allocator settings: forwards stop page-faulting on their activations."""
import os
import subprocess
import sys
import textwrap

import pytest

from engine import Engine
from engine.config import EngineConfig

# a transformer block's allocation pattern ([32, 128, 1536] FFN activations of 24 MiB) in a fresh process,
# since the settings are process-wide and cannot be undone. Whether glibc's defaults fault depends on the
# process's allocation history (44k-64k faults over these 10 steps when run alone, fewer under pytest's
# environment), so only the kept-memory steady state is asserted.
WORKLOAD = textwrap.dedent("""
    import resource, torch
    from engine.allocator import keep_freed_memory
    assert keep_freed_memory()
    torch.set_num_threads(1)
    F = torch.nn.functional
    x = torch.randn(32, 128, 384); w1 = torch.randn(1536, 384); w2 = torch.randn(384, 1536)
    def step():
        h = x + 1
        y = F.linear(h, w1); g = F.gelu(y); del y
        z = F.linear(g, w2); del g
        return F.layer_norm(z + h, (384,))
    for _ in range(5): step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10): step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_kept_memory_is_reused_without_page_faults():
    env = {"PATH": os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", WORKLOAD], check=True, capture_output=True, text=True, env=env)
    assert int(out.stdout) < 500  # one activation alone is 6144 pages


def test_engine_applies_it_on_cpu_unless_disabled(monkeypatch):
    calls = []
    monkeypatch.setattr("engine.engine.keep_freed_memory", lambda: calls.append(1) or True)
    Engine(EngineConfig(device="cpu"))
    Engine(EngineConfig(device="cpu", keep_freed_memory=False))
    assert calls == [1]
