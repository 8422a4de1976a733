"""Per-adapter request counts (`serve --metrics-per-adapter N`): the N busiest adapters, every series a counter."""
import random

from engine.service.metrics import REST, Metrics


def _scrape(metrics: Metrics) -> dict[tuple[str, str], float]:
    return {(s.labels["tenant"], s.labels["adapter"]): s.value for family in metrics.registry.collect()
            if family.name == "adapterserve_adapter_requests" for s in family.samples}


def test_off_by_default():
    metrics = Metrics()
    metrics.count_adapter("a", None)
    assert _scrape(metrics) == {}


def test_adapters_of_one_name_under_two_tenants_are_two_series():
    metrics = Metrics(per_adapter_top=5)
    for tenant in ("acme", "globex", "globex", None):
        metrics.count_adapter("sentiment", tenant)
    metrics.count_adapter("other", None)  # a shared adapter may be called that: the rest's series is apart
    assert _scrape(metrics) == {("acme", "sentiment"): 1, ("globex", "sentiment"): 2, ("", "sentiment"): 1,
                                ("", "other"): 1, REST: 0}


def test_a_zipf_stream_keeps_the_busiest_and_never_decreases_a_series():
    metrics, top = Metrics(per_adapter_top=5), 5
    rng = random.Random(0)
    names = [("acme" if i % 2 else "", f"adapter-{i}") for i in range(40)]
    weights = [1 / (rank + 1) ** 1.1 for rank in range(len(names))]
    totals = dict.fromkeys(names, 0)
    previous: dict[str, float] = {}
    for step in range(3000):
        name = rng.choices(names, weights)[0] if step > 200 else names[-1 - step % 10]  # late starters win later
        metrics.count_adapter(name[1], name[0] or None)
        totals[name] += 1
        now = _scrape(metrics)  # after every request: a series cannot leave and come back in between
        assert len(now) == min(top, step + 1) + 1 and now[REST] >= previous.get(REST, 0)
        for adapter, value in now.items():  # a series that stayed has not gone down
            assert value >= previous.get(adapter, 0)
        kept = [totals[a] for a in now if a != REST]
        outside = [t for a, t in totals.items() if a not in now]
        assert min(kept) >= max(outside)  # no adapter outside the top was busier than one inside it
        previous = now
    assert set(previous) - {REST} == set(names[:top])  # the Zipf head, after the early tail had the series
