"""The datastore-fed context sets: incremental refresh, and one rule for labels whose file is gone."""

import sys

import numpy as np
import pytest
from PIL import Image

from mvseg import ContextSet

from .conftest import ROOT, disk

sys.path.insert(0, str(ROOT / "apps" / "multiverseg"))
from mvlabel.contextstore import DatastoreContext  # noqa: E402


class FolderDatastore:
    """The four datastore calls ``DatastoreContext`` makes, over ``images/`` and ``labels/`` PNGs."""

    def __init__(self, root):
        self.root = root
        (root / "images").mkdir()
        (root / "labels").mkdir()

    def add(self, image_id: str, center) -> None:
        image = (disk((40, 40), center, 8) * 200 + 20).astype(np.uint8)
        Image.fromarray(image).save(self.root / "images" / f"{image_id}.png")
        Image.fromarray(disk((40, 40), center, 8)).save(self.root / "labels" / f"{image_id}.png")

    def get_labeled_images(self):
        return sorted(p.stem for p in (self.root / "labels").glob("*.png"))

    def get_label_uri(self, image_id, tag):
        return str(self.root / "labels" / f"{image_id}.png")

    def get_label_info(self, image_id, tag):
        return {}

    def get_image_uri(self, image_id):
        return str(self.root / "images" / f"{image_id}.png")


@pytest.fixture
def store(tmp_path):
    datastore = FolderDatastore(tmp_path)
    datastore.add("a", (15, 15))
    datastore.add("b", (25, 20))
    context = DatastoreContext(datastore, lambda: ContextSet(32, 8), ["head"])
    return datastore, context


def test_refresh_reads_only_new_labels(store):
    datastore, context = store
    assert context.refresh() == 2 and len(context.get("head")) == 2
    assert context.refresh() == 0
    datastore.add("c", (20, 25))
    assert context.refresh() == 1 and len(context.get("head")) == 3


@pytest.mark.parametrize("hook", [False, True])
def test_a_listed_label_whose_file_is_gone_leaves_the_context(store, hook):
    """``refresh`` (the freshness check) and ``refresh_one`` (the save hook) agree."""
    datastore, context = store
    context.refresh()
    gone = datastore.root / "labels" / "a.png"
    gone.rename(gone.with_suffix(".bak"))
    datastore.get_labeled_images = lambda: ["a", "b"]  # the datastore's listing still names it
    if hook:
        context.refresh_one("a")
    else:
        context.refresh()
    assert len(context.get("head")) == 1


def test_labels_join_in_the_order_they_were_saved_not_by_name(store):
    """The newest entries are the last saved ones (the context reliability judges those), after a restart
    too: a fresh context reads labels by their save time, and by file time where the info has none."""
    datastore, context = store
    datastore.add("c", (20, 25))
    saved = {"a": 300, "b": 100}  # 'c' has no save time: its file time, now, is the latest
    datastore.get_label_info = lambda image_id, tag: {"ts": saved[image_id]} if image_id in saved else {}
    context.refresh()
    assert [key for key, _ in context.get("head").items()] == [("b", None), ("a", None), ("c", None)]


def test_a_label_copied_in_with_more_values_than_a_save_allows_is_left_out(store):
    """A labelmap of 256 values dropped into the folder became 256 label names, each one more zero-click pass
    (HTTP refuses such a save: at most 16 values)."""
    datastore, context = store
    Image.fromarray(np.arange(40 * 40).reshape(40, 40).astype(np.uint8)).save(datastore.root / "labels" / "b.png")
    context.refresh()
    assert context.label_names() == ["head"] and len(context.get("head")) == 1
