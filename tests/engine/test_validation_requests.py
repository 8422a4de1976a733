"""Names, tenants, capacity and forward inputs: each refusal is typed and names the value."""
import pytest
import torch

from engine import AdapterCapacityExceeded, AdapterNotFound, Engine, EngineConfig, InvalidRequest


def test_empty_adapter_names_are_refused(engine, bert):
    with pytest.raises(InvalidRequest, match="an adapter name must be a non-empty string, got ''"):
        engine.load_adapter(bert.cases["lora"].path, name="")
    engine.load_adapter(bert.cases["lora"].path, name="a")
    with pytest.raises(InvalidRequest, match="non-empty string, got ' '"):
        engine.average_adapters(" ", ["a"], [1.0])
    assert [a.name for a in engine.list_adapters()] == ["a"]


@pytest.mark.parametrize("name,fragment", [
    ("a\x00b", "must not hold control characters, invisible ones or surrounding spaces, got 'a\\x00b'"),
    ("a\nb", "must not hold control characters"),
    (" lead", "must not hold control characters, invisible ones or surrounding spaces"),
    ("imdb\u200b", "invisible ones or surrounding spaces, got 'imdb\\u200b'"),  # zero-width space: looks like imdb
    ("\u202eimdb", "got '\\u202eimdb'"),  # right-to-left override
    ("a\u2028b", "got 'a\\u2028b'"),  # line separator
    ("imdb\u3164", "invisible ones"),  # Hangul filler: a letter to Unicode's categories, blank on screen
    ("imdb\ufe0f", "invisible ones"),  # variation selector
    ("a\u034fb", "invisible ones"),  # combining grapheme joiner
    ("x" * 257, "holds at most 256 characters, got 257"),
])
def test_unprintable_or_overlong_adapter_names_are_refused(engine, bert, name, fragment):
    with pytest.raises(InvalidRequest) as info:
        engine.load_adapter(bert.cases["lora"].path, name=name)
    assert fragment in str(info.value)
    engine.load_adapter(bert.cases["lora"].path, name="sentiment v2/ünï")  # spaces inside, slashes, unicode: fine
    assert [a.name for a in engine.list_adapters()] == ["sentiment v2/ünï"]


def test_tenants_follow_the_name_rule(engine, bert):
    # "" is what proto3 sends for "no tenant": a record under it would list as shared and be unreachable
    for tenant in ("", " acme", "a\x00"):
        with pytest.raises(InvalidRequest, match="a tenant must"):
            engine.load_adapter(bert.cases["lora"].path, name="a", tenant=tenant)
    engine.load_adapter(bert.cases["lora"].path, name="a", tenant="acme")
    with pytest.raises(InvalidRequest, match="a tenant must be a non-empty string, got ''"):
        engine.average_adapters("b", ["a"], [1.0], tenant="")
    assert [(a.name, a.tenant) for a in engine.list_adapters()] == [("a", "acme")]
    # every other call refuses them too, rather than acting for "no tenant" (which would see shared adapters only)
    ids, mask = torch.tensor([[1, 5, 2]]), torch.ones(1, 3, dtype=torch.long)
    calls = {"forward": lambda t: engine.forward(ids, mask, [None], tenant=t),
             "forward per row": lambda t: engine.forward(ids, mask, [None], tenant=[t]),
             "list": lambda t: engine.list_adapters(t),
             "get": lambda t: engine.get_adapter("a", t), "unload": lambda t: engine.unload_adapter("a", t),
             "ready": lambda t: engine.adapters_ready(["a"], t)}
    for what, call in calls.items():
        for tenant in ("", "acme\u200b"):
            with pytest.raises(InvalidRequest, match="a tenant must"):
                call(tenant)
    assert engine.forward(ids, mask, ["a"], tenant="acme").embeddings.shape[0] == 1
    assert [(a.name, a.tenant) for a in engine.list_adapters()] == [("a", "acme")]


def test_unknown_adapter_and_tenants(engine, bert):
    engine.load_adapter(bert.cases["seq_bn"].path, name="mine", tenant="acme")
    engine.load_adapter(bert.cases["lora"].path, name="shared")
    ids, mask = bert.input_ids[:1], bert.attention_mask[:1]
    with pytest.raises(AdapterNotFound, match="'nope' is not loaded"):
        engine.forward(ids, mask, ["nope"])
    with pytest.raises(AdapterNotFound, match=r"'mine' is not loaded for tenant 'globex'$"):  # no hint to a tenant
        engine.forward(ids, mask, ["mine"], tenant="globex")
    with pytest.raises(AdapterNotFound, match="'mine' is not loaded as a shared adapter; tenant 'acme' has one"):
        engine.forward(ids, mask, ["mine"])
    engine.forward(ids, mask, ["mine"], tenant="acme")
    engine.forward(ids, mask, ["shared"], tenant="globex")
    with pytest.raises(AdapterNotFound, match="not loaded for tenant 'globex' .the shared adapter of that name is"):
        engine.unload_adapter("shared", tenant="globex")
    assert [a.name for a in engine.list_adapters("globex")] == ["shared"]
    assert {a.name for a in engine.list_adapters("acme")} == {"mine", "shared"}
    with pytest.raises(AdapterNotFound):
        engine.unload_adapter("mine", tenant="globex")
    assert all(r.refs == 0 for r in engine.registry._records.values())  # failed forwards released what they took


def test_capacity_exceeded(bert):  # idle adapters are evicted to the CPU tier; pinned ones never are
    engine = Engine(EngineConfig(model=str(bert.path), device="cpu", max_device_adapters=2))
    engine.load_adapter(bert.cases["seq_bn"].path, name="a", pin=True)
    engine.load_adapter(bert.cases["lora"].path, name="b", pin=True)
    with pytest.raises(AdapterCapacityExceeded, match="all 2 adapter slots"):
        engine.load_adapter(bert.cases["ia3"].path, name="c", pin=True)
    engine.unload_adapter("a")
    engine.load_adapter(bert.cases["ia3"].path, name="c", pin=True)


def test_bad_requests(engine, bert):
    engine.load_adapter(bert.cases["lora"].path)
    ids, mask = bert.input_ids, bert.attention_mask
    with pytest.raises(InvalidRequest, match="adapters names 1 rows, the batch has 4"):
        engine.forward(ids, mask, ["lora"])
    with pytest.raises(InvalidRequest, match="input_ids must lie in 0..99"):
        engine.forward(ids + 1000, mask, [None] * 4)
    with pytest.raises(InvalidRequest, match="sequence length 65"):
        engine.forward(torch.ones(1, 65, dtype=torch.long), torch.ones(1, 65, dtype=torch.long), [None])
    with pytest.raises(InvalidRequest, match="at least one token"):
        engine.forward(ids[:1], torch.zeros_like(ids[:1]), [None])
    with pytest.raises(InvalidRequest, match="must both be"):
        engine.forward(ids, mask[:, :3], [None] * 4)
    with pytest.raises(InvalidRequest, match="input_ids must be a torch tensor, got list"):
        engine.forward(ids.tolist(), mask, [None] * 4)
    with pytest.raises(InvalidRequest, match="input_ids must hold integers, got torch.float32"):
        engine.forward(ids.float(), mask, [None] * 4)
    with pytest.raises(InvalidRequest, match="attention_mask must hold only 0 and 1"):
        engine.forward(ids, mask * 3, [None] * 4)  # mean pooling would weigh tokens by it
    with pytest.raises(InvalidRequest, match=r"token_type_ids must lie in 0\.\.1"):
        engine.forward(ids, mask, [None] * 4, token_type_ids=torch.full_like(ids, 2))
