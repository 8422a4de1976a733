"""Every kernel variant compiles to a cubin for sm_80 and sm_90, checked without a GPU.

The interpreter accepts things the compiler rejects (tl.dot dims < 16, layouts, register limits), so
this compiles each constexpr variant the launchers use (`aot_compile.py`) in a subprocess: the
compiled path needs TRITON_INTERPRET=0 before the kernels are defined, and this process has them
interpreted. A cold TRITON_CACHE_DIR makes every run really compile.
"""
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def test_every_kernel_variant_compiles_for_sm80_and_sm90(tmp_path):
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path / "triton-cache"),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "aot_compile.py")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    lines = proc.stdout.splitlines()
    assert lines[-1].startswith("compiled ")
    for kernel in ("_bottleneck_kernel", "_lora_kernel", "_ia3_kernel", "_layer_norm_kernel"):
        for arch in (80, 90):
            assert any(line.startswith(f"ok sm_{arch} {kernel} ") for line in lines), (kernel, arch)
