"""Draining: health flips to NOT_SERVING, connections close (GOAWAY), in-flight requests finish; SIGTERM exits 0."""
import asyncio
import collections
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine.client import Client, RpcError
from test_errors import BlockedEngine


def _health(target: str, service: str = "") -> int:
    with grpc.insecure_channel(target) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service)).status


def test_health_flips_the_server_closes_its_connections_and_in_flight_work_finishes(start_server, minilm_setup,
                                                                                   monkeypatch):
    running = start_server(grace_s=30)
    assert _health(running.target) == health_pb2.HealthCheckResponse.SERVING
    client, pinned = running.client(), running.client(timeout=5)
    assert len(pinned.embed(["connected before the drain"])[0]) == 384
    blocked = BlockedEngine(minilm_setup.engine, monkeypatch)
    results = []
    in_flight = threading.Thread(target=lambda: results.append(client.embed(["still served"])))
    in_flight.start()
    while not blocked.calls:
        time.sleep(0.01)
    drain = asyncio.run_coroutine_threadsafe(running.server.drain(), running.loop)
    for service in ("", "adapterserve.v1.InferenceService"):  # asked of the servicer: the server takes no calls now
        status = running.run(running.server.health.Check(health_pb2.HealthCheckRequest(service=service), None))
        assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING, service
    # the server takes no new calls: it used to answer them (NOT_SERVING, SERVER_SHUTTING_DOWN) until the drain
    # ended, so a client whose one connection led here had every retry refused here for as long
    deadline = time.monotonic() + 10
    while True:
        try:
            _health(running.target)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE
            break
        assert time.monotonic() < deadline, "the draining server still takes new calls"
        time.sleep(0.02)
    # GOAWAY: the open connection closed, so the client's call goes elsewhere (behind a Service, another pod; here
    # nothing is left to take it) and never reaches this server
    with pytest.raises(RpcError) as refused:
        pinned.embed(["arrived during the drain"])
    assert (refused.value.code, refused.value.reason) == (grpc.StatusCode.UNAVAILABLE, "")
    assert not drain.done()  # the accepted call holds the drain
    blocked.release.set()
    drain.result(30)
    in_flight.join(30)
    assert len(results) == 1 and len(results[0][0]) == 384
    client.close()
    pinned.close()


def _serve(grace_s: float, env: dict) -> tuple[subprocess.Popen, int]:
    """`adapterserve serve` in a process of its own, and its port once it serves."""
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "serve", "--port", "0", "--host", "127.0.0.1",
                             "--metrics-port", "-1", "--threads", "1", "--grace-seconds", str(grace_s)],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    for line in proc.stderr:
        match = re.search(r"serving on 127\.0\.0\.1:(\d+)", line)
        if match:
            return proc, int(match.group(1))
    raise AssertionError(f"server did not start (exit {proc.wait(60)})")


@pytest.mark.slow
def test_sigterm_loses_no_accepted_request(tmp_path):
    proc, port = _serve(30, {"HF_HUB_OFFLINE": "1"})
    log: list[str] = []
    reading = threading.Thread(target=lambda: log.extend(proc.stderr))  # keeps the pipe drained
    reading.start()
    outcomes, stop = [], threading.Event()

    def worker(i):
        with Client(f"127.0.0.1:{port}", timeout=60) as client:
            while not stop.is_set():
                try:
                    vectors = client.embed([f"sentence number {i} " * 20] * 4)
                    outcomes.append("ok" if len(vectors) == 4 else "wrong")
                except RpcError as exc:
                    outcomes.append(exc.code.name)  # refused at the door while draining: allowed
                    return

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    while outcomes.count("ok") < 8:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    stop.set()
    for t in threads:
        t.join(60)
    assert proc.wait(60) == 0
    reading.join(10)
    refused = [o for o in outcomes if o != "ok"]
    assert set(refused) <= {"UNAVAILABLE"}, outcomes  # refused at the door, or cancelled unrun and sent again
    assert outcomes.count("ok") >= 8
    # and what the server took it finished: a call it cancelled after its handler began would end UNAVAILABLE above
    # too (sent again, to a closed port), but its handler logs it
    codes = collections.Counter(json.loads(line.split(" adapterserve.access ", 1)[1])["code"]
                                for line in log if " adapterserve.access " in line)
    assert set(codes) <= {"OK", "UNAVAILABLE"} and codes["OK"] == outcomes.count("ok"), codes


@pytest.mark.slow
def test_sigterm_while_the_model_loads_exits_0():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "serve", "--port", "0", "--host", "127.0.0.1",
                             "--metrics-port", "-1", "--threads", "1"], stderr=subprocess.PIPE, text=True, env=env)
    for line in proc.stderr:
        if "loading base model" in line:  # printed after the handler is in place, before the model loads
            break
    proc.send_signal(signal.SIGTERM)
    rest = proc.stderr.read()
    assert proc.wait(60) == 0, rest
    assert "SIGTERM before serving; stopping" in rest and "serving on" not in rest


def test_sigterm_exits_while_an_adapter_download_hangs(tmp_path):
    # a hub that accepts connections and never answers; the load's thread waits on it. asyncio.run joined the
    # thread pool those loads ran on at exit, so the server exited only when the download gave up
    silent = socket.create_server(("127.0.0.1", 0))
    proc, port = _serve(1, {"HF_HUB_OFFLINE": "0", "HF_HUB_ETAG_TIMEOUT": "60", "HF_HUB_DOWNLOAD_TIMEOUT": "60",
                            "HF_ENDPOINT": f"http://127.0.0.1:{silent.getsockname()[1]}",
                            "HF_HOME": str(tmp_path / "hf")})
    try:
        threading.Thread(target=proc.stderr.read, daemon=True).start()  # keeps the pipe drained
        with Client(f"127.0.0.1:{port}", timeout=1) as client:
            for i in range(8):  # more than asyncio's shared pool has workers here
                with pytest.raises(RpcError) as info:
                    client.load_adapter(f"someone/adapter-{i}")
                assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert time.monotonic() - started < 10
    finally:
        proc.kill()
        silent.close()
