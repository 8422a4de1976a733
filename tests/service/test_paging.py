"""ListAdapters in pages: every adapter exactly once, tokens checked, and replies within the message limit."""
import base64
import json
import shutil
import urllib.request

import grpc
import pytest
import torch
from adapterserve.v1 import adapter_service_pb2 as pb
from adapterserve.v1 import adapter_service_pb2_grpc as pb_grpc

import engine.client_calls
from engine import Engine, EngineConfig
from engine.cli import main
from engine.client import RpcError
from engine.client_calls import Pager


@pytest.fixture()
def server(server, minilm_setup):
    """conftest's server, and one adapter of a tenant's own."""
    with server.client() as admin:
        admin.load_adapter(str(minilm_setup.folders["ner"]), name="acme-ner", tenant="acme")
    return server


def _list(target: str, metadata=(), **fields) -> pb.ListAdaptersResponse:
    with grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", -1)]) as channel:
        return pb_grpc.AdapterServiceStub(channel).ListAdapters(pb.ListAdaptersRequest(**fields), metadata=metadata)


def _pages(target: str, page_size: int, **fields) -> list[list[str]]:
    pages, token = [], ""
    while True:
        reply = _list(target, page_size=page_size, page_token=token, **fields)
        pages.append([f"{a.tenant}/{a.name}" for a in reply.adapters])
        token = reply.next_page_token
        if not token:
            return pages


def test_pages_hold_every_adapter_once_in_order(server):
    everything = ["/ner", "/plain", "/sentiment", "/topics", "acme/acme-ner"]  # shared first, then by tenant
    assert [f"{a.tenant}/{a.name}" for a in _list(server.target).adapters] == everything  # page_size 0: all at once
    assert _pages(server.target, 2) == [everything[0:2], everything[2:4], everything[4:]]
    assert _pages(server.target, 1) == [[name] for name in everything]
    assert _pages(server.target, 5) == [everything]  # no empty last page
    assert _pages(server.target, 4000) == [everything]  # over 1000 reads as 1000


def test_changes_between_pages_neither_repeat_nor_hide_others(server, minilm_setup):
    first = _list(server.target, page_size=2)
    assert [a.name for a in first.adapters] == ["ner", "plain"]
    with server.client() as admin:
        admin.load_adapter(str(minilm_setup.folders["plain"]), name="aaa")  # sorts before the cut: not repeated
        admin.unload_adapter("sentiment")  # the next page's first: the rest still come
    rest = _list(server.target, page_size=2, page_token=first.next_page_token)
    assert [a.name for a in rest.adapters] == ["topics", "acme-ner"] and not rest.next_page_token


def test_bad_page_requests_are_named(server):
    with pytest.raises(grpc.RpcError) as negative:
        _list(server.target, page_size=-1)
    assert negative.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "page_size must be 0" in negative.value.details()
    with pytest.raises(grpc.RpcError) as nothing:
        _list(server.target, omit_adapters=True)  # was an empty reply
    assert nothing.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "omit_adapters lists the catalog alone and needs include_catalog" in nothing.value.details()
    numbers = {"listing": ["", False], "adapters_after": [1], "catalog_after": None}  # keys that are not names
    deep = base64.urlsafe_b64encode(b"[" * 5000).decode()  # json's decoder recursed past Python's limit: INTERNAL
    for token in ("not-a-token", _token({}), _token(numbers), _token([1]), deep):
        with pytest.raises(grpc.RpcError) as bad:
            _list(server.target, page_size=1, page_token=token)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT, token
        assert "page_token is not one this server handed out" in bad.value.details(), token
    token = _list(server.target, page_size=1).next_page_token
    with pytest.raises(grpc.RpcError) as other:  # a token continues its own listing only
        _list(server.target, page_size=1, page_token=token, tenant="acme")
    assert "page_token continues a listing with another tenant" in other.value.details()
    token = _list(server.target, [("x-tenant-id", "acme")], page_size=1).next_page_token
    with pytest.raises(grpc.RpcError) as header:  # the tenant as resolved: the header counts like the field
        _list(server.target, [("x-tenant-id", "globex")], page_size=1, page_token=token)
    assert "page_token continues a listing with another tenant" in header.value.details()
    assert _list(server.target, [("x-tenant-id", "acme")], page_size=1, page_token=token).adapters


def _token(fields) -> str:
    return base64.urlsafe_b64encode(json.dumps(fields).encode()).decode()


def test_the_clients_and_the_cli_read_every_page(server, monkeypatch, capsys):
    monkeypatch.setattr(engine.client_calls, "LIST_PAGE_SIZE", 2)
    with server.client() as admin:
        assert sorted(a.name for a in admin.list_adapters()) == ["acme-ner", "ner", "plain", "sentiment", "topics"]
        assert sorted(a.name for a in admin.list_adapters("acme")) == ["acme-ner", "ner", "plain", "sentiment",
                                                                        "topics"]  # its own and the shared ones
    assert main(["adapters", "list", "--server", server.target]) == 0
    assert sorted(a["name"] for a in json.loads(capsys.readouterr().out)) == ["acme-ner", "ner", "plain",
                                                                              "sentiment", "topics"]


def test_the_catalog_comes_in_pages_too(start_server, minilm_setup, tmp_path, monkeypatch):
    store = tmp_path / "store"
    for name in ("a", "b", "c"):
        shutil.copytree(minilm_setup.folders["ner"], store / "minilm" / name)
    running = start_server(engine=Engine(EngineConfig(device="cpu", adapter_store=str(store))))
    with running.client() as admin:
        for name in ("x", "y", "z", "zz", "zzz"):
            admin.load_adapter(str(minilm_setup.folders["ner"]), name=name)

    def pages(**fields):
        found, token = [], ""
        while True:
            reply = _list(running.target, include_catalog=True, page_size=2, page_token=token, **fields)
            found.append(([a.name for a in reply.adapters], [e.name for e in reply.catalog]))
            token = reply.next_page_token
            if not token:
                return found
    # both lists in step: as many pages as the longer one needs
    assert pages() == [(["x", "y"], ["minilm/a", "minilm/b"]), (["z", "zz"], ["minilm/c"]), (["zzz"], [])]
    assert pages(omit_adapters=True) == [([], ["minilm/a", "minilm/b"]), ([], ["minilm/c"])]  # the catalog's own
    monkeypatch.setattr(engine.client_calls, "LIST_PAGE_SIZE", 1)
    with running.client() as client:
        assert [e.name for e in client.catalog()] == ["minilm/a", "minilm/b", "minilm/c"]


def _many_labels(folder, target, labels: int):
    """A copy of the classification adapter whose head has ``labels`` label names of 200 characters."""
    shutil.copytree(folder, target)
    head = json.loads((target / "head_config.json").read_text())
    head["config"]["num_labels"] = labels
    head["config"]["label2id"] = {f"{i:0>200}": i for i in range(labels)}
    (target / "head_config.json").write_text(json.dumps(head))
    state = torch.load(target / "pytorch_model_head.bin", weights_only=True)
    last = max(state, key=lambda k: int(k.split(".")[2]))
    prefix = last.rsplit(".", 1)[0]
    state[prefix + ".weight"] = torch.randn(labels, 384) * 0.05
    state[prefix + ".bias"] = torch.zeros(labels)
    torch.save(state, target / "pytorch_model_head.bin")
    return target


def test_a_listing_over_the_message_limit_is_refused_by_name_and_the_client_halves_its_pages(
        start_server, minilm_setup, tmp_path):
    running = start_server(max_message_mb=1)
    names = ["many-a", "many-b", "many-c"]
    with running.client() as admin:  # heads of 400 KB of label names each: two fit a 1 MB reply, three do not
        for name in names:
            admin.load_adapter(str(_many_labels(minilm_setup.folders["sentiment"], tmp_path / name, 2000)), name=name)
        with pytest.raises(grpc.RpcError) as whole:
            _list(running.target)
        assert whole.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "over the server's message limit of 1048576 bytes: ask for pages (page_size)" in whole.value.details()
        with pytest.raises(grpc.RpcError) as page:
            _list(running.target, page_size=3)
        assert "ask for a smaller page_size" in page.value.details()
        listed = admin.list_adapters()  # 1000 -> ... -> 3 per page refused, then 1
        assert sorted(a.name for a in listed) == names and len(listed[0].labels) == 2000


def test_the_client_takes_any_reply_the_server_sends(start_server, minilm_setup, tmp_path):
    # gRPC's clients refuse replies over 4 MiB by default, with no reason the pager could act on: a page the
    # server had checked against its own 16 MB failed in the client and in `adapters list`
    folder = _many_labels(minilm_setup.folders["sentiment"], tmp_path / "many", 2600)
    running = start_server()
    with running.client() as admin:
        for i in range(9):  # 9 x 520 KB of label names
            admin.load_adapter(str(folder), name=f"many-{i}")
        listed = admin.list_adapters()
    assert len(listed) == 9 and sum(len(a.labels) for a in listed) == 9 * 2600
    assert len(_list(running.target).SerializeToString()) > 4 * 2**20  # one page, over gRPC's default


def test_the_pager_halves_only_for_replies_over_the_limit():
    pager = Pager(lambda token, size: (token, size))
    assert pager.call() == ("", 1000)
    assert not pager.shrunk("QUEUE_FULL") and pager.size == 1000  # any other refusal stands
    assert pager.shrunk("REPLY_TOO_LARGE") and pager.call() == ("", 500)
    pager.took(["a"], "next")
    assert (pager.call(), pager.items, pager.done) == (("next", 500), ["a"], False)
    pager.size = 1
    assert not pager.shrunk("REPLY_TOO_LARGE")  # one adapter per page is as small as pages get
    pager.took(["b"], "")
    assert (pager.items, pager.done) == (["a", "b"], True)


def test_any_reply_over_the_message_limit_is_refused_by_name_and_counted(start_server, minilm_setup, tmp_path):
    # a Classify reply holds every label of the head with its score, for every input: it passed the limit, the
    # client got gRPC's own RESOURCE_EXHAUSTED, and the call was counted and logged OK
    folder = _many_labels(minilm_setup.folders["sentiment"], tmp_path / "many", 2000)  # ~420 KB per input's reply
    running = start_server(max_message_mb=1)
    with running.client() as client:
        client.load_adapter(str(folder), name="many")
        [one] = client.classify(["fine"], "many")
        assert len(one.scores) == 2000
        with pytest.raises(RpcError) as two:
            client.classify(["fine", "also fine", "three"], "many")
    assert (two.value.code, two.value.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "REPLY_TOO_LARGE")
    assert "over the server's message limit of 1048576 bytes: ask for less in one call" in two.value.message
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{running.server.metrics_port}/metrics").read().decode()
    assert 'adapterserve_requests_total{code="RESOURCE_EXHAUSTED",method="Classify"} 1.0' in metrics
