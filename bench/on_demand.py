"""Loading on first use: what `serve --load-on-demand` adds to the first request naming a store adapter (CPU).

K randomised classification adapters (bench/serve.py's, made with the `adapters` library) in an adapter store;
`adapterserve serve --threads 1 --adapter-store STORE --load-on-demand` in a subprocess, one client, calls one at a
time. Per adapter, in round-robin over the adapters: the first Classify naming it (the store is read, the adapter
validated and placed, then the forward), then REPEATS more (the forward alone). For comparison, an operator's
LoadAdapter of each store folder under another name, then that name's first Classify. Unknown names: the first
call (a look at the store) and a second within the 10 s the answer is remembered. Files are in the page cache
(written just before). Requests: one sentence of 12 words.

    python bench/on_demand.py            # records bench/results/on_demand.md (about a minute)
    python bench/on_demand.py --quick    # smoke test, records nothing
"""
import argparse
import datetime
import importlib.metadata
import importlib.util
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
BENCH = Path(__file__).resolve().parent
# `python bench/on_demand.py` puts bench/ first on sys.path, where bench/kernels.py would shadow `kernels`
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]
_spec = importlib.util.spec_from_file_location("bench_serve", BENCH / "serve.py")
serve = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(serve)

from engine.client import Client, RpcError  # noqa: E402

RESULTS = BENCH / "results" / "on_demand.md"
TEXT = ["the new service answers every request quickly and the team seems really happy today"]


def timed(call) -> float:
    start = time.perf_counter()
    call()
    return (time.perf_counter() - start) * 1000


def not_found(client: Client, name: str) -> None:
    try:
        client.classify(TEXT, name)
    except RpcError as exc:
        assert exc.reason == "ADAPTER_NOT_FOUND", exc
    else:
        raise AssertionError(f"{name} was found")


def measure(store: Path, names: list[str], repeats: int) -> tuple[dict[str, list[float]], serve.ServerProcess]:
    server = serve.ServerProcess({}, access_log=True, extra=("--adapter-store", str(store), "--load-on-demand"))
    times: dict[str, list[float]] = {k: [] for k in ("first", "later", "admin load", "admin first", "unknown first",
                                                     "unknown remembered")}
    with Client(server.target, timeout=120) as client:
        client.classify(TEXT, names[0])  # warm-up: the first forward of this process, and one load
        for name in names[1:]:
            times["first"].append(timed(lambda: client.classify(TEXT, name)))
            times["later"].extend(timed(lambda: client.classify(TEXT, name)) for _ in range(repeats))
            times["admin load"].append(timed(lambda: client.load_adapter(f"store://{name}", name=f"op-{name}")))
            times["admin first"].append(timed(lambda: client.classify(TEXT, f"op-{name}")))
            times["unknown first"].append(timed(lambda: not_found(client, f"nope/{name}")))
            times["unknown remembered"].append(timed(lambda: not_found(client, f"nope/{name}")))
    return times, server


def report(args, times: dict[str, list[float]], exit_code: int, load0: float) -> list[str]:
    versions = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in ("torch", "grpcio", "adapterserve"))
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    rows = {
        "first": "first Classify naming a store adapter (read, validate, place, forward)",
        "later": "later Classify calls naming it (the forward alone)",
        "admin load": "LoadAdapter of the same folder by an operator (the load alone)",
        "admin first": "first Classify after that LoadAdapter",
        "unknown first": "a name the store does not hold: first call (looks at the store)",
        "unknown remembered": "the same name again, within 10 s (answered from memory)",
    }
    added = statistics.median(times["first"]) - statistics.median(times["later"])
    return ["# Loading on first use (`serve --load-on-demand`, CPU, all-MiniLM-L6-v2)", "",
            f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
            f"- command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} python {' '.join(sys.argv)}`",
            f"- machine: {platform.platform()}, CPU {cpu}, {os.cpu_count()} logical cores, load average at start "
            f"{load0:.2f}, at end {os.getloadavg()[0]:.2f}; python {platform.python_version()}, {versions}",
            "- threads: server `--threads 1`; the client computes nothing (one call at a time)",
            f"- workload: {args.adapters} adapters ({', '.join(serve.METHODS)} in turn, classification heads), the "
            f"first used for warm-up; {args.repeats} later calls each; one sentence of 12 words per call; adapter "
            "files in the page cache", "",
            "| call | n | p50 ms | min ms | max ms |", "|---|---:|---:|---:|---:|",
            *(f"| {rows[k]} | {len(v)} | {statistics.median(v):.1f} | {min(v):.1f} | {max(v):.1f} |"
              for k, v in times.items()), "",
            f"- loading on first use adds **{added:.1f} ms** (p50 first - p50 later) to the first request naming an "
            "adapter",
            f"- server exit code after SIGTERM: {exit_code}", ""]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--adapters", type=int, default=17, help="adapters in the store (the first warms up)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="3 adapters, 2 repeats; records nothing")
    args = p.parse_args()
    if args.quick:
        args.adapters, args.repeats = 3, 2
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-on-demand-") as tmp:
        (Path(tmp) / "store").mkdir()
        folders = serve.make_adapters(Path(tmp) / "store", args.adapters)
        times, server = measure(Path(tmp) / "store", list(folders), args.repeats)
        exit_code = server.stop()
    lines = report(args, times, exit_code, load0)
    print("\n".join(lines), flush=True)
    if not args.quick:
        RESULTS.write_text("\n".join(lines))
        print(f"recorded {RESULTS}")


if __name__ == "__main__":
    main()
