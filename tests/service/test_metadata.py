"""Metadata that picks the key, tenant, adapter or request id must say one thing: twice, or not UTF-8, is refused."""
import grpc
import pytest
from adapterserve.v1 import inference_service_pb2 as pb
from adapterserve.v1 import inference_service_pb2_grpc as pb_grpc

from engine.client import RpcError
from minilm import TEXTS


def _classify(target: str, metadata: tuple, adapter: str = "sentiment") -> pb.ClassifyResponse:
    with grpc.insecure_channel(target) as channel:
        request = pb.ClassifyRequest(adapter_id=adapter, inputs=[pb.Input(text=TEXTS[0])])
        return pb_grpc.InferenceServiceStub(channel).Classify(request, metadata=metadata, timeout=60)


def _refused(target: str, metadata: tuple, adapter: str = "sentiment") -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        _classify(target, metadata, adapter)
    return info.value


@pytest.fixture()
def replacement_tenant(server, minilm_setup):
    """An adapter of the tenant "a\ufffd": what every non-UTF-8 byte string after "a" decoded to, with replacement."""
    with server.client() as operator:
        operator.load_adapter(str(minilm_setup.folders["sentiment"]), name="secret", tenant="a\ufffd")
    return server


def test_tenant_bytes_that_are_not_utf8_are_refused(replacement_tenant):
    assert _classify(replacement_tenant.target, (("x-tenant-id-bin", "a\ufffd".encode()),), "secret").results
    for not_utf8 in (b"a\xff", b"a\xfe", b"a\xc3"):  # each one read as that tenant before
        err = _refused(replacement_tenant.target, (("x-tenant-id-bin", not_utf8),), "secret")
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "x-tenant-id-bin header holds bytes that are not UTF-8" in err.details()


@pytest.mark.parametrize("header, value", [("x-tenant-id", "acme"), ("x-adapter-id", "sentiment"),
                                           ("x-request-id", "r1"), ("x-tenant-id-bin", b"acme")])
def test_a_header_that_picks_something_may_come_once(server, header, value):
    assert _classify(server.target, ((header, value),)).results
    err = _refused(server.target, ((header, value), (header, value)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"the {header} header was sent more than once" in err.details()


def test_both_tenant_headers_must_name_one_tenant(server):
    assert _classify(server.target, (("x-tenant-id", "acme"), ("x-tenant-id-bin", b"acme"))).results
    err = _refused(server.target, (("x-tenant-id", "acme"), ("x-tenant-id-bin", b"globex")))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "x-tenant-id and x-tenant-id-bin headers name different tenants" in err.details()


def test_two_keys_are_refused_and_keyless_callers_learn_nothing_else(start_server, key_file, minilm_setup):
    running = start_server(api_keys=key_file)
    with running.client("root-admin") as root:
        root.load_adapter(str(minilm_setup.folders["sentiment"]), name="sentiment")
    acme, globex = ("authorization", "Bearer acme-key"), ("authorization", "Bearer globex-key")
    assert _classify(running.target, (acme,)).results
    for metadata in ((acme, globex), (acme, acme)):  # which key counts would depend on header order
        err = _refused(running.target, metadata)
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "the authorization header was sent more than once" in err.details()
    # without a key, the other header faults are not looked at: the answer is only that a key is missing
    err = _refused(running.target, (("x-tenant-id", "acme"), ("x-tenant-id", "globex")))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "missing API key" in err.details()
    err = _refused(running.target, (acme, ("x-tenant-id", "acme"), ("x-tenant-id", "globex")))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_the_tenant_field_and_the_tenant_header_must_agree(server, minilm_setup):
    with server.client(tenant="acme") as acme:
        acme.load_adapter(str(minilm_setup.folders["sentiment"]), name="own", tenant="acme")  # equal: fine
        with pytest.raises(RpcError) as info:  # which one counted was a matter of precedence: the field did
            acme.load_adapter(str(minilm_setup.folders["sentiment"]), name="other", tenant="globex")
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "tenant 'globex' differs from the x-tenant-id metadata 'acme'" in info.value.message
        assert [a.name for a in acme.list_adapters() if a.tenant] == ["own"]
