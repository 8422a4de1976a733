"""Text-level API on the real all-MiniLM-L6-v2 with adapters saved by the `adapters` library."""
import pytest
import torch

from engine import Engine, EngineConfig, InvalidRequest
from engine.text import token_tags, tokenize
from engine.types import RowHead
from minilm import TEXTS, build_minilm_adapters


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    return build_minilm_adapters(tmp_path_factory.mktemp("minilm"))


@pytest.fixture(scope="module")
def engine(library):
    folders = library.folders
    engine = Engine.from_pretrained(device="cpu")
    for name in ("sentiment", "topics", "ner"):
        engine.load_adapter(folders[name])
    return engine


def test_classify_matches_library(engine, library):
    logits = library.logits["sentiment"]
    results = engine.classify(TEXTS, "sentiment")
    probs = torch.softmax(logits, -1)
    for result, p in zip(results, probs):
        assert result.label == ("neg", "pos")[int(p.argmax())]
        assert abs(result.scores["pos"] - float(p[1])) < 1e-5
        assert abs(sum(result.scores.values()) - 1) < 1e-5


def test_multilabel_uses_sigmoid(engine, library):
    logits = library.logits["topics"]
    for result, row in zip(engine.classify(TEXTS, "topics"), torch.sigmoid(logits)):
        assert [result.scores[k] for k in ("art", "geo", "film")] == pytest.approx(row.tolist(), abs=1e-5)
        assert result.labels == tuple(k for k, p in zip(("art", "geo", "film"), row) if p > 0.5)


def test_tag_matches_library_and_offsets(engine, library):
    logits = library.logits["ner"]
    tags = engine.tag(TEXTS, "ner")
    for row, (text, row_tags) in enumerate(zip(TEXTS, tags)):
        real = int(library.attention_mask[row].sum()) - 2  # minus [CLS] and [SEP]
        assert len(row_tags) == real
        for pos, tag in enumerate(row_tags, start=1):
            assert tag.label == ("O", "LOC", "MISC")[int(logits[row, pos].argmax())]
            assert text[tag.start:tag.end].lower().startswith(tag.token.lstrip("#")[:1])


def test_unknown_tokens_are_tagged(engine, library):
    # every special id was skipped, [UNK] among them: "I ❤ Paris" lost its heart, and an emoji alone got no tag
    heart, emoji = engine.tag(["I ❤ Paris", "🙂"], "ner")
    assert [(t.token, t.start, t.end) for t in heart] == [("i", 0, 1), ("[UNK]", 2, 3), ("paris", 4, 9)]
    assert [(t.token, t.start, t.end) for t in emoji] == [("[UNK]", 0, 1)]
    assert all(t.label in ("O", "LOC", "MISC") for t in heart + emoji)


class ShortMask:
    """A tokenizer whose special_tokens_mask is one short of its ids, as transformers 4's slow CodeGenTokenizer
    gives with add_bos_token (it builds the BOS into the ids, not into the mask)."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, texts, **options):
        enc = self.inner(texts, **options)
        enc["special_tokens_mask"] = [mask[1:] for mask in enc["special_tokens_mask"]]
        return enc

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_special_tokens_mask_that_does_not_fit_falls_back_to_the_special_ids(engine):
    # tagging read the mask by position: IndexError, answered INTERNAL over gRPC
    tokenizer = ShortMask(engine.tokenizer)
    [row] = tokenize(tokenizer, ["I ❤ Paris"], 64, ["texts[0]"])
    assert row.added is None
    [tags] = token_tags([torch.zeros(len(row.ids), 3)], [RowHead("tagging", ("O", "LOC", "MISC"))], [row],
                        tokenizer, "ner", "Tag")
    assert [t.token for t in tags] == ["i", "[UNK]", "paris"]  # [CLS] and [SEP] skipped by id, [UNK] kept


def test_embed_with_and_without_adapter(engine, library):
    base = engine.embed(TEXTS)
    assert base.shape == (3, 384)
    assert torch.allclose(base.norm(dim=-1), torch.ones(3), atol=1e-5)
    adapted = engine.embed(TEXTS, adapter="sentiment")
    assert (adapted - base).abs().max() > 1e-3


def test_task_needs_the_right_head(engine):
    with pytest.raises(InvalidRequest, match="'ner' has a tagging head; classify needs"):
        engine.classify(TEXTS, "ner")
    with pytest.raises(InvalidRequest, match="tag needs"):
        engine.tag(TEXTS, "sentiment")
    with pytest.raises(InvalidRequest, match="non-empty list"):
        engine.embed([])


def test_texts_follow_the_service_rules(engine):
    # the gRPC service refuses these too (tests/service/test_errors.py): an empty text has no content to serve
    with pytest.raises(InvalidRequest, match=r"texts\[1\] must hold 1\.\.100000 characters, got 0"):
        engine.classify(["fine", ""], "sentiment")
    with pytest.raises(InvalidRequest, match=r"texts\[0\] must hold 1\.\.100000 characters, got 100001"):
        engine.embed(["x" * 100_001])
    with pytest.raises(InvalidRequest, match=r"texts\[0\] must be a string, got int"):
        engine.tag([3], "ner")
    with pytest.raises(InvalidRequest, match="non-empty list"):
        engine.embed("a plain string")


def test_reload_swaps_to_new_version(engine, library):
    folders = library.folders
    before = engine.classify(TEXTS, "sentiment")
    engine.load_adapter(folders["topics"], name="sentiment")  # same name, other weights and head
    after = engine.classify(TEXTS, "sentiment")
    assert set(after[0].scores) == {"art", "geo", "film"} != set(before[0].scores)
    engine.load_adapter(folders["sentiment"])
    assert engine.classify(TEXTS, "sentiment") == before
    assert len(engine.list_adapters()) == 3


def test_labels_come_from_the_version_that_ran(library, monkeypatch):
    folders = library.folders
    engine = Engine.from_pretrained(device="cpu")
    engine.load_adapter(folders["sentiment"], name="x")  # classification: neg, pos
    lookup = engine.registry.lookup

    def lookup_then_reload(name, tenant=None):  # a re-load lands between the call's lookup and its forward
        info = lookup(name, tenant)
        monkeypatch.setattr(engine.registry, "lookup", lookup)
        engine.load_adapter(folders["topics"], name="x")  # multilabel: art, geo, film
        return info

    monkeypatch.setattr(engine.registry, "lookup", lookup_then_reload)
    results = engine.classify(TEXTS, "x")
    assert results == engine.classify(TEXTS, "x")  # exactly what the new version gives
    assert all(set(r.scores) == {"art", "geo", "film"} for r in results)


def test_one_call_runs_on_one_version_across_its_batches(library, monkeypatch):
    folders = library.folders
    engine = Engine.from_pretrained(device="cpu", config=EngineConfig(max_batch_rows=1))
    engine.load_adapter(folders["sentiment"], name="x")
    want = engine.embed(TEXTS, "x")
    run = engine._run

    def run_then_reload(*args):  # the call's first batch is done: a re-load lands before its second
        monkeypatch.setattr(engine, "_run", run)
        out = run(*args)
        engine.load_adapter(folders["topics"], name="x")
        return out

    monkeypatch.setattr(engine, "_run", run_then_reload)
    assert torch.equal(engine.embed(TEXTS, "x"), want)  # all three batches on the version it started with
    assert not torch.allclose(engine.embed(TEXTS, "x"), want)  # later calls get the new one
