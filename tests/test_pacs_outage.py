"""The PACS datastore when the PACS fails: the session's circuit breaker, listings that stand in, and a series
download cut short (Orthanc sends no length, so a dropped connection can look like a complete answer).
Fast: loopback sockets and a stand-in DICOMweb client, no Orthanc (tests/test_pacs.py has the real one)."""

from __future__ import annotations

import socket
import sys
import threading
import time

import pydicom
import pytest
import requests
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from bench.bench_server import free_port

from .conftest import ROOT

sys.path.insert(0, str(ROOT / "apps" / "multiverseg"))

from mvlabel import dicomweb  # noqa: E402
from mvlabel.guard import pacs_unreachable  # noqa: E402


@pytest.fixture
def quick_pause(monkeypatch):
    monkeypatch.setattr(dicomweb, "PACS_PAUSE", 0.3)


def test_after_a_failure_calls_fail_at_once_then_one_call_asks_again(quick_pause):
    session = dicomweb.PacsSession()
    port = free_port()  # nothing listens: refused
    url = f"http://127.0.0.1:{port}/dicom-web/series"
    with pytest.raises(requests.ConnectionError):
        session.get(url)
    t0 = time.perf_counter()
    with pytest.raises(requests.ConnectionError, match="a moment ago"):
        session.get(url)  # within the pause: not asked at all
    assert time.perf_counter() - t0 < 0.05

    hung = socket.socket()  # the PACS comes back hung: accepts, never answers
    hung.bind(("127.0.0.1", port))
    hung.listen(8)
    time.sleep(0.35)
    try:
        outcome = {}

        def ask():
            try:
                session.get(url, timeout=(1, 1))
            except requests.RequestException as e:
                outcome["error"] = e

        probe = threading.Thread(target=ask)
        probe.start()  # after the pause, one call asks again ...
        time.sleep(0.2)
        t0 = time.perf_counter()
        with pytest.raises(requests.ConnectionError, match="a moment ago"):
            session.get(url)  # ... while the others still fail at once
        assert time.perf_counter() - t0 < 0.05
        probe.join(timeout=5)
        assert "error" in outcome  # it timed out: the pause starts again
        with pytest.raises(requests.ConnectionError, match="a moment ago"):
            session.get(url)
    finally:
        hung.close()


def test_a_gateway_answer_of_503_counts_as_a_failure(quick_pause):
    import http.server

    class Gateway(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(503)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Gateway)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        session = dicomweb.PacsSession()
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        assert session.get(url).status_code == 503
        with pytest.raises(requests.ConnectionError, match="a moment ago"):
            session.get(url)
    finally:
        server.shutdown()
        server.server_close()


def test_answers_cut_mid_way_count_as_the_pacs_down():
    import urllib3

    assert pacs_unreachable(requests.exceptions.ChunkedEncodingError("Connection broken: IncompleteRead"))
    try:
        try:
            raise urllib3.exceptions.ProtocolError("Connection broken")
        except Exception as e:
            raise RuntimeError("proxy failed") from e
    except RuntimeError as e:
        assert pacs_unreachable(e)
    assert not pacs_unreachable(ValueError("a bad request"))


class StandInClient:
    """What PacsDatastore asks of a DICOMweb client, from memory; ``down`` makes every call refused."""

    base_url = "http://stand-in.invalid/dicom-web"

    def __init__(self, series: str, study: str, instances: list[Dataset], listed: int):
        self.series, self.study, self.instances, self.listed, self.down = series, study, instances, listed, False

    def _answer(self):
        if self.down:
            raise requests.ConnectionError("refused")

    def search_for_series(self, search_filters=None, **kw):
        self._answer()
        if (search_filters or {}).get("Modality") == "SEG":
            return []
        item = Dataset()
        item.SeriesInstanceUID, item.StudyInstanceUID, item.Modality = self.series, self.study, "MR"
        return [item.to_json_dict()]

    def search_for_instances(self, study, series, fields=None, **kw):
        self._answer()
        return [{}] * self.listed

    def retrieve_series(self, study, series, **kw):
        self._answer()
        return list(self.instances)


def _instance(series: str, study: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.MRImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.Modality = pydicom.uid.MRImageStorage, series, study, "MR"
    return ds


def test_a_series_cut_short_is_not_cached_and_listings_stand_in_while_the_pacs_is_down(tmp_path):
    series, study = generate_uid(), generate_uid()
    client = StandInClient(series, study, [_instance(series, study) for _ in range(3)], listed=5)
    store = dicomweb.PacsDatastore(client, None, str(tmp_path / "cache"), ["white_matter"], list_ttl=0.0)
    assert store.list_images() == [series] and store.get_labeled_images() == []
    with pytest.raises(requests.ConnectionError, match="3 of its 5 instances"):
        store._download(study, series)
    assert not any(p.name.startswith(series) for p in (tmp_path / "cache").glob("*-mvseg/series/*"))

    client.down = True  # the listing seen last stands in: images already here stay usable
    assert store.list_images() == [series] and store.has_image(series)
    assert store.get_labeled_images() == []
    fresh = dicomweb.PacsDatastore(client, None, str(tmp_path / "cache2"), ["white_matter"], list_ttl=0.0)
    with pytest.raises(requests.ConnectionError):  # nothing seen yet: nothing to stand in
        fresh.list_images()


def test_a_series_the_last_listing_lacks_is_not_taken_for_deleted_while_the_pacs_is_down(tmp_path):
    """While the PACS was down, a series stored after the last listing answered 404 'not in the PACS': OHIF
    and Slicer took it for gone. It is 503, as for everything else the PACS must answer."""
    from mvlabel.errors import BadRequest

    series, study = generate_uid(), generate_uid()
    client = StandInClient(series, study, [_instance(series, study)], listed=1)
    store = dicomweb.PacsDatastore(client, None, str(tmp_path / "cache"), ["white_matter"], list_ttl=0.0)
    assert store.list_images() == [series]
    client.down = True
    newer = generate_uid()
    with pytest.raises(BadRequest) as refused:
        store.get_image_uri(newer)
    assert refused.value.status == 503
    with pytest.raises(BadRequest):
        store.has_image(newer)  # not known either way
    client.down = False  # the listing answers again (list_ttl 0: it is asked every time)
    with pytest.raises(BadRequest) as refused:
        store.get_image_uri(newer)
    assert refused.value.status == 404 and not store.has_image(newer)
