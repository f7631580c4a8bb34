"""Every model folder the project ships or writes loads with a plain `from_pretrained(folder)`.

A user who copies the diffusers or transformers docs passes no dtype. The weights are stored in
float16 (small folders), and transformers >= 5 loads a model in the dtype its config.json names,
while diffusers loads in float32: with "float16" in the text encoder's config the first call
fails with "mat1 and mat2 must have the same dtype". These tests load without a dtype, on the CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from recare.models import mini_world_dir

MINI = mini_world_dir()  # the bundled folders, as shipped


def _two_images(folder: Path) -> list:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder)  # no dtype: what the diffusers docs show
    pipe.set_progress_bar_config(disable=True)
    assert {pipe.text_encoder.dtype, pipe.unet.dtype, pipe.vae.dtype} == {torch.float32}
    generator = [torch.Generator().manual_seed(s) for s in (0, 1)]
    images = pipe(["a photo of a tench"] * 2, num_inference_steps=2, generator=generator).images
    assert len(images) == 2
    return images


def test_bundled_mini_world_generates_with_plain_diffusers():
    images = _two_images(MINI / "pipeline")
    pixels = [np.asarray(im, dtype=np.float32) for im in images]
    assert all(p.shape == (64, 64, 3) and p.std() > 1.0 for p in pixels)  # real pictures, not a flat fill
    assert not np.array_equal(pixels[0], pixels[1])  # two seeds, two images


def test_bundled_mini_clip_loads_in_float32_with_plain_transformers():
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(MINI / "clip")
    assert model.dtype == torch.float32
    tokens = CLIPTokenizer.from_pretrained(MINI / "clip")(["a tench", "a church"], padding=True, return_tensors="pt")
    with torch.inference_mode():
        out = model.get_text_features(**tokens)
    features = out if isinstance(out, torch.Tensor) else out.pooler_output
    assert features.dtype == torch.float32 and torch.isfinite(features).all()


def test_explicit_dtype_still_wins():
    from transformers import CLIPModel

    assert CLIPModel.from_pretrained(MINI / "clip", dtype=torch.float16).dtype == torch.float16


def test_generator_save_step_writes_a_folder_plain_diffusers_can_run(tmp_path):
    """The writer, not only the shipped folder: a smoke-size pipeline saved in float16."""
    from recare.miniworld.generator import assemble_pipeline, save_pipeline
    from recare.miniworld.generator_models import GeneratorRecipe, build_text_encoder, build_unet, build_vae
    from recare.miniworld.tokenizer import build_clip_tokenizer

    recipe = GeneratorRecipe.smoke()
    torch.manual_seed(0)
    pipe = assemble_pipeline(build_vae(recipe), build_text_encoder(recipe), build_clip_tokenizer(), build_unet(recipe))
    folder = save_pipeline(pipe, tmp_path / "pipeline", {"test": True}, fp16=True)

    from safetensors import safe_open

    with safe_open(str(folder / "text_encoder" / "model.safetensors"), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16  # still stored small
    assert json.loads((folder / "text_encoder" / "config.json").read_text())["dtype"] == "float32"
    _two_images(folder)


def test_mini_clip_save_step_writes_a_float32_config(tmp_path):
    from transformers import CLIPModel

    from recare.miniworld.clip import MiniClip, MiniClipConfig, build_model, save_mini_clip
    from recare.miniworld.tokenizer import build_clip_tokenizer

    config = MiniClipConfig(vision_hidden=16, vision_layers=1, vision_heads=2, text_hidden=16, text_layers=1,
                            text_heads=2, projection_dim=8)
    clip = MiniClip(build_model(config), build_clip_tokenizer(), mean=[0.5] * 3, std=[0.25] * 3)
    folder = save_mini_clip(clip, tmp_path / "clip", config, metrics={})
    assert json.loads((folder / "config.json").read_text())["dtype"] == "float32"
    assert CLIPModel.from_pretrained(folder).dtype == torch.float32
