"""The trainable set on the full SVD-XT config (meta device), and adapter files in both layouts."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from diffusers import UNetSpatioTemporalConditionModel
from safetensors.torch import save_file

from conftest import REFERENCE, unet_inputs
from exvideo import (
    AdapterMismatchError, adapter_state_dict, apply_adapter, extend_unet, freeze_for_post_tuning, load_adapter,
    save_adapter, trainable_parameters,
)
from exvideo.adapter import reference_to_diffusers_name


def reference_keys() -> dict[str, tuple[int, ...]]:
    rows = (REFERENCE / "exvideo_svd_128f_keys.tsv").read_text().splitlines()[1:]
    return {name: tuple(int(d) for d in shape.split("x")) for name, shape in (r.split("\t") for r in rows)}


@pytest.fixture(scope="module")
def svd_xt_meta():
    """The full SVD-XT UNet config, extended to 128 frames, on the meta device in fp16: shapes without memory."""
    with torch.device("meta"):
        unet = UNetSpatioTemporalConditionModel().to(torch.float16)
    return extend_unet(unet, num_frames=128)


def test_trainable_set_on_svd_xt_matches_reference(svd_xt_meta):
    trainable = trainable_parameters(svd_xt_meta)
    assert len(trainable) == 528
    assert sum(p.numel() for p in trainable.values()) == 832_956_800
    reference = reference_keys()
    assert len(reference) == 528
    mapped = {reference_to_diffusers_name(k): shape for k, shape in reference.items()}
    assert set(mapped) == set(trainable)
    for name, shape in mapped.items():
        assert tuple(trainable[name].shape) == shape, name


def test_freeze_leaves_exactly_the_trainable_set(svd_xt_meta):
    unet = copy.deepcopy(svd_xt_meta)
    freeze_for_post_tuning(unet)
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert trainable == set(trainable_parameters(unet))
    frozen = [n for n, p in unet.named_parameters() if not p.requires_grad]
    assert any("transformer_blocks.0.attn1" in n and "temporal" not in n for n in frozen)  # spatial attention
    assert any("temporal_res_block" in n for n in frozen) and any("time_mixer" in n for n in frozen)


def test_reference_checkpoint_lands_in_the_right_parameters(svd_xt_meta):
    """Each reference tensor carries its own marker value; after loading, each diffusers parameter must hold it."""
    reference = reference_keys()
    markers = {name: float(i + 1) for i, name in enumerate(sorted(reference))}
    state = {name: torch.empty(shape, dtype=torch.float16).fill_(markers[name]) for name, shape in reference.items()}
    unet = copy.deepcopy(svd_xt_meta)
    meta = apply_adapter(unet, state)
    assert meta["layout"] == "reference" and meta["num_frames"] == "128"
    trainable = trainable_parameters(unet)
    for name, value in markers.items():
        param = trainable[reference_to_diffusers_name(name)]
        assert param.device.type == "cpu"
        assert param.flatten()[0].item() == value and param.flatten()[-1].item() == value, name
    back = adapter_state_dict(unet, layout="reference")
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)


def random_adapter(unet, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable_parameters(unet).values():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def test_adapter_round_trip_into_a_fresh_base_unet(tiny_unet, tmp_path):
    base = copy.deepcopy(tiny_unet)
    trained = extend_unet(tiny_unet, num_frames=40)
    random_adapter(trained)
    path = save_adapter(trained, tmp_path / "adapter.safetensors", base_model="tiny")
    assert not list(tmp_path.glob(".*tmp*"))
    meta = load_adapter(base, path)  # extends the base UNet on the fly
    assert meta["num_frames"] == "40" and meta["format_version"] == "1" and meta["base_model"] == "tiny"
    assert json.loads(meta["base_config"])["block_out_channels"] == [32, 64, 64, 64]
    with torch.no_grad():
        out_a = base(**unet_inputs(40), return_dict=False)[0]
        out_b = trained(**unet_inputs(40), return_dict=False)[0]
    assert torch.equal(out_a, out_b)


def test_reference_layout_round_trip_at_tiny_size(tiny_unet, tmp_path):
    base = copy.deepcopy(tiny_unet)
    trained = extend_unet(tiny_unet, num_frames=32)
    random_adapter(trained)
    save_file({k: v.contiguous() for k, v in adapter_state_dict(trained, "reference").items()},
              str(tmp_path / "model.safetensors"))
    assert load_adapter(base, tmp_path / "model.safetensors")["layout"] == "reference"
    for name, tensor in adapter_state_dict(trained).items():
        assert torch.equal(base.get_parameter(name), tensor), name


@pytest.fixture
def saved(tiny_unet, tmp_path):
    trained = extend_unet(copy.deepcopy(tiny_unet), num_frames=32)
    return save_adapter(trained, tmp_path / "a.safetensors"), adapter_state_dict(trained)


def test_wrong_num_frames_is_named(tiny_unet, saved):
    extend_unet(tiny_unet, num_frames=64)
    with pytest.raises(AdapterMismatchError, match="32-frame position tables but the UNet is extended to 64"):
        load_adapter(tiny_unet, saved[0])


def test_wrong_base_config_is_named(saved):
    other = UNetSpatioTemporalConditionModel(
        sample_size=8, block_out_channels=(32, 32, 64, 64), num_attention_heads=(2, 2, 4, 4), cross_attention_dim=32,
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=24,
    )
    with pytest.raises(AdapterMismatchError, match=r"block_out_channels: adapter \[32, 64, 64, 64\] vs UNet"):
        load_adapter(other, saved[0])


def test_missing_extra_and_misshapen_tensors_are_named(tiny_unet, saved, tmp_path):
    path, state = saved
    from exvideo.adapter import read_adapter
    _, metadata = read_adapter(path)
    state = dict(state)
    dropped = "mid_block.attentions.0.time_pos_embed.linear_1.bias"
    state.pop(dropped)
    state["mid_block.attentions.0.bogus"] = torch.zeros(3)
    bent = "up_blocks.3.attentions.2.temporal_transformer_blocks.0.norm1.weight"
    state[bent] = torch.zeros(7)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "bad.safetensors"), metadata=metadata)
    with pytest.raises(AdapterMismatchError) as err:
        load_adapter(tiny_unet, tmp_path / "bad.safetensors")
    message = str(err.value)
    assert f"missing tensors: {dropped}" in message
    assert "unexpected tensors: mid_block.attentions.0.bogus" in message
    assert f"wrong shapes: {bent} (7,) != (32,)" in message
    assert str(tmp_path / "bad.safetensors") in message


def test_garbage_truncated_and_foreign_files(tiny_unet, saved, tmp_path):
    (tmp_path / "text.safetensors").write_text("not a tensor file")
    with pytest.raises(ValueError, match="not a readable safetensors adapter"):
        load_adapter(tiny_unet, tmp_path / "text.safetensors")
    data = saved[0].read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors adapter"):
        load_adapter(tiny_unet, tmp_path / "cut.safetensors")
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(AdapterMismatchError, match="neither an exvideo adapter"):
        load_adapter(tiny_unet, tmp_path / "foreign.safetensors")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_adapter(tiny_unet, tmp_path / "absent.safetensors")


def test_reference_layout_needs_svd_topology(tmp_path):
    unet = UNetSpatioTemporalConditionModel(
        sample_size=8, block_out_channels=(32, 64), num_attention_heads=(2, 4), cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=24,
    )
    state = {"blocks.7.positional_embedding.embeddings": torch.zeros(16, 32)}
    with pytest.raises(AdapterMismatchError, match="needs the SVD UNet topology"):
        apply_adapter(unet, state)
