"""Training: augmentations, task bank (splits, synthetic tasks), the loss, and a short CPU run that learns."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from mvseg import augment, load_checkpoint
from mvseg.checkpoint import CheckpointError
from mvseg.evaluate import held_out
from mvseg.interaction import RandomPrompts
from mvseg.network import MultiverSegConfig, MultiverSegNet
from mvseg.tasks import Source, TaskBank, intensity_label, ridge_label, ridge_response, split_subjects
from mvseg.train import (
    TrainConfig,
    batches,
    focal_loss,
    half_resolution,
    interactive_loss,
    soft_dice_loss,
    train,
)

from .conftest import disk


def blobs(n=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.zeros(n, 1, size, size)
    y[:, :, 8:20, 10:24] = 1
    x = (0.2 + 0.6 * y + 0.05 * torch.rand(y.shape, generator=g)).clamp(0, 1)
    return x, y


# -- augmentations ----------------------------------------------------------------------------------


def test_augment_keeps_ranges_and_binary_labels():
    x, y = blobs(6)
    for spec in (augment.SYNTHETIC, augment.WITHIN_TASK, augment.TASK):
        ax, ay = augment.augment(x, y, spec, torch.Generator().manual_seed(1))
        assert ax.shape == x.shape and ay.shape == y.shape
        assert ax.min() >= 0 and ax.max() <= 1
        assert set(torch.unique(ay).tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize(
    "spec",
    [
        {"affine": dict(p=1.0, degrees=(0, 360), translate=(0, 0.2), scale=(0.8, 1.1))},
        {"elastic": dict(p=1.0, alpha=(6, 10), sigma=(8, 12))},
    ],
    ids=["affine", "elastic"],
)
def test_task_augmentation_is_shared_and_within_task_is_not(spec):
    x, y = blobs(5)
    gen = torch.Generator().manual_seed(3)
    shared_x, shared_y = augment.augment(x, y, spec, gen, shared=True)
    assert all(torch.equal(shared_y[0], shared_y[i]) for i in range(5))
    own_x, own_y = augment.augment(x, y, spec, gen, shared=False)
    assert not all(torch.equal(own_y[0], own_y[i]) for i in range(5))


def test_flip_and_sobel_label_do_what_they_say():
    x, y = blobs(2)
    gen = torch.Generator().manual_seed(0)
    fx, fy = augment.augment(x, y, {"hflip": dict(p=1.0)}, gen)
    assert torch.equal(fy, y.flip(-1)) and torch.equal(fx, x.flip(-1))
    _, edges = augment.augment(x, y, {"sobel_label": dict(p=1.0)}, gen)
    assert edges.sum() < y.sum() and edges[0, 0, 14, 17] == 0 and edges[0, 0, 8, 17] == 1



def test_perturbed_labels_are_near_misses_biased_one_way():
    """Every item stays binary, non-empty and close to its label; one draw grows or shrinks them all."""
    y = torch.from_numpy(disk((128, 128), (64, 60), 28)).float()[None, None].repeat(6, 1, 1, 1)
    directions = set()
    for seed in range(8):
        out = augment.perturb_labels(y, torch.Generator().manual_seed(seed))
        assert out.shape == y.shape and set(out.unique().tolist()) <= {0.0, 1.0}
        dice = 2 * (out * y).flatten(1).sum(1) / (out.flatten(1).sum(1) + y.flatten(1).sum(1))
        assert (dice > 0.7).all() and (dice < 1).any(), dice
        change = out.flatten(1).sum(1) - y.flatten(1).sum(1)
        grown, shrunk = bool((change > 0.05 * y[0].sum()).any()), bool((change < -0.05 * y[0].sum()).any())
        assert not (grown and shrunk), change
        directions.add(grown or not shrunk)
    assert directions == {True, False}  # both directions occur over draws
    dot = torch.zeros(1, 1, 16, 16)
    dot[0, 0, 8, 8] = 1
    shrunk = [augment.perturb_labels(dot, torch.Generator().manual_seed(s)) for s in range(8)]
    assert all(out.sum() > 0 for out in shrunk)  # an item eroded away keeps its label

# -- task bank --------------------------------------------------------------------------------------


@pytest.fixture
def task_root(tmp_path):
    """A labelled source (two tasks by prefix, three subjects each) and an unlabelled one."""
    rng = np.random.default_rng(0)
    for folder, labelled in (("lab", True), ("unlab", False)):
        (tmp_path / folder / "images").mkdir(parents=True)
        if labelled:
            (tmp_path / folder / "masks").mkdir()
        for task in ("ax", "cor"):
            for subject in range(3):
                for k in range(2):
                    mask = disk((40, 48), (20 + 3 * k, 18 + subject), 8 + subject)
                    image = (mask * 140 + rng.integers(0, 80, mask.shape)).astype(np.uint8)
                    name = f"{task}_s{subject}_{k}.png"
                    Image.fromarray(image).save(tmp_path / folder / "images" / name)
                    if labelled:
                        Image.fromarray(mask * 255).save(tmp_path / folder / "masks" / name)
    return tmp_path


def test_split_by_subject_is_deterministic_and_disjoint():
    subjects = [f"s{i}" for i in range(10)]
    held = split_subjects(subjects, 0.2, seed=0)
    assert len(held) == 2 and held == split_subjects(subjects, 0.2, seed=0)
    assert split_subjects(["only"], 0.2, 0) == set()


def test_task_bank_splits_by_subject_and_samples_tasks(task_root):
    sources = [Source("lab", task="^(ax|cor)", subject="^[a-z]+_(s[0-9])"), Source("unlab", labelled=False)]
    bank = TaskBank(sources, task_root, size=32, heldout=0.34, seed=0)
    assert set(bank.split) == {"lab/ax", "lab/cor"}
    for part in bank.split.values():
        train_subjects = {i.split("_")[1] for i in part["train"]}
        held_subjects = {i.split("_")[1] for i in part["heldout"]}
        assert held_subjects and not train_subjects & held_subjects
    rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
    x, y, cx, cy, synthetic = bank.batch(3, 4, rng, gen, p_synthetic=0.5)
    assert x.shape == (3, 1, 32, 32) and cx.shape == (3, 4, 1, 32, 32) and cy.shape == cx.shape
    assert all(y[i].any() for i in range(3))
    xs, ys, s = bank.sample(2, rng, gen, p_synthetic=1.0)
    assert s and ys[0].any()


def test_intensity_label_keeps_the_band_inside_the_content_box():
    image = np.zeros((32, 32), np.uint8)
    image[:, 4:28] = 40  # columns 0-3 and 28-31: zero padding of a non-square image
    image[10:14, 10:14] = 230  # two bright blobs and one bright pixel (noise)
    image[20:25, 18:23] = 220
    image[5, 20] = 255
    bright = intensity_label(image, 0.6, 1.0, sigma=0.0)
    assert bright.sum() == 16 + 25 and bright[12, 12] and bright[22, 20] and not bright[5, 20]
    ground = intensity_label(image, 0.1, 0.3, sigma=1.5)  # the grey ground, blurred at the blobs only
    assert ground[0, 4:28].all() and not ground[:, :4].any() and not ground[:, 28:].any()
    assert not ground[12, 12] and not intensity_label(np.zeros((8, 8), np.uint8), 0.1, 1.0, 1.0).any()


@pytest.mark.parametrize("kind, low, high", [("intensity", 0.005, 0.6), ("ridge", 0.0, 0.3)])
def test_rule_tasks_apply_one_rule_to_different_images(task_root, kind, low, high):
    bank = TaskBank([Source("unlab", labelled=False)], task_root, size=32, heldout=0.0, seed=0)
    rng = np.random.default_rng(0)
    x, y = getattr(bank, f"_{kind}")(3, rng)
    assert x.shape == y.shape == (4, 1, 32, 32) and set(torch.unique(y).tolist()) <= {0.0, 1.0}
    assert len({x[i].numpy().tobytes() for i in range(4)}) > 1  # not copies of one image
    assert y[0].any() and low <= y[0].mean() <= high
    xs, ys, synthetic = bank.sample(2, rng, torch.Generator().manual_seed(0), p_synthetic=1.0, **{f"p_{kind}": 1.0})
    assert synthetic and ys[0].any() and xs.shape == (3, 1, 32, 32)


def test_ridge_label_keeps_thin_lines_of_its_polarity_and_drops_speckle():
    image = np.full((48, 48), 60, np.uint8)
    image[10:12, 4:44] = 200  # a bright line 2 px wide
    image[30:38, 4:44] = 200  # a bright band 8 px wide: a region, not a line at this scale
    image[43, 20] = 200  # a bright speck
    bright = ridge_label(ridge_response(image, 1.0, dark=False), 0.05)
    assert bright[10:12, 8:40].all() and not bright[32:36, 8:40].any() and not bright[42:45, 18:23].any()
    assert bright.mean() < 0.15
    # a dark line is a bright line of the negative image
    dark = ridge_label(ridge_response(255 - image, 1.0, dark=True), 0.05)
    assert np.array_equal(dark[1:-1, 1:-1], bright[1:-1, 1:-1])
    assert not ridge_response(np.zeros((8, 8), np.uint8), 1.0, False).any()


def test_split_of_a_named_source_points_evaluation_at_its_folder(task_root):
    """``evaluate --ids split.json`` finds the held-out ids of a source with a ``name`` under its folder."""
    bank = TaskBank([Source("lab", name="brains", task="^(ax|cor)")], task_root, size=32, heldout=0.34, seed=0)
    assert set(bank.split) == {"brains/ax", "brains/cor"}
    subsets = held_out(json.loads(json.dumps(bank.split)))
    assert set(subsets) == {"lab"}
    assert sorted(subsets["lab"]) == sorted(i for part in bank.split.values() for i in part["heldout"])


def test_real_task_context_never_holds_the_target(task_root):
    bank = TaskBank([Source("lab", task="^(ax|cor)")], task_root, size=32, heldout=0.0, seed=0)
    rng = np.random.default_rng(0)
    for _ in range(20):  # 6 images per task, 8 context entries: drawn with replacement from the other 5
        x, _ = bank._real(8, rng)
        assert x.shape[0] == 9 and not any(torch.equal(x[0], x[i]) for i in range(1, 9))


# -- loss and training ------------------------------------------------------------------------------


def test_losses_prefer_the_right_answer():
    _, y = blobs(2)
    good, bad = (y * 2 - 1) * 8, -(y * 2 - 1) * 8
    assert soft_dice_loss(good, y) < 0.05 < soft_dice_loss(bad, y)
    assert focal_loss(good, y, 20.0) < focal_loss(bad, y, 20.0)


def test_half_resolution_keeps_small_labels():
    x, y = torch.rand(2, 3, 1, 16, 16), torch.zeros(2, 3, 1, 16, 16)
    y[:, :, :, 5, 5] = 1
    hx, hy = half_resolution(x, y)
    assert hx.shape == (2, 3, 1, 8, 8) and hy.sum() == 6


def test_interactive_loss_runs_three_steps_with_and_without_context():
    torch.manual_seed(0)
    model = MultiverSegNet(MultiverSegConfig(encoder_widths=[8, 8, 8]))
    x, y = blobs(2)
    user = RandomPrompts(np.random.default_rng(0))
    for n in (0, 3):
        loss, steps = interactive_loss(model, x, y, x[:, None].repeat(1, n, 1, 1, 1),
                                       y[:, None].repeat(1, n, 1, 1, 1), user, 3, 20.0)
        assert len(steps) == 3 and torch.isfinite(loss) and loss.requires_grad


def test_context_only_examples_start_without_prompts():
    """A context-only example's first forward sees the image alone; its corrections come after."""
    torch.manual_seed(0)
    model = MultiverSegNet(MultiverSegConfig(encoder_widths=[8, 8, 8]))
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    x, y = blobs(2)
    context = (x[:, None].repeat(1, 2, 1, 1, 1), y[:, None].repeat(1, 2, 1, 1, 1))
    interactive_loss(model, x, y, *context, RandomPrompts(np.random.default_rng(0)), 2, 20.0, [True, False])
    first, second = seen
    assert not first[0, 1:].any() and first[1, 1:4].any()  # no box, clicks or scribbles for example 0
    assert second[0, 1:4].any()  # ... until its first correction


def small_config(root, steps):
    return TrainConfig(
        name="smoke", encoder_widths=[8, 8, 8], size=32, steps=steps, batch_size=4, max_context=3, lr=3e-3,
        lr_final=3e-3, interaction_steps=2, p_synthetic=0.0, heldout=0.0, checkpoint_every=10,
        sources=[{"path": "lab", "task": "^(ax|cor)"}], data_root=str(root),
    )


def test_config_overrides():
    """``--set KEY=VALUE`` replaces one entry, read as JSON and kept to the entry's type; typos are refused."""
    cfg = TrainConfig()
    cfg.override(["p_low_res=0", "steps=7", "encoder_widths=[8, 8]", "name=tuned", "superpixel_scale=[2, 3]"])
    assert (cfg.p_low_res, cfg.steps, cfg.encoder_widths, cfg.name) == (0.0, 7, [8, 8], "tuned")
    assert isinstance(cfg.p_low_res, float) and cfg.superpixel_scale == (2, 3)
    for bad in ("p_lowres=0", "p_low_res", "steps=many", "steps=1.5", "p_low_res=[0]"):
        with pytest.raises(ValueError, match="--set"):
            cfg.override([bad])


def test_batches_depend_on_the_step_alone(task_root):
    """Worker processes draw exactly the batches the main process would, and a stream started at step k
    (a resumed run) continues the same sequence; p_noisy_context changes the context labels and nothing else."""
    cfg = small_config(task_root, 6)
    cfg.sources.append({"path": "unlab", "labelled": False})
    cfg.p_synthetic, cfg.p_low_res, cfg.p_context_only, cfg.max_context = 0.5, 0.5, 0.5, 4
    bank = TaskBank([Source(**s) for s in cfg.sources], task_root, 32, 0.0, 0)
    serial = list(batches(bank, cfg, 0))
    assert len(serial) == 6 and {b.synthetic for b in serial} != {0.0}

    def same(a, b):
        return all(torch.equal(u, v) for u, v in zip(a[:4], b[:4])) and a[4:] == b[4:]

    assert all(same(a, b) for a, b in zip(serial, batches(bank, cfg, 0, workers=2), strict=True))
    assert all(same(a, b) for a, b in zip(serial[3:], batches(bank, cfg, 3), strict=True))
    cfg.p_noisy_context = 1.0
    noisy = list(batches(bank, cfg, 0))
    for a, b in zip(serial, noisy):
        assert all(torch.equal(u, v) for u, v in zip(a[:3], b[:3])) and a[4:] == b[4:]
    assert any(not torch.equal(a.context_labels, b.context_labels) for a, b in zip(serial, noisy))


def test_no_context_steps_only_when_asked(task_root):
    """p_no_context empties the context of some steps on top of n ~ U[0, max_context]; at 0 it draws
    nothing, so older configs keep their batches."""
    cfg = small_config(task_root, 12)
    cfg.max_context = 4
    bank = TaskBank([Source(**s) for s in cfg.sources], task_root, 32, 0.0, 0)
    plain = [b.context_images.shape[1] for b in batches(bank, cfg, 0)]
    assert sum(n == 0 for n in plain) < len(plain)
    cfg.p_no_context = 1.0
    assert all(b.context_images.shape[1] == 0 for b in batches(bank, cfg, 0))
    cfg.p_no_context = 0.0
    assert [b.context_images.shape[1] for b in batches(bank, cfg, 0)] == plain


def test_gpu_options_train_on_the_cpu_too(task_root, tmp_path):
    """The GPU recipe (bfloat16 autocast, a batch-drawing worker) runs on the CPU too, with finite losses."""
    train(small_config(task_root, 3), tmp_path / "bf16", bf16=True, workers=1)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "bf16" / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and np.isfinite(losses).all()

@pytest.mark.slow
def test_training_learns_and_resumes(task_root, tmp_path):
    """A short CPU run lowers the loss on a fixed batch; a resumed run continues the same sequence."""
    cfg = small_config(task_root, 40)
    bank = TaskBank([Source("lab", task="^(ax|cor)")], task_root, 32, 0.0, 0)
    fixed = bank.batch(6, 2, np.random.default_rng(123), torch.Generator().manual_seed(123), p_synthetic=0.0)[:4]

    def fixed_loss(model):
        model.eval()
        with torch.no_grad():
            loss, _ = interactive_loss(model, *fixed, RandomPrompts(np.random.default_rng(7)), 2, 20.0)
        return float(loss)

    torch.manual_seed(0)
    before = fixed_loss(MultiverSegNet(MultiverSegConfig(encoder_widths=[8, 8, 8])))
    weights = train(cfg, tmp_path / "run")
    after = fixed_loss(load_checkpoint(weights))
    assert after < 0.7 * before, (before, after)

    # stopping at step 20 and resuming reproduces the uninterrupted run, step for step
    train(small_config(task_root, 20), tmp_path / "resumed")
    train(cfg, tmp_path / "resumed", resume=True)
    full = [json.loads(line)["loss"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    resumed = [json.loads(line)["loss"] for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert len(resumed) == 40
    np.testing.assert_allclose(resumed, full, rtol=1e-4)
    assert load_checkpoint(tmp_path / "resumed" / "model.pt").meta["steps"] == 40


def test_resume_reads_plain_data_only_and_refuses_what_it_cannot_resume(task_root, tmp_path):
    """``--resume`` ran code pickled into last.pt; without a last.pt it started afresh and emptied the log;
    a line a kill cut short in log.jsonl stopped every resume."""
    import pickle

    from mvseg.checkpoint import CheckpointError

    run = tmp_path / "run"
    train(small_config(task_root, 2), run)
    log_before = (run / "log.jsonl").read_text()
    state = torch.load(run / "last.pt", weights_only=True)

    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "ran"), "w"))

    torch.save({**state, "init": Payload()}, run / "last.pt", pickle_module=pickle)
    with pytest.raises(CheckpointError, match="cannot resume"):
        train(small_config(task_root, 3), run, resume=True)
    assert not (tmp_path / "ran").exists()
    (run / "last.pt").unlink()
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train(small_config(task_root, 3), run, resume=True)
    assert (run / "log.jsonl").read_text() == log_before
    torch.save(state, run / "last.pt")
    with (run / "log.jsonl").open("a") as f:
        f.write('{"step": 3, "lo')  # killed while writing
    train(small_config(task_root, 3), run, resume=True)
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()] == [1, 2, 3]
    kept = (run / "last.pt").read_bytes()  # a forgotten --resume replaced a run's checkpoints and log
    with pytest.raises(FileExistsError, match="--resume continues it"):
        train(small_config(task_root, 1), run)
    assert (run / "last.pt").read_bytes() == kept and len((run / "log.jsonl").read_text().splitlines()) == 3
    with pytest.raises(FileNotFoundError, match="--init checkpoint not found"):
        train(small_config(task_root, 1), tmp_path / "other", init=tmp_path / "missing.pt")


@pytest.mark.parametrize("key, value", [("checkpoint_every", 0), ("batch_size", 0), ("max_context", -1),
                                        ("interaction_steps", 0), ("p_low_res", 5.0), ("heldout", -3.0),
                                        ("encoder_widths", []), ("superpixel_scale", (3.0, 1.0)), ("steps", 0)])
def test_values_no_run_can_use_are_refused_before_anything_is_written(task_root, tmp_path, key, value):
    """They crashed in the first step, after the run folder's files were written (steps 0 'finished' with
    no weights)."""
    cfg = small_config(task_root, 2)
    setattr(cfg, key, value)
    with pytest.raises(ValueError, match=key):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_init_starts_from_given_weights(task_root, tmp_path):
    """``init`` loads the weights before the first step; a mismatched architecture is refused."""
    first = train(small_config(task_root, 2), tmp_path / "first")
    start = load_checkpoint(first).state_dict()
    cfg = small_config(task_root, 1)
    cfg.lr = cfg.lr_final = 0.0  # no update: the saved weights must be exactly the initial ones
    tuned = load_checkpoint(train(cfg, tmp_path / "tuned", init=first))
    for key, value in tuned.state_dict().items():
        torch.testing.assert_close(value, start[key])
    lineage = {"file": first.name, "sha256": hashlib.sha256(first.read_bytes()).hexdigest()}
    assert tuned.meta["init"] == lineage
    cfg.steps = 2  # resuming without --init keeps the record of where the run started
    assert load_checkpoint(train(cfg, tmp_path / "tuned", resume=True)).meta["init"] == lineage
    cfg.encoder_widths = [8, 8, 16]
    with pytest.raises(CheckpointError):
        train(cfg, tmp_path / "wrong", init=first)
