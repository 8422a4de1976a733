"""Prometheus metrics on their own registry and HTTP port (names per serving-conventions §3).

Adapter names appear only in the vLLM-compatible ``lora_requests_info`` gauge that inference gateways parse,
and, when asked for (``serve --metrics-per-adapter``), with their tenants in per-adapter request counts capped to
the busiest adapters (§3.5: every label value is a series, and a server may hold thousands of tenant adapters).
"""
import collections
import threading
import time
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self, vllm_compat: bool = False, per_adapter_top: int = 0):
        disable_created_metrics()  # process-wide: no *_created series beside every counter and histogram
        self.registry = CollectorRegistry()
        r, p = self.registry, "adapterserve_"
        self.requests = Counter(p + "requests_total", "RPCs by method and gRPC code", ["method", "code"], registry=r)
        self.latency = Histogram(p + "request_duration_seconds", "End-to-end RPC latency", ["method"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram(p + "request_queue_time_seconds", "Time waiting for a batch",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.compute_time = Histogram(p + "batch_compute_seconds", "Forward pass time per batch",
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.batch_rows = Histogram(p + "batch_rows", "Rows per forward pass", buckets=SIZE_BUCKETS, registry=r)
        self.batch_adapters = Histogram(p + "batch_distinct_adapters", "Distinct adapters per forward pass",
                                        buckets=SIZE_BUCKETS, registry=r)
        self.tokens = Counter(p + "prompt_tokens_total", "Tokens processed (rate() gives tokens/s)", registry=r)
        self.running = Gauge(p + "num_requests_running", "Requests in the current forward pass", registry=r)
        self.waiting = Gauge(p + "num_requests_waiting", "Requests waiting for a batch", registry=r)
        self.slots = Gauge(p + "adapter_slots_total", "Device adapter slots", registry=r)
        self.load_time = Histogram(p + "adapter_load_duration_seconds", "LoadAdapter time", buckets=LATENCY_BUCKETS,
                                   registry=r)
        self.loads = Counter(p + "adapter_loads_total", "LoadAdapter calls past auth, by result", ["result"],
                             registry=r)
        self.on_demand_loads = Counter(p + "adapter_on_demand_loads_total", "Loads from the store on first use, by "
                                       "result: ok, not_in_store, taken, error", ["result"], registry=r)
        self.build_info = Gauge(p + "build_info", "Build and model", ["version", "base_model"], registry=r)
        lora_labels = ["max_lora", "running_lora_adapters", "waiting_lora_adapters"]
        self.lora_info = [Gauge(p + "lora_requests_info", "Running/waiting adapters (vLLM gateway contract)",
                                lora_labels, registry=r)]
        if vllm_compat:
            self.lora_info.append(Gauge("vllm:lora_requests_info", "vLLM-compatible alias", lora_labels, registry=r))
        self._adapter_requests = None
        if per_adapter_top:
            self._adapter_requests = _AdapterRequests(per_adapter_top)
            r.register(self._adapter_requests)

    def serve(self, port: int, addr: str = "0.0.0.0"):
        return start_http_server(port, addr=addr, registry=self.registry)

    def watch_residency(self, count: Callable[[], dict[str, int]]) -> None:
        """``adapters_resident{tier}`` read at scrape time: forwards move adapters between tiers all the time."""
        self.registry.register(_Residency(count))

    def count_adapter(self, adapter: str, tenant: str | None) -> None:
        """One request for ``adapter`` of ``tenant`` (its owner; None: a shared adapter)."""
        if self._adapter_requests is not None:
            self._adapter_requests.count((tenant or "", adapter))

    def set_lora_info(self, max_lora: int, running: set[str], waiting: set[str]) -> None:
        """One series, value = update time; names comma-joined without spaces (the gateway splits on ',')."""
        for gauge in self.lora_info:
            gauge.clear()
            gauge.labels(str(max_lora), ",".join(sorted(running)), ",".join(sorted(waiting))).set(time.time())


class _Residency(Collector):
    def __init__(self, count: Callable[[], dict[str, int]]):
        self._count = count

    def collect(self):
        gauge = GaugeMetricFamily("adapterserve_adapters_resident", "Adapters per tier", labels=["tier"])
        counts = self._count()
        for tier in ("device", "cpu", "source"):
            gauge.add_metric([tier], counts.get(tier, 0))
        yield gauge


Adapter = tuple[str, str]  # (owner tenant, "" for a shared adapter; adapter name)
REST: Adapter = ("", "")  # the series of adapters outside the top: no adapter has an empty name, so none clashes


class _AdapterRequests(Collector):
    """``adapterserve_adapter_requests_total{tenant, adapter}`` for the ``top`` busiest adapters so far, and
    ``{tenant="", adapter=""}`` for the rest.

    Two tenants' adapters of one name are two adapters, so two series (they were one, summed). Every series stays a
    counter (never decreases): an adapter's series counts its requests since it last entered the top, the rest's
    those made while their adapter was outside it. An adapter overtaken by a busier one loses its series
    (Prometheus marks it stale); one that enters starts a new series. A total is kept per adapter ever requested
    (only adapters that were found are counted): an int each, for the life of the process.
    """

    def __init__(self, top: int):
        self._top, self._lock = top, threading.Lock()
        self._totals: collections.Counter[Adapter] = collections.Counter()  # all requests per adapter: ranks the top
        self._series: dict[Adapter, int] = {}  # adapter in the top -> requests since it entered
        self._rest = 0

    def count(self, adapter: Adapter) -> None:
        with self._lock:
            self._totals[adapter] += 1
            if adapter not in self._series:
                if len(self._series) == self._top:
                    least = min(self._series, key=self._totals.__getitem__)
                    if self._totals[least] >= self._totals[adapter]:
                        self._rest += 1
                        return
                    del self._series[least]
                self._series[adapter] = 0
            self._series[adapter] += 1

    def collect(self):
        family = CounterMetricFamily("adapterserve_adapter_requests", 'Requests per adapter (the busiest; the rest: '
                                     'adapter="")', labels=["tenant", "adapter"])
        with self._lock:
            samples = [*self._series.items(), (REST, self._rest)]
        for adapter, count in samples:
            family.add_metric(list(adapter), count)
        yield family
