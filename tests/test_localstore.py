"""The folder datastore after a crash, and the files of its folder that no route could serve."""

import json
import multiprocessing
import os
import sys

import numpy as np
import pytest
from PIL import Image

from .conftest import ROOT, disk

sys.path.insert(0, str(ROOT / "apps" / "multiverseg"))
from mvlabel import localstore  # noqa: E402
from mvlabel.localstore import CheckedDatastore  # noqa: E402

EXTENSIONS = ["*.png", "*.nii.gz"]


def open_store(root) -> CheckedDatastore:
    return CheckedDatastore(str(root), extensions=EXTENSIONS, auto_reload=False)


def info_of(name: str) -> dict:
    return {"label_info": [{"name": name, "idx": 1}]}


@pytest.fixture
def studies(tmp_path):
    root = tmp_path / "studies"
    root.mkdir()
    for i, center in enumerate([(15, 15), (25, 20)]):
        Image.fromarray((disk((40, 40), center, 8) * 200 + 20).astype(np.uint8)).save(root / f"img{i}.png")
    return root


def _save_and_die_at(root, label_png: str, name: str, die_before: str) -> None:
    """Save a label in a process that is killed (``os._exit``, as by kill -9: no cleanup runs) just before
    the rename into ``die_before`` ('label': the label file's place; 'index': the index file's)."""
    real_replace = os.replace

    target = os.path.join(root, "datastore_v2.json") if die_before == "index" else \
        os.path.join(root, "labels", "final", "img0.png")

    def replace(src, dst):
        if os.path.realpath(dst) == os.path.realpath(target):
            os._exit(9)
        return real_replace(src, dst)

    localstore.os.replace = replace
    open_store(root).save_label("img0", label_png, "final", info_of(name))
    os._exit(0)


def _label_state(root):
    store = open_store(root)
    label = np.asarray(Image.open(store.get_label_uri("img0", "final")))
    return store, label, store.get_label_info("img0", "final")["label_info"][0]["name"]


@pytest.mark.parametrize("die_before, finished", [("label", True), ("index", False)])
def test_a_save_killed_midway_leaves_the_old_label_or_the_new_one(studies, tmp_path, die_before, finished):
    """Killed after its index record was written but before the file was renamed into place, a save left the
    new record (another label name) on the old file: the old mask then counted as the new name."""
    old, new = tmp_path / "old.png", tmp_path / "new.png"
    Image.fromarray(disk((40, 40), (15, 15), 8)).save(old)
    Image.fromarray(disk((40, 40), (15, 15), 5)).save(new)
    open_store(studies).save_label("img0", str(old), "final", info_of("white_matter"))
    child = multiprocessing.get_context("fork").Process(target=_save_and_die_at,
                                                        args=(studies, str(new), "grey_matter", die_before))
    child.start()
    child.join(60)
    assert child.exitcode == 9
    store, label, name = _label_state(studies)
    expected = np.asarray(Image.open(new if finished else old))
    np.testing.assert_array_equal(label, expected)
    assert name == ("grey_matter" if finished else "white_matter")
    leftovers = [f for _, _, files in os.walk(studies) for f in files if f.endswith((".tmp", ".staged"))]
    assert leftovers == []


def test_files_no_route_could_serve_are_not_listed(studies, tmp_path):
    """Links out of the folder served /etc/passwd as an image; a dangling link was added and removed by
    every reconcile, for ever; names that are no ids were offered as the next sample but could be neither
    segmented nor deleted."""
    secret = tmp_path / "secret.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(secret)
    os.symlink(secret, studies / "outside.png")
    os.symlink(tmp_path / "nothing.png", studies / "dangling.png")
    os.symlink(studies / "img1.png", studies / "inside.png")  # a link within the datastore stays
    (studies / "folder.png").mkdir()
    for name in ("-dash.png", ".hidden.png"):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(studies / name)
    store = open_store(studies)
    assert sorted(store.list_images()) == ["img0", "img1", "inside"]
    digest = (studies / "datastore_v2.json").read_bytes()
    store.refresh()
    assert (studies / "datastore_v2.json").read_bytes() == digest  # nothing to add or remove: no rewrite
    index = json.loads(digest)
    index["objects"]["outside"] = {"image": {"ext": ".png", "info": {}}, "labels": {}}  # listed before
    (studies / "datastore_v2.json").write_text(json.dumps(index))
    store = open_store(studies)
    assert store.get_image_uri("outside") == "" and store.get_image_uri("img0").endswith("img0.png")


def test_a_lock_another_process_holds_is_waited_for_a_bounded_time(studies, tmp_path, monkeypatch):
    """A stopped process holding the datastore's lock held every save (and the clicks behind them) for as long
    as it slept: 89 s in the audit."""
    import subprocess

    from mvlabel.errors import BadRequest

    store = open_store(studies)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from filelock import FileLock; "
                               f"lock = FileLock({str(studies / '.lock')!r}); lock.acquire(); print('held', flush=True); "
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setattr(localstore, "LOCK_TIMEOUT", 0.5)
        label = tmp_path / "l.png"
        Image.fromarray(disk((40, 40), (15, 15), 8)).save(label)
        with pytest.raises(BadRequest, match="datastore is busy") as busy:
            store.save_label("img0", str(label), "final", info_of("white_matter"))
        assert busy.value.status == 503
    finally:
        holder.kill()
        holder.wait(10)
    store.save_label("img0", str(label), "final", info_of("white_matter"))  # free again
