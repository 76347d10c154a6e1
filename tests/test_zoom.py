"""Zoom: the window around the object and the prompts is segmented again on its own grid."""

import numpy as np
import pytest

from mvseg import Predictor, Prompts
from mvseg.zoom import Window, Zoom

from .conftest import disk


def test_window_holds_the_prediction_and_every_prompt_with_a_margin():
    mask = np.zeros((400, 600), np.uint8)
    mask[100:120, 200:240] = 1
    w = Zoom(margin=0.25, min_side=8).window(mask, Prompts(positive=[(210, 110)], negative=[(250, 140)]))
    # box rows 100..140, cols 200..250: side 51, grown to 76.5 around its centre (120.5, 225.5)
    assert (w.top, w.bottom, w.left, w.right) == (82, 159, 187, 264)
    assert w.top <= 100 and w.bottom >= 141 and w.left <= 200 and w.right >= 251


def test_window_is_clipped_to_the_image_and_never_smaller_than_min_side():
    mask = np.zeros((200, 300), np.uint8)
    w = Zoom(min_side=40).window(mask, Prompts(positive=[(1, 198)]))
    assert (w.top, w.bottom, w.left, w.right) == (178, 200, 0, 21)
    w = Zoom(min_side=40).window(mask, Prompts(positive=[(150, 100)]))
    assert (w.bottom - w.top, w.right - w.left) == (40, 40)


def test_no_window_without_prompts_or_when_it_would_cover_most_of_the_image():
    mask = np.zeros((200, 200), np.uint8)
    assert Zoom().window(mask, Prompts()) is None
    mask[20:180, 20:180] = 1  # side 160 grows past 0.8 x 200
    assert Zoom().window(mask, Prompts(positive=[(100, 100)])) is None
    assert Zoom(max_side=0.99, margin=0).window(mask, Prompts(positive=[(100, 100)])) is not None


def test_strokes_count_towards_the_window():
    mask = np.zeros((300, 300), np.uint8)
    stroke = np.zeros((300, 300), np.uint8)
    stroke[200, 40:60] = 1
    w = Zoom(margin=0, min_side=1).window(mask, Prompts(negative_scribbles=stroke))
    assert (w.top, w.bottom, w.left, w.right) == (190, 210, 40, 60)


def test_prompts_are_cut_to_the_window_and_moved_into_its_coordinates():
    w = Window(top=10, bottom=50, left=20, right=80)
    pos = np.zeros((100, 100), np.uint8)
    pos[30, 25:35] = 1
    neg = np.zeros((100, 100), np.uint8)
    neg[90, 0:10] = 1  # outside: dropped
    p = w.prompts(Prompts(positive=[(25, 15), (5, 5)], negative=[(79, 49), (80, 49)], box=[0, 0, 90, 90],
                          positive_scribbles=pos, negative_scribbles=neg))
    assert p.positive == [(5, 5)] and p.negative == [(59, 39)]
    assert p.box is None and p.negative_scribbles is None
    assert p.positive_scribbles.shape == (40, 60) and p.positive_scribbles[20, 5:15].all()


def test_window_paste_changes_only_the_window():
    a = np.zeros((10, 10), np.float32)
    out = Window(2, 5, 3, 7).paste(a, np.ones((3, 4), np.float32))
    assert out.sum() == 12 and out[2:5, 3:7].all() and a.sum() == 0


@pytest.mark.parametrize("bad", [dict(max_side=0), dict(max_side=1), dict(margin=-0.1), dict(min_side=0)])
def test_bad_settings_are_rejected(bad):
    with pytest.raises(ValueError):
        Zoom(**bad)


class FixedWindow(Zoom):
    """The window is the zoom's own business (tested above); the random tiny network's mask is not."""

    def window(self, mask, prompts):
        return Window(top=100, bottom=200, left=150, right=270)


def stroke_at(shape, row, cols):
    s = np.zeros(shape, np.uint8)
    s[row, cols[0] : cols[1]] = 1
    return s


def test_zoom_applies_to_strokes_without_context_only():
    stroke = stroke_at((50, 50), 10, (5, 20))
    assert Zoom.applies(Prompts(positive_scribbles=stroke), with_context=False)
    assert Zoom.applies(Prompts(positive=[(1, 1)], negative_scribbles=stroke), with_context=False)
    assert not Zoom.applies(Prompts(positive_scribbles=stroke), with_context=True)
    assert not Zoom.applies(Prompts(positive=[(1, 1)], box=[0, 0, 9, 9]), with_context=False)
    assert not Zoom.applies(Prompts(), with_context=False) and not Zoom.applies(None, with_context=False)


def spy(predictor, monkeypatch) -> list:
    calls = []
    whole = predictor._predict_whole
    monkeypatch.setattr(predictor, "_predict_whole", lambda *a: calls.append(a) or whole(*a))
    return calls


def test_predictor_segments_the_window_again_and_pastes_it_back(tiny_models, monkeypatch):
    mvs, _ = tiny_models
    image = (np.random.default_rng(0).random((300, 400)) * 255).astype(np.uint8)
    prompts = Prompts(positive_scribbles=stroke_at((300, 400), 150, (190, 230)), negative=[(10, 10)])
    plain = Predictor(mvs, device="cpu").predict(image, prompts)
    zoomed = Predictor(mvs, device="cpu", zoom=FixedWindow())
    calls = spy(zoomed, monkeypatch)
    result = zoomed.predict(image, prompts)

    assert len(calls) == 2
    crop, crop_prompts, crop_context, seen, _ = calls[1]
    assert np.array_equal(crop, image[100:200, 150:270])
    assert crop_prompts.negative == [] and crop_prompts.positive_scribbles[50, 40:80].all()  # (10, 10) is outside
    assert crop_context is None and seen.shape == (1, 128, 128)
    part = Predictor(mvs, device="cpu").predict(crop, crop_prompts, previous=seen)
    assert np.array_equal(result.mask[100:200, 150:270], part.mask)
    outside = np.ones(plain.mask.shape, bool)
    outside[100:200, 150:270] = False
    assert np.array_equal(result.mask[outside], plain.mask[outside])
    assert np.array_equal(result.mask, (result.probability >= 0.5).astype(np.uint8))
    assert result.logits.shape == (1, 128, 128)
    # the next stroke refines the pasted result: its logits are that probability on the model grid
    more = Prompts(positive_scribbles=prompts.positive_scribbles, negative_scribbles=stroke_at((300, 400), 120, (0, 9)))
    again = zoomed.predict(image, more, previous=result)
    assert calls[2][3] is result.logits and again.mask.shape == (300, 400)


def test_predictor_does_not_zoom_with_context_clicks_alone_or_zero_click(tiny_models, monkeypatch):
    mvs, _ = tiny_models
    image = np.random.default_rng(1).random((300, 400))
    zoomed = Predictor(mvs, device="cpu", zoom=FixedWindow())
    context = zoomed.new_context()
    context.add("a", image, disk((300, 400), (150, 200), 20))
    calls = spy(zoomed, monkeypatch)
    zoomed.predict(image, None, context)
    zoomed.predict(image, Prompts(positive=[(100, 100)]))
    zoomed.predict(image, Prompts(positive_scribbles=stroke_at((300, 400), 100, (90, 110))), context)
    assert len(calls) == 3
    zoomed.predict(image, Prompts(positive_scribbles=stroke_at((300, 400), 100, (90, 110))))
    assert len(calls) == 5
