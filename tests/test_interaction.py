"""Simulated users on hand-made masks, and the scribble simulator against real human scribbles."""


import numpy as np
import pytest
from PIL import Image
from skimage.morphology import skeletonize

from mvseg.interaction import (
    CenterClicks,
    CenterlineScribbles,
    RandomPrompts,
    background_band,
    bounding_box,
    center_click,
    centerline_scribble,
    correction_click,
    correction_scribble,
)
from mvseg.prompts import Prompts

from .conftest import DATASETS


def rect(shape, x1, y1, x2, y2):
    m = np.zeros(shape, np.uint8)
    m[y1:y2, x1:x2] = 1
    return m


def test_center_click_is_the_centre_of_the_largest_component():
    m = rect((60, 80), 10, 10, 31, 41) | rect((60, 80), 60, 5, 66, 11)  # big 21x31 block + small square
    assert center_click(m) == (20, 25)
    assert center_click(np.zeros((5, 5))) is None


def test_center_click_of_a_ring_lies_on_the_ring():
    yy, xx = np.mgrid[:101, :101]
    r = np.hypot(xx - 50, yy - 50)
    ring = (r > 30) & (r < 40)
    x, y = center_click(ring)
    assert ring[y, x]


def test_correction_click_targets_the_largest_error_with_the_right_sign():
    truth = rect((50, 50), 10, 10, 40, 40)
    missed = truth.copy()
    missed[10:40, 30:40] = 0  # prediction misses a 30x10 strip
    (x, y), positive = correction_click(truth, missed)
    assert positive and 30 <= x < 40 and 10 <= y < 40 and truth[y, x] and not missed[y, x]

    false_alarm = truth | rect((50, 50), 0, 0, 8, 8)
    (x, y), positive = correction_click(truth, false_alarm)
    assert not positive and x < 8 and y < 8
    assert correction_click(truth, truth) is None


def test_box_is_tight_and_end_exclusive():
    assert bounding_box(rect((50, 60), 5, 7, 20, 30)) == [5, 7, 20, 30]
    jittered = bounding_box(rect((50, 60), 5, 7, 20, 30), jitter=0.2, rng=np.random.default_rng(0))
    assert jittered != [5, 7, 20, 30] and 0 <= jittered[0] < jittered[2] <= 60
    with pytest.raises(ValueError, match="empty"):
        bounding_box(np.zeros((4, 4)))


def test_scribbles_stay_inside_their_region():
    truth = rect((128, 128), 20, 30, 100, 60)
    pos = centerline_scribble(truth)
    neg = centerline_scribble(background_band(truth))
    assert pos.any() and neg.any()
    assert truth[pos].all() and not truth[neg].any()
    pred = truth.copy()
    pred[30:60, 70:100] = 0
    s, positive = correction_scribble(truth, pred)
    assert positive and s.any() and (truth & ~pred)[s].all()


def test_click_protocol_accumulates_one_click_per_step():
    truth = rect((40, 40), 5, 5, 30, 30)
    proto = CenterClicks()
    prompts, n = proto.first(truth)
    assert n == 1 and prompts.positive == [(17, 17)]
    pred = np.zeros_like(truth)
    pred[5:30, 5:20] = 1
    prompts, n = proto.correct(truth, pred, prompts)
    assert n == 1 and len(prompts.positive) == 2 and prompts.negative == []
    assert proto.correct(truth, truth, prompts) == (prompts, 0)


def test_scribble_protocol_starts_with_both_signs():
    truth = rect((64, 64), 10, 10, 50, 40)
    prompts, n = CenterlineScribbles().first(truth)
    assert n == 1 and prompts.positive_scribbles.any() and prompts.negative_scribbles.any()


def test_random_prompts_respect_counts_and_sides():
    truth = rect((64, 64), 10, 10, 50, 40)
    for seed in range(30):
        sim = RandomPrompts(np.random.default_rng(seed))
        p = sim.first(truth)
        assert p, "a first step always interacts"
        assert len(p.positive) <= 3 and len(p.negative) <= 3
        assert all(truth[y, x] for x, y in p.positive) and not any(truth[y, x] for x, y in p.negative)
        if p.positive_scribbles is not None:
            assert truth[p.positive_scribbles].all()
        pred = np.zeros_like(truth)
        q = sim.correct(truth, pred, p)
        assert q.count() >= p.count() or q.positive_scribbles is not None


def test_far_negative_clicks_leave_the_band_only_when_asked():
    truth = rect((64, 64), 24, 24, 40, 40)
    band = background_band(truth)
    for p_far, expect_far in ((0.0, False), (1.0, True)):
        negatives = []
        for seed in range(40):
            negatives += RandomPrompts(np.random.default_rng(seed), p_far_negative=p_far).first(truth).negative
        assert negatives and not any(truth[y, x] for x, y in negatives)
        assert any(not band[y, x] for x, y in negatives) == expect_far


def test_corrections_after_a_zero_click_start_are_scribbles_when_asked():
    truth = rect((64, 64), 10, 10, 50, 40)
    prediction = rect((64, 64), 10, 10, 30, 40)  # a context prediction that misses the right half
    for p_scribble, expect_scribbles in ((0.0, False), (1.0, True)):
        for seed in range(10):
            q = RandomPrompts(np.random.default_rng(seed), p_scribble_corrections=p_scribble).correct(
                truth, prediction, Prompts()
            )
            assert (q.positive_scribbles is not None) == expect_scribbles
            assert bool(q.positive) != expect_scribbles
            if expect_scribbles:
                assert truth[q.positive_scribbles].all() and not prediction[q.positive_scribbles].any()


def _medscribble():
    for task in sorted(DATASETS.glob("medscribble_*")):
        if "octa" in task.name:  # vessel masks: annotators scribble across vessels, not along them
            continue
        for f in sorted((task / "scribbles").glob("*.npy")):
            base = f.stem.rsplit("_", 1)[0]
            yield task.name, np.load(f) > 0, np.array(Image.open(task / "masks" / f"{base}.png")) > 0


@pytest.mark.skipif(not DATASETS.exists(), reason="../shared/datasets not present")
def test_simulated_scribbles_look_like_human_ones():
    """Width, length and placement of simulated strokes against the annotators' own (MedScribble)."""
    widths, lengths = [], []
    for _, human, mask in _medscribble():
        for channel, region in ((0, mask), (1, background_band(mask))):
            h = human[channel]
            if not h.any():
                continue
            sim = centerline_scribble(region)
            assert region[sim].all()  # a simulated stroke never leaves its region
            h_len, s_len = skeletonize(h).sum(), skeletonize(sim).sum()
            widths.append((sim.sum() / max(1, s_len)) / (h.sum() / max(1, h_len)))
            lengths.append(s_len / max(1, h_len))
    assert len(widths) >= 20
    assert 0.6 < np.median(widths) < 1.6, np.median(widths)
    assert 0.33 < np.median(lengths) < 3.0, np.median(lengths)
