"""The local (folder) datastore, made safe to share: nothing saved is ever lost or half-written.

MONAI Label's ``LocalDatastore`` copies a label over the old one first and asks questions later. Here:

* a label is read and checked against its image (shape, readable, at most ``MAX_LABELS`` values) before
  anything on disk is touched; a 2D image's label sent as NRRD/NIfTI (Slicer) is stored as PNG;
* tags are plain names (``final`` is only written by a label save; the routes see to that);
* a ``final`` label that is replaced or deleted is kept in ``labels/final/.history/<image>/`` with who saved
  it and when (all of them, or the newest ``history_keep`` per image);
* two saves of one image at the same time: the second is refused with 409 instead of silently winning;
* an image upload never replaces an image of the same id (MONAI Label's would, dropping its labels), and
  its id, given or taken from the file name, is a name;
* an upload refused here leaves nothing behind in the temp folder (MONAI Label removes it only after a
  success), and the dataset archive is built inside the datastore, one file, not a new one per download;
* label files and ``datastore_v2.json`` are written to a temporary name and renamed, so a kill leaves the
  old file or the new one, never half of one, and the datastore still starts;
* every change of the index (``datastore_v2.json``) reads it again first if another process (the batch
  pre-segmenter, a second server on the folder) wrote it meanwhile, under the datastore's file lock: MONAI
  Label wrote its own copy over it, so the other process's records were lost.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
import zipfile
from contextlib import contextmanager, suppress
from typing import Optional

import filelock
import numpy as np
from fastapi import HTTPException
from filelock import FileLock
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore, LocalDatastoreModel
from PIL import Image

from .contextstore import label_masks
from .errors import BadRequest, calling
from .guard import TAG, Refusal, check_name, current_user, is_whole
from .imageio import (IMAGE_2D, check_label_values, extension, read_asap, read_image, read_label,
                      uploads_removed_when_refused)

log = logging.getLogger(__name__)

FINAL = "final"
# what a file written in place would get (temporary files are owner-only): other users and the batch
# workers of a shared datastore read labels and the index
_UMASK = os.umask(0o022)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK
LOCK_TIMEOUT = 60.0  # seconds a write waits for another process's hold on the datastore
STAGED = ".staged"  # suffix of a label file waiting for its index record (see CheckedDatastore._store)


def write_dataset_archive(cases: list[dict], limit_cases, folder: str, metadata: str) -> str:
    """``GET /datastore/dataset``'s zip of ``cases`` (``{key: file}`` each, the first ``limit_cases``) and
    ``metadata.json``, as ``folder/dataset.zip``: one file, written under a temporary name and renamed over
    the last one, so a download still streaming keeps its own (MONAI Label wrote a new temp file each time)."""
    if not cases:
        raise HTTPException(status_code=404, detail="no image has a final label yet: nothing to archive")
    if limit_cases and 0 < limit_cases < len(cases):
        cases = cases[:limit_cases]
    os.makedirs(folder, exist_ok=True)
    dest = os.path.join(folder, "dataset.zip")
    fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=folder)
    os.fchmod(fd, FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as f, zipfile.ZipFile(f, "w") as archive:
            for case in cases:
                for key, path in case.items():
                    archive.write(path, arcname=os.path.join(key, os.path.basename(path)))
            archive.writestr("metadata.json", metadata)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def public_image_info(info: dict, hide_paths: bool) -> dict:
    """An image's info as the routes show it. MONAI Label's next-sample route merges it into its answer, where
    its lease record (``strategy``: who was offered the image, when) replaced the strategy's name and showed
    other users' client ids; the server's file ``path`` is left out where clients are remote (authentication
    on), else Slicer on the same machine loads the file from it."""
    info = {k: v for k, v in info.items() if k != "strategy"}
    if hide_paths:
        info.pop("path", None)
    return info


def public_datalist(rows: list[dict], root: str, hide_paths: bool) -> list[dict]:
    """``GET /datastore/?output=train``'s image and label pairs: paths relative to ``root`` where clients are
    remote (authentication on), as no other answer shows the server's folders then."""
    if not hide_paths:
        return rows

    def shown(path: str) -> str:  # a file linked from elsewhere: its name only
        relative = os.path.relpath(path, root)
        return os.path.basename(path) if relative.startswith("..") else relative

    return [{key: shown(path) for key, path in row.items()} for row in rows]


class OneSavePerImage:
    """``with gate(image_id):`` around a save; a second save of the image meanwhile is refused (409) instead
    of silently winning. The key may name the tag too (``(image_id, tag)``): saves of other tags, such as a
    batch job's proposals, then never collide with an annotator's."""

    def __init__(self):
        self._saving: set = set()
        self._lock = threading.Lock()

    @contextmanager
    def __call__(self, key):
        with self._lock:
            if key in self._saving:
                image_id = key[0] if isinstance(key, tuple) else key
                raise HTTPException(status_code=409, detail=f"another save of '{image_id}' is in progress; "
                                                            "reload the label and save again")
            self._saving.add(key)
        try:
            yield
        finally:
            with self._lock:
                self._saving.discard(key)


class CheckedDatastore(LocalDatastore):
    hide_paths = False  # the app sets it when authentication is on
    history_keep: int | None = None  # earlier final labels kept per image; None: all of them

    def __init__(self, *args, **kwargs):
        self._one_save = OneSavePerImage()
        # MONAI Label's folder watcher reconciles the image table on its own thread while requests and the
        # scorer iterate it ("dictionary changed size during iteration"): both sides take this lock
        self._objects_lock = threading.RLock()
        self._index_digest = None  # of the index file as last read or written here
        self._left_out: set[str] = set()  # files of the folder no route could serve, each logged once
        self._real_root = os.path.realpath(args[0] if args else kwargs["datastore_path"])
        super().__init__(*args, **kwargs)
        handler = getattr(self, "_handler", None)  # the folder watcher (auto_reload)
        if handler is not None:  # labels and the index arrive by rename, here and from other processes
            handler.on_moved = self._on_any_event

    @functools.cached_property
    def _file_lock(self) -> FileLock:
        """The datastore's lock file (one instance: re-entrant in a thread, exclusive between threads and
        processes; a second instance in a thread that holds this one would wait forever)."""
        return FileLock(self._lock_file)

    @contextmanager
    def _locked(self):
        """The datastore's lock file, waited for at most ``LOCK_TIMEOUT`` seconds (503 after): a stopped
        process that holds it (a suspended batch job) would otherwise hold every save, and the clicks whose
        context refresh waits on the save."""
        try:
            self._file_lock.acquire(timeout=LOCK_TIMEOUT)
        except filelock.Timeout:
            raise BadRequest(f"the datastore is busy: another process has held its lock for {LOCK_TIMEOUT:.0f} s "
                             "(a batch job?); try again", 503) from None
        try:
            yield
        finally:
            self._file_lock.release()

    @contextmanager
    def _index(self):
        """Hold the index for a change: this process's threads and other processes wait, and what another
        process wrote since this one last read or wrote it is read first, so the change applies to that."""
        with self._objects_lock, self._locked():
            self._reload()
            yield

    def _reload(self, strict: bool = False) -> None:
        """Read the index file again if its content changed since this process last read or wrote it (caller
        holds the locks; compared by digest: a file rewritten within one clock tick keeps its mtime). One that
        cannot be read is logged and this process's copy kept, which the next write puts in its place
        (``strict``, at start-up: raised)."""
        try:
            with open(self._datastore_config_path, "rb") as f:
                text = f.read()
        except FileNotFoundError:
            return
        digest = hashlib.blake2b(text, digest_size=16).digest()
        if digest == self._index_digest:
            return
        try:
            model = _read_index(text)
        except ValueError as e:
            log.error("datastore index %s not read, this server's copy stays: %s", self._datastore_config_path, e)
            if strict:
                raise
            self._index_digest = digest  # not read again until it changes
            return
        model.base_path = self._datastore_path
        self._datastore = model
        self._index_digest = digest

    def _init_from_datastore_file(self, throw_exception=False):
        """MONAI Label's reload (at start and from the folder watcher), under this class's locks."""
        with self._objects_lock, self._locked():
            self._reload(strict=throw_exception)

    def _reconcile_datastore(self):
        try:
            with self._index():
                self._finish_interrupted_writes()
                super()._reconcile_datastore()
        except (OSError, BadRequest) as e:  # a full or read-only disk, a held lock: serve what is there
            # (the watcher's thread lives on)
            log.warning("datastore index not updated: %s", e)

    def _list_files(self, path, patterns):
        """MONAI Label's folder listing, less what no route could serve: links that lead outside the
        datastore or nowhere (a dangling one was added and removed by every reconcile, for ever), folders
        named like images, and names that are not ids (a route refuses '-scan' or '.scan': such an image
        could be offered as the next sample, but neither segmented nor deleted)."""
        found = super()._list_files(path, patterns)
        usable = {}
        for key, name in found.items():
            why = self._unusable(os.path.join(path, name))
            if why is None:
                usable[key] = name
            elif name not in self._left_out:
                self._left_out.add(name)
                log.warning("datastore: leaving %s out: %s", name, why)
        return usable

    def _unusable(self, path: str) -> Optional[str]:
        """Why the file at ``path`` cannot be one of the datastore's images or labels, or None."""
        try:
            check_name(self._to_id(os.path.basename(path))[0], "image")
        except Refusal:
            return ("its name is no image id (at most 200 letters, digits, spaces and _ . + = , @ ( ) -, starting "
                    "with a letter, digit or '_')")
        if not self._inside(path):
            return "it is a link to a file outside the datastore, or to nothing"
        return None

    def _inside(self, path: str) -> bool:
        """Whether ``path`` is a file of the datastore's own folder once links are followed."""
        real = os.path.realpath(path)
        return real.startswith(self._real_root + os.sep) and os.path.isfile(real)

    def get_image_uri(self, image_id):
        uri = super().get_image_uri(image_id)
        return uri if uri and self._inside(uri) else ""

    def get_label_uri(self, label_id, label_tag):
        uri = super().get_label_uri(label_id, label_tag)
        return uri if uri and self._inside(uri) else ""

    def _finish_interrupted_writes(self) -> None:
        """What a process killed in the middle of a write left (caller holds the index: no write is in
        progress). A label save whose index record was written names its staged file by ``save_id``: it is
        put in place, finishing the save (the record and the file were the new label's and the old one's).
        A staged label the index does not name, and every temporary file, go: their writes never happened."""
        labels = self._datastore.label_path(None)
        folders = [self._datastore_path, self._datastore.image_path()]
        if os.path.isdir(labels):
            for tag in os.listdir(labels):
                folders.append(os.path.join(labels, tag))
            history = os.path.join(self._datastore.label_path(FINAL), ".history")
            if os.path.isdir(history):
                folders += [os.path.join(history, d) for d in os.listdir(history)]
        for folder in dict.fromkeys(folders):
            if not os.path.isdir(folder):
                continue
            for entry in os.listdir(folder):
                path = os.path.join(folder, entry)
                if entry.startswith(".") and entry.endswith(STAGED):
                    name, _, save_id = entry[1 : -len(STAGED)].rpartition(".")
                    label = self._datastore.label(self._to_id(name)[0], os.path.basename(folder))
                    if label is not None and label.info.get("save_id") == save_id and label.info.get("name") == name:
                        os.replace(path, os.path.join(folder, name))
                        log.warning("datastore: finished the interrupted save of %s", os.path.join(folder, name))
                        continue
                elif not (entry.startswith(".") and entry.endswith(".tmp")):
                    continue
                log.warning("datastore: removing %s, left by an interrupted write", path)
                with suppress(OSError):
                    os.unlink(path)

    def list_images(self):
        with self._objects_lock:
            return super().list_images()

    def has_image(self, image_id: str) -> bool:
        with self._objects_lock:
            return image_id in self._datastore.objects

    def get_image_info(self, image_id):
        return public_image_info(super().get_image_info(image_id), self.hide_paths)

    def get_labeled_images(self, label_tag=None, labels=None):
        with self._objects_lock:
            return super().get_labeled_images(label_tag, labels)

    def get_unlabeled_images(self, label_tag=None, labels=None):
        with self._objects_lock:
            return super().get_unlabeled_images(label_tag, labels)

    def datalist(self, full_path=True):
        with self._objects_lock:
            rows = super().datalist(full_path)
        return public_datalist(rows, os.path.realpath(self._datastore_path), self.hide_paths)

    def json(self):
        """``GET /datastore/?output=all``: each image's info as the routes show it (no next-sample leases,
        which named who else was offered an image; no paths with authentication on)."""
        with self._objects_lock:
            listing = super().json()
        for record in listing.get("objects", {}).values():
            record["image"]["info"] = public_image_info(record["image"].get("info") or {}, self.hide_paths)
        return listing

    def add_image(self, image_id, image_filename, image_info):
        with uploads_removed_when_refused(image_filename):
            image_id = image_id or self._to_id(os.path.basename(image_filename))[0]
            try:
                check_name(image_id, "image")
            except Refusal as e:
                raise HTTPException(status_code=e.status, detail=str(e)) from None
            return self._add(image_id, image_filename, image_info)

    def _add(self, image_id: str, image_filename: str, image_info: dict) -> str:
        """MONAI Label's ``add_image``, all or nothing: it copied straight to the image's name, so a full disk
        left a truncated image that the folder watcher then registered."""
        ext = self._to_id(os.path.basename(image_filename))[1]
        name = self._filename(image_id, ext)
        with self._index():
            if image_id in self._datastore.objects:
                raise HTTPException(status_code=409, detail=f"image '{image_id}' is already in the datastore; "
                                                            "upload it under another id or delete it first")
            with _staged(image_filename, os.path.join(self._datastore.image_path(), name)) as place:
                info = dict(image_info or {}, ts=int(time.time()), name=name)
                self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=info, ext=ext))
                try:
                    self._update_datastore_file(lock=False)
                except BaseException:
                    del self._datastore.objects[image_id]
                    raise
                place()
        return image_id

    def save_label(self, image_id, label_filename, label_tag, label_info):
        with uploads_removed_when_refused(label_filename):
            return self._save_label(image_id, label_filename, label_tag, label_info)

    def _save_label(self, image_id, label_filename, label_tag, label_info):
        if not isinstance(label_tag, str) or not TAG.match(label_tag):
            raise HTTPException(status_code=422, detail=f"label tag must be a plain name, got {label_tag!r}")
        if not isinstance(label_info, dict):
            raise HTTPException(status_code=422, detail="label params must be a JSON object")
        image_uri = self.get_image_uri(image_id)
        if not image_uri:
            raise HTTPException(status_code=404, detail=f"image '{image_id}' is not in the datastore")
        with tempfile.TemporaryDirectory() as tmp:
            try:
                label_filename = self._checked(read_image(image_uri), label_filename, tmp, label_info)
            except BadRequest as e:  # named as the upload, not by the server's temporary copy
                told = calling(str(e), label_filename, "the uploaded label")
                raise HTTPException(status_code=e.status, detail=f"label not saved: {told}") from None
            with self._one_save((image_id, label_tag)):  # another tag's file: a batch job's save goes on
                return self._store(image_id, label_filename, label_tag, label_info)

    @staticmethod
    def _checked(image, label_filename: str, tmp: str, label_info: dict) -> str:
        """The label file to store (a PNG for a 2D image's NRRD/NIfTI label); raises BadRequest."""
        if extension(label_filename) == ".xml":
            if image.is_volume:
                raise BadRequest("an ASAP XML label (QuPath's) outlines a 2D image; a volume's label is a "
                                 "NIfTI, NRRD or DICOM SEG", 415)
            read_asap(label_filename, image.shape[:2], default_name="unclassified")  # raises what it cannot use
            return label_filename
        label = check_label_values(read_label(label_filename, image))
        label_masks(label, label_info, [])  # refuses a label of which label_info names no value
        if image.is_volume or extension(label_filename) in IMAGE_2D:
            return label_filename
        png = os.path.join(tmp, "label.png")  # one label file per image and tag, in the image's own format
        Image.fromarray(label.astype(np.uint8)).save(png)
        return png

    def _store(self, image_id: str, label_filename: str, label_tag: str, label_info: dict) -> str:
        _, ext = self._to_id(os.path.basename(label_filename))
        name = self._filename(image_id, ext)
        with self._index():
            obj = self._datastore.objects.get(image_id)
            if not obj:
                raise HTTPException(status_code=404, detail=f"image '{image_id}' is not in the datastore")
            folder = self._datastore.label_path(label_tag)
            os.makedirs(folder, exist_ok=True)
            old = obj.labels.get(label_tag)
            old_path = os.path.join(folder, self._filename(image_id, old.ext)) if old else None
            # all or nothing: the new file waits beside its name until the index holds its record, which names
            # it, so that a save killed in between is finished at the next start (_finish_interrupted_writes)
            save_id = uuid.uuid4().hex[:12]
            with _staged(label_filename, os.path.join(folder, name), f".{name}.{save_id}{STAGED}") as place:
                kept = []
                if label_tag == FINAL and old_path and os.path.exists(old_path):
                    kept = self._keep(image_id, old_path, old.info)
                info = {k: v for k, v in label_info.items() if k != "edited_by"}  # a reviewer's stamp, set by edits
                info.update(ts=int(time.time()), name=name, user=current_user.get(), save_id=save_id)
                obj.labels[label_tag] = DataModel(info=info, ext=ext)
                try:
                    self._update_datastore_file(lock=False)
                except BaseException:
                    if old is None:
                        del obj.labels[label_tag]
                    else:
                        obj.labels[label_tag] = old
                    for path in kept:  # the old label stays current: no history entry for it
                        os.unlink(path)
                    raise
                place()
            if kept:
                self._prune_history(image_id)
            if old_path and os.path.basename(old_path) != name and os.path.exists(old_path):
                os.unlink(old_path)  # the same label in another format: one file per image and tag
        return image_id

    def update_images_info(self, infos: dict[str, dict]) -> None:
        """``update_image_info`` of many images with one write of the index (images gone meanwhile are
        left out)."""
        with self._index():
            for image_id, info in infos.items():
                obj = self._datastore.objects.get(image_id)
                if obj is not None:
                    obj.image.info.update(info)
            self._update_datastore_file(lock=False)

    def update_image_info(self, image_id, info):
        with self._index():
            super().update_image_info(image_id, info)

    def update_label_info(self, label_id, label_tag, info):
        """An edit of a label's info: MONAI Label's route adds the editor as ``user``, which would make them
        the label's saver in its record and history; they are recorded as ``edited_by`` instead."""
        info = dict(info)
        if "user" in info:
            info["edited_by"] = info.pop("user")
        with self._index():
            super().update_label_info(label_id, label_tag, info)

    def remove_image(self, image_id):
        """MONAI Label's removal, and the image's record goes at once: MONAI Label left that to the folder
        watcher, and a label saved meanwhile was stored for the deleted image, its file left behind for a
        new image of the same id to take as its own."""
        with self._index():
            super().remove_image(image_id)
            if self._datastore.objects.pop(image_id, None) is not None:
                self._update_datastore_file(lock=False)

    def _to_id(self, file: str) -> tuple[str, str]:
        """(id, extension) of a file name: the extension comes off the end only. MONAI Label removed it
        wherever it occurred, so 'scan.png.png' (an image uploaded as 'scan.png') became 'scan', a record
        whose file never exists: the watcher then added and removed it many times a second, for ever."""
        ext = super()._to_id(file)[1]
        return (file[: -len(ext)] if ext and file.endswith(ext) else file), ext

    def set_name(self, name):
        with self._index():
            super().set_name(name)

    def set_description(self, description):
        with self._index():
            super().set_description(description)

    def remove_label(self, label_id, label_tag):
        """A deleted ``final`` label goes to the history first, as a replaced one does (so does every final
        label of a deleted image); a label that is not there is a 404, not a silent success."""
        with self._index():
            obj = self._datastore.objects.get(label_id)
            label = obj.labels.get(label_tag) if obj else None
            if label is None:
                raise HTTPException(status_code=404, detail=f"image '{label_id}' has no '{label_tag}' label")
            path = os.path.join(self._datastore.label_path(label_tag), self._filename(label_id, label.ext))
            if os.path.exists(path):
                if label_tag == FINAL:
                    self._keep(label_id, path, label.info)
                os.unlink(path)
            obj.labels.pop(label_tag)  # at once, not when the folder watcher notices
            self._update_datastore_file(lock=False)
            self._prune_history(label_id)

    def _keep(self, image_id: str, path: str, info: dict) -> list[str]:
        """Copy the final label about to be replaced into its history, with who saved it and when; the two
        files written. The oldest entries beyond ``history_keep`` go."""
        folder = os.path.join(self._datastore.label_path(FINAL), ".history", image_id)
        os.makedirs(folder, exist_ok=True)
        saved_at = info.get("ts")
        if not isinstance(saved_at, (int, float)) or isinstance(saved_at, bool) or not 0 <= saved_at < 2**33:
            saved_at = os.path.getmtime(path)  # an info edited by hand must not block the save
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(saved_at))
        number = max(map(_entry_number, _history_entries(folder)), default=-1) + 1
        base = os.path.join(folder, f"{stamp}_{number:04d}")  # numbers only grow: never a name already taken
        _atomic_copy(path, base + extension(path))
        record = {"saved_by": info.get("user", "unknown"), "saved_at": info.get("ts"),
                  "replaced_by": current_user.get(), "replaced_at": int(time.time()), "info": info}
        try:
            _atomic_write(base + ".json", json.dumps(record, indent=1, default=str))
        except BaseException:
            os.unlink(base + extension(path))
            raise
        return [base + extension(path), base + ".json"]

    def _prune_history(self, image_id: str) -> None:
        """Remove an image's oldest history entries beyond the newest ``history_keep``, once a save or a
        deletion has committed (a failed one still finds what it had)."""
        folder = os.path.join(self._datastore.label_path(FINAL), ".history", image_id)
        if self.history_keep is None or not os.path.isdir(folder):
            return
        entries = _history_entries(folder)
        for stem in entries[: max(0, len(entries) - self.history_keep)]:
            for name in os.listdir(folder):
                if name == stem + ".json" or (name.startswith(stem + ".") and not name.endswith(".json")):
                    try:
                        os.unlink(os.path.join(folder, name))
                    except OSError as e:  # a read-only history: it keeps more than asked, nothing else breaks
                        log.warning("label history not pruned: %s", e)

    def label_history(self, image_id: str) -> list[dict]:
        """Earlier final labels of an image, oldest first: ``{"file", "saved_by", "saved_at", ...}``."""
        folder = os.path.join(self._datastore.label_path(FINAL), ".history", image_id)
        if not os.path.isdir(folder):
            return []
        out = []
        for stem in _history_entries(folder):
            files = [f for f in os.listdir(folder) if f.startswith(stem + ".") and not f.endswith(".json")]
            if files:  # a record whose label file is gone (removed by hand) is no version to show
                record = json.loads(open(os.path.join(folder, stem + ".json")).read())
                out.append({**record, "file": os.path.join(folder, files[0])})
        return out

    def get_dataset_archive(self, limit_cases):
        """MONAI Label's archive (images, final labels, ``metadata.json``) in the datastore's ``.archive/``."""
        with self._objects_lock:
            cases = LocalDatastore.datalist(self)
        return write_dataset_archive(cases, limit_cases, os.path.join(self._datastore.base_path, ".archive"),
                                     json.dumps(self.json()))

    def _update_datastore_file(self, lock=True):
        """``datastore_v2.json`` written whole, then renamed over the old one."""
        with self._locked():  # re-entrant, so always taken (``lock`` stays for MONAI Label's callers)
            self._ignore_event_config = True
            text = json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str)
            _atomic_write(self._datastore_config_path, text)
            self._index_digest = hashlib.blake2b(text.encode(), digest_size=16).digest()


def _read_index(text: bytes) -> LocalDatastoreModel:
    """The datastore index; one that holds lone surrogate escapes ('\\ud800', which earlier versions let info
    edits store, and which pydantic refuses) is read with them made U+FFFD."""
    try:
        return LocalDatastoreModel.model_validate_json(text)
    except ValueError:
        index = json.loads(text)  # raises for an index that is not JSON at all
        mended = _without_surrogates(index)
        if mended == index:
            raise
        log.warning("datastore index: lone surrogate escapes replaced by U+FFFD")
        return LocalDatastoreModel.model_validate(mended)


def _without_surrogates(value):
    if isinstance(value, str):
        return "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in value)
    if isinstance(value, dict):
        return {_without_surrogates(k): _without_surrogates(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_surrogates(v) for v in value]
    return value


def _history_entries(folder: str) -> list[str]:
    """The entries of one image's history folder (``<saved>_<number>``, a label file and its ``.json``),
    oldest first: in the order they were written."""
    stems = [f[: -len(".json")] for f in os.listdir(folder) if f.endswith(".json") and not f.startswith(".")]
    return sorted(stems, key=lambda stem: (_entry_number(stem), stem))


def _entry_number(stem: str) -> int:
    number = stem.rsplit("_", 1)[-1]
    return int(number) if is_whole(number) else -1


@contextmanager
def _staged(source: str, dest: str, name: Optional[str] = None):
    """Copy ``source`` beside ``dest`` (a hidden temp file, which the folder watcher ignores; ``name``: its
    name) and yield the call that renames it into place; left uncalled, or on an error, ``dest`` is untouched
    and the copy goes."""
    if name is None:
        fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=os.path.dirname(dest))
    else:
        tmp = os.path.join(os.path.dirname(dest), name)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    os.fchmod(fd, FILE_MODE)
    os.close(fd)
    try:
        shutil.copyfile(source, tmp)
        yield lambda: os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _atomic_copy(source: str, dest: str) -> None:
    with _staged(source, dest) as place:
        place()


def _atomic_write(dest: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=os.path.dirname(dest))
    os.fchmod(fd, FILE_MODE)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
