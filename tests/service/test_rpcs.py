"""Every RPC round-trips through a real server, and results equal the in-process engine's."""
import asyncio
import json
import logging
import threading
import time

import grpc
import pytest
import torch
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from engine.cli import main
from engine.client import RpcError
from engine.scheduler import SchedulerConfig
from engine.types import ServerInfo
from minilm import TEXTS
from scrape import requests_total, scrape


def test_classify_embed_tag_round_trip_and_match_the_library(server, minilm_setup):
    with server.client() as client:
        results = client.classify(TEXTS, "sentiment")
        for result, probs in zip(results, torch.softmax(minilm_setup.library.logits["sentiment"], -1)):
            assert result.scores["pos"] == pytest.approx(float(probs[1]), abs=1e-5)
        multi = client.classify(TEXTS, "topics")
        assert set(multi[0].scores) == {"art", "geo", "film"}
        tags = client.tag(TEXTS, "ner")
        assert [len(t) for t in tags] == [int(m.sum()) - 2 for m in minilm_setup.library.attention_mask]
        embeddings = torch.tensor(client.embed(TEXTS))
        assert torch.allclose(embeddings, minilm_setup.engine.embed(TEXTS), atol=1e-5)
        long_text = " ".join(["a long text"] * 200)  # 600 tokens: Embed cuts at 256 (sentence-transformers), Tag at 512
        assert torch.allclose(torch.tensor(client.embed([long_text])), minilm_setup.engine.embed([long_text]),
                              atol=1e-5)
        assert len(client.tag([long_text], "ner")[0]) == 510  # [CLS] and [SEP] are not tagged
        ids = minilm_setup.engine.tokenizer(TEXTS[0])["input_ids"]
        by_ids = client.classify([ids], "sentiment")  # pre-tokenised input, same result as the text
        assert by_ids[0].scores["pos"] == pytest.approx(results[0].scores["pos"], abs=1e-5)


def test_one_access_log_line_per_call_which_can_be_turned_off(server, caplog):
    caplog.set_level(logging.INFO, logger="adapterserve.access")
    with server.client() as client:
        client.embed(TEXTS[:1])
        with pytest.raises(RpcError):
            client.classify(TEXTS[:1], "nope")
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "adapterserve.access"]
    assert [(line["rpc"], line["code"]) for line in lines] == [("Embed", "OK"), ("Classify", "NOT_FOUND")]
    assert all(line["request_id"] and line["ms"] >= 0 for line in lines)
    caplog.clear()
    caplog.set_level(logging.WARNING, logger="adapterserve.access")  # what `serve --no-access-log` sets
    with server.client() as client:
        client.embed(TEXTS[:1])
    assert not [r for r in caplog.records if r.name == "adapterserve.access"]


def test_generate_is_unimplemented_with_a_clear_message(server, caplog):
    with caplog.at_level(logging.INFO, logger="adapterserve.access"):
        with server.client() as client, pytest.raises(RpcError) as info:
            list(client.generate("hello"))
    assert (info.value.code, info.value.reason) == (grpc.StatusCode.UNIMPLEMENTED, "NOT_IMPLEMENTED")
    assert "encoder (bert)" in info.value.message
    # counted and logged like every other call
    assert requests_total(scrape(server))[("GenerateStream", "UNIMPLEMENTED")] == 1
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "adapterserve.access"]
    assert [(line["rpc"], line["code"]) for line in lines] == [("GenerateStream", "UNIMPLEMENTED")]


def test_admin_rpcs(server, minilm_setup):
    with server.client() as admin:
        names = {a.name for a in admin.list_adapters()}
        assert names == {"sentiment", "topics", "ner", "plain"}
        info = admin.get_adapter("ner")
        assert (info.method, info.head_type, info.labels) == ("ia3", "tagging", ("O", "LOC", "MISC"))
        admin.unload_adapter("plain")
        with pytest.raises(RpcError) as missing:
            admin.get_adapter("plain")
        assert (missing.value.code, missing.value.reason) == (grpc.StatusCode.NOT_FOUND, "ADAPTER_NOT_FOUND")
        server_info = admin.server_info()
        assert isinstance(server_info, ServerInfo)  # typed like every other reply, not the raw protobuf
        assert (server_info.model_type, server_info.hidden_size, server_info.pooling) == ("bert", 384, "mean")
        assert (server_info.max_batch_rows, server_info.max_batch_tokens, server_info.max_seq_len) == (64, 8192, 512)
        assert "torch" in server_info.versions and not server_info.auth_enabled


def test_info_and_input_types_in_the_client_and_the_cli(server, capsys):
    assert main(["info", "--server", server.target]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["model_type"], info["max_inputs_per_request"], info["max_batch_tokens"]) == ("bert", 64, 8192)
    with server.client() as client:
        for wrong, kind in ((b"abc", "bytes"), ({101, 102}, "set"), (7, "int")):
            with pytest.raises(TypeError, match=f"inputs.1. must be a str or a list of token ids, got {kind}"):
                client.embed(["fine", wrong])  # bytes used to pass as the ids [97, 98, 99]
        for wrong, kind in (({"a", "b"}, "set"), (b"hello", "bytes"), (5, "int"), ({"a": 1}, "dict")):
            with pytest.raises(TypeError, match=f"inputs must be a str or a list of inputs, got {kind}"):
                client.embed(wrong)  # a set's results came back in hash order
        assert len(client.embed(["text", (101, 102)])) == 2
        for wrong in ("plain", [("plain",)], [("plain", 1.0, 2.0)]):
            with pytest.raises(TypeError, match="sources must be a list of .adapter, weight. pairs"):
                client.average_adapters("x", wrong)


def test_average_adapters_over_grpc_and_the_cli(server, minilm_setup, capsys):
    with server.client() as admin:
        info = admin.average_adapters("avg", [("plain", 3.0)])
        assert (info.name, info.method, info.source) == ("avg", "bottleneck", "average[linear](plain*3)")
        # an adapter averaged alone is itself (the weights are normalised)
        got = torch.tensor(admin.embed(TEXTS, "avg"))
        assert torch.allclose(got, minilm_setup.engine.embed(TEXTS, "plain"), atol=1e-5)
        bad, replace = grpc.StatusCode.INVALID_ARGUMENT, {"overwrite_ok": True}
        for sources, options, code, fragment in (
                ([("plain", 1.0)], {}, bad, "'avg' is already loaded"),
                ([("plain", 1.0), ("plain", -1.0)], replace, bad, "sources name 'plain' more than once"),
                ([("nope", 1.0)], replace, grpc.StatusCode.NOT_FOUND, "'nope'"),
                ([("topics", 1.0)], {**replace, "combine_strategy": "lora_delta_w_svd"}, bad, "positive svd_rank")):
            with pytest.raises(RpcError) as refused:
                admin.average_adapters("avg", sources, **options)
            assert refused.value.code == code and fragment in refused.value.message, refused.value
        svd = admin.average_adapters("avg", [("topics", 1.0)], combine_strategy="lora_delta_w_svd", svd_rank=2,
                                     overwrite_ok=True)
        assert (svd.method, svd.source) == ("lora", "average[lora_delta_w_svd](topics*1)")
        # the library's normalize_weights=False: three times the adapter's weights, not the adapter
        tripled = admin.average_adapters("tripled", [("plain", 3.0)], normalize_weights=False)
        assert tripled.source == "average[linear, weights as given](plain*3)"
        assert not torch.allclose(torch.tensor(admin.embed(TEXTS, "tripled")), got, atol=1e-3)
        admin.unload_adapter("tripled")
    assert main(["adapters", "average", "from-cli", "plain=0.5", "topics=0.5", "--server", server.target]) == 1
    assert "cannot average adapters with different configurations" in capsys.readouterr().err
    assert main(["adapters", "average", "from-cli", "plain=0.5", "--server", server.target]) == 0
    assert json.loads(capsys.readouterr().out)["source"] == "average[linear](plain*0.5)"
    assert main(["adapters", "average", "summed", "plain=1", "--weights-as-given", "--server", server.target]) == 0
    assert json.loads(capsys.readouterr().out)["source"] == "average[linear, weights as given](plain*1)"


def test_concurrent_clients_get_the_engines_per_row_results(server, minilm_setup):
    engine = minilm_setup.engine
    want = {name: engine.classify(TEXTS, name) for name in ("sentiment", "topics")}
    want_embed = {None: engine.embed(TEXTS), "plain": engine.embed(TEXTS, "plain")}
    failures = []

    def worker(i):
        with server.client(tenant=f"tenant{i % 3}") as client:
            for _ in range(3):
                name = ("sentiment", "topics")[i % 2]
                got = client.classify(TEXTS, name)
                for g, w in zip(got, want[name]):
                    if any(abs(g.scores[k] - w.scores[k]) > 1e-5 for k in w.scores):
                        failures.append((name, g, w))
                adapter = (None, "plain")[i % 2]
                emb = torch.tensor(client.embed(TEXTS, adapter))
                if not torch.allclose(emb, want_embed[adapter], atol=1e-5):
                    failures.append((adapter, "embed"))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


def test_reflection_lists_the_services(server):
    channel = grpc.insecure_channel(server.target)
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    reply = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in reply.list_services_response.service}
    assert {"adapterserve.v1.InferenceService", "adapterserve.v1.AdapterService", "adapterserve.v1.ServerService",
            "grpc.health.v1.Health"} <= names
    channel.close()


def test_a_row_over_the_token_budget_is_named(start_server):
    running = start_server(scheduler=SchedulerConfig(max_batch_tokens=8))
    with running.client() as client, pytest.raises(RpcError) as refused:
        client.embed(["hi", TEXTS[0]])
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "inputs[1] has" in refused.value.message and "over the 8 of one forward" in refused.value.message


def test_a_request_over_the_token_budget_runs_in_parts(start_server, minilm_setup):
    running = start_server(scheduler=SchedulerConfig(max_batch_tokens=40))
    engine = minilm_setup.engine
    with running.client() as admin:
        admin.load_adapter(str(minilm_setup.folders["sentiment"]), name="sentiment")
    texts = TEXTS * 3  # 9 rows: at most 2 of them per forward
    with running.client() as client:
        embeddings = torch.tensor(client.embed(texts))
        results = client.classify(texts, "sentiment")
    assert torch.allclose(embeddings, engine.embed(texts), atol=1e-5)
    want = engine.classify(texts, "sentiment")
    assert [r.label for r in results] == [w.label for w in want]
    assert all(abs(r.scores[k] - w.scores[k]) < 1e-5 for r, w in zip(results, want) for k in w.scores)
    assert min(len(ids) for ids in engine.tokenizer(texts)["input_ids"]) * len(texts) > 40  # over one forward's budget
    batches = scrape(running)["adapterserve_batch_rows"].samples
    assert max(s.value for s in batches if s.name == "adapterserve_batch_rows_count") >= 4  # 2 forwards each, at least


def test_async_client_round_trip(server, minilm_setup):

    from engine.client import AsyncClient

    async def run():
        async with AsyncClient(server.target) as client:
            results = await client.classify(TEXTS, "sentiment")
            infos = await client.list_adapters()
            with pytest.raises(RpcError) as missing:
                await client.tag(TEXTS, "nope")
            return results, infos, missing.value

    results, infos, missing = asyncio.run(run())
    want = minilm_setup.engine.classify(TEXTS, "sentiment")
    assert [r.label for r in results] == [w.label for w in want]
    assert {i.name for i in infos} == {"sentiment", "topics", "ner", "plain"}
    assert missing.code == grpc.StatusCode.NOT_FOUND


def test_a_tenant_beyond_ascii_travels_in_the_binary_header(server, minilm_setup):
    # gRPC sends printable ASCII only in text headers: x-tenant-id "acmé" failed every call with INTERNAL
    with server.client() as operator:
        operator.load_adapter(str(minilm_setup.folders["sentiment"]), name="ü-sentiment", tenant="acmé")
    try:
        with server.client(tenant="acmé") as acme:
            assert [a.name for a in acme.list_adapters() if a.tenant] == ["ü-sentiment"]
            assert len(acme.classify(TEXTS[:1], "ü-sentiment")) == 1
        with server.client(tenant="acme") as other, pytest.raises(RpcError) as info:
            other.classify(TEXTS[:1], "ü-sentiment")
        assert info.value.code == grpc.StatusCode.NOT_FOUND
    finally:
        with server.client() as operator:
            operator.unload_adapter("ü-sentiment", tenant="acmé")


def test_client_timeouts_and_closed_clients(server):
    from engine.client import MAX_TIMEOUT_S, AsyncClient, Client, ClientClosed

    for wrong in (0, -1, float("nan"), "5", True):
        with pytest.raises(ValueError, match="timeout must be None or a number of seconds > 0"):
            Client(server.target, timeout=wrong)
    with Client(server.target, timeout=1e308) as client:  # gRPC's own deadline overflows: the call expired at once
        assert client.timeout == MAX_TIMEOUT_S and client.server_info().model_type == "bert"
    with Client(server.target, timeout=float("inf")) as client:
        assert client.server_info().model_type == "bert"
    with pytest.raises(ClientClosed, match="this Client is closed"):
        client.server_info()
    with pytest.raises(ClientClosed, match="this Client is closed"):
        list(client.generate("hi"))

    async def closed_async():
        client = AsyncClient(server.target)
        await client.close()
        with pytest.raises(ClientClosed, match="this AsyncClient is closed"):  # was grpc.aio's UsageError
            await client.embed(["hi"])

    asyncio.run(closed_async())


def test_auth_off_operators_load_server_folders_for_a_tenant(server, minilm_setup):
    """With auth off every caller is an operator: `--tenant` (x-tenant-id) picks the tenant, it does not make the
    caller a tenant admin restricted to remote sources."""
    with server.client(tenant="acme") as acme:
        info = acme.load_adapter(str(minilm_setup.folders["sentiment"]), name="acme-only", tenant="acme")
        assert info.tenant == "acme"
        assert acme.classify(TEXTS[:1], "acme-only")[0].label in ("neg", "pos")
    with server.client(tenant="globex") as globex, pytest.raises(RpcError) as hidden:
        globex.classify(TEXTS[:1], "acme-only")
    assert hidden.value.code == grpc.StatusCode.NOT_FOUND
    with server.client() as operator:
        operator.unload_adapter("acme-only", tenant="acme")


def test_catalog_from_the_client_and_the_cli(start_server, minilm_setup, tmp_path, capsys):
    import shutil

    from engine import Engine, EngineConfig
    from engine.cli import main
    from engine.client import AsyncClient

    store = tmp_path / "store"
    shutil.copytree(minilm_setup.folders["ner"], store / "minilm" / "ner")
    engine = Engine(EngineConfig(device="cpu", adapter_store=str(store)))
    running = start_server(engine=engine)
    with running.client() as client:
        [entry] = client.catalog()
        assert entry == engine.catalog()[0]  # every field, through the wire
        assert (entry.name, entry.source, entry.method, entry.head_type) == (
            "minilm/ner", "store://minilm/ner", "ia3", "tagging")

    async def run():
        async with AsyncClient(running.target) as client:
            return await client.catalog()
    assert asyncio.run(run()) == [entry]
    assert main(["adapters", "catalog", "--server", running.target]) == 0
    assert '"source": "store://minilm/ner"' in capsys.readouterr().out
    assert main(["adapters", "load", "store://minilm/ner", "--name", "n", "--server", running.target]) == 0
    assert '"name": "n"' in capsys.readouterr().out
    assert main(["adapters", "unload", "n", "--server", running.target]) == 0
    assert capsys.readouterr().out == ""  # nothing to print (it printed "null")


def test_the_queue_readiness_check_passes_each_requests_queue_time(server, monkeypatch):
    """So that a read which failed before a request was queued cannot fail it (tiers.prefetch(since=...))."""
    engine, asked = server.server.engine, []

    def ready(adapters, tenant=None, since=None):
        asked.append(since)
        return True
    monkeypatch.setattr(engine, "adapters_ready", ready)
    before = time.monotonic()
    with server.client() as client:
        client.classify(TEXTS, "sentiment")
    assert asked and all(since is not None and before <= since <= time.monotonic() for since in asked), asked


def test_tokenising_a_large_request_holds_no_other_call(server, monkeypatch):
    """Tokenising ran on the event loop: one request of 64 long texts held it ~3 s, health checks included, and
    readiness probes failed under load (review)."""
    import engine.service.inference as inference
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    real, started = inference.tokenize, threading.Event()

    def slow_tokenize(*args):
        started.set()
        time.sleep(2)
        return real(*args)

    monkeypatch.setattr(inference, "tokenize", slow_tokenize)
    with server.client() as client:
        embed = threading.Thread(target=lambda: client.embed(["a slow text"]), daemon=True)
        embed.start()
        assert started.wait(10)
        channel = grpc.insecure_channel(server.target)
        begin = time.monotonic()
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING and time.monotonic() - begin < 1
        channel.close()
        embed.join(20)
        assert not embed.is_alive()
