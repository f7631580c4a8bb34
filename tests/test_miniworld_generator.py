"""The mini world's text-to-image recipe: a smoke run gives a standard SD folder; the bundled one loads offline."""

from __future__ import annotations

import dataclasses
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
    """Also: the recipe reports through the library's progress protocol, and listening changes no weight."""
    from safetensors.torch import load_file

    events = []
    again = train_generator(tmp_path, seed=0, smoke=True, progress=events.append)
    stages = list(dict.fromkeys(e.stage for e in events))
    assert stages == ["autoencoder", "encode latents", "unet + text encoder", "decoder refinement",
                      "decoder detail refinement"]
    unet_steps = [e for e in events if e.stage == "unet + text encoder"]
    assert [e.step for e in unet_steps] == list(range(1, unet_steps[0].total + 1))
    assert all(e.metrics["loss"] > 0 for e in unet_steps)
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                 "vae/diffusion_pytorch_model.safetensors"):
        a, b = load_file(smoke_folder / part), load_file(again / part)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_smoking_masks_cover_the_cigarette_and_where_it_would_be():
    from recare.miniworld import world
    from recare.miniworld.generator import smoking_masks

    rng = np.random.default_rng(3)
    smoker = world.sample_scene(rng, include=("smoking",))
    person = world.sample_scene(rng, include=("person",), exclude=("smoking",))
    nobody = world.sample_scene(rng, include=("tench",), exclude=("person",))
    masks = smoking_masks([smoker, person, nobody])
    assert masks.shape == (3, world.SIZE, world.SIZE)
    # the smoker's mask is exactly what the smoking thing changes, and it is a thin detail
    bare = dataclasses.replace(smoker, things=tuple(t for t in smoker.things if t.kind != "smoking"))
    changed = np.abs(world.render(smoker).astype(int) - world.render(bare).astype(int)).max(-1) > 0
    np.testing.assert_array_equal(masks[0], changed)
    assert 20 < masks[0].sum() < 0.15 * world.SIZE ** 2
    assert masks[1].sum() > 20  # where a cigarette would be on a person who does not smoke
    assert not masks[2].any()


def test_detail_refinement_changes_only_the_decoder(tmp_path, smoke_folder):
    import shutil

    from safetensors.torch import load_file

    from recare.miniworld.generator import refine_decoder_details

    folder = tmp_path / "pipeline"
    shutil.copytree(smoke_folder, folder)
    before = {p: load_file(folder / p) for p in ("vae/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.safetensors")}
    recipe = GeneratorRecipe.smoke()
    record = refine_decoder_details(folder, seed=1, recipe=recipe, progress=False)
    vae = load_file(folder / "vae/diffusion_pytorch_model.safetensors")
    unet = load_file(folder / "unet/diffusion_pytorch_model.safetensors")
    assert all(torch.equal(unet[k], v) for k, v in before["unet/diffusion_pytorch_model.safetensors"].items())
    old_vae = before["vae/diffusion_pytorch_model.safetensors"]
    changed = {k for k in vae if not torch.equal(vae[k], old_vae[k])}
    assert changed and all(k.startswith(("decoder.", "post_quant_conv.")) for k in changed)
    assert vae[next(iter(changed))].dtype == torch.float16  # saved as the recipe says
    saved = json.loads((folder / TRAINING_RECORD).read_text())
    assert saved["detail_refinement"] == record and record["recipe"]["detail_steps"] == recipe.detail_steps
    assert saved["smoke"] is True  # the earlier stages' record is kept
    assert not list(folder.glob(".vae.*"))  # no temporary folders left behind


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


def test_two_process_recipe_fails_clearly_without_its_parts(tmp_path):
    """The decoder part waits for the autoencoder the UNet part writes; a dead producer, an
    unknown part or a join before both parts exist are clear errors, not hangs."""
    from recare.miniworld.generator import assemble_generator, parts_dir, train_generator_part

    with pytest.raises(GeneratorTrainingError, match="unknown generator part"):
        train_generator_part(tmp_path, "everything", smoke=True, progress=False)
    with pytest.raises(GeneratorTrainingError, match="never written"):
        train_generator_part(tmp_path, "decoder", smoke=True, progress=False, alive=lambda: False)
    with pytest.raises(GeneratorTrainingError, match=r"parts missing .*unet\.pt"):
        assemble_generator(tmp_path, smoke=True)
    assert not (tmp_path / "pipeline").exists()
    train_generator_part(tmp_path, "unet", smoke=True, progress=False)
    with pytest.raises(GeneratorTrainingError, match=r"parts missing .*vae\.pt"):
        assemble_generator(tmp_path, smoke=True)
    train_generator_part(tmp_path, "decoder", smoke=True, progress=False, alive=lambda: False)  # its input exists now
    folder = assemble_generator(tmp_path, smoke=True)
    record = json.loads((folder / TRAINING_RECORD).read_text())
    assert record["parallel"] is True and "detail_refinement" in record and "unet_s" in record["timings_s"]
    assert not parts_dir(tmp_path).exists()  # the parts are removed once joined
