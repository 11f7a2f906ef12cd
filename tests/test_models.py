"""Every validation rule of the request model, and the answer models."""

from __future__ import annotations

import base64
import doctest
import io
import json
import warnings
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from pydantic import ValidationError

from dagster_octoai.api import errors, models
from dagster_octoai.api.models import (
    PREMIUM_SAMPLERS,
    SD15_RESOLUTIONS,
    SDXL_RESOLUTIONS,
    STYLE_PRESETS,
    CallInfo,
    Engine,
    GeneratedImage,
    ImageGenerationRequest,
    ImageGenerationResponse,
    JobStatus,
    PromptTooLongWarning,
    Sampler,
    count_prompt_tokens,
)

CONTROLNET_ENGINES = ("controlnet-sdxl", "controlnet-sd15")
SDXL_ONLY = {
    "prompt_2": "second",
    "negative_prompt_2": "blurry",
    "style_preset": "anime",
    "use_refiner": False,
    "high_noise_frac": 0.5,
}


def jpeg(size: tuple[int, int] = (16, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, format="JPEG")
    return buf.getvalue()


def png(size: tuple[int, int] = (16, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", size, (10, 200, 30, 100)).save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def build(**fields: Any) -> ImageGenerationRequest:
    fields.setdefault("prompt", "a red fox")
    engine = fields.get("engine", "sdxl")
    if engine in ("controlnet-sd", *CONTROLNET_ENGINES):
        fields.setdefault("controlnet", "octoai:canny_sdxl")
        fields.setdefault("controlnet_image", jpeg())
    return ImageGenerationRequest.build(fields)


def refused(**fields: Any) -> errors.RequestValidationError:
    with pytest.raises(errors.RequestValidationError) as info:
        build(**fields)
    return info.value


def fields_of(err: errors.RequestValidationError) -> set[str]:
    return {e["field"] for e in err.errors}


# ---- engines -----------------------------------------------------------------------------


def test_engines_and_alias() -> None:
    assert [e.value for e in Engine] == [
        "sdxl",
        "sd",
        "controlnet-sdxl",
        "controlnet-sd15",
        "ssd",
        "sd3",
        "flux-schnell",
        "flux-dev",
    ]
    assert Engine.parse("controlnet-sd") is Engine.CONTROLNET_SD15
    assert build(engine="controlnet-sd").engine is Engine.CONTROLNET_SD15
    assert build().engine is Engine.SDXL  # the default
    assert Engine.SDXL.is_sdxl and Engine.CONTROLNET_SDXL.is_sdxl and not Engine.SD.is_sdxl
    assert Engine.CONTROLNET_SD15.is_controlnet and not Engine.SDXL.is_controlnet
    assert (Engine.SDXL.token_limit, Engine.SD.token_limit) == (77, 231)


def test_unknown_engine_lists_the_allowed() -> None:
    err = refused(engine="flux-pro")
    assert fields_of(err) == {"engine"}
    assert "sdxl, sd, controlnet-sdxl, controlnet-sd15, ssd, sd3, flux-schnell, flux-dev" in str(
        err
    )
    with pytest.raises(ValueError, match="engine"):
        Engine.parse("sd2")


# ---- sizes -------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["sdxl", "controlnet-sdxl"])
@pytest.mark.parametrize(("width", "height"), SDXL_RESOLUTIONS)
def test_sdxl_sizes(engine: str, width: int, height: int) -> None:
    assert build(engine=engine, width=width, height=height).size == (width, height)


@pytest.mark.parametrize("engine", ["sd", "controlnet-sd15"])
@pytest.mark.parametrize(("width", "height"), SD15_RESOLUTIONS)
def test_sd15_sizes(engine: str, width: int, height: int) -> None:
    assert build(engine=engine, width=width, height=height).size == (width, height)


@pytest.mark.parametrize(
    ("engine", "width", "height"),
    [("sdxl", 512, 512), ("sd", 1024, 1024), ("sdxl", 1024, 1023), ("sd", 256, 256)],
)
def test_unsupported_size_names_the_allowed_pairs(engine: str, width: int, height: int) -> None:
    err = refused(engine=engine, width=width, height=height)
    assert fields_of(err) == {"width"}
    assert f"{width}x{height}" in str(err)
    pairs = Engine.parse(engine).resolutions
    assert all(f"{w}x{h}" in str(err) for w, h in pairs)


def test_width_and_height_together_or_neither() -> None:
    assert fields_of(refused(width=1024)) == {"height"}
    assert fields_of(refused(height=1024)) == {"width"}
    assert build().size == (1024, 1024)
    assert build(engine="sd").size == (512, 512)


# ---- engine-specific fields --------------------------------------------------------------


@pytest.mark.parametrize(("field", "value"), SDXL_ONLY.items())
@pytest.mark.parametrize("engine", ["sd", "controlnet-sd15"])
def test_sdxl_only_fields_refused_on_sd15(field: str, value: Any, engine: str) -> None:
    err = refused(engine=engine, **{field: value})
    assert fields_of(err) == {field}
    assert "only SDXL engines" in str(err) and engine in str(err)


@pytest.mark.parametrize(("field", "value"), SDXL_ONLY.items())
def test_sdxl_only_fields_accepted_on_sdxl(field: str, value: Any) -> None:
    assert getattr(build(**{field: value}), field) == value
    assert getattr(build(engine="controlnet-sdxl", **{field: value}), field) == value


@pytest.mark.parametrize("engine", CONTROLNET_ENGINES)
@pytest.mark.parametrize("missing", ["controlnet", "controlnet_image"])
def test_controlnet_missing_field_is_named(engine: str, missing: str) -> None:
    data: dict[str, Any] = {
        "prompt": "x",
        "controlnet": "octoai:canny_sdxl",
        "controlnet_image": jpeg(),
    }
    del data[missing]
    with pytest.raises(errors.RequestValidationError) as info:
        ImageGenerationRequest.build(data, engine=engine)
    assert fields_of(info.value) == {missing}
    assert "required on ControlNet engine" in str(info.value)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("controlnet", "octoai:canny_sdxl"),
        ("controlnet_image", jpeg()),
        ("controlnet_conditioning_scale", 0.5),
        ("controlnet_early_stop", 0.5),
        ("controlnet_preprocess", False),
    ],
)
@pytest.mark.parametrize("engine", ["sdxl", "sd"])
def test_controlnet_fields_refused_elsewhere(field: str, value: Any, engine: str) -> None:
    err = refused(engine=engine, **{field: value})
    assert fields_of(err) == {field}
    assert "only ControlNet engines" in str(err)


def test_controlnet_request_on_the_wire() -> None:
    req = build(
        engine="controlnet-sd15",
        controlnet="octoai:canny_sd15",
        controlnet_conditioning_scale=0.7,
        controlnet_early_stop=0.4,
        controlnet_preprocess=False,
    )
    wire = req.to_wire()
    assert wire["controlnet"] == "octoai:canny_sd15"
    assert base64.b64decode(wire["controlnet_image"]) == jpeg()
    assert "engine" not in wire


# ---- numeric bounds ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "good", "bad"),
    [
        ("steps", [1, 200], [0, 201, -5]),
        ("cfg_scale", [0.1, 50], [0, 50.5, -1]),
        ("num_images", [1, 16], [0, 17]),
        ("strength", [0.01, 1], [0, 1.01]),
        ("high_noise_frac", [0, 1], [-0.1, 1.1]),
        ("clip_skip", [1, 12], [0, 13]),
        ("inpaint_full_res_padding", [0, 32], [-1]),
        ("controlnet_conditioning_scale", [0, 2.5], [-0.1]),
        ("controlnet_early_stop", [0, 1], [-0.1, 1.5]),
    ],
)
def test_numeric_bounds(field: str, good: list[float], bad: list[float]) -> None:
    engine = "controlnet-sdxl" if field.startswith("controlnet") else "sdxl"
    extra: dict[str, Any] = {"init_image": jpeg()} if field == "strength" else {}
    for value in good:
        assert getattr(build(engine=engine, **extra, **{field: value}), field) == value
    for value in bad:
        err = refused(engine=engine, **extra, **{field: value})
        assert fields_of(err) == {field}, value


def test_prompt_bounds() -> None:
    assert fields_of(refused(prompt="")) == {"prompt"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTooLongWarning)
        assert fields_of(refused(prompt="a" * 10_001)) == {"prompt"}
        assert fields_of(refused(negative_prompt="a" * 10_001)) == {"negative_prompt"}


def test_image_encoding() -> None:
    assert build(image_encoding="PNG").image_encoding == "png"
    assert build(image_encoding="jpeg").to_wire()["image_encoding"] == "jpeg"
    assert fields_of(refused(image_encoding="webp")) == {"image_encoding"}


# ---- seeds -------------------------------------------------------------------------------


def test_seed_forms() -> None:
    assert build(seed=0).explicit_seeds == [0]
    assert build(seed=2**32 - 1).seed == 2**32 - 1
    assert build(seed=[1, None, 3], num_images=3).explicit_seeds is None
    assert build(seed=[1, 2], num_images=2).explicit_seeds == [1, 2]
    assert build(seed=5, num_images=2).explicit_seeds is None  # the service derives the rest
    assert build().explicit_seeds is None
    assert build(seed=[None], num_images=1).to_wire()["seed"] == [None]


@pytest.mark.parametrize("seed", [-1, 2**32, [1, 2**32], [-3]])
def test_seed_out_of_range(seed: Any) -> None:
    n = len(seed) if isinstance(seed, list) else 1
    err = refused(seed=seed, num_images=n)
    assert fields_of(err) == {"seed"}
    assert "2**32" in str(err)


def test_seed_list_length_must_match_num_images() -> None:
    err = refused(seed=[1, 2, 3], num_images=2)
    assert fields_of(err) == {"seed"}
    assert "num_images=3" in str(err)
    assert fields_of(refused(seed=[1, 2])) == {"seed"}  # num_images defaults to 1
    assert fields_of(refused(seed=[])) == {"seed"}


def test_seed_must_be_an_int() -> None:
    assert fields_of(refused(seed="seven")) <= {"seed", "seed.int", "seed.list[nullable[int]]"}
    assert refused(seed=1.5).errors[0]["field"].startswith("seed")


# ---- samplers and style presets ----------------------------------------------------------


@pytest.mark.parametrize("sampler", list(Sampler))
def test_every_sampler(sampler: Sampler) -> None:
    req = build(sampler=sampler.value)
    assert req.sampler is sampler
    assert req.is_premium == (sampler in PREMIUM_SAMPLERS)


def test_premium_samplers() -> None:
    premium = {"DPM_2", "DPM_2_ANCESTRAL", "DPM_PLUS_PLUS_SDE_KARRAS", "HEUN", "KLMS"}
    assert premium <= {s.value for s in PREMIUM_SAMPLERS}
    regular = {"DDIM", "DDPM", "DPM_PLUS_PLUS_2M_KARRAS", "DPM_SINGLE", "DPM_SOLVER_MULTISTEP"}
    regular |= {"K_EULER", "K_EULER_ANCESTRAL", "PNDM", "UNI_PC"}
    assert not regular & {s.value for s in PREMIUM_SAMPLERS}
    assert not build().is_premium


def test_unknown_sampler_lists_the_allowed() -> None:
    err = refused(sampler="EULER_FAST")
    assert fields_of(err) == {"sampler"}
    assert "K_EULER_ANCESTRAL" in str(err) and "'EULER_FAST' is not a sampler" in str(err)


@pytest.mark.parametrize("preset", sorted(STYLE_PRESETS))
def test_every_style_preset(preset: str) -> None:
    assert build(style_preset=preset).to_wire()["style_preset"] == preset


def test_style_presets_include_the_sdk_ones() -> None:
    for name in ("GTA", "Super Mario", "Pokémon", "RPG Fantasy Game", "Legend of Zelda", "base"):
        assert name in STYLE_PRESETS


def test_unknown_style_preset_lists_the_allowed() -> None:
    err = refused(style_preset="Anime")
    assert fields_of(err) == {"style_preset"}
    assert "'Anime' is not a style preset" in str(err) and "Watercolor" in str(err)


# ---- assets ------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["checkpoint", "vae"])
def test_asset_names(field: str) -> None:
    assert getattr(build(**{field: "octoai:crystal-clear"}), field) == "octoai:crystal-clear"
    assert getattr(build(**{field: "my_model.v2"}), field) == "my_model.v2"
    for bad in ("octoai:", "has space", "../etc", "octo:x y", "-leading", "x" * 200):
        err = refused(**{field: bad})
        assert fields_of(err) == {field}, bad
        assert "'octoai:<name>'" in str(err)


def test_loras() -> None:
    req = build(loras={"octoai:add-detail": 0.8, "my-lora": -0.5})
    assert req.to_wire()["loras"] == {"octoai:add-detail": 0.8, "my-lora": -0.5}
    assert fields_of(refused(loras={"bad name": 1.0})) == {"loras"}
    assert fields_of(refused(loras={"ok": float("inf")})) == {"loras.ok"}
    assert refused(loras={"ok": "heavy"}).errors[0]["field"].startswith("loras")


def test_textual_inversions() -> None:
    req = build(textual_inversions={"octoai:easynegative": "easynegative"})
    assert req.textual_inversions == {"octoai:easynegative": "easynegative"}
    err = refused(textual_inversions={"octoai:x": "  "})
    assert fields_of(err) == {"textual_inversions"}
    assert "trigger word" in str(err)
    assert fields_of(refused(textual_inversions={"a b": "w"})) == {"textual_inversions"}


# ---- image inputs ------------------------------------------------------------------------


def test_image_inputs_in_every_form(tmp_path: Path) -> None:
    data = jpeg()
    path = tmp_path / "init.jpg"
    path.write_bytes(data)
    forms: list[Any] = [data, bytearray(data), path, str(path), b64(data)]
    forms.append("data:image/jpeg;base64," + b64(data))
    for form in forms:
        assert base64.b64decode(build(init_image=form).to_wire()["init_image"]) == data


def test_pil_images_are_encoded_losslessly() -> None:
    rgb = Image.new("RGB", (32, 16), (1, 2, 3))
    rgba = Image.new("RGBA", (32, 16), (1, 2, 3, 4))
    rgb_data = base64.b64decode(build(init_image=rgb).to_wire()["init_image"])
    rgba_data = base64.b64decode(build(init_image=rgba).to_wire()["init_image"])
    assert rgb_data[:4] == b"\x89PNG" and rgba_data[:4] == b"\x89PNG"
    assert Image.open(io.BytesIO(rgb_data)).tobytes() == rgb.tobytes()


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        (b"not an image", "not an image"),
        ("/no/such/file.png", "neither"),
        ("@@@not-base64@@@", "neither"),
        (12345, "expected a PIL.Image"),
        (Path("/no/such/file.png"), "no file at path"),
    ],
)
def test_bad_image_inputs_name_the_field(value: Any, needle: str) -> None:
    err = refused(init_image=value)
    assert fields_of(err) == {"init_image"}
    assert needle in str(err) and "init_image" in str(err)


def test_mask_and_outpainting_need_an_init_image() -> None:
    assert fields_of(refused(mask_image=png())) == {"mask_image"}
    assert fields_of(refused(outpainting=True)) == {"outpainting"}
    req = build(init_image=jpeg(), mask_image=png(), inpaint_full_res=True, strength=0.5)
    assert set(req.to_wire()) >= {"init_image", "mask_image", "inpaint_full_res", "strength"}
    assert build(init_image=png(), outpainting=True).outpainting is True


def test_transfer_images(tmp_path: Path) -> None:
    path = tmp_path / "face.png"
    path.write_bytes(png())
    req = build(transfer_images={"sks": [jpeg(), path, Image.new("RGB", (8, 8))]})
    encoded = req.to_wire()["transfer_images"]["sks"]
    assert len(encoded) == 3 and base64.b64decode(encoded[1]) == png()
    assert fields_of(refused(transfer_images={"sks": []})) == {"transfer_images"}
    assert fields_of(refused(transfer_images={"": [jpeg()]})) == {"transfer_images"}
    assert fields_of(refused(transfer_images=["x"])) == {"transfer_images"}
    err = refused(transfer_images={"sks": [b"junk"]})
    assert "transfer_images['sks']" in str(err)


# ---- prompt length -----------------------------------------------------------------------


def test_token_limit_warning() -> None:
    long_prompt = " ".join(["castle"] * 100)
    with pytest.warns(PromptTooLongWarning, match="77-token limit of engine 'sdxl'"):
        build(prompt=long_prompt)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PromptTooLongWarning)
        build(prompt=long_prompt, engine="sd")  # 231 tokens on SD 1.5
        build(prompt=" ".join(["castle"] * 70))


def test_weighting_syntax_is_not_counted() -> None:
    assert count_prompt_tokens("(A tall (beautiful:1.5) woman:1.0)") == 4
    assert count_prompt_tokens("A tall beautiful woman") == 4
    weighted = " ".join(["(castle:1.2)"] * 70)
    assert count_prompt_tokens(weighted) == 70
    with warnings.catch_warnings():
        warnings.simplefilter("error", PromptTooLongWarning)
        build(prompt=weighted)


# ---- errors, wire form, identity ---------------------------------------------------------


def test_unknown_keys_are_refused() -> None:
    err = refused(stepz=10)
    assert fields_of(err) == {"stepz"}
    assert "unknown field" in str(err)


def test_several_problems_are_all_named() -> None:
    err = refused(engine="sd", style_preset="anime", use_refiner=True, width=512)
    assert fields_of(err) == {"style_preset", "use_refiner", "height"}
    assert str(err).startswith("invalid image generation request: ")
    assert isinstance(err, ValueError)


def test_field_and_cross_field_problems_come_in_one_error() -> None:
    # A bad prompt, steps and sampler used to hide the unsupported size until they were
    # fixed (pydantic runs the rules across fields only once every field is valid).
    err = refused(prompt="", steps=500, sampler="FOO", engine="sd", width=1024, height=1024)
    assert fields_of(err) == {"prompt", "steps", "sampler", "width"}
    message = str(err)
    assert "steps: 500 is out of range; allowed: 1..200" in message
    assert "sampler: 'FOO' is not a sampler; allowed: DDIM, DDPM" in message
    assert (
        "width: 1024x1024 (width x height) is not supported by engine 'sd'; allowed: 512x512"
        in message
    )
    assert "prompt: must not be empty" in message
    # No pydantic boilerplate.
    assert "[type=" not in message and "errors.pydantic.dev" not in message


def test_rules_naming_a_failed_field_are_left_out() -> None:
    # width failed on its own: "set width and height together" would be noise.
    err = refused(width="wide", height=512, engine="sd", prompt_2="x")
    assert fields_of(err) == {"width", "prompt_2"}
    assert "'wide' is not a whole number" in str(err)
    # With a bad engine no rule can be judged; the engine error lists the engines.
    err = refused(engine="sdxxl", width=512, height=512)
    assert fields_of(err) == {"engine"}
    assert "allowed: sdxl, sd, controlnet-sdxl, controlnet-sd15" in str(err)


def test_errors_say_what_is_allowed_in_plain_words() -> None:
    err = refused(cfg_scale=0, num_images=17, image_encoding="gif", negativ_prompt="x")
    by_field = {e["field"]: e["message"] for e in err.errors}
    assert by_field == {
        "cfg_scale": "0 is out of range; allowed: > 0 and <= 50",
        "num_images": "17 is out of range; allowed: 1..16",
        "image_encoding": "'gif' is not allowed; allowed: 'jpeg', 'png'",
        "negativ_prompt": "unknown field; the API rejects keys it does not know; "
        "did you mean 'negative_prompt'?",
    }


def test_the_server_sees_every_problem_too() -> None:
    with pytest.raises(ValidationError) as info:
        ImageGenerationRequest.from_wire(
            {"prompt": "x", "steps": 0, "width": 1024, "height": 1024}, "sd"
        )
    assert {e["loc"][0] for e in info.value.errors()} == {"steps", "width"}


def test_direct_construction_raises_validation_error() -> None:
    with pytest.raises(ValidationError):
        ImageGenerationRequest(prompt="x", engine="sd", width=1024, height=1024)


def test_build_with_overrides_revalidates() -> None:
    base = build(style_preset="anime")
    assert ImageGenerationRequest.build(base) is base
    assert ImageGenerationRequest.build(base, steps=10).steps == 10
    with pytest.raises(errors.RequestValidationError, match="style_preset"):
        ImageGenerationRequest.build(base, engine="sd")


def test_wire_form() -> None:
    req = build(engine="sd", steps=20, seed=[1, None], num_images=2, sampler="K_EULER")
    assert req.to_wire() == {
        "prompt": "a red fox",
        "steps": 20,
        "seed": [1, None],
        "num_images": 2,
        "sampler": "K_EULER",
    }
    assert json.loads(req.wire_bytes()) == req.to_wire()
    assert req.image_count == 2


def test_fingerprint_and_summary() -> None:
    a = build(seed=1, init_image=jpeg())
    assert a.fingerprint() == build(seed=1, init_image=jpeg()).fingerprint()
    assert a.fingerprint() != build(seed=2, init_image=jpeg()).fingerprint()
    assert build(engine="sd").fingerprint() != build(engine="sdxl").fingerprint()
    summary = a.summary()
    assert summary["engine"] == "sdxl"
    assert summary["init_image"].startswith("<image ") and b64(jpeg()) not in str(summary)


def test_from_wire_takes_base64_only(tmp_path: Path) -> None:
    path = tmp_path / "x.jpg"
    path.write_bytes(jpeg())
    ok = ImageGenerationRequest.from_wire({"prompt": "x", "init_image": b64(jpeg())}, "sd")
    assert ok.engine is Engine.SD
    with pytest.raises(ValidationError) as info:
        ImageGenerationRequest.from_wire({"prompt": "x", "init_image": str(path)}, "sd")
    assert info.value.errors()[0]["loc"] == ("init_image",)
    with pytest.raises(ValidationError) as info:
        ImageGenerationRequest.from_wire({"prompt": "x", "engine": "sd"}, "sd")
    assert info.value.errors()[0]["type"] == "extra_forbidden"


# ---- answers -----------------------------------------------------------------------------


def test_generated_image_decodes_lazily_without_re_encoding() -> None:
    data = png((20, 10))
    image = GeneratedImage(image_b64=b64(data), seed=3, safety_score=0.1)
    assert image.data == data
    assert (image.format, image.content_type, image.size) == ("png", "image/png", (20, 10))
    assert image.to_pil().size == (20, 10)
    image.verify()
    assert image.available and "image_b64" not in repr(image)


def test_generated_image_errors() -> None:
    with pytest.raises(errors.ImageDecodeError, match="invalid base64"):
        _ = GeneratedImage(image_b64="%%%", seed=1).data
    with pytest.raises(errors.ImageDecodeError, match="not JPEG or PNG"):
        _ = GeneratedImage(image_b64=b64(b"hello world"), seed=1).data
    truncated = GeneratedImage(image_b64=b64(jpeg((64, 64))[:200]), seed=2)
    with pytest.raises(errors.ImageDecodeError, match="seed 2"):
        truncated.verify()
    blocked = GeneratedImage(image_b64=None, seed=4, removed_for_safety=True)
    assert not blocked.available
    with pytest.raises(errors.ImageRemovedForSafetyError, match="seed 4"):
        _ = blocked.data


def test_response_and_call_info() -> None:
    body = {
        "images": [
            {"image_b64": b64(jpeg()), "seed": 1, "removed_for_safety": False},
            {"image_b64": None, "seed": 2, "removed_for_safety": True},
        ],
        "prediction_time_ms": 10,
        "finish_reason": "ok",
    }
    response = ImageGenerationResponse.model_validate(body)
    assert response.seeds == [1, 2] and response.removed_count == 1
    assert response.call_info == CallInfo()
    call = CallInfo(attempts=3, request_ids=("a",), elapsed_s=1.0, response_id="r")
    assert response.with_call_info(call).call_info.retries == 2


def test_an_answer_carries_its_request_and_its_images_do_too() -> None:
    request = ImageGenerationRequest(prompt="a red fox", seed=[1, 2], num_images=2)
    images = [GeneratedImage(image_b64=b64(jpeg()), seed=s) for s in (1, 2)]
    answer = ImageGenerationResponse(
        images=images, request=request, response_id="job-1", reused_from="s3://b/m.json"
    )
    assert answer.request is request
    assert (answer.response_id, answer.reused_from) == ("job-1", "s3://b/m.json")
    assert [(im.request, im.response_id) for im in answer.images] == [(request, "job-1")] * 2
    # Pickled (Dagster's default IO manager) and copied answers keep what produced them.
    import pickle

    again = pickle.loads(pickle.dumps(answer))
    assert again.request == request and again.images[0].request == request
    assert again == answer and answer.model_copy().reused_from == "s3://b/m.json"
    # The wire form is the server's body only: parsing it knows no request.
    parsed = ImageGenerationResponse.model_validate_json(answer.model_dump_json())
    assert parsed.request is None and parsed.seeds == [1, 2]


def test_an_answer_around_another_answers_images_leaves_them_theirs() -> None:
    first = ImageGenerationResponse(
        images=[GeneratedImage(image_b64=b64(jpeg()), seed=1)],
        request=ImageGenerationRequest(prompt="first"),
    )
    other = ImageGenerationRequest(prompt="other", engine="sd", width=768, height=512)
    second = ImageGenerationResponse(images=first.images, request=other)
    assert second.images[0].request == other
    assert first.images[0].request is not None and first.images[0].request.prompt == "first"


def test_an_image_from_stored_bytes_keeps_them_and_says_where_they_are() -> None:
    data = png((20, 10))
    request = ImageGenerationRequest(prompt="x", seed=3)
    image = GeneratedImage.from_bytes(
        data,
        seed=3,
        request=request,
        uri="s3://b/k/000-seed3.png",
        index=0,
        partition_key="p1",
        metadata={"seed": "3"},
    )
    assert image.data is data and image.image_b64 is None and image.available
    assert (image.uri, image.index, image.partition_key) == ("s3://b/k/000-seed3.png", 0, "p1")
    assert image.request is request and image.metadata == {"seed": "3"}
    assert image.to_pil().size == (20, 10)
    # Encoded only when dumped: the dump is a valid wire image.
    dumped = GeneratedImage.model_validate(image.model_dump())
    assert dumped.data == data
    with pytest.raises(errors.ImageDecodeError, match="s3://b/k/x: 5 bytes that are not an image"):
        GeneratedImage.from_bytes(b"hello", seed=1, uri="s3://b/k/x")
    plain = GeneratedImage(image_b64=b64(data), seed=3)
    assert (plain.uri, plain.index, plain.partition_key, plain.metadata) == (None, None, None, {})


def test_job_status_parse() -> None:
    assert JobStatus.parse("COMPLETED") is JobStatus.COMPLETED
    assert JobStatus.parse("pending") is JobStatus.PENDING
    assert JobStatus.parse("exploded") is JobStatus.UNKNOWN
    assert JobStatus.parse(None) is JobStatus.UNKNOWN
    assert JobStatus.FAILED.is_terminal and not JobStatus.RUNNING.is_terminal


def test_docstring_examples_run() -> None:
    result = doctest.testmod(models, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
