"""A real server on a free loopback port, driven from the test thread with the sync client."""
import asyncio
import json
import threading
from dataclasses import dataclass

import pytest

from engine import Engine
from engine.client import Client
from engine.scheduler import SchedulerConfig
from engine.service.auth import hash_key
from engine.service.server import AdapterServer, ServerConfig
from minilm import MiniLMOracle, build_minilm_adapters

KEYS = {  # key: (tenant, role)
    "acme-key": ("acme", "inference"),
    "globex-key": ("globex", "inference"),
    "acme-admin": ("acme", "admin"),
    "root-admin": (None, "admin"),
}


class RunningServer:
    """Runs an AdapterServer's event loop in a background thread."""

    def __init__(self, server: AdapterServer):
        self.server = server
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port = self.run(server.start())
        self.target = f"127.0.0.1:{self.port}"

    def run(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def client(self, key: str | None = None, tenant: str | None = None, timeout: float = 60) -> Client:
        return Client(self.target, api_key=key, tenant=tenant, timeout=timeout)

    def stop(self):
        self.run(self.server.drain())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@dataclass
class ServiceSetup:
    library: MiniLMOracle  # the adapter folders and the library's outputs for them
    engine: Engine

    @property
    def folders(self) -> dict:
        return self.library.folders


@pytest.fixture(scope="session")
def minilm_setup(tmp_path_factory):
    library = build_minilm_adapters(tmp_path_factory.mktemp("minilm_adapters"))
    return ServiceSetup(library, Engine.from_pretrained(device="cpu"))


@pytest.fixture()
def server(start_server, minilm_setup):
    """A server on the shared engine with every MiniLM adapter loaded, shared."""
    running = start_server()
    with running.client() as admin:
        for name, folder in minilm_setup.folders.items():
            admin.load_adapter(str(folder), name=name)
    return running


@pytest.fixture(scope="session")
def key_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "keys.json"
    path.write_text(json.dumps({"keys": [{"sha256": hash_key(k), "tenant": t, "role": r} for k, (t, r) in KEYS.items()]}))
    return str(path)


@pytest.fixture()
def start_server(minilm_setup):
    """Factory: start a server on the shared engine; every server is drained at teardown."""
    started = []

    def start(api_keys=None, scheduler=SchedulerConfig(), grace_s=5.0, max_message_mb=16, engine=None,
              metrics_per_adapter=0, load_on_demand=False):
        config = ServerConfig(host="127.0.0.1", port=0, metrics_port=0, api_keys=api_keys, grace_s=grace_s,
                              max_message_mb=max_message_mb, metrics_per_adapter=metrics_per_adapter,
                              load_on_demand=load_on_demand)
        running = RunningServer(AdapterServer(engine or minilm_setup.engine, config, scheduler))
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()
    for info in minilm_setup.engine.list_adapters():
        minilm_setup.engine.unload_adapter(info.name, info.tenant)
