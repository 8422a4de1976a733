"""Tenants: (tenant, name) keys, a tenant's own adapter shadowing a shared one, per-row tenants in one batch."""
import pytest
from lifecycle_helpers import assert_rows, run

from engine import AdapterNotFound


def test_tenants_shadow_shared_adapters_row_by_row(make_engine, bert):
    engine = make_engine()
    engine.load_adapter(bert.cases["lora"].path, name="sentiment")  # shared
    engine.load_adapter(bert.cases["ia3"].path, name="sentiment", tenant="acme")  # acme's own
    engine.load_adapter(bert.cases["par_bn"].path, name="private", tenant="acme")
    out = run(engine, bert, ["sentiment", "sentiment", "private", None], tenant=["acme", "globex", "acme", "globex"])
    assert_rows(bert, out, ["ia3", "lora", "par_bn", None])
    with pytest.raises(AdapterNotFound, match="'private' is not loaded for tenant 'globex'"):
        run(engine, bert, ["sentiment", "private"], tenant=["acme", "globex"])
    assert engine.get_adapter("sentiment", "acme").method == "ia3"
    assert engine.get_adapter("sentiment", "globex").method == "lora"
    assert [(i.tenant, i.name) for i in engine.list_adapters("globex")] == [(None, "sentiment")]
    assert [(i.tenant, i.name) for i in engine.list_adapters()] == [
        (None, "sentiment"), ("acme", "private"), ("acme", "sentiment")]
    with pytest.raises(AdapterNotFound):
        engine.unload_adapter("private", tenant="globex")
    engine.unload_adapter("sentiment", tenant="acme")  # acme falls back to the shared one
    assert_rows(bert, run(engine, bert, ["sentiment"], tenant="acme"), ["lora"])
    assert all(r.refs == 0 for r in engine.registry._records.values())


def test_infos_describe_tier_state_and_pinning(make_engine, bert):
    engine = make_engine(max_device_adapters=1, max_cpu_adapters=0)
    pinned = engine.load_adapter(bert.cases["seq_bn"].path, tenant="acme", pin=True)
    assert (pinned.tier, pinned.slot, pinned.state, pinned.pinned) == ("device", 0, "ready", True)
    assert (pinned.head_type, pinned.labels, pinned.method) == ("classification", ("LABEL_0", "LABEL_1", "LABEL_2"),
                                                                "bottleneck")
    other = engine.load_adapter(bert.cases["lora"].path, tenant="acme")
    assert (other.tier, other.slot, other.pinned, other.num_params) == ("source", -1, False, 4096)
    averaged = engine.average_adapters("mix", ["lora"], [1.0], tenant="acme")
    assert (averaged.tenant, averaged.tier, averaged.source) == ("acme", "cpu", "average[linear](lora*1)")
    with pytest.raises(AdapterNotFound):
        engine.average_adapters("mix2", ["lora"], [1.0], tenant="globex")  # not visible to globex
