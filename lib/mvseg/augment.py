"""Training augmentations of the paper (appendix C.2-C.3, Tables 4 and 5), batched in torch.

:func:`augment` takes images ``N 1 H W`` in [0, 1] and labels ``N 1 H W`` in {0, 1} and applies the ops of a
spec (op name -> probability and parameter ranges). ``shared=False`` samples every op independently per item
(within-task augmentation, synthetic-task copies); ``shared=True`` samples once and applies the same op to
all items (task augmentation: it changes the task, so target and context must agree). Spatial ops warp
image and label together; intensity ops touch the image only; ``sobel_label`` turns the label into its
edges. :func:`perturb_labels` makes a label the kind of imperfect annotation a real context set holds.
Runs on any device; all randomness comes from one ``torch.Generator``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

Spec = dict[str, dict]

# Table 4: copies of one image and its superpixel label, made into a synthetic task.
SYNTHETIC: Spec = {
    "affine": dict(p=0.8, degrees=(-25, 25), translate=(0, 0.2), scale=(0.9, 1.5)),
    "brightness_contrast": dict(p=0.5, brightness=(-0.1, 0.1), contrast=(0.5, 1.5)),
    "elastic": dict(p=0.8, alpha=(1, 10), sigma=(8, 15)),
    "sharpness": dict(p=0.5, factor=5.0),
    "blur": dict(p=0.5, sigma=(0.1, 1.5)),
    "noise": dict(p=0.5, mean=(0, 0.05), std=(0, 0.05)),
    "hflip": dict(p=0.5),
    "vflip": dict(p=0.5),
}

# Table 5a: every target and context entry on its own.
WITHIN_TASK: Spec = {
    "affine": dict(p=0.25, degrees=(-25, 25), translate=(0, 0.1), scale=(0.9, 1.1)),
    "brightness_contrast": dict(p=0.25, brightness=(-0.1, 0.1), contrast=(0.5, 1.5)),
    "elastic": dict(p=0.8, alpha=(1, 2.5), sigma=(7, 9)),
    "sharpness": dict(p=0.25, factor=5.0),
    "blur": dict(p=0.25, sigma=(0.1, 1.0)),
    "noise": dict(p=0.25, mean=(0, 0.05), std=(0, 0.05)),
}

# Table 5b: one draw for the whole task (target and context alike).
TASK: Spec = {
    "affine": dict(p=0.5, degrees=(0, 360), translate=(0, 0.2), scale=(0.8, 1.1)),
    "brightness_contrast": dict(p=0.5, brightness=(-0.1, 0.1), contrast=(0.8, 1.2)),
    "blur": dict(p=0.5, sigma=(0.1, 1.1)),
    "noise": dict(p=0.5, mean=(0, 0.05), std=(0, 0.05)),
    "elastic": dict(p=0.5, alpha=(1, 2), sigma=(6, 8)),
    "sharpness": dict(p=0.5, factor=5.0),
    "hflip": dict(p=0.5),
    "vflip": dict(p=0.5),
    "sobel_label": dict(p=0.5),
    "flip_intensity": dict(p=0.5),
}

BLUR_KERNEL = 5


class _Sampler:
    """Uniform draws per item, or one draw broadcast to all items."""

    def __init__(self, n: int, shared: bool, generator: Optional[torch.Generator], device: torch.device):
        self.n, self.shared, self.gen, self.device = n, shared, generator, device

    def uniform(self, lo: float, hi: float) -> torch.Tensor:
        k = 1 if self.shared else self.n
        u = torch.rand(k, generator=self.gen).to(self.device) * (hi - lo) + lo
        return u.expand(self.n)

    def coin(self, p: float) -> torch.Tensor:
        return self.uniform(0.0, 1.0) < p


def _where(on: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    return torch.where(on.view(-1, 1, 1, 1), new, old)


def _gaussian_kernels(sigma: torch.Tensor, size: int = BLUR_KERNEL) -> torch.Tensor:
    """``N`` sigmas -> ``N size`` normalised 1D Gaussian kernels."""
    r = torch.arange(size, device=sigma.device, dtype=torch.float32) - (size - 1) / 2
    k = torch.exp(-(r[None] ** 2) / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    return k / k.sum(1, keepdim=True)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``N 1 H W`` blurred with a separable 5-tap Gaussian of per-item ``sigma`` (``N``), reflect padding."""
    n, _, h, w = x.shape
    k = _gaussian_kernels(sigma).to(x.dtype)
    pad = BLUR_KERNEL // 2
    y = F.pad(x.reshape(1, n, h, w), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, k.view(n, 1, 1, BLUR_KERNEL), groups=n)
    y = F.conv2d(y, k.view(n, 1, BLUR_KERNEL, 1), groups=n)
    return y.reshape(n, 1, h, w)


def sharpen(x: torch.Tensor, factor: float) -> torch.Tensor:
    """torchvision-style sharpness: blend the image away from its 3x3-smoothed version by ``factor``."""
    kernel = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], device=x.device, dtype=x.dtype) / 13
    smooth = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel.view(1, 1, 3, 3))
    return (smooth + factor * (x - smooth)).clamp(0, 1)


def sobel_edges(label: torch.Tensor) -> torch.Tensor:
    """Binary ``N 1 H W`` -> its boundary (nonzero Sobel magnitude), binary."""
    gx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=label.device, dtype=label.dtype)
    kernels = torch.stack([gx, gx.t()]).unsqueeze(1)
    g = F.conv2d(F.pad(label, (1, 1, 1, 1), mode="replicate"), kernels)
    return (g.abs().sum(1, keepdim=True) > 0).to(label.dtype)


def _elastic_field(n: int, h: int, w: int, alpha: torch.Tensor, sigma: torch.Tensor, gen, device) -> torch.Tensor:
    """Smooth random displacement ``N H W 2`` in normalised units; ``alpha`` px magnitude, ``sigma`` px scale.

    The field is white noise on a coarse grid (one node per ``sigma`` pixels) upsampled bicubically, a
    cheap stand-in for Gaussian-smoothed per-pixel noise, scaled so its largest displacement is ``alpha``.
    """
    fields = []
    for i in range(n):
        g = max(2, round(max(h, w) / float(sigma[i])))
        noise = torch.randn(1, 2, g, g, generator=gen).to(device)
        d = F.interpolate(noise, size=(h, w), mode="bicubic", align_corners=True)
        d = d / d.abs().amax().clamp_min(1e-6) * float(alpha[i])
        fields.append(d[0].permute(1, 2, 0) * torch.tensor([2.0 / w, 2.0 / h], device=device))
    return torch.stack(fields)


def _spatial(images, labels, spec: Spec, s: _Sampler, gen):
    n, _, h, w = images.shape
    device = images.device
    theta = torch.eye(2, 3, device=device).repeat(n, 1, 1)
    warp = torch.zeros(n, dtype=torch.bool, device=device)
    if "affine" in spec:
        a = spec["affine"]
        on = s.coin(a["p"])
        angle = s.uniform(*a["degrees"]) * math.pi / 180
        scale = s.uniform(*a["scale"])
        t = [s.uniform(*a["translate"]) * torch.where(s.coin(0.5), 1.0, -1.0) * 2 for _ in range(2)]
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        affine = torch.stack([torch.stack([cos, -sin, t[0]], 1), torch.stack([sin, cos, t[1]], 1)], 1)
        theta = torch.where(on.view(-1, 1, 1), affine, theta)
        warp |= on
    grid = F.affine_grid(theta, (n, 1, h, w), align_corners=False)
    if "elastic" in spec:
        e = spec["elastic"]
        on = s.coin(e["p"])
        k = 1 if s.shared else n  # shared: one field moves every item alike
        field = _elastic_field(k, h, w, s.uniform(*e["alpha"]), s.uniform(*e["sigma"]), gen, device)
        grid = grid + field.expand(n, -1, -1, -1) * on.view(-1, 1, 1, 1)
        warp |= on
    if warp.any():
        both = torch.cat([images, labels], 1)
        moved = F.grid_sample(both, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        images = _where(warp, moved[:, :1], images)
        labels = _where(warp, (moved[:, 1:] > 0.5).to(labels.dtype), labels)
    for op, dim in (("hflip", -1), ("vflip", -2)):
        if op in spec:
            on = s.coin(spec[op]["p"])
            images = _where(on, images.flip(dim), images)
            labels = _where(on, labels.flip(dim), labels)
    return images, labels


def augment(
    images: torch.Tensor,
    labels: torch.Tensor,
    spec: Spec,
    generator: Optional[torch.Generator] = None,
    shared: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply ``spec`` to ``N 1 H W`` images in [0, 1] and binary labels; returns new tensors."""
    s = _Sampler(images.shape[0], shared, generator, images.device)
    images, labels = _spatial(images, labels, spec, s, generator)
    if "brightness_contrast" in spec:
        a = spec["brightness_contrast"]
        on = s.coin(a["p"])
        c = s.uniform(*a["contrast"]).view(-1, 1, 1, 1)
        b = s.uniform(*a["brightness"]).view(-1, 1, 1, 1)
        mean = images.mean(dim=(1, 2, 3), keepdim=True)
        images = _where(on, ((images - mean) * c + mean + b).clamp(0, 1), images)
    if "sharpness" in spec:
        on = s.coin(spec["sharpness"]["p"])
        images = _where(on, sharpen(images, spec["sharpness"]["factor"]), images)
    if "blur" in spec:
        a = spec["blur"]
        on = s.coin(a["p"])
        images = _where(on, gaussian_blur(images, s.uniform(*a["sigma"])), images)
    if "noise" in spec:
        a = spec["noise"]
        on = s.coin(a["p"])
        mu = s.uniform(*a["mean"]).view(-1, 1, 1, 1)
        sd = s.uniform(*a["std"]).view(-1, 1, 1, 1)
        eps = torch.randn(images.shape, generator=generator).to(images.device)
        images = _where(on, (images + mu + sd * eps).clamp(0, 1), images)
    if "flip_intensity" in spec:
        images = _where(s.coin(spec["flip_intensity"]["p"]), 1 - images, images)
    if "sobel_label" in spec:
        labels = _where(s.coin(spec["sobel_label"]["p"]), sobel_edges(labels), labels)
    return images, labels


# ---------------------------------------------------------------------------------------------------
# Imperfect context labels
# ---------------------------------------------------------------------------------------------------


def _grow(labels: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary ``N 1 H W`` dilated (``radius > 0``) or eroded (``radius < 0``) by a square of ``|radius|``."""
    if radius == 0:
        return labels
    k = 2 * abs(radius) + 1
    if radius > 0:
        return F.max_pool2d(labels, k, stride=1, padding=abs(radius))
    return 1 - F.max_pool2d(1 - labels, k, stride=1, padding=abs(radius))


def perturb_labels(
    labels: torch.Tensor,
    generator: Optional[torch.Generator] = None,
    max_radius: int = 4,
    alpha: tuple[float, float] = (1.0, 6.0),
    sigma: tuple[float, float] = (8.0, 16.0),
) -> torch.Tensor:
    """A plausible imperfect annotation of binary ``N 1 H W`` labels, as a context set made of earlier
    corrected predictions is: grown or shrunk by up to ``max_radius`` px (one direction for all ``N``,
    since a model's or annotator's bias is systematic; a magnitude per item), then the border warped by a
    smooth random field (``alpha`` px, scale ``sigma`` px). An empty result keeps the original label."""
    n, _, h, w = labels.shape
    sign = 1 if float(torch.rand((), generator=generator)) < 0.5 else -1
    radii = torch.randint(0, max_radius + 1, (n,), generator=generator).tolist()
    grown = torch.cat([_grow(labels[i : i + 1], sign * r) for i, r in enumerate(radii)])
    s = _Sampler(n, False, generator, labels.device)
    field = _elastic_field(n, h, w, s.uniform(*alpha), s.uniform(*sigma), generator, labels.device)
    base = F.affine_grid(torch.eye(2, 3, device=labels.device).repeat(n, 1, 1), (n, 1, h, w), align_corners=False)
    warped = (F.grid_sample(grown, base + field, mode="bilinear", align_corners=False) > 0.5).to(labels.dtype)
    empty = warped.flatten(1).sum(1) == 0
    return _where(empty, labels, warped)
