"""Next-image strategies on small constructed pools, and the evaluation CLI's ``--order``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mvseg import ContextSet, Prediction
from mvseg.activelearning import coverage_scores, descriptors, entropy_scores, nearest_scores, scores

from .conftest import disk
from .test_evaluate import run_cli, tiny_task  # noqa: F401  (tiny_task: a fixture)


def disk_image(x: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (disk((64, 64), (x, 32), 12) * 150 + rng.integers(0, 30, (64, 64))).astype(np.uint8)


def stripes(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return ((np.arange(64)[None, :] // 8 % 2) * 200 + rng.integers(0, 30, (64, 64))).astype(np.uint8)


def test_coverage_picks_the_outlier_once_something_is_labelled():
    pool = [disk_image(30 + i, i) for i in range(5)] + [stripes(9)]
    labelled = [disk_image(32, 99)]
    s = scores("coverage", pool, labelled)
    assert int(np.argmax(s)) == 5


def test_coverage_cold_start_picks_a_representative_image():
    pool = [disk_image(30 + i, i) for i in range(5)] + [stripes(9)]
    s = scores("coverage", pool, [])
    assert int(np.argmax(s)) != 5 and int(np.argmin(s)) == 5


def test_coverage_scores_are_distances_to_the_nearest_labelled():
    d = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    s = coverage_scores(d, d[:1])
    assert s[0] == pytest.approx(0.0, abs=1e-6) and (s[1:] > 0).all()


def test_nearest_picks_the_image_most_like_a_labelled_one():
    pool = [disk_image(20, 1), disk_image(44, 2), stripes(9)]
    s = scores("nearest", pool, [disk_image(45, 99)])
    assert int(np.argmax(s)) == 1  # the disk beside the labelled one, not the far disk or the stripes
    assert np.allclose(scores("nearest", pool, []), scores("coverage", pool, []))  # same cold start
    d = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    assert np.allclose(nearest_scores(d, d[:2]), 1 - coverage_scores(d, d[:2]), atol=1e-6)


class StubPredictor:
    """Confident on bright images, unsure on dark ones."""

    size = 32

    def new_context(self):
        return ContextSet(self.size)

    def predict_many(self, images, context, batch_size=4, refine=True):
        out = []
        for im in images:
            level = 8.0 if im.mean() > 100 else 0.1
            logits = torch.full((1, self.size, self.size), level)
            out.append(Prediction(np.zeros(im.shape), np.zeros(im.shape, np.uint8), logits))
        return out


def test_uncertainty_prefers_the_image_the_model_is_unsure_about():
    predictor = StubPredictor()
    context = predictor.new_context()
    context.add("a", disk_image(32, 0), disk((64, 64), (32, 32), 12))
    bright, dark = np.full((64, 64), 200, np.uint8), np.full((64, 64), 20, np.uint8)
    s = entropy_scores(predictor, [bright, dark], context)
    assert s[1] > s[0]
    assert int(np.argmax(scores("uncertainty", [bright, dark], [disk_image(32, 0)], predictor, context))) == 1
    hybrid = scores("hybrid", [bright, dark], [disk_image(32, 0)], predictor, context)
    assert hybrid.shape == (2,) and (0 <= hybrid).all() and (hybrid <= 1).all()


def test_confident_prefers_the_image_the_model_is_sure_about_and_starts_cold_as_coverage():
    predictor = StubPredictor()
    context = predictor.new_context()
    context.add("a", disk_image(32, 0), disk((64, 64), (32, 32), 12))
    bright, dark = np.full((64, 64), 200, np.uint8), np.full((64, 64), 20, np.uint8)
    assert int(np.argmax(scores("confident", [bright, dark], [disk_image(32, 0)], predictor, context))) == 0
    pool = [disk_image(30 + i, i) for i in range(5)] + [stripes(9)]
    cold = scores("confident", pool, [], predictor, predictor.new_context())
    assert np.allclose(cold, scores("coverage", pool, [], predictor))


def test_unknown_strategy_is_an_error():
    with pytest.raises(ValueError, match="unknown strategy"):
        scores("best", [disk_image(30, 0)], [])


def test_descriptors_are_unit_norm():
    d = descriptors([disk_image(30, 0), stripes(1)], 32)
    assert torch.allclose(d.norm(dim=1), torch.ones(2), atol=1e-5)


def test_evaluate_orders_end_to_end(tmp_path, tiny_task, tiny_models):  # noqa: F811
    out = run_cli(tmp_path, tiny_task, tiny_models, "--images", "2", "--runs", "1",
                  "--modes", "context", "none", "--order", "random", "first", "coverage", "hybrid")
    summary = json.loads((out / "summary.json").read_text())["task"]
    assert set(summary) == {"context", "context/first", "context/coverage", "context/hybrid", "none"}
    assert "reduction_vs_random_pct" in summary["context/coverage"]
    runs = json.loads((out / "runs.json").read_text())["task"]
    first_ids = [r["id"] for r in runs["context/first"][0]]
    assert first_ids == sorted(first_ids)
