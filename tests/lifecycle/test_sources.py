"""Each source kind: the adapter store (catalog, escapes refused), fsspec URLs (memory://, file://; size cap,
failed downloads leave nothing) and Hugging Face ids from a pre-populated offline cache."""
import errno
import json
import os
import shutil

import fsspec
import huggingface_hub.constants
import pytest
from adapter_edits import copy_case
from lifecycle_helpers import assert_rows, run
from fsspec.implementations.memory import MemoryFileSystem

from engine import AdapterNameTaken, AdapterSourceError, AdapterSourceRefused, InvalidAdapter, InvalidRequest

SHA_MAIN, SHA_V2 = "a" * 40, "b" * 40


@pytest.fixture()
def store(bert, tmp_path):
    root = tmp_path / "store"
    copy_case(bert, "lora", root / "bert" / "lora")
    copy_case(bert, "seq_bn", root / "bert" / "sentiment")
    copy_case(bert, "peft_lora_rslora", root / "peft" / "rslora")
    prefix = root / "bert" / "prefix"
    prefix.mkdir()
    (prefix / "adapter_config.json").write_text('{"config": {"architecture": "prefix_tuning"}, "model_type": "bert"}')
    (root / "broken").mkdir()
    (root / "broken" / "adapter_config.json").write_text("{not json")
    copy_case(bert, "ia3", tmp_path / "outside")
    (root / "escape").symlink_to(tmp_path / "outside")
    return root


def test_catalog_lists_the_store_by_base_model_and_method(make_engine, bert, store):
    engine = make_engine(adapter_store=str(store))
    assert [e.name for e in engine.catalog()] == ["bert/lora", "bert/prefix", "bert/sentiment", "peft/rslora"]
    assert [e.name for e in engine.catalog(base_model="bert")] == ["bert/lora", "bert/prefix", "bert/sentiment"]
    assert [e.name for e in engine.catalog(method="lora")] == ["bert/lora", "peft/rslora"]
    assert [e.name for e in engine.catalog(base_model=str(bert.path), method="lora")] == ["bert/lora", "peft/rslora"]
    sentiment = engine.catalog(method="bottleneck")[0]
    assert (sentiment.source, sentiment.format, sentiment.head_type, sentiment.model_type) == (
        "store://bert/sentiment", "adapterhub", "classification", "bert")
    assert sentiment.size_bytes == sum(f.stat().st_size for f in (store / "bert" / "sentiment").iterdir())
    assert make_engine().catalog() == []  # no store configured


def test_store_sources_load_and_escapes_are_refused(make_engine, bert, store):
    engine = make_engine(adapter_store=str(store))
    info = engine.load_adapter(engine.catalog(method="lora")[1].source)
    assert (info.name, info.source) == ("rslora", "store://peft/rslora")  # PEFT saves no name: the folder's
    engine.load_adapter("store://bert/sentiment", name="s")
    assert_rows(bert, run(engine, bert, ["rslora", "s"]), ["peft_lora_rslora", "seq_bn"])
    for spelling in ("store://bert/./sentiment", "store://bert//sentiment", "store://peft/../bert/sentiment"):
        # one folder, one source in listings and logs: the catalog's spelling
        assert engine.load_adapter(spelling, name="s2").source == "store://bert/sentiment"
    before = engine.list_adapters()
    for source in ("store://../outside", "store://escape", "store://bert/../../outside", f"store://{store}/bert/lora"):
        with pytest.raises(AdapterSourceRefused):
            engine.load_adapter(source)
    with pytest.raises(AdapterSourceError, match="no adapter folder 'bert/nope'"):
        engine.load_adapter("store://bert/nope")
    with pytest.raises(AdapterSourceError, match="no adapter_store is configured"):
        make_engine().load_adapter("store://bert/lora")
    assert engine.list_adapters() == before


def test_store_folders_whose_files_link_outside_are_refused(make_engine, bert, store, tmp_path):
    # a tenant key may load only from the store: a folder of links to files elsewhere must not widen that
    leak = store / "leak"
    leak.mkdir()
    for f in (tmp_path / "outside").iterdir():
        (leak / f.name).symlink_to(f)
    engine = make_engine(adapter_store=str(store))
    with pytest.raises(AdapterSourceRefused, match="is a symbolic link leading outside the adapter store"):
        engine.load_adapter("store://leak")
    inside = store / "linked"
    inside.mkdir()
    for f in (store / "bert" / "lora").iterdir():  # links that stay inside the store are fine
        (inside / f.name).symlink_to(f)
    assert engine.load_adapter("store://linked").method == "lora"
    (store / "loop").mkdir()
    (store / "loop" / "adapter_config.json").symlink_to("adapter_config.json")  # a link to itself
    (store / "selfloop").symlink_to("selfloop")
    for source in ("store://loop", "store://selfloop/x"):  # Path.resolve raised RuntimeError: INTERNAL
        with pytest.raises((AdapterSourceRefused, AdapterSourceError)):
            engine.load_adapter(source)


def test_one_malformed_store_folder_leaves_the_catalog_listing(make_engine, store):
    deep = store / "deep"
    shutil.copytree(store / "bert" / "sentiment", deep)
    (deep / "head_config.json").write_text("[" * 100_000 + "]" * 100_000)  # was a RecursionError: INTERNAL
    fifo = store / "fifo"
    fifo.mkdir()
    os.mkfifo(fifo / "adapter_config.json")  # reading it would block the listing until someone writes to it
    for name, text in (("bigint", '{"config": null, "model_name": ' + "9" * 5000 + "}"),  # past the 4300 digits
                       ("surrogate", '{"config": "\\ud800", "model_name": "\\udfff"}'),  # no UTF-8 for the reply
                       ("huge", '{"config": {"architecture": "' + "x" * 5_000_000 + '"}}')):  # 5 MB of reply
        (store / name).mkdir()
        (store / name / "adapter_config.json").write_text(text)
    os.mkdir(os.fsencode(store) + b"/bad\xffutf8")  # a folder name that is not UTF-8
    (store / os.fsdecode(b"bad\xffutf8") / "adapter_config.json").write_text("{}")
    engine = make_engine(adapter_store=str(store))
    entries = {e.name: e for e in engine.catalog()}
    assert sorted(entries) == ["bert/lora", "bert/prefix", "bert/sentiment", "deep", "huge", "peft/rslora",
                               "surrogate"]
    assert (entries["deep"].method, entries["deep"].head_type) == ("bottleneck", None)
    assert (entries["surrogate"].method, entries["surrogate"].base_model) == ("unknown", None)
    assert entries["huge"].method == "unknown"  # over 1024 characters
    with pytest.raises(AdapterSourceError, match="no adapter folder 'fifo'"):
        engine.load_adapter("store://fifo")


def test_sources_the_file_system_cannot_open(make_engine, store):
    engine = make_engine(adapter_store=str(store))
    for source in ("/tmp/a\x00b", "store://bert/\x00lora"):
        with pytest.raises(AdapterSourceRefused, match=r"contains a NUL character"):
            engine.load_adapter(source)
    for source in ("/tmp/" + "a" * 300, "store://" + "a" * 300):
        with pytest.raises(AdapterSourceError, match="cannot open it: .*File name too long"):
            engine.load_adapter(source)
    assert engine.list_adapters() == []


def test_a_malformed_store_folder_does_not_break_the_catalog(make_engine, store):
    meta = json.loads((store / "bert" / "lora" / "adapter_config.json").read_text())
    (store / "bert" / "lora" / "adapter_config.json").write_text(json.dumps({**meta, "model_name": 5}))
    entries = {e.name: e for e in make_engine(adapter_store=str(store)).catalog()}
    assert sorted(entries) == ["bert/lora", "bert/prefix", "bert/sentiment", "peft/rslora"]
    assert (entries["bert/lora"].base_model, entries["bert/lora"].model_type) == (None, "bert")


def _put_in_memory(folder, prefix: str) -> None:
    fs = fsspec.filesystem("memory")
    for f in folder.iterdir():
        fs.pipe(f"{prefix}/{f.name}", f.read_bytes())


def test_fsspec_urls_download_validate_and_clean_up(make_engine, bert, tmp_path):
    engine = make_engine()
    downloads = engine.adapters.sources.download_dir
    _put_in_memory(bert.cases["lora"].path, f"/{tmp_path.name}/lora")
    info = engine.load_adapter(f"memory://{tmp_path.name}/lora", name="m")
    engine.load_adapter(f"file://{bert.cases['peft_lora_ffn'].path}")  # PEFT: named after the folder
    assert info.source == f"memory://{tmp_path.name}/lora" and len(list(downloads.iterdir())) == 2
    assert_rows(bert, run(engine, bert, ["m", "peft_lora_ffn"]), ["lora", "peft_lora_ffn"])
    engine.unload_adapter("m")
    engine.unload_adapter("peft_lora_ffn")
    assert list(downloads.iterdir()) == []  # a download lives as long as its adapter


def test_a_download_refused_for_a_taken_name_leaves_nothing(make_engine, bert):
    engine = make_engine()
    downloads = engine.adapters.sources.download_dir
    url = f"file://{bert.cases['lora'].path}"
    engine.load_adapter(url, name="a")
    for _ in range(2):
        with pytest.raises(AdapterNameTaken, match="'a' is already loaded .shared.; replacing it needs overwrite_ok"):
            engine.load_adapter(url, name="a", overwrite_ok=False)
    assert len(engine.adapters._downloads) == 1 and len(list(downloads.iterdir())) == 1  # an entry per refusal before
    engine.unload_adapter("a")
    assert engine.adapters._downloads == {} and list(downloads.iterdir()) == []


def test_fsspec_size_cap_and_failed_downloads_leave_nothing(make_engine, bert, tmp_path):
    engine = make_engine(max_download_mb=0.01)  # 10 kB; the lora folder holds ~17 kB
    downloads = engine.adapters.sources.download_dir
    _put_in_memory(bert.cases["lora"].path, f"/{tmp_path.name}/lora")
    with pytest.raises(AdapterSourceRefused, match="exceed max_download_mb"):
        engine.load_adapter(f"memory://{tmp_path.name}/lora")
    _put_in_memory(bert.cases["seq_bn_leave0"].path, f"/{tmp_path.name}/small")
    with pytest.raises(AdapterSourceError, match="cannot download pytorch_adapter.bin"):
        engine.load_adapter(f"flaky://{tmp_path.name}/small")  # the connection drops mid-file
    folder = copy_case(bert, "seq_bn_leave0", tmp_path / "corrupt")
    (folder / "adapter_config.json").write_text("[]")
    with pytest.raises(InvalidAdapter, match="must hold a JSON object"):
        engine.load_adapter(f"file://{folder}")  # downloaded, then refused by validation
    with pytest.raises(AdapterSourceError, match="cannot list it"):
        engine.load_adapter("nosuchprotocol://x/y")
    assert engine.list_adapters() == [] and list(downloads.iterdir()) == []
    engine.load_adapter(f"memory://{tmp_path.name}/small")
    assert_rows(bert, run(engine, bert, ["seq_bn_leave0"]), ["seq_bn_leave0"])


class _DroppingReader:
    def __init__(self, data: bytes):
        self.data, self.calls = data, 0

    def read(self, size=-1):
        self.calls += 1
        if self.calls > 1:
            raise OSError(errno.ECONNRESET, "Connection reset by peer")
        return self.data[:10]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class FlakyFileSystem(MemoryFileSystem):
    """The memory filesystem, except that reading a weights file fails after its first bytes."""

    protocol = "flaky"

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.replace("flaky://", "memory://", 1))

    def _open(self, path, mode="rb", **kwargs):
        if path.endswith(".bin"):
            return _DroppingReader(self.cat_file(path))
        return super()._open(path, mode, **kwargs)


fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)


@pytest.fixture()
def hub_cache(bert, tmp_path, monkeypatch):
    """A Hugging Face cache in the hub layout, offline: models--acme--X/snapshots/<sha>/..., refs/<name>."""
    cache = tmp_path / "hub"
    for repo, revisions in {"sentiment": {"main": ("seq_bn", SHA_MAIN), "v2": ("lora", SHA_V2)},
                            "rslora": {"main": ("peft_lora_rslora", SHA_MAIN)}}.items():
        for ref, (case, sha) in revisions.items():
            repo_dir = cache / f"models--acme--{repo}"
            shutil.copytree(bert.cases[case].path, repo_dir / "snapshots" / sha)
            (repo_dir / "refs").mkdir(exist_ok=True)
            (repo_dir / "refs" / ref).write_text(sha)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import by huggingface_hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_hugging_face_ids_from_the_offline_cache(make_engine, bert, hub_cache):
    engine = make_engine()
    assert engine.load_adapter("acme/sentiment").name == "seq_bn"  # AdapterHub: the saved name
    engine.load_adapter("acme/sentiment@v2", name="v2")
    engine.load_adapter(f"hf://acme/sentiment@{SHA_MAIN}", name="by-commit")
    info = engine.load_adapter("acme/rslora")
    assert (info.name, info.source) == ("rslora", "acme/rslora")  # PEFT: named after the repo
    assert_rows(bert, run(engine, bert, ["seq_bn", "v2", "by-commit", "rslora"]),
                ["seq_bn", "lora", "seq_bn", "peft_lora_rslora"])
    with pytest.raises(AdapterSourceError, match="not in the Hugging Face cache, and HF_HUB_OFFLINE is set: this "
                                                 "server does not download") as offline:
        engine.load_adapter("acme/missing")
    assert "local_files_only" not in str(offline.value)  # the hub's advice names an option we do not have
    with pytest.raises(AdapterSourceError):
        engine.load_adapter("acme/sentiment@v3")
    assert os.environ["HF_HUB_OFFLINE"] == "1" and len(engine.list_adapters()) == 4
    (hub_cache / "outside").mkdir()
    (hub_cache / "models--acme--sentiment" / "refs" / "planted").write_text(str(hub_cache / "outside"))
    for bad in ("hf://acme/sentiment@../refs/planted", "hf://acme/sentiment@../../../../etc/hostname", "hf://acme/..",
                "hf:///etc", "hf://acme"):  # huggingface_hub read refs/<revision> offline, outside the refs folder
        with pytest.raises(InvalidRequest, match="a hub source is org/name or org/name@revision"):
            engine.load_adapter(bad)
