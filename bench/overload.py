"""Overload benchmark: how many calls a flooded server answers within their deadline (goodput).

The server (`adapterserve serve --threads 1 --no-access-log`, the embedded all-MiniLM-L6-v2, no adapter) is
flooded for ``--seconds`` by one AsyncClient process keeping ``--outstanding`` Embed calls of 8 equal sentences in
flight, each with the same gRPC timeout; every timeout in ``--timeouts`` is one run. Outcomes: answered in time,
dropped by the server before compute (DEADLINE_EXCEEDED with its reason), and expired at the client (no reason).
``--baseline-tree DIR`` runs the same floods against a server started from another checkout (a `git worktree` of
an older commit), interleaved with this one, so the two builds compare on one machine in one run.

    python bench/overload.py                                # records bench/results/overload.md (about 2 minutes)
    git worktree add /tmp/base <commit>; python bench/overload.py --baseline-tree /tmp/base
"""
import argparse
import asyncio
import collections
import datetime
import os
import platform
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

# `python bench/overload.py` puts bench/ first on sys.path, where bench/kernels.py would shadow the `kernels` package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "overload.md"
TEXT = "The movie was wonderful and moving, a story about Paris and France."


def _start(tree: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "serve", "--port", "0", "--host", "127.0.0.1",
                             "--metrics-port", "-1", "--threads", "1", "--no-access-log"],
                            cwd=tree, env=env, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        match = re.search(r"serving on 127\.0\.0\.1:(\d+)", line)
        if match:
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keeps the pipe drained
            return proc, f"127.0.0.1:{match.group(1)}"
    raise RuntimeError(f"the server in {tree} did not start")


async def _flood(target: str, seconds: float, outstanding: int, timeout: float) -> collections.Counter:
    from engine.client import AsyncClient, RpcError

    outcomes: collections.Counter = collections.Counter()
    clients = [AsyncClient(target, timeout=timeout) for _ in range(4)]

    async def one(client):
        try:
            await client.embed([TEXT] * 8)
            outcomes["in time"] += 1
        except RpcError as exc:
            outcomes["dropped by the server" if exc.reason == "DEADLINE_EXCEEDED" else
                     "expired at the client" if exc.code.name == "DEADLINE_EXCEEDED" else exc.code.name] += 1
    tasks: set = set()
    stop, sent = time.monotonic() + seconds, 0
    while time.monotonic() < stop:
        while len(tasks) < outstanding:
            task = asyncio.ensure_future(one(clients[sent % len(clients)]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            sent += 1
        await asyncio.sleep(0.01)
    await asyncio.gather(*tasks)
    for client in clients:
        await client.close()
    return outcomes


def _run(tree: Path, args, timeout: float) -> collections.Counter:
    proc, target = _start(tree)
    try:
        return asyncio.run(_flood(target, args.seconds, args.outstanding, timeout))
    finally:
        proc.terminate()
        proc.wait(60)


def _commit(tree: Path) -> str:
    return subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip() or "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--outstanding", type=int, default=600)
    parser.add_argument("--timeouts", type=float, nargs="+", default=[0.3, 1.5])
    parser.add_argument("--baseline-tree", type=Path)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    builds = [("this build", ROOT)] + ([("baseline", args.baseline_tree)] if args.baseline_tree else [])
    kinds = ["in time", "dropped by the server", "expired at the client"]
    lines = ["| build (commit) | timeout s | answered in time | in time /s | " + " | ".join(kinds[1:]) + " | other |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for timeout in args.timeouts:
        for name, tree in builds:  # interleaved: each timeout runs both builds back to back
            got = _run(tree, args, timeout)
            other = {k: v for k, v in got.items() if k not in kinds}
            lines.append(f"| {name} ({_commit(tree)}) | {timeout:g} | {got['in time']} | "
                         f"{got['in time'] / args.seconds:.1f} | {got['dropped by the server']} | "
                         f"{got['expired at the client']} | {other or ''} |")
            print(lines[-1], flush=True)
    command = "python bench/overload.py " + " ".join(sys.argv[1:])
    from importlib import metadata
    report = ["# Overload: calls answered within their deadline (CPU, all-MiniLM-L6-v2, no adapter)", "",
              f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
              f"- command: `{command.strip()}`",
              f"- machine: {platform.platform()}, {os.cpu_count()} logical cores; server on 1 torch thread, "
              "the flooding client in a second process (no torch work)",
              f"- python {platform.python_version()}, torch {metadata.version('torch')}, "
              f"grpcio {metadata.version('grpcio')}",
              f"- flood: {args.outstanding} Embed calls of 8 sentences in flight for {args.seconds:g} s per row", "",
              *lines, "",
              "Dropping a call whose deadline comes before a forward could end (the scheduler's estimate) leaves the "
              "forwards to calls that can still be answered; a timeout shorter than one forward is not met under a "
              "full queue either way. Single runs: compare builds within a row pair, not across machines.", ""]
    print("\n".join(report))
    if not args.no_record:
        RESULTS.write_text("\n".join(report))


if __name__ == "__main__":
    main()
