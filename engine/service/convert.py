"""Protobuf messages <-> engine types, in one place."""
from adapterserve.v1 import adapter_service_pb2 as admin_pb
from adapterserve.v1 import inference_service_pb2 as pb

from engine.types import AdapterInfo, CatalogEntry, Classification, TokenTag


def classification_pb(result: Classification) -> pb.Classification:
    scores = [pb.LabelScore(label=k, score=v) for k, v in result.scores.items()]
    return pb.Classification(label=result.label, scores=scores, labels=list(result.labels))


def token_tags_pb(tags: list[TokenTag]) -> pb.TokenTags:
    return pb.TokenTags(tags=[pb.TokenTag(token=t.token, start=t.start, end=t.end, label=t.label, score=t.score)
                              for t in tags])


def adapter_pb(info: AdapterInfo, reader: str | None) -> admin_pb.Adapter:
    """``info`` as the key of tenant ``reader`` (None: an operator) sees it: a tenant sees where its own adapters
    came from, not shared ones' sources (server paths, an operator's bucket)."""
    source = info.source if reader is None or info.tenant == reader else ""
    return admin_pb.Adapter(name=info.name, tenant=info.tenant or "", method=info.method, source=source,
                            num_params=info.num_params, head_type=info.head_type or "", labels=list(info.labels),
                            tier=info.tier, state=info.state, pinned=info.pinned)


def catalog_entry_pb(entry: CatalogEntry) -> admin_pb.CatalogEntry:
    return admin_pb.CatalogEntry(name=entry.name, method=entry.method, base_model=entry.base_model or "",
                                 source=entry.source, format=entry.format, model_type=entry.model_type or "",
                                 head_type=entry.head_type or "", size_bytes=entry.size_bytes)
