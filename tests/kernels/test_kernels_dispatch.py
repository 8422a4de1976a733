"""Which implementation `kernels.*` runs: ADAPTERSERVE_KERNELS, the interpreter guard, optional triton."""
import os
import subprocess
import sys

import pytest
import torch

import kernels
from kernels import reference

MODULES = {"kernels.bottleneck": "_bottleneck_kernel", "kernels.lora": "_lora_kernel",
           "kernels.ia3": "_ia3_kernel", "kernels.layernorm": "_layer_norm_kernel"}
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("module,kernel", MODULES.items())
def test_kernels_are_interpreted_without_cuda(module, kernel):
    """Catches TRITON_INTERPRET being set after the kernels were defined (they would need a driver)."""
    fn = getattr(sys.modules[module], kernel)
    assert type(fn).__name__ == ("InterpretedFunction" if INTERPRET else "JITFunction")


def test_public_ops_are_not_shadowed_by_kernel_modules():
    """`kernels/bottleneck.py` shares the op's name; the package must still expose the function."""
    assert callable(kernels.bottleneck) and kernels.bottleneck.__module__ == "kernels"
    from kernels import bottleneck

    assert bottleneck is kernels.bottleneck


def _ia3_args():
    return torch.ones(2, 3, 8), torch.full((2, 8), 2.0), torch.tensor([0, -1])


def _spy(monkeypatch, name: str) -> list:
    """Records calls to the Triton launcher `name` of the ia3 module (which still runs)."""
    calls, module = [], sys.modules["kernels.ia3"]
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("mode", [None, "auto", "torch"])
def test_cpu_tensors_use_the_reference(monkeypatch, mode):
    if mode is None:
        monkeypatch.delenv("ADAPTERSERVE_KERNELS", raising=False)
    else:
        monkeypatch.setenv("ADAPTERSERVE_KERNELS", mode)
    calls = _spy(monkeypatch, "scale_ia3")
    y, v, slots = _ia3_args()
    assert kernels.scale_ia3(y, v, slots) is y and not calls
    assert torch.equal(y[0], torch.full((3, 8), 2.0)) and torch.equal(y[1], torch.ones(3, 8))


@pytest.mark.skipif(not INTERPRET, reason="forcing Triton on CPU tensors needs the interpreter")
def test_forced_triton_runs_the_kernel_on_cpu(monkeypatch):
    monkeypatch.setenv("ADAPTERSERVE_KERNELS", "triton")
    calls = _spy(monkeypatch, "scale_ia3")
    y, v, slots = _ia3_args()
    expected = reference.scale_ia3(y.clone(), v, slots)
    assert torch.equal(kernels.scale_ia3(y, v, slots), expected) and calls == [1]


def test_forced_triton_without_interpreter_on_cpu_is_an_error(monkeypatch):
    monkeypatch.setenv("ADAPTERSERVE_KERNELS", "triton")
    monkeypatch.setattr(kernels, "_INTERPRET", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        kernels.scale_ia3(*_ia3_args())


def test_unknown_mode_is_an_error(monkeypatch):
    monkeypatch.setenv("ADAPTERSERVE_KERNELS", "cuda")
    with pytest.raises(ValueError, match="auto, torch or triton"):
        kernels.scale_ia3(*_ia3_args())


def test_launchers_assert_dtypes_and_layout():
    ia3 = sys.modules["kernels.ia3"]
    y, v, slots = _ia3_args()
    with pytest.raises(AssertionError, match="row_slots"):
        ia3.scale_ia3(y, v, slots.to(torch.int32))
    with pytest.raises(AssertionError, match="ia3"):
        ia3.scale_ia3(y, v.half(), slots)
    with pytest.raises(AssertionError, match="contiguous"):
        ia3.scale_ia3(y.transpose(1, 2), torch.ones(2, 3), slots)
    lora = sys.modules["kernels.lora"]
    x, a, b = torch.ones(2, 3, 8), torch.ones(4, 2, 8), torch.ones(4, 2, 6)
    ranks, scaling = torch.full((4,), 2, dtype=torch.int32), torch.ones(4)
    with pytest.raises(AssertionError, match="lora_b"):
        lora.add_lora(torch.ones(2, 3, 6), x, a, b.transpose(1, 2).contiguous().transpose(1, 2), scaling, ranks, slots)
    with pytest.raises(AssertionError, match="scaling"):
        lora.add_lora(torch.ones(2, 3, 6), x, a, b, scaling.half(), ranks, slots)


def test_import_without_triton_falls_back_to_reference():
    """triton stays optional: with it unimportable, `kernels` imports, CPU works, forcing fails clearly."""
    code = (
        "import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
        "import os, torch, kernels\n"
        "y = torch.ones(1, 2, 4); kernels.scale_ia3(y, torch.full((1, 4), 3.0), torch.tensor([0]))\n"
        "assert torch.equal(y, torch.full((1, 2, 4), 3.0))\n"
        "os.environ['ADAPTERSERVE_KERNELS'] = 'triton'\n"
        "try:\n    kernels.scale_ia3(y, torch.ones(1, 4), torch.tensor([0]))\n"
        "except RuntimeError as e:\n    assert 'could not be imported' in str(e), e\n"
        "else:\n    raise SystemExit('forced triton without triton must raise')\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("ADAPTERSERVE_KERNELS", None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
