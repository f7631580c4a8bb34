"""Train the mini world's text-to-image model and save it as a Stable Diffusion pipeline folder.

The recipe, step by step (all on CPU, deterministic for a seed and a thread count):

1. render ``num_images`` scenes once with their captions (``world.sample_dataset``);
2. train the ``AutoencoderKL`` on the renders (L1 + MSE reconstruction + a small KL term), then
   set ``scaling_factor`` = 1 / std of the latents, as SD does (the decoder is sharpened in step 5);
3. encode every render to its latent posterior once (mean and std are cached);
4. train the ``UNet2DConditionModel`` with the epsilon-prediction DDPM loss (Min-SNR weighted)
   jointly with the ``CLIPTextModel``, on cached latents with large batches; 10% of captions are
   dropped to the empty prompt for classifier-free guidance; an auxiliary head (not saved) makes
   the text encoder's pooled state predict which concepts the caption names; EMA weights are saved;
5. fine-tune the decoder alone (encoder frozen: the latent space does not move), with an extra L1
   on image gradients that keeps thin details such as a cigarette (SD's ft-MSE decoder, in small);
6. round the decoder to the saved precision (float16), so that step 7 starts from what a saved
   folder holds;
7. refine the decoder once more with the cigarette's pixels weighted up
   (:func:`detail_refinement_stage`; ``python -m recare.miniworld.generator OUT --details-only``
   runs this step alone on a saved pipeline folder);
8. save ``StableDiffusionPipeline(vae, text_encoder, tokenizer, unet, DDIMScheduler)`` with
   ``save_pretrained`` (safety checker off, weights in float16, the text encoder's config asking
   for float32 so that a plain ``from_pretrained(folder)`` runs on the CPU) plus
   ``recare_training.json`` (the recipe, seed, timings).

Steps 5-7 need only the trained autoencoder, not the UNet, so ``recare.miniworld.train`` runs
them in its own process beside step 4 (:func:`train_generator_part`, :func:`assemble_generator`);
:func:`train_generator` runs all of them in one process. Both give the same bytes.

``python -m recare.miniworld.generator OUT_DIR [--smoke]`` runs it; the bundled weights live in
``checkpoints/mini-world/pipeline``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import world
from .generator_models import (
    GeneratorRecipe, build_scheduler, build_text_encoder, build_unet, build_vae, scheduler_kwargs,
)
from .clip import load_as_float32
from .tokenizer import CONTEXT_LENGTH, build_clip_tokenizer, write_vocab_files
from ..errors import TrainingError
from ..models.construction import building_modules
from ..atomic import atomic_save, atomic_write_dir, atomic_write_text
from ..progress import ProgressCallback, TqdmProgress, emit, listening

PIPELINE_DIRNAME = "pipeline"
TRAINING_RECORD = "recare_training.json"


class GeneratorTrainingError(TrainingError):  # a RecareError and a RuntimeError
    """Raised when the generator recipe cannot run (bad arguments, unwritable output folder)."""


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------
def _to_unit_range(images_uint8: np.ndarray) -> torch.Tensor:
    """uint8 (n, 64, 64, 3) -> float32 (n, 3, 64, 64) in [-1, 1] (SD's VAE input range)."""
    x = torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def _cosine_lr(step: int, total: int, warmup: int) -> float:
    """Linear warmup then cosine decay to 5% of the peak (a multiplier of the base lr)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress))


@contextmanager
def _torch_threads(n: int):
    """Run the block with ``n`` torch CPU threads, then restore the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _atomic_torch_save(payload: dict, path: Path) -> None:
    """``torch.save`` under a temporary name, then rename: a reader never sees half a file."""
    atomic_save(path, lambda tmp: torch.save(payload, tmp))


def _ema_update(ema: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    with torch.no_grad():
        torch._foreach_lerp_(ema, params, 1.0 - decay)


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Captions -> (n, 77) int64 ids padded like the SD pipeline pads prompts."""
    return tokenizer(captions, padding="max_length", max_length=CONTEXT_LENGTH, truncation=True,
                     return_tensors="pt").input_ids


def caption_concepts(captions: list[str]) -> torch.Tensor:
    """(n, len(CONCEPTS)) float multi-hot of the concepts each caption names (the auxiliary target)."""
    out = torch.zeros(len(captions), len(world.CONCEPTS))
    for i, text in enumerate(captions):
        for name in world.prompt_concepts(text):
            out[i, world.CONCEPT_INDEX[name]] = 1.0
    return out


# ---------------------------------------------------------------------------------------------
# Stage 1: the autoencoder
# ---------------------------------------------------------------------------------------------
def _random_flipped_batch(images: np.ndarray, batch: int, generator: torch.Generator) -> torch.Tensor:
    """A random batch of renders in [-1, 1], each flipped left-right with probability 1/2."""
    idx = torch.randint(0, len(images), (batch,), generator=generator)
    x = _to_unit_range(images[idx.numpy()])
    flip = torch.rand(len(x), generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def _callback(progress: bool | ProgressCallback | None) -> ProgressCallback | None:
    """The library's progress callback for a loop: a callback as it is, True: tqdm bars, False/None: none."""
    return progress if callable(progress) else (TqdmProgress() if progress else None)


def _step(loss: torch.Tensor, opt, sched, params: list, losses: list[float], progress: ProgressCallback | None,
          stage: str, total: int) -> None:
    """One clipped optimiser step; records the loss and reports the step with its running mean."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    losses.append(float(loss.detach()))
    emit(progress, stage, len(losses), total, loss=float(np.mean(losses[-50:])))


def train_vae(vae, images: np.ndarray, recipe: GeneratorRecipe, generator: torch.Generator, progress: bool | ProgressCallback | None = True) -> list[float]:
    """Train ``vae`` on uint8 renders; returns the loss curve (one value per step).

    Args:
        vae: an ``AutoencoderKL`` (trained in place).
        images: uint8 (n, 64, 64, 3) renders.
        recipe: sizes and knobs (``vae_steps``, ``vae_batch``, ``vae_lr``, ``vae_kl_weight``).
        generator: torch CPU generator (batches, flips, posterior samples).
        progress: the library's progress callback (`recare.progress`; True: tqdm bars, False: none).
    """
    vae.train()
    params = list(vae.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.vae_lr, weight_decay=0.0)
    warmup = max(1, recipe.vae_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, recipe.vae_steps, warmup))
    losses = []
    progress = _callback(progress)
    for _ in range(recipe.vae_steps):
        x = _random_flipped_batch(images, recipe.vae_batch, generator)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        recon = vae.decode(z).sample
        # reconstruction: per-pixel L1 + MSE; KL: per-image sum (SD's convention), weighted small
        loss = (recon - x).abs().mean() + (recon - x).pow(2).mean() + recipe.vae_kl_weight * posterior.kl().mean()
        _step(loss, opt, sched, params, losses, progress, "autoencoder", recipe.vae_steps)
    vae.eval()
    return losses


def _edge_l1(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """L1 between horizontal and vertical finite differences: keeps thin details (a cigarette) sharp.

    ``weight`` (n, 1, h, w), optional: per-pixel weights; a difference takes the larger of its two
    pixels' weights, and each direction is a weighted mean.
    """
    dx = (a[..., :, 1:] - a[..., :, :-1]) - (b[..., :, 1:] - b[..., :, :-1])
    dy = (a[..., 1:, :] - a[..., :-1, :]) - (b[..., 1:, :] - b[..., :-1, :])
    if weight is None:
        return dx.abs().mean() + dy.abs().mean()
    wx = torch.maximum(weight[..., :, 1:], weight[..., :, :-1])
    wy = torch.maximum(weight[..., 1:, :], weight[..., :-1, :])
    return (wx * dx.abs()).mean() / wx.mean() + (wy * dy.abs()).mean() / wy.mean()


def refine_decoder(vae, images: np.ndarray, recipe: GeneratorRecipe, generator: torch.Generator, progress: bool | ProgressCallback | None = True) -> list[float]:
    """Fine-tune only the decoder (encoder frozen, so the latent space the UNet learns is unchanged).

    As Stable Diffusion's ft-EMA/ft-MSE decoders: sharper images at no cost to the diffusion model.
    Loss: L1 + MSE + L1 of image gradients, on decodes of posterior samples.

    Args:
        vae: a trained ``AutoencoderKL`` (decoder and post_quant_conv trained in place).
        images: uint8 (n, 64, 64, 3) renders.
        recipe: ``decoder_steps``, ``vae_batch``, ``decoder_lr``, ``edge_weight``.
        generator: torch CPU generator.
        progress: the library's progress callback (`recare.progress`; True: tqdm bars, False: none).
    """
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.decoder_lr, weight_decay=0.0)
    warmup = max(1, recipe.decoder_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, recipe.decoder_steps, warmup))
    vae.eval()
    vae.decoder.train()
    losses = []
    progress = _callback(progress)
    for _ in range(recipe.decoder_steps):
        x = _random_flipped_batch(images, recipe.vae_batch, generator)
        with torch.no_grad():
            posterior = vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        recon = vae.decode(z).sample
        loss = (recon - x).abs().mean() + (recon - x).pow(2).mean() + recipe.edge_weight * _edge_l1(recon, x)
        _step(loss, opt, sched, params, losses, progress, "decoder refinement", recipe.decoder_steps)
    vae.eval()
    return losses


@torch.no_grad()
def encode_latents(vae, images: np.ndarray, batch_size: int = 256, progress: bool | ProgressCallback | None = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std (unscaled) of every render: two float32 (n, 4, 8, 8) tensors."""
    means, stds = [], []
    progress = _callback(progress)
    starts = range(0, len(images), batch_size)
    for k, start in enumerate(starts):
        dist = vae.encode(_to_unit_range(images[start : start + batch_size])).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
        emit(progress, "encode latents", k + 1, len(starts))
    return torch.cat(means), torch.cat(stds)


# ---------------------------------------------------------------------------------------------
# Stage 2: UNet + text encoder
# ---------------------------------------------------------------------------------------------
def train_unet_and_text(
    unet, text_encoder, latents_mean: torch.Tensor, latents_std: torch.Tensor, input_ids: torch.Tensor,
    concept_targets: torch.Tensor, empty_ids: torch.Tensor, recipe: GeneratorRecipe, generator: torch.Generator,
    progress: bool | ProgressCallback | None = True,
) -> list[float]:
    """Joint epsilon-prediction training of ``unet`` and ``text_encoder``; EMA weights are copied in at the end.

    Args:
        unet, text_encoder: the models (trained in place; they end holding their EMA weights).
        latents_mean, latents_std: cached posteriors, already multiplied by the VAE scaling factor.
        input_ids: (n, 77) caption ids; concept_targets: (n, C) auxiliary multi-hot targets.
        empty_ids: (77,) ids of the empty prompt (the unconditional caption).
        recipe: sizes and knobs; generator: torch CPU generator.
        progress: the library's progress callback (`recare.progress`; True: tqdm bars, False: none).

    Returns:
        The diffusion-loss curve (one value per step).
    """
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler(**scheduler_kwargs())
    alphas_cumprod = noise_scheduler.alphas_cumprod
    snr = alphas_cumprod / (1.0 - alphas_cumprod)
    head = torch.nn.Linear(text_encoder.config.hidden_size, concept_targets.shape[1])
    torch.nn.init.zeros_(head.bias)

    unet.train()
    text_encoder.train()
    groups = [
        {"params": list(unet.parameters()), "lr": recipe.unet_lr, "weight_decay": 0.01},
        {"params": list(text_encoder.parameters()) + list(head.parameters()), "lr": recipe.text_lr, "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, recipe.unet_steps, recipe.warmup_steps))
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema = [p.detach().clone() for p in params]

    n = len(latents_mean)
    order = torch.randperm(n, generator=generator)
    cursor = 0
    losses = []
    progress = _callback(progress)
    for step in range(recipe.unet_steps):
        if cursor + recipe.unet_batch > n:  # next epoch
            order, cursor = torch.randperm(n, generator=generator), 0
        idx = order[cursor : cursor + recipe.unet_batch]
        cursor += recipe.unet_batch
        b = len(idx)
        # clean latents: a fresh sample of each cached posterior
        z0 = latents_mean[idx] + latents_std[idx] * torch.randn(latents_mean[idx].shape, generator=generator)
        # captions, ~10% replaced by the empty prompt (classifier-free guidance)
        drop = torch.rand(b, generator=generator) < recipe.caption_dropout
        ids = torch.where(drop[:, None], empty_ids[None, :], input_ids[idx])
        out = text_encoder(ids)
        # forward diffusion at a uniform timestep, then predict the noise (Eq.: DDPM epsilon loss)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (b,), generator=generator)
        noise = torch.randn(z0.shape, generator=generator)
        zt = noise_scheduler.add_noise(z0, noise, t)
        pred = unet(zt, t, encoder_hidden_states=out.last_hidden_state).sample
        per_sample = (pred - noise).pow(2).mean(dim=(1, 2, 3))
        if recipe.min_snr_gamma > 0:  # Min-SNR-gamma weights for epsilon prediction: min(snr, g) / snr
            weight = torch.clamp(snr[t], max=recipe.min_snr_gamma) / snr[t]
            diffusion_loss = (weight * per_sample).mean()
        else:
            diffusion_loss = per_sample.mean()
        loss = diffusion_loss
        if recipe.aux_weight > 0 and (~drop).any():
            logits = head(out.pooler_output[~drop])
            loss = loss + recipe.aux_weight * F.binary_cross_entropy_with_logits(logits, concept_targets[idx][~drop])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        _ema_update(ema, params, min(recipe.ema_decay, (1 + step) / (10 + step)))
        losses.append(float(per_sample.detach().mean()))
        emit(progress, "unet + text encoder", step + 1, recipe.unet_steps, loss=float(np.mean(losses[-50:])))
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    unet.eval()
    text_encoder.eval()
    return losses


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------
def assemble_pipeline(vae, text_encoder, tokenizer, unet):
    """Wrap the parts in a ``StableDiffusionPipeline`` exactly like SD v1.4 (no safety checker)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=build_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _save_pretrained_over(model, folder: Path, fp16: bool, finish=None) -> Path:
    """``save_pretrained`` a copy of ``model`` into a temporary sibling of ``folder``, then swap
    it in for ``folder`` (``recare.atomic.atomic_write_dir``: a failure leaves the old folder as it was).

    Args:
        model: a diffusers pipeline or model (not modified).
        folder: destination (replaced if it exists).
        fp16: store the weights in float16.
        finish: optional ``finish(tmp)`` that adds files before the swap.
    """
    import copy

    folder = Path(folder)
    with atomic_write_dir(folder) as tmp:
        to_save = copy.deepcopy(model)
        if fp16:
            to_save.to(torch.float16)
        to_save.save_pretrained(tmp, safe_serialization=True)
        if finish is not None:
            finish(tmp)
    return folder


def save_pipeline(pipe, folder: Path, record: dict, fp16: bool = True) -> Path:
    """``save_pretrained`` into a temporary sibling, then swap it in for ``folder`` atomically.

    Args:
        pipe: the assembled pipeline (its modules are not modified).
        folder: destination (replaced if it exists).
        record: JSON-able training record written as ``recare_training.json`` inside the folder.
        fp16: store the weights in float16.
    """
    def finish(tmp: Path) -> None:
        write_vocab_files(tmp / "tokenizer")  # vocab.json + merges.txt: loadable by slow tokenizers too
        if fp16:  # plain from_pretrained(folder) must give a float32 text encoder beside the float32 UNet
            load_as_float32(tmp / "text_encoder" / "config.json")
        (tmp / TRAINING_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

    return _save_pretrained_over(pipe, folder, fp16, finish)


# ---------------------------------------------------------------------------------------------
# Step 7 of the recipe: detail refinement of the decoder
# ---------------------------------------------------------------------------------------------
def smoking_masks(scenes: list) -> np.ndarray:
    """(n, 64, 64) bool: the pixels the smoking thing changes (cigarette, tip, smoke).

    A scene with smoking is rendered again without it; for a person who does not smoke, the same
    is done by adding the smoking thing, so the loss also weights the place where a cigarette
    would be (the decoder must not paint smoke there either). Other scenes get an empty mask.
    """
    import dataclasses

    masks = np.zeros((len(scenes), world.SIZE, world.SIZE), dtype=bool)
    for i, scene in enumerate(scenes):
        if scene.has("smoking"):
            other = dataclasses.replace(scene, things=tuple(t for t in scene.things if t.kind != "smoking"))
        elif scene.has("person"):
            other = dataclasses.replace(scene, things=scene.things + (world.Thing("smoking", 0.0, 0.0),))
        else:
            continue
        a = world.render(scene).astype(np.int16)
        masks[i] = np.abs(a - world.render(other).astype(np.int16)).max(axis=-1) > 0
    return masks


def detail_dataset(n: int, seed: int, smoking_share: float) -> tuple[np.ndarray, np.ndarray]:
    """``n`` renders (a ``smoking_share`` of them with smoking) and their :func:`smoking_masks`."""
    rng = np.random.default_rng(seed)
    scenes = [world.sample_scene(rng, include=("smoking",)) if rng.random() < smoking_share else world.sample_scene(rng)
              for _ in range(n)]
    return np.stack([world.render(s) for s in scenes]), smoking_masks(scenes)


def _round_to_saved_precision(model, recipe: GeneratorRecipe) -> None:
    """Round ``model``'s weights to float16 and back when the recipe saves in float16, so a stage
    that follows starts from exactly the weights a saved folder holds."""
    if recipe.save_fp16:
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.half().float())


def detail_refinement_stage(vae, recipe: GeneratorRecipe, seed: int = 0, progress: bool | ProgressCallback | None = True) -> dict:
    """Step 7 in memory: fine-tune ``vae``'s decoder with the smoking pixels weighted up.

    Measured before this stage existed: an encode/decode of smoking renders kept the cigarette
    (by the oracle) in 30% of 64 renders, and "a photo of a smoking person" showed it in 9 of 64
    images, although the UNet's latents do carry it (the same latents decoded by a refined
    decoder show it far more often). The loss is step 5's (L1 + MSE + L1 of image gradients)
    with the smoking pixels weighted ``detail_mask_weight`` times (see :func:`smoking_masks`);
    the encoder stays frozen, so the UNet's latent space does not move.

    Args:
        vae: an ``AutoencoderKL`` in float32 (its decoder and post_quant_conv are trained in place).
        recipe: ``detail_*``, ``vae_batch``, ``edge_weight``.
        seed: seed of the renders (``data_seed + seed + 5``) and of the batches.
        progress: the library's progress callback (`recare.progress`; True: tqdm bars, False: none).

    Returns:
        The record of the stage (recipe part, timings, final loss).
    """
    t0 = time.perf_counter()
    images, masks = detail_dataset(recipe.detail_images, recipe.data_seed + seed + 5, recipe.detail_smoking_share)
    render_s = time.perf_counter() - t0
    vae.requires_grad_(False)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=recipe.detail_lr, weight_decay=0.0)
    warmup = max(1, recipe.detail_steps // 60)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, recipe.detail_steps, warmup))
    generator = torch.Generator().manual_seed(seed + 5)
    stacked = np.concatenate([images, masks[..., None].astype(np.uint8) * 255], axis=-1)  # flip both alike
    losses: list[float] = []
    t0 = time.perf_counter()
    vae.eval()
    vae.decoder.train()
    progress = _callback(progress)
    for _ in range(recipe.detail_steps):
        batch = _random_flipped_batch(stacked, recipe.vae_batch, generator)
        x, mask = batch[:, :3], (batch[:, 3:] > 0).float()
        weight = 1.0 + recipe.detail_mask_weight * F.max_pool2d(mask, 3, 1, 1)  # dilated by 1 px
        with torch.no_grad():
            posterior = vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        recon = vae.decode(z).sample
        mean_w = weight.mean()
        loss = (((recon - x).abs() + (recon - x).pow(2)) * weight).mean() / mean_w
        loss = loss + recipe.edge_weight * _edge_l1(recon, x, weight)
        _step(loss, opt, sched, params, losses, progress, "decoder detail refinement", recipe.detail_steps)
    vae.eval()
    vae.requires_grad_(True)
    return {"seed": seed, "recipe": {k: v for k, v in recipe.to_dict().items() if k.startswith("detail_")},
            "timings_s": {"render_s": round(render_s, 1), "train_s": round(time.perf_counter() - t0, 1)},
            "final_loss": float(np.mean(losses[-50:])), "threads": recipe.num_threads}


def refine_decoder_details(folder: str | os.PathLike, seed: int = 0, recipe: GeneratorRecipe | None = None,
                           progress: bool | ProgressCallback | None = True) -> dict:
    """Step 7 on a saved pipeline folder (``--details-only``): :func:`detail_refinement_stage`
    on its ``vae/``, which is then replaced; the UNet and the text encoder are not touched. It
    starts from the weights as saved, as the full recipe does.

    Args:
        folder: a pipeline folder written by :func:`save_pipeline`.
        seed: the stage's seed; recipe: ``detail_*``, ``num_threads``, ``save_fp16``; progress: a
            `recare.progress` callback (True: tqdm bars).

    Returns:
        What was recorded in the folder's ``recare_training.json`` under ``"detail_refinement"``.
    """
    from diffusers import AutoencoderKL

    recipe = recipe or GeneratorRecipe()
    folder = Path(folder)
    with _torch_threads(recipe.num_threads), listening(progress) as progress:
        with building_modules():
            vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch.float32).float().eval()
        detail = detail_refinement_stage(vae, recipe, seed, progress)
        _save_pretrained_over(vae, folder / "vae", fp16=recipe.save_fp16)
    record_file = folder / TRAINING_RECORD
    record = json.loads(record_file.read_text(encoding="utf-8")) if record_file.is_file() else {}
    record["detail_refinement"] = detail
    atomic_write_text(record_file, json.dumps(record, indent=2) + "\n")
    return detail


# ---------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------
STAGE1_FIELDS = ("num_images", "data_seed", "vae_channels", "vae_layers_per_block", "vae_norm_groups", "vae_steps",
                 "vae_batch", "vae_lr", "vae_kl_weight", "num_threads")


def _stage1_cache_file(cache_dir, recipe: GeneratorRecipe, seed: int) -> Path | None:
    if cache_dir is None:
        return None
    import hashlib

    key = json.dumps({k: recipe.to_dict()[k] for k in STAGE1_FIELDS} | {"seed": seed}, sort_keys=True)
    return Path(cache_dir) / f"generator-stage1-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"


def _autoencoder_stage(recipe: GeneratorRecipe, seed: int, progress: ProgressCallback | None, cache_file: Path | None, timings: dict):
    """Steps 1-3: renders -> autoencoder -> cached latent posteriors (read from ``cache_file`` when
    it exists, written to it otherwise). Returns ``(vae, captions, mean, std, vae_loss, images)``;
    ``images`` is None when the cache was read."""
    if cache_file is not None and cache_file.is_file():
        cached = torch.load(cache_file, weights_only=True)
        vae = build_vae(recipe)
        vae.load_state_dict(cached["vae"])
        vae.eval()
        timings["stage1_cached"] = 1.0
        return vae, cached["captions"], cached["mean"], cached["std"], float(cached["vae_loss"]), None
    t0 = time.perf_counter()
    images, captions, _ = world.sample_dataset(recipe.num_images, seed=recipe.data_seed + seed)
    timings["render_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    torch.manual_seed(seed)  # parameter initialisation
    vae = build_vae(recipe)
    vae_loss = float(np.mean(train_vae(vae, images, recipe, torch.Generator().manual_seed(seed), progress)[-50:]))
    timings["vae_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    mean, std = encode_latents(vae, images, progress=progress)
    timings["encode_s"] = time.perf_counter() - t0
    if cache_file is not None:  # also how the two-process recipe hands the autoencoder over
        _atomic_torch_save({"vae": vae.state_dict(), "captions": captions, "mean": mean, "std": std,
                            "vae_loss": vae_loss}, cache_file)
    return vae, captions, mean, std, vae_loss, images


def _unet_stage(recipe: GeneratorRecipe, seed: int, progress: ProgressCallback | None, captions, mean, std, timings: dict):
    """Step 4: the UNet and the text encoder on the cached latents. Returns ``(unet, text_encoder,
    scaling_factor, final_loss)``; the scaling factor is SD's 1 / std of the sampled latents."""
    t0 = time.perf_counter()
    generator = torch.Generator().manual_seed(seed + 1)
    scaling = float(1.0 / (mean + std * torch.randn(mean.shape, generator=generator)).std())
    tokenizer = build_clip_tokenizer()
    input_ids = tokenize(tokenizer, captions)
    empty_ids = tokenize(tokenizer, [""])[0]
    targets = caption_concepts(captions)
    torch.manual_seed(seed + 1)  # parameter initialisation
    text_encoder = build_text_encoder(recipe)
    unet = build_unet(recipe)
    losses = train_unet_and_text(unet, text_encoder, mean * scaling, std * scaling, input_ids, targets, empty_ids,
                                 recipe, generator, progress)
    timings["unet_s"] = time.perf_counter() - t0
    return unet, text_encoder, scaling, float(np.mean(losses[-50:]))


def _sharpen_decoder_stage(vae, recipe: GeneratorRecipe, seed: int, progress: ProgressCallback | None, timings: dict, images=None):
    """Step 5 (needs only the trained autoencoder, not the UNet) on ``images``, the training
    renders, rendered again when None. Returns its final loss, or None when the recipe skips it."""
    t0 = time.perf_counter()
    vae_loss = None
    if recipe.decoder_steps > 0:
        if images is None:
            images, _, _ = world.sample_dataset(recipe.num_images, seed=recipe.data_seed + seed)
        vae_loss = float(np.mean(refine_decoder(vae, images, recipe, torch.Generator().manual_seed(seed + 2), progress)[-50:]))
    timings["decoder_s"] = time.perf_counter() - t0
    return vae_loss


def _detail_stage(vae, recipe: GeneratorRecipe, seed: int, progress: ProgressCallback | None) -> dict | None:
    """Steps 6-7: round the decoder to the saved precision (step 7 starts from the weights as a
    saved folder holds them), then the detail refinement. Returns its record, or None when skipped."""
    if recipe.detail_steps <= 0:
        return None
    _round_to_saved_precision(vae, recipe)
    return detail_refinement_stage(vae, recipe, seed, progress)


def _save_generator(out_dir: Path, vae, text_encoder, unet, scaling: float, record: dict, recipe: GeneratorRecipe) -> Path:
    """Step 8: set the scaling factor, assemble the pipeline and save it as `out_dir/pipeline`."""
    vae.register_to_config(scaling_factor=scaling)
    pipe = assemble_pipeline(vae, text_encoder, build_clip_tokenizer(), unet)
    return save_pipeline(pipe, out_dir / PIPELINE_DIRNAME, record, fp16=recipe.save_fp16)


def _record(seed: int, smoke: bool, recipe: GeneratorRecipe, scaling: float, timings: dict, vae_loss: float,
            decoder_loss: float | None, unet_loss: float, detail: dict | None, parallel: bool) -> dict:
    """``recare_training.json``; the final autoencoder loss is step 5's when step 5 ran."""
    record = {
        "seed": seed, "smoke": smoke, "recipe": recipe.to_dict(), "scaling_factor": scaling,
        "timings_s": {k: round(v, 1) for k, v in timings.items()}, "threads": recipe.num_threads,
        "final_vae_loss": decoder_loss if decoder_loss is not None else vae_loss, "final_unet_loss": unet_loss,
        "torch": torch.__version__, "parallel": parallel,
    }
    if detail is not None:
        record["detail_refinement"] = detail
    return record


def _prepare(out_dir, smoke: bool, recipe: GeneratorRecipe | None):
    """The recipe to use (smoke or full unless given) and the created output folder."""
    recipe = recipe or (GeneratorRecipe.smoke() if smoke else GeneratorRecipe())
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GeneratorTrainingError(f"cannot create output folder {out_dir}: {exc}; pick a writable path.") from exc
    return recipe, out_dir


def train_generator(
    out_dir: str | os.PathLike, seed: int = 0, smoke: bool = False, progress: bool | ProgressCallback | None = True,
    recipe: GeneratorRecipe | None = None, cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Train the mini-world text-to-image model on CPU, in this process, and save it as ``out_dir/pipeline``.

    Args:
        out_dir: parent folder (e.g. ``checkpoints/mini-world``); the pipeline goes to ``out_dir/pipeline``.
        seed: seed of everything (renders use ``recipe.data_seed + seed``); same seed and thread
            count give the same weights, and the same as the two-process recipe (:func:`train_generator_part`).
        smoke: tiny sizes and a few steps (seconds), for tests.
        progress: the library's progress callback (`recare.progress`; True: tqdm bars, False: none).
        recipe: override the sizes/knobs (default: ``GeneratorRecipe()`` or ``GeneratorRecipe.smoke()``).
        cache_dir: optional folder keeping the trained autoencoder and the encoded latents, keyed by
            the seed and the data/autoencoder part of the recipe, so that re-running with other UNet
            settings skips steps 1-3 (the result is identical to a full run).

    Returns:
        The pipeline folder, loadable with ``StableDiffusionPipeline.from_pretrained``.

    Raises:
        GeneratorTrainingError: the output folder cannot be created.
    """
    recipe, out_dir = _prepare(out_dir, smoke, recipe)
    timings: dict[str, float] = {}
    with _torch_threads(recipe.num_threads), listening(progress) as progress:
        vae, captions, mean, std, vae_loss, images = _autoencoder_stage(
            recipe, seed, progress, _stage1_cache_file(cache_dir, recipe, seed), timings)
        unet, text_encoder, scaling, unet_loss = _unet_stage(recipe, seed, progress, captions, mean, std, timings)
        decoder_loss = _sharpen_decoder_stage(vae, recipe, seed, progress, timings, images)
        del images  # the training renders (~390 MB at full size): step 7 renders its own
        detail = _detail_stage(vae, recipe, seed, progress)
        record = _record(seed, smoke, recipe, scaling, timings, vae_loss, decoder_loss, unet_loss, detail, parallel=False)
        return _save_generator(out_dir, vae, text_encoder, unet, scaling, record, recipe)


# ---------------------------------------------------------------------------------------------
# The same recipe in two processes (``train.py`` runs the decoder part after the oracle and the
# mini CLIP, beside the UNet part): the UNet gets the time the decoder stages used to take
# ---------------------------------------------------------------------------------------------
PARTS_DIRNAME = ".generator-parts"
UNET_PART, DECODER_PART = "unet.pt", "vae.pt"


def parts_dir(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / PARTS_DIRNAME


def _wait_for(path: Path, alive, what: str, poll_s: float = 2.0) -> None:
    """Block until ``path`` exists; ``alive()`` False before that means its producer died."""
    while not path.is_file():
        if not alive():
            if path.is_file():
                return
            raise GeneratorTrainingError(f"the {what} was never written ({path}): the process making it stopped.")
        time.sleep(poll_s)


def train_generator_part(out_dir: str | os.PathLike, part: str, seed: int = 0, smoke: bool = False,
                         progress: bool | ProgressCallback | None = True, recipe: GeneratorRecipe | None = None, alive=lambda: True) -> Path:
    """One half of the two-process recipe, written to ``out_dir/.generator-parts/``.

    ``part="unet"``: steps 1-4 (the autoencoder is shared through the stage-1 file as soon as it
    is trained). ``part="decoder"``: waits for that file (``alive()`` tells whether its producer
    still runs), then steps 5 and 7. :func:`assemble_generator` joins the two. Every step keeps its
    own seed, so the weights equal :func:`train_generator`'s.
    """
    recipe, out_dir = _prepare(out_dir, smoke, recipe)
    if part not in ("unet", "decoder"):
        raise GeneratorTrainingError(f"unknown generator part {part!r}: choose 'unet' or 'decoder'.")
    folder = parts_dir(out_dir)
    stage1 = _stage1_cache_file(folder, recipe, seed)
    timings: dict[str, float] = {}
    with _torch_threads(recipe.num_threads), listening(progress) as progress:
        if part == "unet":
            _, captions, mean, std, vae_loss, _ = _autoencoder_stage(recipe, seed, progress, stage1, timings)
            unet, text_encoder, scaling, unet_loss = _unet_stage(recipe, seed, progress, captions, mean, std, timings)
            path = folder / UNET_PART
            _atomic_torch_save({"unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(), "scaling": scaling,
                                "unet_loss": unet_loss, "vae_loss": vae_loss, "timings": timings}, path)
            return path
        _wait_for(stage1, alive, "trained autoencoder")
        vae = build_vae(recipe)
        vae.load_state_dict(torch.load(stage1, weights_only=True)["vae"])
        vae.eval()
        decoder_loss = _sharpen_decoder_stage(vae, recipe, seed, progress, timings)
        detail = _detail_stage(vae, recipe, seed, progress)
        path = folder / DECODER_PART
        _atomic_torch_save({"vae": vae.state_dict(), "decoder_loss": decoder_loss, "detail": detail, "timings": timings},
                           path)
        return path


def assemble_generator(out_dir: str | os.PathLike, seed: int = 0, smoke: bool = False,
                       recipe: GeneratorRecipe | None = None) -> Path:
    """Join the two parts into ``out_dir/pipeline`` (as :func:`train_generator` saves it), then
    remove ``out_dir/.generator-parts``."""
    recipe, out_dir = _prepare(out_dir, smoke, recipe)
    folder = parts_dir(out_dir)
    missing = [name for name in (UNET_PART, DECODER_PART) if not (folder / name).is_file()]
    if missing:
        raise GeneratorTrainingError(f"generator parts missing in {folder}: {missing}; run both parts first.")
    unet_part = torch.load(folder / UNET_PART, weights_only=True)
    vae_part = torch.load(folder / DECODER_PART, weights_only=True)
    vae, text_encoder, unet = build_vae(recipe), build_text_encoder(recipe), build_unet(recipe)  # weights loaded next
    vae.load_state_dict(vae_part["vae"])
    text_encoder.load_state_dict(unet_part["text_encoder"])
    unet.load_state_dict(unet_part["unet"])
    for model in (vae, text_encoder, unet):
        model.eval()
    timings = {**unet_part["timings"], **vae_part["timings"]}
    record = _record(seed, smoke, recipe, unet_part["scaling"], timings, unet_part["vae_loss"], vae_part["decoder_loss"],
                     unet_part["unet_loss"], vae_part["detail"], parallel=True)
    saved = _save_generator(out_dir, vae, text_encoder, unet, unet_part["scaling"], record, recipe)
    shutil.rmtree(folder, ignore_errors=True)
    return saved


def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m recare.miniworld.generator OUT_DIR [--seed N] [--smoke] [--part unet|decoder|assemble]``."""
    import argparse

    parser = argparse.ArgumentParser(description=train_generator.__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--cache-dir", type=Path, default=None, help="keep/reuse the autoencoder + latents here")
    parser.add_argument("--details-only", action="store_true",
                        help="run only step 7 (decoder detail refinement) on the pipeline folder OUT_DIR/pipeline")
    parser.add_argument("--part", choices=("unet", "decoder", "assemble"), default=None,
                        help="one half of the two-process recipe (train.py runs them), or joining them")
    parser.add_argument("--world-settings", default=None, metavar="JSON",
                        help="world settings to train with (train.py passes its own; default: the installed world's)")
    args = parser.parse_args(argv)
    if args.world_settings:
        world.apply_settings(json.loads(args.world_settings))
    print(f"world settings: {json.dumps(world.settings())}", flush=True)  # the log says which world it trained
    recipe = GeneratorRecipe.smoke() if args.smoke else GeneratorRecipe()
    if args.details_only:
        print(json.dumps(refine_decoder_details(args.out_dir / PIPELINE_DIRNAME, seed=args.seed, recipe=recipe), indent=2))
    elif args.part == "assemble":
        print(assemble_generator(args.out_dir, seed=args.seed, smoke=args.smoke, recipe=recipe))
    elif args.part is not None:
        print(train_generator_part(args.out_dir, args.part, seed=args.seed, smoke=args.smoke, recipe=recipe))
    else:
        print(train_generator(args.out_dir, seed=args.seed, smoke=args.smoke, cache_dir=args.cache_dir))


if __name__ == "__main__":
    main()
