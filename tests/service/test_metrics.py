"""Metrics: what a scrape of the server shows (counts by method and code, failed loads, residency, deadlines), and
per-adapter request counts (`serve --metrics-per-adapter N`): the N busiest adapters, every series a counter."""
import json
import logging
import random
import threading
import time

import grpc
import pytest

from engine.client import RpcError
from engine.service.metrics import REST, Metrics
from minilm import TEXTS
from scrape import requests_total, scrape


def _collect(metrics: Metrics) -> dict[tuple[str, str], float]:
    return {(s.labels["tenant"], s.labels["adapter"]): s.value for family in metrics.registry.collect()
            if family.name == "adapterserve_adapter_requests" for s in family.samples}


def test_off_by_default():
    metrics = Metrics()
    metrics.count_adapter("a", None)
    assert _collect(metrics) == {}


def test_adapters_of_one_name_under_two_tenants_are_two_series():
    metrics = Metrics(per_adapter_top=5)
    for tenant in ("acme", "globex", "globex", None):
        metrics.count_adapter("sentiment", tenant)
    metrics.count_adapter("other", None)  # a shared adapter may be called that: the rest's series is apart
    assert _collect(metrics) == {("acme", "sentiment"): 1, ("globex", "sentiment"): 2, ("", "sentiment"): 1,
                                ("", "other"): 1, REST: 0}


def test_a_zipf_stream_keeps_the_busiest_and_never_decreases_a_series():
    metrics, top = Metrics(per_adapter_top=5), 5
    rng = random.Random(0)
    names = [("acme" if i % 2 else "", f"adapter-{i}") for i in range(40)]
    weights = [1 / (rank + 1) ** 1.1 for rank in range(len(names))]
    totals = dict.fromkeys(names, 0)
    previous: dict[tuple[str, str], float] = {}
    for step in range(3000):
        name = rng.choices(names, weights)[0] if step > 200 else names[-1 - step % 10]  # late starters win later
        metrics.count_adapter(name[1], name[0] or None)
        totals[name] += 1
        now = _collect(metrics)  # after every request: a series cannot leave and come back in between
        assert len(now) == min(top, step + 1) + 1 and now[REST] >= previous.get(REST, 0)
        for adapter, value in now.items():  # a series that stayed has not gone down
            assert value >= previous.get(adapter, 0)
        kept = [totals[a] for a in now if a != REST]
        outside = [t for a, t in totals.items() if a not in now]
        assert min(kept) >= max(outside)  # no adapter outside the top was busier than one inside it
        previous = now
    assert set(previous) - {REST} == set(names[:top])  # the Zipf head, after the early tail had the series


def test_metrics_scrape_and_parse(server):
    with server.client() as client:
        client.classify(TEXTS, "sentiment")
        with pytest.raises(RpcError):
            client.classify(TEXTS, "nope")
    families = scrape(server)
    requests = requests_total(families)
    assert requests[("Classify", "OK")] >= 1 and requests[("Classify", "NOT_FOUND")] >= 1
    assert not [s for f in families.values() for s in f.samples if s.name.endswith("_created")]
    for name in ("adapterserve_request_duration_seconds", "adapterserve_batch_rows", "adapterserve_batch_distinct_adapters",
                 "adapterserve_prompt_tokens", "adapterserve_adapters_resident", "adapterserve_lora_requests_info",
                 "adapterserve_request_queue_time_seconds"):
        assert name in families, name
    assert "adapterserve_adapter_requests" not in families  # per-adapter series only when asked for
    lora = families["adapterserve_lora_requests_info"].samples[0]
    assert lora.labels["max_lora"] == "64" and lora.value > 1.7e9


def test_every_failed_load_is_counted(server, minilm_setup, tmp_path):
    def loads() -> dict[str, float]:
        return {s.labels["result"]: s.value for s in scrape(server)["adapterserve_adapter_loads"].samples
                if s.name == "adapterserve_adapter_loads_total"}

    before = loads()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{broken")
    with server.client() as admin:
        for source, code in (("", grpc.StatusCode.INVALID_ARGUMENT),  # refused before any file is read
                             (str(broken), grpc.StatusCode.FAILED_PRECONDITION)):
            with pytest.raises(RpcError) as failed:
                admin.load_adapter(source, name="x")
            assert failed.value.code == code
        admin.load_adapter(str(minilm_setup.folders["plain"]), name="again")
    after = loads()
    assert after["error"] - before.get("error", 0) == 2 and after["ok"] - before["ok"] == 1


def test_a_load_whose_client_gave_up_is_counted_when_it_ends(server, minilm_setup, monkeypatch):
    """The load goes on in its thread after the client's deadline; it was counted neither ok nor error (review)."""
    def loads() -> float:
        return next(s.value for s in scrape(server)["adapterserve_adapter_loads"].samples
                    if s.name == "adapterserve_adapter_loads_total" and s.labels["result"] == "ok")

    engine, before, done = server.server.engine, loads(), threading.Event()
    real = engine.load_adapter

    def slow_load(*args):
        time.sleep(1.5)
        try:
            return real(*args)
        finally:
            done.set()

    monkeypatch.setattr(engine, "load_adapter", slow_load)
    with server.client(timeout=0.5) as admin:
        with pytest.raises(RpcError) as gave_up:
            admin.load_adapter(str(minilm_setup.folders["plain"]), name="late")
    assert gave_up.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert done.wait(10)
    deadline = time.monotonic() + 5
    while loads() == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert loads() == before + 1 and engine.get_adapter("late").name == "late"


def test_per_adapter_counts_are_opt_in_and_keep_the_busiest(start_server, minilm_setup):
    running = start_server(metrics_per_adapter=1)
    with running.client() as client:
        for name in ("sentiment", "topics"):
            client.load_adapter(str(minilm_setup.folders[name]), name=name)
        client.classify(TEXTS, "sentiment")
        client.classify(TEXTS, "topics")  # ties with sentiment: counted in the rest (REST)
        with pytest.raises(RpcError):
            client.classify(TEXTS, "nope")  # unknown ids are never counted
        assert _adapter_requests(running) == {("", "sentiment"): 1, REST: 1}
        client.classify(TEXTS, "topics")  # now the busiest: takes the one series, starting afresh
        assert _adapter_requests(running) == {("", "topics"): 1, REST: 1}


def test_per_adapter_counts_name_the_owner_tenant(start_server, minilm_setup):
    running = start_server(metrics_per_adapter=5)
    operator, acme, globex = running.client(), running.client(tenant="acme"), running.client(tenant="globex")
    with operator, acme, globex:
        operator.load_adapter(str(minilm_setup.folders["sentiment"]), name="sentiment")  # shared
        acme.load_adapter(str(minilm_setup.folders["sentiment"]), name="own")
        operator.load_adapter(str(minilm_setup.folders["topics"]), name="own", tenant="globex")
        acme.classify(TEXTS, "sentiment")  # acme calls a shared adapter: counted for it, not for acme
        acme.classify(TEXTS, "own")
        globex.classify(TEXTS, "own")
        globex.classify(TEXTS, "own")  # the same name, another tenant's adapter: its own series
        assert _adapter_requests(running) == {("", "sentiment"): 1, ("acme", "own"): 1, ("globex", "own"): 2,
                                              REST: 0}


def _adapter_requests(running) -> dict[tuple[str, str], float]:
    samples = scrape(running)["adapterserve_adapter_requests"].samples
    return {(s.labels["tenant"], s.labels["adapter"]): s.value for s in samples
            if s.name == "adapterserve_adapter_requests_total"}


def test_calls_that_outlive_their_deadline_are_counted_and_logged(server, caplog):
    from adapterserve.v1 import inference_service_pb2 as pb
    from adapterserve.v1 import inference_service_pb2_grpc as pb_grpc

    caplog.set_level(logging.INFO, logger="adapterserve.access")
    request = pb.EmbedRequest(inputs=[pb.Input(text="word " * 200)] * 32)  # ~6,500 tokens: a second of CPU work
    with grpc.insecure_channel(server.target) as channel:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.InferenceServiceStub(channel).Embed(request, timeout=0.1)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline, counted = time.monotonic() + 10, {}
    while time.monotonic() < deadline and ("Embed", "DEADLINE_EXCEEDED") not in counted:
        time.sleep(0.05)  # the server notices the expiry just after the client
        counted = requests_total(scrape(server))
    assert counted.get(("Embed", "DEADLINE_EXCEEDED")) == 1, counted
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "adapterserve.access"]
    late = [line for line in lines if line["code"] == "DEADLINE_EXCEEDED"]
    assert len(late) == 1 and late[0]["peer"].startswith("ipv4:127.0.0.1:"), lines  # gRPC's peer() is "" by then


def test_residency_gauge_is_read_at_scrape_time(server, minilm_setup):
    def resident() -> dict[str, float]:
        return {s.labels["tier"]: s.value for s in scrape(server)["adapterserve_adapters_resident"].samples}

    before = resident()["device"]
    minilm_setup.engine.load_adapter(minilm_setup.folders["sentiment"], name="loaded-in-process")  # no admin RPC
    assert resident()["device"] == before + 1

