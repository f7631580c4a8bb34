"""Textual inversion of one fresh placeholder token (paper Eq. 3; stage 1 of ReCARE and evaluation's CCE).

One new row is added to the token embedding, started from the initializer token's embedding, and
trained with the standard diffusion loss while everything else stays frozen:

    L = || eps - eps_theta( sqrt(abar_t) z0 + sqrt(1 - abar_t) eps, t, text("a photo of a <v*>") ) ||^2

with z0 the VAE latent of a training image (flipped with probability 0.5), t uniform, eps ~ N(0, I).

Differences from the official loop (damilab/CARE `train_concept_inversion`), none of which change
what is sampled or optimised:
- The VAE encodes each image and its mirror image ONCE; the official code encodes every step. We
  cache the latent distribution (mean, std) and draw z0 = mean + std * n each step, which is what
  the official `latent_dist.sample()` does.
- Only the new row is an optimiser parameter. The official code gives AdamW the whole embedding
  matrix and copies the old rows back after each step; AdamW acts element-wise, so the new row's
  update is the same, without a dense 49,408-row gradient and moment update per step.
- The template prompts are tokenized once; every random draw (image order, template, flip, latent
  sample, noise, timestep) comes from one explicit CPU `torch.Generator`, so a run is reproducible
  and resumable bit for bit on the CPU.
- The initializer is the token the word becomes in a prompt (`tokenizer.encode("person")` ->
  "person</w>"); the official `convert_tokens_to_ids("person")` picks the word-piece without "</w>"
  (and the unknown token for words that are not one piece).
Kept as the official code does: timestep uniform in [0, 998] (`randint(0, 999)`), the lr multiplied
by the batch size, images resized to the square resolution without cropping (bicubic).

Nothing the caller passes is changed: the tokenizer is copied before the placeholder is added, and
the text encoder is used through a structural copy that shares every frozen weight with it and
reads the new row from a separate parameter. Gradients are taken only for that row
(`backward(inputs=[row])`), so no `.grad` or `requires_grad` of the caller's modules is touched.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from recare.config import TextualInversionConfig
from recare.errors import ConfigError, TrainingError
from recare.models.construction import building_modules
from recare.models.traced_calls import predict_noise
from recare.progress import CancelToken, ProgressCallback, check_cancel, emit

# The official templates (diffusers' textual-inversion example, copied into damilab/CARE utils/dataset.py).
PHOTO_TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
)
PAINTING_TEMPLATES = (
    "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
    "the painting in the style of {}", "a clean painting in the style of {}", "a dirty painting in the style of {}",
    "a dark painting in the style of {}", "a picture in the style of {}", "a cool painting in the style of {}",
    "a close-up painting in the style of {}", "a bright painting in the style of {}",
    "a cropped painting in the style of {}", "a good painting in the style of {}",
    "a close-up painting in the style of {}", "a rendition in the style of {}", "a nice painting in the style of {}",
    "a small painting in the style of {}", "a weird painting in the style of {}", "a large painting in the style of {}",
)
TEMPLATES = {"photo": PHOTO_TEMPLATES, "painting": PAINTING_TEMPLATES}

STAGE = "textual_inversion"
ENCODE_CHUNK = 8   # images per VAE encode call while filling the latent cache


# ---------------------------------------------------------------------------------------------
# results and resumable state


@dataclasses.dataclass(frozen=True)
class LearnedToken:
    """A learned placeholder token.

    Attributes:
        placeholder: the token's text, e.g. "<v1*>".
        initializer: the word its embedding started from.
        embedding: the learned row, float32 on the CPU, shape [hidden].
        losses: the loss of every step, in order.
    """

    placeholder: str
    initializer: str
    embedding: torch.Tensor
    losses: tuple[float, ...] = ()

    @property
    def hidden_size(self) -> int:
        return int(self.embedding.shape[-1])


@dataclasses.dataclass
class TextualInversionState:
    """Everything a textual-inversion run needs to continue where it stopped (bit-identical on the CPU).

    `learn_token(..., state=s)` resumes from `s` when `s.step > 0` and records into `s` after every
    finished step, so after a cancel or an error `s` holds the last good step; save it with
    `torch.save(s.state_dict(), path)` and rebuild it with `TextualInversionState.from_state_dict`.

    Attributes:
        step: steps done.
        placeholder, initializer, n_images: what the run is about (checked on resume).
        embedding: the new row after `step` steps (float32, CPU).
        optimizer: the AdamW state dict (tensors on the CPU).
        generator: the CPU generator's state.
        order: the current pass's shuffled image order; `cursor` is the next position in it.
        losses: the loss of every step done.
    """

    step: int = 0
    placeholder: str = ""
    initializer: str = ""
    n_images: int = 0
    embedding: torch.Tensor | None = None
    optimizer: dict[str, Any] | None = None
    generator: torch.Tensor | None = None
    order: list[int] = dataclasses.field(default_factory=list)
    cursor: int = 0
    losses: list[float] = dataclasses.field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        """A plain dict for `torch.save` (tensors, numbers, strings, lists)."""
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_state_dict(cls, data: Mapping[str, Any]) -> "TextualInversionState":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise TrainingError(f"not a textual-inversion state: unknown field(s) {unknown}.")
        return cls(**{k: copy.deepcopy(v) for k, v in data.items()})


# ---------------------------------------------------------------------------------------------
# the model parts


@dataclasses.dataclass(frozen=True)
class ModelParts:
    """The five parts of a Stable Diffusion pipeline textual inversion uses (none is changed)."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any

    @classmethod
    def of(cls, model: Any) -> "ModelParts":
        """From a diffusers pipeline, a ModelParts, or a (unet, vae, text_encoder, tokenizer, scheduler) tuple."""
        if isinstance(model, ModelParts):
            return model
        if isinstance(model, (tuple, list)):
            if len(model) != 5:
                raise TypeError("expected (unet, vae, text_encoder, tokenizer, scheduler)")
            return cls(*model)
        return cls(model.unet, model.vae, model.text_encoder, model.tokenizer, model.scheduler)


class EmbeddingWithNewRows(torch.nn.Module):
    """A token embedding that reads the ids `new_ids` from `new_rows` and every other id from `base`.

    `base` is the caller's frozen embedding module (shared, never written); `new_rows` is the only
    trainable tensor.

    Args:
        base: the existing nn.Embedding.
        new_rows: parameter of shape [len(new_ids), hidden]; id `new_ids[i]` reads row i.
        new_ids: the token ids of the new rows (usually `base.num_embeddings`, `+ 1`, ...).
    """

    def __init__(self, base: torch.nn.Embedding, new_rows: torch.nn.Parameter, new_ids: Sequence[int]):
        super().__init__()
        self.base = base
        self.new_rows = new_rows
        self.new_ids = [int(i) for i in new_ids]
        self.num_base = int(base.num_embeddings)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids.clamp(max=self.num_base - 1))
        for i, new_id in enumerate(self.new_ids):
            out = torch.where((input_ids == new_id).unsqueeze(-1), self.new_rows[i].to(out.dtype), out)
        return out


def share_weights_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A structural copy of `module` whose parameters and buffers are the very same tensors.

    Replacing a submodule of the copy leaves `module` as it is, at no memory cost.
    """
    memo = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    return copy.deepcopy(module, memo)


def single_token_id(tokenizer, word: str) -> int:
    """The id of `word` as it appears in a prompt; ConfigError when it is not exactly one token."""
    ids = tokenizer.encode(word, add_special_tokens=False)
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise ConfigError(
            f"the initializer token {word!r} is {len(ids)} tokens for this tokenizer ({pieces}); "
            f"pick a single-token word such as 'person', 'art' or 'fish'."
        )
    return int(ids[0])


def add_placeholder(tokenizer, placeholder: str):
    """A copy of `tokenizer` with `placeholder` added; returns (tokenizer copy, new id).

    Raises:
        ConfigError: the placeholder is already in the vocabulary (or tokenizes to something else).
    """
    if placeholder in tokenizer.get_vocab():
        raise ConfigError(f"the placeholder {placeholder!r} is already a token of this tokenizer: choose another name.")
    tok = copy.deepcopy(tokenizer)
    if tok.add_tokens([placeholder]) != 1:
        raise ConfigError(f"the placeholder {placeholder!r} could not be added to the tokenizer: choose another name.")
    new_id = int(tok.convert_tokens_to_ids(placeholder))
    if tok.encode(placeholder, add_special_tokens=False) != [new_id]:
        raise ConfigError(f"the placeholder {placeholder!r} does not tokenize to itself: use e.g. '<v1*>'.")
    return tok, new_id


def _tokenize_templates(tokenizer, templates: Sequence[str], placeholder: str, new_id: int) -> torch.Tensor:
    """[n_templates, max_length] input ids, each holding the placeholder exactly once."""
    ids = tokenizer([t.format(placeholder) for t in templates], padding="max_length", truncation=True,
                    max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    if not bool(((ids == new_id).sum(dim=1) == 1).all()):
        raise ConfigError(f"the placeholder {placeholder!r} does not appear once in every template prompt.")
    return ids


def with_learned_tokens(tokenizer, text_encoder, tokens: Iterable[LearnedToken] | Mapping[str, torch.Tensor]):
    """Copies of `tokenizer` and `text_encoder` that know the learned tokens (the originals are not changed).

    The text encoder copy shares every weight with the original except the token embedding, which
    is a new nn.Embedding holding the old rows followed by the learned ones (`config.vocab_size`
    updated), so it behaves like a text encoder after `load_textual_inversion`.

    Args:
        tokenizer, text_encoder: the base pair (in sync: len(tokenizer) == number of embedding rows).
        tokens: LearnedTokens, or {placeholder: embedding [hidden]}.

    Returns:
        (tokenizer copy, text encoder copy).
    """
    pairs = [(t.placeholder, t.embedding) for t in tokens] if not isinstance(tokens, Mapping) else list(tokens.items())
    base = text_encoder.get_input_embeddings()
    if len(tokenizer) != base.num_embeddings:
        raise TrainingError(f"tokenizer ({len(tokenizer)} tokens) and text encoder ({base.num_embeddings} rows) "
                            "do not belong together.")
    tok = copy.deepcopy(tokenizer)
    for placeholder, embedding in pairs:
        if embedding.shape[-1] != base.embedding_dim:
            raise TrainingError(f"token {placeholder!r} has width {embedding.shape[-1]}, "
                                f"the text encoder {base.embedding_dim}.")
        if placeholder in tok.get_vocab() or tok.add_tokens([placeholder]) != 1:
            raise ConfigError(f"the tokenizer already has {placeholder!r}.")
    encoder = share_weights_copy(text_encoder)
    rows = torch.stack([e.reshape(-1) for _, e in pairs]).to(base.weight.device, base.weight.dtype)
    with building_modules():  # a diffusers load in another thread would leave it on meta
        grown = torch.nn.Embedding(base.num_embeddings + len(pairs), base.embedding_dim,
                                   device=base.weight.device, dtype=base.weight.dtype)
    with torch.no_grad():
        grown.weight.copy_(torch.cat([base.weight.detach(), rows]))
    grown.weight.requires_grad_(base.weight.requires_grad)
    encoder.set_input_embeddings(grown)
    encoder.config = copy.deepcopy(text_encoder.config)
    encoder.config.vocab_size = grown.num_embeddings
    return tok, encoder


# ---------------------------------------------------------------------------------------------
# images and the latent cache


def native_resolution(unet, vae) -> int:
    """The model's native image size: UNet sample size x VAE downsampling (512 for SD v1.4)."""
    return int(unet.config.sample_size) * 2 ** (len(vae.config.block_out_channels) - 1)


def prepare_images(images: Sequence[Image.Image], resolution: int) -> torch.Tensor:
    """[n, 3, R, R] float32 in [-1, 1]: RGB, resized to R x R (bicubic, no crop), as the official dataset.

    Args:
        images: PIL images.
        resolution: the square side R.
    """
    out = []
    for image in images:
        image = image.convert("RGB").resize((resolution, resolution), resample=Image.Resampling.BICUBIC)
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(resolution, resolution, 3)
        out.append(pixels.permute(2, 0, 1).float() / 127.5 - 1.0)
    return torch.stack(out)


@dataclasses.dataclass(frozen=True)
class LatentCache:
    """The VAE latent distribution of every training image and of its mirror image, encoded once.

    Attributes:
        mean, std: [n_images, 2, C, h, w] float32; view 0 is the image, view 1 its horizontal flip
            (a view never drawn, e.g. the flip when flip_p = 0, is left as zeros).
        scaling_factor, shift_factor: the VAE's latent scaling (z = (x - shift) * scale).
    """

    mean: torch.Tensor
    std: torch.Tensor
    scaling_factor: float
    shift_factor: float

    def sample(self, index: torch.Tensor, flip: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """z0 = (mean + std * noise - shift) * scale of images `index` in view `flip` (`latent_dist.sample()`)."""
        view = flip.long()
        x = self.mean[index, view] + self.std[index, view] * noise.to(self.mean.device)
        return (x - self.shift_factor) * self.scaling_factor


@torch.no_grad()
def encode_latent_cache(vae, pixels: torch.Tensor, flip_p: float, chunk: int = ENCODE_CHUNK) -> LatentCache:
    """Encode each image (and its mirror image when flips can happen) through the VAE once.

    Args:
        vae: an AutoencoderKL.
        pixels: [n, 3, R, R] in [-1, 1] (see `prepare_images`).
        flip_p: the flip probability; flips are encoded when > 0, originals when < 1.
        chunk: images per encode call.
    """
    param = next(vae.parameters())
    views = [v for v, needed in ((0, flip_p < 1.0), (1, flip_p > 0.0)) if needed]
    batch = torch.cat([pixels if v == 0 else torch.flip(pixels, dims=[-1]) for v in views])
    means, stds = [], []
    for start in range(0, len(batch), chunk):
        dist = vae.encode(batch[start:start + chunk].to(param.device, param.dtype)).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    mean_views, std_views = torch.cat(means).chunk(len(views)), torch.cat(stds).chunk(len(views))
    n = len(pixels)
    mean = torch.zeros((n, 2, *mean_views[0].shape[1:]), device=param.device)
    std = torch.zeros_like(mean)
    for v, m, s in zip(views, mean_views, std_views):
        mean[:, v], std[:, v] = m, s
    shift = getattr(vae.config, "shift_factor", None)
    return LatentCache(mean, std, float(vae.config.scaling_factor), float(shift or 0.0))


# ---------------------------------------------------------------------------------------------
# one step's random draws


@dataclasses.dataclass(frozen=True)
class StepDraws:
    """The random inputs of one step (all drawn from the run's CPU generator, in this order)."""

    index: torch.Tensor        # [B] image indices (from the shuffled pass order)
    template: torch.Tensor     # [B] template indices
    flip: torch.Tensor         # [B] bool
    latent_noise: torch.Tensor  # [B, C, h, w]: z0 = mean + std * latent_noise
    noise: torch.Tensor        # [B, C, h, w]: the diffusion noise eps
    timestep: torch.Tensor     # [B] in [0, num_train_timesteps - 2]


class _ImageOrder:
    """Shuffled passes over the images (the official DataLoader shuffles; we draw the order ourselves)."""

    def __init__(self, n_images: int, order: list[int], cursor: int):
        self.n_images, self.order, self.cursor = n_images, list(order), cursor

    def take(self, count: int, generator: torch.Generator) -> list[int]:
        out = []
        while len(out) < count:
            if self.cursor >= len(self.order):
                self.order = torch.randperm(self.n_images, generator=generator).tolist()
                self.cursor = 0
            out.append(self.order[self.cursor])
            self.cursor += 1
        return out


def draw_step(generator: torch.Generator, order: _ImageOrder, batch_size: int, n_templates: int, flip_p: float,
              latent_shape: Sequence[int], num_train_timesteps: int) -> StepDraws:
    """Draw one step's random inputs (image order, template, flip, latent sample noise, noise, timestep)."""
    index = torch.tensor(order.take(batch_size, generator), dtype=torch.long)
    template = torch.randint(0, n_templates, (batch_size,), generator=generator)
    flip = torch.rand(batch_size, generator=generator) < flip_p
    latent_noise = torch.randn((batch_size, *latent_shape), generator=generator)
    noise = torch.randn((batch_size, *latent_shape), generator=generator)
    # official: torch.randint(0, 999) -> t in [0, 998] (999 is never drawn); kept
    timestep = torch.randint(0, num_train_timesteps - 1, (batch_size,), generator=generator)
    return StepDraws(index, template, flip, latent_noise, noise, timestep)


def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet should predict: the noise (epsilon models, as SD v1.4) or the velocity (v-prediction)."""
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise TrainingError(f"textual inversion supports epsilon and v_prediction models, not {kind!r}.")


# ---------------------------------------------------------------------------------------------
# the loop


def learn_token(
    model: Any,
    images: Sequence[Image.Image] | Any,
    placeholder: str | None = None,
    initializer_token: str | None = None,
    config: TextualInversionConfig | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    state: TextualInversionState | None = None,
    stage: str = STAGE,
) -> LearnedToken:
    """Learn the embedding of a fresh placeholder token from `images` against `model` (Eq. 3).

    Runs under the caller's autocast context, if any. Neither the model's parts nor the tokenizer are
    changed (see the module docstring).

    Args:
        model: a diffusers Stable Diffusion pipeline, or (unet, vae, text_encoder, tokenizer, scheduler);
            the scheduler gives the noise schedule (`add_noise`) and prediction type.
        images: the training images: PIL images, or anything `recare.generate.load_images` reads.
        placeholder: the new token's text; None takes `config.placeholder`.
        initializer_token: the single-token word the row starts from; None takes `config.initializer_token`.
        config: steps, lr, batch, flip, templates, resolution, seed (defaults: the official ones).
        progress: called after every step with stage `stage`, the step, and metrics loss and lr.
        cancel: checked between steps; when set, `recare.errors.Cancelled` is raised and `state`
            holds the last finished step.
        state: resume from it when `state.step > 0`; it is updated after every finished step.
        stage: the progress stage name.

    Returns:
        The LearnedToken (embedding, placeholder, initializer, per-step losses).

    Raises:
        ConfigError: a placeholder already in the vocabulary, an initializer that is not one token,
            a state from another run.
        TrainingError: a NaN or infinite loss (`state` keeps the last good step).
        recare.errors.Cancelled: the token was set.
    """
    config = config or TextualInversionConfig()
    placeholder = placeholder if placeholder is not None else config.placeholder
    initializer_token = initializer_token if initializer_token is not None else config.initializer_token
    state = state if state is not None else TextualInversionState()
    parts = ModelParts.of(model)
    unet, vae, text_encoder, tokenizer, scheduler = (parts.unet, parts.vae, parts.text_encoder, parts.tokenizer,
                                                     parts.scheduler)
    if not isinstance(images, (list, tuple)) or not all(isinstance(i, Image.Image) for i in images):
        from recare.generate import load_images

        images = load_images(images)
    if len(images) == 0:
        raise ConfigError("textual inversion needs at least one image.")

    # --- the placeholder: a tokenizer copy that knows it, a text encoder copy that reads its row
    base_embedding = text_encoder.get_input_embeddings()
    if len(tokenizer) > base_embedding.num_embeddings:
        raise TrainingError(f"the tokenizer has {len(tokenizer)} tokens but the text encoder only "
                            f"{base_embedding.num_embeddings} embedding rows: they do not belong together.")
    init_id = single_token_id(tokenizer, initializer_token)
    tok, new_id = add_placeholder(tokenizer, placeholder)
    input_ids = _tokenize_templates(tok, TEMPLATES[config.templates], placeholder, new_id)
    device = base_embedding.weight.device
    row = torch.nn.Parameter(base_embedding.weight.detach()[init_id].float().clone().unsqueeze(0))
    encoder = share_weights_copy(text_encoder)
    encoder.set_input_embeddings(EmbeddingWithNewRows(base_embedding, row, [new_id]))
    optimizer = torch.optim.AdamW([row], lr=config.effective_learning_rate,
                                  betas=(config.adam_beta1, config.adam_beta2),
                                  weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)
    generator = torch.Generator(device="cpu").manual_seed(config.seed)
    order = _ImageOrder(len(images), [], 0)
    losses: list[float] = []
    if state.step > 0:
        _restore(state, placeholder, initializer_token, len(images), row, optimizer, generator, order, losses)
    else:
        state.placeholder, state.initializer, state.n_images = placeholder, initializer_token, len(images)
        _record(state, 0, row, optimizer, generator, order, losses)

    # --- the latent cache: each image and its flip through the VAE once
    if state.step < config.steps:
        resolution = config.resolution or native_resolution(unet, vae)
        cache = encode_latent_cache(vae, prepare_images(images, resolution), config.flip_p)
    unet_dtype = next(unet.parameters()).dtype
    n_train = int(scheduler.config.num_train_timesteps)
    lr = optimizer.param_groups[0]["lr"]

    for step in range(state.step, config.steps):
        check_cancel(cancel, "textual inversion")
        draws = draw_step(generator, order, config.batch_size, len(input_ids), config.flip_p,
                          cache.mean.shape[2:], n_train)
        latents = cache.sample(draws.index.to(device), draws.flip.to(device), draws.latent_noise)
        noise, timesteps = draws.noise.to(device), draws.timestep.to(device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        hidden = encoder(input_ids[draws.template].to(device))[0]
        prediction = predict_noise(unet, noisy.to(unet_dtype), timesteps, hidden.to(unet_dtype))
        loss = F.mse_loss(prediction.float(), diffusion_target(scheduler, latents, noise, timesteps).float())
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TrainingError(
                f"textual inversion of {placeholder!r}: the loss became {value} at step {step + 1}; "
                f"stopped, the last good state (step {step}) is kept. Try a lower learning rate or fp32."
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward(inputs=[row])   # the row only: no .grad lands on the caller's weights
        optimizer.step()
        if not bool(torch.isfinite(row).all()):
            raise TrainingError(f"textual inversion of {placeholder!r}: the embedding became non-finite at step "
                                f"{step + 1}; the last good state (step {step}) is kept.")
        losses.append(value)
        _record(state, step + 1, row, optimizer, generator, order, losses)
        emit(progress, stage, step + 1, config.steps, f"{placeholder} step {step + 1}/{config.steps}",
             loss=value, lr=lr)

    return LearnedToken(placeholder, initializer_token, row.detach()[0].float().cpu().clone(), tuple(losses))


def _record(state: TextualInversionState, step: int, row, optimizer, generator, order: _ImageOrder,
            losses: list[float]) -> None:
    """Snapshot the run into `state` (copies: later steps change the live tensors in place)."""
    state.step = step
    state.embedding = row.detach()[0].float().cpu().clone()
    state.optimizer = _cpu_copy(optimizer.state_dict())
    state.generator = generator.get_state()
    state.order, state.cursor = list(order.order), order.cursor
    state.losses = list(losses)


def _restore(state: TextualInversionState, placeholder: str, initializer: str, n_images: int, row, optimizer,
             generator, order: _ImageOrder, losses: list[float]) -> None:
    """Load `state` into the live run after checking it belongs to this run."""
    if (state.placeholder, state.initializer, state.n_images) != (placeholder, initializer, n_images):
        raise ConfigError(
            f"the saved textual-inversion state is for {state.placeholder!r} from {state.initializer!r} on "
            f"{state.n_images} images, not {placeholder!r} from {initializer!r} on {n_images}; start a new run."
        )
    if state.embedding is None or state.embedding.shape[-1] != row.shape[-1]:
        raise ConfigError("the saved textual-inversion state has no embedding of this text encoder's width.")
    with torch.no_grad():
        row.copy_(state.embedding.reshape(1, -1).to(row.device, row.dtype))
    optimizer.load_state_dict(copy.deepcopy(state.optimizer))
    generator.set_state(state.generator.clone())
    order.order, order.cursor = list(state.order), state.cursor
    losses[:] = list(state.losses)


def _cpu_copy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _cpu_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu_copy(v) for v in value)
    return value
