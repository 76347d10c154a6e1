"""The official checkpoints load strictly and reproduce the official outputs and input encodings."""

import json

import pytest
import torch

import mvseg.network as network
from mvseg import CheckpointError, MultiverSegNet, ScribblePromptUNet, encode_prompts, load_checkpoint
from mvseg.network import count_parameters
from mvseg.prompts import rescale_prompts

from .conftest import REFERENCE

ATOL = 1e-4
MVS_CASES = [
    "mvs_case_ctx1.pt", "mvs_case_ctx3.pt", "mvs_case_ctx8.pt", "mvs_case_ctx0_fallback.pt", "mvs_trace_32px.pt"
]
SP_CASES = ["sp_case_clicks.pt", "sp_case_box.pt", "sp_case_scribbles_prevmask.pt"]
ENC_CASES = ["enc1_clicks.pt", "enc2_boxes.pt", "enc3_scribbles_clicks_overlap.pt", "enc4_all.pt"]


def vectors(name):
    return torch.load(REFERENCE / name, map_location="cpu", weights_only=True)


@pytest.fixture(params=["auto", "winograd", "direct"])
def conv_path(request, monkeypatch):
    monkeypatch.setattr(network, "CONV_PATH", request.param)
    return request.param


@pytest.fixture(scope="module")
def mvs():
    return load_checkpoint(REFERENCE / "mvs_nf32_checkpoint.pt")


@pytest.fixture(scope="module")
def sp():
    return load_checkpoint(REFERENCE / "sp_nf32_checkpoint.pt")


def test_checkpoints_load_with_their_architecture(mvs, sp):
    assert isinstance(mvs, MultiverSegNet) and mvs.kind == "multiverseg"
    assert mvs.config.encoder_widths == [32] * 4 and mvs.config.decoder_widths == [32] * 3
    assert isinstance(sp, ScribblePromptUNet) and sp.config.features == [32] * 4
    assert len(mvs.state_dict()) == 72 and len(sp.state_dict()) == 29


@pytest.mark.parametrize("case", MVS_CASES)
def test_multiverseg_reproduces_official_logits(mvs, case, conv_path):
    d = vectors(case)
    with torch.inference_mode():
        out = mvs(d["target_input"], d["context_images"], d["context_labels"])
    assert out.shape == d["expected_logits"].shape
    assert (out - d["expected_logits"]).abs().max().item() < ATOL


def test_multiverseg_official_5d_target_call(mvs):
    d = vectors("mvs_case_ctx1.pt")
    with torch.inference_mode():
        out = mvs(d["target_input"].unsqueeze(1), d["context_images"], d["context_labels"])
    assert (out - d["expected_logits"]).abs().max().item() < ATOL


def test_multiverseg_per_block_outputs_match_trace(mvs):
    """Each CrossBlock's target output matches, so a wrong mapping shows up at the layer that is wrong."""
    d = vectors("mvs_trace_32px.pt")
    blocks = {f"enc_blocks.{i}": b for i, b in enumerate(mvs.enc_blocks)}
    blocks.update({f"dec_blocks.{i}": b for i, b in enumerate(mvs.dec_blocks)})
    seen = {}
    hooks = [b.target.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o)) for n, b in blocks.items()]
    with torch.inference_mode():
        mvs(d["target_input"], d["context_images"], d["context_labels"])
    for h in hooks:
        h.remove()
    assert set(seen) == set(d["block_outputs"])
    for name, expected in d["block_outputs"].items():
        assert (seen[name] - expected["target"][:, 0]).abs().max().item() < ATOL, name


@pytest.mark.parametrize("case", SP_CASES)
def test_scribbleprompt_reproduces_official_logits_and_encoding(sp, case, conv_path):
    d = vectors(case)
    assert torch.equal(encode_prompts(**d["prompts"]), d["input"])
    with torch.inference_mode():
        out = sp(d["input"])
    assert (out - d["expected_logits"]).abs().max().item() < ATOL


@pytest.mark.parametrize("case", ENC_CASES)
def test_encoding_matches_official(case):
    d = vectors(case)
    assert (encode_prompts(**d["prompts"]) - d["expected"]).abs().max().item() < ATOL


def test_demo_rescale_matches_official():
    d = vectors("enc5_rescale_256_to_128.pt")
    rescaled = rescale_prompts(d["prompts_256"], 128)
    for key, value in d["rescaled"].items():
        assert rescaled[key].dtype == value.dtype, key
        assert torch.allclose(rescaled[key].float(), value.float(), atol=ATOL), key
    assert (encode_prompts(**rescaled) - d["expected"]).abs().max().item() < ATOL


def _state_from_key_table(name):
    table = json.loads((REFERENCE / name).read_text())
    g = torch.Generator().manual_seed(0)
    return table, {k: torch.randn(shape, generator=g) * 0.01 for k, shape in table["keys"].items()}


def test_full_size_multiverseg_key_table_loads_strictly(tmp_path):
    table, state = _state_from_key_table("multiverseg_nf256_keys.json")
    path = tmp_path / "MultiverSeg_v1_nf256_res128.pt"
    torch.save({"model": state}, path)
    model = load_checkpoint(path)
    assert model.config.encoder_widths == [256] * 4
    assert count_parameters(model) == table["num_params"] == 18_903_297
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_full_size_scribbleprompt_key_table_loads_strictly(tmp_path):
    table, state = _state_from_key_table("scribbleprompt_nf192_keys.json")
    path = tmp_path / "ScribblePrompt_unet_v1_nf192_res128.pt"
    torch.save(state, path)
    model = load_checkpoint(path)
    assert model.config.features == [192] * 4
    assert count_parameters(model) == table["num_params"] == 3_991_882


def test_wrong_files_name_the_problem(tmp_path):
    _, state = _state_from_key_table("multiverseg_nf256_keys.json")
    missing = dict(state)
    del missing["dec_blocks.1.support.vmapped.norml.bias"]
    torch.save({"model": missing}, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="missing keys.*dec_blocks.1.support.vmapped.norml.bias"):
        load_checkpoint(tmp_path / "missing.pt")

    extra = dict(state, **{"enc_blocks.0.extra.weight": torch.zeros(1)})
    torch.save({"model": extra}, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match="unexpected keys.*enc_blocks.0.extra.weight"):
        load_checkpoint(tmp_path / "extra.pt")

    wrong = dict(state, **{"out_conv.conv.weight": torch.zeros(1, 128, 1, 1)})
    torch.save({"model": wrong}, tmp_path / "shape.pt")
    with pytest.raises(CheckpointError, match="shape mismatches.*out_conv.conv.weight"):
        load_checkpoint(tmp_path / "shape.pt")

    (tmp_path / "corrupt.pt").write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(tmp_path / "corrupt.pt")

    torch.save({"weights": {"foo.weight": torch.zeros(1)}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="expected a state dict"):
        load_checkpoint(tmp_path / "foreign.pt")

    torch.save({"foo.weight": torch.zeros(1)}, tmp_path / "other_net.pt")
    with pytest.raises(CheckpointError, match="not a MultiverSeg or ScribblePrompt"):
        load_checkpoint(tmp_path / "other_net.pt")

    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")


def test_own_format_round_trip(tmp_path, mvs):
    from mvseg import save_checkpoint

    save_checkpoint(mvs, tmp_path / "ours.pt", meta={"trained_steps": 3})
    again = load_checkpoint(tmp_path / "ours.pt")
    assert again.meta == {"trained_steps": 3}
    assert all(torch.equal(again.state_dict()[k], v) for k, v in mvs.state_dict().items())
