"""Boundary refinement: masks blurred by the model grid snap back to the image's intensity edges."""

import numpy as np
import pytest
from scipy import ndimage

from mvseg import Predictor, Prompts
from mvseg.evaluate import dice
from mvseg.predictor import overrules
from mvseg.refine import BoundaryRefiner

from .conftest import disk

SHAPE = (200, 240)
CENTRES = [(40, 50), (120, 60), (190, 150), (70, 150)]


def nuclei(bright: bool = True, seed: int = 0):
    """Small disks on a noisy ground: the image in [0, 1], the true mask, and a mask one grid cell too
    fat (what a 4x coarser grid gives back)."""
    truth = np.zeros(SHAPE, bool)
    for c in CENTRES:
        truth |= disk(SHAPE, c, 7) > 0
    rng = np.random.default_rng(seed)
    image = np.where(truth, 0.8, 0.2) + rng.normal(0, 0.05, SHAPE)
    if not bright:
        image = 1 - image
    fat = ndimage.binary_dilation(truth, iterations=3)
    return np.clip(image, 0, 1), truth, fat


@pytest.mark.parametrize("bright", [True, False])
def test_a_blurred_boundary_snaps_to_the_intensity_edge(bright):
    image, truth, fat = nuclei(bright)
    refined = BoundaryRefiner()(image, fat, cell=4.0)
    assert dice(fat, truth) < 0.8
    assert dice(refined, truth) > 0.97


def test_no_intensity_edge_leaves_the_mask_alone():
    _, truth, fat = nuclei()
    texture = np.random.default_rng(1).random(SHAPE)  # inside and outside look the same
    assert np.array_equal(BoundaryRefiner()(texture, fat, cell=4.0), fat)


def test_nothing_is_refined_when_the_grid_is_as_fine_as_the_image():
    image, _, fat = nuclei()
    assert np.array_equal(BoundaryRefiner()(image, fat, cell=1.0), fat)


@pytest.mark.parametrize("mask", [np.zeros(SHAPE), np.ones(SHAPE)])
def test_empty_or_full_masks_come_back_unchanged(mask):
    image, _, _ = nuclei()
    assert np.array_equal(BoundaryRefiner()(image, mask, cell=4.0), mask > 0)


@pytest.mark.parametrize(
    "kwargs, message", [({"band": 3, "reach": 2}, "band < reach"), ({"min_separation": 0.4}, "min_separation")]
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BoundaryRefiner(**kwargs)


def test_predictor_keeps_probability_and_mask_in_agreement(tiny_models):
    """The refined mask is what the probability says at 0.5, and the refiner sees the image's own pixels."""
    mvs, _ = tiny_models
    image, _, _ = nuclei()
    seen = {}

    def everything(gray, mask, cell):
        seen.update(shape=gray.shape, cell=cell)
        return np.ones_like(mask)

    predictor = Predictor(mvs, device="cpu")
    predictor.refiner = everything
    click = Prompts(positive=[CENTRES[0]])
    refined = predictor.predict(image, click)
    assert seen == {"shape": SHAPE, "cell": 240 / 128}
    assert refined.mask.all() and (refined.probability >= 0.5).all()
    raw = Predictor(mvs, device="cpu", refine=False).predict(image, click)
    assert np.array_equal(raw.mask, (raw.probability >= 0.5).astype(np.uint8))
    assert np.array_equal(raw.logits, refined.logits)


def test_a_refinement_that_takes_a_click_away_overrules_the_user():
    before = np.zeros((20, 30), bool)
    before[5:15, 5:15] = True
    shrunk = before.copy()
    shrunk[5:8] = False
    grown = before.copy()
    grown[:, 15:18] = True
    assert overrules(Prompts(positive=[(6, 6)]), before, shrunk)
    assert not overrules(Prompts(positive=[(10, 12)]), before, shrunk)  # that click still holds
    assert overrules(Prompts(negative=[(16.7, 3.2)]), before, grown)
    stroke = np.zeros((20, 30), np.uint8)
    stroke[6, 5:15] = 1
    assert overrules(Prompts(positive_scribbles=stroke), before, shrunk)
    assert not overrules(Prompts(negative_scribbles=stroke), before, shrunk)  # it was not the user's before
    assert not overrules(None, before, shrunk)


def test_predictor_keeps_the_raw_mask_when_refinement_overrules_a_click(tiny_models):
    mvs, _ = tiny_models
    image, _, _ = nuclei()
    predictor = Predictor(mvs, device="cpu")
    raw = Predictor(mvs, device="cpu", refine=False)
    predictor.refiner = lambda gray, mask, cell: ~mask  # turns every pixel over
    x, y = CENTRES[0]
    for prompts, wanted in ((Prompts(positive=[(x, y)]), 1), (Prompts(negative=[(x, y)]), 0)):
        before = raw.predict(image, prompts).mask
        # the flip overrules the click exactly when the raw mask honoured it
        expected = before if before[y, x] == wanted else 1 - before
        assert np.array_equal(predictor.predict(image, prompts).mask, expected)
    context = raw.new_context()
    context.add("other", image, disk(SHAPE, CENTRES[1], 7))
    no_clicks = predictor.predict(image, None, context).mask
    assert np.array_equal(no_clicks, 1 - raw.predict(image, None, context).mask)  # no clicks: refined


def test_distances_on_the_grown_bounding_box_equal_those_on_the_whole_image():
    """The refiner measures distances on the mask's bounding box grown by its reach; the answer is the
    one the whole image gives, for objects anywhere (touching the border included)."""

    def whole_image(refiner, gray, mask, cell):
        depth = np.where(mask, ndimage.distance_transform_edt(mask), ndimage.distance_transform_edt(~mask))
        band = depth <= refiner.band * cell
        ring = ~band & (depth <= refiner.reach * cell)
        rule = refiner.threshold(gray[ring & mask], gray[ring & ~mask])
        if rule is None:
            return mask
        out = mask.copy()
        out[band] = (gray[band] >= rule[0]) if rule[1] else (gray[band] < rule[0])
        return out

    rng = np.random.default_rng(0)
    refiner = BoundaryRefiner()
    yy, xx = np.mgrid[:120, :160]
    changed = 0
    for _ in range(20):
        cx, cy, r = rng.integers(0, 160), rng.integers(0, 120), rng.integers(4, 60)
        truth = (xx - cx) ** 2 + (yy - cy) ** 2 < r**2
        gray = np.clip(0.6 * truth + 0.2 + rng.normal(0, 0.1, truth.shape), 0, 1)
        mask = (xx - cx - rng.integers(-4, 5)) ** 2 + (yy - cy) ** 2 < (r + rng.integers(-3, 4)) ** 2
        if not mask.any():
            continue
        cell = rng.uniform(1.5, 4)
        out = refiner(gray, mask, cell)
        np.testing.assert_array_equal(out, whole_image(refiner, gray, mask, cell))
        changed += int((out != mask).any())
    assert changed > 5
