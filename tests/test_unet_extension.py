"""The ExVideo UNet extension: exact behaviour of the position table and the identity 3D convolution."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import REFERENCE, unet_inputs
from exvideo import cyclic_position_ids, extend_unet, extended_num_frames, load_unet
from exvideo.unet import ExVideoTransformerSpatioTemporalModel, spatio_temporal_transformers


def run(unet, num_frames, **kw):
    with torch.no_grad():
        return unet(**unet_inputs(num_frames, **kw), return_dict=False)[0]


def test_cyclic_ids_match_reference_list():
    reference = [int(x) for x in (REFERENCE / "exvideo_position_ids_128.txt").read_text().split()]
    assert cyclic_position_ids(128) == reference
    assert cyclic_position_ids(25) == list(range(25))
    ids = cyclic_position_ids(300)
    assert min(ids[25:]) == 4 and max(ids[25:]) == 24
    assert all(abs(a - b) == 1 for a, b in zip(ids, ids[1:]))  # the bounce never jumps


def test_table_is_initialised_from_sinusoid_at_cyclic_ids(tiny_unet):
    transformer = tiny_unet.down_blocks[0].attentions[0]
    sinusoid = transformer.time_proj
    extend_unet(tiny_unet, num_frames=64)
    expected = sinusoid(torch.tensor(cyclic_position_ids(64)))
    assert torch.equal(transformer.time_proj.embeddings.detach(), expected)
    conv = transformer.temporal_transformer_blocks[0].positional_conv
    assert conv.weight.shape == (32, 32, 3, 3, 3) and conv.padding_mode == "reflect"
    centre = conv.weight[:, :, 1, 1, 1]
    assert torch.equal(centre, torch.eye(32))
    assert conv.weight.abs().sum() == 32 and conv.bias.abs().sum() == 0


@pytest.mark.parametrize("num_frames", [1, 8, 25])
def test_extended_equals_base_up_to_25_frames(tiny_unet, num_frames):
    base = copy.deepcopy(tiny_unet)
    extended = extend_unet(tiny_unet, num_frames=128)
    diff = (run(base, num_frames) - run(extended, num_frames)).abs().max()
    assert diff <= 1e-5


def test_extended_differs_beyond_25_frames(tiny_unet):
    base = copy.deepcopy(tiny_unet)
    extended = extend_unet(tiny_unet, num_frames=128)
    assert (run(base, 40) - run(extended, 40)).abs().max() > 1e-4


@pytest.mark.parametrize("tensor", ["time_proj.embeddings", "temporal_transformer_blocks.0.positional_conv.weight"])
def test_new_tensors_are_in_the_forward_path(tiny_unet, tensor):
    extended = extend_unet(tiny_unet, num_frames=32)
    before = run(extended, 8)
    for transformer in spatio_temporal_transformers(extended).values():
        with torch.no_grad():
            param = transformer.get_parameter(tensor)
            param.add_(0.1 * torch.randn_like(param))
    assert (run(extended, 8) - before).abs().max() > 1e-4


def test_more_frames_than_table_is_a_clear_error(tiny_unet):
    extend_unet(tiny_unet, num_frames=16)
    with pytest.raises(ValueError, match="asked for 20 frames but the ExVideo position table holds 16"):
        run(tiny_unet, 20)


def test_extend_is_idempotent_and_refuses_other_length(tiny_unet):
    extend_unet(tiny_unet, num_frames=32)
    extend_unet(tiny_unet, num_frames=32)
    assert extended_num_frames(tiny_unet) == 32
    assert tiny_unet.config["exvideo_num_frames"] == 32
    assert all(isinstance(m, ExVideoTransformerSpatioTemporalModel)
               for m in spatio_temporal_transformers(tiny_unet).values())
    with pytest.raises(ValueError, match="already extended to 32"):
        extend_unet(tiny_unet, num_frames=64)


def test_save_pretrained_then_load_unet_round_trip(tiny_unet, tmp_path):
    extended = extend_unet(tiny_unet, num_frames=48)
    with torch.no_grad():  # make the new tensors differ from their initial values, so loading them is visible
        for name, p in extended.named_parameters():
            if "positional_conv" in name or "time_proj" in name:
                p.add_(0.01 * torch.randn_like(p))
    extended.save_pretrained(tmp_path / "unet")
    loaded = load_unet(tmp_path / "unet")
    assert extended_num_frames(loaded) == 48
    loaded_tensors = loaded.state_dict()
    assert set(loaded_tensors) == set(extended.state_dict())
    for name, tensor in extended.state_dict().items():
        assert torch.equal(loaded_tensors[name], tensor), name
    assert torch.equal(run(loaded, 30), run(extended, 30))


def test_gradient_checkpointing_covers_temporal_step_and_matches(tiny_unet):
    extended = extend_unet(tiny_unet, num_frames=32)
    reference = copy.deepcopy(extended)
    extended.enable_gradient_checkpointing()
    inputs = unet_inputs(12)
    grads = []
    for model in (reference, extended):
        model.zero_grad()
        model(**inputs, return_dict=False)[0].square().mean().backward()
        grads.append(model.down_blocks[0].attentions[0].temporal_transformer_blocks[0].positional_conv.weight.grad)
    assert grads[0] is not None and grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
