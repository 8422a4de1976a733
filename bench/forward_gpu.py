"""Forward-pass benchmark on a CUDA GPU: every row a different adapter, one pass, against the base (issue 4).

A BERT-base-shaped model (H=768, 12 layers, FFN 3072) with random weights; 64 rows, each with its own adapter: the
32 configs of bench/forward.py's typical mix (bottleneck variants, LoRA, IA3), two weight draws of each. Timed
round-robin with CUDA events: the engine with no adapter, the same batch with every row's adapter through the
Triton kernels, and through the torch reference ops (ADAPTERSERVE_KERNELS=torch). Goal: Triton mixed >= 0.95x the
base. The Triton output is checked against the reference's before anything is timed.

GPU machines lack the `adapters` library, so adapter folders come in two steps. Templates (each adapter's
adapter_config.json and its weights' names and shapes, as the library saves them; ~100 KB, git-ignored) are made
here; random weights are drawn from them there:

    python bench/forward_gpu.py templates              # with the library (CPU): writes .bench-templates/
    python bench/forward_gpu.py run                    # on the GPU (carry .bench-templates): records
                                                       # bench/results/forward-gpu.md
    python bench/forward_gpu.py run --quick            # smoke test on any device, records nothing
"""
import argparse
import datetime
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# `python bench/forward_gpu.py` puts bench/ first on sys.path, where bench/kernels.py would shadow the package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))
import torch  # noqa: E402

from kernels import BACKEND_ENV  # noqa: E402

TEMPLATES = HERE.parent / ".bench-templates"
RESULTS = HERE / "results" / "forward-gpu.md"
DRAWS = 2  # weight draws per template: 32 configs -> 64 distinct adapters


def _cpu_bench():
    """bench/forward.py as a module (its adapter mix and inputs); not importable by name from here (see above)."""
    spec = importlib.util.spec_from_file_location("cpu_forward_bench", HERE / "forward.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_templates(out: Path) -> None:
    import adapters
    from safetensors.torch import load_file
    from transformers import BertConfig

    config = BertConfig()  # bert-base-uncased's shape
    model = adapters.BertAdapterModel(config)
    out.mkdir(parents=True, exist_ok=True)
    (out / "base_config.json").write_text(config.to_json_string())
    for name, adapter_config in _cpu_bench().adapter_configs("typical"):
        model.add_adapter(name, config=adapter_config)
        with tempfile.TemporaryDirectory() as tmp:
            model.save_adapter(tmp, name)
            files = {p.name: p for p in Path(tmp).iterdir()}
            weights = (load_file(files["adapter.safetensors"]) if "adapter.safetensors" in files
                       else torch.load(files["pytorch_adapter.bin"], weights_only=True))
            (out / name).mkdir(exist_ok=True)
            (out / name / "adapter_config.json").write_text(files["adapter_config.json"].read_text())
            shapes = {key: list(t.shape) for key, t in weights.items()}
            (out / name / "shapes.json").write_text(json.dumps(shapes, indent=0))
        model.delete_adapter(name)
    print(f"wrote {len(list(out.glob('*/shapes.json')))} adapter templates and the base config to {out}")


def materialize(templates: Path, work: Path) -> list[Path]:
    """The base model (random, seed 0) in work/base and DRAWS adapter folders per template; -> adapter folders."""
    from safetensors.torch import save_file
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    BertModel(BertConfig.from_json_file(templates / "base_config.json")).save_pretrained(work / "base")
    gen, folders = torch.Generator().manual_seed(0), []
    for template in sorted(p.parent for p in templates.glob("*/shapes.json")):
        meta = json.loads((template / "adapter_config.json").read_text())
        is_ia3 = meta["config"].get("composition_mode") == "scale"  # IA3 vectors scale around 1
        for draw in range(DRAWS):
            folder = work / f"{template.name}-{draw}"
            folder.mkdir()
            (folder / "adapter_config.json").write_text(json.dumps(meta, indent=2))  # served as folder.name
            tensors = {key: torch.randn(shape, generator=gen) * 0.05 + (1.0 if is_ia3 and "lora_B" in key else 0.0)
                       for key, shape in json.loads((template / "shapes.json").read_text()).items()}
            save_file(tensors, folder / "adapter.safetensors")
            folders.append(folder)
    return folders


def time_ms(fn, cuda: bool) -> float:
    if not cuda:  # the --quick smoke test off a GPU
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def run(args) -> None:
    from engine import Engine

    cuda = args.device == "cuda"
    if not cuda and not args.quick:
        raise SystemExit("timing needs a CUDA GPU; --quick runs a smoke test on any device")
    if not (args.templates / "base_config.json").is_file():
        raise SystemExit(f"no templates in {args.templates}: run `python bench/forward_gpu.py templates` where the "
                         f"`adapters` library is installed, and carry the folder")
    rows, reps, warmup = (8, 2, 1) if args.quick else (args.rows, args.reps, args.warmup)
    dtype = args.dtype or ("float16" if cuda else "float32")
    with tempfile.TemporaryDirectory() as tmp:  # the adapter folders stay until the end (sources of the tiers)
        folders = materialize(args.templates, Path(tmp))
        engine = Engine.from_pretrained(Path(tmp) / "base", device=args.device, dtype=dtype)
        for folder in folders:
            engine.load_adapter(folder, name=folder.name)
        names = [folders[r % len(folders)].name for r in range(rows)]
        sections = [f"# Forward pass on a GPU: {rows} rows over {len(set(names))} distinct mixed adapters vs. the "
                    f"base (BERT-base shape, random weights)", "", *machine_lines(args, engine), ""]
        for seq_len in args.seq_lens:
            sections += bench_length(engine, names, seq_len, reps, warmup, cuda)
    print("\n".join(sections))
    if args.out or (cuda and not args.quick):
        out = args.out or RESULTS
        out.write_text("\n".join(sections) + "\n")
        print(f"recorded {out}")


def bench_length(engine, names: list[str], seq_len: int, reps: int, warmup: int, cuda: bool) -> list[str]:
    ids, mask = _cpu_bench().make_inputs(len(names), seq_len, torch.Generator().manual_seed(seq_len))
    ids, mask = ids.to(engine.device), mask.to(engine.device)
    real = mask.bool()

    def forward(adapters, backend):
        os.environ[BACKEND_ENV] = backend
        with torch.inference_mode():
            return engine.forward(ids, mask, adapters).last_hidden_state

    configs = {"base": ([None] * len(names), "auto"), "mixed, Triton": (names, "auto"),
               "mixed, torch reference": (names, "torch")}
    outs = {label: forward(*config) for label, config in configs.items()}
    diff = (outs["mixed, Triton"] - outs["mixed, torch reference"]).float()[real].abs().max().item()
    times = {label: [] for label in configs}
    for rep in range(warmup + reps):
        for label, config in configs.items():
            t = time_ms(lambda: forward(*config), cuda)
            if rep >= warmup:
                times[label].append(t)
    os.environ.pop(BACKEND_ENV)
    base = statistics.median(times["base"])
    lines = [f"### {len(names)} rows x {seq_len} tokens ({int(mask.sum())} real), {reps} reps", "",
             "| config | median ms | min ms | throughput vs base |", "|---|---:|---:|---:|"]
    for label, ts in times.items():
        med = statistics.median(ts)
        lines.append(f"| {label} | {med:.2f} | {min(ts):.2f} | {base / med:.3f}x |")
    ratio = base / statistics.median(times["mixed, Triton"])
    verdict = ("met" if ratio >= 0.95 else "NOT met") if cuda else "no GPU: the torch path ran twice"
    return [*lines, "", f"- Triton mixed vs base: **{ratio:.3f}x** (goal >= 0.95: {verdict})",
            f"- Triton vs torch reference, mixed batch: max |diff| over real tokens {diff:.2e} ({engine.dtype})", ""]


def machine_lines(args, engine) -> list[str]:
    import transformers
    import triton

    cuda = args.device == "cuda"
    device = torch.cuda.get_device_name() if cuda else f"{args.device} (smoke test: no Triton, wall-clock times)"
    return [f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
            f"- command: `python {' '.join(sys.argv)}`",
            f"- device: {device}; {platform.platform()}",
            f"- python {platform.python_version()}, torch {torch.__version__}, triton {triton.__version__}, "
            f"transformers {transformers.__version__}",
            f"- dtype {engine.dtype}; adapters: bench/forward.py's typical mix x {DRAWS} weight draws; "
            f"{'CUDA-event' if cuda else 'wall-clock'} times, round-robin"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("templates", help="write adapter templates (needs the adapters library)").add_argument(
        "folder", type=Path, nargs="?", default=TEMPLATES)
    r = sub.add_parser("run", help="time the forward pass")
    r.add_argument("--templates", type=Path, default=TEMPLATES)
    r.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    r.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="default: float16 on a GPU")
    r.add_argument("--rows", type=int, default=64)
    r.add_argument("--seq-lens", type=int, nargs="+", default=[128, 16])
    r.add_argument("--reps", type=int, default=30)
    r.add_argument("--warmup", type=int, default=5)
    r.add_argument("--quick", action="store_true", help="8 rows, 2 reps; records nothing unless --out")
    r.add_argument("--out", type=Path)
    args = p.parse_args()
    if args.command == "templates":
        write_templates(args.folder)
    else:
        run(args)


if __name__ == "__main__":
    main()
