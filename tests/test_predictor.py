"""The predictor: prompts and context in, a mask on the original grid out."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from mvseg import MultiverSegNet, Prediction, Predictor, Prompts
from mvseg.network import MultiverSegConfig

from .conftest import disk


@pytest.fixture
def predictor(tiny_models):
    mvs, sp = tiny_models
    return Predictor(mvs, fallback=sp, device="cpu")


@pytest.mark.parametrize(
    "img",
    [
        np.random.default_rng(0).integers(0, 255, (77, 131, 3), dtype=np.uint8),  # RGB, odd, wide
        np.random.default_rng(1).integers(0, 65535, (131, 77), dtype=np.uint16),  # 16-bit, odd, tall
    ],
)
def test_prediction_is_on_the_original_grid(predictor, img):
    h, w = img.shape[:2]
    p = predictor.predict(img, Prompts(positive=[(50, 30)], negative=[(0, 0)], box=[10, 10, 70, 60]))
    assert isinstance(p, Prediction)
    assert p.probability.shape == (h, w) and p.mask.shape == (h, w)
    assert p.probability.dtype == np.float32 and p.mask.dtype == np.uint8
    assert np.array_equal(p.mask, (p.probability >= 0.5).astype(np.uint8))
    assert p.logits.shape == (1, 128, 128)


def test_empty_context_uses_scribbleprompt_when_loaded(tiny_models):
    mvs, sp = tiny_models
    img = np.random.default_rng(0).random((64, 64))
    with_sp = Predictor(mvs, fallback=sp, device="cpu")
    p = with_sp.predict(img, Prompts(positive=[(10, 10)]))
    assert p.network == "scribbleprompt"
    ctx = with_sp.new_context()
    ctx.add("a", img, disk((64, 64), (30, 30), 10))
    assert with_sp.predict(img, Prompts(positive=[(10, 10)]), ctx).network == "multiverseg"
    alone = Predictor(mvs, device="cpu")
    q = alone.predict(img, Prompts(positive=[(10, 10)]))
    assert q.network == "multiverseg"  # dummy 0.5 context entry inside the network


def test_matches_the_network_called_directly(tiny_models):
    """predict() = geometry + encoding + network: check against doing those steps by hand."""
    mvs, _ = tiny_models
    pred = Predictor(mvs, device="cpu")
    img = (np.random.default_rng(1).random((128, 128)) * 255).astype(np.uint8)
    ctx = pred.new_context()
    ctx.add("a", img, disk((128, 128), (60, 60), 20))
    p = pred.predict(img, Prompts(positive=[(60, 60)]), ctx)
    from mvseg import encode_prompts, prepare_image

    model_image, _ = prepare_image(img)
    target = encode_prompts(model_image[None], torch.tensor([[[60, 60]]]), torch.tensor([[1]]))
    ci, cl = ctx.tensors(["a"])
    with torch.inference_mode():
        logits = mvs(target, ci[None], cl[None])
    assert torch.allclose(p.logits, logits[0], atol=1e-5)
    assert np.allclose(p.probability, torch.sigmoid(logits[0, 0]).numpy(), atol=1e-5)


def test_previous_prediction_feeds_the_fifth_channel(predictor, monkeypatch):
    img = np.random.default_rng(2).random((40, 50))
    first = predictor.predict(img, Prompts(positive=[(20, 20)]))
    seen = {}
    real = predictor.forward

    def spy(target, ci, cl):
        seen["target"] = target
        return real(target, ci, cl)

    monkeypatch.setattr(predictor, "forward", spy)
    predictor.predict(img, Prompts(positive=[(20, 20)], negative=[(5, 5)]), previous=first)
    assert torch.equal(seen["target"][0, 4], first.logits[0])


def test_predict_many_matches_predict(tiny_models):
    mvs, _ = tiny_models
    pred = Predictor(mvs, device="cpu")
    rng = np.random.default_rng(3)
    ctx = pred.new_context()
    for i in range(3):
        ctx.add(i, rng.random((70, 90)), disk((70, 90), (40, 30), 15))
    images = [rng.random((70 + 10 * i, 90)) for i in range(5)]
    many = pred.predict_many(images, ctx, batch_size=2)
    for img, p in zip(images, many):
        one = pred.predict(img, None, ctx)
        assert p.mask.shape == img.shape
        assert np.abs(p.probability - one.probability).max() < 1e-4
        assert p.context_ids == one.context_ids and p.context_version == ctx.version


def _seven_entries(tiny_models):
    """A predictor that takes at most 3 context entries, a context set of 7, and the random stream."""
    mvs, _ = tiny_models
    pred = Predictor(mvs, device="cpu", max_context=3)
    ctx = pred.new_context()
    rng = np.random.default_rng(4)
    for i in range(7):
        ctx.add(i, rng.random((32, 32)), disk((32, 32), (16, 16), 5))
    return pred, ctx, rng


def test_context_is_capped_by_selection(tiny_models):
    pred, ctx, rng = _seven_entries(tiny_models)
    p = pred.predict(rng.random((32, 32)), Prompts(positive=[(16, 16)]), ctx)
    assert len(p.context_ids) == 3


def test_a_context_changed_by_another_thread_meanwhile(tiny_models, monkeypatch):
    """The predictor picked ids, then asked for their tensors: an entry another thread removed in between
    was a KeyError. Now it works on one state of the set, and reports that state's version."""
    import mvseg.context

    pred, ctx, rng = _seven_entries(tiny_models)
    version, describe = ctx.version, mvseg.context.describe

    def describe_while_another_thread_edits(image):
        for key in ctx.ids():  # the other thread empties the set while this one ranks its entries
            ctx.remove(key)
        return describe(image)

    monkeypatch.setattr(mvseg.context, "describe", describe_while_another_thread_edits)
    p = pred.predict(rng.random((32, 32)), Prompts(positive=[(16, 16)]), ctx)
    assert len(p.context_ids) == 3 and p.context_version == version and len(ctx) == 0


@pytest.mark.parametrize("previous, message", [
    (torch.full((1, 32, 32), float("nan")), "NaN"),  # a NaN probability and an empty mask before
    (torch.zeros(1, 16, 16), "model-grid logits"),
    (np.zeros((1, 32, 32), np.float32), "model-grid logits"),
])
def test_a_previous_prediction_that_is_not_one_is_refused(tiny_models, previous, message):
    mvs, _ = tiny_models
    pred = Predictor(mvs, device="cpu", size=32)
    with pytest.raises(ValueError, match=message):
        pred.predict(np.random.default_rng(5).random((32, 32)), Prompts(positive=[(3, 3)]), previous=previous)


def test_bfloat16_runs(tiny_models):
    mvs, _ = tiny_models
    pred = Predictor(mvs, device="cpu", dtype=torch.bfloat16)
    p = pred.predict(np.random.default_rng(5).random((32, 32)), Prompts(positive=[(3, 3)]))
    assert np.isfinite(p.probability).all()


@pytest.mark.parametrize("native, width, expected", [(True, 8, "bfloat16"), (False, 8, "float32"), (True, 128, "float32")])
def test_auto_dtype_takes_bfloat16_for_narrow_networks_on_cpus_that_have_it(monkeypatch, native, width, expected):
    import mvseg.predictor
    from mvseg import MultiverSegConfig, MultiverSegNet

    monkeypatch.setattr(mvseg.predictor, "cpu_has_bfloat16", lambda: native)
    model = MultiverSegNet(MultiverSegConfig(encoder_widths=[width] * 4))
    pred = Predictor(model, device="cpu", dtype="auto")
    assert pred.dtype == getattr(torch, expected)
    assert np.isfinite(pred.predict(np.random.default_rng(6).random((32, 32)), Prompts(positive=[(3, 3)])).probability).all()
    with pytest.raises(ValueError, match="dtype"):
        Predictor(model, device="cpu", dtype="float16")


def test_cpu_bfloat16_support_is_read_from_cpuinfo(tmp_path):
    from mvseg.predictor import cpu_has_bfloat16

    x86, arm, old = tmp_path / "x86", tmp_path / "arm", tmp_path / "old"
    x86.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 avx512_vnni\n")
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n")
    old.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512bw\n")
    assert cpu_has_bfloat16(x86) and cpu_has_bfloat16(arm)
    assert not cpu_has_bfloat16(old) and not cpu_has_bfloat16(tmp_path / "missing")


@pytest.mark.parametrize(
    "image, prompts, message",
    [
        (np.full((20, 20), np.nan), Prompts(positive=[(1, 1)]), "NaN"),
        (np.zeros((0, 20)), Prompts(positive=[(1, 1)]), "empty"),
        (np.zeros((20, 30)), Prompts(positive=[(30, 5)]), r"outside the image"),
        (np.zeros((20, 30)), Prompts(negative=[(5, -1)]), r"negative click .* outside"),
        (np.zeros((20, 30)), Prompts(box=[20, 2, 10, 8]), "x1 <= x2"),
        (np.zeros((20, 30)), Prompts(positive_scribbles=np.ones((30, 20))), r"scribble has shape \(30, 20\)"),
    ],
)
def test_bad_input_raises_value_error(predictor, image, prompts, message):
    with pytest.raises(ValueError, match=message):
        predictor.predict(image, prompts)


def test_context_on_another_grid_is_rejected(predictor):
    from mvseg import ContextSet

    ctx = ContextSet(size=64)
    ctx.add("a", np.eye(10), np.eye(10))
    with pytest.raises(ValueError, match="64 grid"):
        predictor.predict(np.eye(10), Prompts(positive=[(1, 1)]), ctx)


def test_wrong_model_kind_is_rejected(tiny_models):
    mvs, sp = tiny_models
    with pytest.raises(ValueError, match="MultiverSegNet"):
        Predictor(sp, device="cpu")
    with pytest.raises(ValueError, match="ScribblePromptUNet or MultiverSegNet"):
        Predictor(mvs, fallback=torch.nn.Linear(2, 2), device="cpu")


def test_a_multiverseg_fallback_segments_the_empty_context_alone(tiny_models):
    """A MultiverSegNet in the fallback slot (as the bundled first-image weights are) answers every
    prediction without context, with the same logits as calling it directly; the context goes to the model."""
    mvs, _ = tiny_models
    torch.manual_seed(1)
    first = MultiverSegNet(MultiverSegConfig(encoder_widths=[8, 8, 8, 8])).eval()
    pred = Predictor(mvs, fallback=first, device="cpu")
    img = (np.random.default_rng(3).random((128, 128)) * 255).astype(np.uint8)
    p = pred.predict(img, Prompts(positive=[(60, 60)]))
    assert p.network == "first-image" and p.context_ids == []
    from mvseg import encode_prompts, prepare_image

    target = encode_prompts(prepare_image(img)[0][None], torch.tensor([[[60, 60]]]), torch.tensor([[1]]))
    with torch.inference_mode():
        direct, other = first(target), mvs(target)
    assert torch.allclose(p.logits, direct[0], atol=1e-5)
    assert not torch.allclose(p.logits, other[0], atol=1e-3)
    ctx = pred.new_context()
    ctx.add("a", img, disk((128, 128), (60, 60), 20))
    assert pred.predict(img, Prompts(positive=[(60, 60)]), ctx).network == "multiverseg"


def test_prompts_with_context_blend_in_the_first_image_network(tiny_models):
    """With context, a prediction from prompts averages the main network's logits (with the context) with
    the first-image network's (without it) by ``blend``; a zero-click prediction is the main network's alone."""
    mvs, _ = tiny_models
    torch.manual_seed(1)
    first = MultiverSegNet(MultiverSegConfig(encoder_widths=[8, 8, 8, 8])).eval()
    img = (np.random.default_rng(3).random((128, 128)) * 255).astype(np.uint8)
    alone, mixed = (Predictor(mvs, fallback=first, device="cpu", blend=b, refine=False) for b in (0.0, 0.25))
    ctx = alone.new_context()
    ctx.add("a", img, disk((128, 128), (60, 60), 20))
    prompts = Prompts(positive=[(60, 60)])
    a, m = alone.predict(img, prompts, ctx), mixed.predict(img, prompts, ctx)
    f = alone.predict(img, prompts)  # the first-image network, no context
    assert torch.allclose(m.logits, 0.75 * a.logits + 0.25 * f.logits, atol=1e-4)
    assert torch.equal(alone.predict(img, None, ctx).logits, mixed.predict(img, None, ctx).logits)
    assert Predictor(device="cpu").blend == 0.5 and Predictor(device="cpu", fallback=False).blend == 0.0
    assert Predictor(mvs, fallback=first, device="cpu").blend == 0.0  # measured for the bundled pair only
    with pytest.raises(ValueError, match="MultiverSegNet fallback"):
        Predictor(mvs, device="cpu", blend=0.5)
    with pytest.raises(ValueError, match="between 0 and 1"):
        Predictor(mvs, fallback=first, device="cpu", blend=1.5)


def test_reliability_is_how_well_the_context_segments_its_own_images(tiny_models):
    """Each of the newest entries predicted zero-click from the others, its model-grid Dice against its own
    label, averaged; computed once per state of the entries, again when one changes."""
    mvs, _ = tiny_models
    pred = Predictor(mvs, device="cpu", refine=False)
    rng = np.random.default_rng(5)
    images = {k: (rng.random((96, 112)) * 255).astype(np.uint8) for k in "abc"}
    ctx = pred.new_context()
    for i, (k, img) in enumerate(images.items()):
        ctx.add(k, img, disk((96, 112), (40 + 10 * i, 50), 18))
    expected = []
    for k, img in images.items():
        logits = pred.predict(img, None, ctx, exclude=[k]).logits[0] > 0
        label = ctx.get(k).label[0] > 0.5
        expected.append(2 * float((logits & label).sum()) / float(logits.sum() + label.sum()))
    calls = []
    forward = pred.forward
    pred.forward = lambda *a: calls.append(1) or forward(*a)
    assert pred.reliability(ctx) == pytest.approx(np.mean(expected), abs=1e-3)  # batched: a pixel may differ
    assert pred.reliability(ctx.copy()) == pytest.approx(np.mean(expected), abs=1e-3) and len(calls) == 1
    ctx.add("b", images["b"], disk((96, 112), (80, 20), 10))  # a changed entry: computed again
    pred.reliability(ctx)
    assert len(calls) == 2
    pred.reliability(ctx.copy(max_size=1))  # one context entry per prediction: another figure
    assert len(calls) == 3 and pred.reliability(None) == 0.0
    one = pred.new_context()
    one.add("a", images["a"], disk((96, 112), (40, 50), 18))
    assert pred.reliability(one) == 0.0  # nothing to predict it from


def test_reliability_of_a_large_set_costs_two_small_forwards(tiny_models):
    """The 8 newest entries, each predicted from 8 of the others (the sizes the threshold was chosen at), four
    per forward; two threads asking at once compute it once."""
    import threading

    mvs, _ = tiny_models
    pred = Predictor(mvs, device="cpu", refine=False)
    rng = np.random.default_rng(9)
    ctx = pred.new_context()
    for i in range(20):
        ctx.add(f"e{i}", (rng.random((48, 48)) * 255).astype(np.uint8), disk((48, 48), (24, 24), 5 + i % 10))
    shapes, forward = [], pred.forward
    pred.forward = lambda target, images, labels: shapes.append((tuple(target.shape), tuple(images.shape))) or \
        forward(target, images, labels)
    askers = [threading.Thread(target=pred.reliability, args=(ctx,)) for _ in range(2)]
    for t in askers:
        t.start()
    for t in askers:
        t.join(60)
    s = pred.size
    assert shapes == [((4, 5, s, s), (4, 8, 1, s, s))] * 2


def test_a_reliability_already_known_never_waits_for_another_being_computed(tiny_models):
    """While one thread computes the figure of one set, another set's known figure is answered at once (one
    lock for all made a cached answer wait for the other computation, itself slowed by every click)."""
    import threading

    mvs, _ = tiny_models
    pred = Predictor(mvs, device="cpu", refine=False)
    img = (np.random.default_rng(10).random((48, 48)) * 255).astype(np.uint8)
    known, other = pred.new_context(), pred.new_context()
    for i in range(3):
        known.add(i, img, disk((48, 48), (24, 24), 6 + i))
        other.add(i, img, disk((48, 48), (20, 20), 6 + i))
    figure = pred.reliability(known)
    inside, release = threading.Event(), threading.Event()
    forward = pred.forward
    pred.forward = lambda *a: (inside.set(), release.wait(30), forward(*a))[2]
    computing = threading.Thread(target=pred.reliability, args=(other,))
    computing.start()
    try:
        assert inside.wait(30)
        answers = []
        asking = threading.Thread(target=lambda: answers.append(pred.reliability(known)))
        asking.start()
        asking.join(5)
        assert answers == [figure]  # answered while `other` is still being computed
    finally:
        release.set()
        computing.join(30)


def test_a_context_is_trusted_once_it_is_reliable_enough(tiny_models):
    mvs, _ = tiny_models
    img = (np.random.default_rng(6).random((64, 64)) * 255).astype(np.uint8)
    ctx = Predictor(mvs, device="cpu").new_context()
    for k, x in (("a", 20), ("b", 40)):
        ctx.add(k, img, disk((64, 64), (x, 30), 12))
    always = Predictor(mvs, device="cpu")
    assert always.trust == 0.0 and always.trusts(ctx) and not always.trusts(always.new_context())
    reliability = always.reliability(ctx)
    assert Predictor(mvs, device="cpu", trust=reliability).trusts(ctx)
    assert not Predictor(mvs, device="cpu", trust=min(1.0, reliability + 0.01)).trusts(ctx)
    assert Predictor(device="cpu").trust == 0.75  # the bundled pair (model card, "Context reliability")
    with pytest.raises(ValueError, match="trust must be between 0 and 1"):
        Predictor(mvs, device="cpu", trust=1.5)


def test_an_untrusted_context_gives_no_proposal_and_no_say_over_scribbles(tiny_models):
    """Below ``trust``: a zero-click request is answered with nothing, scribbles go as without context,
    clicks still use it; ``trusted`` given by the caller decides instead."""
    mvs, _ = tiny_models
    img = (np.random.default_rng(8).random((64, 64)) * 255).astype(np.uint8)
    doubting = Predictor(mvs, device="cpu", trust=1.0)
    ctx = doubting.new_context()
    for k, x in (("a", 20), ("b", 40)):
        ctx.add(k, img, disk((64, 64), (x, 30), 12))
    assert not doubting.trusts(ctx)
    assert doubting.predict(img, None, ctx).network == "none"
    strokes = Prompts(positive_scribbles=disk((64, 64), (30, 30), 3))
    alone = doubting.predict(img, strokes)
    assert torch.equal(doubting.predict(img, strokes, ctx).logits, alone.logits)
    assert doubting.predict(img, Prompts(positive=[(30, 30)]), ctx).context_ids == ["a", "b"]
    assert doubting.predict(img, strokes, ctx, trusted=True).context_ids == ["a", "b"]
    assert Predictor(mvs, device="cpu", trust=0.0).predict(img, None, ctx, trusted=False).network == "none"


def test_nothing_to_go_on_is_an_empty_prediction(tiny_models):
    """No prompts, no previous prediction and no context (or all of it excluded): an empty mask, no
    forward; the networks answer such a question with a blob."""
    mvs, sp = tiny_models
    pred = Predictor(mvs, fallback=sp, device="cpu")
    img = (np.random.default_rng(7).random((50, 70)) * 255).astype(np.uint8)
    ctx = pred.new_context()
    ctx.add("a", img, disk((50, 70), (30, 20), 10))
    for out in (pred.predict(img), pred.predict(img, None, ctx, exclude=["a"])):
        assert out.network == "none" and out.mask.shape == (50, 70) and not out.mask.any()
        assert out.logits.shape == (1, pred.size, pred.size) and (out.logits < 0).all()
    assert pred.predict(img, None, ctx).network == "multiverseg"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_context": 0}, "max_context must be a whole number of at least 1, got 0"),
        ({"max_context": 2.5}, "max_context must be a whole number"),
        ({"percentiles": (99.5, 0.5)}, "percentiles must be two numbers 0 <= low < high <= 100"),
        ({"percentiles": (-1, 50)}, "percentiles must be two numbers"),
    ],
)
def test_settings_no_prediction_can_use_are_refused(tiny_models, kwargs, message):
    """(``max_context=0`` left every context out without a word; inverted percentiles normalised every image
    to one value.)"""
    with pytest.raises(ValueError, match=message):
        Predictor(tiny_models[0], device="cpu", **kwargs)


def test_bundled_weights_come_with_their_first_image_network():
    from mvseg.weights import first_image_weights

    bundled = Predictor(device="cpu")
    assert isinstance(bundled.fallback, MultiverSegNet)
    weights = zip(bundled.model.state_dict().values(), bundled.fallback.state_dict().values())
    assert not all(torch.equal(a, b) for a, b in weights)  # its own weights, not a copy of the model's
    assert Predictor(device="cpu", fallback=False).fallback is None
    assert Predictor(device="cpu", fallback="None").fallback is None  # the name --conf and CLIs pass
    assert first_image_weights().is_file()
    img = np.random.default_rng(4).random((64, 64))
    assert bundled.predict(img, Prompts(positive=[(30, 30)])).network == "first-image"


def test_checkpoint_paths_are_accepted(tmp_path, tiny_models):
    from mvseg import save_checkpoint

    mvs, sp = tiny_models
    save_checkpoint(mvs, tmp_path / "m.pt")
    save_checkpoint(sp, tmp_path / "s.pt")
    pred = Predictor(tmp_path / "m.pt", fallback=tmp_path / "s.pt", device="cpu")
    assert pred.predict(np.eye(16), Prompts(positive=[(3, 3)])).network == "scribbleprompt"


def test_chunked_context_equals_one_chunk(monkeypatch):
    """Streaming the context set through the blocks in chunks changes nothing."""
    import mvseg.network as network

    torch.manual_seed(0)
    net = MultiverSegNet(MultiverSegConfig(encoder_widths=[8, 8, 8, 8])).eval()
    t, ci = torch.rand(2, 5, 32, 32), torch.rand(2, 7, 1, 32, 32)
    cl = (torch.rand(2, 7, 1, 32, 32) > 0.5).float()
    with torch.inference_mode():
        whole = net(t, ci, cl)
        monkeypatch.setattr(network, "CHUNK_ELEMENTS", 1)  # one entry per chunk
        chunked = net(t, ci, cl)
    assert torch.allclose(whole, chunked, atol=1e-5)


def test_benchmark_prints_a_table():
    out = subprocess.run(
        [sys.executable, "-m", "mvseg.bench", "--widths", "8", "--contexts", "0", "2", "--repeats", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines() if line.startswith("cpu")]
    assert [r[2] for r in rows] == ["0", "2"]
    assert all(float(r[3]) > 0 and float(r[5]) > 0 for r in rows)


@pytest.mark.parametrize("args", [["--repeats", "0"], ["--widths", "0"], ["--devices", "nosuchdevice"]])
def test_a_benchmark_that_measures_nothing_fails(args):
    """It printed 'failed' rows and exited 0."""
    out = subprocess.run([sys.executable, "-m", "mvseg.bench", "--widths", "8", "--contexts", "0", *args],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0, out.stdout


@pytest.mark.parametrize("device, message", [("gpu", "none PyTorch knows"), ("cuda:99", "no such CUDA device")])
def test_a_device_this_machine_lacks_is_named_at_once(device, message):
    """train and evaluate failed minutes in, on the first tensor, with PyTorch's assertion."""
    from mvseg.predictor import pick_device

    with pytest.raises(ValueError, match=message):
        pick_device(device)
