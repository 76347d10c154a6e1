"""Images of any size and type map onto the model grid and back; prompts follow the same geometry."""

import numpy as np
import pytest
import torch

from mvseg import Geometry, normalize_intensity, prepare_image

from .conftest import disk


def dice(a, b):
    a, b = a.astype(bool), b.astype(bool)
    return 2 * (a & b).sum() / max(1, a.sum() + b.sum())


def mask_logits(geometry: Geometry, mask: np.ndarray) -> torch.Tensor:
    """Forward a mask, then treat it as confident logits on the model grid."""
    return (geometry.mask_forward(mask) * 2 - 1) * 10


@pytest.mark.parametrize("shape", [(128, 128), (301, 177), (177, 301), (97, 53), (1, 1), (515, 511), (60, 200)])
def test_mask_round_trip_lands_on_the_original_grid(shape):
    h, w = shape
    mask = disk(shape, (w * 0.55, h * 0.45), max(1, min(h, w) * 0.3))
    g = Geometry(h, w)
    back = (g.logits_back(mask_logits(g, mask)) > 0).numpy()[0]
    assert back.shape == shape
    if shape == (128, 128):
        assert np.array_equal(back, mask.astype(bool))  # identity at the model resolution
    else:
        assert dice(back, mask) > 0.95 or mask.sum() < 10
        # orientation: the centroid comes back where it was
        ys, xs = np.nonzero(back)
        y0, x0 = np.nonzero(mask)
        assert abs(ys.mean() - y0.mean()) <= max(1.0, h / 128) and abs(xs.mean() - x0.mean()) <= max(1.0, w / 128)


def test_asymmetric_pattern_keeps_orientation():
    mask = np.zeros((90, 211), np.uint8)
    mask[5:30, 10:60] = 1  # top-left block only
    g = Geometry(*mask.shape)
    back = (g.logits_back(mask_logits(g, mask)) > 0).numpy()[0]
    assert back[:45, :105].sum() > 0.9 * back.sum()
    assert dice(back, mask) > 0.9


@pytest.mark.parametrize(
    "image",
    [
        np.random.default_rng(0).integers(0, 256, (97, 131, 3), dtype=np.uint8),  # RGB
        np.random.default_rng(1).integers(0, 256, (64, 80, 4), dtype=np.uint8),  # RGBA
        np.random.default_rng(2).integers(0, 65535, (211, 77), dtype=np.uint16),  # 16-bit
        np.random.default_rng(3).normal(-1000, 400, (50, 300)).astype(np.float32),  # CT-like floats
        np.random.default_rng(4).random((33, 33, 1)),
    ],
)
def test_any_image_becomes_a_unit_range_model_grid_image(image):
    model_image, g = prepare_image(image, 128)
    assert model_image.shape == (1, 128, 128) and model_image.dtype == torch.float32
    assert 0.0 <= model_image.min() and model_image.max() <= 1.0
    assert g.shape == image.shape[:2]


def test_intensity_normalisation_is_robust_to_outliers():
    img = np.full((100, 100), 100.0)
    img[:, 50:] = 200.0
    img[0, 0] = 1e9  # one hot pixel
    out = normalize_intensity(img)
    assert out[50, 10] == 0.0 and out[50, 90] == 1.0  # the outlier does not squash the contrast
    assert np.array_equal(normalize_intensity(np.full((5, 7), 3.0)), np.zeros((5, 7), np.float32))


def test_rgb_uses_luminance():
    rgb = np.zeros((10, 10, 3), np.uint8)
    rgb[:, 5:, 1] = 255  # green half
    out = normalize_intensity(rgb)
    assert out[:, :5].max() == 0 and out[:, 5:].min() == 1


def test_padding_is_centred_and_zero():
    g = Geometry(50, 100)
    img = np.ones((50, 100), np.float32)
    m = g.image_forward(img)[0]
    assert m[:10].max() == 0 and m[-10:].max() == 0 and m[40:88].min() > 0.99


@pytest.mark.parametrize("shape", [(301, 177), (512, 512), (90, 211), (40, 30)])
def test_clicks_land_on_the_same_anatomy(shape):
    h, w = shape
    rng = np.random.default_rng(0)
    mask = disk(shape, (w * 0.3, h * 0.6), min(h, w) * 0.2)
    g = Geometry(h, w)
    fwd = g.mask_forward(mask)[0].numpy()
    points = np.stack([rng.integers(0, w, 400), rng.integers(0, h, 400)], 1)
    model_points = g.points_forward(points)
    inside = mask[points[:, 1], points[:, 0]].astype(bool)
    hit = fwd[model_points[:, 1], model_points[:, 0]].astype(bool)
    # points well inside or well outside the disk keep their side
    dist = np.hypot(points[:, 0] - w * 0.3, points[:, 1] - h * 0.6) - min(h, w) * 0.2
    clear = np.abs(dist) > 2 * g.side / 128 + 1
    assert clear.sum() > 200
    assert np.array_equal(inside[clear], hit[clear])


def test_box_covers_the_same_region():
    g = Geometry(300, 200)
    box = g.box_forward([20, 30, 120, 250])
    s = 128 / 300
    x1, y1, x2, y2 = box.tolist()
    assert x1 <= (20 + 50) * s <= x1 + 1 and x2 - 1 <= (120 + 50) * s <= x2
    assert y1 <= 30 * s <= y1 + 1 and y2 - 1 <= 250 * s <= y2
    assert g.box_forward([0, 0, 200, 300]).tolist() == [21, 0, 107, 128]


def test_thin_scribble_survives_shrinking():
    stroke = np.zeros((1024, 1024), np.uint8)
    stroke[500, 100:900] = 1  # one pixel thick
    out = Geometry(1024, 1024).scribble_forward(stroke)[0]
    assert out.sum() >= 90 and out.max() == 1


def test_tiny_structure_is_kept_in_the_mask():
    mask = np.zeros((1000, 1000), np.uint8)
    mask[500:503, 500:503] = 1
    assert Geometry(1000, 1000).mask_forward(mask).sum() >= 1


@pytest.mark.parametrize(
    "image, message",
    [
        (np.full((10, 10), np.nan), "NaN"),
        (np.zeros((0, 10)), "empty"),
        (np.zeros((4, 5, 6, 7)), "must be 2D"),
        (np.zeros((3, 10, 10)), "must be 2D"),
        (np.array([["a"]]), "real numbers"),
    ],
)
def test_bad_images_are_rejected(image, message):
    with pytest.raises(ValueError, match=message):
        prepare_image(image)


def test_bad_coordinates_are_rejected():
    g = Geometry(100, 60)
    with pytest.raises(ValueError, match="outside the image"):
        g.points_forward([[60, 10]])
    with pytest.raises(ValueError, match="outside the image"):
        g.points_forward([[-1, 10]])
    with pytest.raises(ValueError, match="x1 <= x2"):
        g.box_forward([30, 10, 20, 50])
    with pytest.raises(ValueError, match="empty"):
        g.box_forward([10, 10, 10, 50])
    with pytest.raises(ValueError, match="outside the image"):
        g.box_forward([10, 10, 70, 50])
    with pytest.raises(ValueError, match="four finite numbers"):
        g.box_forward([1, 2, 3])
    with pytest.raises(ValueError, match="shape"):
        g.mask_forward(np.zeros((60, 100)))


@pytest.mark.parametrize("shape", [(300, 200), (129, 500), (1000, 7)])
def test_large_images_resample_as_their_padded_square(shape):
    """Shrinking goes one axis at a time and logits come back only where the image is: the same values as
    resampling the whole zero-padded square, which a thin image cannot afford (below)."""
    import torch.nn.functional as F

    g = Geometry(*shape, size=128)
    rng = np.random.default_rng(0)
    image, mask = rng.random(shape).astype(np.float32), rng.random(shape) > 0.7
    square = F.interpolate(g.pad_square(image), size=(128, 128), mode="bilinear", antialias=True)[0]
    assert torch.allclose(g.image_forward(image), square.clamp(0, 1), atol=1e-6)
    pooled = F.adaptive_max_pool2d(g.pad_square(mask.astype(np.float32)), 128)[0]
    assert torch.equal(g.scribble_forward(mask), pooled)
    logits = torch.randn(2, 128, 128)
    back = F.interpolate(logits[:, None], size=(g.side, g.side), mode="bilinear")[:, 0]
    assert torch.allclose(g.logits_back(logits), back[:, g.top : g.top + shape[0], g.left : g.left + shape[1]],
                          atol=1e-4)


@pytest.mark.parametrize("shape", [(1, 200_000), (200_000, 2)])
def test_a_thin_image_never_builds_its_padded_square(shape):
    """A 1 x 60000 image asked for a 14 GB square (a 500 on every click, and next-sample broken for all)."""
    g = Geometry(*shape, size=128)
    image = np.random.default_rng(0).random(shape).astype(np.float32)
    assert g.image_forward(image).shape == (1, 128, 128) and g.mask_forward(image > 0.5).sum() > 0
    assert g.scribble_forward(image > 0.5).sum() > 0
    assert g.logits_back(torch.zeros(128, 128)).shape == shape
