"""The context set: entries prepared once, versioned, and the most similar ones selected."""

import numpy as np
import pytest
import torch

from mvseg import ContextSet

from .conftest import disk


def blob_image(shape, center, radius, seed=0):
    rng = np.random.default_rng(seed)
    img = disk(shape, center, radius) * 180 + rng.integers(0, 40, shape)
    return img.astype(np.uint8), disk(shape, center, radius)


def test_add_replace_remove_bump_the_version():
    ctx = ContextSet(size=64)
    img, mask = blob_image((100, 80), (40, 50), 20)
    ctx.add("a", img, mask)
    ctx.add("b", img, mask)
    assert len(ctx) == 2 and ctx.version == 2 and "a" in ctx
    images, labels = ctx.tensors(ctx.ids())
    assert images.shape == (2, 1, 64, 64) and labels.shape == (2, 1, 64, 64)
    assert set(labels.unique().tolist()) == {0.0, 1.0}
    ctx.add("a", img, np.zeros_like(mask) + disk((100, 80), (20, 20), 10))  # replace
    assert len(ctx) == 2 and ctx.version == 3
    assert ctx.remove("a") and not ctx.remove("a")
    assert ctx.ids() == ["b"] and ctx.version == 4
    ctx.clear()
    assert len(ctx) == 0 and ctx.version == 5
    assert ctx.tensors([])[0].shape == (0, 1, 64, 64)


def test_copy_shares_entries_and_edits_stay_apart():
    ctx = ContextSet(size=64, max_size=8)
    img, mask = blob_image((100, 80), (40, 50), 20)
    ctx.add("a", img, mask)
    ctx.add("b", img, mask)
    small = ctx.copy(max_size=1)
    assert small.ids() == ["a", "b"] and small.version == ctx.version and small.get("a") is ctx.get("a")
    assert small.max_size == 1 and ctx.copy().max_size == 8 and small.size == 64
    small.remove("a")
    assert ctx.ids() == ["a", "b"] and ctx.version == 2


def test_select_returns_the_most_similar_entries():
    ctx = ContextSet(size=64, max_size=2)
    shape = (90, 90)
    for i, cx in enumerate([20, 45, 70]):
        img, mask = blob_image(shape, (cx, 45), 20, seed=i)
        ctx.add(f"blob{cx}", img, mask)
    stripes = (np.indices(shape)[1] % 10 < 5).astype(np.uint8) * 200
    ctx.add("stripes", stripes, disk(shape, (45, 45), 10))
    target, _ = blob_image(shape, (68, 45), 20, seed=9)
    from mvseg import prepare_image

    picked = ctx.select(prepare_image(target, 64)[0], k=2)
    assert picked == ["blob70", "blob45"]
    assert ctx.select(prepare_image(target, 64)[0], k=10) == ctx.ids()  # all, in insertion order
    assert "blob70" not in ctx.select(prepare_image(target, 64)[0], k=2, exclude=["blob70"])


def test_prepared_tensors_are_binarised():
    ctx = ContextSet(size=32)
    ctx.add_prepared("p", torch.rand(1, 32, 32), torch.rand(1, 32, 32))
    assert set(ctx.get("p").label.unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(ValueError, match="32x32"):
        ctx.add_prepared("q", torch.rand(1, 16, 16), torch.rand(1, 16, 16))
    with pytest.raises(ValueError, match="32x32"):  # three channels: a torch error before
        ctx.add_prepared("q", torch.rand(3, 32, 32), torch.rand(1, 32, 32))
    with pytest.raises(ValueError, match="NaN"):  # every later prediction with the set was NaN
        ctx.add_prepared("q", torch.full((1, 32, 32), float("nan")), torch.ones(1, 32, 32))
    with pytest.raises(ValueError, match="empty"):  # add() refuses one too
        ctx.add_prepared("q", torch.rand(1, 32, 32), torch.zeros(1, 32, 32))
    assert ctx.ids() == ["p"]


@pytest.mark.parametrize(
    "image, mask, message",
    [
        (np.zeros((20, 20)), None, "no mask"),
        (None, np.ones((20, 20)), "no image"),
        (np.zeros((20, 20)), np.ones((20, 21)), r"shape \(20, 21\)"),
        (np.zeros((20, 20)), np.zeros((20, 20)), "empty"),
        (np.full((20, 20), np.inf), np.ones((20, 20)), "NaN or infinite"),
        (np.zeros((20, 20)), np.full((20, 20), "0"), "numbers or booleans"),  # "0" != 0: all inside before
    ],
)
def test_bad_entries_are_rejected_and_nothing_changes(image, mask, message):
    ctx = ContextSet(size=32)
    ctx.add("keep", np.eye(20), np.eye(20))
    with pytest.raises(ValueError, match=message):
        ctx.add("keep", image, mask)
    assert ctx.ids() == ["keep"] and ctx.version == 1
