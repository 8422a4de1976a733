"""GPU-only checks (marked `gpu`, skipped without CUDA): compiled kernels at serving shapes, CUDA graphs.

The op tests of test_kernels_ops.py also run compiled on a GPU machine (their DEVICE is cuda there);
these add the sizes the interpreter cannot afford and the decode step captured in a CUDA graph.
"""
import pytest
import torch

from adapter_tables import TOL
from kernels import Act
from test_kernels_ops import run_bottleneck, run_lora

pytestmark = pytest.mark.gpu
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", [1, 128])
@pytest.mark.parametrize("pattern", ["one", "uniform", "zipf", "some_none"])
@pytest.mark.parametrize("H,R", [(768, 16), (4096, 64), (1000, 256)])
def test_ops_compiled_at_serving_shapes(pattern, T, dtype, H, R):
    run_bottleneck(pattern, T, dtype, H, R, act_offset=R % len(Act), device="cuda", num_rows=64)
    run_lora(pattern, T, dtype, K=H, N=H + 64, R=R, device="cuda", num_rows=64)


def decode_engine(root, device: str, dtype: str):
    """A tiny BERT on `device` with adapters of every kernel's op loaded; -> (engine, row adapter names)."""
    from oracle import build_oracle
    from transformers import BertConfig, BertModel

    from engine import Engine

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(root / "base")
    oracle = build_oracle("bert", root / "oracle", peft=True)
    engine = Engine.from_pretrained(root / "base", device=device, dtype=dtype)
    names = ["seq_bn", "seq_bn_gelu", "par_bn", "lora_qkv_ffn", "ia3", "peft_lora_ffn", "seq_bn_ln_before"]
    for name in names:
        engine.load_adapter(oracle.cases[name].path, name=name, pin=True)
    return engine, names + [None]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_decode_step_in_a_cuda_graph(tmp_path, dtype):
    """Capture one T=1 forward through the model (every adapter kernel, no host sync), replay it on new
    inputs, compare with eager execution."""
    engine, rows = decode_engine(tmp_path, "cuda", dtype)
    B = len(rows)
    ids = torch.randint(3, 100, (B, 1), device="cuda")
    mask, types = torch.ones_like(ids), torch.zeros_like(ids)
    with engine.adapters.admit(rows, [None] * B) as batch, torch.inference_mode():
        meta = batch.meta
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up compiles the kernels outside the capture
            for _ in range(2):
                engine.model(ids, mask, types, meta)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = engine.model(ids, mask, types, meta)
        for _ in range(3):
            ids.copy_(torch.randint(3, 100, (B, 1), device="cuda"))
            graph.replay()
            eager = engine.model(ids, mask, types, meta)
            torch.testing.assert_close(captured, eager, **TOL[getattr(torch, dtype)])
