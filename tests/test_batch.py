"""Pre-segmenting a datastore on Ray (embedded, 2 workers): the same masks as the serial predictor, no final
label touched, a killed worker's images retried, a second run writes nothing."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading

import numpy as np
import pytest
from PIL import Image

from bench.bench_server import free_port

from .conftest import ROOT

pytestmark = pytest.mark.slow
sys.path.insert(0, str(ROOT / "apps" / "multiverseg"))

SAMPLE_2D = ROOT / "sample-datasets" / "brain-2d"
VOLUME = ROOT / "sample-datasets" / "brain-3d" / "mni152_t1_2mm.nii.gz"
SEEDS = ["mni152_axial_077", "mni152_coronal_112", "mni152_axial_126"]


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    folder = tmp_path_factory.mktemp("batch") / "studies"
    folder.mkdir()
    for image in SAMPLE_2D.glob("*.png"):
        shutil.copy(image, folder / image.name)
    shutil.copy(VOLUME, folder / VOLUME.name)
    (folder / "labels" / "final").mkdir(parents=True)
    for key in SEEDS:  # 0/255 ground truth, as annotators' saves would hold it: 0/1
        mask = np.asarray(Image.open(SAMPLE_2D / "ground-truth" / f"{key}.png")) > 0
        Image.fromarray(mask.astype(np.uint8)).save(folder / "labels" / "final" / f"{key}.png")
    return folder


def finals(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted((folder / "labels" / "final").glob("*.*"))}


def test_ray_run_matches_the_serial_predictor_survives_a_killed_worker_and_resumes(studies):
    from mvlabel import batch
    from mvlabel.imageio import read_image
    from mvseg import Predictor

    names = ["white_matter"]
    datastore = batch.open_datastore(str(studies), names)
    predictor = Predictor(device="cpu", dtype="auto")  # as the workers run it
    weights = batch.weights_digest(None)
    plan = batch.plan(datastore, predictor, weights, "white_matter", names)
    assert len(plan.context) == len(SEEDS) and len(plan.todo) == 18  # 17 PNGs + the volume
    before = finals(studies)
    killed = []

    def kill_one_soon(actors):
        """SIGKILL, 1 s in, the worker that is handed the volume (the last item, several seconds of work)."""
        import ray

        assert plan.todo[-1] == VOLUME.name.replace(".nii.gz", "")
        pid = ray.get(actors[(len(plan.todo) - 1) % len(actors)].pid.remote())
        timer = threading.Timer(1.0, lambda: (os.kill(pid, signal.SIGKILL), killed.append(pid)))
        timer.start()

    summary = batch.run_ray(datastore, plan, None, None, workers=2, on_workers=kill_one_soon, progress=False)
    assert killed, "the worker was not killed during the run"
    assert not summary.failed and sorted(summary.written) == sorted(plan.todo), summary
    assert finals(studies) == before  # no final label changed

    for image_id in plan.todo:  # every result equals what the predictor gives in this process
        loaded = read_image(datastore.get_image_uri(image_id))
        expected, uncertainty = batch.presegment(predictor, loaded, plan.context)
        got = read_image(datastore.get_label_uri(image_id, "original")).array
        got = got[..., 0] if got.ndim == 3 and not loaded.is_volume else got
        assert got.shape == expected.shape
        assert np.mean(got == expected) > 0.999, image_id
        info = datastore.get_label_info(image_id, "original")
        assert info["params"]["label_names"] == {"white_matter": 1}  # what Slicer reads to name the segment
        made = info["mvseg_batch"]
        assert made["context_version"] == plan.version and made["weights_sha256"] == weights[1]
        assert made["uncertainty"] == pytest.approx(uncertainty, abs=1e-3)

    stamps = {p: p.stat().st_mtime_ns for p in (studies / "labels" / "original").iterdir()}
    again = batch.plan(datastore, predictor, weights, "white_matter", names)
    assert again.todo == [] and len(again.current) == 18
    assert batch.run_ray(datastore, again, None, None, workers=2, progress=False).written == []
    assert {p: p.stat().st_mtime_ns for p in (studies / "labels" / "original").iterdir()} == stamps


def test_an_image_deleted_during_the_run_is_left_out_not_a_failure(studies, tmp_path):
    """The server (another process) deletes an image the plan holds: the run books it as deleted meanwhile,
    not failed (presegment.py then exits 0); it said 'image file not found: ' and exited 1."""
    from mvlabel import batch
    from mvseg import Predictor

    copy = tmp_path / "studies"
    shutil.copytree(studies, copy, ignore=shutil.ignore_patterns("labels", "*.json", ".lock"))
    shutil.copytree(studies / "labels" / "final", copy / "labels" / "final")
    datastore = batch.open_datastore(str(copy), ["white_matter"])
    predictor = Predictor(device="cpu", dtype="auto")
    plan = batch.plan(datastore, predictor, batch.weights_digest(None), "white_matter", ["white_matter"])
    plan.todo = [i for i in plan.todo if i.startswith("mni152_axial")][:2]
    (copy / f"{plan.todo[0]}.png").unlink()  # as the server's delete leaves it, before this index knows
    summary = batch.run_serial(datastore, plan, predictor, progress=False)
    assert summary.gone == plan.todo[:1] and summary.written == plan.todo[1:] and not summary.failed, summary
    assert "1 deleted meanwhile, 0 failed" in str(summary)

    # on Ray the image is looked up before it is handed out (a PACS downloads it then): a lookup that fails
    # books that image alone (it stopped the whole run)
    uri = datastore.get_image_uri
    datastore.get_image_uri = lambda i: (_ for _ in ()).throw(OSError(f"no {i}")) if i == plan.todo[0] else uri(i)
    again = batch.run_ray(datastore, plan, None, None, workers=1, progress=False)
    assert again.failed == {plan.todo[0]: f"OSError: no {plan.todo[0]}"} and again.written == plan.todo[1:], again


def test_batch_never_writes_final_and_needs_a_context(studies):
    from mvlabel import batch
    from mvseg import Predictor

    datastore = batch.open_datastore(str(studies), ["grey_matter"])
    predictor = Predictor(device="cpu")
    for tag in ("final", "Final"):  # the same folder on a case-insensitive disk
        with pytest.raises(ValueError, match="final"):
            batch.plan(datastore, predictor, batch.weights_digest(None), "grey_matter", ["grey_matter"], tag=tag)
    with pytest.raises(ValueError, match="no saved final labels for 'skull'"):
        batch.plan(datastore, predictor, batch.weights_digest(None), "skull", ["grey_matter"])


def test_next_sample_review_offers_the_least_certain_pre_segmentation_first(studies):
    """After a batch run, the server's 'review' strategy ranks the pre-segmented images by uncertainty."""
    from mvlabel import batch

    from .app_helpers import app_client

    datastore = batch.open_datastore(str(studies), ["white_matter"])
    info = {i: (datastore.get_label_info(i, "original") or {}).get("mvseg_batch", {}).get("uncertainty")
            for i in datastore.get_unlabeled_images()}
    info = {i: u for i, u in info.items() if u is not None}
    assert info, "runs after the batch test"
    with app_client(studies, {"labels": "white_matter"}) as (client, _):
        r = client.post("/activelearning/review", json={"client_id": "reviewer"}).json()
    assert r["id"] == max(info, key=info.get) and r["score"] == pytest.approx(info[r["id"]])
    assert "pre-segmentation" in r["reason"]


@pytest.fixture()
def served(tmp_path):
    """A copy of the 2D sample with the seeds' final labels, served with 'review' reading the tag 'served'."""
    from .app_helpers import app_client

    folder = tmp_path / "studies"
    folder.mkdir()
    for image in SAMPLE_2D.glob("*.png"):
        shutil.copy(image, folder / image.name)
    (folder / "labels" / "final").mkdir(parents=True)
    for key in SEEDS:
        mask = np.asarray(Image.open(SAMPLE_2D / "ground-truth" / f"{key}.png")) > 0
        Image.fromarray(mask.astype(np.uint8)).save(folder / "labels" / "final" / f"{key}.png")
    with app_client(folder, {"labels": "white_matter", "review_tag": "served"}) as (client, app):
        yield client, app, folder


def test_a_server_batch_job_answers_its_tag_and_records_the_uncertainty_review_ranks(served):
    """POST /batch/infer/multiverseg_auto: each answer names the tag it saved under (MONAI Label said
    'original' whatever the tag), and the label info holds the uncertainty the 'review' strategy ranks."""
    client, app, folder = served
    images = ["mni152_axial_040", "mni152_axial_101", "mni152_coronal_143"]
    r = client.post("/batch/infer/multiverseg_auto?run_sync=true", json={"label_tag": "served", "images": images})
    assert r.status_code == 200, r.text
    assert {i: a["tag"] for i, a in r.json().items()} == {i: "served" for i in images}
    datastore = app.datastore()
    recorded = {i: datastore.get_label_info(i, "served")["params"]["uncertainty"]["white_matter"] for i in images}
    assert all(isinstance(u, float) and 0 <= u <= 1 for u in recorded.values()), recorded
    r = client.post("/activelearning/review", json={"client_id": "reviewer"}).json()
    assert r["id"] == max(recorded, key=recorded.get) and r["score"] == pytest.approx(recorded[r["id"]])
    assert "pre-segmentation" in r["reason"]


def test_one_batch_job_at_a_time_run_sync_or_not(served):
    """MONAI Label refused a second batch job only while one ran in the background: run_sync jobs ran side
    by side, and a background job started beside a run_sync one."""
    client, app, folder = served
    inside, release = threading.Event(), threading.Event()
    task = app._batch_infer

    def held(request, datastore, infer):  # a job that runs until the test lets it end
        inside.set()
        assert release.wait(60)
        return task(request, datastore, infer)

    app._batch_infer = held
    body = {"label_tag": "served", "images": ["mni152_axial_040"]}
    answers = []
    first = threading.Thread(target=lambda: answers.append(
        client.post("/batch/infer/multiverseg_auto?run_sync=true", json=body)))
    first.start()
    try:
        assert inside.wait(60), answers
        for query in ("?run_sync=true", ""):
            r = client.post(f"/batch/infer/multiverseg_auto{query}", json=body)
            assert r.status_code == 429 and "already running" in r.json()["detail"], r.text
    finally:
        release.set()
        first.join(60)
        app._batch_infer = task
    assert answers and answers[0].status_code == 200, answers
    r = client.post("/batch/infer/multiverseg_auto?run_sync=true", json=body)
    assert r.status_code == 200, r.text  # the lock is given back


@pytest.mark.parametrize("info, expected", [
    ({"mvseg_batch": {"label": "wm", "uncertainty": 0.25}}, 0.25),
    ({"mvseg_batch": {"label": "gm", "uncertainty": 0.25}}, None),
    ({"model": "multiverseg_auto", "params": {"uncertainty": {"wm": 0.5, "gm": 0.1}}}, 0.5),
    ({"model": "multiverseg", "params": {"uncertainty": {"wm": 0.5}}}, None),
    ({"model": "multiverseg_auto", "params": {"uncertainty": [0.5]}}, None),  # edited label info: any shape
    ({"model": "multiverseg_auto", "params": "x"}, None),
    ({"model": "multiverseg_auto", "params": {"uncertainty": {"wm": True}}}, None),
    ({"mvseg_batch": "x"}, None),
])
def test_the_recorded_uncertainty_of_either_kind_of_batch_run(info, expected):
    from mvlabel.batch import recorded_uncertainty

    assert recorded_uncertainty(info, "wm") == expected


def test_presegment_takes_the_server_context_settings(studies, monkeypatch, capsys):
    """A server started with other --conf slices_per_volume / max_context builds another context: the
    pre-segmenter takes the same settings (it had the defaults only)."""
    import presegment

    seen = {}

    def plan(datastore, predictor, weights, label, names, tag, axis, slices_per_volume):
        seen["slices_per_volume"] = slices_per_volume
        raise ValueError("stop here")

    monkeypatch.setattr(presegment, "Predictor", lambda *args, **kwargs: seen.update(kwargs))
    monkeypatch.setattr(presegment.batch, "plan", plan)
    argv = ["--studies", str(studies), "--label", "white_matter", "--max-context", "8", "--slices-per-volume", "2"]
    assert presegment.main(argv) == 2
    assert seen["max_context"] == 8 and seen["slices_per_volume"] == 2 and "stop here" in capsys.readouterr().err
    for bad in (["--slices-per-volume", "0"], ["--workers", "0"], ["--workers", "-2"]):  # workers ran 2 anyway
        with pytest.raises(SystemExit) as stop:
            presegment.main(["--studies", str(studies), "--label", "white_matter", *bad])
        assert stop.value.code == 2


def test_presegment_says_the_pacs_is_down_instead_of_a_traceback(capsys):
    import presegment

    url = f"http://127.0.0.1:{free_port()}/dicom-web"  # nothing listens there
    assert presegment.main(["--studies", url, "--label", "white_matter", "--serial"]) == 2
    assert "did not answer" in capsys.readouterr().err
