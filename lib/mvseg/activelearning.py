"""Which image to segment next, so that the whole dataset costs the fewest interactions.

With MultiverSeg every finished image joins the context set, so the order matters. Each strategy scores
the unlabelled images (higher = segment sooner) given what is labelled:

* ``coverage``: k-center greedy on image descriptors (16x16 zero-mean thumbnails, :func:`mvseg.context.describe`):
  the image least like anything labelled. Cold start: the most representative image (highest mean
  similarity to the rest), so the first context entry is typical of the dataset.
* ``uncertainty``: how unsure the zero-click in-context prediction is (mean binary entropy of its
  probabilities on the model grid). Cold start: as coverage.
* ``hybrid``: the mean of the two rank-normalised scores.
* ``confident``: the opposite of uncertainty: the most certain zero-click prediction first, the image the
  model already segments best, so the clicks it needs are few and its label joins the context while the
  harder images wait for a larger context. Cold start: as coverage.
* ``nearest``: the opposite of coverage: the image most like something labelled, whose in-context
  prediction should need the fewest corrections now. If an image's cost grows with its distance to the
  nearest labelled image, this greedy order (Prim's, growing a minimum spanning tree from the first image)
  minimises the summed cost, while coverage's farthest-first order maximises it; and images that end up
  poorly segmented join the context last, after their better-covered neighbours. Cold start: as coverage.
* ``first`` and ``random``: the baselines (file order, shuffled order).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from .context import ContextSet, describe
from .geometry import prepare_image

STRATEGIES = ("random", "first", "coverage", "nearest", "uncertainty", "confident", "hybrid")
SCORING_CONTEXT = 2  # context entries per scoring forward: enough to rank, cheap enough for pools of 500+
SCORING_BATCH = 4  # images per scoring forward: small networks run far faster batched


def descriptors(images: Sequence[np.ndarray], size: int = 128) -> torch.Tensor:
    """``N`` images -> ``N D`` unit-norm descriptors."""
    return torch.stack([describe(prepare_image(im, size)[0]) for im in images])


def coverage_scores(candidates: torch.Tensor, labelled: torch.Tensor) -> np.ndarray:
    """Distance (1 - correlation) of each candidate to its nearest labelled image; with nothing labelled,
    each candidate's mean correlation with the other candidates (representativeness)."""
    if len(labelled) == 0:
        sim = candidates @ candidates.T
        return ((sim.sum(1) - sim.diagonal()) / max(1, len(candidates) - 1)).numpy()
    return (1 - (candidates @ labelled.T).amax(1)).numpy()


def nearest_scores(candidates: torch.Tensor, labelled: torch.Tensor) -> np.ndarray:
    """Correlation of each candidate with its most similar labelled image; with nothing labelled, the
    cold start of :func:`coverage_scores` (representativeness)."""
    if len(labelled) == 0:
        return coverage_scores(candidates, labelled)
    return (candidates @ labelled.T).amax(1).numpy()


def entropy_scores(
    predictor, images: Sequence[np.ndarray], context: ContextSet, k: int = SCORING_CONTEXT
) -> np.ndarray:
    """Mean binary entropy (bits) of each image's zero-click in-context prediction, on the model grid."""
    predictions = predictor.predict_many(images, context.copy(max_size=k), batch_size=SCORING_BATCH, refine=False)
    return np.asarray([mean_entropy(prediction.logits) for prediction in predictions])


def mean_entropy(logits: torch.Tensor) -> float:
    """Mean binary entropy (bits) of a prediction's model-grid logits (``... S S``): 0 certain, 1 a coin toss."""
    p = torch.sigmoid(logits.float()).clamp(1e-6, 1 - 1e-6)
    return float((-(p * p.log2() + (1 - p) * (1 - p).log2())).mean())


def mean_uncertainty(predictions: list) -> float:
    """:func:`mean_entropy` averaged over predictions (the planes of one image or volume), bits."""
    return float(np.mean([mean_entropy(p.logits) for p in predictions]))


def ranks(x: np.ndarray) -> np.ndarray:
    """Scores -> ranks in [0, 1] (ties share a rank), so differently scaled scores can be averaged."""
    if len(x) < 2:
        return np.ones(len(x))
    order = np.argsort(np.argsort(x, kind="stable"), kind="stable")
    return order / (len(x) - 1)


def hybrid_scores(cover: np.ndarray, unsure: np.ndarray) -> np.ndarray:
    """``hybrid``: the mean of the rank-normalised coverage and uncertainty scores, in [0, 1]."""
    return 0.5 * (ranks(cover) + ranks(unsure))


def entropy_strategies(cover: np.ndarray, unsure: np.ndarray) -> dict[str, np.ndarray]:
    """The strategies built on prediction entropy, from the coverage and entropy scores of the same
    candidates: ``uncertainty``, ``confident`` and ``hybrid``."""
    return {"uncertainty": unsure, "confident": -unsure, "hybrid": hybrid_scores(cover, unsure)}


def scores(
    strategy: str,
    candidates: Sequence[np.ndarray],
    labelled: Sequence[np.ndarray],
    predictor=None,
    context: Optional[ContextSet] = None,
    rng: Optional[np.random.Generator] = None,
    candidate_descriptors: Optional[torch.Tensor] = None,
    labelled_descriptors: Optional[torch.Tensor] = None,
) -> np.ndarray:
    """Score ``candidates`` (higher = segment sooner). Descriptors may be passed in when cached."""
    n = len(candidates)
    if strategy == "random":
        return (rng or np.random.default_rng()).random(n)
    if strategy == "first":
        return -np.arange(n, dtype=float)
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy '{strategy}'; choose from {', '.join(STRATEGIES)}")
    size = predictor.size if predictor is not None else 128
    cand = candidate_descriptors if candidate_descriptors is not None else descriptors(candidates, size)
    lab = labelled_descriptors if labelled_descriptors is not None else (
        descriptors(labelled, size) if len(labelled) else cand[:0]
    )
    if strategy == "nearest":
        return nearest_scores(cand, lab)
    cover = coverage_scores(cand, lab)
    if strategy == "coverage" or context is None or len(context) == 0:
        return cover
    if predictor is None:
        raise ValueError(f"strategy '{strategy}' needs a predictor")
    return entropy_strategies(cover, entropy_scores(predictor, candidates, context))[strategy]
