"""Reading the server's Prometheus endpoint in the service tests."""
import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def scrape(server) -> dict:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics").read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def requests_total(families) -> dict[tuple[str, str], float]:
    return {(s.labels["method"], s.labels["code"]): s.value for s in families["adapterserve_requests"].samples
            if s.name == "adapterserve_requests_total"}
