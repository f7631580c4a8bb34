"""The mini world's text-to-image recipe: a smoke run gives a standard SD folder; the bundled one loads offline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from recare.miniworld.generator import TRAINING_RECORD, GeneratorTrainingError, train_generator
from recare.miniworld.generator_models import GeneratorRecipe
from recare.miniworld.tokenizer import VOCAB_SIZE

BUNDLED = Path(__file__).resolve().parents[1] / "checkpoints" / "mini-world" / "pipeline"


def _generate(pipe, prompt: str, seed: int, steps: int = 3) -> np.ndarray:
    out = pipe(prompt, num_inference_steps=steps, guidance_scale=7.5, generator=torch.Generator().manual_seed(seed),
               output_type="np")
    return out.images


@pytest.fixture(scope="module")
def smoke_folder(tmp_path_factory) -> Path:
    return train_generator(tmp_path_factory.mktemp("gen"), seed=0, smoke=True, progress=False)


def test_smoke_run_saves_a_standard_sd_folder(smoke_folder):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    assert (smoke_folder / "model_index.json").is_file()
    record = json.loads((smoke_folder / TRAINING_RECORD).read_text())
    assert record["smoke"] is True and record["seed"] == 0
    pipe = StableDiffusionPipeline.from_pretrained(smoke_folder, torch_dtype=torch.float32)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.scheduler.config.beta_schedule == "scaled_linear" and pipe.scheduler.config.steps_offset == 1
    assert pipe.safety_checker is None
    assert pipe.unet.dtype == torch.float32  # stored fp16, loaded as asked
    assert pipe.text_encoder.config.vocab_size == VOCAB_SIZE == len(pipe.tokenizer)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.vae.config.scaling_factor != 0.18215  # set from the latents' std
    images = _generate(pipe, "a photo of a tench", seed=42)
    assert images.shape == (1, 64, 64, 3)
    assert np.isfinite(images).all()


def test_smoke_text_encoder_accepts_new_tokens(smoke_folder):
    """Textual inversion adds tokens: the saved text encoder must stay a resizable CLIPTextModel."""
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(smoke_folder / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(smoke_folder / "text_encoder", torch_dtype=torch.float32)
    assert tokenizer.add_tokens(["<v1*>"]) == 1
    encoder.resize_token_embeddings(len(tokenizer))
    ids = tokenizer("a photo of a <v1*>", padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert VOCAB_SIZE in ids[0].tolist()
    assert encoder(ids).last_hidden_state.shape == (1, 77, encoder.config.hidden_size)


def test_smoke_recipe_is_deterministic_for_a_seed(tmp_path, smoke_folder):
    from safetensors.torch import load_file

    again = train_generator(tmp_path, seed=0, smoke=True, progress=False)
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        a, b = load_file(smoke_folder / part), load_file(again / part)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_unwritable_output_folder_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(GeneratorTrainingError, match="cannot create output folder"):
        train_generator(blocker / "sub", smoke=True, progress=False)


def test_recipe_architecture_matches_sd_factor_8():
    from recare.miniworld.generator_models import build_unet, build_vae

    recipe = GeneratorRecipe.smoke()
    vae = build_vae(recipe)
    with torch.no_grad():
        z = vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert z.shape == (1, 4, 8, 8)
    assert build_unet(recipe).config.sample_size == 8


@pytest.mark.skipif(not (BUNDLED / "model_index.json").is_file(), reason="bundled mini-world pipeline not built")
def test_bundled_pipeline_loads_offline_and_is_deterministic():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(BUNDLED, torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    a = _generate(pipe, "a photo of a tench", seed=42, steps=4)
    b = _generate(pipe, "a photo of a tench", seed=42, steps=4)
    c = _generate(pipe, "a photo of a tench", seed=43, steps=4)
    assert a.shape == (1, 64, 64, 3)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).mean() > 1e-3
    size = sum(f.stat().st_size for f in BUNDLED.rglob("*") if f.is_file())
    assert size <= 25 * 2**20, f"bundled pipeline is {size / 2**20:.1f} MB"
