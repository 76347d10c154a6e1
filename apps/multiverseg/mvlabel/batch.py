"""Pre-segment a whole archive overnight: zero-click MultiverSeg over every image not yet labelled, on Ray.

The driver snapshots the context set of one label name from the datastore's ``final`` labels exactly as
the server builds it (:class:`mvlabel.contextstore.DatastoreContext`), names it by a fingerprint of the
labels that feed it, and puts it in Ray's object store once. Each worker is an actor that loads the
network once and segments the images it is handed; a worker that dies is restarted and its image retried
(Ray's ``max_restarts`` / ``max_task_retries``), an image that still fails is reported, never the run.
The driver alone writes: each result is saved under a tag that is not ``final`` (``original`` by default,
the tag clients open as the model's proposal) with its provenance (weights, context fingerprint, date,
uncertainty) in the label info, through the datastore's atomic save. A rerun skips images whose result
was made with the same weights and context, so an interrupted run loses nothing it had written.

``ray.init()`` runs Ray embedded on this machine (one worker per core by default); ``address`` joins an
existing cluster (``auto``, or ``ray://host:10001``). Workers read images by path, so on a cluster the
datastore folder must be on a filesystem every node mounts.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from mvseg import ContextSet, Predictor
from mvseg.activelearning import mean_uncertainty

from .contextstore import DatastoreContext, from_planes, planes_of
from .guard import TAG, current_user, has_label
from .imageio import Loaded, read_image, write_label

log = logging.getLogger(__name__)

FINAL = "final"
PROVENANCE = "mvseg_batch"  # the label-info key of a batch result


def presegment(predictor: Predictor, loaded: Loaded, context: ContextSet, axis: int = 2) -> tuple[np.ndarray, float]:
    """Zero-click mask of a 2D image or every slice of a volume (``loaded.shape``, uint8 {0, 1}: the
    predictor's masks, boundaries refined) and its uncertainty (mean binary entropy of the model-grid
    predictions, bits), for one label."""
    predictions = predictor.predict_many(planes_of(loaded, axis), context, batch_size=1)
    masks = np.stack([p.mask for p in predictions]).astype(np.uint8)
    return from_planes(masks, loaded, axis), mean_uncertainty(predictions)


def weights_digest(path: Optional[str]) -> tuple[str, str]:
    """(file name, sha256) of the weights a run uses (the bundled ones when ``path`` is None)."""
    if path is None:
        from mvseg.weights import default_weights

        path = default_weights()
    data = open(path, "rb").read()
    return os.path.basename(str(path)), hashlib.sha256(data).hexdigest()


@dataclass
class Plan:
    """What one run does: segment ``todo`` with ``context`` (named by ``version``), skip ``current``."""

    label: str
    tag: str
    context: ContextSet
    version: str
    weights: tuple[str, str]  # file name, sha256
    todo: list[str] = field(default_factory=list)
    current: list[str] = field(default_factory=list)  # already segmented with these weights and this context


def plan(datastore, predictor: Predictor, weights: tuple[str, str], label: str, names: list[str], tag: str = "original",
         axis: int = 2, slices_per_volume: int = 4) -> Plan:
    if tag.lower() == FINAL:  # 'Final' too: on a case-insensitive disk it is the same folder
        raise ValueError("batch results never go to the 'final' tag (in any case): that is the annotators' own")
    if not TAG.match(tag):
        raise ValueError(f"--tag must be a plain tag name (letters, digits, '_', '-'), got {tag!r}")
    context = DatastoreContext(datastore, predictor.new_context, names, axis=axis, slices_per_volume=slices_per_volume)
    context.refresh()
    if label not in context.label_names() or not len(context.get(label)):
        raise ValueError(f"no saved final labels for '{label}' yet: the context set is empty "
                         f"(labels with examples: {', '.join(n for n, k in context.sizes().items() if k) or 'none'})")
    out = Plan(label, tag, context.get(label).copy(), context.fingerprint(label), weights)
    done = context.labelled_for(label)
    for image_id in sorted(datastore.list_images()):
        if image_id in done:
            continue
        made = (datastore.get_label_info(image_id, tag) or {}).get(PROVENANCE, {}) if has_label(datastore, image_id, tag) else {}
        if made.get("context_version") == out.version and made.get("weights_sha256") == weights[1]:
            out.current.append(image_id)
        else:
            out.todo.append(image_id)
    return out


def recorded_uncertainty(info: dict, label: str) -> Optional[float]:
    """The uncertainty a batch result's label info records for ``label``: this module's provenance, or the
    result params of the server's own batch job (``POST /batch/infer/multiverseg_auto``)."""
    made = info.get(PROVENANCE)
    if isinstance(made, dict) and made.get("label") == label:
        value = made.get("uncertainty")
    else:  # label info can be edited (PUT /datastore/label/info): any shape may be there
        params = info.get("params") if info.get("model") == "multiverseg_auto" else None
        recorded = params.get("uncertainty") if isinstance(params, dict) else None
        value = recorded.get(label) if isinstance(recorded, dict) else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def provenance(p: Plan, uncertainty: float, seconds: float) -> dict:
    return {
        "label_info": [{"name": p.label, "idx": 1}],
        "params": {"label_names": {p.label: 1}},  # Slicer names the segment of an 'original' label from this
        PROVENANCE: {
            "label": p.label, "weights": p.weights[0], "weights_sha256": p.weights[1],
            "context_version": p.version, "context_size": len(p.context),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "uncertainty": round(uncertainty, 6), "seconds": round(seconds, 3),
        },
    }


def save_result(datastore, p: Plan, image_id: str, mask: np.ndarray, uncertainty: float, seconds: float) -> None:
    """Write one result under the plan's tag (the datastore's save: checked, atomic)."""
    loaded = read_image(datastore.get_image_uri(image_id))
    path = write_label(mask, loaded)
    try:
        datastore.save_label(image_id, path, p.tag, provenance(p, uncertainty, seconds))
    finally:
        os.unlink(path)


# -- Ray ----------------------------------------------------------------------------------------------


class Worker:
    """A Ray actor: one network, loaded once; segments the images it is handed."""

    def __init__(self, weights: Optional[str], size: Optional[int], refine: bool, axis: int, threads: int,
                 max_context: int = 64):
        import torch

        torch.set_num_threads(max(1, threads))
        self.predictor = Predictor(weights, device="cpu", dtype="auto", size=size, refine=refine,
                                   max_context=max_context)  # as served
        self.axis = axis

    def pid(self) -> int:
        return os.getpid()

    def segment(self, image_id: str, path: str, context: ContextSet) -> tuple[str, np.ndarray, float, float]:
        t0 = time.perf_counter()
        mask, uncertainty = presegment(self.predictor, read_image(path), context, self.axis)
        return image_id, mask, uncertainty, time.perf_counter() - t0


@dataclass
class Summary:
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)  # deleted from the datastore while the run went on
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0  # the whole run
    segmenting: float = 0.0  # from the first image handed out (workers loaded) to the last result written
    workers: int = 0

    def __str__(self) -> str:
        rate = len(self.written) / self.segmenting if self.segmenting else 0.0
        gone = f", {len(self.gone)} deleted meanwhile" if self.gone else ""
        lines = [f"{len(self.written)} segmented, {len(self.skipped)} already current{gone}, {len(self.failed)} failed; "
                 f"{self.seconds:.1f} s in all, {self.segmenting:.1f} s segmenting ({rate:.2f} images/s on "
                 f"{self.workers} worker{'s' if self.workers != 1 else ''})"]
        lines += [f"  failed {image_id}: {why}" for image_id, why in sorted(self.failed.items())]
        return "\n".join(lines)


def run_ray(datastore, p: Plan, weights: Optional[str], size: Optional[int], refine: bool = True, axis: int = 2,
            workers: Optional[int] = None, address: Optional[str] = None, retries: int = 2,
            on_workers=None, progress: bool = True, max_context: int = 64) -> Summary:
    """Segment ``p.todo`` on Ray actors and write every result as it arrives (see the module docstring).
    ``on_workers(actors)`` is called once they are up (tests use it to kill one)."""
    import ray
    from tqdm import tqdm

    t0 = time.perf_counter()
    summary = Summary(skipped=list(p.current))
    if not p.todo:
        return summary
    user = current_user.set("presegment")  # who the saved results name
    started_here = not ray.is_initialized()
    if started_here:
        here = os.path.dirname(os.path.abspath(__file__))  # this app's mvlabel, for the workers to import
        if address:  # a cluster: ship the module to the nodes (they need the same Python packages)
            runtime_env = {"py_modules": [here]}
        else:
            runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(
                [os.path.dirname(here)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}}
        ray.init(address=address, num_cpus=None if address else (workers or os.cpu_count()),
                 include_dashboard=False, log_to_driver=False, configure_logging=False, runtime_env=runtime_env)
    try:
        n = workers or max(1, int(ray.available_resources().get("CPU", 1)))
        n = min(n, len(p.todo))
        threads = max(1, (os.cpu_count() or 1) // n) if not address else 1
        actor = ray.remote(num_cpus=1, max_restarts=retries, max_task_retries=retries)(Worker)
        actors = [actor.remote(weights, size, refine, axis, threads, max_context) for _ in range(n)]
        ray.get([a.pid.remote() for a in actors])  # loaded: the clock below counts segmenting only
        if on_workers is not None:
            on_workers(actors)
        t1 = time.perf_counter()
        context = ray.put(p.context)  # shipped once, shared by every worker
        pending = {}
        with tqdm(total=len(p.todo), desc=f"pre-segmenting '{p.label}'", unit="image", disable=not progress) as bar:
            for k, image_id in enumerate(p.todo):
                try:  # a PACS downloads the series here; one gone since the plan must not stop the run
                    path = datastore.get_image_uri(image_id)
                except Exception as e:
                    _fail(summary, datastore, image_id, e)
                    bar.update(1)
                    continue
                pending[actors[k % n].segment.remote(image_id, path, context)] = image_id
            summary.workers = n
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                image_id = pending.pop(ready[0])
                try:
                    _, mask, uncertainty, seconds = ray.get(ready[0])
                    save_result(datastore, p, image_id, mask, uncertainty, seconds)
                    summary.written.append(image_id)
                except Exception as e:  # this image only: a read error, a worker lost more than `retries` times
                    _fail(summary, datastore, image_id, e)
                bar.update(1)
        summary.segmenting = time.perf_counter() - t1
        for a in actors:
            ray.kill(a)
    finally:
        current_user.reset(user)
        if started_here:
            ray.shutdown()
    summary.seconds = time.perf_counter() - t0
    return summary


def run_serial(datastore, p: Plan, predictor: Predictor, axis: int = 2, progress: bool = True) -> Summary:
    """The same work in this process, one image after another (the reference the Ray run is checked against)."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    summary = Summary(skipped=list(p.current), workers=1)
    user = current_user.set("presegment")
    for image_id in tqdm(p.todo, desc=f"pre-segmenting '{p.label}'", unit="image", disable=not progress):
        try:
            t1 = time.perf_counter()
            mask, uncertainty = presegment(predictor, read_image(datastore.get_image_uri(image_id)), p.context, axis)
            save_result(datastore, p, image_id, mask, uncertainty, time.perf_counter() - t1)
            summary.written.append(image_id)
        except Exception as e:
            _fail(summary, datastore, image_id, e)
    current_user.reset(user)
    summary.seconds = summary.segmenting = time.perf_counter() - t0
    return summary


def _fail(summary: Summary, datastore, image_id: str, error: Exception) -> None:
    """Book an image that could not be segmented or saved: deleted meanwhile (by the server or anyone), or
    failed with ``error``."""
    if _gone(datastore, image_id):
        log.info("%s was deleted from the datastore during the run: left out", image_id)
        summary.gone.append(image_id)
        return
    log.warning("pre-segmentation of %s failed: %s", image_id, error)
    text = str(error).splitlines()[0][:200] if str(error) else ""
    summary.failed[image_id] = f"{type(error).__name__}: {text}"


def _gone(datastore, image_id: str) -> bool:
    """Whether the image is no longer in the datastore: unknown to it or, in a folder, its file gone (another
    process deleted it: this one's index may not know yet). False where that cannot be told (a PACS that is
    down); a PACS is only asked, never made to download the series again."""
    from .localstore import CheckedDatastore

    try:
        if not datastore.has_image(image_id):
            return True
        if not isinstance(datastore, CheckedDatastore):
            return False
        uri = datastore.get_image_uri(image_id)
    except Exception:
        return False
    return not uri or not os.path.exists(uri)


def open_datastore(studies: str, names: list[str]):
    """The datastore the server would use for ``--studies``: a local folder or a DICOMweb URL."""
    if studies.startswith(("http://", "https://")):
        from .dicomweb import connect

        return connect(studies, names)
    from monailabel.config import settings

    from .localstore import CheckedDatastore

    if not os.path.isdir(studies):
        raise ValueError(f"{studies}: not a folder (or a DICOMweb URL)")
    return CheckedDatastore(studies, extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT, auto_reload=False)
