"""The app against real clients' real components: a DICOMweb PACS (Orthanc) and the bundled OHIF in Chromium.

Orthanc (Debian's, with its DICOMweb plugin) runs from a temp dir on a free loopback port and gets two MR
series of the sample brain by STOW-RS; ``monailabel start_server --studies http://.../dicom-web`` serves
them with the bundled weights. The tests follow a hospital user: click on a slice, save a label (it goes to
the PACS as DICOM SEG), watch the context grow, restart the server, then do the same click in OHIF in
headless Chromium (Debian's, driven by Playwright) and read the overlay off the rendered pixels. Every
process is stopped by its PID; every wait is bounded. ``.ci/run`` installs Orthanc and Chromium.
"""

from __future__ import annotations

import http.server
import importlib.util
import json
import os
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest
import requests

from bench.bench_server import free_port, start_server

from .conftest import ROOT
from .pacs import orthanc_available, start_orthanc, stop_process, upload

pytestmark = [pytest.mark.slow, pytest.mark.pacs]
sys.path.insert(0, str(ROOT / "apps" / "multiverseg"))  # the app's modules (mvlabel), for the in-process tests
if not orthanc_available() and not os.environ.get("CI"):
    pytest.skip("Orthanc is not installed (tests/system-deps.sh installs it)", allow_module_level=True)

SAMPLE = ROOT / "sample-datasets" / "brain-3d" / "mni152_t1_2mm.nii.gz"
TRUTH = nib.load(str(ROOT / "sample-datasets" / "brain-3d" / "ground-truth" / "mni152_t1_2mm.nii.gz"))
NAMES = ["white_matter", "grey_matter"]
LABEL_INFO = [{"name": "white_matter", "idx": 1}, {"name": "grey_matter", "idx": 2}]
K = 47  # the clicked slice (axis 2)
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def _make_dicom():
    spec = importlib.util.spec_from_file_location("make_dicom", ROOT / "sample-datasets" / "make_dicom.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Site:
    """Orthanc + the annotation server, and what the tests share."""

    def __init__(self, root: Path):
        self.root = root
        self.orthanc_port, self.port = free_port(), free_port()
        self.dicomweb = f"http://127.0.0.1:{self.orthanc_port}/dicom-web"
        self.server = None
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start_server(self) -> float:
        """A fresh server with an empty cache (as on a new machine); returns the seconds it took."""
        self.restarts += 1
        t0 = time.perf_counter()
        self.tmp = self.root / "tmp"  # the server's temp folder: what it leaves there is checked
        self.tmp.mkdir(exist_ok=True)
        self.server = start_server(self.dicomweb, self.port, self.root / f"server{self.restarts}.log",
                                   {"labels": ",".join(NAMES)},
                                   env={"MONAI_LABEL_DATASTORE_CACHE_PATH": str(self.root / f"cache{self.restarts}"),
                                        "TMPDIR": str(self.tmp)})
        return time.perf_counter() - t0

    def stop_server(self) -> None:
        if self.server is not None:
            stop_process(self.server)
            self.server = None


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("pacs")
    site = Site(root)
    orthanc = start_orthanc(root / "orthanc", site.orthanc_port)
    try:
        make_dicom = _make_dicom()
        site.series = []
        for name in ("a", "b"):  # two MR series of one volume: one to label, one to be offered next
            files = make_dicom.write_series(SAMPLE, root / f"series_{name}", patient=f"MNI152-{name}")
            upload(site.dicomweb, files)
            site.series.append(_series_uid(files[0]))
        site.start_server()
        yield site
    finally:
        site.stop_server()
        stop_process(orthanc)


def _series_uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(str(path), stop_before_pixels=True).SeriesInstanceUID)


def click(site: Site, series: str, point: list, **params) -> requests.Response:
    params = {"foreground": [point], "background": [], "result_extension": ".nrrd", "result_dtype": "uint8",
              "label_name": "white_matter", **params}
    return requests.post(f"{site.url}/infer/multiverseg?image={series}&output=all",
                         data={"params": json.dumps(params)}, timeout=120)


def white_matter_point(k: int = K) -> list:
    ii, jj = np.nonzero(np.asarray(TRUTH.dataobj)[:, :, k] == 1)
    return [int(ii[len(ii) // 2]), int(jj[len(jj) // 2]), k]


def multipart(response) -> tuple[dict, bytes]:
    from .app_helpers import split_multipart

    return split_multipart(response)


def save_label(site: Site, series: str, label: np.ndarray, label_info=LABEL_INFO) -> requests.Response:
    path = site.root / "upload.nii.gz"
    nib.save(nib.Nifti1Image(label.astype(np.uint8), TRUTH.affine), str(path))
    with path.open("rb") as f:
        return requests.put(f"{site.url}/datastore/label?image={series}&tag=final",
                            data={"params": json.dumps({"label_info": label_info})},
                            files={"label": ("label.nii.gz", f)}, timeout=120)


def segs_in_pacs(site: Site) -> list[dict]:
    """Every SEG in Orthanc: its series UID, referenced series and segment labels (read from the PACS)."""
    from dicomweb_client import DICOMwebClient
    from pydicom.dataset import Dataset

    client = DICOMwebClient(site.dicomweb)
    out = []
    for item in client.search_for_series(search_filters={"Modality": "SEG"}):
        meta = Dataset.from_json(item)
        full = Dataset.from_json(client.retrieve_series_metadata(meta.StudyInstanceUID, meta.SeriesInstanceUID)[0])
        out.append({"uid": meta.SeriesInstanceUID, "study": meta.StudyInstanceUID,
                    "image": full.ReferencedSeriesSequence[0].SeriesInstanceUID,
                    "labels": sorted(s.SegmentLabel for s in full.SegmentSequence),
                    "description": str(full.get("SeriesDescription", ""))})
    return out


# -- the server against the PACS ------------------------------------------------------------------------


def test_ohif_assets_are_served_as_what_they_are(site):
    static = Path(__import__("monailabel").__file__).parent / "endpoints" / "static" / "ohif"
    nested = next(p for p in sorted(static.rglob("*.js")) if p.parent != static)
    r = requests.get(f"{site.url}/ohif/{nested.relative_to(static).as_posix()}", timeout=10)
    assert r.status_code == 200 and "javascript" in r.headers["content-type"]
    assert r.content == nested.read_bytes()
    assert "text/html" in requests.get(f"{site.url}/ohif/", timeout=10).headers["content-type"]
    r = requests.get(f"{site.url}/ohif/..%2F..%2F..%2Fconfig.py", timeout=10)
    assert r.status_code == 404


def test_mr_series_are_listed(site):
    objects = requests.get(f"{site.url}/datastore/?output=all", timeout=30).json()["objects"]
    assert sorted(objects) == sorted(site.series)  # MR, though MONAI Label's default filter lists CT only


def test_click_on_a_slice_answers_the_whole_volume_with_only_that_slice(site):
    r = click(site, site.series[0], white_matter_point(), result_compress=False)
    assert r.status_code == 200, r.text
    info, body = multipart(r)
    assert b"encoding: raw" in body.split(b"\n\n", 1)[0]  # OHIF reads the bytes as they come
    path = site.root / "click.nrrd"
    path.write_bytes(body)
    out, header = nrrd.read(str(path))
    assert out.shape == TRUTH.shape
    lps = np.diag([-1.0, -1.0, 1.0]) @ TRUTH.affine[:3]
    np.testing.assert_allclose(np.asarray(header["space directions"]), lps[:, :3].T, atol=1e-4)
    np.testing.assert_allclose(header["space origin"], lps[:, 3], atol=1e-4)
    assert out[:, :, K].any() and not np.delete(out, K, axis=2).any()
    assert info["slice"] == K and info["context_size"] == 0


def test_one_series_is_downloaded_once_whoever_asks(site, tmp_path):
    """A click and the background scorer asking for the same series at once: one complete download."""
    from mvlabel.dicomweb import connect

    store = connect(site.dicomweb, NAMES, cache=str(tmp_path))  # a datastore of its own, as a second server's
    paths, errors = [], []

    def fetch():
        try:
            paths.append(store.get_image_uri(site.series[1]))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(set(paths)) == 1
    assert nib.load(paths[0]).shape == TRUTH.shape
    assert not [p for p in os.listdir(store.series_dir) if p.endswith(".part")]


def test_saving_a_final_label_stores_a_seg_and_grows_the_context(site):
    a, b = site.series
    before = multipart(click(site, b, white_matter_point()))[0]["context_size"]
    assert requests.post(f"{site.url}/activelearning/first", json={"client_id": "x"}, timeout=30).json()["id"] in (a, b)
    r = save_label(site, a, np.asarray(TRUTH.dataobj))
    assert r.status_code == 200, r.text
    segs = segs_in_pacs(site)
    assert [(s["image"], s["labels"], s["description"]) for s in segs] == [(a, sorted(NAMES), "MultiverSeg")]
    after = multipart(click(site, b, white_matter_point()))[0]
    assert after["context_size"] > before
    r = requests.post(f"{site.url}/infer/multiverseg_auto?image={b}&output=json", data={"params": "{}"}, timeout=300)
    assert r.status_code == 200, r.text
    assert set(r.json()["label_names"]) == set(NAMES)
    for strategy in ("first", "nearest"):  # the labelled series is no longer offered
        r = requests.post(f"{site.url}/activelearning/{strategy}", json={"client_id": "x"}, timeout=30)
        assert r.json()["id"] == b
        assert r.json()["SeriesInstanceUID"] == b and r.json()["StudyInstanceUID"]  # what OHIF opens
    assert requests.get(f"{site.url}/datastore/?output=stats", timeout=30).json()["completed"] == 1


def test_the_newest_seg_per_label_counts_on_the_image_grid(site):
    """A second save with white matter only on some slices: its SEG covers those slices only, yet the label
    read back is on the whole grid, white matter from the new SEG and grey matter still from the first."""
    a = site.series[0]
    truth = np.asarray(TRUTH.dataobj)
    partial = np.where(truth == 1, 1, 0).astype(np.uint8)
    partial[:, :, : K - 10] = 0
    r = save_label(site, a, partial, [{"name": "white_matter", "idx": 1}])
    assert r.status_code == 200, r.text
    r = requests.get(f"{site.url}/datastore/label?label={a}&tag=final", timeout=60)
    assert r.status_code == 200, r.text
    path = site.root / "label_back.nii.gz"
    path.write_bytes(r.content)
    back = nib.load(str(path))
    assert back.shape == truth.shape
    np.testing.assert_allclose(back.affine, TRUTH.affine, atol=1e-4)
    info = requests.get(f"{site.url}/datastore/label/info?label={a}&tag=final", timeout=30).json()
    value = {item["name"]: item["idx"] for item in info["label_info"]}
    data = np.asarray(back.dataobj)
    np.testing.assert_array_equal(data == value["white_matter"], partial == 1)
    np.testing.assert_array_equal(data == value["grey_matter"], truth == 2)


def test_ohif_saves_a_raw_voxel_buffer(site):
    """OHIF's save: ``label.bin``, the labelmap's bytes in the volume's voxel order (first axis fastest)."""
    a = site.series[0]
    grey = (np.asarray(TRUTH.dataobj) == 2).astype(np.uint8)
    r = requests.put(f"{site.url}/datastore/label?image={a}&tag=final",
                     data={"params": json.dumps({"label_info": [{"name": "grey_matter", "idx": 1}]})},
                     files={"label": ("label.bin", grey.tobytes(order="F"))}, timeout=120)
    assert r.status_code == 200, r.text
    r = requests.put(f"{site.url}/datastore/label?image={a}&tag=final", data={"params": "{}"},
                     files={"label": ("label.bin", b"\x01" * 1000)}, timeout=60)
    assert r.status_code == 422 and "voxels" in r.text  # a buffer of the wrong size
    back = site.root / "bin_back.nii.gz"
    back.write_bytes(requests.get(f"{site.url}/datastore/label?label={a}&tag=final", timeout=60).content)
    info = requests.get(f"{site.url}/datastore/label/info?label={a}&tag=final", timeout=30).json()
    value = {item["name"]: item["idx"] for item in info["label_info"]}
    np.testing.assert_array_equal(np.asarray(nib.load(str(back)).dataobj) == value["grey_matter"], grey == 1)


def test_the_pacs_is_read_only_through_the_server(site):
    """OHIF reads the PACS through /proxy/dicom; a '..' once reached Orthanc's whole REST API (down to
    /tools/shutdown), a POST stored anything, a DELETE answered 200 and did nothing, and a label buffer
    with 20 values was stored as 19 segments."""
    import http.client

    segs = len(segs_in_pacs(site))
    for path in ("/proxy/dicom/%2e%2e/%2e%2e/system", "/proxy/dicom/..%2f..%2fsystem",
                 "/proxy/dicom/qido/../../instances", "/proxy/dicom/%252e%252e/%252e%252e/system",
                 "/proxy/dicom/tools/lookup"):
        conn = http.client.HTTPConnection("127.0.0.1", site.port, timeout=30)
        conn.request("GET", path)  # sent as written: no client-side dot removal
        status = conn.getresponse().status
        conn.close()
        assert status == 404, (path, status)
    r = requests.post(f"{site.url}/proxy/dicom/studies", data=b"x", headers={"content-type": "application/dicom"},
                      timeout=30)
    assert r.status_code == 405
    assert requests.get(f"{site.url}/proxy/dicom/qido/studies", timeout=30).status_code == 200  # OHIF's reads
    a = site.series[0]
    assert requests.delete(f"{site.url}/datastore/label?id={a}&tag=final", timeout=30).status_code == 405
    many = (np.arange(int(np.prod(TRUTH.shape))) % 20).astype(np.uint8)
    r = requests.put(f"{site.url}/datastore/label?image={a}&tag=final", data={"params": "{}"},
                     files={"label": ("label.bin", many.tobytes())}, timeout=60)
    assert r.status_code == 422 and "at most 16" in r.text
    assert len(segs_in_pacs(site)) == segs
    assert requests.get(f"{site.dicomweb}/studies", timeout=30).status_code == 200  # Orthanc still up


def test_a_pacs_that_is_down_or_hangs_gets_a_quick_503_and_the_server_recovers(tmp_path):
    """The PACS was down: every route answered a bare 500 after 30 s (the DICOMweb client's retries), and
    /info/ held the event loop meanwhile. A PACS that accepts and never answers held it for good; requests
    waiting on it took every worker thread, the viewer's files included. A gateway's 502 stopped the start."""
    import socket

    pacs_port, port = free_port(), free_port()
    server = start_server(f"http://127.0.0.1:{pacs_port}/dicom-web", port, tmp_path / "server.log",
                          {"labels": ",".join(NAMES)},
                          env={"MONAI_LABEL_DATASTORE_CACHE_PATH": str(tmp_path / "cache")})
    url = f"http://127.0.0.1:{port}"
    orthanc = None

    def answered_503(method: str, route: str, **kw) -> float:
        t0 = time.perf_counter()
        r = requests.request(method, url + route, timeout=60, **kw)
        assert r.status_code == 503 and "PACS did not answer" in r.text, (route, r.status_code, r.text)
        return time.perf_counter() - t0

    try:
        for method, route, kw in (("GET", "/info/", {}), ("GET", "/datastore/?output=stats", {}),
                                  ("GET", "/proxy/dicom/qido/studies", {}),
                                  ("POST", "/activelearning/random", {"json": {}}),
                                  ("POST", "/batch/infer/multiverseg_auto", {"json": {"images": ["1.2.3"]}}),
                                  ("DELETE", "/datastore/?id=1.2.3", {})):  # nothing listens
            assert answered_503(method, route, **kw) < 5, route

        time.sleep(5.5)  # the pause after a failure ends
        hung = socket.socket()  # connects, never answers
        hung.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        hung.bind(("127.0.0.1", pacs_port))
        hung.listen(64)
        answers = []
        waiting = [threading.Thread(target=lambda: answers.append(requests.get(f"{url}/info/", timeout=120)))
                   for _ in range(45)]
        for t in waiting:
            t.start()
        time.sleep(2.0)
        t0 = time.perf_counter()
        assert requests.get(f"{url}/ohif/", timeout=30).status_code == 200  # the viewer is still served
        assert time.perf_counter() - t0 < 5 and any(t.is_alive() for t in waiting)
        hung.close()  # the PACS process dies
        for t in waiting:
            t.join(timeout=60)
        assert len(answers) == 45 and {r.status_code for r in answers} == {503}
        assert answered_503("GET", "/info/") < 1  # within the pause: at once, without asking the PACS

        class Gateway(http.server.BaseHTTPRequestHandler):  # a proxy in front of a PACS that is down
            def do_GET(self):
                self.send_response(502)
                self.end_headers()

            def log_message(self, *args):
                pass

        time.sleep(5.5)
        gateway = http.server.ThreadingHTTPServer(("127.0.0.1", pacs_port), Gateway)
        threading.Thread(target=gateway.serve_forever, daemon=True).start()
        try:
            assert answered_503("GET", "/info/") < 5
        finally:
            gateway.shutdown()
            gateway.server_close()

        orthanc = start_orthanc(tmp_path / "orthanc", pacs_port)  # back again
        deadline = time.monotonic() + 30
        while (r := requests.get(f"{url}/info/", timeout=30)).status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert r.status_code == 200, r.text
        assert requests.get(f"{url}/datastore/?output=stats", timeout=30).json()["total"] == 0
        log = (tmp_path / "server.log").read_text(errors="replace")
        assert "scoring put off" in log and "scoring pass failed" not in log  # a warning, not a traceback
    finally:
        stop_process(server)
        if orthanc is not None:
            stop_process(orthanc)


def test_a_dicom_seg_answer_and_the_dataset_archive_leave_no_temp_files(site):
    """output=dicom_seg left its SEG in the temp folder after every answer, and without label_info it ran the
    model, kept the result file and answered 404; every dataset download left a new zip there."""
    import io
    import zipfile

    import pydicom

    before = set(os.listdir(site.tmp))
    b = site.series[1]
    params = {"foreground": [white_matter_point()], "background": [], "label_name": "white_matter",
              "label_info": [{"name": "white_matter", "idx": 1}]}
    r = requests.post(f"{site.url}/infer/multiverseg?image={b}&output=dicom_seg",
                      data={"params": json.dumps(params)}, timeout=120)
    assert r.status_code == 200 and r.headers["content-type"] == "application/dicom", r.text[:300]
    seg = pydicom.dcmread(io.BytesIO(r.content))
    assert seg.Modality == "SEG" and seg.SegmentSequence[0].SegmentLabel == "white_matter"
    del params["label_info"]
    r = requests.post(f"{site.url}/infer/multiverseg?image={b}&output=dicom_seg",
                      data={"params": json.dumps(params)}, timeout=120)
    assert r.status_code == 422 and "label_info" in r.json()["detail"]
    assert requests.post(f"{site.url}/infer/multiverseg?image={b}&output=dicom_seg", timeout=30).status_code == 422
    for label_info in ([{"name": "white_matter", "idx": 1, "color": "red"}], [{"name": "white_matter", "idx": 1,
                       "color": [300, -1, "a"]}], [{"name": "\u00e9\u2603", "idx": 1}], [{"name": "white_matter"}]):
        r = requests.post(f"{site.url}/infer/multiverseg?image={b}&output=dicom_seg",
                          data={"params": json.dumps({**params, "label_info": label_info})}, timeout=120)
        assert r.status_code == 422 and "label_info" in r.json()["detail"], (label_info, r.text)
    described = [{"name": "white_matter", "idx": 1}]
    r = requests.post(f"{site.url}/infer/multiverseg?output=dicom_seg", timeout=120,
                      files={"file": ("v.nii.gz", SAMPLE.read_bytes())},
                      data={"params": json.dumps({**params, "label_info": described})})
    assert r.status_code == 422 and "series" in r.json()["detail"], r.text
    if requests.get(f"{site.url}/datastore/dataset", timeout=120).status_code == 404:  # run on its own
        assert save_label(site, site.series[0], np.asarray(TRUTH.dataobj) == 1, LABEL_INFO[:1]).status_code == 200
    for _ in range(2):
        r = requests.get(f"{site.url}/datastore/dataset", timeout=120)
        assert r.status_code == 200, r.text[:300]
        names = zipfile.ZipFile(io.BytesIO(r.content)).namelist()
        assert "metadata.json" in names and any(n.startswith("label/") for n in names)
    time.sleep(0.5)  # a removal after the answer
    assert set(os.listdir(site.tmp)) == before


def test_a_session_upload_stays_in_the_servers_cache(site):
    """Slicer's upload of a volume the PACS does not hold went to the home folder on a PACS server."""
    r = requests.put(f"{site.url}/session/", files={"files": ("upload.nii.gz", SAMPLE.read_bytes())}, timeout=60)
    assert r.status_code == 200, r.text
    sessions = list((site.root / f"cache{site.restarts}").glob("*-mvseg/sessions/*"))
    assert any(r.json()["session_id"] in p.name for p in sessions), sessions
    r = requests.post(
        f"{site.url}/infer/multiverseg?session_id={r.json()['session_id']}&output=json",
        data={"params": json.dumps({"foreground": [white_matter_point()], "label_name": "white_matter"})}, timeout=120)
    assert r.status_code == 200, r.text


def test_batch_results_go_to_the_pacs_as_proposals_never_as_final(site, tmp_path):
    """Pre-segmenting the PACS (serially here; tests/test_batch.py runs Ray): a SEG named as a proposal
    joins the unlabelled series, and the server still counts it as unlabelled."""
    from mvlabel import batch
    from mvlabel.dicomweb import PROPOSAL, connect
    from mvseg import Predictor

    store = connect(site.dicomweb, NAMES, cache=str(tmp_path))
    a, b = site.series
    predictor = Predictor(device="cpu")
    plan = batch.plan(store, predictor, batch.weights_digest(None), "white_matter", NAMES)
    assert plan.todo == [b]
    summary = batch.run_serial(store, plan, predictor, progress=False)
    assert summary.written == [b], summary
    proposals = [s for s in segs_in_pacs(site) if s["image"] == b]
    assert [s["labels"] for s in proposals] == [["white_matter"]]
    assert proposals[0]["description"] == PROPOSAL + "original"
    assert requests.get(f"{site.url}/datastore/?output=stats", timeout=30).json()["completed"] == 1
    r = requests.post(f"{site.url}/activelearning/first", json={"client_id": "x"}, timeout=30)
    assert r.json()["id"] == b  # a proposal is not a final label
    again = batch.plan(store, predictor, batch.weights_digest(None), "white_matter", NAMES)
    assert again.todo == [] and again.current == [b]


class LosingRelay(http.server.BaseHTTPRequestHandler):
    """Relays STOWs (POSTs) to Orthanc; while ``server.lose`` is set, the answer is dropped after Orthanc
    stored it, as when the network cuts between the PACS and the server at that moment."""

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = b""
        while size := int(self.rfile.readline().split(b";")[0], 16):
            body += self.rfile.read(size)
            self.rfile.readline()
        self.rfile.readline()
        return body

    def do_POST(self):
        skip = {"host", "content-length", "transfer-encoding", "connection", "content-encoding"}
        headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
        r = requests.post(self.server.target + self.path, data=self._body(), headers=headers, timeout=60)
        if self.server.lose:
            self.server.lost += 1
            self.close_connection = True  # no status line: the client sees the connection closed
            return
        self.send_response(r.status_code)
        for k, v in r.headers.items():
            if k.lower() not in skip:
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(r.content)))
        self.end_headers()
        self.wfile.write(r.content)

    def log_message(self, *args):
        pass


def test_a_save_whose_answer_was_lost_is_not_stored_twice(site, tmp_path, monkeypatch):
    """The PACS stored the SEG but its answer never came: the save answers 503 and the client saves again.
    That retry used to store a second, identical SEG; now it finds the first and answers with it."""
    from mvlabel import dicomweb

    monkeypatch.setattr(dicomweb, "PACS_PAUSE", 0.2)
    relay = http.server.ThreadingHTTPServer(("127.0.0.1", 0), LosingRelay)
    relay.target, relay.lose, relay.lost = f"http://127.0.0.1:{site.orthanc_port}", True, 0
    threading.Thread(target=relay.serve_forever, daemon=True).start()
    a = site.series[0]
    label = np.asarray(TRUTH.dataobj).astype(np.uint8)

    def save(mask: np.ndarray) -> str:
        path = tmp_path / f"label{time.monotonic_ns()}.nii.gz"  # a refused save removes its upload
        nib.save(nib.Nifti1Image(mask, TRUTH.affine), str(path))
        return store.save_label(a, str(path), "final", {"label_info": LABEL_INFO})

    try:
        store = dicomweb.connect(site.dicomweb, NAMES, cache=str(tmp_path))
        # only the STOW goes through the relay: its reads are not what this test is about
        stow = dicomweb.connect(f"http://127.0.0.1:{relay.server_port}/dicom-web", NAMES, cache=str(tmp_path / "s"))
        monkeypatch.setattr(store._client, "store_instances", stow._client.store_instances)
        before = {s["uid"] for s in segs_in_pacs(site)}
        with pytest.raises(requests.ConnectionError):
            save(label)
        stored = {s["uid"] for s in segs_in_pacs(site)} - before
        assert relay.lost == 1 and len(stored) == 1  # it reached the PACS
        relay.lose = False
        time.sleep(0.3)  # the pause after a failure
        assert save(label) == stored.pop()  # the retry: the same SEG, no second one
        assert len({s["uid"] for s in segs_in_pacs(site)} - before) == 1
        changed = label.copy()
        changed[tuple(np.argwhere(label == 1)[0])] = 0
        assert save(changed) not in before  # another label is stored as ever
        assert len({s["uid"] for s in segs_in_pacs(site)} - before) == 2
    finally:
        relay.shutdown()
        relay.server_close()


def _small_series(root: Path, name: str, change=None) -> str:
    """A 12-slice 32 x 32 MR series in the PACS (its UID); ``change(k, dataset)`` edits each slice's header."""
    import pydicom

    volume = np.zeros((32, 32, 12), np.float32)
    volume[8:24, 8:24, 2:10] = 500
    path = root / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.diag([1.0, 1.0, 2.0, 1.0])), str(path))
    files = _make_dicom().write_series(path, root / name, patient=name)
    for k, file in enumerate(files):
        if change is not None:
            dataset = pydicom.dcmread(str(file))
            change(k, dataset)
            dataset.save_as(str(file))
    return files


def _uneven(k, dataset):
    dataset.ImagePositionPatient[2] = [0, 2, 4, 7, 9, 11, 16, 18, 20, 22, 24, 26][k]


def _tilted(k, dataset):
    dataset.ImagePositionPatient[1] = float(dataset.ImagePositionPatient[1]) + 0.7 * k


def _no_geometry(k, dataset):
    del dataset.ImagePositionPatient
    del dataset.ImageOrientationPatient


@pytest.mark.parametrize("change, word", [(_uneven, "evenly spaced"), (_tilted, "tilted"), (_no_geometry, "geometry")])
def test_a_seg_is_refused_for_a_series_off_a_regular_grid(site, tmp_path, change, word):
    """dcmqi writes a SEG on the regular grid the volume was read on and references the nearest instance of
    each frame: on a series with uneven spacing or a tilt the label landed on the wrong slices, and a series
    without slice geometry answered 500 (dcmqi failed, its output file was missing)."""
    from mvlabel import dicomweb
    from mvlabel.errors import BadRequest

    files = _small_series(tmp_path, f"off_{word.split()[0]}", change)
    upload(site.dicomweb, files)
    series = _series_uid(files[0])
    try:
        store = dicomweb.connect(site.dicomweb, NAMES, cache=str(tmp_path / "cache"))
        volume = nib.load(store.get_image_uri(series))
        label = np.zeros(volume.shape, np.uint8)
        label[10:20, 10:20, 3:8] = 1
        path = tmp_path / "label.nii.gz"
        nib.save(nib.Nifti1Image(label, volume.affine), str(path))
        before = segs_in_pacs(site)
        with pytest.raises(Exception) as refused:
            store.save_label(series, str(path), "final", {"label_info": LABEL_INFO[:1]})
        assert getattr(refused.value, "status_code", None) == 422 and word in refused.value.detail, refused.value
        assert segs_in_pacs(site) == before
        with pytest.raises(BadRequest, match=word):  # OHIF's output=dicom_seg goes through the same check
            dicomweb.check_seg_grid(str(Path(store.series_dir) / series))
    finally:  # the later tests offer the site's own unlabelled series next
        _delete_series(site, series)


def _delete_series(site: Site, uid: str) -> None:
    orthanc = f"http://127.0.0.1:{site.orthanc_port}"
    for found in requests.post(f"{orthanc}/tools/find", json={"Level": "Series", "Query": {"SeriesInstanceUID": uid}},
                               timeout=30).json():
        requests.delete(f"{orthanc}/series/{found}", timeout=30).raise_for_status()


def _stored_seg_copy(site: Site, seg_uid: str, change) -> str:
    """Another system's SEG: a copy of ``seg_uid`` with new UIDs, edited by ``change(dataset)``, stored."""
    from dicomweb_client import DICOMwebClient
    from pydicom.uid import generate_uid

    client = DICOMwebClient(site.dicomweb)
    seg = next(s for s in segs_in_pacs(site) if s["uid"] == seg_uid)
    dataset = client.retrieve_series(seg["study"], seg_uid)[0]
    dataset.SeriesInstanceUID = generate_uid()
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    dataset.SeriesTime = "235959"  # the newest
    change(dataset)
    client.store_instances([dataset])
    return str(dataset.SeriesInstanceUID)


def _duplicate_segment(dataset):
    dataset.SegmentSequence.append(dataset.SegmentSequence[0])


def _fractional(dataset):
    frames = dataset.pixel_array.reshape(-1, dataset.Rows, dataset.Columns).astype(np.uint8)
    dataset.SegmentationType, dataset.SegmentationFractionalType = "FRACTIONAL", "PROBABILITY"
    dataset.MaximumFractionalValue = 255
    dataset.BitsAllocated = dataset.BitsStored = 8
    dataset.HighBit = 7
    dataset.PixelData = (frames * 140 + 60).tobytes()  # 200 of 255 in the label, 60 (under a half) around it


def _rows_halved(dataset):
    dataset.Rows = dataset.Rows // 2


def test_segs_other_systems_stored_badly_or_deleted(site, tmp_path):
    """A SEG that cannot be read made every click, label read and start-up fail (the restart test below
    starts a server with these in the PACS); a fractional one was read as empty; a deleted one stayed the
    label until a restart."""
    from mvlabel import dicomweb

    a = site.series[0]  # labelled by the tests above
    store = dicomweb.connect(site.dicomweb, NAMES, cache=str(tmp_path / "cache"))
    store.list_ttl = 0.0

    def white_matter() -> np.ndarray:
        info = store.get_label_info(a, "final")
        value = {i["name"]: i["idx"] for i in info["label_info"]}["white_matter"]
        return np.asarray(nib.load(store.get_label_uri(a, "final")).dataobj) == value

    if not store.get_label_info(a, "final"):  # run alone
        assert save_label(site, a, np.asarray(TRUTH.dataobj)).status_code == 200
    before = white_matter()
    assert before.any()
    newest = store.get_label_info(a, "final")["segs"][NAMES.index("white_matter")]
    for change in (_duplicate_segment, _rows_halved):  # unreadable: the label stays what it was
        bad = _stored_seg_copy(site, newest, change)
        np.testing.assert_array_equal(white_matter(), before)
        assert bad in store._unusable
        assert click(site, site.series[0], white_matter_point()).status_code == 200  # the server lives on
    fractional = _stored_seg_copy(site, newest, _fractional)
    assert fractional in store.get_label_info(a, "final")["segs"]
    np.testing.assert_array_equal(white_matter(), before)  # it was read as empty; at 0.5, not above 0
    _delete_series(site, fractional)
    assert fractional not in store._seg_index()  # deleted from the PACS: gone here too
    assert fractional not in store.get_label_info(a, "final")["segs"]
    np.testing.assert_array_equal(white_matter(), before)


def test_a_save_while_another_save_of_the_series_runs_is_refused(site, tmp_path):
    """Both were stored, and which one became the label depended on the second the PACS gave each."""
    from fastapi import HTTPException
    from mvlabel import dicomweb

    store = dicomweb.connect(site.dicomweb, NAMES, cache=str(tmp_path / "cache"))
    path = tmp_path / "label.nii.gz"
    nib.save(nib.Nifti1Image((np.asarray(TRUTH.dataobj) == 1).astype(np.uint8), TRUTH.affine), str(path))
    before = segs_in_pacs(site)
    with store._one_save(site.series[0]), pytest.raises(HTTPException) as refused:  # a save in progress
        store.save_label(site.series[0], str(path), "final", {"label_info": LABEL_INFO[:1]})
    assert refused.value.status_code == 409 and "in progress" in refused.value.detail
    assert segs_in_pacs(site) == before


def test_a_restarted_server_rebuilds_the_context_from_the_pacs(site):
    site.stop_server()
    seconds = site.start_server()  # empty cache: everything comes from Orthanc again
    info = multipart(click(site, site.series[1], white_matter_point()))[0]
    assert info["context_size"] > 0
    print(f"restart with the context rebuilt from the PACS: {seconds:.1f} s")


# -- OHIF in a real browser -----------------------------------------------------------------------------


def green_pixels(png: bytes) -> int:
    """Pixels of a screenshot tinted green: OHIF blends white_matter's labelmap (rgb 122, 183, 49) over
    the grey image; before the answer only the click's marker, a small green ring, is there."""
    import io

    from PIL import Image

    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return int(((g - r > 25) & (g - b > 40)).sum())


def wait_for_the_image(viewport, seconds: float = 60) -> None:
    """Wait until the viewport shows the brain, as a user does before connecting to the server: OHIF's
    MONAI Label panel, connected while the volume is still loading, fails to set up its labelmap
    ("Cannot read properties of undefined (reading 'length')" in createAndCacheDerivedImages), and no
    overlay of that session is ever drawn."""
    import io

    from PIL import Image
    from playwright.sync_api import Error

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            grey = np.asarray(Image.open(io.BytesIO(viewport.screenshot())).convert("L"))
        except Error:  # the canvas is replaced while OHIF lays out its viewports
            grey = np.zeros((1, 1))
        if (grey > 40).sum() > 5000:
            return
        time.sleep(0.5)
    raise AssertionError(f"OHIF showed no image within {seconds} s")


def test_ohif_point_prompt_shows_an_overlay_on_the_clicked_slice(site, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    shots = tmp_path / "screenshots"
    shots.mkdir()
    requests_seen, console = [], []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(60_000)
            page.on("request", lambda r: requests_seen.append(r.post_data or "") if "/infer/" in r.url else None)
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
            page.goto(f"{site.url}/ohif/")
            page.get_by_role("button", name="Confirm and Hide").click()
            page.get_by_text("MNI152-b").first.click()  # the study list shows the PACS's studies
            page.get_by_role("button", name="MONAI Label").click()  # the study opens in the MONAI Label mode
            viewport = page.locator(".cornerstone-canvas").first
            wait_for_the_image(viewport)
            server = page.locator("#monailabelServerURL")
            server.fill(site.url + "/")
            server.locator("xpath=../..").locator("button.actionButton").click()
            page.get_by_text("Point Prompts").click()
            page.locator("tr.clickable-row", has_text="white_matter").click()
            box = viewport.bounding_box()
            page.mouse.click(box["x"] + box["width"] * 0.35, box["y"] + box["height"] * 0.45)
            time.sleep(1)
            before = viewport.screenshot(path=str(shots / "before.png"))
            with page.expect_response(lambda r: "/infer/multiverseg" in r.url, timeout=120_000) as answer:
                page.get_by_title("Run PointPrompts").click()
            assert answer.value.status == 200
            after, deadline = b"", time.monotonic() + 30
            while time.monotonic() < deadline:  # the overlay is drawn a moment after the answer
                after = viewport.screenshot(path=str(shots / "after.png"))
                if green_pixels(after) > 1000:
                    break
                time.sleep(0.5)
            page.screenshot(path=str(shots / "viewer.png"))
            page.get_by_text("Active Learning").click()  # next sample: the unlabelled series, by its UIDs
            page.get_by_role("button", name="Next Sample").click()
            page.get_by_text("Active Learning - Next Sample").wait_for()
            offered = page.get_by_text(site.series[1])
            offered.wait_for()
            page.screenshot(path=str(shots / "next_sample.png"))
        finally:
            browser.close()
            (shots / "console.log").write_text("\n".join(console))
    params = json.loads(requests_seen[-1].split("\r\n\r\n", 1)[1].split("\r\n", 1)[0])
    assert params["result_compress"] is False and len(params["foreground"][0]) == 3
    errors = [line for line in console if "Error" in line]
    assert green_pixels(before) < 300 and green_pixels(after) > 1000, (green_pixels(before), green_pixels(after), errors)
    print(f"OHIF screenshots: {shots}")


def _new_series(site: Site, folder: Path, patient: str, keep=None) -> str:
    """Another copy of the sample volume stored in the PACS (``keep``: change its files first)."""
    files = _make_dicom().write_series(SAMPLE, folder, patient=patient)
    if keep is not None:
        files = keep(files)
    upload(site.dicomweb, files)
    return _series_uid(files[0])


def test_where_segments_overlap_the_newest_save_wins_and_strange_names_are_refused(site, tmp_path):
    """An older SEG's segment was painted over the newest save where they overlapped (segments went in name
    order); and a save naming labels the server does not have was stored for good (nothing is deleted from
    the PACS), shadowing the image's real labels from then on."""
    c = _new_series(site, tmp_path / "series_c", "MNI152-c")
    truth = np.asarray(TRUTH.dataobj).astype(np.uint8)
    assert save_label(site, c, truth).status_code == 200
    fixed = np.isin(truth, (1, 2)).astype(np.uint8)  # the user relabels the grey matter as white matter
    assert save_label(site, c, fixed, [{"name": "white_matter", "idx": 1}]).status_code == 200
    r = requests.get(f"{site.url}/datastore/label?label={c}&tag=final", timeout=60)
    path = tmp_path / "back.nii.gz"
    path.write_bytes(r.content)
    info = requests.get(f"{site.url}/datastore/label/info?label={c}&tag=final", timeout=30).json()
    value = {item["name"]: item["idx"] for item in info["label_info"]}
    np.testing.assert_array_equal(np.asarray(nib.load(str(path)).dataobj) == value["white_matter"], fixed == 1)
    assert isinstance(info["ts"], int) and abs(info["ts"] - time.time()) < 2 * 86400  # seconds, as on a folder
    r = requests.put(f"{site.url}/datastore/label/info?label={c}&tag=final", data={"info": '{"note": "x"}'},
                     timeout=30)
    assert r.status_code == 405 and "SEG" in r.json()["detail"], r.text  # it said 404: not found
    before = segs_in_pacs(site)
    for label, described in [(fixed, [{"name": "tumour", "idx": 1}]), (truth * 3, None)]:  # 3, 6: label_3, label_6
        r = save_label(site, c, label, described) if described else save_label(site, c, label, [])
        assert r.status_code == 422 and "not this server's" in r.json()["detail"], r.text
    r = save_label(site, c, truth, [{"name": "white_matter", "idx": 1}])  # its other values were dropped unsaid
    assert r.status_code == 422 and "no name in label_info" in r.json()["detail"], r.text
    assert segs_in_pacs(site) == before
    r = requests.put(f"{site.url}/datastore/image?image=uploaded", files={"file": ("x.nii.gz", path.read_bytes())},
                     data={"params": "{}"}, timeout=30)
    assert r.status_code == 405, r.text  # images come from the PACS; the upload was kept, never listed


def test_a_series_that_is_no_volume_is_a_422_and_never_the_next_sample(site, tmp_path):
    """A series whose instances hold no pixels: a click, a download or a save answered 500, and so did the
    default next-sample strategy, for every image, as the whole scoring pass failed on it."""
    import pydicom

    def without_pixels(files):
        for f in files[:3]:
            ds = pydicom.dcmread(str(f))
            del ds.PixelData
            ds.save_as(str(f))
        return files[:3]

    bad = _new_series(site, tmp_path / "series_nopixels", "MNI152-nopixels", keep=without_pixels)
    r = click(site, bad, [40, 40, 1])
    assert r.status_code == 422 and "cannot be read as a volume" in r.json()["detail"], r.text
    unlabelled = requests.get(f"{site.url}/datastore/?output=all", timeout=60).json()["objects"]
    unlabelled = [i for i, record in unlabelled.items() if not record["labels"]]
    for k in range(len(unlabelled) + 1):  # each client takes one image from the others: at last only it is left
        r = requests.post(f"{site.url}/activelearning/nearest", json={"client_id": f"scorer{k}"}, timeout=120)
        assert r.status_code == 200 and r.json().get("id") != bad, r.text
