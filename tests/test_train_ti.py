"""Textual inversion on the tiny pipeline: only the new row learns, nothing of the caller changes,
the latent cache encodes each image once, resume and determinism are bit-identical on the CPU."""

from __future__ import annotations

import io
import types

import numpy as np
import pytest
import torch
from PIL import Image

from recare.config import TextualInversionConfig
from recare.errors import Cancelled, ConfigError, TrainingError
from recare.progress import CancelToken
from recare.train.textual_inversion import (
    PAINTING_TEMPLATES, PHOTO_TEMPLATES, LearnedToken, ModelParts, TextualInversionState, learn_token,
    with_learned_tokens,
)
from tests.helpers_tiny import build_tiny_pipeline

RES = 32  # 32 px images -> 16x16 latents on the tiny VAE: fast and still a real UNet pass


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline(seed=0)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(3)]


def cfg(**overrides) -> TextualInversionConfig:
    values = dict(steps=4, resolution=RES, initializer_token="a", placeholder="<v*>", seed=7)
    values.update(overrides)
    return TextualInversionConfig(**values)


def init_row(pipe, word="a") -> torch.Tensor:
    token_id = pipe.tokenizer.encode(word, add_special_tokens=False)[0]
    return pipe.text_encoder.get_input_embeddings().weight.detach()[token_id].clone()


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ---- config -------------------------------------------------------------------------------------

def test_config_defaults_are_official_and_round_trip():
    c = TextualInversionConfig()
    assert (c.steps, c.learning_rate, c.batch_size, c.flip_p, c.templates) == (3000, 5e-3, 1, 0.5, "photo")
    assert TextualInversionConfig(batch_size=4).effective_learning_rate == pytest.approx(2e-2)  # lr x batch
    assert TextualInversionConfig(batch_size=4, scale_lr=False).effective_learning_rate == pytest.approx(5e-3)
    again = TextualInversionConfig.from_json(TextualInversionConfig(steps=5, templates="painting").to_json())
    assert again == TextualInversionConfig(steps=5, templates="painting")


@pytest.mark.parametrize("field,value", [("steps", 0), ("learning_rate", 0.0), ("batch_size", 0), ("flip_p", 1.5),
                                         ("templates", "sketch"), ("resolution", 30), ("initializer_token", " "),
                                         ("placeholder", "two words")])
def test_config_refuses_bad_values(field, value):
    with pytest.raises(ConfigError):
        TextualInversionConfig(**{field: value})


def test_templates_are_the_official_lists():
    assert len(PHOTO_TEMPLATES) == 27 and PHOTO_TEMPLATES[0] == "a photo of a {}"
    assert len(PAINTING_TEMPLATES) == 19 and PAINTING_TEMPLATES[0] == "a painting in the style of {}"


# ---- only the new row learns; nothing of the caller changes -----------------------------------

def test_only_the_new_row_changes_and_the_caller_is_untouched(pipe, images):
    before = {name: snapshot(getattr(pipe, name)) for name in ("unet", "vae", "text_encoder")}
    flags = {name: [p.requires_grad for p in getattr(pipe, name).parameters()] for name in ("unet", "text_encoder")}
    vocab = len(pipe.tokenizer)

    token = learn_token(pipe, images, config=cfg(steps=5, learning_rate=5e-2))

    assert isinstance(token, LearnedToken) and token.placeholder == "<v*>" and token.initializer == "a"
    assert token.embedding.shape == (32,) and token.embedding.dtype == torch.float32
    assert len(token.losses) == 5 and all(np.isfinite(token.losses))
    assert not torch.equal(token.embedding, init_row(pipe))           # the new row moved
    for name, state in before.items():                                  # every other tensor is bit-identical
        after = getattr(pipe, name).state_dict()
        assert all(torch.equal(state[k], after[k]) for k in state), name
    assert len(pipe.tokenizer) == vocab and "<v*>" not in pipe.tokenizer.get_vocab()
    assert pipe.text_encoder.get_input_embeddings().num_embeddings == vocab
    for name in ("unet", "text_encoder"):                               # no grads, no flags flipped
        params = list(getattr(pipe, name).parameters())
        assert all(p.grad is None for p in params), name
        assert [p.requires_grad for p in params] == flags[name], name


def test_with_learned_tokens_adds_rows_on_copies(pipe, images):
    token = LearnedToken("<v*>", "a", torch.arange(32, dtype=torch.float32))
    tok, encoder = with_learned_tokens(pipe.tokenizer, pipe.text_encoder, [token])
    base = pipe.text_encoder.get_input_embeddings().weight
    grown = encoder.get_input_embeddings().weight
    assert grown.shape == (base.shape[0] + 1, 32) and encoder.config.vocab_size == base.shape[0] + 1
    assert torch.equal(grown[:-1], base) and torch.equal(grown[-1], token.embedding)
    assert tok.convert_tokens_to_ids("<v*>") == base.shape[0]
    assert len(pipe.tokenizer) == base.shape[0] and "<v*>" not in pipe.tokenizer.get_vocab()
    # the copy shares the frozen transformer weights with the original (no memory cost)
    shared = dict(pipe.text_encoder.named_parameters())
    for name, p in encoder.named_parameters():
        if "token_embedding" not in name:
            assert p is shared[name]
    # a second TI run on top of the first token adds the next id
    second = learn_token((pipe.unet, pipe.vae, encoder, tok, pipe.scheduler), images,
                         config=cfg(steps=1, placeholder="<w*>"))
    assert second.placeholder == "<w*>"


# ---- the loss -----------------------------------------------------------------------------------

def ti_loss(pipe, embedding: torch.Tensor, image: Image.Image, n: int = 24) -> float:
    """Mean TI loss of `embedding` for "a photo of a <v*>" over n fixed (noise, timestep) draws."""
    from recare.train.textual_inversion import encode_latent_cache, prepare_images

    tok, encoder = with_learned_tokens(pipe.tokenizer, pipe.text_encoder, {"<v*>": embedding})
    ids = tok(["a photo of a <v*>"] * n, padding="max_length", max_length=tok.model_max_length,
              return_tensors="pt").input_ids
    cache = encode_latent_cache(pipe.vae, prepare_images([image], RES), flip_p=0.0)
    g = torch.Generator().manual_seed(123)
    z = cache.mean[torch.zeros(n, dtype=torch.long), 0] * cache.scaling_factor
    noise = torch.randn(z.shape, generator=g)
    t = torch.linspace(50, 950, n).long()
    with torch.no_grad():
        pred = pipe.unet(pipe.scheduler.add_noise(z, noise, t), t, encoder_hidden_states=encoder(ids)[0]).sample
    return float(torch.nn.functional.mse_loss(pred, noise))


def test_loss_decreases_on_a_learnable_case(pipe, images):
    """One image, no flips: the learned token lowers the TI loss on held-out noise draws."""
    token = learn_token(pipe, images[:1], config=cfg(steps=40, flip_p=0.0, learning_rate=5e-2))
    start, end = ti_loss(pipe, init_row(pipe), images[0]), ti_loss(pipe, token.embedding, images[0])
    assert end < start


# ---- the latent cache ---------------------------------------------------------------------------

class CountingVAE:
    """Delegates to a VAE and counts the images it encodes."""

    def __init__(self, vae):
        self.vae, self.images, self.calls = vae, 0, 0
        self.config = vae.config

    def encode(self, x):
        self.calls += 1
        self.images += len(x)
        return self.vae.encode(x)

    def parameters(self):
        return self.vae.parameters()


@pytest.mark.parametrize("flip_p,views", [(0.5, 2), (0.0, 1), (1.0, 1)])
def test_latent_cache_encodes_each_image_and_flip_once(pipe, images, flip_p, views):
    vae = CountingVAE(pipe.vae)
    learn_token((pipe.unet, vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler), images,
                config=cfg(steps=6, flip_p=flip_p))
    assert vae.images == views * len(images)   # 6 steps, yet each image (and its flip) went through once


# ---- progress, cancel, resume, determinism ------------------------------------------------------

def test_progress_events_every_step(pipe, images):
    events = []
    learn_token(pipe, images, config=cfg(steps=3), progress=events.append, stage="stage1.ti")
    assert [(e.stage, e.step, e.total) for e in events] == [("stage1.ti", s, 3) for s in (1, 2, 3)]
    assert all("loss" in e.metrics and "lr" in e.metrics for e in events)


def test_determinism_same_seed_same_token(pipe, images):
    a = learn_token(pipe, images, config=cfg(steps=3))
    b = learn_token(pipe, images, config=cfg(steps=3))
    c = learn_token(pipe, images, config=cfg(steps=3, seed=8))
    assert torch.equal(a.embedding, b.embedding) and a.losses == b.losses
    assert not torch.equal(a.embedding, c.embedding)


def test_cancel_then_resume_is_bit_identical(pipe, images):
    config = cfg(steps=6, batch_size=2)   # batch 2 over 3 images: a pass boundary falls inside a step
    full = learn_token(pipe, images, config=config)

    token = CancelToken()
    state = TextualInversionState()

    def stop_after_3(event):
        if event.step == 3:
            token.cancel()

    with pytest.raises(Cancelled):
        learn_token(pipe, images, config=config, progress=stop_after_3, cancel=token, state=state)
    assert state.step == 3 and len(state.losses) == 3
    buffer = io.BytesIO()                          # through a file, as a run folder keeps it
    torch.save(state.state_dict(), buffer)
    buffer.seek(0)
    restored = TextualInversionState.from_state_dict(torch.load(buffer, weights_only=False))
    resumed = learn_token(pipe, images, config=config, state=restored)
    assert torch.equal(resumed.embedding, full.embedding)
    assert resumed.losses == full.losses
    assert restored.step == 6


def test_resume_refuses_a_state_from_another_run(pipe, images):
    state = TextualInversionState()
    learn_token(pipe, images, config=cfg(steps=1), state=state)
    with pytest.raises(ConfigError, match="saved textual-inversion state"):
        learn_token(pipe, images[:2], config=cfg(steps=2), state=state)


class NanAfter(torch.nn.Module):
    """Wraps a UNet; from the `n`-th call on its prediction is NaN."""

    def __init__(self, unet, n):
        super().__init__()
        self.unet, self.n, self.calls, self.config = unet, n, 0, unet.config

    def forward(self, *args, **kwargs):
        self.calls += 1
        out = self.unet(*args, **kwargs).sample
        return types.SimpleNamespace(sample=out * float("nan") if self.calls >= self.n else out)


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_state(pipe, images):
    state = TextualInversionState()
    unet = NanAfter(pipe.unet, 3)
    with pytest.raises(TrainingError, match="loss became nan at step 3"):
        learn_token((unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler), images,
                    config=cfg(steps=5), state=state)
    assert state.step == 2 and len(state.losses) == 2 and torch.isfinite(state.embedding).all()


# ---- errors -------------------------------------------------------------------------------------

def test_placeholder_already_in_vocabulary_is_refused(pipe, images):
    with pytest.raises(ConfigError, match="already a token"):
        learn_token(pipe, images, config=cfg(placeholder="a</w>"))


def test_multi_token_initializer_is_refused(pipe, images):
    with pytest.raises(ConfigError, match="initializer token"):
        learn_token(pipe, images, config=cfg(initializer_token="zqxv"))


def test_model_parts_accepts_pipe_or_tuple(pipe):
    parts = ModelParts.of(pipe)
    assert ModelParts.of((parts.unet, parts.vae, parts.text_encoder, parts.tokenizer, parts.scheduler)) == parts
