"""The MultiverSeg network and the ScribblePrompt-UNet, with the official parameter names.

Both modules keep the state-dict keys of the official releases so their checkpoints load with strict
key checking (see ``mvseg.checkpoint``). The MultiverSeg forward is organised for speed and memory:

* The cross convolution ``Conv(q || v_i)`` is split into ``Conv(q; W_q) + Conv(v_i; W_v)`` so the target
  half runs once per target instead of once per context entry (appendix B.1 of the paper).
* The context set is streamed through every block in chunks, so the only context features held at once
  are the ones the decoder needs later (the skips); temporaries stay one chunk large.
* The context branch of the last decoder block feeds nothing, so it is not computed.
* On CPU, features are kept channels-last and each convolution layer shape takes the faster of two
  kernels (see ``CONV_PATH``); a decoder's concatenated input is convolved part by part, never built.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

# Target channels: image, box, positive clicks+scribbles, negative clicks+scribbles, previous logits.
TARGET_CHANNELS = 5
# Context channels: image, label.
CONTEXT_CHANNELS = 2
LEAKY_SLOPE = 0.01
# Context entries streamed through a block at once are capped so that one chunk's feature map stays
# near this many float elements (32M floats = 128 MB in fp32).
CHUNK_ELEMENTS = 32 * 1024 * 1024


# ---------------------------------------------------------------------------------------------------
# Convolution
# ---------------------------------------------------------------------------------------------------

# Two paths run a 3x3 convolution on CPU, and which is faster depends on the layer's shape:
# * direct: oneDNN on channels-last (NHWC) tensors. Best for narrow layers (the bundled width-24 network:
#   ~150 GFLOP/s, 2.6x the same convolution on NCHW tensors, 8x for the 2-channel context input);
# * winograd: NNPACK's Winograd kernels, one image at a time on NCHW tensors (NNPACK's batched entry point
#   is the slow training one). Best for wide layers (width 256: about 3x the direct path's FLOP rate).
# CONV_PATH "auto" times both once per layer shape (cin, cout, H, W) on the first call and keeps the faster;
# "direct" or "winograd" forces one (training always runs direct: NNPACK has no backward here). The paths
# differ by float32 rounding only (~1e-5 relative).
CONV_PATH = "auto"
_WINOGRAD_MIN_CHANNELS = 16  # NNPACK fails on, or gains nothing for, very thin inputs
_WINOGRAD_MARGIN = 1.25
_faster_path: dict[tuple[int, int, int, int], str] = {}


def _winograd_possible(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        CONV_PATH != "direct"
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and weight.shape[1] >= _WINOGRAD_MIN_CHANNELS
        and min(x.shape[-2:]) >= 8
        and torch._nnpack_available()
    )


def _direct(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    if x.device.type == "cpu":
        x = x.contiguous(memory_format=torch.channels_last)
    return F.conv2d(x, weight, bias, padding=1)


def _winograd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    if not torch._nnpack_available():  # also initialises NNPACK, which fails every call until then
        raise RuntimeError("NNPACK is not available in this PyTorch build")
    weight = weight.contiguous()
    outs = [torch._nnpack_spatial_convolution(x[i : i + 1].contiguous(), weight, bias, [1, 1]) for i in range(len(x))]
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _time(conv: Callable, *args) -> float:
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        conv(*args)
        best = min(best, time.perf_counter() - start)
    return best


def _measured_path(x: torch.Tensor, weight: torch.Tensor) -> str:
    """The faster path for this layer shape, timed once on up to 4 random NHWC images (a few ms at width
    24, ~0.2 s at width 256). Winograd must win by a margin: its input and output change layout, and a
    narrow layer's timing is noisy."""
    key = (weight.shape[1], weight.shape[0]) + tuple(x.shape[-2:])
    if key not in _faster_path:
        probe = torch.rand((min(len(x), 4),) + tuple(x.shape[1:])).contiguous(memory_format=torch.channels_last)
        w = weight.detach().contiguous()
        direct, winograd = _time(_direct, probe, w, None), _time(_winograd, probe, w, None)
        _faster_path[key] = "winograd" if winograd * _WINOGRAD_MARGIN < direct else "direct"
        logger.debug("conv %s: direct %.2f ms, winograd %.2f ms", key, direct * 1e3, winograd * 1e3)
    return _faster_path[key]


def conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """3x3 convolution, stride 1, zero padding 1. ``N Cin H W -> N Cout H W`` (NHWC on the direct path)."""
    if _winograd_possible(x, weight) and (CONV_PATH == "winograd" or _measured_path(x, weight) == "winograd"):
        return _winograd(x, weight, bias)
    return _direct(x, weight, bias)


def conv3x3_concat(parts: Sequence[torch.Tensor], weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """:func:`conv3x3` of the channel concatenation of ``parts`` without building it: the sum of each part's
    convolution with its slice of ``weight`` (10% faster than concatenating 2 x 24 NHWC channels first)."""
    out, lo = None, 0
    for part in parts:
        hi = lo + part.shape[1]
        y = conv3x3(part, weight[:, lo:hi], bias if out is None else None)
        out = y if out is None else out.add_(y)
        lo = hi
    return out


def max_pool2(x: torch.Tensor) -> torch.Tensor:
    """2x2 max-pooling, stride 2 (``F.max_pool2d(x, 2)``, exactly). ``max_pool2d`` itself on channels-last
    tensors and under autograd (its backward is 9x faster than the maximum's); on NCHW tensors at inference,
    the elementwise maximum of the four strided views, 3x faster there (14 x 24 x 128 x 128: 4.6 ms
    against 16.5)."""
    h, w = x.shape[-2:]
    if h % 2 or w % 2 or torch.is_grad_enabled() or x.is_contiguous(memory_format=torch.channels_last):
        return F.max_pool2d(x, 2)
    top = torch.maximum(x[..., 0::2, 0::2], x[..., 0::2, 1::2])
    return torch.maximum(top, torch.maximum(x[..., 1::2, 0::2], x[..., 1::2, 1::2]))


class Conv3x3(nn.Conv2d):
    """``nn.Conv2d(k=3, padding=1)`` (same parameters and keys) running through :func:`conv3x3`."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv3x3(x, self.weight, self.bias)


# ---------------------------------------------------------------------------------------------------
# MultiverSeg
# ---------------------------------------------------------------------------------------------------


class ConvNormAct(nn.Module):
    """conv3x3 -> LeakyReLU(0.01) -> one-group GroupNorm (the official "layer" norm). ``N C H W``."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = Conv3x3(in_channels, out_channels)
        self.norml = nn.GroupNorm(1, out_channels, eps=1e-5, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norml(F.leaky_relu_(self.conv(x), LEAKY_SLOPE))


class Vmapped(nn.Module):
    """Holds a per-entry op under the name ``vmapped`` (the official key prefix)."""

    def __init__(self, op: nn.Module):
        super().__init__()
        self.vmapped = op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vmapped(x)


class Head(nn.Module):
    """1x1 convolution to one logit channel, named ``out_conv.conv`` as in the official checkpoint."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class CrossConv(nn.Module):
    """``z_i = LeakyReLU(Conv(q || v_i))``, computed as a target term plus a context term."""

    def __init__(self, target_channels: int, context_channels: int, out_channels: int):
        super().__init__()
        self.target_channels = target_channels
        self.cross_conv = nn.Conv2d(target_channels + context_channels, out_channels, 3, padding=1)

    def target_term(self, q: Sequence[torch.Tensor]) -> torch.Tensor:
        """Target features as channel parts ``[B Ci H W]`` -> ``B C H W``: the target half of the
        convolution, bias included."""
        return conv3x3_concat(q, self.cross_conv.weight[:, : self.target_channels], self.cross_conv.bias)

    def context_weight(self) -> torch.Tensor:
        return self.cross_conv.weight[:, self.target_channels :]

    def interact(self, target_term: torch.Tensor, v: Sequence[torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
        """``(B C H W, channel parts [B*n Ci H W] of n entries, context_weight()) -> B n C H W``."""
        zv = conv3x3_concat(v, weight, None).unflatten(0, (len(target_term), -1))
        # in place on a view (zv), autograd would copy the whole tensor back in the backward: add into a new one
        z = zv + target_term.unsqueeze(1) if torch.is_grad_enabled() else zv.add_(target_term.unsqueeze(1))
        return F.leaky_relu_(z, LEAKY_SLOPE)


class CrossBlock(nn.Module):
    """One MultiverSeg stage: cross convolution, then separate target and context convolutions."""

    def __init__(self, target_channels: int, context_channels: int, cross_width: int, conv_width: int):
        super().__init__()
        self.cross = CrossConv(target_channels, context_channels, cross_width)
        self.target = Vmapped(ConvNormAct(cross_width, conv_width))
        self.support = Vmapped(ConvNormAct(cross_width, conv_width))

    def forward(
        self,
        q: Sequence[torch.Tensor],
        context: Callable[[int, int], list[torch.Tensor]],
        size: int,
        keep_context: bool = True,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Run the block with the context streamed in chunks.

        Args:
            q: target features ``B Cq H W``, as channel parts (decoder: upsampled features and skip).
            context: ``context(lo, hi)`` returns context entries ``lo:hi`` as channel parts ``B*n Ci H W``.
            size: number of context entries S (>= 1).
            keep_context: compute and return the new context features.
        Returns:
            new target ``B C H W`` and new context ``B S C H W`` (``None`` unless ``keep_context``).
        """
        t = self.cross.target_term(q)
        weight = self.cross.context_weight()
        b, c, h, w = t.shape
        chunk = max(1, CHUNK_ELEMENTS // max(1, b * c * h * w))
        if size <= chunk:  # the usual case: no buffer to fill
            z = self.cross.interact(t, context(0, size), weight)
            v = self.support(z.flatten(0, 1)).unflatten(0, (b, size)) if keep_context else None
            return self.target(_entry_sum(z).div_(size)), v
        z_sum = torch.zeros_like(t)
        out = None
        for lo in range(0, size, chunk):
            hi = min(size, lo + chunk)
            z = self.cross.interact(t, context(lo, hi), weight)
            z_sum += _entry_sum(z)
            if keep_context:
                v = self.support(z.flatten(0, 1)).unflatten(0, (b, hi - lo))
                if out is None:
                    out = _empty_entries_like(v, size)
                out[:, lo:hi] = v
            del z
        return self.target(z_sum / size), out


@dataclass
class MultiverSegConfig:
    """Architecture of a MultiverSeg network; readable off a state dict (``mvseg.checkpoint``)."""

    encoder_widths: list[int] = field(default_factory=lambda: [256, 256, 256, 256])
    decoder_widths: Optional[list[int]] = None  # default: encoder widths, reversed, without the last
    target_channels: int = TARGET_CHANNELS
    context_channels: int = CONTEXT_CHANNELS

    def __post_init__(self):
        if self.decoder_widths is None:
            self.decoder_widths = list(self.encoder_widths[-2::-1])
        if len(self.encoder_widths) < 2 or len(self.decoder_widths) != len(self.encoder_widths) - 1:
            raise ValueError(
                f"need >= 2 encoder stages and one decoder stage fewer, got encoder {self.encoder_widths}, "
                f"decoder {self.decoder_widths}"
            )

    def to_dict(self) -> dict:
        return asdict(self)


class MultiverSegNet(nn.Module):
    """MultiverSeg: a UNet of CrossBlocks over a target and a context set.

    ``forward(target B 5 H W, context_images B S 1 H W, context_labels B S 1 H W) -> logits B 1 H W``.
    H and W must be divisible by ``2 ** (depth - 1)``. S may be 0 (or the tensors ``None``): the
    network then uses one dummy entry whose image and label are 0.5, as the official code does.
    """

    def __init__(self, config: Optional[MultiverSegConfig] = None):
        super().__init__()
        self.config = config = config or MultiverSegConfig()
        enc, dec = config.encoder_widths, config.decoder_widths
        self.enc_blocks = nn.ModuleList()
        tq, tv = config.target_channels, config.context_channels
        for width in enc:
            self.enc_blocks.append(CrossBlock(tq, tv, width, width))
            tq = tv = width
        self.dec_blocks = nn.ModuleList()
        for width, skip in zip(dec, enc[-2::-1]):
            self.dec_blocks.append(CrossBlock(tq + skip, tv + skip, width, width))
            tq = tv = width
        self.out_conv = Head(tq)

    @property
    def depth(self) -> int:
        return len(self.enc_blocks)

    def forward(
        self,
        target: torch.Tensor,
        context_images: Optional[torch.Tensor] = None,
        context_labels: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if target.ndim == 5:  # the official call passes ``B 1 5 H W``
            target = target.squeeze(1)
        b, _, h, w = target.shape
        if context_images is None or context_images.shape[1] == 0:
            context = target.new_full((b, 1, 2, h, w), 0.5)
        else:
            context = torch.cat([context_images, context_labels], dim=2).to(target.dtype)
        if target.device.type == "cpu":  # the direct convolution's layout, kept from here on
            target = target.contiguous(memory_format=torch.channels_last)
            context = _nhwc_entries(context)
        size = context.shape[1]

        def entries(source: torch.Tensor, op=None):
            def get(lo: int, hi: int) -> list[torch.Tensor]:
                x = source[:, lo:hi].flatten(0, 1)
                return [x if op is None else op(x)]

            return get

        q, get_context = target, entries(context)
        skips: list[tuple[torch.Tensor, torch.Tensor]] = []
        for i, block in enumerate(self.enc_blocks):
            q, v = block([q], get_context, size)
            if i < self.depth - 1:
                skips.append((q, v))
                q = max_pool2(q)
                get_context = entries(v, max_pool2)
        for j, block in enumerate(self.dec_blocks):
            q_skip, v_skip = skips.pop()
            get_context = _decoder_entries(v, v_skip)
            last = j == len(self.dec_blocks) - 1
            q, v = block([_upsample(q), q_skip], get_context, size, keep_context=not last)
            del v_skip
        return self.out_conv(q)


def _upsample(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)


def _decoder_entries(low: torch.Tensor, skip: torch.Tensor) -> Callable[[int, int], list[torch.Tensor]]:
    """Context input of a decoder block, per chunk: the channel parts ``[upsample(low), skip]``."""

    def get(lo: int, hi: int) -> list[torch.Tensor]:
        return [_upsample(low[:, lo:hi].flatten(0, 1)), skip[:, lo:hi].flatten(0, 1)]

    return get


def _entry_sum(z: torch.Tensor) -> torch.Tensor:
    """``B n C H W -> B C H W``, summed over the entries as channels-last planes (``z.sum(1)`` reduces
    NHWC entries 30x slower)."""
    return z.permute(0, 1, 3, 4, 2).sum(dim=1).permute(0, 3, 1, 2)


def _nhwc_entries(x: torch.Tensor) -> torch.Tensor:
    """``B S C H W`` with every entry stored channels-last, so ``flatten(0, 1)`` is an NHWC view."""
    return x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)


def _empty_entries_like(v: torch.Tensor, size: int) -> torch.Tensor:
    """An empty ``B size C H W`` buffer whose entries have the memory layout of ``v``'s."""
    b, _, c, h, w = v.shape
    if v.flatten(0, 1).is_contiguous(memory_format=torch.channels_last):
        return v.new_empty((b, size, h, w, c)).permute(0, 1, 4, 2, 3)
    return v.new_empty((b, size, c, h, w))


# ---------------------------------------------------------------------------------------------------
# ScribblePrompt-UNet (the official model for an empty context set)
# ---------------------------------------------------------------------------------------------------


class ConvAct(nn.Module):
    """``conv`` = [Conv2d, PReLU] (or just [Conv2d] for the head), as the official keys ``conv.0/conv.1``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, activation: bool = True):
        super().__init__()
        if kernel_size not in (1, 3):
            raise ValueError(f"kernel_size must be 1 or 3, got {kernel_size}")
        conv = Conv3x3(in_channels, out_channels) if kernel_size == 3 else nn.Conv2d(in_channels, out_channels, 1)
        layers: list[nn.Module] = [conv]
        if activation:
            layers.append(nn.PReLU())
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


@dataclass
class ScribblePromptConfig:
    features: list[int] = field(default_factory=lambda: [192, 192, 192, 192])
    in_channels: int = TARGET_CHANNELS
    out_channels: int = 1

    def to_dict(self) -> dict:
        return asdict(self)


class ScribblePromptUNet(nn.Module):
    """ScribblePrompt-UNet: ``forward(target B 5 H W) -> logits B 1 H W``; H, W divisible by 2**depth."""

    def __init__(self, config: Optional[ScribblePromptConfig] = None):
        super().__init__()
        self.config = config = config or ScribblePromptConfig()
        self.downs = nn.ModuleList()
        channels = config.in_channels
        for width in config.features:
            self.downs.append(ConvAct(channels, width))
            channels = width
        self.bottleneck = ConvAct(channels, channels)
        self.ups = nn.ModuleList()
        for width in reversed(config.features):
            self.ups.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True))
            self.ups.append(ConvAct(channels + width, width))
            channels = width
        self.final_conv = ConvAct(channels, config.out_channels, kernel_size=1, activation=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for down in self.downs:
            x = down(x)
            skips.append(x)
            x = max_pool2(x)
        x = self.bottleneck(x)
        for up, conv in zip(self.ups[0::2], self.ups[1::2]):
            x = conv(torch.cat([skips.pop(), up(x)], dim=1))
        return self.final_conv(x)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def multiverseg_flops(
    config: MultiverSegConfig, context_size: int, size: int = 128, batch: int = 1
) -> dict[str, float]:
    """Multiply-add FLOPs (2 per MAC) of one forward, convolutions only.

    Returns ``{"executed": ..., "official": ...}``: what this implementation runs, and what the official
    implementation runs (it also computes the last decoder block's unused context branch).
    """
    s = max(1, context_size)

    def conv(cin: int, cout: int, hw: int, k: int = 3) -> float:
        return 2.0 * cin * cout * k * k * hw

    executed = unused = 0.0
    tq, tv = config.target_channels, config.context_channels
    res = size
    for i, width in enumerate(config.encoder_widths):
        hw = res * res
        executed += conv(tq, width, hw) + s * conv(tv, width, hw) + (1 + s) * conv(width, width, hw)
        tq = tv = width
        if i < len(config.encoder_widths) - 1:
            res //= 2
    skips = config.encoder_widths[-2::-1]
    for j, (width, skip) in enumerate(zip(config.decoder_widths, skips)):
        res *= 2
        hw = res * res
        executed += conv(tq + skip, width, hw) + s * conv(tv + skip, width, hw) + conv(width, width, hw)
        context_conv = s * conv(width, width, hw)
        if j == len(config.decoder_widths) - 1:
            unused += context_conv
        else:
            executed += context_conv
        tq = tv = width
    executed += conv(tq, 1, res * res, k=1)
    return {"executed": batch * executed, "official": batch * (executed + unused)}

