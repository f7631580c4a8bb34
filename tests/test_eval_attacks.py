"""Attacks and probes on tiny models: one generation call, CCE, the model's tokens, completion, noise."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from recare.config import ConfigError, GenerateConfig
from recare.errors import EvaluationError
from recare.eval.attacks import (
    ATTACKS, AttackContext, EarlyNoiseDDIMScheduler, learn_cce_token, reference_for_seed, reference_images, render,
    token_placeholders,
)
from recare.eval.config import CCE_PLACEHOLDER, EvaluationConfig, resolve_config
from tests.helpers_tiny import build_tiny_pipeline

PROMPT = "a photo of a fish"


@pytest.fixture(scope="module")
def pipe():
    p = build_tiny_pipeline(seed=0)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def config():
    return resolve_config(EvaluationConfig(
        model="tiny", target_prompt=PROMPT, target_concept="tench", detector="oracle", encoder="tiny-clip",
        initializer_token="man",
        care_labels=["person"], care_prompts={}, seeds=2, steps=4, height=64, width=64, cce_images=2, cce_steps=2,
        reference_images="base", batch_size=2))


def pixels(images):
    return np.stack([np.asarray(im) for im in images])


def close(a, b):
    """Equal up to the last bit of float rounding (another batch size can move a pixel by 1)."""
    return np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_render_is_iter_generations_convention(pipe, config):
    from recare.generate import generate_images

    ours = render(pipe, [PROMPT] * 3, [5, 6, 7], config)
    theirs = generate_images(pipe, GenerateConfig(prompt=PROMPT, num_images=3, base_seed=5, steps=config.steps,
                                                  guidance=config.guidance, batch_size=3, height=64, width=64)).images
    assert np.array_equal(pixels(ours), pixels(theirs))
    alone = render(pipe, [PROMPT], [6], config)  # an image does not depend on its batch, up to float rounding
    assert close(pixels(alone)[0], pixels(ours)[1])


def test_every_attack_is_a_table_row(config):
    assert list(ATTACKS) == ["erased", "cce", "adversarial", "completion", "noise", "ud"]
    assert [a for a, attack in ATTACKS.items() if attack.learned] == ["cce", "ud"]
    for name, attack in ATTACKS.items():
        assert attack.name == name and attack.summary and callable(attack.pipeline) and callable(attack.prompts)
    with pytest.raises(ConfigError, match="unknown attack.*known attacks: erased, cce"):
        EvaluationConfig(attacks=["erased", "ring-a-bell"])


def test_noise_probe(pipe, config):
    ctx = AttackContext(config, pipe)
    erased = render(pipe, [PROMPT] * 2, [42, 43], config)
    off = dataclasses.replace(config, noise_fraction=0.0)
    quiet = render(ATTACKS["noise"].pipeline(AttackContext(off, pipe)), [PROMPT] * 2, [42, 43], off)
    assert np.array_equal(pixels(quiet), pixels(erased))  # no noisy step: exactly DDIM
    noisy_pipe = ATTACKS["noise"].pipeline(ctx)
    assert isinstance(noisy_pipe.scheduler, EarlyNoiseDDIMScheduler) and noisy_pipe.scheduler.noisy_steps == 2
    assert pipe.scheduler is not noisy_pipe.scheduler and type(pipe.scheduler).__name__ == "DDIMScheduler"
    noisy = render(noisy_pipe, [PROMPT] * 2, [42, 43], config)
    assert not np.array_equal(pixels(noisy), pixels(erased))
    again = render(noisy_pipe, [PROMPT], [43], config)  # the extra noise comes from the image's own generator
    assert close(pixels(again)[0], pixels(noisy)[1])


def test_noisy_step_with_eta_zero_is_ddim():
    from diffusers import DDIMScheduler

    plain = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    probe = EarlyNoiseDDIMScheduler.from_config(plain.config).configure(noisy_steps=10, eta=0.0)
    for s in (plain, probe):
        s.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for t in plain.timesteps[:3]:
        a = plain.step(eps, t, x).prev_sample
        b = probe.step(eps, t, x, generator=[torch.Generator().manual_seed(1)] * 2).prev_sample
        assert torch.allclose(a, b, atol=1e-5)


def test_completion_finishes_the_real_image(pipe, config):
    red, blue = (Image.new("RGB", (64, 64), c) for c in ((200, 30, 30), (30, 30, 200)))
    attack = ATTACKS["completion"]

    def run(reference, seeds):
        ctx = AttackContext(config, pipe, reference=reference)
        assert [reference_for_seed(ctx, s) for s in (42, 43, 44)] == [reference[0], reference[1 % len(reference)],
                                                                      reference[0]]
        return pixels(render(attack.pipeline(ctx), [PROMPT] * len(seeds), seeds, config,
                             call=lambda kw: attack.call(ctx, kw, seeds)))

    from_red, from_blue = run([red, blue], [42, 43]), run([blue, red], [42, 43])
    assert not np.array_equal(from_red[0], from_blue[0])   # the real image is where it starts
    assert close(run([red, blue], [43])[0], from_red[1])
    assert close(run([blue], [42])[0], from_blue[0])
    ctx = AttackContext(config, pipe, reference=[red])
    assert attack.settings(ctx)["denoising_steps"] == int(config.steps * config.completion_strength)
    with pytest.raises(EvaluationError, match="needs real target images"):
        reference_for_seed(AttackContext(config, pipe), 42)


def test_cce_learns_a_token_against_the_given_model(pipe, config):
    images = reference_images(config, base=pipe, count=2)
    vocab = len(pipe.tokenizer)
    steps = []
    token = learn_cce_token(pipe, images, config, progress=lambda e: steps.append(e.step))
    assert token.placeholder == CCE_PLACEHOLDER and token.initializer == "man" and steps == [1, 2]
    assert len(pipe.tokenizer) == vocab  # the model is not changed
    ctx = AttackContext(config, pipe, reference=images, cce_token=token)
    assert ATTACKS["cce"].prompts(ctx) == ["A photo of a <cce*>"]
    cce_pipe = ATTACKS["cce"].pipeline(ctx)
    assert CCE_PLACEHOLDER in cce_pipe.tokenizer.get_vocab() and cce_pipe.unet is pipe.unet
    (image,) = render(cce_pipe, ATTACKS["cce"].prompts(ctx), [42], config)
    assert image.size == (64, 64)
    with pytest.raises(EvaluationError, match="CCE needs 2 target images"):
        learn_cce_token(pipe, images[:1], config)


def test_adversarial_tokens_of_a_training_run(pipe, config, tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "tokens").mkdir()
    for i in (1, 2):
        save_file({f"<v{i}*>": torch.randn(32)}, str(tmp_path / "tokens" / f"token_{i}.safetensors"))
    assert token_placeholders(tmp_path / "tokens") == ["<v1*>", "<v2*>"]
    ctx = AttackContext(config, pipe, tokens_dir=tmp_path / "tokens")
    attack = ATTACKS["adversarial"]
    assert attack.prompts(ctx) == ["A photo of a <v1*>", "A photo of a <v2*>"]
    assert len(render(attack.pipeline(ctx), attack.prompts(ctx), [42, 42], config)) == 2
    assert "<v1*>" not in pipe.tokenizer.get_vocab()


def test_reference_images_from_a_folder(config, tmp_path):
    for i in range(3):
        Image.new("RGB", (64, 64), (i * 40, 0, 0)).save(tmp_path / f"{i}.png")
    folder = dataclasses.replace(config, reference_images=str(tmp_path))
    assert len(reference_images(folder, count=2)) == 2
    with pytest.raises(EvaluationError, match="has 3 images; CCE needs 5"):
        reference_images(folder, count=5)


def test_world_reference_images_show_the_target():
    from recare.eval.detectors import make_detector

    assert resolve_config(EvaluationConfig(task="smoking")).reference_images == "base"   # the paper's default
    world = resolve_config(EvaluationConfig(task="smoking", cce_images=8, reference_images="world"))
    assert world.detector == "oracle"
    images = reference_images(world)
    assert len(images) == 8
    assert all(r.positive for r in make_detector("oracle", concept="smoking").detect(images))
    with pytest.raises(ConfigError, match="reference_images 'world'"):
        resolve_config(EvaluationConfig(model="CompVis/stable-diffusion-v1-4", target_prompt="x",
                                        reference_images="world"))
