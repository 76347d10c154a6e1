"""Widening a trained network keeps what it computes."""

import pytest
import torch

from mvseg import MultiverSegNet
from mvseg.checkpoint import load_checkpoint, save_checkpoint
from mvseg.network import MultiverSegConfig
from mvseg.widen import main, widen


def _trained_like(seed: int = 0) -> MultiverSegNet:
    """A small network with norm parameters away from their init, as training leaves them."""
    torch.manual_seed(seed)
    net = MultiverSegNet(MultiverSegConfig(encoder_widths=[6, 8, 8]))
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "norml" in name:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
    return net.eval()


def _inputs(context: int = 3):
    torch.manual_seed(1)
    target = torch.rand(2, 5, 32, 32)
    return target, torch.rand(2, context, 1, 32, 32), (torch.rand(2, context, 1, 32, 32) > 0.5).float()


def test_doubling_every_channel_computes_the_same_function():
    net = _trained_like()
    wide = widen(net, [12, 16, 16], noise=0.0)
    assert wide.config.encoder_widths == [12, 16, 16] and wide.config.decoder_widths == [16, 12]
    with torch.no_grad():
        for context in (0, 3):
            x = _inputs(context) if context else (_inputs()[0],)
            assert torch.allclose(wide(*x), net(*x), atol=1e-4)


def test_uneven_widening_stays_close_and_noise_separates_the_copies():
    net = _trained_like()
    x = _inputs()
    with torch.no_grad():
        y = net(*x)
        exact_copies = widen(net, [9, 10, 12], noise=0.0)
        noisy = widen(net, [9, 10, 12], noise=0.05)
        # only the norms' statistics move: the logits stay nearly the same function of the input
        assert torch.corrcoef(torch.stack([exact_copies(*x).flatten(), y.flatten()]))[0, 1] > 0.99
        assert not torch.allclose(noisy(*x), exact_copies(*x))
    w = noisy.state_dict()["enc_blocks.0.cross.cross_conv.weight"]
    copies = w[6:]
    assert not any(torch.allclose(c, o) for c in copies for o in w[:6])


def test_narrowing_or_another_depth_is_refused():
    net = _trained_like()
    with pytest.raises(ValueError, match="at least"):
        widen(net, [4, 8, 8])
    with pytest.raises(ValueError):
        widen(net, [8, 8, 8, 8])


def test_the_command_writes_a_loadable_wider_checkpoint(tmp_path):
    net = _trained_like()
    save_checkpoint(net, tmp_path / "narrow.pt", {"note": "test"})
    main([str(tmp_path / "narrow.pt"), str(tmp_path / "wide.pt"), "--width", "16", "--noise", "0"])
    wide = load_checkpoint(tmp_path / "wide.pt")
    assert wide.config.encoder_widths == [16, 16, 16]
    assert wide.meta["widened_from"]["meta"] == {"note": "test"}
    for bad in (["--width", "4"], ["--width", "16", "--noise", "-1"]):
        with pytest.raises(SystemExit):
            main([str(tmp_path / "narrow.pt"), str(tmp_path / "w.pt"), *bad])
        assert not (tmp_path / "w.pt").exists()
    narrow = (tmp_path / "narrow.pt").read_bytes()
    with pytest.raises(SystemExit):  # over the trained weights themselves
        main([str(tmp_path / "narrow.pt"), str(tmp_path / "narrow.pt"), "--width", "16"])
    assert (tmp_path / "narrow.pt").read_bytes() == narrow
