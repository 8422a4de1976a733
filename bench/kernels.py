"""Adapter-op benchmark on a CUDA GPU: Triton kernel vs. a torch loop over adapters vs. the torch reference.

For each op (bottleneck, add_lora, scale_ia3, layer_norm_rows), adapters in the pool n in {1, 8, 64, 256}
(row i uses slot i * n // rows, so at n = 256 the 64 rows touch 64 slots spread over the table), decode
(64 rows x 1 token) and prefill (64 rows x 128 tokens), H in {768, 4096}, per-slot ranks drawn in 8..64
(tables padded to 64). Times are triton.testing.do_bench medians. Bandwidth counts the bytes an ideal
implementation must move: activations in and out, plus each used slot's weights once (at its own rank);
it is reported as a fraction of the device's peak memory bandwidth. Each config is checked against the
reference before it is timed.

    python bench/kernels.py                 # records bench/results/kernels.md
    python bench/kernels.py --quick         # H=768 only, prints, records nothing
Without CUDA it exits with status 2 and writes nothing.
"""
import argparse
import datetime
import os
import platform
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# `python bench/kernels.py` puts bench/ first on sys.path, where this file would shadow the package
sys.path = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

RESULTS = HERE / "results" / "kernels.md"
ROWS, PREFILL_T, MAX_RANK = 64, 128, 64
# Peak DRAM bandwidth (bytes/s) by device-name substring, most specific first (vendor data sheets).
PEAK_BW = (("H200", 4.8e12), ("GH200", 4.0e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12),
           ("B200", 8.0e12), ("A100-SXM4-80GB", 2.039e12), ("A100 80GB PCIe", 1.935e12), ("A100", 1.555e12),
           ("L40S", 8.64e11), ("L40", 8.64e11), ("L4", 3.0e11), ("A10G", 6.0e11), ("A10", 6.0e11),
           ("RTX 4090", 1.008e12), ("V100", 9.0e11), ("T4", 3.2e11))


def peak_bandwidth(name: str) -> float | None:
    return next((bw for key, bw in PEAK_BW if key in name), None)


def make_case(n_adapters: int, T: int, H: int, dtype, gen, dev: str = "cuda") -> dict:
    """Tables for n_adapters slots (zero padding beyond each rank, as in the pool), rows and activations."""
    from kernels.activations import Act

    S, R = n_adapters, MAX_RANK
    ranks = torch.randint(8, MAX_RANK + 1, (S,), generator=gen, dtype=torch.int32)
    cols = torch.arange(R)[None, :] < ranks[:, None].long()  # [S, R] live columns

    def rand(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(dtype)

    slots = torch.tensor([i * S // ROWS for i in range(ROWS)])
    case = dict(
        slots=slots.to(dev), ranks=ranks.to(dev), used=sorted(set(slots.tolist())), ranks_host=ranks.tolist(),
        x=rand(ROWS, T, H).to(dev), y=rand(ROWS, T, H).to(dev),
        w_down=(rand(S, R, H, std=H ** -0.5) * cols[:, :, None]).to(dev),
        b_down=(rand(S, R, std=0.1) * cols).to(dev),
        w_up=(rand(S, R, H, std=R ** -0.5) * cols[:, :, None]).to(dev),
        b_up=rand(S, H, std=0.1).to(dev), scaling=(1 + rand(S, H, std=0.1)).to(dev),
        act_ids=torch.randint(0, len(Act), (S,), generator=gen, dtype=torch.int32).to(dev),
        lora_a=(rand(S, R, H, std=H ** -0.5) * cols[:, :, None]).to(dev),
        lora_b=(rand(S, R, H, std=R ** -0.5) * cols[:, :, None]).to(dev),
        lora_scaling=torch.rand(S, generator=gen).to(dev),
        ia3=torch.ones(S, H, dtype=dtype, device=dev),  # exactly 1: repeated in-place timing keeps y unchanged
        ln_w=(1 + rand(S, H, std=0.1)).to(dev), ln_b=rand(S, H, std=0.1).to(dev),
    )
    case["acts_host"] = case["act_ids"].tolist()
    case["groups"] = [(s, (slots == s).nonzero().squeeze(1).to(dev)) for s in case["used"]]  # host-side, as a batcher
    return case


def ops(mod: dict, c: dict) -> dict:
    """op -> (kernel fn, loop fn, reference fn, ideal bytes); every fn returns the op's output."""
    from kernels import activations, reference

    x, y, slots = c["x"], c["y"], c["slots"]
    B, T, H = x.shape
    e, ranks = x.element_size(), c["ranks_host"]
    act_bytes = B * T * H * e

    def bn_loop():
        for s, rows in c["groups"]:
            r = ranks[s]
            z = x[rows] @ c["w_down"][s, :r].T + c["b_down"][s, :r]
            z = activations.apply_act(z, activations.Act(c["acts_host"][s]))
            y[rows] += (z @ c["w_up"][s, :r] + c["b_up"][s]) * c["scaling"][s]
        return y

    def lora_loop():
        for s, rows in c["groups"]:
            r = ranks[s]
            y[rows] += c["lora_scaling"][s] * ((x[rows] @ c["lora_a"][s, :r].T) @ c["lora_b"][s, :r])
        return y

    def ia3_loop():
        for s, rows in c["groups"]:
            y[rows] *= c["ia3"][s]
        return y

    def ln_loop():
        out = torch.empty_like(x)
        for s, rows in c["groups"]:
            out[rows] = F.layer_norm(x[rows], (H,), c["ln_w"][s], c["ln_b"][s], 1e-5)
        return out

    bn_args = (y, x, c["w_down"], c["b_down"], c["w_up"], c["b_up"], c["scaling"], c["act_ids"], c["ranks"], slots)
    lora_args = (y, x, c["lora_a"], c["lora_b"], c["lora_scaling"], c["ranks"], slots)
    used = c["used"]
    return {
        "bottleneck": (lambda: mod["bottleneck"].bottleneck(*bn_args), bn_loop, lambda: reference.bottleneck(*bn_args),
                       3 * act_bytes + sum((2 * H + 1) * ranks[s] + 2 * H for s in used) * e),
        "add_lora": (lambda: mod["lora"].add_lora(*lora_args), lora_loop, lambda: reference.add_lora(*lora_args),
                     3 * act_bytes + sum(2 * H * ranks[s] for s in used) * e),
        "scale_ia3": (lambda: mod["ia3"].scale_ia3(y, c["ia3"], slots), ia3_loop,
                      lambda: reference.scale_ia3(y, c["ia3"], slots), 2 * act_bytes + len(used) * H * e),
        "layer_norm_rows": (lambda: mod["layernorm"].layer_norm_rows(x, c["ln_w"], c["ln_b"], 1e-5, slots), ln_loop,
                            lambda: reference.layer_norm_rows(x, c["ln_w"], c["ln_b"], 1e-5, slots),
                            2 * act_bytes + len(used) * 2 * H * e),
    }


def check(kernel, ref, y: torch.Tensor, dtype) -> str:
    """Kernel vs reference on the bench data; y (updated in place by three of the ops) is restored after each."""
    y0 = y.clone()
    got = kernel().float()
    y.copy_(y0)
    want = ref().float()
    y.copy_(y0)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    err = (got - want).abs().max().item()
    return f"ok {err:.0e}" if err <= tol * (1 + want.abs().max().item()) else f"MISMATCH {err:.1e}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--quick", action="store_true", help="H=768 only; prints, records nothing")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/kernels.py needs a CUDA GPU (the Triton kernels are only meaningful compiled); "
              "nothing measured, nothing written.", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: interpreted kernels would be timed", file=sys.stderr)
        return 2

    import triton
    from triton.testing import do_bench

    import kernels  # noqa: F401  (imports the Triton modules)

    mod = {m: sys.modules[f"kernels.{m}"] for m in ("bottleneck", "lora", "ia3", "layernorm")}
    dtype, props = getattr(torch, args.dtype), torch.cuda.get_device_properties(0)
    peak = peak_bandwidth(props.name)
    gen = torch.Generator().manual_seed(0)
    header = ("| op | H | phase | adapters | slots used | kernel us | loop us | reference us | kernel GB/s "
              "| kernel % peak | vs loop | vs reference | check |\n"
              "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    lines = [header]
    print(header, flush=True)
    for H in ((768,) if args.quick else (768, 4096)):
        for phase, T in (("decode", 1), ("prefill", PREFILL_T)):
            for n in (1, 8, 64, 256):
                case = make_case(n, T, H, dtype, gen)
                for name, (kernel, loop, ref, nbytes) in ops(mod, case).items():
                    status = check(kernel, ref, case["y"], dtype)
                    t_k, t_l, t_r = (do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3
                                     for fn in (kernel, loop, ref))
                    gbs = nbytes / (t_k * 1e-6) / 1e9
                    frac = f"{100 * gbs * 1e9 / peak:.0f}%" if peak else "n/a"
                    line = (f"| {name} | {H} | {phase} | {n} | {len(case['used'])} | {t_k:.1f} | {t_l:.1f} | {t_r:.1f} "
                            f"| {gbs:.0f} | {frac} | {t_l / t_k:.2f}x | {t_r / t_k:.2f}x | {status} |")
                    lines.append(line)
                    print(line, flush=True)
                del case
                torch.cuda.empty_cache()
    if args.quick:
        return 0
    meta = [
        "# Adapter ops: Triton kernels vs. torch loop over adapters vs. torch gather+bmm reference",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        f"- command: `python {' '.join(sys.argv)}`",
        f"- machine: {props.name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB; "
        f"peak bandwidth {peak / 1e12:.2f} TB/s (table in bench/kernels.py)" if peak else
        f"- machine: {props.name} (peak bandwidth unknown: add it to PEAK_BW)",
        f"- host: {platform.platform()}, python {platform.python_version()}",
        f"- versions: torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}",
        f"- {args.dtype}; {ROWS} rows; decode T=1, prefill T={PREFILL_T}; ranks 8..{MAX_RANK} per slot (padded to "
        f"{MAX_RANK}); LoRA K=N=H; do_bench median (warmup 25 ms, rep 100 ms)",
        "- GB/s = ideal bytes (activations in/out + used slots' weights once, at their rank) / kernel time",
        "", *lines, "",
    ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(meta))
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
