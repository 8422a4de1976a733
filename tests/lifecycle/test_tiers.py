"""Device slots, the CPU tier and the source tier: LRU order, budgets, pinned and in-use adapters."""
import threading
import time

import pytest
from adapter_edits import copy_case
from lifecycle_helpers import assert_rows, placement, run

from engine import AdapterCapacityExceeded, AdapterSourceError
from engine.errors import AdapterLoadsBusy


def test_lru_eviction_order_through_the_tiers(make_engine, bert):
    engine = make_engine(max_device_adapters=2, max_cpu_adapters=1)
    for name in ("lora", "ia3", "par_bn"):
        engine.load_adapter(bert.cases[name].path)
    # a load fills free slots but evicts nobody: the third waits in the CPU tier
    assert placement(engine) == {"lora": "device", "ia3": "device", "par_bn": "cpu"}
    assert_rows(bert, run(engine, bert, ["lora"]), ["lora"])  # lora is now more recent than ia3
    assert_rows(bert, run(engine, bert, ["par_bn"]), ["par_bn"])  # evicts the least recently used: ia3
    assert placement(engine) == {"lora": "device", "ia3": "cpu", "par_bn": "device"}
    engine.load_adapter(bert.cases["seq_bn"].path)  # a second host copy: the oldest (ia3) goes back to its source
    assert placement(engine) == {"lora": "device", "ia3": "source", "par_bn": "device", "seq_bn": "cpu"}
    assert_rows(bert, run(engine, bert, ["ia3", "seq_bn", None, "ia3"]), ["ia3", "seq_bn", None, "ia3"])
    # both came back in one batch (ia3 read again from its folder), evicting lora then par_bn
    assert placement(engine) == {"lora": "source", "ia3": "device", "par_bn": "cpu", "seq_bn": "device"}
    assert engine.pool.num_free == 0 and all(i.state == "ready" for i in engine.list_adapters())


def test_device_memory_budget(make_engine, bert):
    engine = make_engine(max_device_adapters=8, adapter_memory_mb=0.04)  # 41.9 kB of adapter weights
    engine.load_adapter(bert.cases["lora"].path)  # 16.4 kB
    engine.load_adapter(bert.cases["peft_lora_ffn"].path)  # 28.7 kB: does not fit beside lora
    assert placement(engine) == {"lora": "device", "peft_lora_ffn": "cpu"}
    assert_rows(bert, run(engine, bert, ["peft_lora_ffn"]), ["peft_lora_ffn"])
    assert placement(engine) == {"lora": "cpu", "peft_lora_ffn": "device"}
    before = engine.list_adapters()
    with pytest.raises(AdapterCapacityExceeded, match="more than the whole device budget"):
        engine.load_adapter(bert.cases["par_bn"].path)  # 51.7 kB with its head
    assert engine.list_adapters() == before


def test_pinned_adapters_are_never_evicted(make_engine, bert):
    engine = make_engine(max_device_adapters=2, max_cpu_adapters=0)
    pinned = engine.load_adapter(bert.cases["seq_bn"].path, pin=True)
    for name in ("lora", "ia3", "par_bn"):
        engine.load_adapter(bert.cases[name].path)
    for name in ("lora", "ia3", "par_bn", "lora", "par_bn"):
        assert_rows(bert, run(engine, bert, [name, "seq_bn"]), [name, "seq_bn"])
        info = engine.get_adapter("seq_bn")
        assert (info.tier, info.slot, info.pinned) == ("device", pinned.slot, True)
    engine.load_adapter(bert.cases["lora"].path, name="p2", pin=True)  # evicts the idle par_bn
    before = engine.list_adapters()
    with pytest.raises(AdapterCapacityExceeded, match="all 2 adapter slots"):
        engine.load_adapter(bert.cases["ia3"].path, name="p3", pin=True)
    assert engine.list_adapters() == before  # nothing changed, nothing evicted
    with pytest.raises(AdapterCapacityExceeded):
        run(engine, bert, ["par_bn"])  # both slots pinned: nothing can come in
    on_device = {(i.name, i.slot) for i in engine.list_adapters() if i.tier == "device"}
    assert on_device == {("seq_bn", pinned.slot), ("p2", 1 - pinned.slot)}
    assert all(r.refs == 0 for r in engine.registry._records.values())


def test_a_pinned_version_is_swapped_on_a_device_full_of_pinned_ones(make_engine, bert):
    """It takes the slot of the version it replaces (it needed a free one: RESOURCE_EXHAUSTED, found by a probe)."""
    engine = make_engine(max_device_adapters=2, max_cpu_adapters=0)
    engine.load_adapter(bert.cases["seq_bn"].path, name="a", pin=True)
    engine.load_adapter(bert.cases["lora"].path, name="b", pin=True)
    swapped = engine.load_adapter(bert.cases["ia3"].path, name="b", pin=True)  # a new version of b
    assert (swapped.tier, swapped.pinned, swapped.method) == ("device", True, "ia3")
    assert_rows(bert, run(engine, bert, ["a", "b"]), ["seq_bn", "ia3"])
    with pytest.raises(AdapterCapacityExceeded, match="all 2 adapter slots"):  # a new name still needs a slot
        engine.load_adapter(bert.cases["par_bn"].path, name="c", pin=True)
    assert [(i.name, i.tier) for i in engine.list_adapters()] == [("a", "device"), ("b", "device")]
    assert engine.pool.num_free == 0


def test_a_pinned_swap_evicts_the_version_it_replaces_first(make_engine, bert):
    """It evicted the least recently used idle adapter instead, then freed the replaced one: a slot stood empty and
    the other adapter had to be read from its files again (review)."""
    engine = make_engine(max_device_adapters=2, max_cpu_adapters=0)
    engine.load_adapter(bert.cases["lora"].path, name="y")  # idle, least recently used
    engine.load_adapter(bert.cases["seq_bn"].path, name="x", pin=True)
    run(engine, bert, ["x"])
    engine.load_adapter(bert.cases["ia3"].path, name="x", pin=True)
    assert placement(engine) == {"x": "device", "y": "device"} and engine.pool.num_free == 0


def test_a_batch_during_a_pinned_swap_gets_the_old_or_the_new_version(make_engine, bert, monkeypatch):
    """The swap evicted the version it replaces before the name moved: a batch acquiring the name in between found
    every slot pinned and failed with AdapterCapacityExceeded (~18% of forwards under a swap loop, review)."""
    engine = make_engine(max_device_adapters=2, max_cpu_adapters=0)
    engine.load_adapter(bert.cases["seq_bn"].path, name="x", pin=True)
    engine.load_adapter(bert.cases["lora"].path, name="p", pin=True)
    add, placed, go = engine.adapters.tiers.add, threading.Event(), threading.Event()

    def add_then_wait(*args):  # the new version is filed (the old one evicted); the name has not moved yet
        add(*args)
        placed.set()
        assert go.wait(10)
    monkeypatch.setattr(engine.adapters.tiers, "add", add_then_wait)
    swap = threading.Thread(target=lambda: engine.load_adapter(bert.cases["ia3"].path, name="x", pin=True))
    swap.start()
    assert placed.wait(10)
    outcome = []
    batch = threading.Thread(target=lambda: outcome.append(_outcome(lambda: run(engine, bert, ["x"]))))
    batch.start()
    time.sleep(0.2)  # the batch is waiting (fixed) or has failed (before)
    go.set()
    swap.join(10)
    batch.join(10)
    assert not isinstance(outcome[0], Exception), outcome[0]
    assert_rows(bert, outcome[0], ["ia3"])  # it waited for the swap: the new version


def test_lookups_do_not_wait_for_the_device_copy_of_an_unpinned_swap(make_engine, bert, monkeypatch):
    """Only a pinned swap files its version under the registry lock: the event loop's lookups wait for none other
    (every swap held them for its device copy, a review)."""
    engine = make_engine(max_device_adapters=4)
    engine.load_adapter(bert.cases["seq_bn"].path, name="x")
    engine.load_adapter(bert.cases["lora"].path, name="other")
    load, copying = engine.pool.load, threading.Event()

    def slow_load(spec):
        copying.set()
        time.sleep(1.0)
        return load(spec)
    monkeypatch.setattr(engine.pool, "load", slow_load)
    swap = threading.Thread(target=lambda: engine.load_adapter(bert.cases["ia3"].path, name="x"))
    swap.start()
    assert copying.wait(10)
    t0 = time.monotonic()
    engine.registry.lookup("other", None)
    waited = time.monotonic() - t0
    swap.join(10)
    assert waited < 0.5, waited


def _outcome(call):
    try:
        return call()
    except Exception as exc:  # noqa: BLE001 - the test reports it
        return exc


def test_a_read_whose_thread_cannot_start_is_busy_and_tried_again(make_engine, bert, monkeypatch):
    """The read's future was recorded before its thread started: a failed start (a process at its thread limit)
    answered RuntimeError, and every later batch waited for that future forever (review)."""
    engine = make_engine(max_device_adapters=1, max_cpu_adapters=0)
    engine.load_adapter(bert.cases["lora"].path, name="a")
    engine.load_adapter(bert.cases["ia3"].path, name="b")  # no slot free and no CPU budget: b waits at its source
    assert placement(engine) == {"a": "device", "b": "source"}
    start = threading.Thread.start

    def no_thread(thread):
        if thread.name.startswith("adapter-read-"):
            raise RuntimeError("can't start new thread")
        return start(thread)
    monkeypatch.setattr(threading.Thread, "start", no_thread)
    with pytest.raises(AdapterLoadsBusy, match="cannot start a thread to read adapter 'b'"):
        run(engine, bert, ["b"])
    assert engine.get_adapter("b").state == "ready"  # not "loading" for good
    monkeypatch.setattr(threading.Thread, "start", start)
    assert_rows(bert, run(engine, bert, ["b"]), ["ia3"])


def test_a_trim_timer_that_cannot_start_leaves_nothing_behind(make_engine, bert, monkeypatch):
    """The CPU tier's re-trim timer starts at the end of a load, after the version is filed: a failed start raised
    out of the load and left its slot taken with no name on it (review)."""
    import engine.adapters.tiers as tiers

    engine = make_engine(max_device_adapters=1, max_cpu_adapters=0)
    engine.load_adapter(bert.cases["lora"].path, name="a")
    engine.adapters_ready(["a"])  # holds a's host copy for HOLD_S: a load evicting nothing still over-budgets it
    monkeypatch.setattr(tiers.threading.Timer, "start", lambda timer: (_ for _ in ()).throw(
        RuntimeError("can't start new thread")))
    engine.load_adapter(bert.cases["ia3"].path, name="b", pin=True)  # evicts a to the CPU tier, over its budget
    monkeypatch.undo()
    for name in ("a", "b"):
        engine.unload_adapter(name)
    assert engine.list_adapters() == [] and engine.pool.num_free == engine.pool.capacity


def test_a_swap_that_cannot_be_copied_to_the_device_leaves_the_pinned_version_there(make_engine, bert, monkeypatch):
    engine = make_engine(max_device_adapters=2, max_cpu_adapters=0)
    engine.load_adapter(bert.cases["seq_bn"].path, name="a", pin=True)
    engine.load_adapter(bert.cases["lora"].path, name="b", pin=True)
    load, calls = engine.pool.load, []

    def out_of_memory_once(spec):
        calls.append(spec.name)
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory")
        return load(spec)
    monkeypatch.setattr(engine.pool, "load", out_of_memory_once)
    with pytest.raises(RuntimeError, match="out of memory"):
        engine.load_adapter(bert.cases["ia3"].path, name="b", pin=True)
    info = engine.get_adapter("b")  # evicted for the swap, then put back
    assert (info.method, info.tier, info.pinned) == ("lora", "device", True)
    assert_rows(bert, run(engine, bert, ["a", "b"]), ["seq_bn", "lora"])


def test_adapters_in_use_are_never_evicted(make_engine, bert):
    engine = make_engine(max_device_adapters=2)
    for name in ("lora", "ia3", "par_bn"):
        engine.load_adapter(bert.cases[name].path)
    with pytest.raises(AdapterCapacityExceeded):  # three distinct adapters cannot share two slots
        run(engine, bert, ["lora", "ia3", "par_bn"])
    with engine.adapters.admit(["lora"], [None]) as held:  # lora's rows are in flight
        slot = held.row_slots[0]
        assert_rows(bert, run(engine, bert, ["par_bn"]), ["par_bn"])  # evicts ia3, the only idle one
        assert_rows(bert, run(engine, bert, ["ia3"]), ["ia3"])  # evicts par_bn, not the older lora
        assert engine.get_adapter("lora").slot == slot
    assert placement(engine) == {"lora": "device", "ia3": "device", "par_bn": "cpu"}
    assert all(r.refs == 0 for r in engine.registry._records.values())


def test_prefetch_brings_a_source_adapter_in_without_a_forward(make_engine, bert):
    engine = make_engine(max_device_adapters=1, max_cpu_adapters=0)
    engine.load_adapter(bert.cases["lora"].path)
    engine.load_adapter(bert.cases["ia3"].path)
    assert placement(engine) == {"lora": "device", "ia3": "source"}
    assert engine.adapters_ready(["lora", None]) is True
    assert engine.adapters_ready(["lora", "ia3"]) is False  # starts reading ia3 in the background
    deadline = time.monotonic() + 10
    while not engine.adapters_ready(["ia3"]) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert placement(engine) == {"lora": "device", "ia3": "cpu"}  # kept although the CPU budget is 0
    assert_rows(bert, run(engine, bert, ["ia3"]), ["ia3"])


def _evicted_to_its_folder(make_engine, bert, folder):
    """An engine with adapter "x" loaded from ``folder`` (a copy of lora_leave1), then evicted to its source."""
    engine = make_engine(max_device_adapters=1, max_cpu_adapters=0)
    engine.load_adapter(copy_case(bert, "lora_leave1", folder), name="x")
    engine.load_adapter(bert.cases["ia3"].path)
    run(engine, bert, ["ia3"])
    assert placement(engine) == {"x": "source", "ia3": "device"}
    return engine


def test_files_changed_since_loading_are_not_read_back(make_engine, bert, tmp_path):
    folder = tmp_path / "x"
    engine = _evicted_to_its_folder(make_engine, bert, folder)
    weights = folder / "pytorch_adapter.bin"
    weights.write_bytes(weights.read_bytes())  # same bytes, but rewritten: the version might differ
    with pytest.raises(AdapterSourceError, match="changed since it was loaded"):
        run(engine, bert, ["x"])
    assert engine.get_adapter("x").state == "failed"
    engine.load_adapter(folder, name="x")  # loading it again serves the new files
    assert_rows(bert, run(engine, bert, ["x"]), ["lora_leave1"])
    assert all(r.refs == 0 for r in engine.registry._records.values())


def test_a_folder_gone_for_a_while_is_read_again_once_back(make_engine, bert, tmp_path):
    folder = tmp_path / "x"
    engine = _evicted_to_its_folder(make_engine, bert, folder)
    folder.rename(tmp_path / "elsewhere")
    with pytest.raises(AdapterSourceError, match="its folder '.*x' is gone; the next request tries again"):
        run(engine, bert, ["x"])
    (tmp_path / "elsewhere").rename(folder)
    assert_rows(bert, run(engine, bert, ["x"]), ["lora_leave1"])


def test_the_first_request_queued_after_a_folder_is_back_is_served(make_engine, bert, tmp_path):
    """The scheduler's check (adapters_ready with the request's queue time, as the server calls it): a request
    queued before a read failed fails with it; one queued after waits for a new read instead of the old error."""
    folder = tmp_path / "x"
    engine = _evicted_to_its_folder(make_engine, bert, folder)
    folder.rename(tmp_path / "elsewhere")
    queued_before = time.monotonic()
    assert engine.adapters_ready(["x"], since=queued_before) is False  # starts the read
    _wait_for_state(engine, "x", "failed")
    with pytest.raises(AdapterSourceError, match="is gone"):  # that read began after it was queued
        engine.adapters_ready(["x"], since=queued_before)
    _wait_for_state(engine, "x", "failed")  # the background read it started fails too
    (tmp_path / "elsewhere").rename(folder)
    queued_after = time.monotonic()
    assert engine.adapters_ready(["x"], since=queued_after) is False  # it used to raise the old error here
    _wait_for_state(engine, "x", "ready")
    assert engine.adapters_ready(["x"], since=queued_after) is True
    assert_rows(bert, run(engine, bert, ["x"]), ["lora_leave1"])


def _wait_for_state(engine, name: str, state: str) -> None:
    deadline = time.monotonic() + 10
    while engine.get_adapter(name).state != state:
        assert time.monotonic() < deadline, engine.get_adapter(name)
        time.sleep(0.01)


def test_reads_of_one_version_are_single_flight(make_engine, bert, monkeypatch):
    engine = make_engine(max_device_adapters=1, max_cpu_adapters=0)
    engine.load_adapter(bert.cases["lora"].path)
    engine.load_adapter(bert.cases["ia3"].path)
    import engine.adapters.lifecycle as lifecycle

    reads, release = [], threading.Event()
    original = lifecycle.read_adapter

    def slow_read(*args):
        reads.append(args[0])
        release.wait(10)
        return original(*args)

    monkeypatch.setattr(lifecycle, "read_adapter", slow_read)
    assert engine.adapters_ready(["ia3"]) is False
    assert engine.adapters_ready(["ia3"]) is False
    assert engine.get_adapter("ia3").state == "loading"
    release.set()
    assert_rows(bert, run(engine, bert, ["ia3"]), ["ia3"])  # waits for the same read
    assert len(reads) == 1


def test_reads_hung_on_their_source_hold_back_no_other_adapters_read(make_engine, bert, monkeypatch):
    """Reads shared a pool of two threads: two hung on a stalled mount kept a third adapter's read from starting,
    and its requests waited for those other files (review)."""
    engine = make_engine(max_device_adapters=1, max_cpu_adapters=0)
    for case in ("lora", "ia3", "seq_bn", "par_bn"):
        engine.load_adapter(bert.cases[case].path)
    at_source = [i.name for i in engine.list_adapters() if i.tier == "source"]
    assert len(at_source) == 3
    import engine.adapters.lifecycle as lifecycle

    original, mount_back = lifecycle.read_adapter, threading.Event()
    hung_paths = {str(bert.cases[name].path) for name in at_source[:2]}

    def stalled_read(*args):
        if str(args[0]) in hung_paths:
            mount_back.wait(30)
        return original(*args)

    monkeypatch.setattr(lifecycle, "read_adapter", stalled_read)
    try:
        assert not any(engine.adapters_ready([name]) for name in at_source[:2])
        assert engine.adapters_ready([at_source[2]]) is False  # its read starts beside the hung ones
        deadline = time.monotonic() + 10
        while not engine.adapters_ready([at_source[2]]):
            assert time.monotonic() < deadline, engine.get_adapter(at_source[2])
            time.sleep(0.01)
        assert [engine.get_adapter(name).state for name in at_source[:2]] == ["loading"] * 2
        assert_rows(bert, run(engine, bert, [at_source[2]]), [at_source[2]])
    finally:
        mount_back.set()


def test_a_failed_read_is_reported_to_the_next_readiness_check_and_retried(make_engine, bert, monkeypatch):
    engine = make_engine(max_device_adapters=1, max_cpu_adapters=0)
    engine.load_adapter(bert.cases["lora"].path)
    engine.load_adapter(bert.cases["ia3"].path)
    run(engine, bert, ["ia3"])  # lora back to its source
    import engine.adapters.lifecycle as lifecycle

    original, failures = lifecycle.read_adapter, [OSError(5, "Input/output error")]

    def flaky_read(*args):
        if failures:
            raise failures.pop()
        return original(*args)

    monkeypatch.setattr(lifecycle, "read_adapter", flaky_read)
    assert engine.adapters_ready(["lora"]) is False  # starts the read, which fails
    _wait_for_state(engine, "lora", "failed")
    deadline = time.monotonic() + 10
    # a queued request is failed with the read's error instead of being held forever; the read is retried
    with pytest.raises(AdapterSourceError, match="reading it again failed: OSError"):
        engine.adapters_ready(["lora"])
    while not engine.adapters_ready(["lora"]) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert_rows(bert, run(engine, bert, ["lora"]), ["lora"])


def test_a_host_copy_promised_to_a_queued_request_survives_other_reads(make_engine, bert):
    engine = make_engine(max_device_adapters=1, max_cpu_adapters=1)
    for name in ("lora", "ia3", "par_bn"):
        engine.load_adapter(bert.cases[name].path)
    run(engine, bert, ["par_bn"])  # lora, ia3 -> cpu / source; par_bn on the device
    on_host = next(name for name, tier in placement(engine).items() if tier == "cpu")
    from_source = next(name for name, tier in placement(engine).items() if tier == "source")
    assert engine.adapters_ready([on_host]) is True  # the scheduler would take its request now
    deadline = time.monotonic() + 10
    while not engine.adapters_ready([from_source]) and time.monotonic() < deadline:
        time.sleep(0.01)  # another read arrives and the CPU tier is over its budget of 1
    assert placement(engine)[on_host] == "cpu"  # not trimmed: the promised request finds it


def test_host_copies_held_over_the_cpu_budget_are_trimmed_when_the_hold_ends(make_engine, bert, monkeypatch):
    from engine.adapters import tiers
    monkeypatch.setattr(tiers, "HOLD_S", 2.0)  # the reads below fit in it
    engine = make_engine(max_device_adapters=1, max_cpu_adapters=1)
    for name in ("lora", "ia3", "par_bn"):
        engine.load_adapter(bert.cases[name].path)
    run(engine, bert, ["par_bn"])
    from_source = next(name for name, tier in placement(engine).items() if tier == "source")
    assert engine.adapters_ready([next(n for n, t in placement(engine).items() if t == "cpu")]) is True  # held
    deadline = time.monotonic() + 10
    while not engine.adapters_ready([from_source]) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(placement(engine).values()) == ["cpu", "cpu", "device"]  # both held: over the budget of 1
    deadline = time.monotonic() + 10
    while list(placement(engine).values()).count("cpu") > 1 and time.monotonic() < deadline:
        time.sleep(0.05)  # nothing else happens: no load, eviction or release
    assert sorted(placement(engine).values()) == ["cpu", "device", "source"]
