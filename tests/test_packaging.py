"""Packaging promises: the engine runs on its own model code, and our `kernels` package name is harmless."""
import subprocess
import sys
import textwrap

import pytest


def _python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          timeout=300, env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})


def _run(code: str) -> str:
    result = _python(code)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_engine_uses_neither_adapters_nor_transformers_models():
    out = _run("""
        import sys
        from engine import Engine
        engine = Engine.from_pretrained(device="cpu")
        assert engine.embed(["hello world"]).shape == (1, 384)
        # transformers 5's AutoTokenizer imports the auto-class name tables (models.auto.modeling_auto), not a model
        print(sorted(m for m in sys.modules if m == "adapters" or m.startswith("adapters.") or m == "peft"
                     or (m.startswith("transformers.models.") and ".modeling_" in m
                         and not m.startswith("transformers.models.auto."))))
    """)
    assert out.strip() == "[]"


def test_transformers_does_not_take_our_kernels_for_hub_kernels():
    out = _run("""
        import kernels
        from transformers.utils.import_utils import is_kernels_available
        print(kernels.__file__.endswith("kernels/__init__.py"), is_kernels_available())
    """)
    assert out.split() == ["True", "False"]


@pytest.mark.parametrize("statement", ["from engine import Engine", "from engine.engine import Engine",
                                       "from engine.service.server import AdapterServer"])
def test_a_foreign_kernels_package_stops_the_engine_with_an_error_that_names_it(tmp_path, statement):
    # what transformers >= 5.25 installs: huggingface's `kernels`, first on sys.path in an installed console script
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("__version__ = '0.19.1'\n")
    result = _python(f"import sys; sys.path.insert(0, sys.argv[1]); {statement}", str(tmp_path))
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: `import kernels` found " + str(tmp_path / "kernels" / "__init__.py")), last
    assert "huggingface's `kernels`" in last and "pip uninstall kernels" in last, last


def test_the_client_and_the_cli_client_commands_load_without_torch(tmp_path):
    # a CLI call took ~4 s importing torch and transformers it never used; a foreign `kernels` package (see
    # above) does not stop a client either, only the engine
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("__version__ = '0.19.1'\n")
    out = _run(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        from engine.client import AsyncClient, Client, RpcError
        from engine.cli import main
        print("exit", main(["info", "--server", "127.0.0.1:1", "--timeout", "5"]))  # nobody listens there
        import engine
        assert "Engine" in dir(engine)  # listed before its first use
        print(sorted(m for m in ("torch", "transformers", "kernels", "engine.engine") if m in sys.modules))
        try:
            from engine import Engine
        except ImportError as exc:
            print(str(exc).startswith(f"`import kernels` found {{sys.path[0]}}/kernels/__init__.py"))
    """)
    assert out.splitlines() == ["exit 1", "[]", "True"], out


def test_serve_with_a_foreign_kernels_package_says_so_in_one_line(tmp_path):
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("__version__ = '0.19.1'\n")
    result = _python("import sys; sys.path.insert(0, sys.argv[1]); from engine.cli import main; "
                     "sys.exit(main(['serve', '--port', '0', '--metrics-port', '-1']))", str(tmp_path))
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("adapterserve serve: error: `import kernels` found "), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # was a traceback, exit 1
