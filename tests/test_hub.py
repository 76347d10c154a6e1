"""Official checkpoints by name: fetched from a server (here one on loopback) into the cache, verified,
reused without the network, fetched again when damaged; a file that is not the promised network is refused."""

from __future__ import annotations

import functools
import os
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from mvseg import Predictor, hub
from mvseg.checkpoint import CheckpointError

from .conftest import REFERENCE


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """A loopback HTTP server holding official-layout checkpoints under their release names."""
    served = tmp_path / "served"
    served.mkdir()
    shutil.copy(REFERENCE / "mvs_nf32_checkpoint.pt", served / hub.RELEASES["multiverseg-v1"].file)
    shutil.copy(REFERENCE / "sp_nf32_checkpoint.pt", served / hub.RELEASES["scribbleprompt-v1"].file)
    handler = functools.partial(QuietHandler, directory=str(served))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("MVSEG_WEIGHTS_MIRROR", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("MVSEG_CACHE", str(tmp_path / "cache"))
    try:
        yield served, server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


class QuietHandler(SimpleHTTPRequestHandler):
    requests = 0

    def do_GET(self):
        QuietHandler.requests += 1
        super().do_GET()

    def log_message(self, *args):
        pass


def test_a_release_is_fetched_once_verified_and_reused(mirror, tmp_path):
    served, _ = mirror
    QuietHandler.requests = 0
    path = hub.fetch("multiverseg-v1", progress=False)
    assert path.parent == tmp_path / "cache" and path.read_bytes() == (served / path.name).read_bytes()
    assert (path.parent / (path.name + ".sha256")).exists()
    predictor = Predictor("multiverseg-v1", fallback="scribbleprompt-v1", device="cpu")
    assert predictor.model.kind == "multiverseg" and predictor.fallback.kind == "scribbleprompt"
    assert QuietHandler.requests == 2  # MultiverSeg once, ScribblePrompt once: the cache served the rest
    path.write_bytes(path.read_bytes()[:-10])  # damaged
    hub.fetch("multiverseg-v1", progress=False)
    assert QuietHandler.requests == 3 and path.read_bytes() == (served / path.name).read_bytes()


def test_a_file_that_is_not_the_promised_network_is_refused(mirror, tmp_path):
    served, _ = mirror
    mvs = served / hub.RELEASES["multiverseg-v1"].file
    sp = served / hub.RELEASES["scribbleprompt-v1"].file
    sp.write_bytes(mvs.read_bytes())  # a MultiverSeg file under the ScribblePrompt name
    with pytest.raises(CheckpointError, match="not 'scribbleprompt'"):
        hub.fetch("scribbleprompt-v1", progress=False)
    with pytest.raises(CheckpointError, match="sha256"):
        hub.fetch("multiverseg-v1", sha256="0" * 64, progress=False)
    (served / "garbage").write_bytes(b"not a checkpoint")
    mvs.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        hub.fetch("multiverseg-v1", progress=False)
    assert not list((tmp_path / "cache").glob("*.pt")) and not list((tmp_path / "cache").glob(".*part"))
    with pytest.raises(ValueError, match="unknown release"):
        hub.fetch("multiverseg-v9")


class CutShortHandler(QuietHandler):
    """Announces the whole file, sends half of it and closes."""

    def do_GET(self):
        data = (Path(self.directory) / self.path.lstrip("/")).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])


def test_a_download_cut_short_says_so_and_the_cache_is_readable_by_all(mirror, tmp_path, monkeypatch):
    """A body closed half way was only refused later as 'not a readable checkpoint', naming a file already
    gone; a cached release was readable by its owner alone."""
    served, _ = mirror
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(CutShortHandler, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("MVSEG_WEIGHTS_MIRROR", f"http://127.0.0.1:{server.server_port}")
        with pytest.raises(CheckpointError, match="cut short"):
            hub.fetch("multiverseg-v1", progress=False)
    finally:
        server.shutdown()
        server.server_close()
    assert not list((tmp_path / "cache").glob(".*part"))
    stale = tmp_path / "cache" / f".{hub.RELEASES['multiverseg-v1'].file}.killed.part"
    stale.write_bytes(b"x" * 1000)
    os.utime(stale, (0, 0))  # from a download killed long ago
    monkeypatch.setenv("MVSEG_WEIGHTS_MIRROR", f"http://127.0.0.1:{mirror[1].server_port}")
    path = hub.fetch("multiverseg-v1", progress=False)
    assert path.stat().st_mode & 0o044 == 0o044 and not stale.exists()


def test_offline_the_answer_says_what_to_do_and_a_file_placed_by_hand_is_used(tmp_path, monkeypatch):
    """Without the network the fetch was a bare urllib traceback naming neither the file nor the way out."""
    from bench.bench_server import free_port

    monkeypatch.setenv("MVSEG_WEIGHTS_MIRROR", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("MVSEG_CACHE", str(tmp_path / "cache"))
    with pytest.raises(CheckpointError, match="put the file in .*MVSEG_WEIGHTS_MIRROR"):
        hub.fetch("multiverseg-v1", progress=False)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []  # no partial download left
    placed = tmp_path / "cache" / hub.RELEASES["multiverseg-v1"].file
    shutil.copy(REFERENCE / "mvs_nf32_checkpoint.pt", placed)
    assert hub.fetch("multiverseg-v1", progress=False) == placed  # checked, stamped, no network asked
    wrong = tmp_path / "cache" / hub.RELEASES["multiverseg-v1"].file
    wrong.with_name(wrong.name + ".sha256").unlink()
    shutil.copy(REFERENCE / "sp_nf32_checkpoint.pt", wrong)  # the other network under this name
    with pytest.raises(CheckpointError, match="holds a 'scribbleprompt' network"):
        hub.fetch("multiverseg-v1", progress=False)
