"""Forwards in one thread while other threads load, unload and re-load adapters: no forward fails (except
AdapterNotFound for an adapter unloaded meanwhile), every row equals exactly one version, all rows of a
batch naming one adapter see the same version, and in-flight rows finish on the version they started with."""
import random
import threading
import time
from collections import Counter

import pytest
from adapter_edits import copy_case
from lifecycle_helpers import ATOL, assert_rows, row_error, run

import engine.adapters.lifecycle as lifecycle
from engine import AdapterNotFound

X_VERSIONS = ("lora", "seq_bn_st")  # "x" is re-loaded back and forth between these two folders
CHURNED = ("ia3", "seq_bn_rf", "lora_leave1", "double_seq_bn_st")  # z0..z3: unloaded and loaded again


def _version(bert, hidden, row: int) -> str:
    matches = [v for v in X_VERSIONS if row_error(bert, hidden, row, v) < ATOL]
    assert len(matches) == 1, f"row {row} equals {matches or 'no version'}: mixed or wrong weights"
    return matches[0]


def _looping(stop: threading.Event, failures: list, step):
    def loop():
        try:
            while not stop.is_set():
                step()
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            failures.append(exc)

    return loop


def test_forwards_while_others_load_unload_and_reload(make_engine, bert):
    engine = make_engine(max_device_adapters=3, max_cpu_adapters=1)  # small: evictions and re-reads all along
    engine.load_adapter(bert.cases["lora"].path, name="x")
    engine.load_adapter(bert.cases["par_bn"].path, name="y")
    for i, case in enumerate(CHURNED):
        engine.load_adapter(bert.cases[case].path, name=f"z{i}")
    stop, failures, rng, reloads = threading.Event(), [], random.Random(0), Counter()

    def reload_x():
        reloads["x"] += 1
        engine.load_adapter(bert.cases[X_VERSIONS[reloads["x"] % 2]].path, name="x")

    def toggle_y():
        engine.unload_adapter("y")
        time.sleep(0.002)
        engine.load_adapter(bert.cases["par_bn"].path, name="y")

    def churn_z():
        i = rng.randrange(len(CHURNED))
        engine.unload_adapter(f"z{i}")
        engine.load_adapter(bert.cases[CHURNED[i]].path, name=f"z{i}")

    threads = [threading.Thread(target=_looping(stop, failures, step)) for step in (reload_x, toggle_y, churn_z)]
    for t in threads:
        t.start()
    seen = Counter()
    try:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and not failures:
            i = rng.randrange(len(CHURNED))
            for names in (["x", "y", "x", None], [f"z{i}", "x", f"z{i}", "x"]):
                try:
                    out = run(engine, bert, names)
                except AdapterNotFound as exc:  # only adapters that the other threads unload
                    assert exc.name != "x", exc
                    seen["not found"] += 1
                    continue
                versions = {_version(bert, out.last_hidden_state[j], j) for j, n in enumerate(names) if n == "x"}
                assert len(versions) == 1, f"one batch saw two versions of x: {versions}"
                seen[x := versions.pop()] += 1
                cases = {"x": x, "y": "par_bn", None: None, f"z{i}": CHURNED[i]}
                assert_rows(bert, out, [cases[n] for n in names])
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not failures, failures
    assert seen["lora"] > 0 and seen["seq_bn_st"] > 0 and seen["not found"] > 0, seen
    assert all(r.refs == 0 for r in engine.registry._records.values())
    on_device = [i for i in engine.list_adapters() if i.tier == "device"]
    assert engine.pool.num_free + len(on_device) == 3  # every freed or evicted slot came back


def test_in_flight_rows_finish_on_the_version_they_started_with(make_engine, bert):
    engine = make_engine()
    engine.load_adapter(bert.cases["lora"].path, name="x")
    free = engine.pool.num_free
    entered, release, result = threading.Event(), threading.Event(), {}
    run_model = engine._run

    def paused_run(*args):
        if threading.current_thread().name == "in-flight":
            entered.set()
            release.wait(10)
        return run_model(*args)

    engine._run = paused_run
    thread = threading.Thread(target=lambda: result.update(out=run(engine, bert, ["x"] * 4)), name="in-flight")
    thread.start()
    assert entered.wait(10)
    engine.unload_adapter("x")
    with pytest.raises(AdapterNotFound):
        run(engine, bert, ["x"])
    engine.load_adapter(bert.cases["seq_bn_st"].path, name="x")  # a new version under the same name
    assert_rows(bert, run(engine, bert, ["x"] * 4), ["seq_bn_st"] * 4)
    assert engine.pool.num_free == free - 1  # the retired version still holds its slot
    release.set()
    thread.join(10)
    assert_rows(bert, result["out"], ["lora"] * 4)
    assert engine.pool.num_free == free  # freed with its last rows


def test_a_forward_never_waits_for_another_adapters_files(make_engine, bert, tmp_path, monkeypatch):
    engine = make_engine(max_device_adapters=2, max_cpu_adapters=0)
    for name in ("lora", "ia3", "par_bn"):  # par_bn is loaded last: no slot free, CPU budget 0 -> source tier
        engine.load_adapter(bert.cases[name].path)
    slow = copy_case(bert, "seq_bn", tmp_path / "slow")
    reading, release = threading.Event(), threading.Event()
    read = lifecycle.read_adapter

    def read_slowly(folder, *args):
        if folder == slow:  # a huge adapter on a slow disk
            reading.set()
            release.wait(20)
        return read(folder, *args)

    monkeypatch.setattr(lifecycle, "read_adapter", read_slowly)
    loader = threading.Thread(target=engine.load_adapter, args=(slow,), kwargs={"name": "slow"})
    loader.start()
    try:
        assert reading.wait(10)
        assert_rows(bert, run(engine, bert, ["lora", "ia3"]), ["lora", "ia3"])  # resident
        assert_rows(bert, run(engine, bert, ["par_bn"]), ["par_bn"])  # its own read from the source tier
        with pytest.raises(AdapterNotFound):
            run(engine, bert, ["slow"])  # not visible before it is validated
        engine.unload_adapter("ia3")
        assert {i.name for i in engine.list_adapters()} == {"lora", "par_bn"}
        assert loader.is_alive()  # all of the above ran while the slow load was still reading
    finally:
        release.set()
        loader.join(20)
    assert_rows(bert, run(engine, bert, ["slow"]), ["seq_bn"])


def test_of_averages_racing_to_one_new_name_one_gets_it(make_engine, bert, monkeypatch):
    """Without overwrite_ok: each saw the name free, then the later ones replaced the first (found by a probe)."""
    engine = make_engine(max_device_adapters=4)
    engine.load_adapter(bert.cases["lora"].path, name="a")
    engine.load_adapter(bert.cases["lora"].path, name="b")  # one config: they average
    both_checked, average = threading.Barrier(2, timeout=10), lifecycle.average_specs

    def after_both_checked(*args):  # both past the early name check before either publishes
        both_checked.wait()
        return average(*args)
    monkeypatch.setattr(lifecycle, "average_specs", after_both_checked)
    outcomes = []

    def make_average(weights):
        try:
            outcomes.append(engine.average_adapters("mix", ["a", "b"], weights).source)
        except Exception as exc:  # noqa: BLE001 - compared below
            outcomes.append(exc)
    threads = [threading.Thread(target=make_average, args=(w,)) for w in ([1.0, 0.0], [0.0, 1.0])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    won = [o for o in outcomes if isinstance(o, str)]
    lost = [o for o in outcomes if not isinstance(o, str)]
    assert len(won) == 1 and len(lost) == 1, outcomes
    assert "adapter 'mix' is already loaded (shared); replacing it with the average needs overwrite_ok" in str(lost[0])
    assert engine.get_adapter("mix").source == won[0]  # the winner's version stays
    assert sorted(a.name for a in engine.list_adapters()) == ["a", "b", "mix"]
    assert engine.pool.num_free == 1  # the loser's slot was freed
