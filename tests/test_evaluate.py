"""The evaluation CLI end to end on a tiny task, and its bookkeeping on a scripted user."""

import json

import numpy as np
import pytest
from PIL import Image

from mvseg import Prediction, save_checkpoint
from mvseg.evaluate import dice, main, on_grid, segment_one, summarise
from mvseg.interaction import CenterClicks

from .conftest import disk


@pytest.fixture
def tiny_task(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "task" / "images").mkdir(parents=True)
    (tmp_path / "task" / "masks").mkdir()
    for i in range(5):
        mask = disk((48, 64), (20 + 4 * i, 24), 9 + i)
        image = (mask * 150 + rng.integers(0, 60, mask.shape)).astype(np.uint8)
        Image.fromarray(image).save(tmp_path / "task" / "images" / f"case{i}.png")
        Image.fromarray(mask * 255).save(tmp_path / "task" / "masks" / f"case{i}.png")
    return tmp_path / "task"


def run_cli(tmp_path, task, models, *args: str):
    """``python -m mvseg.evaluate`` on ``task`` with the tiny MultiverSeg; returns the output folder."""
    save_checkpoint(models[0], tmp_path / "w.pt")
    out = tmp_path / "out"
    main(["--task", str(task), "--weights", str(tmp_path / "w.pt"), *args, "--out", str(out)])
    return out


def test_cli_end_to_end(tmp_path, tiny_task, tiny_models):
    out = run_cli(tmp_path, tiny_task, tiny_models, "--images", "3", "--runs", "2",
                  "--modes", "context", "none", "oracle")
    runs = json.loads((out / "runs.json").read_text())
    assert set(runs["task"]) == {"context", "none", "oracle"}
    assert all(len(run) == 4 for mode in runs["task"].values() for run in mode)  # seed + 3 images
    for run in runs["task"]["context"]:
        for r in run:
            assert 0 <= r["interactions"] <= 20 and r["dice"][0] >= 0
    summary = json.loads((out / "summary.json").read_text())["task"]
    assert summary["none"]["reduction_vs_none_pct"] == 0
    assert len(summary["context"]["noi_by_index"]) == 4
    assert (out / "noi90.png").stat().st_size > 1000 and "| task |" in (out / "summary.md").read_text()


def test_an_image_with_an_empty_mask_is_left_out_not_fatal(tmp_path, tiny_task, tiny_models):
    """It stopped the whole evaluation once drawn ('cannot click on an empty mask'), with nothing written."""
    Image.fromarray(np.zeros((48, 64), np.uint8)).save(tiny_task / "masks" / "case0.png")
    out = run_cli(tmp_path, tiny_task, tiny_models, "--images", "3", "--runs", "2", "--modes", "none")
    runs = json.loads((out / "runs.json").read_text())["task"]["none"]
    assert all(r["id"] != "case0" for run in runs for r in run) and all(len(run) == 4 for run in runs)


@pytest.mark.parametrize("args, message", [
    (["--runs", "0"], "--runs must be at least 1"),
    (["--images", "-1"], "--images must be at least 1"),
    (["--budget", "-3"], "--budget must be at least 0"),
    (["--ids", "LIST"], "must hold a JSON object"),
    (["--ids", "STRING"], "must be a list of names"),
])
def test_arguments_that_cannot_be_measured_are_refused(tmp_path, tiny_task, tiny_models, capsys, args, message):
    (tmp_path / "list.json").write_text('["case1"]')
    (tmp_path / "string.json").write_text('{"task": "case1case2"}')  # was read letter by letter
    args = [{"LIST": str(tmp_path / "list.json"), "STRING": str(tmp_path / "string.json")}.get(a, a) for a in args]
    with pytest.raises(SystemExit):
        run_cli(tmp_path, tiny_task, tiny_models, *args)
    assert message in capsys.readouterr().err


def test_bad_folders_stop_before_the_first_run_and_results_are_never_overwritten(tmp_path, tiny_task,
                                                                                  tiny_models, capsys):
    """A missing task or a corrupt image was a traceback (hours in, for a later --task); a second evaluation
    into the same --out replaced the first one's results."""
    (tiny_task / "images" / "case2.png").write_bytes(b"not a png")
    for task in (tmp_path / "nowhere", tiny_task):
        with pytest.raises(SystemExit):
            run_cli(tmp_path, task, tiny_models, "--images", "1", "--runs", "1", "--modes", "none")
        assert f"--task {task}" in capsys.readouterr().err
    (tiny_task / "images" / "case2.png").unlink()
    out = run_cli(tmp_path, tiny_task, tiny_models, "--images", "1", "--runs", "1", "--modes", "none")
    first = (out / "runs.json").read_bytes()
    with pytest.raises(SystemExit):
        run_cli(tmp_path, tiny_task, tiny_models, "--images", "2", "--runs", "1", "--modes", "none")
    assert "holds results already" in capsys.readouterr().err and (out / "runs.json").read_bytes() == first


def test_budget_zero_measures_zero_click_only(tmp_path, tiny_task, tiny_models):
    out = run_cli(tmp_path, tiny_task, tiny_models, "--images", "3", "--runs", "1",
                  "--modes", "context", "oracle", "--order", "random", "coverage", "--budget", "0")
    runs = json.loads((out / "runs.json").read_text())["task"]
    assert set(runs) == {"context", "oracle", "context/coverage", "oracle/coverage"}
    for mode, (run,) in runs.items():
        assert [len(r["dice"]) for r in run] == [1] * 4 and all(r["interactions"] == 0 for r in run)
        assert run[0]["dice"] == [0.0]  # the seed image has no context and gets no clicks
    # a seed image left short of 90% Dice joins the context as its ground truth (finished by hand), so
    # later images get a real zero-click prediction in both modes
    assert any(r["dice"][0] > 0 for r in runs["oracle"][0][1:])
    assert any(r["dice"][0] > 0 for r in runs["context"][0][1:])


def test_leave_one_out_gives_each_image_every_other_ground_truth(tmp_path, tiny_task, tiny_models, monkeypatch):
    import mvseg.evaluate as evaluate

    seen = []
    segment = evaluate.segment_one

    def spy(predictor, example, context, *args):
        if context is not None:  # the none mode has no context
            labelled = all(context.get(k).label.any() for k in context.ids())
            seen.append((example.id, sorted(context.ids()), labelled))
        return segment(predictor, example, context, *args)

    monkeypatch.setattr(evaluate, "segment_one", spy)
    out = run_cli(tmp_path, tiny_task, tiny_models, "--images", "3", "--runs", "1",
                  "--modes", "leave-one-out", "none", "--order", "random", "coverage", "--budget", "0")
    runs = json.loads((out / "runs.json").read_text())["task"]
    assert set(runs) == {"leave-one-out", "none"}  # no order: every image sees the same context whatever it is
    pool = sorted(r["id"] for r in runs["leave-one-out"][0])
    assert len(pool) == 4 and [r["index"] for r in runs["leave-one-out"][0]] == [0, 1, 2, 3]
    assert len(seen) == 4
    for image, ids, labelled in seen:  # the seed image too: all the others, never itself, with their masks
        assert ids == [i for i in pool if i != image] and labelled
    assert all(len(r["dice"]) == 1 for r in runs["leave-one-out"][0])


def test_model_size_sets_the_network_grid(tmp_path, tiny_task, tiny_models, monkeypatch, capsys):
    from mvseg.predictor import Predictor

    seen = set()
    forward = Predictor.forward

    def spy(self, target, *context):
        seen.add(tuple(target.shape[-2:]))
        return forward(self, target, *context)

    monkeypatch.setattr(Predictor, "forward", spy)
    run_cli(tmp_path, tiny_task, tiny_models, "--images", "2", "--runs", "1", "--model-size", "32", "--budget", "1")
    assert seen == {(32, 32)}
    with pytest.raises(SystemExit):
        run_cli(tmp_path, tiny_task, tiny_models, "--model-size", "30")
    assert "size 30 must be a positive multiple of" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flag, served", [((), (True, True)), (("--no-refine",), (False, True)), (("--no-zoom",), (True, False))]
)
def test_refinement_and_zoom_are_on_as_served_unless_switched_off(
    tmp_path, tiny_task, tiny_models, monkeypatch, flag, served
):
    from mvseg.predictor import Predictor

    seen = []
    init = Predictor.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        seen.append((self.refiner is not None, self.zoom is not None))

    monkeypatch.setattr(Predictor, "__init__", spy)
    run_cli(tmp_path, tiny_task, tiny_models, "--images", "1", "--runs", "1", "--budget", "0", *flag)
    assert seen == [served]


def test_seed_label_is_ninety_percent_or_ground_truth_later_labels_are_predictions():
    from mvseg.data import Example
    from mvseg.evaluate import run_once

    truth = disk((40, 40), (20, 20), 12).astype(bool)
    examples = [Example(f"x{i}", truth.astype(np.uint8) * 200, truth) for i in range(3)]

    class Stuck:  # every prediction is the top half of the object: Dice 2/3, never 90%
        size = 128

        def __init__(self):
            self.added = []

        def new_context(self):
            test = self

            class Recorder(list):
                def add(self, key, image, mask):
                    test.added.append((key, np.asarray(mask).copy()))
                    self.append(key)

            return Recorder()

        def predict(self, image, prompts, context, previous=None):
            half = truth.copy()
            half[20:] = False
            return Prediction(half.astype(np.float32), half, logits=None)

    predictor = Stuck()
    results = run_once(predictor, examples, "context", "clicks", budget=3)
    assert [r.interactions for r in results] == [3, 3, 3] and not any(r.reached for r in results)
    (_, seed), (_, second), (_, third) = predictor.added
    assert (seed == truth).all()  # the seed, short of 90%, is finished by hand
    assert second.sum() == third.sum() < truth.sum()  # the others join as predicted


def test_zero_click_only_with_an_untrusted_context_shows_nothing_and_keeps_going():
    """``--budget 0`` with the bundled pair: a context below the trust threshold gives no proposal, and the
    image joined the context as ``final.mask`` of no prediction (AttributeError)."""
    from mvseg.data import Example
    from mvseg.evaluate import run_once
    from mvseg.predictor import NOTHING

    truth = disk((40, 40), (20, 20), 12).astype(bool)
    examples = [Example(f"x{i}", truth.astype(np.uint8) * 200, truth) for i in range(3)]
    added = []

    class Untrusting:
        size = 128

        def new_context(self):
            class Recorder(list):
                def add(self, key, image, mask):
                    added.append(key)
                    self.append(key)

            return Recorder()

        def predict(self, image, prompts, context, previous=None):
            nothing = np.zeros_like(truth)
            return Prediction(nothing.astype(np.float32), nothing, logits=None, network=NOTHING)

    results = run_once(Untrusting(), examples, "context", "clicks", budget=0)
    assert [(r.interactions, r.reached, r.dice) for r in results] == [(0, False, [0.0])] * 3
    assert added == ["x0"]  # the seed, finished by hand; nothing was shown of the others


def test_paper_grid_pads_square_and_resizes(tmp_path, tiny_task, tiny_models, monkeypatch):
    from mvseg.data import Example

    mask = np.zeros((40, 80), bool)
    mask[10:30, 60:80] = True  # touches the right edge
    image = np.where(mask, 200, 50).astype(np.uint8)
    e = on_grid(Example("x", image, mask), 64)
    assert e.image.shape == e.mask.shape == (64, 64) and e.image.dtype == np.float32
    # 80 px side -> 64: rows 20..60 of the padded square hold the image, i.e. grid rows 16..48
    assert not e.mask[:16].any() and not e.mask[48:].any() and e.image[:16].max() == 0
    assert e.mask[:, -1].any() and abs(e.mask.sum() - 20 * 20 * 0.8 ** 2) <= 16
    assert abs(e.image[e.mask].mean() - 1.0) < 0.05  # intensities normalised to [0, 1]

    from mvseg import Predictor

    shapes, predict = set(), Predictor.predict
    monkeypatch.setattr(Predictor, "predict", lambda self, image, *a, **k: shapes.add(image.shape) or predict(
        self, image, *a, **k))
    out = run_cli(tmp_path, tiny_task, tiny_models, "--images", "2", "--runs", "1", "--size", "32")
    assert shapes == {(32, 32)}  # the task's 48 x 64 images never reach the model
    assert json.loads((out / "settings.json").read_text())["size"] == 32
    with pytest.raises(SystemExit):
        run_cli(tmp_path, tiny_task, tiny_models, "--size", "0")


def test_an_untrusted_context_shows_no_proposal_and_leaves_scribbles_as_without_context(tiny_task, tiny_models):
    """With a context set the predictor does not trust (``Predictor.trusts``) the user sees no proposal and
    starts as on a first image; with scribbles each image then goes exactly as in the run without context,
    clicks still use the context."""
    from mvseg import Predictor
    from mvseg.data import load_task
    from mvseg.evaluate import run_once

    examples = load_task(tiny_task)
    runs = {}
    for trust in (0.0, 1.0):
        predictor = Predictor(tiny_models[0], device="cpu", trust=trust)
        for mode in ("context", "none"):
            for protocol in ("scribbles", "clicks"):
                results = run_once(predictor, examples, mode, protocol, budget=3)
                runs[trust, mode, protocol] = [r.dice for r in results]
    assert runs[1.0, "context", "scribbles"] == runs[1.0, "none", "scribbles"] == runs[0.0, "none", "scribbles"]
    assert all(d[0] == 0.0 for d in runs[1.0, "context", "clicks"])  # no proposal
    assert runs[1.0, "context", "clicks"] != runs[1.0, "none", "clicks"]  # the clicks' context
    assert runs[0.0, "context", "scribbles"] != runs[0.0, "none", "scribbles"]  # trusted: proposals


class ScriptedPredictor:
    """Grows the predicted disk by one step per click: the n-th prediction covers n/4 of the object."""

    def __init__(self, truth):
        self.truth, self.calls = truth, 0

    def predict(self, image, prompts, context, previous=None):
        self.calls += 1
        mask = np.zeros_like(self.truth, dtype=np.uint8)
        rows = np.nonzero(self.truth.any(1))[0]
        keep = rows[: int(len(rows) * min(1.0, self.calls / 4))]
        mask[keep] = self.truth[keep]
        return Prediction(mask.astype(np.float32), mask, logits=None)


def test_interactions_are_counted_until_ninety_percent_dice():
    from mvseg.data import Example

    truth = disk((40, 40), (20, 20), 12).astype(bool)
    result, final = segment_one(ScriptedPredictor(truth), Example("x", truth, truth), None, CenterClicks(), 20)
    # after k clicks the prediction covers k/4 of the rows: Dice >= 0.9 first at k = 4
    assert result.interactions == 4 and result.reached
    assert len(result.dice) == 5 and result.dice[-1] == dice(final.mask, truth) == 1.0


def test_summary_reduction_and_ci():
    rec = lambda n: {"interactions": n, "reached": n < 20, "dice": [0.5, 0.95]}  # noqa: E731
    records = {"t": {"none": [[rec(4), rec(4)], [rec(4), rec(4)]], "context": [[rec(4), rec(0)], [rec(4), rec(2)]]}}
    s = summarise(records, "clicks", 0)["t"]
    assert s["none"]["total_mean"] == 8 and s["context"]["total_mean"] == 5
    assert s["context"]["reduction_vs_none_pct"] == pytest.approx(37.5)
    assert s["context"]["noi_by_index"] == [4, 1]
    lo, hi = s["context"]["total_ci95"]
    assert 4 <= lo <= 5 <= hi <= 6
