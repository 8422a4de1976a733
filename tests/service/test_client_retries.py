"""The Python client retries UNAVAILABLE (a draining replica, a dropped connection), inference calls a stopping
server cancelled before running them (CANCELLED) and overloads the server marked retryable (RESOURCE_EXHAUSTED with
RetryInfo, after its delay), and nothing else."""
import asyncio
import threading
import time
from concurrent import futures

import grpc
import pytest
from adapterserve.v1 import adapter_service_pb2_grpc as admin_grpc
from adapterserve.v1 import inference_service_pb2 as pb
from adapterserve.v1 import inference_service_pb2_grpc as pb_grpc

from engine.client import AsyncClient, Client, RpcError
from engine.errors import AdapterCapacityExceeded
from engine.scheduler import QueueFull
from engine.service.status import mapping_for, to_status


class Flaky(pb_grpc.InferenceServiceServicer):
    """Answers Embed after ``failures`` refusals with ``code``, or with the status our server maps ``error`` to."""

    def __init__(self, failures: int, code=grpc.StatusCode.UNAVAILABLE, error: Exception | None = None):
        self.failures, self.code, self.error, self.calls = failures, code, error, []

    def Embed(self, request, context):
        self.calls.append(time.monotonic())
        if len(self.calls) <= self.failures:
            if self.error is not None:
                context.abort_with_status(to_status(self.error, "r1"))
            context.abort(self.code, "draining: retry on another replica")
        return pb.EmbedResponse(embeddings=[pb.Embedding(values=[1.0, 2.0])])


def _serve(servicer, add=pb_grpc.add_InferenceServiceServicer_to_server):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    add(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.mark.parametrize("failures,code,calls,ok", [
    (2, grpc.StatusCode.UNAVAILABLE, 3, True),  # two retries, then the answer
    (5, grpc.StatusCode.UNAVAILABLE, 3, False),  # at most 3 attempts
    (2, grpc.StatusCode.CANCELLED, 3, True),  # an inference call the server cancelled: it never ran
    (1, grpc.StatusCode.RESOURCE_EXHAUSTED, 1, False),  # not retried
])
def test_unavailable_and_cancelled_are_retried(failures, code, calls, ok):
    servicer = Flaky(failures, code)
    server, target = _serve(servicer)
    try:
        outcome = _embed("sync", target)
        if ok:
            assert outcome == [[1.0, 2.0]]
        else:
            assert isinstance(outcome, RpcError) and outcome.code == code
        assert len(servicer.calls) == calls
    finally:
        server.stop(None)


class CancellingAdmin(admin_grpc.AdapterServiceServicer):
    def __init__(self):
        self.calls = 0

    def UnloadAdapter(self, request, context):
        self.calls += 1
        context.abort(grpc.StatusCode.CANCELLED, "cancelled after the grace period")

    GetAdapter = UnloadAdapter


@pytest.mark.parametrize("call,calls", [
    (lambda client: client.unload_adapter("a"), 1),  # it may have done its work before the cancel
    (lambda client: client.get_adapter("a"), 3),  # a lookup changes nothing: sent again
])
def test_a_cancelled_admin_call_is_sent_again_only_if_it_changes_nothing(call, calls):
    servicer = CancellingAdmin()
    server, target = _serve(servicer, admin_grpc.add_AdapterServiceServicer_to_server)
    try:
        with Client(target, timeout=10) as client, pytest.raises(RpcError) as info:
            call(client)
    finally:
        server.stop(None)
    assert info.value.code == grpc.StatusCode.CANCELLED and servicer.calls == calls


def test_a_request_over_the_retry_buffer_is_sent_once():
    """gRPC keeps at most 256 KiB of a request for its retries (grpc.per_rpc_retry_buffer_size), as README says."""
    servicer = Flaky(1)
    server, target = _serve(servicer)
    try:
        with Client(target, timeout=10) as client:
            with pytest.raises(RpcError) as info:
                client.embed(["x" * 300_000])
            assert info.value.code == grpc.StatusCode.UNAVAILABLE and len(servicer.calls) == 1
            servicer.failures = 2  # the second call refused too, a smaller request: retried
            assert client.embed(["x" * 200_000]) == [[1.0, 2.0]] and len(servicer.calls) == 3
    finally:
        server.stop(None)


class StoppingWhileBusy(pb_grpc.InferenceServiceServicer):
    """An asyncio server whose first Embed holds the event loop, then stops the server (with a grace period): calls
    that arrive meanwhile wait in gRPC's core, and the stop cancels those the loop had not yet taken."""

    def __init__(self):
        self.started, self.ran, self.server = threading.Event(), 0, None

    async def Embed(self, request, context):
        self.ran += 1
        if self.ran == 1:
            self.started.set()
            time.sleep(2.0)  # holds the loop, as handlers busy on it do under load
            asyncio.ensure_future(self.server.stop(5))
        return pb.EmbedResponse(embeddings=[pb.Embedding(values=[1.0])])


def _race_a_stop(connect) -> tuple[list[str], int]:
    """Outcomes of one call that stops the server and of four sent while it holds the loop; how many handlers ran.
    Every caller connects first, so that only its request has to arrive while the loop is held."""
    servicer, port, loop = StoppingWhileBusy(), [], asyncio.new_event_loop()

    async def serve():
        servicer.server = grpc.aio.server()
        pb_grpc.add_InferenceServiceServicer_to_server(servicer, servicer.server)
        port.append(servicer.server.add_insecure_port("127.0.0.1:0"))
        await servicer.server.start()
        await servicer.server.wait_for_termination()
    serving = threading.Thread(target=loop.run_until_complete, args=(serve(),))
    serving.start()
    while not port:
        time.sleep(0.01)
    callers, outcomes = [connect(f"127.0.0.1:{port[0]}") for _ in range(5)], []

    def call(send):
        try:
            send()
            outcomes.append("ok")
        except grpc.RpcError as exc:
            outcomes.append(exc.code().name)
        except RpcError as exc:
            outcomes.append(exc.code.name)
    threads = [threading.Thread(target=call, args=(send,)) for _, send in callers]
    threads[0].start()
    assert servicer.started.wait(10)
    for thread in threads[1:]:
        thread.start()
    for thread in threads:
        thread.join(30)
    serving.join(30)
    loop.close()
    for channel, _ in callers:
        channel.close()
    assert not any(t.is_alive() for t in (*threads, serving)) and len(outcomes) == 5, outcomes
    return outcomes, servicer.ran


def _bare(target: str):
    channel = grpc.insecure_channel(target)  # no retry policy
    grpc.channel_ready_future(channel).result(10)
    stub = pb_grpc.InferenceServiceStub(channel)
    return channel, lambda: stub.Embed(pb.EmbedRequest(), timeout=10)


def _client(target: str):
    client = Client(target, timeout=10)
    grpc.channel_ready_future(client.channel).result(10)
    return client, lambda: client.embed(["x"])


def test_calls_a_stopping_server_cancelled_unrun_are_sent_again():
    """What failed test_sigterm_loses_no_accepted_request under load: without a retry they end CANCELLED."""
    outcomes, ran = _race_a_stop(_bare)
    assert outcomes.count("CANCELLED") >= 3 and ran < 5, outcomes  # gRPC cancels calls it never handed over
    outcomes, ran = _race_a_stop(_client)
    # sent again; here no replica is left, so the retries find the port closed
    assert set(outcomes) <= {"ok", "UNAVAILABLE"} and outcomes.count("UNAVAILABLE") >= 3 and ran < 5, outcomes


@pytest.mark.parametrize("failures,error,calls,ok", [
    (2, QueueFull("waiting queue full (64)"), 3, True),  # RetryInfo 0.1 s: tried again after it
    (3, QueueFull("waiting queue full (64)"), 3, False),  # at most 3 attempts
    (1, AdapterCapacityExceeded("all 4 adapter slots are in use"), 2, True),  # RetryInfo 1 s
])
@pytest.mark.parametrize("client_kind", ["sync", "async"])
def test_overloads_with_retry_info_are_retried_after_its_delay(failures, error, calls, ok, client_kind):
    servicer = Flaky(failures, error=error)
    server, target = _serve(servicer)
    try:
        outcome = _embed(client_kind, target)
        if ok:
            assert outcome == [[1.0, 2.0]]
        else:
            assert isinstance(outcome, RpcError) and outcome.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert outcome.reason == "QUEUE_FULL"
        assert len(servicer.calls) == calls
        delay = mapping_for(error).retry_s  # what the server's RetryInfo says
        assert all(b - a >= delay * 0.9 for a, b in zip(servicer.calls, servicer.calls[1:]))
    finally:
        server.stop(None)


@pytest.mark.parametrize("client_kind", ["sync", "async"])
def test_the_timeout_bounds_the_whole_call_retries_included(client_kind):
    servicer = Flaky(5, error=AdapterCapacityExceeded("all 2 adapter slots are in use"))  # RetryInfo 1 s
    server, target = _serve(servicer)
    try:
        start = time.monotonic()
        outcome = _embed(client_kind, target, timeout=0.5)
        elapsed = time.monotonic() - start
        # the refusal itself, at once: waiting 1 s for a retry would end past the caller's deadline
        assert isinstance(outcome, RpcError) and outcome.reason == "ADAPTER_SLOTS_EXHAUSTED"
        assert len(servicer.calls) == 1 and elapsed < 0.5
        outcome = _embed(client_kind, target, timeout=1.5)  # room for one retry, not for a second
        assert isinstance(outcome, RpcError) and len(servicer.calls) == 3
    finally:
        server.stop(None)


def _embed(client_kind: str, target: str, timeout: float = 10):
    """Embed through the sync or the async client: the vectors, or the RpcError raised."""
    try:
        if client_kind == "sync":
            with Client(target, timeout=timeout) as client:
                return client.embed(["hi"])

        async def run():
            async with AsyncClient(target, timeout=timeout) as client:
                return await client.embed(["hi"])
        return asyncio.run(run())
    except RpcError as exc:
        return exc


class MismatchedStatus(pb_grpc.InferenceServiceServicer):
    """Ends with one code and the details of a status with another, as gRPC delivers a status whose trailers
    it had to replace (over its metadata limit)."""

    def Embed(self, request, context):
        details = to_status(QueueFull(4), "r1").trailing_metadata  # RESOURCE_EXHAUSTED with RetryInfo
        context.set_trailing_metadata(details)
        context.abort(grpc.StatusCode.UNAVAILABLE, "replaced")


def test_details_of_another_status_are_ignored():
    server, target = _serve(MismatchedStatus())
    try:
        with Client(target, timeout=10) as client, pytest.raises(RpcError) as info:  # was ValueError from grpc_status
            client.embed(["x"])
    finally:
        server.stop(0)
    assert (info.value.code, info.value.reason, info.value.message) == (grpc.StatusCode.UNAVAILABLE, "", "replaced")


class Recording(Flaky):
    """Answers Embed at once, keeping each call's metadata."""

    def __init__(self):
        super().__init__(0)
        self.metadata = []

    def Embed(self, request, context):
        self.metadata.append(dict(context.invocation_metadata()))
        return super().Embed(request, context)


def test_a_retry_goes_to_another_replica():
    # gRPC's default pick_first kept one connection, so a draining replica got all three tries of a call; the
    # clients balance round_robin over every address the target names (a headless Service's pods)
    draining, healthy = Flaky(failures=100), Recording()
    (server_a, target_a), (server_b, target_b) = _serve(draining), _serve(healthy)
    try:
        target = f"ipv4:{target_a},{target_b}"
        for _ in range(4):
            assert _embed("sync", target) == [[1.0, 2.0]]
        assert len(healthy.calls) == 4  # a call that met the draining one went on to the other
    finally:
        server_a.stop(None)
        server_b.stop(None)


def test_inference_calls_send_the_adapter_for_proxies_to_hash_on():
    servicer = Recording()
    server, target = _serve(servicer)
    try:
        with Client(target) as client:
            client.embed(["x"], adapter="sentiment")
            client.embed(["x"])
            client.embed(["x"], adapter="ü-sentiment")  # not ASCII: the body alone carries it (a header would fail)
        assert [m.get("x-adapter-id") for m in servicer.metadata] == ["sentiment", None, None]
    finally:
        server.stop(None)
