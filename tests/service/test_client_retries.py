"""The Python client retries UNAVAILABLE (a draining replica, a dropped connection) and nothing else."""
from concurrent import futures

import grpc
import pytest
from adapterserve.v1 import inference_service_pb2 as pb
from adapterserve.v1 import inference_service_pb2_grpc as pb_grpc

from engine.client import Client, RpcError


class Flaky(pb_grpc.InferenceServiceServicer):
    """Answers Embed after ``failures`` UNAVAILABLE replies; any other code is sent once."""

    def __init__(self, failures: int, code=grpc.StatusCode.UNAVAILABLE):
        self.failures, self.code, self.calls = failures, code, 0

    def Embed(self, request, context):
        self.calls += 1
        if self.calls <= self.failures:
            context.abort(self.code, "draining: retry on another replica")
        return pb.EmbedResponse(embeddings=[pb.Embedding(values=[1.0, 2.0])])


def _serve(servicer):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_InferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.mark.parametrize("failures,code,calls,ok", [
    (2, grpc.StatusCode.UNAVAILABLE, 3, True),  # two retries, then the answer
    (5, grpc.StatusCode.UNAVAILABLE, 3, False),  # at most 3 attempts
    (1, grpc.StatusCode.RESOURCE_EXHAUSTED, 1, False),  # not retried
])
def test_unavailable_is_retried(failures, code, calls, ok):
    servicer = Flaky(failures, code)
    server, target = _serve(servicer)
    try:
        with Client(target, timeout=10) as client:
            if ok:
                assert client.embed(["hi"]) == [[1.0, 2.0]]
            else:
                with pytest.raises(RpcError) as info:
                    client.embed(["hi"])
                assert info.value.code == code
        assert servicer.calls == calls
    finally:
        server.stop(None)
