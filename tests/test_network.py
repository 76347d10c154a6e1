"""The CPU convolution paths, the channels-last layout and the training-time compile wrapper."""

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import mvseg.network as network
from mvseg import MultiverSegNet
from mvseg.memory import retain_for_network, retain_freed_memory
from mvseg.network import MultiverSegConfig, conv3x3, conv3x3_concat
from mvseg.train import CompiledNetwork

from .conftest import ROOT


@pytest.mark.parametrize("path", ["auto", "direct", "winograd"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_every_conv_path_is_the_convolution(path, channels_last, monkeypatch):
    monkeypatch.setattr(network, "CONV_PATH", path)
    torch.manual_seed(0)
    x, w, b = torch.rand(3, 24, 20, 16), torch.rand(16, 24, 3, 3) - 0.5, torch.rand(16)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        assert torch.allclose(conv3x3(x, w, b), F.conv2d(x.contiguous(), w, b, padding=1), atol=1e-4)


def test_the_measured_path_is_remembered_per_layer_shape(monkeypatch):
    monkeypatch.setattr(network, "_faster_path", {})
    with torch.inference_mode():
        conv3x3(torch.rand(2, 24, 16, 16), torch.rand(24, 24, 3, 3), None)
    if torch._nnpack_available():
        assert set(network._faster_path) == {(24, 24, 16, 16)}
        assert network._faster_path[(24, 24, 16, 16)] in ("direct", "winograd")


def test_concatenated_parts_convolve_as_their_concatenation():
    torch.manual_seed(0)
    a, b = torch.rand(2, 5, 8, 8), torch.rand(2, 3, 8, 8)
    w, bias = torch.rand(4, 8, 3, 3), torch.rand(4)
    expected = F.conv2d(torch.cat([a, b], dim=1), w, bias, padding=1)
    assert torch.allclose(conv3x3_concat([a, b], w, bias), expected, atol=1e-5)


def test_the_cpu_forward_keeps_features_channels_last_and_trains():
    """Channels-last features, in-place activations and the split decoder convolution still train."""
    torch.manual_seed(0)
    net = MultiverSegNet(MultiverSegConfig(encoder_widths=[8, 8, 8, 8]))
    t, ci = torch.rand(2, 5, 32, 32), torch.rand(2, 3, 1, 32, 32)
    cl = (torch.rand(2, 3, 1, 32, 32) > 0.5).float()
    out = net(t, ci, cl)
    assert out.shape == (2, 1, 32, 32)
    out.square().mean().backward()
    unused = f"dec_blocks.{len(net.dec_blocks) - 1}.support."  # the last context branch feeds nothing
    grads = {name: p.grad for name, p in net.named_parameters() if not name.startswith(unused)}
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())
    with torch.inference_mode():
        assert torch.allclose(net(t, ci, cl), out.detach(), atol=1e-5)


def test_freed_memory_is_kept_once_for_the_process():
    first = retain_freed_memory()
    assert retain_freed_memory() == first
    assert isinstance(first, bool)


def test_a_server_process_keeps_two_malloc_heaps_however_many_threads_allocate():
    """glibc's per-thread heaps each keep their peak: a server of many threads grew to 16 of them."""
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc only")
    probe = textwrap.dedent("""
        import ctypes, os, sys, tempfile, threading
        sys.path.insert(0, sys.argv[1])
        from mvseg.memory import limit_arenas, retain_freed_memory
        if sys.argv[2] == "limit":
            assert limit_arenas()
        retain_freed_memory()
        start = threading.Barrier(12)
        def work():
            start.wait()
            for _ in range(50):
                blocks = [bytearray(1 << 20) for _ in range(8)]
                del blocks
        threads = [threading.Thread(target=work) for _ in range(12)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        libc = ctypes.CDLL("libc.so.6")
        libc.fopen.restype = ctypes.c_void_p
        path = tempfile.mktemp()
        f = libc.fopen(path.encode(), b"w")
        libc.malloc_info(0, ctypes.c_void_p(f))
        libc.fclose(ctypes.c_void_p(f))
        print(open(path).read().count("<heap nr="))
        os.unlink(path)
    """)
    heaps = {mode: int(subprocess.run([sys.executable, "-c", probe, str(ROOT / "lib"), mode], capture_output=True,
                                      text=True, check=True, timeout=120).stdout)
             for mode in ("limit", "default")}
    assert heaps["limit"] <= 2 < heaps["default"], heaps


def test_freed_memory_is_kept_only_for_narrow_networks_on_the_cpu():
    assert retain_for_network("cpu", [24, 24, 24, 24]) == retain_freed_memory()
    assert not retain_for_network("cpu", [256, 256, 256, 256])
    assert not retain_for_network("cuda", [24, 24, 24, 24])


def test_training_falls_back_to_eager_where_compiling_fails(monkeypatch, caplog):
    def no_compiler(model):
        def fail(*args):
            raise RuntimeError("no C compiler found")

        return fail

    monkeypatch.setattr(torch, "compile", no_compiler)
    net = MultiverSegNet(MultiverSegConfig(encoder_widths=[8, 8, 8, 8]))
    compiled = CompiledNetwork(net)
    t, ci, cl = torch.rand(1, 5, 16, 16), torch.rand(1, 2, 1, 16, 16), torch.rand(1, 2, 1, 16, 16)
    out = compiled(t, ci, cl)
    assert torch.equal(out, net(t, ci, cl))
    assert compiled.failed and "training eagerly" in caplog.text
