"""A DICOMweb PACS as the datastore: images are series, ``final`` labels are DICOM SEG series in the PACS.

MONAI Label 0.8.5's ``DICOMWebDatastore`` is the base (its client, its local cache for other tags), with
what an annotation server needs done differently:

* **Labels are found by their SEG series for the image.** Every save stores a new SEG series in the PACS
  and nothing replaces the old ones, so an image's ``final`` label is built, per segment label (label
  name), from the newest SEG that holds that segment; SEG metadata is read once per SEG (it never changes).
* **A SEG is resampled onto the image grid.** A SEG read back covers only the slices that hold the
  segment; each segment is placed on the image's own grid (same geometry, nearest neighbour).
* **One download per series at a time**, into a temporary folder renamed when complete; the conversion to
  NIfTI is written beside it and renamed too. A request and the background scorer asking for the same
  series share one download, and a half-written file never stays in the cache.
* **A save is visible at once**: the new SEG joins the index as it is stored, and series listings are kept
  only ``list_ttl`` seconds (other writers to the PACS show up within that time).
* **Every imaging modality is listed** unless ``MONAI_LABEL_DICOMWEB_SEARCH_FILTER`` is set: series of
  non-image modalities (SEG, SR, PR, ...) are left out, instead of MONAI Label's default of CT only.
* **Ids are series UIDs and nothing else**: a name that is not a listed series is refused before any
  path is built from it.
* **A PACS that is down gets a quick 503**, not a 500 after half a minute (the DICOMweb client's retries):
  requests to it time out, and after a failure they fail at once while one asks again (the circuit breaker
  of :class:`PacsSession`, which also serves MONAI Label's ``/proxy/dicom``, OHIF's reads). Meanwhile the
  last listings stand in, so images already downloaded stay usable; a download cut short (Orthanc sends
  no length: a dropped connection looks complete) is caught by counting its instances, never cached.
* **A model's proposals** (labels saved under a tag other than ``final``, e.g. batch pre-segmentations) go to
  the PACS as SEGs whose series description is ``MultiverSeg proposal: <tag>``, never read as final labels;
  their provenance stays in the local cache, where the series is linked in as an image.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections import defaultdict
from contextlib import suppress
from dataclasses import dataclass, replace
from typing import Any, Optional

import nibabel as nib
import numpy as np
import pydicom
import requests
import SimpleITK as sitk
from fastapi import HTTPException
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore
from monailabel.datastore.utils.convert import nifti_to_dicom_seg
from monailabel.datastore.utils.dicom import dicom_web_download_series, dicom_web_upload_dcm
from pydicom.dataset import Dataset
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from .contextstore import label_masks
from .errors import BadRequest
from .guard import DICOM_INFO, PACS_DOWN, pacs_unreachable, remove_after_response
from .imageio import check_label_values, read_image, read_label, uploads_removed_when_refused
from .localstore import OneSavePerImage, public_datalist, public_image_info, write_dataset_archive

log = logging.getLogger(__name__)

FINAL = "final"
NON_IMAGE = {"SEG", "SR", "PR", "KO", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "REG", "DOC", "FID", "PLAN"}
SEG_WRITER = "itkimage2segimage"
# series description of a SEG that is a model's proposal under a tag (batch pre-segmentation), not a final
# label: "MultiverSeg proposal: original". Any other SEG that references an image is a final label.
PROPOSAL = "MultiverSeg proposal: "  # dcmqi's tool, which MONAI Label's SEG writer runs
UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
PACS_TIMEOUT = (5.0, 30.0)  # seconds to connect, seconds between bytes of an answer
PACS_RETRIES = 2  # more tries of a connection the PACS refused, within half a second (never of a timeout)
PACS_PAUSE = 5.0  # seconds after a failure during which requests to the PACS fail at once


class PacsSession(requests.Session):
    """A requests session for the PACS, with a circuit breaker.

    Calls time out (``PACS_TIMEOUT`` unless a call says otherwise) and a refused connection is tried again
    twice. Once the PACS has failed (no connection, a timeout, a gateway's 502/503/504), calls fail at once
    for ``PACS_PAUSE`` s; then one call at a time asks it again while the others keep failing at once, until
    one gets an answer. So a PACS that hangs holds one request per pause, not every request for the
    timeout, each on a worker thread.
    """

    def __init__(self):
        super().__init__()
        retry = Retry(total=PACS_RETRIES, connect=PACS_RETRIES, read=0, status=0, other=0, redirect=5,
                      backoff_factor=0.1, allowed_methods=None, raise_on_status=False)
        for prefix in ("http://", "https://"):
            self.mount(prefix, HTTPAdapter(max_retries=retry))
        self._state = threading.Lock()
        self.failed_at: Optional[float] = None  # monotonic time of the last failure; None while it answers
        self._probing = False

    def request(self, method, url, **kwargs):
        with self._state:
            probe = False
            if self.failed_at is not None:
                if self._probing or time.monotonic() - self.failed_at < PACS_PAUSE:
                    raise requests.ConnectionError("the PACS did not answer a moment ago (asked again shortly)")
                self._probing = probe = True
        kwargs.setdefault("timeout", PACS_TIMEOUT)
        try:
            response = super().request(method, url, **kwargs)
        except (requests.ConnectionError, requests.Timeout):
            self._answered(False, probe)
            raise
        self._answered(response.status_code not in (502, 503, 504), probe)
        return response

    def _answered(self, ok: bool, probe: bool) -> None:
        with self._state:
            self.failed_at = None if ok else time.monotonic()
            if probe:
                self._probing = False


@dataclass(frozen=True)
class SegRecord:
    """What the index keeps of one SEG series (read once from its metadata)."""

    uid: str
    study: str
    image: str  # the referenced image series
    when: str  # sortable creation time: newest wins
    segments: tuple  # ((segment number, segment label), ...)
    order: int = 0  # when it was first seen here: breaks ties of SEGs stored within one second
    tag: str = "final"  # a model's proposal (mvlabel.batch) names its tag in the series description


def _value(meta: Dataset, keyword: str, default: str = "") -> str:
    value = getattr(meta, keyword, None)
    return default if value is None else str(value)


def _seg_record(uid: str, study: str, meta: Dataset) -> Optional[SegRecord]:
    refs = meta.get("ReferencedSeriesSequence")
    if not refs:
        log.warning("SEG %s names no referenced series: ignored", uid)
        return None
    when = "".join(
        _value(meta, k).ljust(w, "0")[:w]
        for k, w in (("SeriesDate", 8), ("SeriesTime", 13), ("ContentDate", 8), ("ContentTime", 13))
    )
    segments = tuple(
        (int(s.SegmentNumber), str(getattr(s, "SegmentLabel", f"segment_{int(s.SegmentNumber)}")))
        for s in meta.get("SegmentSequence", [])
    )
    description = _value(meta, "SeriesDescription")
    tag = description[len(PROPOSAL):] if description.startswith(PROPOSAL) else FINAL
    return SegRecord(uid, study, str(refs[0].SeriesInstanceUID), when, segments, tag=tag)


def _epoch(when: str) -> Optional[int]:
    """A :attr:`SegRecord.when` as seconds since the epoch, as a folder datastore's label info holds its ``ts``
    (its date and time as this server's local time, which dcmqi writes here); None when the SEG names none."""
    try:
        return int(time.mktime(time.strptime(when[:14], "%Y%m%d%H%M%S")))
    except (ValueError, OverflowError):
        return None


class PacsDatastore(DICOMWebDatastore):
    """MONAI Label datastore over a DICOMweb PACS (see the module docstring).

    Args:
        client: a ``DICOMwebClient`` for the PACS's DICOMweb root. search_filter: QIDO filter for the image
            series (None: every series of an imaging modality). cache_path: local cache folder (None:
            MONAI Label's default). names: the app's label names, for labels saved without ``label_info``.
        list_ttl: seconds a listing of the PACS's series is reused.
    """

    hide_paths = False  # the app sets it when authentication is on

    def __init__(self, client, search_filter: Optional[dict], cache_path: Optional[str], names: list[str],
                 fetch_by_frame: bool = False, list_ttl: float = 10.0):
        super().__init__(client, search_filter or {}, cache_path, fetch_by_frame, convert_to_nifti=True)
        self.names = list(names)
        self.list_ttl = list_ttl
        # beside MONAI Label's cache folder, not in it: its file watcher need not see these writes
        self.root = root = os.path.realpath(self._datastore_path) + "-mvseg"
        self.series_dir = os.path.join(root, "series")
        self.labels_dir = os.path.join(root, "labels")  # one folder per tag
        for folder in (self.series_dir, self.labels_dir):
            os.makedirs(folder, exist_ok=True)
        self._filter = search_filter
        self._guard = threading.Lock()
        self._series_locks: dict[str, threading.RLock] = defaultdict(threading.RLock)
        # when, image series (None before the first listing), {uid: DICOM_INFO}
        self._listed: tuple[float, Optional[list[str]], dict] = (0.0, None, {})
        self._segs: dict[str, SegRecord] = {}  # every SEG the PACS holds, by its series UID
        self._segs_listed = 0.0
        self._seg_seen: dict[str, float] = {}  # when each SEG entered the index (monotonic)
        self._seg_count = 0  # SEGs remembered so far: each record's ``order``
        self._unusable: set[str] = set()  # SEGs that could not be read: never a label
        self._one_save = OneSavePerImage()  # two saves of one image at once: the second is refused (409)
        self._labels: dict[tuple, tuple[tuple, str, dict]] = {}  # (image, tag) -> (SEG uids, file, label info)
        # image -> (digest of the label, SEG series UID) of a store whose answer was lost: it may be in the PACS
        self._unanswered: dict[str, tuple[str, str]] = {}
        self._relisted = 0.0  # when an unknown series id last made the listing be asked again
        self._stood_in = False  # the PACS did not answer the last listing: the one before stands in

    def _lock(self, key: str) -> threading.RLock:
        with self._guard:
            return self._series_locks[key]

    # -- listing ------------------------------------------------------------------------------------

    def _list(self) -> tuple[list[str], dict]:
        with self._guard:
            at, series, studies = self._listed
            if time.monotonic() - at < self.list_ttl:
                return series, studies
        found = self._search_series(self._filter or {}, series is not None, "the last listing of its series")
        self._stood_in = found is None
        if found is None:
            return series, studies
        series, studies = [], {}
        for item in found:
            meta = Dataset.from_json(item)
            if self._filter is None and _value(meta, "Modality").upper() in NON_IMAGE:
                continue
            uid = _value(meta, "SeriesInstanceUID")
            series.append(uid)
            studies[uid] = {k: _value(meta, k) for k in DICOM_INFO}
        with self._guard:
            self._listed = (time.monotonic(), series, studies)
        return series, studies

    def _search_series(self, filters: dict, seen: bool, stand_in: str) -> Optional[list]:
        """A QIDO series search; None where the PACS does not answer and a listing it gave before (``seen``)
        stands in, so images already downloaded stay usable."""
        try:
            # every page: a SEG missing from a capped listing would be taken for deleted
            return self._client.search_for_series(search_filters=filters, get_remaining=True)
        except Exception as e:
            if not (seen and pacs_unreachable(e)):
                raise
            log.warning("the PACS did not answer (%s): %s stands in", e, stand_in)
            return None

    def list_images(self) -> list[str]:
        return list(self._list()[0])

    def _seg_index(self) -> dict[str, SegRecord]:
        """Every SEG series in the PACS (listing reused for ``list_ttl`` s, metadata read once per SEG)."""
        with self._guard:
            fresh = time.monotonic() - self._segs_listed < self.list_ttl
        if not fresh:
            started = time.monotonic()
            found = self._search_series({"Modality": "SEG"}, bool(self._segs_listed), "what it listed of its SEGs")
            listed = set()
            for item in found or ():
                meta = Dataset.from_json(item)
                uid, study = _value(meta, "SeriesInstanceUID"), _value(meta, "StudyInstanceUID")
                listed.add(uid)
                if uid not in self._segs:
                    self._remember_seg(uid, study)
            if found is not None:
                with self._guard:
                    # a SEG deleted from the PACS is no label any more (one stored during the search stays)
                    for uid in [u for u in self._segs if u not in listed and self._seg_seen.get(u, 0) < started]:
                        log.info("SEG %s is no longer in the PACS: its label is gone", uid)
                        del self._segs[uid]
                        self._seg_seen.pop(uid, None)
                    self._segs_listed = time.monotonic()
        return dict(self._segs)

    def _remember_seg(self, uid: str, study: str) -> None:
        try:
            meta = Dataset.from_json(self._client.retrieve_series_metadata(study, uid)[0])
        except Exception as e:  # one unreadable SEG must not hide the others
            log.warning("SEG %s: metadata not readable: %s", uid, e)
            return
        record = _seg_record(uid, study, meta)
        if record is not None:
            with self._guard:
                self._segs[uid] = replace(record, order=self._seg_count)
                self._seg_count += 1
                self._seg_seen[uid] = time.monotonic()

    def _current_segs(self, image_id: str, tag: str = FINAL) -> dict[str, SegRecord]:
        """``{segment label: newest SEG holding it}`` for one image and tag."""
        newest: dict[str, SegRecord] = {}
        for record in sorted(self._seg_index().values(), key=lambda r: (r.when, r.order)):
            if record.image == image_id and record.tag == tag and record.uid not in self._unusable:
                for _, name in record.segments:
                    newest[name] = record
        return newest

    def get_labeled_images(self, label_tag: Optional[str] = None, labels: Optional[list] = None) -> list[str]:
        if label_tag not in (None, FINAL):
            return LocalDatastore.get_labeled_images(self, label_tag, labels)
        images = set(self.list_images())
        return sorted({r.image for r in self._seg_index().values() if r.image in images and r.tag == FINAL})

    def get_unlabeled_images(self, label_tag: Optional[str] = None, labels: Optional[list] = None) -> list[str]:
        labelled = set(self.get_labeled_images(label_tag, labels))
        return [i for i in self.list_images() if i not in labelled]

    def _check_id(self, image_id: str) -> str:
        if not isinstance(image_id, str) or not UID.match(image_id) or len(image_id) > 64:
            raise BadRequest(f"'{image_id}' is not a series UID of this PACS", 404)
        series, studies = self._list()
        if image_id not in studies:
            with self._guard:  # a series stored a moment ago: look once more (at most once a second)
                if time.monotonic() - self._relisted > 1.0:
                    self._relisted = time.monotonic()
                    self._listed = (0.0,) + self._listed[1:]
            series, studies = self._list()
            if image_id not in studies and self._stood_in:
                raise BadRequest(PACS_DOWN, 503)
        if image_id not in studies:
            raise BadRequest(f"series '{image_id}' is not in the PACS (or not listed by the search filter)", 404)
        return studies[image_id]["StudyInstanceUID"]

    def has_image(self, image_id: str) -> bool:
        """Whether the PACS lists the series (nothing is downloaded)."""
        try:
            self._check_id(image_id)
            return True
        except BadRequest as e:
            if e.status == 503:  # the PACS did not answer: not known either way
                raise
            return False

    # -- images -------------------------------------------------------------------------------------

    def get_image_uri(self, image_id: str) -> str:
        """The series as a NIfTI volume in the cache, downloaded and converted once (one thread at a time)."""
        study = self._check_id(image_id)
        target = os.path.join(self.series_dir, f"{image_id}.nii.gz")
        with self._lock(image_id):
            if not os.path.exists(target):
                t0 = time.perf_counter()
                folder = self._download(study, image_id)
                t1 = time.perf_counter()
                reader = sitk.ImageSeriesReader()
                try:
                    reader.SetFileNames(reader.GetGDCMSeriesFileNames(folder))
                    image = reader.Execute()
                except RuntimeError as e:  # no pixel data, slices of different sizes, not an image at all
                    reason = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
                    raise BadRequest(f"series '{image_id}' cannot be read as a volume: {reason}", 422) from None
                _write_atomic(image, target)
                log.info("series %s: downloaded in %.2f s, converted in %.2f s", image_id, t1 - t0,
                         time.perf_counter() - t1)
            self._register_local(image_id, target)
        return target

    def _register_local(self, image_id: str, path: str) -> None:
        """Make the series an image of MONAI Label's local cache datastore too (a hard link, no copy), so
        its info (scores) and the labels of other tags (a model's proposals) have an image to belong to."""
        local = os.path.join(os.path.realpath(self._datastore_path), f"{image_id}.nii.gz")
        if not os.path.exists(local):
            try:
                os.link(path, local)
            except OSError:  # another filesystem: a copy, renamed into place
                shutil.copyfile(path, local + ".tmp")
                os.replace(local + ".tmp", local)
        if image_id not in self._datastore.objects:
            self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info={}, ext=".nii.gz"))

    def _download(self, study: str, series: str) -> str:
        """The series' DICOM files in ``series_dir/<uid>/`` (complete, or not there at all)."""
        folder = os.path.join(self.series_dir, series)
        if os.path.isdir(folder) and os.listdir(folder):
            return folder
        partial = tempfile.mkdtemp(prefix=f"{series}.", suffix=".part", dir=self.series_dir)
        try:
            dicom_web_download_series(study, series, partial, self._client, self._fetch_by_frame)
            # a connection that drops mid-answer can look like a complete one (Orthanc sends no length)
            expected = len(self._client.search_for_instances(study, series, fields=["SOPInstanceUID"]))
            arrived = len(os.listdir(partial))
            if arrived < expected:
                raise requests.ConnectionError(f"series {series}: {arrived} of its {expected} instances arrived")
            os.replace(partial, folder)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        return folder

    def get_image_info(self, image_id: str) -> dict:
        """The series' DICOM identity (what OHIF's next sample shows and opens) and the app's own info."""
        self._check_id(image_id)
        try:
            info = dict(LocalDatastore.get_image_info(self, image_id) or {})
        except Exception:  # nothing stored locally for it yet
            info = {}
        info.update(self._list()[1][image_id])  # the PACS's identity wins over anything stored here
        return public_image_info(info, self.hide_paths)

    # -- labels -------------------------------------------------------------------------------------

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        """The image's label built from its newest SEG per segment label ("" when it has none); a proposal
        saved by this server is read from the local cache first. ``label_id`` is the image series (as the
        local datastore names labels) or a SEG series."""
        if label_tag != FINAL and self._cached(label_id, label_tag):
            return LocalDatastore.get_label_uri(self, label_id, label_tag)
        record = self._segs.get(label_id)
        image_id = record.image if record is not None else (image_id or label_id)
        built = self._build_label(image_id, label_tag)
        return built[1] if built else ""

    def get_label_info(self, label_id: str, label_tag: str) -> dict:
        if label_tag != FINAL and self._cached(label_id, label_tag):
            return LocalDatastore.get_label_info(self, label_id, label_tag)
        built = self._build_label(label_id, label_tag)
        return dict(built[2]) if built else {}

    def update_label_info(self, label_id: str, label_tag: str, info: dict) -> None:
        """A model's proposal keeps its info here; a final label's comes from its SEGs in the PACS, which
        are never changed (MONAI Label answered 404 'not found' for a label that is there)."""
        if label_tag != FINAL:
            if not self._cached(label_id, label_tag):
                raise HTTPException(status_code=404, detail=f"this server keeps no '{label_tag}' label of '{label_id}'")
            return LocalDatastore.update_label_info(self, label_id, label_tag, info)
        if self._build_label(label_id, label_tag) is None:
            raise HTTPException(status_code=404, detail=f"image '{label_id}' has no '{label_tag}' label")
        raise HTTPException(status_code=405, detail="a final label's info on a PACS is its SEGs' (names, "
                                                    "time), which this server never changes")

    def _cached(self, image_id: str, tag: str) -> bool:
        obj = self._datastore.objects.get(image_id)
        return obj is not None and tag in obj.labels

    def _build_label(self, image_id: str, tag: str = FINAL) -> Optional[tuple[tuple, str, dict]]:
        """(SEG uids, NIfTI path, label info) of an image's current label of ``tag``, rebuilt when its SEGs
        change. A SEG that cannot be read (malformed, stored by another system) is logged and left out for
        good: the label is built from the others, an older SEG of its segment if there is one."""
        while True:
            try:
                return self._assemble_label(image_id, tag)
            except _UnusableSeg as e:
                log.warning("SEG %s of %s cannot be read, it is left out: %s", e.uid, image_id, e.reason)
                self._unusable.add(e.uid)

    def _assemble_label(self, image_id: str, tag: str) -> Optional[tuple[tuple, str, dict]]:
        current = self._current_segs(image_id, tag)
        if not current:
            return None
        names = sorted(current, key=lambda n: (self.names.index(n) if n in self.names else len(self.names), n))
        key = tuple(current[n].uid for n in names)
        hit = self._labels.get((image_id, tag))
        if hit and hit[0] == key and os.path.exists(hit[1]):
            return hit
        with self._lock(image_id):
            image = sitk.ReadImage(self.get_image_uri(image_id))
            labelmap = np.zeros(sitk.GetArrayViewFromImage(image).shape, np.uint8)
            segments = {}
            values = {name: idx for idx, name in enumerate(names, start=1)}
            # the oldest SEG first: where segments overlap, the newest save wins
            for name in sorted(names, key=lambda n: (current[n].when, current[n].order)):
                idx, record = values[name], current[name]
                number = next(n for n, label in record.segments if label == name)
                folder = self._download(record.study, record.uid)  # its failures are the PACS's, not the SEG's
                try:
                    if record.uid not in segments:
                        segments[record.uid] = _read_seg(folder)
                    mask = _on_grid(segments[record.uid][number], image)
                except (MemoryError, OSError):
                    raise
                except Exception as e:
                    raise _UnusableSeg(record.uid, f"{type(e).__name__}: {e}") from None
                labelmap[mask] = idx
            out = sitk.GetImageFromArray(labelmap)
            out.CopyInformation(image)
            os.makedirs(os.path.join(self.labels_dir, tag), exist_ok=True)
            path = os.path.join(self.labels_dir, tag, f"{image_id}.nii.gz")
            _write_atomic(out, path)
            info = {
                "label_info": [{"name": n, "idx": i} for i, n in enumerate(names, start=1)],
                "segs": list(key),
                "ts": _epoch(max(current[n].when for n in names)),
            }
            self._labels[(image_id, tag)] = (key, path, info)
            return self._labels[(image_id, tag)]

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict,
                   label_id: str = "") -> str:
        """``final``: stored in the PACS as a new DICOM SEG (segment labels = label names); other tags stay
        in the local cache. The label is checked against the image before anything is stored."""
        try:
            with uploads_removed_when_refused(label_filename), self._one_save(image_id):
                return self._save(image_id, label_filename, label_tag, label_info)
        except BadRequest as e:  # the datastore endpoint calls this directly: answer 4xx, not 500
            raise HTTPException(status_code=e.status, detail=f"label not saved: {e}") from None

    def remove_label(self, label_id, label_tag):
        raise HTTPException(status_code=405, detail="labels are not deleted from the PACS; save a new one to "
                                                    "replace it (the newest SEG per label is the current one)")

    def remove_image(self, image_id):
        raise HTTPException(status_code=405, detail="images are not deleted from the PACS through this server")

    def add_image(self, image_id, image_filename, image_info):
        with uploads_removed_when_refused(image_filename):  # it was stored in the cache, never listed or used
            raise HTTPException(status_code=405, detail="images come from the PACS: store them there (DICOMweb "
                                                        "STOW-RS, C-STORE), and this server lists them")

    def _save(self, image_id: str, label_filename: str, label_tag: str, label_info: dict) -> str:
        image_uri = self.get_image_uri(image_id)
        image = read_image(image_uri)
        if label_filename.endswith(".bin"):  # OHIF: the raw voxel buffer in the image's (Fortran) order
            label = np.fromfile(label_filename, np.uint8)
            if label.size != int(np.prod(image.shape)):
                raise BadRequest(f"label has {label.size} voxels but the image has {int(np.prod(image.shape))}", 422)
            label = label.reshape(image.shape, order="F").astype(np.int32)
        else:
            label = read_label(label_filename, image)
        check_label_values(label)
        if label_tag != FINAL:  # a model's proposal: in the PACS to view, its provenance in the local cache
            if label.any():
                try:
                    self._store_seg(image_id, image, label, label_info, PROPOSAL + label_tag)
                except BadRequest as e:
                    if e.status != 422:
                        raise
                    log.warning("proposal for %s kept here only, not in the PACS: %s", image_id, e)
            fd, path = tempfile.mkstemp(suffix=".nii.gz")
            os.close(fd)
            try:
                nib.save(nib.Nifti1Image(label.astype(np.uint8), image.affine), path)
                return LocalDatastore.save_label(self, image_id, path, label_tag, label_info)
            finally:
                os.unlink(path)
        return self._store_seg(image_id, image, label, label_info, "MultiverSeg")

    def _store_seg(self, image_id: str, image, label: np.ndarray, label_info: dict, description: str) -> str:
        """Write ``label`` as a new DICOM SEG of the image's study and store it in the PACS; its series UID."""
        if not shutil.which(SEG_WRITER):
            raise BadRequest(f"{SEG_WRITER} is not installed on the server (pip install dcmqi)", 503)
        segments = list(label_masks(label, label_info, self.names).items())
        if not segments:
            raise BadRequest("the label is empty: nothing to store", 422)
        unknown = [name for name, _ in segments if name not in self.names]
        if unknown:  # a SEG is never deleted through this server: a stray name would stay an image's for good
            raise BadRequest(f"label names {unknown[:5]} are not this server's ({', '.join(self.names)}): on a PACS "
                             "every saved segment stays; name each value in label_info with a configured label", 422)
        unnamed = np.unique(label[(label != 0) & ~np.logical_or.reduce([mask for _, mask in segments])])
        if unnamed.size:  # a SEG holds named segments only: these voxels would be dropped without a word
            raise BadRequest(f"label values {unnamed[:5].tolist()} have no name in label_info: on a PACS only named "
                             "segments are stored; give each value's name and 'idx'", 422)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            labelmap = np.zeros(label.shape, np.uint16)
            for value, (name, mask) in enumerate(segments, start=1):
                labelmap[mask] = value
            path = os.path.join(tmp, "label.nii.gz")
            nib.save(nib.Nifti1Image(labelmap, image.affine), path)
            described = [{"name": n, "idx": v} for v, (n, _) in enumerate(segments, start=1)]
            described[0]["model_name"] = description  # becomes the SEG's series description
            digest = hashlib.sha256(repr((labelmap.shape, described)).encode() + labelmap.tobytes()).hexdigest()
            if (stored := self._stored_unanswered(image_id, digest)) is not None:
                return stored
            series_dir = os.path.join(self.series_dir, image_id)
            check_seg_grid(series_dir)
            seg_file = nifti_to_dicom_seg(series_dir, path, described)
            if not seg_file or not os.path.exists(seg_file):  # dcmqi failed, and MONAI Label names its file anyway
                raise BadRequest("the label could not be written as DICOM SEG", 422)
            t1 = time.perf_counter()
            try:
                seg_uid = dicom_web_upload_dcm(seg_file, self._client)
            except requests.RequestException as e:
                if not isinstance(e, requests.HTTPError):  # sent, but no answer came: it may be stored
                    written = pydicom.dcmread(seg_file, stop_before_pixels=True).SeriesInstanceUID
                    self._unanswered[image_id] = (digest, str(written))
                raise
            finally:
                with suppress(OSError):
                    os.unlink(seg_file)
        if not seg_uid:
            raise BadRequest("the PACS did not accept the DICOM SEG", 502)
        study = self._check_id(image_id)
        self._remember_seg(seg_uid, study)  # visible at once, whatever the listing cache holds
        log.info("label of %s stored as SEG %s (%s): written in %.2f s, stored in %.2f s", image_id, seg_uid,
                 ", ".join(n for n, _ in segments), t1 - t0, time.perf_counter() - t1)
        return seg_uid

    def _stored_unanswered(self, image_id: str, digest: str) -> Optional[str]:
        """The SEG series UID of this very label when an earlier save of it reached the PACS but its answer was
        lost (the client saves again after a 503): that SEG is the answer, no duplicate is stored."""
        digest_then, uid = self._unanswered.get(image_id, ("", ""))
        if digest_then != digest:
            self._unanswered.pop(image_id, None)  # another label now: it is stored and, being newer, counts
            return None
        found = self._client.search_for_series(search_filters={"SeriesInstanceUID": uid})  # may fail: kept then
        del self._unanswered[image_id]
        if not found:
            return None
        self._remember_seg(uid, self._check_id(image_id))
        log.info("label of %s: already stored as SEG %s by a save whose answer was lost", image_id, uid)
        return uid

    def json(self) -> dict:
        """The listing ``GET /datastore/`` answers: every image series and, where it has SEGs, its final label."""
        objects = {}
        for uid in self.list_images():
            segs = self._current_segs(uid)
            labels = {FINAL: {"ext": ".nii.gz", "info": {"segs": {n: r.uid for n, r in segs.items()}}}} if segs else {}
            objects[uid] = {"image": {"ext": ".nii.gz", "info": self.get_image_info(uid)}, "labels": labels}
        return {"name": self.name(), "objects": objects}

    def status(self) -> dict:
        labelled = self.get_labeled_images()
        return {"total": len(self.list_images()), "completed": len(labelled), "label_tags": {FINAL: len(labelled)}}

    def datalist(self, full_path=True) -> list[dict[str, Any]]:
        cache = os.path.commonpath([self.root, os.path.realpath(self._datastore_path)])  # the series and the labels
        return public_datalist(self._pairs(), cache, self.hide_paths)

    def _pairs(self) -> list[dict[str, str]]:
        """The labelled series and their final labels, as files in this server's cache."""
        return [{"image": self.get_image_uri(i), "label": self.get_label_uri(i, FINAL)}
                for i in self.get_labeled_images()]

    def get_dataset_archive(self, limit_cases):
        """The labelled series and their final labels as NIfTI, zipped in this server's cache folder (one file,
        as the folder datastore's; MONAI Label's left a new temp file per download)."""
        return write_dataset_archive(self._pairs(), limit_cases, os.path.join(self.root, "archive"),
                                     json.dumps(self.json()))


class _UnusableSeg(Exception):
    def __init__(self, uid: str, reason: str):
        super().__init__(reason)
        self.uid, self.reason = uid, reason


def _read_seg(folder: str) -> dict[int, sitk.Image]:
    """``{segment number: sitk image}`` of the SEG instances in ``folder`` (their own, cropped, grid; binary
    0/1, fractional in [0, 1]). Raises ValueError for pixel data that does not hold the frames it declares."""
    import pydicom_seg

    segments: dict[int, sitk.Image] = {}
    for name in sorted(os.listdir(folder)):
        dataset = pydicom.dcmread(os.path.join(folder, name))
        pixels = int(dataset.Rows) * int(dataset.Columns) * int(getattr(dataset, "NumberOfFrames", 1))
        expected = (pixels + 7) // 8 if dataset.SegmentationType == "BINARY" else pixels
        compressed = dataset.file_meta.TransferSyntaxUID.is_compressed  # its size says nothing: the decoder checks
        if not compressed and not expected <= len(dataset.PixelData) <= expected + 1:  # + 1: an even length
            raise ValueError(f"pixel data of {len(dataset.PixelData)} bytes for {dataset.Rows} x {dataset.Columns}"
                             f" x {getattr(dataset, 'NumberOfFrames', 1)} frames")
        result = pydicom_seg.SegmentReader().read(dataset)
        for number in result.available_segments:
            segments.setdefault(number, result.segment_image(number))
    return segments


def _on_grid(segment: sitk.Image, reference: sitk.Image) -> np.ndarray:
    """A SEG segment resampled (nearest neighbour, same physical space) onto the image's grid, as a mask:
    binary segments as they are, fractional ones at 0.5."""
    resampled = sitk.Resample(segment, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(resampled) >= 0.5


def check_seg_grid(series_dir: str) -> None:
    """Refuse (422) to write a DICOM SEG for a series whose slices do not lie on one regular grid: dcmqi
    places the label's slices on the evenly spaced, untilted grid the volume was read on and references the
    instance nearest each, so a series with uneven spacing or a gantry tilt gets frames on the wrong slices,
    and one without slice geometry (secondary captures) cannot be written at all. Positions may stray from
    the grid by a tenth of the spacing (rounded header values), far from where the nearest slice changes."""
    files = sitk.ImageSeriesReader().GetGDCMSeriesFileNames(series_dir)
    if not files:
        raise BadRequest("the series has no images this server can read: it cannot hold a DICOM SEG", 422)
    positions, orientations = [], []
    for name in files:
        header = pydicom.dcmread(name, stop_before_pixels=True)
        position = getattr(header, "ImagePositionPatient", None)
        orientation = getattr(header, "ImageOrientationPatient", None)
        if position is None or orientation is None:
            raise BadRequest("this series has no slice geometry (image position and orientation): it cannot "
                             "hold a DICOM SEG; save the label as NIfTI or NRRD to another tag", 422)
        positions.append([float(v) for v in position])
        orientations.append([float(v) for v in orientation])
    orientations = np.array(orientations)
    if np.abs(orientations - orientations[0]).max() > 1e-3:
        raise BadRequest("the slices of this series are not all oriented alike: a DICOM SEG of it would place "
                         "the label on the wrong slices", 422)
    if len(positions) < 2:
        return
    normal = np.cross(orientations[0, :3], orientations[0, 3:])
    offsets = np.array(positions) - positions[0]
    along = offsets @ normal
    across = np.linalg.norm(offsets - np.outer(along, normal), axis=1)
    spacing = abs(along[-1]) / (len(positions) - 1)
    tolerance = max(1e-3, 0.1 * spacing)
    if across.max() > tolerance:
        raise BadRequest("this series is tilted (its slices shift sideways from one to the next, as with a gantry "
                         "tilt): a DICOM SEG of it would place the label on the wrong slices", 422)
    if spacing == 0 or np.abs(along - np.linspace(0, along[-1], len(positions))).max() > tolerance:
        raise BadRequest("the slices of this series are not evenly spaced: a DICOM SEG of it would place the "
                         "label on the wrong slices", 422)


def _write_atomic(image: sitk.Image, path: str) -> None:
    fd, tmp = tempfile.mkstemp(suffix=".nii.gz", dir=os.path.dirname(path))
    os.close(fd)
    try:
        sitk.WriteImage(image, tmp, True)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _mend_pacs_routes(session: PacsSession) -> None:
    """Two of MONAI Label's PACS routes, mended in place: ``/proxy/dicom`` calls ``requests.get`` without a
    timeout (it gets the datastore's :class:`PacsSession`), and ``output=dicom_seg`` leaves its SEG file in
    the temp folder after each answer (it is removed once the answer is sent)."""
    import monailabel.endpoints.infer
    import monailabel.endpoints.proxy

    monailabel.endpoints.proxy.requests = session
    convert = monailabel.endpoints.infer.nifti_to_dicom_seg
    if getattr(convert, "mended", False):
        return

    def nifti_to_dicom_seg_removed_after_response(series_dir, *args, **kwargs):
        check_seg_grid(series_dir)
        path = convert(series_dir, *args, **kwargs)
        if path == "":  # MONAI Label's answer for a result without any segment
            raise BadRequest("the result is empty: there is no DICOM SEG to answer with", 422)
        if not path or not os.path.exists(path):  # dcmqi failed, and MONAI Label names its file anyway
            raise BadRequest("the result could not be written as DICOM SEG", 422)
        remove_after_response(path)
        return path

    nifti_to_dicom_seg_removed_after_response.mended = True
    monailabel.endpoints.infer.nifti_to_dicom_seg = nifti_to_dicom_seg_removed_after_response


def connect(url: str, names: list[str], cache: Optional[str] = None) -> PacsDatastore:
    """A :class:`PacsDatastore` on ``url`` with MONAI Label's DICOMweb settings (credentials, URL prefixes,
    cache path unless ``cache`` is given, search filter), as ``monailabel start_server --studies URL``
    would make its own."""
    from monailabel.config import settings
    from monailabel.datastore.dicom import DICOMwebClientX

    user = settings.MONAI_LABEL_DATASTORE_USERNAME or settings.MONAI_LABEL_DICOMWEB_USERNAME
    password = settings.MONAI_LABEL_DATASTORE_PASSWORD or settings.MONAI_LABEL_DICOMWEB_PASSWORD
    session = PacsSession()
    if user and password:
        session.auth = (user, password)
    client = DICOMwebClientX(
        url=url.rstrip("/"),
        session=session,
        qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
        wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
        stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX,
    )
    client.set_http_retry_params(retry=False)  # its retries waited 30 s in all; PacsSession retries instead
    _mend_pacs_routes(session)
    cache = cache or (settings.MONAI_LABEL_DATASTORE_CACHE_PATH or settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or "").strip()
    # MONAI Label's default filter lists CT only; unless one is set, every imaging modality is listed
    chosen = "MONAI_LABEL_DICOMWEB_SEARCH_FILTER" in settings.model_fields_set
    # dcmqi's itkimage2segimage (pip install dcmqi) beside this Python, when its folder is not on PATH
    tools = os.path.dirname(sys.executable)
    if not shutil.which(SEG_WRITER) and os.path.exists(os.path.join(tools, SEG_WRITER)):
        os.environ["PATH"] = tools + os.pathsep + os.environ.get("PATH", "")
    if not shutil.which(SEG_WRITER):
        log.warning("%s not found: saving labels to the PACS needs it (pip install dcmqi)", SEG_WRITER)
    return PacsDatastore(
        client,
        settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER if chosen else None,
        cache or None,
        names,
        fetch_by_frame=settings.MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME,
    )
