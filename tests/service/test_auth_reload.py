"""The API key file is read again when it changes (a rotated Kubernetes Secret), without a restart."""
import json
import os
import threading

import pytest

import engine.service.auth as auth
from engine.errors import Unauthenticated
from engine.service.auth import Authenticator, Role, hash_key


def _write(path, *keys):
    path.write_text(json.dumps({"keys": [{"sha256": hash_key(k), "tenant": "acme", "role": "inference"}
                                         for k in keys]}))


def test_rotated_keys_take_effect_and_a_broken_file_keeps_the_old_ones(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(auth, "RELOAD_CHECK_S", 0.0)
    path = tmp_path / "keys.json"
    _write(path, "old-key")
    authenticator = Authenticator.from_file(path)
    bearer = lambda key: {"authorization": f"Bearer {key}"}  # noqa: E731
    assert authenticator.authenticate(bearer("old-key")).role == Role.INFERENCE
    _write(path, "new-key", "second-key")
    assert authenticator.authenticate(bearer("new-key")).tenant == "acme"
    with pytest.raises(Unauthenticated):
        authenticator.authenticate(bearer("old-key"))
    path.write_text("{half a file")
    assert authenticator.authenticate(bearer("second-key")).tenant == "acme"  # still the last good keys
    assert "keeping the 2 keys in use" in caplog.text


@pytest.mark.parametrize("tenant, message", [("", "must be a non-empty string"), (" acme", "surrounding spaces"),
                                             (7, "must be a non-empty string, got 7")])
def test_a_key_file_binding_a_key_to_no_real_tenant_is_refused(tmp_path, tenant, message):
    # an empty tenant would scope a key to a tenant that every listing shows as shared (null over the wire)
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": [{"sha256": hash_key("k"), "tenant": tenant, "role": "admin"}]}))
    with pytest.raises(ValueError, match=f"cannot read API key file .*a key's tenant .*{message}"):
        Authenticator.from_file(path)


def test_a_fifo_in_place_of_the_key_file_neither_blocks_nor_drops_the_keys(tmp_path, monkeypatch, caplog):
    """Its read blocked on the event loop: every call and health check hung for good (found by a probe)."""
    monkeypatch.setattr(auth, "RELOAD_CHECK_S", 0.0)
    path = tmp_path / "keys.json"
    _write(path, "key")
    authenticator = Authenticator.from_file(path)
    path.unlink()
    os.mkfifo(path)
    outcome = []
    call = threading.Thread(target=lambda: outcome.append(authenticator.authenticate(
        {"authorization": "Bearer key"})), daemon=True)
    call.start()
    call.join(5)
    assert not call.is_alive() and outcome[0].tenant == "acme"  # answered at once, with the keys in use
    assert f"cannot read API key file {path}: it is not a regular file; keeping the 1 keys in use" in caplog.text


def test_a_key_file_on_a_stalled_mount_holds_no_call(tmp_path, monkeypatch):
    """A stat that never returns (a hung NFS mount) held the event loop: the look at the file runs on a worker thread
    that a call waits for only RELOAD_WAIT_S, and no second one starts while it is stuck."""
    monkeypatch.setattr(auth, "RELOAD_CHECK_S", 0.0)
    path = tmp_path / "keys.json"
    _write(path, "old-key")
    authenticator = Authenticator.from_file(path)
    mount_back, stats = threading.Event(), []
    real_stamp = auth._stamp
    monkeypatch.setattr(auth, "_stamp", lambda p: stats.append(p) or mount_back.wait() and real_stamp(p))
    _write(path, "new-key")
    outcome = []
    calls = threading.Thread(target=lambda: outcome.extend(authenticator.authenticate(
        {"authorization": "Bearer old-key"}) for _ in range(3)), daemon=True)
    calls.start()
    calls.join(5)
    assert not calls.is_alive() and [p.tenant for p in outcome] == ["acme"] * 3  # the keys in use
    assert len(stats) == 1  # one stuck look, not one per call
    mount_back.set()
    authenticator._reload.join(5)
    assert authenticator.authenticate({"authorization": "Bearer new-key"}).tenant == "acme"
    with pytest.raises(Unauthenticated):
        authenticator.authenticate({"authorization": "Bearer old-key"})


@pytest.mark.parametrize("keys, message", [
    ([{"sha256": "ab", "role": "admin"}], "a sha256 holds 64 hex digits, got 'ab'"),  # could never match
    ([{"sha256": hash_key("k"), "role": "admin"}, {"sha256": hash_key("k"), "tenant": "acme", "role": "inference"}],
     "is listed twice, with different tenants or roles"),
])
def test_key_entries_that_cannot_mean_what_they_say_are_refused(tmp_path, keys, message):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": keys}))
    with pytest.raises(ValueError, match=message):
        Authenticator.from_file(path)


def test_a_key_file_with_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "keys.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"keys": [{"sha256": hash_key("k"), "role": "admin"}]}).encode())
    assert Authenticator.from_file(path).authenticate({"authorization": "Bearer k"}).role == Role.ADMIN


def test_a_key_file_emptied_warns_that_every_call_is_refused(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(auth, "RELOAD_CHECK_S", 0.0)
    path = tmp_path / "keys.json"
    _write(path, "key")
    authenticator = Authenticator.from_file(path)
    path.write_text(json.dumps({"keys": []}))
    with pytest.raises(Unauthenticated):
        authenticator.authenticate({"authorization": "Bearer key"})
    assert [r.levelname for r in caplog.records if "every call will be refused" in r.message] == ["WARNING"]
