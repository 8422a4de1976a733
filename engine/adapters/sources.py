"""Adapter sources -> a local folder that the format readers read (and read again after eviction).

A source is, first match wins:
  ``store://<path>``               a folder of the adapter store (`engine.adapters.store`)
  ``hf://org/name[@revision]``     a Hugging Face hub repo, through huggingface_hub: its cache and HF_HUB_OFFLINE
  ``<scheme>://...``               any fsspec filesystem: file://, memory://, s3://, gs://, ... (extra ``fsspec``)
  an absolute or existing path     a local folder
  ``org/name[@revision]``          a Hugging Face hub repo
Fetches are capped at ``max_download_mb``. An fsspec download lands in a private folder of ours that the
caller validates before anything becomes visible, and discards (`discard`) if that fails or once the
adapter is freed. Hub files land in the hub cache, which huggingface_hub writes through temporary files.
"""
import fnmatch
import posixpath
import re
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path

from engine.adapters.store import SCHEME as STORE_SCHEME
from engine.adapters.store import AdapterStore
from engine.errors import AdapterSourceError, AdapterSourceRefused, InvalidRequest

URL = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
HUB_FILES = ["*.json", "*.safetensors", "*.bin"]  # configs and weights (adapter and head); no READMEs or images
CHUNK = 1 << 20


@dataclass(frozen=True)
class AdapterFolder:
    path: Path  # read from here, now and after eviction
    source: str  # as the caller gave it
    default_name: str  # for formats that save no name (PEFT): the repo's or folder's name
    owned: bool  # a download of ours, deleted by `discard`


class AdapterSources:
    def __init__(self, store: AdapterStore | None, download_dir: str | None, max_download_bytes: int):
        self.store, self.max_bytes = store, max_download_bytes
        if download_dir is None:
            download_dir = tempfile.mkdtemp(prefix="adapterserve-downloads-")
            weakref.finalize(self, shutil.rmtree, download_dir, True)
        self.download_dir = Path(download_dir)
        self.download_dir.mkdir(parents=True, exist_ok=True)

    def resolve(self, source: str | Path) -> AdapterFolder:
        if "\x00" in str(source):  # every file system call would raise ValueError
            raise AdapterSourceRefused(str(source).replace("\x00", "\\x00"), "contains a NUL character")
        try:
            return self._resolve(source)
        except OSError as exc:  # a name too long for the file system and the like: the source cannot be opened
            raise AdapterSourceError(str(source), f"cannot open it: {exc}") from None

    def _resolve(self, source: str | Path) -> AdapterFolder:
        if isinstance(source, Path):
            return AdapterFolder(source, str(source), source.name, owned=False)
        match = URL.match(source)
        if source.startswith(STORE_SCHEME):
            if self.store is None:
                raise AdapterSourceError(source, "no adapter_store is configured")
            path = self.store.folder(source)
            return AdapterFolder(path, self.store.source_of(path), path.name, owned=False)
        if source.startswith("hf://"):
            return self._from_hub(source)
        if match:
            return self._download(source)
        path = Path(source).expanduser()
        if path.is_absolute() or path.exists() or not HUB_ID.match(source):
            return AdapterFolder(path, source, path.name, owned=False)  # a missing folder is the reader's error
        return self._from_hub(source)  # like transformers' from_pretrained: a local folder of that name wins

    def discard(self, folder: AdapterFolder) -> None:
        if folder.owned:
            shutil.rmtree(folder.path, ignore_errors=True)

    def _from_hub(self, source: str) -> AdapterFolder:
        from huggingface_hub import constants, snapshot_download

        spec = source.removeprefix("hf://")
        if not HUB_ID.match(spec) or ".." in re.split(r"[/@]", spec):  # huggingface_hub opens refs/<revision>
            raise InvalidRequest(f"a hub source is org/name or org/name@revision (no '..'), got {source!r}", "source")
        repo, _, revision = spec.partition("@")
        revision = self._hub_revision_within_cap(source, repo, revision or None)
        try:
            # offline, say so explicitly: huggingface_hub 1.x otherwise lists a commit-pinned repo online and fails
            path = Path(snapshot_download(repo, revision=revision, allow_patterns=HUB_FILES,
                                          local_files_only=constants.HF_HUB_OFFLINE))
        except Exception as exc:  # hub errors come in many types; all mean "cannot get it"
            local = "" if source.startswith("hf://") else "no local folder of that name, and "
            if constants.HF_HUB_OFFLINE:  # the hub's own text then advises local_files_only=False, no option of ours
                raise AdapterSourceError(source, f"{local}not in the Hugging Face cache, and HF_HUB_OFFLINE is set: "
                                                 "this server does not download (unset it, or fill the cache "
                                                 "beforehand)") from None
            raise AdapterSourceError(source, f"{local}not on the Hugging Face hub or in its cache: "
                                             f"{type(exc).__name__}: {exc}") from None
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        if size > self.max_bytes:
            raise AdapterSourceRefused(source, f"{size} bytes exceed max_download_mb ({self.max_bytes} bytes)")
        return AdapterFolder(path, source, repo.rsplit("/", 1)[-1], owned=False)

    def _hub_revision_within_cap(self, source: str, repo: str, revision: str | None) -> str | None:
        """Sizes the repo's files before downloading (online only) and pins the commit that was sized."""
        from huggingface_hub import HfApi, constants

        if constants.HF_HUB_OFFLINE:
            return revision
        try:
            info = HfApi().model_info(repo, revision=revision, files_metadata=True)
        except Exception:  # unreachable or unknown: snapshot_download then tries the cache and says why not
            return revision
        wanted = [s for s in info.siblings or [] if any(fnmatch.fnmatch(s.rfilename, p) for p in HUB_FILES)]
        size = sum(s.size or 0 for s in wanted)
        if size > self.max_bytes:
            raise AdapterSourceRefused(source, f"{size} bytes exceed max_download_mb ({self.max_bytes} bytes)")
        return info.sha or revision

    def _download(self, url: str) -> AdapterFolder:
        try:
            import fsspec
        except ImportError:
            raise AdapterSourceError(url, "URL sources need fsspec: pip install 'adapterserve[fsspec]'") from None
        try:
            fs, root = fsspec.core.url_to_fs(url)
            files = [f for f in fs.ls(root, detail=True) if f["type"] == "file"]
        except Exception as exc:  # unknown protocol, missing folder, network: all mean "cannot list it"
            raise AdapterSourceError(url, f"cannot list it: {type(exc).__name__}: {exc}") from None
        if not files:
            raise AdapterSourceError(url, "no files there (expects a folder holding adapter_config.json)")
        listed = sum(f.get("size") or 0 for f in files)
        if listed > self.max_bytes:
            raise AdapterSourceRefused(url, f"{listed} bytes exceed max_download_mb ({self.max_bytes} bytes)")
        staging = Path(tempfile.mkdtemp(prefix="fetch-", dir=self.download_dir))
        try:
            left = self.max_bytes
            for f in files:
                left -= self._copy(fs, f["name"], staging / posixpath.basename(f["name"].rstrip("/")), left, url)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return AdapterFolder(staging, url, posixpath.basename(root.rstrip("/")) or "adapter", owned=True)

    def _copy(self, fs, remote: str, local: Path, left: int, url: str) -> int:
        """Streams one file; listed sizes may lie, so the cap is enforced on the bytes actually read."""
        copied = 0
        try:
            with fs.open(remote, "rb") as src, open(local, "wb") as dst:
                while chunk := src.read(CHUNK):
                    copied += len(chunk)
                    if copied > left:
                        raise AdapterSourceRefused(url, f"more than max_download_mb ({self.max_bytes} bytes)")
                    dst.write(chunk)
        except OSError as exc:
            raise AdapterSourceError(url, f"cannot download {posixpath.basename(remote)}: {exc}") from None
        return copied


def fingerprint(folder: Path) -> tuple:
    """Names, sizes and modification times of a folder's files: a re-read after eviction must see the same files."""
    try:
        return tuple(sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in folder.iterdir() if f.is_file()))
    except OSError:
        return ()
