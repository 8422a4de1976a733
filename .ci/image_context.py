"""Copies what deploy/Dockerfile's COPY lines take from the repository into a folder, as `docker build` sees it.

No Docker engine runs here, so CI installs the package from this folder (as the image's `pip install .` does) and
starts the server from that install: a file the package needs but the Dockerfile leaves out fails CI, not the build.
Only the COPY forms the Dockerfile uses are understood (files or folders into a folder of WORKDIR); any other
form stops with an error rather than being copied wrongly.

    python .ci/image_context.py OUT_DIR
"""
import shlex
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def copy_lines(dockerfile: Path) -> list[list[str]]:
    """The arguments of each COPY instruction (line continuations joined)."""
    text = dockerfile.read_text(encoding="utf-8").replace("\\\n", " ")
    return [shlex.split(line)[1:] for line in text.splitlines() if line.split()[:1] == ["COPY"]]


def build_context(dockerfile: Path, out: Path) -> list[str]:
    copied = []
    for args in copy_lines(dockerfile):
        if len(args) < 2 or any(a.startswith("--") or any(c in a for c in "*?[$") for a in args):
            raise SystemExit(f"{dockerfile}: COPY {' '.join(args)}: a form this script does not copy")
        *sources, dest = args
        target = out / dest
        for source in sources:
            path = ROOT / source
            if path.is_dir():  # Docker copies a folder's contents into dest
                shutil.copytree(path, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
            elif path.is_file():
                if len(sources) > 1 and not dest.endswith("/"):
                    raise SystemExit(f"{dockerfile}: COPY of several files needs a folder ending in /, got {dest}")
                into = target / path.name if dest.endswith("/") else target
                into.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, into)
            else:
                raise SystemExit(f"{dockerfile}: COPY {source}: no such file or folder in the repository")
            copied.append(source)
    return copied


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    print("image context:", " ".join(build_context(ROOT / "deploy" / "Dockerfile", out)))
