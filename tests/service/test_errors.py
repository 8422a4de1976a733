"""Every error code the service promises, produced by a real call, with its ErrorInfo reason."""
import shutil
import threading
import time

import grpc
import pytest
from adapterserve.v1 import inference_service_pb2 as pb
from adapterserve.v1 import inference_service_pb2_grpc as pb_grpc

from engine.client import RpcError
from engine.scheduler import SchedulerConfig

TEXTS = ["A fine day.", "A bad day."]


def _expect(code, reason, call):
    with pytest.raises(RpcError) as info:
        call()
    assert (info.value.code, info.value.reason) == (code, reason), info.value
    return info.value


@pytest.fixture()
def authed(start_server, key_file, minilm_setup):
    running = start_server(api_keys=key_file)
    with running.client("root-admin") as root:
        root.load_adapter(str(minilm_setup.folders["sentiment"]), name="shared-sentiment")
        root.load_adapter(str(minilm_setup.folders["sentiment"]), name="acme-secret", tenant="acme")
        root.load_adapter(str(minilm_setup.folders["ner"]), name="acme-ner", tenant="acme")
    return running


def test_authentication_and_permissions(authed, minilm_setup):
    with authed.client() as anonymous:
        _expect(grpc.StatusCode.UNAUTHENTICATED, "API_KEY_INVALID", lambda: anonymous.classify(TEXTS, "acme-secret"))
    with authed.client("stolen-key") as wrong:
        _expect(grpc.StatusCode.UNAUTHENTICATED, "API_KEY_INVALID", lambda: wrong.embed(TEXTS))
    with authed.client("acme-key") as acme:
        assert len(acme.classify(TEXTS, "acme-secret")) == 2
        assert len(acme.classify(TEXTS, "shared-sentiment")) == 2
        _expect(grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED", lambda: acme.load_adapter("/x"))
    with authed.client("globex-key") as globex:
        err = _expect(grpc.StatusCode.NOT_FOUND, "ADAPTER_NOT_FOUND", lambda: globex.classify(TEXTS, "acme-secret"))
        assert "globex" in err.message
        assert len(globex.classify(TEXTS, "shared-sentiment")) == 2
    with authed.client("acme-admin") as acme_admin:
        _expect(grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED",
                lambda: acme_admin.load_adapter("store://x", tenant="globex"))
        for server_path in ("/etc", "file:///etc", "../adapters/x", "local:///etc", "FILE:///etc", "memory://x",
                            "simplecache::file:///etc", "filecache::file:///etc", "zip://a::file:///tmp/a.zip",
                            "https://example.com/a::file:///etc"):  # fsspec chains: their later links may be local
            err = _expect(grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED",
                          lambda: acme_admin.load_adapter(server_path))
            assert "not from server paths" in err.message
        listed = {a.name: a.source for a in acme_admin.list_adapters()}
        assert listed.keys() == {"acme-secret", "acme-ner", "shared-sentiment"}
        # where its own adapters came from, not the operator's server path of a shared one
        assert listed["acme-secret"] == str(minilm_setup.folders["sentiment"]) and listed["shared-sentiment"] == ""
        assert acme_admin.get_adapter("shared-sentiment").source == ""
        # averages: a tenant admin reads what its tenant sees and writes into its own tenant only
        _expect(grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED",
                lambda: acme_admin.average_adapters("mix", [("shared-sentiment", 1.0)], tenant="globex"))
        mix = acme_admin.average_adapters("mix", [("shared-sentiment", 1.0)])
        assert (mix.name, mix.tenant) == ("mix", "acme")
        acme_admin.unload_adapter("mix")
    with authed.client("acme-key") as acme:
        _expect(grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED",
                lambda: acme.average_adapters("mix", [("shared-sentiment", 1.0)]))  # an inference key
    with authed.client("globex-key") as globex:
        _expect(grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED",
                lambda: globex.average_adapters("mix", [("acme-secret", 1.0)]))


def test_health_needs_no_key(authed):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(authed.target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_invalid_arguments(authed):
    with authed.client("acme-key") as acme:
        bad = grpc.StatusCode.INVALID_ARGUMENT
        _expect(bad, "INVALID_REQUEST", lambda: acme.classify([], "acme-secret"))
        _expect(bad, "INVALID_REQUEST", lambda: acme.classify([[1, 2, 10**6]], "acme-secret"))
        err = _expect(bad, "INVALID_REQUEST", lambda: acme.classify(TEXTS, "acme-ner"))
        assert "tagging" in err.message
        _expect(bad, "INVALID_REQUEST", lambda: acme.classify(["x"] * 65, "acme-secret"))
    with grpc.insecure_channel(authed.target) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        request = pb.ClassifyRequest(adapter_id="acme-secret", inputs=[pb.Input(text="hi")])
        with pytest.raises(grpc.RpcError) as info:
            stub.Classify(request, metadata=(("authorization", "Bearer acme-key"), ("x-adapter-id", "other")))
        assert info.value.code() == bad and "differs from x-adapter-id" in info.value.details()
        by_header = pb.ClassifyRequest(inputs=[pb.Input(text="hi")])
        reply = stub.Classify(by_header, metadata=(("authorization", "Bearer acme-key"), ("x-adapter-id", "acme-secret")))
        assert len(reply.results) == 1


def test_bad_adapter_load_is_failed_precondition(authed, tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{broken")
    with authed.client("root-admin") as root:
        err = _expect(grpc.StatusCode.FAILED_PRECONDITION, "ADAPTER_INVALID", lambda: root.load_adapter(str(folder)))
        assert "adapter_config.json" in err.message
        assert len(root.classify(TEXTS, "shared-sentiment")) == 2  # the server and other adapters are fine


def test_long_error_messages_are_cut_to_fit_the_trailers(authed, tmp_path):
    # messages echo the request; past gRPC's 8 KB trailer limit the client got RESOURCE_EXHAUSTED "Stream removed",
    # and our client crashed on the mismatch between that code and the details (ValueError)
    folder = tmp_path / "longlabel"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"config": ' + '"' + "é" * 20_000 + '"}')  # 2 bytes per character
    with authed.client("root-admin") as root:
        for source in (str(folder), "/" + "ü" * 20_000):
            err = _expect(grpc.StatusCode.FAILED_PRECONDITION, "ADAPTER_UNSUPPORTED" if source == str(folder)
                          else "ADAPTER_SOURCE_UNAVAILABLE", lambda: root.load_adapter(source))
            assert err.message.endswith(" more characters)") and len(err.message.encode()) < 1100, err.message[-80:]
        # an unknown name is echoed in the details too (ErrorInfo adapterId, ResourceInfo): cut there as well
        for call in (lambda: root.get_adapter("é" * 5000), lambda: root.classify(TEXTS, "é" * 5000)):
            _expect(grpc.StatusCode.NOT_FOUND, "ADAPTER_NOT_FOUND", call)
        assert len(root.classify(TEXTS, "shared-sentiment")) == 2


def test_oversize_message_is_resource_exhausted(start_server):
    running = start_server(max_message_mb=1)
    with running.client() as client, pytest.raises(RpcError) as info:
        client.embed(["word " * 300_000])
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


class BlockedEngine:
    """Holds every forward until released, to fill the queue or pass deadlines deterministically."""

    def __init__(self, engine, monkeypatch):
        self.release, self.calls = threading.Event(), []
        forward = engine.forward

        def blocked(*args, **kwargs):
            self.calls.append(args[0].shape[0])
            assert self.release.wait(60)
            return forward(*args, **kwargs)

        monkeypatch.setattr(engine, "forward", blocked)


def test_queue_full_and_deadline(start_server, minilm_setup, monkeypatch):
    running = start_server(scheduler=SchedulerConfig(max_queue=1, max_batch_rows=2, max_wait_s=0))
    blocked = BlockedEngine(minilm_setup.engine, monkeypatch)
    results = []
    with running.client(timeout=60) as slow:
        first = threading.Thread(target=lambda: results.append(slow.embed(["one", "two"])))
        first.start()
        while not blocked.calls:  # the first request is now inside the (blocked) forward
            time.sleep(0.01)
        with running.client(timeout=0.5) as hasty:
            _expect(grpc.StatusCode.DEADLINE_EXCEEDED, "", lambda: hasty.embed(["late"]))  # waits in the queue
        second = threading.Thread(target=lambda: results.append(slow.embed(["three"])))
        second.start()
        time.sleep(0.3)
        with running.client(timeout=5) as third:
            err = _expect(grpc.StatusCode.RESOURCE_EXHAUSTED, "QUEUE_FULL", lambda: third.embed(["four"]))
            assert "queue is full" in err.message
        blocked.release.set()
        first.join(30)
        second.join(30)
    assert len(results) == 2
    assert blocked.calls == [2, 1]  # the expired request was dropped before any compute


def test_cancelled_request_is_never_computed(start_server, minilm_setup, monkeypatch):
    running = start_server(scheduler=SchedulerConfig(max_batch_rows=2, max_wait_s=0))
    blocked = BlockedEngine(minilm_setup.engine, monkeypatch)
    with running.client(timeout=60) as client, grpc.insecure_channel(running.target) as channel:
        first = threading.Thread(target=client.embed, args=(["one", "two"],))
        first.start()
        while not blocked.calls:
            time.sleep(0.01)
        stub = pb_grpc.InferenceServiceStub(channel)
        call = stub.Embed.future(pb.EmbedRequest(inputs=[pb.Input(text="never computed")]))
        time.sleep(0.3)  # admitted and queued behind the blocked batch
        assert call.cancel()
        time.sleep(0.3)
        blocked.release.set()
        first.join(30)
        assert client.embed(["after"])  # the server keeps serving
    assert blocked.calls == [2, 1]  # the first batch, then "after": the cancelled request freed its place


def test_a_tenant_admin_hub_id_never_reads_a_server_folder_of_that_name(authed, minilm_setup, tmp_path,
                                                                       monkeypatch):
    import huggingface_hub.constants

    shutil.copytree(minilm_setup.folders["sentiment"], tmp_path / "adapters" / "sentiment")
    monkeypatch.chdir(tmp_path)  # "adapters/sentiment" now names a server folder, relative to the server
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with authed.client("acme-admin") as acme_admin:
        err = _expect(grpc.StatusCode.FAILED_PRECONDITION, "ADAPTER_SOURCE_UNAVAILABLE",
                      lambda: acme_admin.load_adapter("adapters/sentiment"))
        assert "hf://adapters/sentiment" in err.message and "Hugging Face" in err.message
        assert "sentiment" not in {a.name for a in acme_admin.list_adapters()}



def _details(err: grpc.RpcError) -> dict:
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    found = {}
    for detail in rpc_status.from_call(err).details:
        for kind in (error_details_pb2.ErrorInfo, error_details_pb2.ResourceInfo, error_details_pb2.BadRequest):
            if detail.Is(kind.DESCRIPTOR):
                found[kind.__name__] = kind()
                detail.Unpack(found[kind.__name__])
    return found


def test_error_details_name_the_resource_and_the_field(authed):
    with grpc.insecure_channel(authed.target) as channel:
        stub, key = pb_grpc.InferenceServiceStub(channel), (("authorization", "Bearer globex-key"),)
        with pytest.raises(grpc.RpcError) as missing:
            stub.Classify(pb.ClassifyRequest(adapter_id="acme-secret", inputs=[pb.Input(text="hi")]), metadata=key)
        resource = _details(missing.value)["ResourceInfo"]
        assert (resource.resource_type, resource.resource_name, resource.owner) == ("adapter", "acme-secret", "globex")
        with pytest.raises(grpc.RpcError) as too_many:
            stub.Embed(pb.EmbedRequest(inputs=[pb.Input(text="hi")] * 65), metadata=key)
        assert _details(too_many.value)["BadRequest"].field_violations[0].field == "inputs"
        for text, length in (("", 0), ("x" * 100_001, 100_001)):
            with pytest.raises(grpc.RpcError) as bad_text:
                stub.Embed(pb.EmbedRequest(inputs=[pb.Input(text="hi"), pb.Input(text=text)]), metadata=key)
            assert bad_text.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert f"inputs[1].text must hold 1..100000 characters, got {length}" in bad_text.value.details()
            assert _details(bad_text.value)["BadRequest"].field_violations[0].field == "inputs[1].text"
        for ids, message in (([5, 30522, 7], "inputs[1].token_ids must lie in 0..30521, got 30522 at position 1"),
                             ([-1], "inputs[1].token_ids must lie in 0..30521, got -1 at position 0"),
                             ([], "inputs[1].token_ids must hold 1..512 ids, got 0")):
            with pytest.raises(grpc.RpcError) as bad_ids:  # the message names the input, as for texts
                stub.Embed(pb.EmbedRequest(inputs=[pb.Input(text="hi"), pb.Input(token_ids=pb.TokenIds(ids=ids))]),
                           metadata=key)
            assert bad_ids.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in bad_ids.value.details()
            assert _details(bad_ids.value)["BadRequest"].field_violations[0].field == "inputs[1].token_ids"
        with pytest.raises(grpc.RpcError) as anonymous:  # the streaming RPC checks the caller like the others
            list(stub.GenerateStream(pb.GenerateStreamRequest(input=pb.Input(text="hi"))))
        assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_tenant_keys_get_errors_without_server_paths(authed, monkeypatch):
    from engine.errors import AdapterSourceError

    def gone(*args):
        raise AdapterSourceError("/srv/adapters/shared/sentiment", "its folder '/srv/adapters/shared/sentiment' is "
                                 "gone; load it again from where it is now")
    monkeypatch.setattr(authed.server.engine, "load_adapter", gone)
    with authed.client("acme-admin") as tenant_admin:
        err = _expect(grpc.StatusCode.FAILED_PRECONDITION, "ADAPTER_SOURCE_UNAVAILABLE",
                      lambda: tenant_admin.load_adapter("store://sentiment"))
    assert err.message == ("adapter source <server path>: its folder '<server path>' is gone; load it again from "
                           "where it is now")
    with authed.client("root-admin") as operator:  # the operator's own paths, in full
        err = _expect(grpc.StatusCode.FAILED_PRECONDITION, "ADAPTER_SOURCE_UNAVAILABLE",
                      lambda: operator.load_adapter("store://sentiment"))
    assert "'/srv/adapters/shared/sentiment' is gone" in err.message


@pytest.mark.parametrize("message, shown", [
    ("invalid adapter /x/y: missing adapter_config.json", "invalid adapter <server path>: missing adapter_config.json"),
    ("adapter source hf://acme/x@v2: not on the hub", "adapter source hf://acme/x@v2: not on the hub"),  # theirs
    ("adapter source store://bert/x: gone", "adapter source store://bert/x: gone"),
    ("adapter source https://h:8/a/b: cannot list it", "adapter source https://h:8/a/b: cannot list it"),
    ("tenant keys may load from org/name ids", "tenant keys may load from org/name ids"),
])
def test_what_a_tenant_key_is_shown_of_a_path(message, shown):
    from engine.errors import AdapterSourceError
    from engine.service.status import to_status

    error = AdapterSourceError("x", "y")
    error.args = (message,)
    assert to_status(error, "r1", hide_paths=True).details == shown


@pytest.mark.parametrize("source, detail, shown", [
    # the generic pattern ends a path at a space or a colon: "<server path> token/x" showed the folder's tail
    ("/srv/my token/x", "missing adapter_config.json", "invalid adapter <server path>: missing adapter_config.json"),
    ("/srv/a:b/x", "bad JSON in /srv/a:b/x/adapter_config.json: line 1",
     "invalid adapter <server path>: bad JSON in <server path>: line 1"),
    ("/srv/x/", "its file /srv/x/head config.json is empty", "invalid adapter <server path>: its file <server path> "
     "config.json is empty"),  # a file with a space below the source: its tail shows, the folder does not
    ("store://x", "cannot open it: [Errno 2] No such file or directory: '/srv/store/my token/x'",
     "invalid adapter store://x: cannot open it: [Errno 2] No such file or directory: '<server path>'"),
    ("store://x", 'the folder "/srv/a b" is gone', 'invalid adapter store://x: the folder "<server path>" is gone'),
    ("org/x", "cache miss at \"/srv/team's share/dir\"", 'invalid adapter org/x: cache miss at "<server path>"'),
    ("/", "the root /srv/x is gone", "invalid adapter /: the root <server path> is gone"),
])
def test_a_server_path_with_spaces_or_colons_is_hidden_whole(source, detail, shown):
    from engine.errors import InvalidAdapter
    from engine.service.status import to_status

    assert to_status(InvalidAdapter(source, detail), "r1", hide_paths=True).details == shown


@pytest.mark.parametrize("request_id", ["y" * 257, "two\nlines"])
def test_a_request_id_no_log_line_should_carry_is_refused(authed, caplog, request_id):
    """A 5 MB request_id was answered OK and made a 5 MB access log line (a probe)."""
    key = (("authorization", "Bearer acme-key"),)
    with grpc.insecure_channel(authed.target) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Embed(pb.EmbedRequest(inputs=[pb.Input(text="hi")], request_id=request_id), metadata=key)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "request_id must be 1..256 printable characters" in info.value.details()
        assert request_id not in caplog.text
        fine = "y" * 256
        reply = stub.Embed(pb.EmbedRequest(inputs=[pb.Input(text="hi")], request_id=fine), metadata=key)
        assert reply.request_id == fine
