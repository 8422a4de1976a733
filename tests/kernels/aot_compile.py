"""Compiles every Triton kernel variant the launchers use for sm_80 and sm_90, without a GPU.

Run by `test_aot_compile.py` in a subprocess with TRITON_INTERPRET=0 (the interpreter skips the checks
this catches: tl.dot shapes < 16, layouts, ptxas). Prints one line per variant; exits non-zero on the
first failure. The variants come from the launchers' `launch_config` (`kernels.segments` for the bottleneck
and LoRA kernels), i.e. what a real launch passes.
"""
import os
import sys
import time

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "run with TRITON_INTERPRET=0"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels import bottleneck as _unused  # noqa: E402,F401  (imports all kernel modules)

bn = sys.modules["kernels.bottleneck"]  # `kernels.bottleneck` the attribute is the op, not the module
lora = sys.modules["kernels.lora"]
ia3 = sys.modules["kernels.ia3"]
ln = sys.modules["kernels.layernorm"]
segments = sys.modules["kernels.segments"]

TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
TARGETS = [GPUTarget("cuda", 80, 32), GPUTarget("cuda", 90, 32)]
FLOAT_ARGS = {"eps"}
INDEX_PTRS = {"act_ptr": "*i32", "rank_ptr": "*i32", "slots_ptr": "*i64", "perm_ptr": "*i64"}


def signature(fn, dtype: torch.dtype, constexprs: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in INDEX_PTRS:
            sig[name] = INDEX_PTRS[name]
        elif name == "scaling_ptr":  # LoRA scaling is one fp32 per slot whatever the data dtype
            sig[name] = "*fp32"
        elif name.endswith("_ptr"):
            sig[name] = "*" + TYPES[dtype]
        else:
            sig[name] = "fp32" if name in FLOAT_ARGS else "i32"
    return sig


def variants():
    """(kernel, dtype, constexprs, num_warps): each dtype at decode/prefill, plus the rank-dependent tiles."""
    for dtype in TYPES:
        for T, rank in ((1, 16), (128, 16)) + (((128, 64), (128, 256)) if dtype == torch.float16 else ()):
            yield bn._bottleneck_kernel, dtype, segments.launch_config(T, rank, dtype, 64), 4
            yield lora._lora_kernel, dtype, segments.launch_config(T, rank, dtype, 64), 4
        for H in (768, 4096):
            yield ia3._ia3_kernel, dtype, ia3.launch_config(128, H), 4
            yield ln._layer_norm_kernel, dtype, ln.launch_config(128, H), 4 if H <= 2048 else 8


def main() -> int:
    count, start = 0, time.time()
    seen = set()
    for fn, dtype, constexprs, num_warps in variants():
        key = (fn.__name__, dtype, tuple(sorted(constexprs.items())))
        if key in seen:
            continue
        seen.add(key)
        for target in TARGETS:
            src = ASTSource(fn=fn, signature=signature(fn, dtype, constexprs), constexprs=constexprs)
            compiled = triton.compile(src, target=target, options={"num_warps": num_warps})
            assert compiled.asm.get("cubin"), f"no cubin for {key} on sm_{target.arch}"
            count += 1
            print(f"ok sm_{target.arch} {fn.__name__} {TYPES[dtype]} {constexprs}", flush=True)
    print(f"compiled {count} variants in {time.time() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
