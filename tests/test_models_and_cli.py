"""Local checkpoint loading (no downloads), the tiny-model writer, typed configs and the demo command's errors (the
demo itself runs in tests/test_workflow.py, whose shared workflow run it is)."""

from __future__ import annotations

import shutil

import pytest
import torch
from diffusers import AutoencoderKLTemporalDecoder, EulerDiscreteScheduler, UNetSpatioTemporalConditionModel
from safetensors import safe_open
from transformers import CLIPVisionModelWithProjection

from exvideo import extended_num_frames, load_svd, write_tiny_svd
from orchestration.cli import main
from exvideo.config import ConfigError, load_config
from orchestration.demo import DemoConfig


def test_load_svd_reads_every_component(tiny_svd_dir):
    svd = load_svd(tiny_svd_dir)
    assert isinstance(svd.unet, UNetSpatioTemporalConditionModel)
    assert isinstance(svd.vae, AutoencoderKLTemporalDecoder)
    assert isinstance(svd.image_encoder, CLIPVisionModelWithProjection)
    assert isinstance(svd.scheduler, EulerDiscreteScheduler)
    assert svd.scheduler.config.prediction_type == "v_prediction" and svd.scheduler.config.use_karras_sigmas
    assert list(svd.unet.config.block_out_channels) == [32, 64, 64, 64]
    assert extended_num_frames(svd.unet) is None
    assert not any(p.requires_grad for p in svd.unet.parameters())
    with torch.no_grad():  # the VAE keeps SVD's 8x spatial downsampling and 4 latent channels
        assert svd.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mode().shape == (1, 4, 8, 8)


def test_same_seed_same_weights(tmp_path):
    a = write_tiny_svd(tmp_path / "a", seed=3)
    b = write_tiny_svd(tmp_path / "b", seed=3)
    name = "unet/diffusion_pytorch_model.safetensors"
    with safe_open(str(a / name), "pt") as fa, safe_open(str(b / name), "pt") as fb:
        assert all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys())


def test_missing_checkpoint_and_component_are_named(tiny_svd_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_svd(tmp_path / "nowhere")
    partial = tmp_path / "partial"
    shutil.copytree(tiny_svd_dir, partial)
    shutil.rmtree(partial / "vae")
    with pytest.raises(FileNotFoundError, match=r"lacks component folders \['vae'\]"):
        load_svd(partial)


def test_tiny_writer_refuses_to_overwrite(tmp_path):
    write_tiny_svd(tmp_path / "m")
    with pytest.raises(FileExistsError, match="overwrite"):
        write_tiny_svd(tmp_path / "m")
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary folder left behind


def test_config_overrides_and_precise_errors(tmp_path):
    cfg = load_config(DemoConfig, None, ["seed=4", "workdir=/tmp/x", "spec_overrides=[train.max_steps=2]"])
    assert cfg.seed == 4 and str(cfg.workdir) == "/tmp/x" and cfg.spec_overrides == ["train.max_steps=2"]
    with pytest.raises(ConfigError, match=r"seed: Input should be greater than or equal to 0 \(got -1\)"):
        load_config(DemoConfig, None, ["seed=-1"])
    with pytest.raises(ConfigError, match="frames: Extra inputs are not permitted"):
        load_config(DemoConfig, None, ["frames=4"])
    (tmp_path / "bad.yaml").write_text("seed: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(DemoConfig, tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="must look like key=value"):
        load_config(DemoConfig, None, ["seed"])


def test_cli_reports_bad_config_without_traceback(capsys):
    assert main(["demo", "--set", "seed=-1"]) == 2
    assert "seed: Input should be greater than or equal to 0" in capsys.readouterr().err



def test_each_command_help_lists_every_field_with_its_type_default_and_kind(capsys):
    from pipelines.generate.config import GenerateJobConfig
    from pipelines.generate.params import GenerationParams
    from preprocessing.config import PreprocessConfig

    def help_of(command: str) -> dict[str, str]:
        """Field name -> its line in `exvideo <command> --help` (the description lines below it left out)."""
        with pytest.raises(SystemExit):
            main([command, "--help"])
        listed = capsys.readouterr().out.split("fields (", 1)[1].splitlines()
        return {line.split(":")[0].strip(): line for line in listed if line.startswith("  ") and ": " in line
                and not line.startswith("      ")}

    generate = help_of("generate")
    assert set(GenerateJobConfig.model_fields) - {"params", "speed"} <= set(generate)
    assert {f"params.{name}" for name in GenerationParams.model_fields} <= set(generate)
    assert {"speed.conv_layout", "speed.compile_blocks", "speed.batched_guidance"} <= set(generate)
    assert generate["params.method"].endswith("exvideo | direct | chain | windows | naive | freenoise = exvideo")
    assert generate["adapter"].endswith("adapter: Path | null = null")
    operational = {name for name, line in generate.items() if line.endswith("[operational]")}
    assert operational == {"workers", "device", "ray_address"} | {n for n in generate if n.startswith("speed.")}
    preprocess = help_of("preprocess")
    assert list(preprocess) == list(PreprocessConfig.model_fields)
    assert preprocess["input"] == "  input: str (required)" and preprocess["num_frames"] == "  num_frames: int = 128"
