"""serve --load-on-demand: a request naming a store adapter nobody loaded loads it once, shared; nothing else."""
import asyncio
import collections
import errno
import logging
import shutil
import threading
import time

import grpc
import pytest

from engine import Engine, EngineConfig
from engine.adapters.store import AdapterStore
from engine.cli import main
from engine.client import AsyncClient, RpcError
from engine.service.on_demand import MAX_READS, OnDemandLoader
from minilm import TEXTS
from scrape import scrape


def _loads(running) -> dict[str, float]:
    family = scrape(running)["adapterserve_adapter_on_demand_loads"]
    return {s.labels["result"]: s.value for s in family.samples if s.name.endswith("_total")}


class StalledStore:
    """AdapterStore.folder as on a stalled mount for the sources ``hangs`` picks, until ``release`` is set."""

    def __init__(self, monkeypatch, hangs):
        self.release, self.looks, real_folder = threading.Event(), [], AdapterStore.folder

        def stalled(store, source):
            if hangs(source):
                self.looks.append(source)
                self.release.wait(60)
            return real_folder(store, source)

        monkeypatch.setattr(AdapterStore, "folder", stalled)


@pytest.fixture(scope="module")
def store_engine(minilm_setup, tmp_path_factory):
    store = tmp_path_factory.mktemp("on_demand") / "store"
    for name in ("sentiment", "ner", "topics"):
        shutil.copytree(minilm_setup.folders[name], store / "minilm" / name)
    shutil.copytree(minilm_setup.folders["sentiment"], store / "broken")
    (store / "broken" / "adapter_config.json").write_text("{not json")
    return Engine(EngineConfig(device="cpu", adapter_store=str(store)))


def _settle(engine: Engine) -> None:
    """Waits for the load threads still running (a released hung read goes on to load its adapter), then unloads
    everything: the next test starts with nothing loaded."""
    deadline = time.monotonic() + 30
    while any(t.name.startswith("adapter-") for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.02)
    for info in engine.list_adapters():
        engine.unload_adapter(info.name, info.tenant)


@pytest.fixture()
def on_demand(start_server, store_engine):
    yield start_server(engine=store_engine, load_on_demand=True)
    _settle(store_engine)


def test_a_store_adapter_is_loaded_on_first_use_once_and_shared(on_demand, store_engine, minilm_setup, caplog):
    async def many():  # 8 calls at once, before any load ended: one load, every call answered
        async with AsyncClient(on_demand.target, tenant="acme") as client:
            return await asyncio.gather(*(client.classify(TEXTS, "minilm/sentiment") for _ in range(8)))

    with caplog.at_level(logging.INFO, "adapterserve.on_demand"):
        answers = asyncio.run(many())
    assert [r.message for r in caplog.records].count(
        "loaded adapter 'minilm/sentiment' from store://minilm/sentiment on first use (bottleneck, "
        f"{store_engine.get_adapter('minilm/sentiment').num_params} parameters)") == 1
    assert _loads(on_demand) == {"ok": 1.0}
    store_engine.load_adapter(str(minilm_setup.folders["sentiment"]), name="explicit")
    want = store_engine.classify(TEXTS, "explicit")
    for answer in answers:
        assert [a.label for a in answer] == [w.label for w in want]
        for got, expected in zip(answer, want):
            assert got.scores == pytest.approx(expected.scores, abs=1e-6)
    info = store_engine.get_adapter("minilm/sentiment")
    assert (info.tenant, info.source) == (None, "store://minilm/sentiment")  # shared: the catalog is everyone's
    with on_demand.client(tenant="globex") as globex:
        assert len(globex.tag(TEXTS, "minilm/ner")) == 3  # Tag and Embed load too
        assert len(globex.embed(TEXTS, "minilm/topics")) == 3
    assert _loads(on_demand) == {"ok": 3.0}


def test_what_the_store_does_not_hold_is_not_found_and_not_looked_up_again(on_demand, store_engine):
    with on_demand.client() as client:
        for name in ("minilm/nope", "../store/minilm/sentiment", "minilm//sentiment", "./minilm/sentiment", "/etc",
                     "a" * 256, "minilm"):
            with pytest.raises(RpcError) as info:
                client.classify(TEXTS, name)
            assert info.value.code == grpc.StatusCode.NOT_FOUND and "is not loaded" in info.value.message, name
        with pytest.raises(RpcError) as again:
            client.classify(TEXTS, "minilm/nope")
        assert again.value.code == grpc.StatusCode.NOT_FOUND
    # other names of a store folder are not its name; every name is looked at once: the second "minilm/nope"
    # not at all (remembered)
    assert _loads(on_demand) == {"not_in_store": 7.0} and not store_engine.list_adapters()


def test_a_broken_store_adapter_answers_its_error_and_is_not_read_for_every_request(on_demand):
    with on_demand.client() as client:
        for _ in range(3):
            with pytest.raises(RpcError) as info:
                client.classify(TEXTS, "broken")
            assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION, info.value
            assert "adapter_config.json" in info.value.message
    assert _loads(on_demand) == {"error": 1.0}
    with on_demand.client() as client:
        assert client.list_adapters() == []


def test_the_store_is_looked_at_again_after_the_retry_window(on_demand, store_engine, minilm_setup):
    with on_demand.client() as client:
        with pytest.raises(RpcError) as info:
            client.classify(TEXTS, "later/sentiment")
        assert info.value.code == grpc.StatusCode.NOT_FOUND
        shutil.copytree(minilm_setup.folders["sentiment"], store_engine.adapters.store.root / "later" / "sentiment")
        with pytest.raises(RpcError):  # remembered for RETRY_AFTER_S
            client.classify(TEXTS, "later/sentiment")
        on_demand.server.inference.on_demand.retry_after_s = 0.0  # as if that window had passed
        assert len(client.classify(TEXTS, "later/sentiment")) == 3
    assert _loads(on_demand) == {"not_in_store": 1.0, "ok": 1.0}


def test_loaded_adapters_are_never_replaced_and_without_the_flag_nothing_loads(start_server, store_engine,
                                                                                 minilm_setup, monkeypatch):
    off = start_server(engine=store_engine)
    with off.client() as client, pytest.raises(RpcError) as info:
        client.classify(TEXTS, "minilm/sentiment")
    assert info.value.code == grpc.StatusCode.NOT_FOUND and not store_engine.list_adapters()
    running = start_server(engine=store_engine, load_on_demand=True)
    topics = str(minilm_setup.folders["topics"])
    try:
        # a tenant's own adapter of that name is what the tenant gets, and nothing is loaded for it
        store_engine.load_adapter(topics, name="minilm/sentiment", tenant="acme")
        with running.client(tenant="acme") as acme:
            assert set(acme.classify(TEXTS, "minilm/sentiment")[0].scores) == {"art", "geo", "film"}
        assert _loads(running) == {}
        with running.client(tenant="globex") as globex:  # another tenant gets the store's, shared
            assert set(globex.classify(TEXTS, "minilm/sentiment")[0].scores) == {"neg", "pos"}
        assert store_engine.get_adapter("minilm/sentiment", "acme").source == topics
        # a shared one an operator loads while a load on first use runs stays: that load does not overwrite
        real_folder = AdapterStore.folder

        def operator_first(self, source):
            if source == "store://minilm/ner":
                store_engine.load_adapter(topics, name="minilm/ner")
            return real_folder(self, source)

        monkeypatch.setattr(AdapterStore, "folder", operator_first)
        with running.client(tenant="globex") as globex:
            assert set(globex.classify(TEXTS, "minilm/ner")[0].scores) == {"art", "geo", "film"}
        assert store_engine.get_adapter("minilm/ner").source == topics
        assert _loads(running) == {"ok": 1.0, "taken": 1.0}  # globex's minilm/sentiment, then this one
    finally:
        for adapter in store_engine.list_adapters():
            store_engine.unload_adapter(adapter.name, adapter.tenant)


def test_load_on_demand_needs_a_store(minilm_setup, capsys):
    from engine.service.metrics import Metrics

    with pytest.raises(ValueError, match="needs an adapter store"):
        OnDemandLoader(minilm_setup.engine, Metrics())
    assert main(["serve", "--load-on-demand", "--port", "0"]) == 2
    assert "--load-on-demand loads from the adapter store: pass --adapter-store DIR" in capsys.readouterr().err


def test_a_stalled_store_holds_only_its_own_callers(start_server, store_engine, minilm_setup, monkeypatch):
    # reads hung on a stalled mount took every worker of asyncio's shared pool: admin loads and the drain waited
    release = StalledStore(monkeypatch, lambda source: source.startswith("store://stall/")).release
    running = start_server(engine=store_engine, load_on_demand=True, grace_s=2)
    try:
        async def flood():
            async with AsyncClient(running.target, timeout=2) as client:
                return await asyncio.gather(*(client.classify(TEXTS, f"stall/{i}") for i in range(12)),
                                            return_exceptions=True)

        codes = collections.Counter(answer.code for answer in asyncio.run(flood()))
        # MAX_READS names wait for their reads; the others are told to come back (after the retries the client
        # makes within its deadline)
        assert set(codes) <= {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
        assert codes[grpc.StatusCode.RESOURCE_EXHAUSTED] >= 12 - MAX_READS, codes
        with running.client(timeout=0.5) as admin:  # operators' loads hung on the same mount
            for i in range(8):
                with pytest.raises(RpcError) as info:
                    admin.load_adapter(f"store://stall/{i}", name=f"stalled-{i}")
                assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        with running.client(timeout=10) as admin:  # a local folder: nothing to do with the store
            started = time.monotonic()
            admin.load_adapter(str(minilm_setup.folders["sentiment"]), name="explicit")
            assert time.monotonic() - started < 5
            assert len(admin.classify(TEXTS, "explicit")) == 3
            with pytest.raises(RpcError) as info:  # until a hung read ends, MAX_READS is all the store gets
                admin.classify(TEXTS, "minilm/sentiment")
            assert info.value.reason == "ADAPTER_LOADS_BUSY"
        started = time.monotonic()
        running.run(running.server.drain())  # with twelve reads still hung
        assert time.monotonic() - started < 8
    finally:
        release.set()
        _settle(store_engine)


def test_requests_refused_anyway_load_nothing_and_unloads_last_until_the_next_request(on_demand, store_engine):
    with on_demand.client(tenant="acme\u200b") as bad, pytest.raises(RpcError) as info:
        bad.classify(TEXTS, "minilm/sentiment")
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and not store_engine.list_adapters()
    with on_demand.client() as client:
        for call in (lambda: client.classify([], "minilm/sentiment"), lambda: client.tag(TEXTS * 100, "minilm/ner"),
                     lambda: client.embed([], "minilm/topics")):
            with pytest.raises(RpcError) as info:
                call()
            assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and not store_engine.list_adapters()
    with on_demand.client() as client:
        client.classify(TEXTS, "minilm/sentiment")
        client.unload_adapter("minilm/sentiment")
        assert client.list_adapters() == []
        assert len(client.classify(TEXTS, "minilm/sentiment")) == 3  # the store decides what is served
        on_demand.server.inference.draining = True
        client.unload_adapter("minilm/sentiment")
        with pytest.raises(RpcError) as info:
            client.classify(TEXTS, "minilm/sentiment")
        assert info.value.code == grpc.StatusCode.UNAVAILABLE and client.list_adapters() == []
    on_demand.server.inference.draining = False


def test_a_remembered_error_keeps_no_request(on_demand):
    with on_demand.client() as client, pytest.raises(RpcError):
        client.classify(["x" * 100_000], "broken")
    _, error = on_demand.server.inference.on_demand._failed["broken"]
    assert "adapter_config.json" in str(error)
    assert (error.__traceback__, error.__context__, error.__cause__) == (None, None, None)


def test_callers_wait_for_a_hung_read_at_most_the_wait_limit(on_demand, store_engine, monkeypatch):
    stalled = StalledStore(monkeypatch, lambda source: source == "store://minilm/sentiment")
    release, looks = stalled.release, stalled.looks
    on_demand.server.inference.on_demand.wait_s = 0.5
    with on_demand.client() as client:
        for _ in range(2):  # the second from memory: no second read starts
            with pytest.raises(RpcError) as info:
                client.classify(TEXTS, "minilm/sentiment")
            assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
            assert "the adapter store gave no answer within 0.5 s; tried again after 10 s" in info.value.message
        assert len(looks) == 1
        release.set()  # the read ends: it loads after all, and the next request finds it
        deadline = time.monotonic() + 30
        while not store_engine.list_adapters() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(client.classify(TEXTS, "minilm/sentiment")) == 3
    assert _loads(on_demand) == {"error": 1.0}


def test_a_folder_inside_an_adapters_folder_is_not_loaded(on_demand, store_engine, minilm_setup):
    inner = store_engine.adapters.store.root / "minilm" / "sentiment" / "checkpoint-1"
    shutil.copytree(minilm_setup.folders["topics"], inner)
    try:
        assert "minilm/sentiment/checkpoint-1" not in {e.name for e in store_engine.catalog()}
        with on_demand.client() as client, pytest.raises(RpcError) as info:
            client.classify(TEXTS, "minilm/sentiment/checkpoint-1")
        assert info.value.code == grpc.StatusCode.NOT_FOUND and not store_engine.list_adapters()
    finally:
        shutil.rmtree(inner)


def test_a_drain_refuses_the_callers_waiting_for_a_hung_read(start_server, store_engine, monkeypatch):
    release = StalledStore(monkeypatch, lambda source: source == "store://minilm/sentiment").release
    running = start_server(engine=store_engine, load_on_demand=True, grace_s=20)
    try:
        async def call_then_drain():
            async with AsyncClient(running.target, timeout=20) as client:
                waiting = asyncio.ensure_future(client.classify(TEXTS, "minilm/sentiment"))
                await asyncio.sleep(1.0)
                started = time.monotonic()
                drain = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(running.server.drain(), running.loop))
                with pytest.raises(RpcError) as info:  # the client retries UNAVAILABLE: on a closed port here
                    await waiting
                await drain
                return info.value.code, time.monotonic() - started

        code, took = asyncio.run(call_then_drain())
        assert code == grpc.StatusCode.UNAVAILABLE and took < 10, (code, took)  # not the 20 s deadline or grace
    finally:
        release.set()
        _settle(store_engine)


def test_a_hung_read_is_not_started_again_and_holds_only_its_name(on_demand, store_engine, monkeypatch):
    stalled = StalledStore(monkeypatch, lambda source: source == "store://minilm/sentiment")
    loader = on_demand.server.inference.on_demand
    loader.wait_s, loader.retry_after_s = 0.2, 0.0  # every request past the wait limit and the memory
    try:
        with on_demand.client(timeout=10) as client:
            for _ in range(MAX_READS + 2):  # each would have started a read of its own, till every slot hung
                with pytest.raises(RpcError) as info:
                    client.classify(TEXTS, "minilm/sentiment")
                assert info.value.code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED)
            assert stalled.looks == ["store://minilm/sentiment"]
            assert len(client.tag(TEXTS, "minilm/ner")) == 3  # other names load meanwhile
    finally:
        stalled.release.set()


def test_a_reads_own_timeout_is_not_taken_for_the_wait_limit(store_engine):
    from engine.service.metrics import Metrics

    async def run():
        failed = asyncio.get_running_loop().create_future()
        failed.set_exception(TimeoutError(errno.ETIMEDOUT, "Connection timed out"))
        await OnDemandLoader(store_engine, Metrics())._load_within("x", failed)

    with pytest.raises(TimeoutError) as info:  # was "the adapter store gave no answer within 30 s", at once
        asyncio.run(run())
    assert info.value.errno == errno.ETIMEDOUT
