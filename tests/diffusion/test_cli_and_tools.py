"""The command line, the model directory's layout, the prompt encoder's shim, the GPU benchmark."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from dagster_octoai.server import ServerConfig
from dagster_octoai.server.backends import BackendError, load_backend
from dagster_octoai.server.backends.diffusers.library import ModelLibrary
from dagster_octoai.server.cli import main

from .conftest import tiny_models_of

pytestmark = pytest.mark.timeout(600)


def test_tiny_models_have_the_layout_of_real_weights(tiny_models: Path) -> None:
    library = ModelLibrary(tiny_models)
    assert library.families == ("sdxl", "sd15", "ssd", "sd3", "flux-schnell", "flux-dev")
    assert library.base("flux-dev") == tiny_models / "flux" / "dev"
    assert library.base("sd3") == tiny_models / "sd3" / "base"
    # FLUX's LoRAs are shared by schnell and dev; SD3's three text encoders, a T5 among them.
    assert sorted(library.assets("flux-schnell", "loras")) == ["tiny-flux-crayon", "tiny-flux-ink"]
    assert library.assets("flux-dev", "loras") == library.assets("flux-schnell", "loras")
    assert (tiny_models / "sd3" / "base" / "text_encoder_3" / "config.json").is_file()
    assert (tiny_models / "sd3" / "base" / "tokenizer_3" / "tokenizer.json").is_file()
    transformer = json.loads(
        (tiny_models / "flux" / "dev" / "transformer" / "config.json").read_text()
    )
    assert transformer["guidance_embeds"] is True and transformer["in_channels"] == 64
    for family in ("sdxl", "sd15"):
        base = library.base(family)
        assert base is not None and (base / "unet" / "config.json").is_file()
        assert (base / "tokenizer").is_dir()
    assert library.refiner() is not None
    described = library.describe()
    assert described["sdxl"] == {
        "base": True,
        "refiner": True,
        "photo_merge": "tiny-photo-merge",
        "checkpoints": ["tiny-sdxl-alt", "tiny-sdxl-alt-file"],
        "controlnets": ["canny_sdxl", "depth_sdxl"],
        "loras": ["tiny-crayon", "tiny-ink"],
        "textual_inversions": ["tiny-negative"],
        "vaes": ["tiny-vae-sdxl"],
    }
    # Single files where real weights are single files, folders where they are folders.
    assert (tiny_models / "sdxl" / "loras" / "tiny-crayon.safetensors").is_file()
    assert (tiny_models / "sd15" / "textual_inversions" / "tiny-negative.safetensors").is_file()
    assert (tiny_models / "sdxl" / "vaes" / "tiny-vae-sdxl.safetensors").is_file()
    assert (tiny_models / "sdxl" / "controlnets" / "canny_sdxl" / "config.json").is_file()
    assert (tiny_models / "sd15" / "checkpoints" / "tiny-sd15-alt-file.safetensors").is_file()
    unet = json.loads((tiny_models / "sdxl" / "base" / "unet" / "config.json").read_text())
    vae = json.loads((tiny_models / "sdxl" / "base" / "vae" / "config.json").read_text())
    # The real latent scale factor (8: four VAE blocks) at the real SDXL size.
    assert len(vae["block_out_channels"]) == 4 and vae["sample_size"] == 1024
    assert unet["addition_embed_type"] == "text_time"
    assert "random weights" in (tiny_models / "README.txt").read_text().lower()


@pytest.mark.parametrize("family", ["sdxl", "sd15"])
def test_a_single_file_checkpoint_loads_the_same_weights_as_its_folder(
    tiny_models: Path, family: str
) -> None:
    # The single file is written by ldm.py, the inverse of diffusers' own conversion;
    # from_single_file must read back exactly the folder's weights, in every component.
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    extra = {"safety_checker": None} if family == "sd15" else {}
    checkpoints = tiny_models / family / "checkpoints"
    folder = cls.from_pretrained(
        str(checkpoints / f"tiny-{family}-alt"), local_files_only=True, **extra
    )
    single = cls.from_single_file(
        str(checkpoints / f"tiny-{family}-alt-file.safetensors"),
        config=str(tiny_models / family / "base"),
        local_files_only=True,
        **extra,
    )
    encoders = ["text_encoder", "text_encoder_2"] if family == "sdxl" else ["text_encoder"]
    for name in ["unet", "vae", *encoders]:
        mine, theirs = getattr(folder, name).state_dict(), getattr(single, name).state_dict()
        assert mine.keys() == theirs.keys(), name
        unequal = [key for key in mine if not torch.equal(mine[key], theirs[key])]
        assert not unequal, (name, unequal[:5])
    # ...and they are the alternative checkpoint's own, not the base's.
    base = cls.from_pretrained(str(tiny_models / family / "base"), local_files_only=True, **extra)
    alt_unet, base_unet = folder.unet.state_dict(), base.unet.state_dict()
    assert any(not torch.equal(alt_unet[key], base_unet[key]) for key in alt_unet)


def test_tiny_models_refuses_a_non_empty_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    assert main(["tiny-models", str(tmp_path)]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_serve_options_of_the_diffusers_backend(
    tiny_models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["serve", "--print-config", "--backend", "diffusers", "--models", str(tiny_models)]
    assert main([*args, "--device", "cuda:0", "--device", "cuda:1,cpu", "--dtype", "bf16"]) == 0
    config = json.loads(capsys.readouterr().out)
    assert config["backend"] == "diffusers" and config["models"] == str(tiny_models)
    assert config["device"] == ["cuda:0", "cuda:1", "cpu"] and config["dtype"] == "bf16"
    assert main(["serve", "--print-config", "--backend", "diffusers"]) == 2
    assert "the diffusers backend needs a model directory" in capsys.readouterr().err
    assert main([*args, "--dtype", "fp8"]) == 2
    assert "'fp16', 'bf16' or 'fp32'" in capsys.readouterr().err


def test_serve_refuses_a_wrong_model_directory_or_device_before_listening(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_models: Path
) -> None:
    # --public: past the token check (a private server without a token is refused first).
    serve = ["serve", "--public", "--backend", "diffusers", "--models"]
    assert main([*serve, str(tmp_path / "none")]) == 2
    assert "is not a model directory" in capsys.readouterr().err
    assert main([*serve, str(tmp_path)]) == 2
    assert "has no base model (sdxl/base, sd15/base" in capsys.readouterr().err
    with pytest.raises(BackendError, match="sees no CUDA GPU"):
        load_backend(
            ServerConfig(
                public=True, backend="diffusers", models=str(tiny_models), device=("cuda:1",)
            )
        )
    # Model CPU offload is a CUDA thing: refused on the CPU before any weights load.
    assert main([*serve, str(tiny_models), "--device", "cpu", "--offload"]) == 2
    assert "offload: model CPU offload moves models onto a CUDA GPU" in capsys.readouterr().err


def test_clip_skip_finds_the_final_layer_norm_in_either_transformers_layout() -> None:
    # transformers >= 5.6 flattened CLIPTextModel (no .text_model): diffusers issue 14124.
    import torch

    from dagster_octoai.server.backends.diffusers.prompts import final_layer_norm

    norm = torch.nn.LayerNorm(4)
    nested = torch.nn.Module()
    nested.text_model = torch.nn.Module()
    nested.text_model.final_layer_norm = norm
    flat = torch.nn.Module()
    flat.final_layer_norm = norm
    assert final_layer_norm(nested) is norm and final_layer_norm(flat) is norm


def test_gpu_benchmark_quick_run_on_cpu(
    tiny_models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from benchmarks import gpu

    out = tmp_path / "gpu.json"
    models = tiny_models_of(tiny_models, tmp_path / "models", "sdxl", "sd15")
    argv = ["--quick", "--device", "cpu", "--models", str(models), "--output", str(out)]
    assert gpu.main(argv) == 0
    data = json.loads(out.read_text())
    assert data["quick"] is True and data["device"] == "cpu" and data["gpu"] is None
    cases = [(r["engine"], r["batch"]) for r in data["results"]]
    assert cases == [("sdxl", 1), ("sd", 2)]
    for row in data["results"]:
        assert row["direct_p50_s"] > 0 and row["api_p50_s"] > 0
        # Built in device memory for the case, from the directory's tiny configs.
        assert row["build_s"] > 0 and 0 < row["parameters"] < 10**8
        assert math.isfinite(row["server_overhead"]) and row["images_per_s"] > 0
    # Without a GPU the full benchmark refuses, instead of printing CPU figures as GPU ones.
    assert gpu.main(["--device", "cpu", "--output", str(tmp_path / "no.json")]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "no.json").exists()


def test_gpu_benchmark_fails_when_the_server_did_not_run_the_built_models(
    tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A row is only written when the API side ran the models built for the case."""
    from benchmarks import gpu

    real_use = gpu._Models.use

    def use_without_swap(
        self: gpu._Models, family: str, compiled: bool
    ) -> tuple[object, float, int]:
        skeleton = self.bases[family].pipe
        built = real_use(self, family, compiled)
        self.bases[family].pipe = skeleton  # the server keeps the directory's models
        return built

    monkeypatch.setattr(gpu._Models, "use", use_without_swap)
    models = tiny_models_of(tiny_models, tmp_path / "models", "sd15")
    with pytest.raises(RuntimeError, match="sd: the server did not run the models built"):
        gpu.run(models, "cpu", quick=True, only=("sd",), log=lambda _: None)


# Published sizes, in billions of parameters: the SDXL paper (UNet 2.6), SD 1.5 (0.86),
# Segmind's SSD-1B card (1.3), SD3 Medium (2), FLUX.1 (12), the T5-XXL encoder (4.7).
PUBLISHED_SIZES = {
    "sdxl": {"unet": 2.6, "text_encoder_2": 0.69},
    "sd15": {"unet": 0.86, "text_encoder": 0.123},
    "ssd": {"unet": 1.3},
    "sd3": {"transformer": 2.0, "text_encoder_3": 4.7},
    "flux-schnell": {"transformer": 12.0, "text_encoder_2": 4.7},
    "flux-dev": {"transformer": 12.0},
}


def test_gpu_benchmark_builds_the_published_architectures(tiny_models: Path) -> None:
    """The full run's models, built on the meta device (no memory): the real sizes, dtype."""
    import torch

    from benchmarks.gpu_models import build_in_memory
    from dagster_octoai.server.backends.diffusers.backend import _PIPELINES, _pipeline_class

    library = ModelLibrary(tiny_models)
    assert set(library.families) == set(PUBLISHED_SIZES)
    # Stable Video Diffusion 1.1 (svd/base): its UNet 1.52 B, the OpenCLIP ViT-H/14 image
    # tower 0.63 B, the VAE with its temporal decoder 0.098 B.
    from diffusers import StableVideoDiffusionPipeline

    skeleton = StableVideoDiffusionPipeline.from_pretrained(
        str(tiny_models / "svd" / "base"), local_files_only=True
    )
    pipe = build_in_memory(skeleton, "svd", "meta", torch.bfloat16, published=True)
    for name, billions in {"unet": 1.52, "image_encoder": 0.632, "vae": 0.0977}.items():
        module = getattr(pipe, name)
        count = sum(p.numel() for p in module.parameters()) / 1e9
        assert count == pytest.approx(billions, rel=0.03), (name, count)
        # Every parameter where it was built, the AlphaBlender mix factors included.
        assert {(p.device.type, p.dtype) for p in module.parameters()} == {("meta", torch.bfloat16)}
    assert pipe.unet.config.num_frames == 25
    for family, sizes in PUBLISHED_SIZES.items():
        cls = _pipeline_class(_PIPELINES[family, False, "txt2img"])
        extra = {"safety_checker": None, "requires_safety_checker": False}
        skeleton = cls.from_pretrained(
            str(library.base(family)), local_files_only=True, **(extra if family == "sd15" else {})
        )
        pipe = build_in_memory(skeleton, family, "meta", torch.bfloat16, published=True)
        assert type(pipe) is cls and pipe.tokenizer is skeleton.tokenizer
        for name, billions in sizes.items():
            module = getattr(pipe, name)
            assert module is not getattr(skeleton, name)
            count = sum(p.numel() for p in module.parameters()) / 1e9
            assert count == pytest.approx(billions, rel=0.03), (family, name, count)
            assert {(p.device.type, p.dtype) for p in module.parameters()} == {
                ("meta", torch.bfloat16)
            }
