"""The churn part of bench/lifecycle.py: a steady stream of forwards while adapters are loaded and unloaded,
by a thread (paced or back to back) or, as a control, by another process that shares no GIL and no lock."""
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine import Engine

LIFECYCLE = Path(__file__).resolve().parent / "lifecycle.py"


def token_batch(rows: int, seq_len: int, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1000, 20000, (rows, seq_len), generator=torch.Generator().manual_seed(rng.randrange(2**31)))
    return ids, torch.ones_like(ids)


CHURN_PERIOD_S = 0.05  # paced churn: one load and one unload every 50 ms


def churn_loop(engine, folders, stop: threading.Event, period: float | None, loads: list[int]) -> None:
    """Loads adapters and unloads the one loaded 4 steps before (at most 4 churned adapters at a time),
    every ``period`` seconds, or back to back when period is None."""
    i, next_at = 0, time.perf_counter()
    while not stop.is_set():
        engine.load_adapter(folders["bn_1mb" if i % 2 else "lora"], f"churn{i % 8}")
        if i >= 4:
            engine.unload_adapter(f"churn{(i - 4) % 8}")
        loads[0], i = loads[0] + 1, i + 1
        if period is not None:
            next_at += period
            stop.wait(max(0.0, next_at - time.perf_counter()))


class ChurnProcess:
    """The back-to-back churn on its own engine in another process, paused (SIGSTOP) between its blocks: it
    competes for the CPU like the churn thread but shares no GIL and no lock with the stream."""

    def __init__(self, folders):
        command = [sys.executable, str(LIFECYCLE), "--churn-child", str(folders["bn_1mb"]), str(folders["lora"])]
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        self.proc.stdout.readline()  # "ready"
        self.proc.send_signal(signal.SIGSTOP)

    def run(self, running: bool) -> None:
        self.proc.send_signal(signal.SIGCONT if running else signal.SIGSTOP)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def churn_child(bn_folder: str, lora_folder: str) -> None:
    engine = Engine.from_pretrained(device="cpu")
    print("ready", flush=True)
    churn_loop(engine, {"bn_1mb": Path(bn_folder), "lora": Path(lora_folder)}, threading.Event(), None, [0])


@dataclass
class ModeRecord:
    """What one churn mode measured, over all of its blocks."""

    latency_ms: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)  # the stream thread's own CPU time per forward
    loads: list[int] = field(default_factory=lambda: [0])  # churn loads, counted by the churn thread
    seconds: float = 0.0


def stream_block(engine, folders, names, period, child: ChurnProcess, per_block: int, record: ModeRecord, rng):
    """``per_block`` forwards with the churn of one mode running: None none, "process" the other process,
    else the churn thread with that period (0.0 = back to back)."""
    stop = threading.Event()
    thread = threading.Thread(target=churn_loop, args=(engine, folders, stop, period or None, record.loads))
    if isinstance(period, float):
        thread.start()
    child.run(period == "process")
    started = time.perf_counter()
    try:
        for _ in range(per_block):
            ids, mask = token_batch(8, 64, rng)
            adapters = [rng.choice(names) for _ in range(8)]
            start, start_cpu = time.perf_counter(), time.thread_time()
            engine.forward(ids, mask, adapters)
            record.latency_ms.append((time.perf_counter() - start) * 1e3)
            record.cpu_ms.append((time.thread_time() - start_cpu) * 1e3)
    finally:
        child.run(False)
        stop.set()
        if isinstance(period, float):
            thread.join()
    record.seconds += time.perf_counter() - started


def bench_churn(folders, blocks: int, per_block: int) -> tuple[list[str], float, float]:
    engine = Engine.from_pretrained(device="cpu")
    names = [f"s{i}" for i in range(16)]
    for i, name in enumerate(names):
        engine.load_adapter(folders["bn" if i % 2 else "lora"], name)
    rng = random.Random(0)
    paced = f"churn every {CHURN_PERIOD_S * 1e3:.0f} ms"
    modes = {"no churn": None, paced: CHURN_PERIOD_S, "churn back to back": 0.0,
             "control: back to back in another process": "process"}
    records = {mode: ModeRecord() for mode in modes}
    for _ in range(5):  # warm-up
        engine.forward(*token_batch(8, 64, rng), [rng.choice(names) for _ in range(8)])
    child = ChurnProcess(folders)
    try:
        for block in range(blocks * len(modes)):  # round-robin, so machine noise hits every mode alike
            mode = list(modes)[block % len(modes)]
            stream_block(engine, folders, names, modes[mode], child, per_block, records[mode], rng)
    finally:
        child.close()

    def pct(values, q):
        return statistics.quantiles(values, n=100, method="inclusive")[q - 1]

    base = records["no churn"].latency_ms
    lines = ["## Steady stream with and without load/unload churn", "",
             f"Closed loop of forwards of 8 rows x 64 tokens, rows drawn from 16 resident adapters; {blocks} blocks "
             f"of {per_block} forwards per mode, modes round-robin. The churn thread loads an adapter (~1 MB "
             "bottleneck or LoRA r8, alternately) and unloads the one loaded 4 steps before, paced or back to "
             "back. The control runs the same back-to-back churn in another process (no shared GIL or locks). "
             "`cpu` is the stream thread's own CPU time per forward.", "",
             "| stream | churn loads/s | forwards | p50 ms | p99 ms | max ms | cpu p50 ms | p50 ratio | p99 ratio |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    ratios = {}
    for mode, record in records.items():
        values = record.latency_ms
        ratios[mode] = pct(values, 99) / pct(base, 99)
        rate = f"{record.loads[0] / record.seconds:.1f}" if modes[mode] != "process" else "(same loop)"
        lines.append(f"| {mode} | {rate} | {len(values)} | {pct(values, 50):.1f} | {pct(values, 99):.1f} | "
                     f"{max(values):.1f} | {statistics.median(record.cpu_ms):.1f} | "
                     f"{pct(values, 50) / pct(base, 50):.2f}x | {ratios[mode]:.2f}x |")
    return lines + [""], ratios[paced], ratios["churn back to back"]
