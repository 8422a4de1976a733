"""Adapter sites: the only places where adapters touch the base model (composition, gpt-fast style).

`LinearSite` is a base linear layer plus the LoRA / IA3 terms of each row; `BottleneckSite` is the
point after a sublayer's output projection where bottleneck adapters sit (``attention.output`` and
``output`` in BERT, ``attention_adapters`` / ``output_adapters`` in decoders). Both read their
per-batch terms from the explicit `AdapterBatch` by their module path, which equals the path of the
same module in the `adapters` library's state dict keys.
"""
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from engine.batch import AdapterBatch, BottleneckSiteBatch

Norm = Callable[[torch.Tensor], torch.Tensor] | None
ADAPTER_LN_EPS = 1e-5  # nn.LayerNorm default, used by the adapters library for ln_before / ln_after


class LinearSite(nn.Linear):
    """nn.Linear whose forward also applies each row's LoRA / IA3 terms for this site."""

    path: str = ""  # set by `name_sites` after the model is built

    def forward(self, x: torch.Tensor, meta: AdapterBatch | None = None) -> torch.Tensor:
        site = meta.linear.get(self.path) if meta is not None else None
        if site is None:
            return F.linear(x, self.weight, self.bias)
        if site.ia3_in is not None:
            x = x.clone()
            rs = site.ia3_in_rows
            kernels.scale_ia3(x[rs.rows], site.ia3_in, rs.slots)  # row slices are views: scales x in place
        y = F.linear(x, self.weight, self.bias)
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
    (None on pre-LN decoders, where the junction is a plain sum). All adapted rows go through one code
    path whose variant choices are per-row masks where the rows differ (`JunctionFlags`), so a junction
    costs a fixed number of ops however many bottleneck variants share the batch.
    """

    path: str = ""

    def forward(self, h: torch.Tensor, x: torch.Tensor, ln: Norm, meta: AdapterBatch | None) -> torch.Tensor:
        site = meta.bottleneck.get(self.path) if meta is not None else None
        hx = h + x
        if site is None:
            return _norm(ln, hx)
        if site.covers_batch:
            plain = _norm(ln, hx) if site.flags.ln_plain_input is not False else None
            return _adapted(site, h, x, hx, plain, ln)
        y = _norm(ln, hx)  # rows without adapter keep this; the adapted rows are overwritten
        r = site.rows
        y[r] = _adapted(site, h[r], x[r], hx[r], y[r], ln)
        return y


def _norm(ln: Norm, z: torch.Tensor) -> torch.Tensor:
    return z if ln is None else ln(z)


def _pick(flag, yes, no):
    """``yes`` where the flag holds, else ``no``: a static choice for a Python bool, a where for a mask."""
    if isinstance(flag, bool):
        return yes if flag else no
    return torch.where(flag, yes, no)


def _adapted(site: BottleneckSiteBatch, h, x, hx, plain, ln: Norm) -> torch.Tensor:
    """The adapted rows, as `adapters.methods.modeling.Adapter` / `ParallelAdapter` compute them:
    pre_forward (adapter input and residual), the bottleneck body, forward's residual and ln_after, then
    post_forward (parallel adapters add h; the sublayer LN over output + x)."""
    f, tab, slots = site.flags, site.tables, site.slots
    t = _pick(f.parallel, x, _pick(f.ln_plain_input, plain, h))
    residual = _pick(f.residual_is_input, t, _pick(f.residual_post_add, hx, h))
    if f.ln_before is not False:
        t = _pick(f.ln_before, kernels.layer_norm_rows(t, tab.ln_before_weight, tab.ln_before_bias, ADAPTER_LN_EPS,
                                                       slots), t)
    body = _bottleneck_body(site, t)
    if f.residual_inside is not False:
        body = body + _pick(f.residual_inside, residual, 0.0)
    if f.ln_after is not False:
        body = _pick(f.ln_after, kernels.layer_norm_rows(body, tab.ln_after_weight, tab.ln_after_bias, ADAPTER_LN_EPS,
                                                         slots), body)
    out = body + _pick(f.parallel, h, _pick(f.residual_inside, 0.0, residual))
    if f.ln_output is False:
        return out
    return _pick(f.ln_output, _norm(ln, out + x), out)


def _bottleneck_body(site: BottleneckSiteBatch, t: torch.Tensor) -> torch.Tensor:
    """One gathered bottleneck per rank bucket (bounded padding); rows of one bucket are usually a slice."""
    tab = site.tables
    if len(site.buckets) == 1:
        return kernels.bottleneck(t, tab.w_down, tab.b_down, tab.w_up, tab.b_up, tab.scaling, tab.act_ids, tab.ranks,
                                  site.slots)
    body = torch.empty_like(t)
    for bucket in site.buckets:
        body[bucket.rows] = kernels.bottleneck(t[bucket.rows], tab.w_down, tab.b_down, tab.w_up, tab.b_up, tab.scaling,
                                               tab.act_ids, tab.ranks, bucket.slots)
    return body


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
