"""Per-adapter request counts (`serve --metrics-per-adapter N`): the N busiest adapters, every series a counter."""
import random

from engine.service.metrics import Metrics


def _scrape(metrics: Metrics) -> dict[str, float]:
    return {s.labels["adapter"]: s.value for family in metrics.registry.collect()
            if family.name == "adapterserve_adapter_requests" for s in family.samples}


def test_off_by_default():
    metrics = Metrics()
    metrics.count_adapter("a")
    assert _scrape(metrics) == {}


def test_a_zipf_stream_keeps_the_busiest_and_never_decreases_a_series():
    metrics, top = Metrics(per_adapter_top=5), 5
    rng = random.Random(0)
    names = [f"adapter-{i}" for i in range(40)]
    weights = [1 / (rank + 1) ** 1.1 for rank in range(len(names))]
    totals = dict.fromkeys(names, 0)
    previous: dict[str, float] = {}
    for step in range(3000):
        name = rng.choices(names, weights)[0] if step > 200 else names[-1 - step % 10]  # late starters win later
        metrics.count_adapter(name)
        totals[name] += 1
        now = _scrape(metrics)  # after every request: a series cannot leave and come back in between
        assert len(now) == min(top, step + 1) + 1 and now["other"] >= previous.get("other", 0)
        for adapter, value in now.items():  # a series that stayed has not gone down
            assert value >= previous.get(adapter, 0)
        kept = [totals[a] for a in now if a != "other"]
        outside = [t for a, t in totals.items() if a not in now]
        assert min(kept) >= max(outside)  # no adapter outside the top was busier than one inside it
        previous = now
    assert set(previous) - {"other"} == set(names[:top])  # the Zipf head, after the early tail had the series
