"""Test session set-up. Runs before any kernel module is imported (pytest loads the root conftest first).

Without CUDA, Triton kernels run in the interpreter (TRITON_INTERPRET=1 must be set before the
`@triton.jit` decorators execute). Torch threads are pinned: this suite shares 2 cores with nothing else.
"""
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # shared helpers: tests/oracle.py, tests/minilm.py

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


@pytest.fixture(scope="session")
def bert(tmp_path_factory):
    """The tiny BERT oracle with every saved adapter case (tests/oracle.py), built (or read from
    ADAPTERSERVE_ORACLE_DIR) once: the tests read it and edit only copies (adapter_edits.copy_case)."""
    from oracle import build_oracle  # here: only sessions that use an oracle import transformers

    return build_oracle("bert", tmp_path_factory.mktemp("bert"))


def pytest_report_header(config):
    return f"triton mode: {'interpreter' if INTERPRET else 'compiled'}; torch threads: {torch.get_num_threads()}"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
