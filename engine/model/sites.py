"""Adapter sites: the only places where adapters touch the base model (composition, gpt-fast style).

`LinearSite` is a base linear layer plus the LoRA / IA3 terms of each row; `BottleneckSite` is the
point after a sublayer's output projection where bottleneck adapters sit (``attention.output`` and
``output`` in BERT, ``attention_adapters`` / ``output_adapters`` in decoders). Both read their
per-batch terms from the explicit `AdapterBatch` by their module path, which equals the path of the
same module in the `adapters` library's state dict keys.
"""
from typing import Callable

import torch
from torch import nn

import kernels
from engine.batch import AdapterBatch, BottleneckGroup, BottleneckSiteBatch, BottleneckTables, ResidualBeforeLN, Source
from engine.model.common import dense

Norm = Callable[[torch.Tensor], torch.Tensor] | None
ADAPTER_LN_EPS = 1e-5  # nn.LayerNorm default, used by the adapters library for ln_before / ln_after


class LinearSite(nn.Linear):
    """nn.Linear whose forward also applies each row's LoRA / IA3 terms for this site."""

    path: str = ""  # set by `name_sites` after the model is built

    def forward(self, x: torch.Tensor, meta: AdapterBatch | None = None) -> torch.Tensor:
        site = meta.linear.get(self.path) if meta is not None else None
        if site is None:
            return dense(x, self.weight, self.bias)
        if site.ia3_in is not None:
            x = x.clone()
            rs = site.ia3_in_rows
            kernels.scale_ia3(x[rs.rows], site.ia3_in, rs.slots)  # row slices are views: scales x in place
        y = dense(x, self.weight, self.bias)
        if site.lora is not None:
            t, rs = site.lora, site.lora_rows
            kernels.add_lora(y[rs.rows], x[rs.rows], t.lora_a, t.lora_b, t.scaling, t.ranks, rs.slots)
        if site.ia3_out is not None:
            rs = site.ia3_out_rows
            kernels.scale_ia3(y[rs.rows], site.ia3_out, rs.slots)
        return y


class BottleneckSite(nn.Module):
    """Residual junction after a sublayer: ``ln(h + x)`` without adapter, the adapter variants with one.

    ``h`` is the sublayer output, ``x`` its residual input, ``ln`` the sublayer's original LayerNorm
    (None on pre-LN decoders, where the junction is a plain sum). The common variants (Pfeiffer,
    Houlsby, parallel) all compute ``ln(h + x + f(t))`` and differ only in the adapter input t, so their
    rows share one adapter body and the junction's one LayerNorm; other variants take the general path
    (`_apply_group`) per variant and overwrite their rows.
    """

    path: str = ""

    def forward(self, h: torch.Tensor, x: torch.Tensor, ln: Norm, meta: AdapterBatch | None) -> torch.Tensor:
        site = meta.bottleneck.get(self.path) if meta is not None else None
        hx = h + x
        if site is None:
            return _norm(ln, hx)
        plain = None if site.plain is None else _norm(ln, hx[site.plain])
        general = [(g.rows, _apply_group(site.tables, g, h[g.rows], x[g.rows], hx[g.rows],
                                         _plain_rows(plain, site.plain, g.rows) if g.variant.reads_plain else None,
                                         ln)) for g in site.groups]
        if site.fused is not None:  # after the general groups, which read hx before this changes it
            _add_fused(hx, h, x, plain, site)
        y = torch.empty_like(hx) if site.groups_cover_batch else _norm(ln, hx)
        for rows, out in general:
            y[rows] = out
        return y


def _norm(ln: Norm, z: torch.Tensor) -> torch.Tensor:
    return z if ln is None else ln(z)


def _plain_rows(plain: torch.Tensor, span: slice, rows) -> torch.Tensor:
    """ln(h + x) for ``rows`` (a slice or index tensor) out of ``plain``, computed for the batch rows ``span``.

    Only asked for rows that read it, which the batcher put inside ``span``.
    """
    if isinstance(rows, slice):
        return plain[rows.start - span.start:rows.stop - span.start]
    return plain.index_select(0, rows - span.start)


def _add_fused(hx: torch.Tensor, h: torch.Tensor, x: torch.Tensor, plain: torch.Tensor | None,
               site: BottleneckSiteBatch) -> None:
    """hx[rows] += f(t) for every fused row, t being its variant's input; one adapter body for all."""
    fused, tab = site.fused, site.tables
    parts = [_plain_rows(plain, site.plain, rows) if src is Source.PLAIN else (h if src is Source.OUTPUT else x)[rows]
             for src, rows in fused.runs]
    t = parts[0] if len(parts) == 1 else torch.cat(parts)
    args = (tab.w_down, tab.b_down, tab.w_up, tab.b_up, tab.scaling, tab.act_ids, tab.ranks, fused.slots)
    if isinstance(fused.rows, slice):
        kernels.bottleneck(hx[fused.rows], t, *args)  # a view: adds into hx itself
    else:
        hx.index_add_(0, fused.rows, kernels.bottleneck(torch.zeros_like(t), t, *args))


def _apply_group(tab: BottleneckTables, group: BottleneckGroup, h, x, hx, plain, ln: Norm) -> torch.Tensor:
    """One variant's math, as `adapters.methods.modeling.Adapter` / `ParallelAdapter` compute it.

    ``hx`` is h + x and ``plain`` is ln(h + x) for these rows (None when the variant does not read it).
    """
    v, slots = group.variant, group.slots
    if v.is_parallel:
        t, residual = x, None
    else:
        t = residual = h
        if v.original_ln_before:
            t = plain
            if v.residual_before_ln == ResidualBeforeLN.POST_ADD:
                residual = hx
        if v.residual_before_ln == ResidualBeforeLN.FALSE:
            residual = t
    if v.ln_before:
        t = kernels.layer_norm_rows(t, tab.ln_before_weight, tab.ln_before_bias, ADAPTER_LN_EPS, slots)
    add_residual = residual is not None and v.adapter_residual_before_ln  # f + residual, before ln_after
    out = residual.clone() if add_residual else torch.zeros_like(t)
    kernels.bottleneck(out, t, tab.w_down, tab.b_down, tab.w_up, tab.b_up, tab.scaling, tab.act_ids, tab.ranks, slots)
    if v.ln_after:
        out = kernels.layer_norm_rows(out, tab.ln_after_weight, tab.ln_after_bias, ADAPTER_LN_EPS, slots)
    if residual is None:
        out = out + h
    elif not v.adapter_residual_before_ln:
        out = out + residual
    return _norm(ln, out + x) if v.original_ln_after else out


def name_sites(model: nn.Module) -> dict[str, nn.Module]:
    """Gives every site its module path and returns them by path (the adapter key namespace)."""
    sites = {}
    for path, module in model.named_modules():
        if isinstance(module, BottleneckSite):
            # the library keys BERT junctions by their sublayer ("attention.output.adapters.<name>")
            path = path.removesuffix(".adapters")
        if isinstance(module, (LinearSite, BottleneckSite)):
            module.path = path
            sites[path] = module
    return sites
