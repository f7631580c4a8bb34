"""Training speed: ours against a faithful official-style loop, side by side, printed as one table.

    python -m benchmarks.train_speed [--quick] [--worlds mini,sd14] [--device auto]

For one ESD iteration, one textual-inversion step and one stage-2 iteration, on the same model,
the same seed and the same inputs, it times ours (`recare.train.esd.ESDTrainer`,
`recare.train.textual_inversion.learn_token`, `recare.train.stage2.Stage2Trainer`) and an
official-style loop written here only for comparison, which computes what damilab/CARE's
`train_erasing`, `train_concept_inversion` and `robust_erase_for_care` compute, the way they
compute it:
  - every prediction is its own UNet call on a CFG pair [uncond, cond] (`predict_noise` doubles
    the batch even at guidance 1, and throws the uncond half away);
  - the prompts go through the text encoder again every iteration (uncond + cond each time);
  - the roll-out and the scheduler are reset every iteration (50 steps, then 1000 steps);
  - textual inversion encodes the training image through the VAE every step, tokenizes the
    template every step, and gives AdamW the whole token-embedding matrix, copying the old rows
    back after each step; `torch.cuda.empty_cache()` after each step on CUDA, as the official code.
Ours: teacher predictions of one iteration in ONE batched call, the student's in one call, prompts
encoded once per run, TI latents encoded once per image and flip, one embedding row optimised.

Both start from the same weights and get the same roll-out k and noise (recorded from ours), the
same h / anchor / retain prompts and the same TI draws; the losses of every iteration are compared
and must agree (rtol 1e-3 in fp32). Printed per row: seconds per iteration, UNet calls and UNet
samples (batch rows) per iteration, the loss, and ours' speed-up.

Worlds:
  mini  the bundled mini world (64 px, its own UNet / VAE / text encoder), real random k.
  sd14  an SD v1.4-shaped model: the real v1.4 UNet config with random weights at a small latent
        (16x16 on the CPU, 64x64 = 512 px on CUDA), the real v1.4 VAE config, a random CLIP text
        encoder of width 768 (2 layers on the CPU, 12 on CUDA) with the full 49,408-token vocabulary.
        k is fixed (1) to keep an iteration short and the time at the official mean k = 24.5 is
        projected from the measured roll-out step (a CFG-pair UNet call, the same on both sides);
        `train_method` is xattn on the CPU (noxattn's AdamW state does not fit beside two 3.4 GB
        UNets in 23 GB), noxattn on CUDA.
On CUDA it also projects the full recipe (stage 1: 2 rounds of 200 ESD iterations + 3000 TI
steps; stage 2: 200 iterations) from the measured per-step times, with the peak GPU memory.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import gc
import math
import platform
import time

from recare.runtime import set_process_defaults

if __name__ == "__main__":  # a process entry: set OMP_WAIT_POLICY before anything imports torch
    set_process_defaults()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from recare.config import ESDConfig, RolloutConfig, Stage2Config, TextualInversionConfig  # noqa: E402
from recare.train.esd import ESDTrainer  # noqa: E402
from recare.train.params import TRAINABLE_MODULE_RULES, TRAINABLE_MODULE_TYPES  # noqa: E402
from recare.train.rollout import XtSampler, encode_prompts  # noqa: E402
from recare.train.stage2 import Stage2Trainer  # noqa: E402
from recare.train.textual_inversion import (  # noqa: E402
    TEMPLATES, _ImageOrder, draw_step, learn_token, with_learned_tokens,
)

MEAN_K = 24.5            # k uniform in [1, 48]
RECIPE = {"esd": 2 * 200, "ti": 2 * 3000, "stage2": 200}   # official stage 1 (2 rounds) + stage 2
LOSS_RTOL = 1e-3

SD14_UNET = dict(   # CompVis/stable-diffusion-v1-4 unet/config.json
    in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True, freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
    act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8,
)
SD14_VAE = dict(    # CompVis/stable-diffusion-v1-4 vae/config.json
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    act_fn="silu", latent_channels=4, norm_num_groups=32,
)
SD14_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                      set_alpha_to_one=False, steps_offset=1)
ANCHORS = ["freshwater", "a lake"]                              # stage 2's anchors and retain prompts
RETAIN = ["a photo of freshwater", "a photo of a lake"]
CONCEPT = "tench"
ADV_TOKENS = ("<v1*>", "<v2*>")


# ---------------------------------------------------------------------------------------------
# the models


@dataclasses.dataclass
class World:
    name: str
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object
    device: torch.device
    latent: int                # latent side h = w
    train_method: str
    fixed_k: int | None        # None: the official random k; else every iteration rolls out k steps

    @property
    def resolution(self) -> int:
        return self.latent * 2 ** (len(self.vae.config.block_out_channels) - 1)


def mini_world(device: torch.device) -> World:
    from recare.models import load_pipeline

    pipe = load_pipeline("mini-world", device=device, dtype="fp32")
    latent = int(pipe.unet.config.sample_size)
    return World("mini world", pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, device,
                 latent, "noxattn", None)


def sd14_shaped(device: torch.device, latent: int, text_layers: int, train_method: str, fixed_k: int | None) -> World:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from recare.models import mini_world_dir

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=latent, **SD14_UNET)
    vae = AutoencoderKL(sample_size=latent * 8, **SD14_VAE)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=text_layers,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406,
        eos_token_id=49407, pad_token_id=49407, projection_dim=768))
    tokenizer = CLIPTokenizer.from_pretrained(mini_world_dir() / "pipeline" / "tokenizer")  # the full CLIP BPE
    return World(f"SD v1.4-shaped ({latent * 8} px)", unet.to(device), vae.to(device), text.to(device), tokenizer,
                 DDIMScheduler(**SD14_SCHEDULER), device, latent, train_method, fixed_k)


def random_images(n: int, size: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# measuring


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class UNetMeter:
    """Counts UNet calls and batch rows, and times each call (forward hooks on the given modules)."""

    def __init__(self, device: torch.device, *unets: torch.nn.Module):
        self.device = device
        self.calls: list[tuple[int, float]] = []    # (batch rows, seconds) per call
        self._start = 0.0
        self._hooks = []
        for unet in unets:
            self._hooks.append(unet.register_forward_pre_hook(self._pre))
            self._hooks.append(unet.register_forward_hook(self._post))

    def _pre(self, module, args):
        sync(self.device)
        self._rows = int(args[0].shape[0])
        self._start = time.perf_counter()

    def _post(self, module, args, output):
        sync(self.device)
        self.calls.append((self._rows, time.perf_counter() - self._start))

    def take(self) -> list[tuple[int, float]]:
        calls, self.calls = self.calls, []
        return calls

    def close(self) -> None:
        for h in self._hooks:
            h.remove()


class FixedK(XtSampler):
    """XtSampler that records its draws and, when asked, rolls out a fixed k (the k draw is still consumed)."""

    def __init__(self, *args, fixed_k: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.fixed_k = fixed_k
        self.drawn: list[tuple[int, torch.Tensor]] = []

    def draw_k(self, generator):
        k = super().draw_k(generator)
        return k if self.fixed_k is None else self.fixed_k

    def initial_noise(self, generator):
        noise = super().initial_noise(generator)
        self.drawn.append((-1, noise.clone()))
        return noise


@dataclasses.dataclass
class Measure:
    """Per-iteration seconds, UNet calls and rows, losses, and the roll-out's per-step time."""

    seconds: list[float]
    calls: list[int]
    rows: list[int]
    losses: list[float]
    rollout_step: float = float("nan")   # seconds of one CFG roll-out UNet call
    peak_gb: float = float("nan")

    def per_it(self, skip: int) -> float:
        xs = self.seconds[skip:] or self.seconds
        return sum(xs) / len(xs)


def peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


# ---------------------------------------------------------------------------------------------
# the official-style loops (benchmark only; the computation of damilab/CARE utils/utils.py + utils/recare.py)


def _set_module(root: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


class OfficialStyle:
    """StableDiffuser + FineTunedModel as the official code computes with them.

    The frozen original is `unet` itself; the fine-tuned model is the original with deep copies of
    the trainable Linear/Conv2d modules swapped in (`with self.finetuned():`).
    """

    def __init__(self, world: World, unet: torch.nn.Module, tokenizer, text_encoder, train_method: str):
        from diffusers import DDIMScheduler

        self.world, self.unet, self.tokenizer, self.text_encoder = world, unet, tokenizer, text_encoder
        self.scheduler = DDIMScheduler.from_config(world.scheduler.config)
        self.device = world.device
        rule = TRAINABLE_MODULE_RULES[train_method]
        self.orig = {n: m for n, m in unet.named_modules() if isinstance(m, TRAINABLE_MODULE_TYPES) and rule(n)}
        self.ft = {n: copy.deepcopy(m) for n, m in self.orig.items()}
        self.flags = [p.requires_grad for p in unet.parameters()]
        unet.requires_grad_(False)                         # freeze(self.model)
        for m in self.ft.values():
            m.requires_grad_(True)                         # unfreeze(ft_module)

    def close(self) -> None:
        for p, flag in zip(self.unet.parameters(), self.flags):
            p.requires_grad_(flag)

    def parameters(self):
        return [p for m in self.ft.values() for p in m.parameters()]

    @contextlib.contextmanager
    def finetuned(self):
        for n, m in self.ft.items():
            _set_module(self.unet, n, m)
        try:
            yield
        finally:
            for n, m in self.orig.items():
                _set_module(self.unet, n, m)

    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        """get_text_embeddings: [uncond, cond], both through the text encoder, every call."""
        def encode(texts):
            ids = self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
            return self.text_encoder(ids.to(self.device))[0]
        return torch.cat([encode([""] * len(prompts)), encode(prompts)])

    def predict_noise(self, index: int, latents: torch.Tensor, embeddings: torch.Tensor, guidance: float):
        latents = torch.cat([latents] * 2)
        t = self.scheduler.timesteps[index]
        latents = self.scheduler.scale_model_input(latents, t)
        pred = self.unet(latents, t, encoder_hidden_states=embeddings).sample
        uncond, cond = pred.chunk(2)
        return uncond + guidance * (cond - uncond)

    @torch.no_grad()
    def diffusion(self, latents: torch.Tensor, embeddings: torch.Tensor, end: int, guidance: float = 3.0):
        for index in range(end):
            pred = self.predict_noise(index, latents, embeddings, guidance)
            latents = self.scheduler.step(pred, self.scheduler.timesteps[index], latents).prev_sample
        return latents

    def empty_cache(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _project(v0: torch.Tensor, v1: torch.Tensor):
    """Official utils/apg.py `project`: float64 split, cast back to the input dtype."""
    dtype = v0.dtype
    v0, v1 = v0.double(), v1.double()
    v1 = F.normalize(v1, dim=[-1, -2, -3])
    parallel = (v0 * v1).sum(dim=[-1, -2, -3], keepdim=True) * v1
    return parallel.to(dtype), (v0 - parallel).to(dtype)


def _normalized_guidance(cond, uncond, scale, eta=1.0):
    parallel, orthogonal = _project(cond - uncond, cond)
    return cond - (scale - 1) * (orthogonal + eta * parallel)


def _normalized_compositional_guidance(conds, uncond, scales, eta=1.0):
    positive, negative = torch.zeros_like(uncond), torch.zeros_like(uncond)
    n_pos = n_neg = 0
    for cond, scale in zip(conds, scales):
        parallel, orthogonal = _project(cond - uncond, cond)
        update = (scale - 1) * (orthogonal + eta * parallel)
        if scale > 0:
            positive, n_pos = positive + update, n_pos + 1
        else:
            negative, n_neg = negative + update, n_neg + 1
    return uncond + (positive / max(n_pos, 1) + negative / max(n_neg, 1))


def official_esd_iteration(o: OfficialStyle, optimizer, concept: str, k: int, noise: torch.Tensor, eta: float) -> float:
    with torch.no_grad():
        neutral = o.text_embeddings([""])
        positive = o.text_embeddings([concept])
        target = o.text_embeddings([concept])
        o.scheduler.set_timesteps(50, device=o.device)
        optimizer.zero_grad()
        latents = noise * o.scheduler.init_noise_sigma
        with o.finetuned():
            x = o.diffusion(latents, positive, k, guidance=3)
        o.scheduler.set_timesteps(1000, device=o.device)
        index = int(k / 50 * 1000)
        positive_latents = o.predict_noise(index, x, positive, 1)
        neutral_latents = o.predict_noise(index, x, neutral, 1)
        target_latents = o.predict_noise(index, x, target, 1)
        o.empty_cache()
        target_latents = neutral_latents.clone().detach()   # erase_concept == erase_from
    with o.finetuned():
        negative_latents = o.predict_noise(index, x, target, 1)
    loss = F.mse_loss(negative_latents, _normalized_guidance(positive_latents, neutral_latents, eta))
    loss.backward()
    optimizer.step()
    o.empty_cache()
    return float(loss.detach())


def official_stage2_iteration(o: OfficialStyle, optimizer, erase_concepts: list[str], h: str, anchor: str,
                              retain: str, k: int, noise: torch.Tensor, scale: float) -> float:
    with torch.no_grad():
        neutral = o.text_embeddings([""])
        target = o.text_embeddings([h])
        o.text_embeddings([anchor])                          # anchor_text_embeddings (unused, computed)
        retain_embeddings = o.text_embeddings([retain])
        negative_embs = [o.text_embeddings([w]) for w in erase_concepts]
        anchor_embs = [o.text_embeddings([anchor])]
        retain_embs = [o.text_embeddings([retain])]
        o.scheduler.set_timesteps(50, device=o.device)
        optimizer.zero_grad()
        latents = noise * o.scheduler.init_noise_sigma
        with o.finetuned():
            x = o.diffusion(latents, target, k, guidance=3)
        o.scheduler.set_timesteps(1000, device=o.device)
        index = int(k / 50 * 1000)
        neutral_latents = o.predict_noise(index, x, neutral, 1)
        o.predict_noise(index, x, target, 1)                 # target_latents (unused, computed)
        e_negatives = [o.predict_noise(index, x, e, 1) for e in negative_embs]
        e_anchors = [o.predict_noise(index, x, e, 1) for e in anchor_embs]
        e_retains = [o.predict_noise(index, x, e, 1) for e in retain_embs]
        o.empty_cache()
    with o.finetuned():
        negative_latents = o.predict_noise(index, x, target, 1)
        retain_latents = o.predict_noise(index, x, retain_embeddings, 1)
    scales = [-float(scale)] * len(e_negatives) + [float(scale)] * len(e_anchors)
    estimate = _normalized_compositional_guidance(e_negatives + e_anchors, neutral_latents, scales)
    loss = F.mse_loss(negative_latents, estimate) + 1 * F.mse_loss(retain_latents, e_retains[0])
    loss.backward()
    optimizer.step()
    o.empty_cache()
    return float(loss.detach())


class OfficialTI:
    """train_concept_inversion: the placeholder added to (copies of) the tokenizer and text encoder, AdamW
    on the whole embedding matrix, old rows copied back each step, the VAE encoding every step."""

    def __init__(self, world: World, unet, images: list[Image.Image], placeholder: str, init_id: int, lr: float):
        self.world, self.unet, self.images = world, unet, images
        self.placeholder = placeholder
        self.tokenizer = copy.deepcopy(world.tokenizer)
        self.tokenizer.add_tokens([placeholder])
        self.placeholder_id = self.tokenizer.convert_tokens_to_ids(placeholder)
        self.text_encoder = copy.deepcopy(world.text_encoder)
        self.text_encoder.resize_token_embeddings(len(self.tokenizer), mean_resizing=False)
        self.text_encoder.requires_grad_(False)
        with torch.no_grad():
            weight = self.text_encoder.get_input_embeddings().weight
            weight[self.placeholder_id] = weight[init_id].clone()
        self.original = self.text_encoder.get_input_embeddings().weight.data.clone()
        self.text_encoder.get_input_embeddings().requires_grad_(True)
        self.optimizer = torch.optim.AdamW(self.text_encoder.get_input_embeddings().parameters(), lr=lr)
        self.flags = [p.requires_grad for p in unet.parameters()]
        unet.requires_grad_(False)                            # frozen since FineTunedModel's freeze()

    def close(self) -> None:
        for p, flag in zip(self.unet.parameters(), self.flags):
            p.requires_grad_(flag)

    def pixels(self, index: int, flip: bool, size: int) -> torch.Tensor:
        """The dataset's __getitem__: np array -> resize (bicubic) -> flip -> [-1, 1]."""
        image = Image.fromarray(np.array(self.images[index].convert("RGB")).astype(np.uint8))
        image = image.resize((size, size), resample=Image.Resampling.BICUBIC)
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        array = (np.array(image).astype(np.uint8) / 127.5 - 1.0).astype(np.float32)
        return torch.from_numpy(array).permute(2, 0, 1)

    def step(self, draws, templates) -> float:
        w = self.world
        pixel = torch.stack([self.pixels(int(i), bool(f), w.resolution) for i, f in zip(draws.index, draws.flip)])
        text = [templates[int(t)].format(self.placeholder) for t in draws.template]   # random.choice(templates)
        ids = self.tokenizer(text, padding="max_length", truncation=True, max_length=self.tokenizer.model_max_length,
                             return_tensors="pt").input_ids
        self.optimizer.zero_grad()
        dist = w.vae.encode(pixel.to(w.device)).latent_dist       # every step
        latents = (dist.mean + dist.std * draws.latent_noise.to(w.device)) * w.vae.config.scaling_factor
        noise, timesteps = draws.noise.to(w.device), draws.timestep.to(w.device)
        noisy = w.scheduler.add_noise(latents, noise, timesteps)
        hidden = self.text_encoder(ids.to(w.device)).last_hidden_state
        pred = self.unet(noisy, timesteps, hidden)["sample"]
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        loss.backward()
        self.optimizer.step()
        if w.device.type == "cuda":
            torch.cuda.empty_cache()
        keep = torch.ones(len(self.tokenizer), dtype=torch.bool, device=w.device)
        keep[self.placeholder_id] = False
        with torch.no_grad():
            self.text_encoder.get_input_embeddings().weight.data[keep] = self.original[keep]
        return float(loss.detach())


# ---------------------------------------------------------------------------------------------
# the three comparisons


def _stage2_inputs(world: World):
    """Tokenizer and text encoder holding two adversarial tokens, and H = {concept, v1*, v2*}."""
    hidden = world.text_encoder.get_input_embeddings().embedding_dim
    g = torch.Generator().manual_seed(1)
    tokens = {t: 0.02 * torch.randn(hidden, generator=g) for t in ADV_TOKENS}
    tokenizer, text_encoder = with_learned_tokens(world.tokenizer, world.text_encoder, tokens)
    return tokenizer, text_encoder, [CONCEPT, *ADV_TOKENS]


def compare_erasure(world: World, kind: str, iterations: int, amp: torch.dtype | None) -> tuple[Measure, Measure]:
    """ESD or stage-2 iterations, ours then the official-style loop, from the same weights and draws."""
    base = world.unet
    if kind == "stage2":
        tokenizer, text_encoder, erase_concepts = _stage2_inputs(world)
        prompts = ["", *erase_concepts, *ANCHORS, *RETAIN]
    else:
        tokenizer, text_encoder, erase_concepts = world.tokenizer, world.text_encoder, [CONCEPT]
        prompts = ["", CONCEPT]
    esd_cfg = ESDConfig(iterations=iterations)
    s2_cfg = Stage2Config(iterations=iterations)

    # ---- ours
    student = copy.deepcopy(base)
    flags = [p.requires_grad for p in base.parameters()]
    sampler = FixedK(world.scheduler, (4, world.latent, world.latent), RolloutConfig(), world.device,
                     fixed_k=world.fixed_k)
    embeddings = encode_prompts(tokenizer, text_encoder, prompts, world.device)
    if kind == "stage2":
        trainer = Stage2Trainer(student, base, sampler, embeddings, erase_concepts, ANCHORS, RETAIN, s2_cfg,
                                train_method=world.train_method, seed=42, amp_dtype=amp)
    else:
        trainer = ESDTrainer(student, base, sampler, embeddings, CONCEPT, esd_cfg, train_method=world.train_method,
                             seed=42, amp_dtype=amp)
    meter = UNetMeter(world.device, student, base)
    ours = Measure([], [], [], [])
    roll_steps = []
    ks = []
    peak_reset(world.device)
    for _ in range(iterations):
        sync(world.device)
        start = time.perf_counter()
        metrics = trainer.step()
        sync(world.device)
        ours.seconds.append(time.perf_counter() - start)
        calls = meter.take()
        ks.append(int(metrics["k"]))
        roll_steps += [s for _, s in calls[:ks[-1]]]
        ours.calls.append(len(calls))
        ours.rows.append(sum(r for r, _ in calls))
        ours.losses.append(metrics["loss"])
    ours.peak_gb = peak_gb(world.device)
    ours.rollout_step = float(np.median(roll_steps))
    noises = [n for _, n in sampler.drawn]
    orders = (list(trainer.erase_order), list(trainer.anchor_order), list(trainer.retain_order)) \
        if kind == "stage2" else None
    meter.close()
    del trainer, student
    for p, flag in zip(base.parameters(), flags):
        p.requires_grad_(flag)
    gc.collect()

    # ---- official style, on the same weights, k, noise and prompts
    official = OfficialStyle(world, base, tokenizer, text_encoder, world.train_method)
    optimizer = torch.optim.AdamW(official.parameters(), lr=(s2_cfg if kind == "stage2" else esd_cfg).learning_rate)
    meter = UNetMeter(world.device, base)
    ref = Measure([], [], [], [])
    roll_steps = []
    try:
        for i in range(iterations):
            sync(world.device)
            start = time.perf_counter()
            if kind == "stage2":
                h, a, r = orders[0][i], orders[1][i], orders[2][i]
                loss = official_stage2_iteration(official, optimizer, erase_concepts, h, a, r, ks[i], noises[i],
                                                 s2_cfg.guidance_scale)
            else:
                loss = official_esd_iteration(official, optimizer, CONCEPT, ks[i], noises[i], esd_cfg.eta)
            sync(world.device)
            ref.seconds.append(time.perf_counter() - start)
            calls = meter.take()
            roll_steps += [s for _, s in calls[:ks[i]]]
            ref.calls.append(len(calls))
            ref.rows.append(sum(r for r, _ in calls))
            ref.losses.append(loss)
    finally:
        meter.close()
        official.close()
    ref.rollout_step = float(np.median(roll_steps))
    del official, optimizer
    gc.collect()
    return ours, ref


def compare_ti(world: World, steps: int, amp: torch.dtype | None, n_images: int = 4) -> tuple[Measure, Measure]:
    """Textual-inversion steps: learn_token, then the official-style step on the same draws."""
    images = random_images(n_images, world.resolution)
    config = TextualInversionConfig(steps=steps, initializer_token="person", placeholder="<ti*>",
                                    resolution=world.resolution, seed=42)
    autocast = (lambda: torch.autocast(world.device.type, dtype=amp)) if amp else contextlib.nullcontext
    meter = UNetMeter(world.device, world.unet)
    stamps: list[float] = []
    losses: list[float] = []

    def progress(event):
        sync(world.device)
        stamps.append(time.perf_counter())
        losses.append(event.metrics["loss"])

    peak_reset(world.device)
    start = time.perf_counter()
    with autocast():
        token = learn_token((world.unet, world.vae, world.text_encoder, world.tokenizer, world.scheduler), images,
                            config=config, progress=progress)
    calls = meter.take()
    meter.close()
    ours = Measure([stamps[0] - start] + [b - a for a, b in zip(stamps, stamps[1:])], [len(calls) // steps] * steps,
                   [sum(r for r, _ in calls) // steps] * steps, losses, peak_gb=peak_gb(world.device))

    # official style: same initial row (the encode-based initializer id), same draws from the same seed
    init_id = world.tokenizer.encode("person", add_special_tokens=False)[0]
    official = OfficialTI(world, world.unet, images, "<ti*>", init_id, config.effective_learning_rate)
    generator = torch.Generator().manual_seed(config.seed)
    order = _ImageOrder(len(images), [], 0)
    templates = TEMPLATES[config.templates]
    meter = UNetMeter(world.device, world.unet)
    ref = Measure([], [], [], [])
    try:
        for _ in range(steps):
            draws = draw_step(generator, order, config.batch_size, len(templates), config.flip_p,
                              (4, world.latent, world.latent), int(world.scheduler.config.num_train_timesteps))
            sync(world.device)
            begin = time.perf_counter()
            ref.losses.append(official.step(draws, templates))
            sync(world.device)
            ref.seconds.append(time.perf_counter() - begin)
            calls = meter.take()
            ref.calls.append(len(calls))
            ref.rows.append(sum(r for r, _ in calls))
        learned = official.text_encoder.get_input_embeddings().weight[official.placeholder_id].detach().float().cpu()
    finally:
        meter.close()
        official.close()
    if amp is None:
        assert torch.allclose(learned, token.embedding, rtol=1e-3, atol=1e-5), "TI: the learned rows differ"
    return ours, ref


# ---------------------------------------------------------------------------------------------
# the table


def check_losses(what: str, ours: Measure, ref: Measure, rtol: float) -> str:
    worst = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(ours.losses, ref.losses))
    assert worst <= rtol, f"{what}: losses differ (worst relative difference {worst:.2e} > {rtol:g})"
    return f"{worst:.1e}"


def warm_up(world: World) -> None:
    """One forward and backward pass through the UNet, so that neither side pays the first call's set-up."""
    x = torch.randn(1, 4, world.latent, world.latent, device=world.device)
    hidden = torch.randn(1, 77, world.unet.config.cross_attention_dim, device=world.device, requires_grad=True)
    world.unet(x, 500, encoder_hidden_states=hidden).sample.square().mean().backward(inputs=[hidden])


def run_world(world: World, its: int, ti_steps: int, amp: torch.dtype | None, rows: list, projections: dict) -> None:
    rtol = LOSS_RTOL if amp is None else 5e-2
    skip = 1 if its > 1 else 0
    for what, label in (("esd", "ESD iteration"), ("ti", "TI step"), ("stage2", "stage-2 iteration")):
        if what == "ti":
            ours, ref = compare_ti(world, ti_steps, amp)
            skip_ti = 1 if ti_steps > 1 else 0
            o_s, r_s = ours.per_it(skip_ti), ref.per_it(skip_ti)
            o_k = r_k = float("nan")
        else:
            ours, ref = compare_erasure(world, what, its, amp)
            o_s, r_s = ours.per_it(skip), ref.per_it(skip)
            # the same iteration with the official mean k: add the missing roll-out steps
            k_now = world.fixed_k
            o_k = o_s + (MEAN_K - k_now) * ours.rollout_step if k_now else o_s
            r_k = r_s + (MEAN_K - k_now) * ref.rollout_step if k_now else r_s
        diff = check_losses(f"{world.name} {label}", ours, ref, rtol)
        rows.append((world.name, label, o_s, r_s, o_k, r_k, np.mean(ours.calls), np.mean(ref.calls),
                     np.mean(ours.rows), np.mean(ref.rows), ours.losses[-1], diff, ours.peak_gb))
        projections.setdefault(world.name, {})[what] = (o_k if not math.isnan(o_k) else o_s,
                                                       r_k if not math.isnan(r_k) else r_s, ours.peak_gb)


def print_table(rows: list, fixed_k_worlds: set[str]) -> None:
    head = (f"{'model':<28} {'what':<18} {'ours s/it':>10} {'official s/it':>13} {'speed-up':>8} "
            f"{'at E[k] ours/off s':>19} {'UNet calls':>11} {'UNet rows':>10} {'loss':>9} {'loss diff':>9}")
    print(head)
    print("-" * len(head))
    for (world, what, o_s, r_s, o_k, r_k, o_c, r_c, o_r, r_r, loss, diff, _) in rows:
        at_k = f"{o_k:.2f}/{r_k:.2f} ({r_k / o_k:.2f}x)" if world in fixed_k_worlds and not math.isnan(o_k) else "measured k"
        if what == "TI step":
            at_k = "-"
        print(f"{world:<28} {what:<18} {o_s:>10.3f} {r_s:>13.3f} {r_s / o_s:>7.2f}x {at_k:>19} "
              f"{o_c:>4.0f} / {r_c:<4.0f} {o_r:>4.0f} / {r_r:<4.0f} {loss:>9.4f} {diff:>9}")


def print_projection(projections: dict, device: torch.device) -> None:
    print(f"\nFull recipe projected from the per-step times above ({RECIPE['esd']} ESD iterations + "
          f"{RECIPE['ti']} TI steps in stage 1, {RECIPE['stage2']} stage-2 iterations; k at its mean {MEAN_K}):")
    for world, parts in projections.items():
        ours = sum(RECIPE[w] * parts[w][0] for w in RECIPE)
        ref = sum(RECIPE[w] * parts[w][1] for w in RECIPE)
        peak = max(parts[w][2] for w in RECIPE)
        mem = f", peak GPU memory {peak:.1f} GB" if device.type == "cuda" else ""
        print(f"  {world}: ours {ours / 60:.1f} min, official-style {ref / 60:.1f} min ({ref / ours:.2f}x){mem}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few iterations (about 5 minutes on 2 CPU cores)")
    ap.add_argument("--worlds", default="mini,sd14", help="comma list of mini, sd14")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--iterations", type=int, default=None, help="ESD / stage-2 iterations per side")
    ap.add_argument("--ti-steps", type=int, default=None, help="TI steps per side")
    ap.add_argument("--sd-latent", type=int, default=None, help="SD-shaped latent side (CPU 16, CUDA 64 = 512 px)")
    ap.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none",
                    help="autocast for ours (the official code runs fp32); the loss check loosens to 5e-2")
    args = ap.parse_args()

    from recare.models import resolve_device

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    torch.manual_seed(0)
    rows: list = []
    projections: dict = {}
    fixed_k_worlds: set[str] = set()
    print(f"train_speed  {datetime.date.today()}  {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if cuda else ""), flush=True)
    for name in [w.strip() for w in args.worlds.split(",") if w.strip()]:
        start = time.perf_counter()
        if name == "mini":
            world = mini_world(device)
            its = args.iterations or (4 if args.quick else 12)
            ti_steps = args.ti_steps or (6 if args.quick else 30)
        elif name == "sd14":
            latent = args.sd_latent or (64 if cuda else 16)
            fixed_k = 1
            world = sd14_shaped(device, latent, 12 if cuda else 2, "noxattn" if cuda else "xattn", fixed_k)
            if fixed_k:
                fixed_k_worlds.add(world.name)
            its = args.iterations or (1 if args.quick else 3)
            ti_steps = args.ti_steps or (3 if args.quick else 10)
        else:
            raise SystemExit(f"unknown world {name!r}: use mini or sd14")
        print(f"[{world.name}] loaded in {time.perf_counter() - start:.0f} s; train_method {world.train_method}, "
              f"{its} iteration(s) per side, {ti_steps} TI steps, k {'fixed ' + str(world.fixed_k) if world.fixed_k else 'random'}",
              flush=True)
        warm_up(world)
        run_world(world, its, ti_steps, amp, rows, projections)
        del world
        gc.collect()
    print()
    print_table(rows, fixed_k_worlds)
    print("\ns/it: mean over the iterations after the first (the first when there is one). UNet calls / rows:"
          " per iteration, ours / official. loss diff: worst relative difference of the per-iteration losses.")
    if fixed_k_worlds:
        print(f"at E[k]: k was fixed to 1 for {sorted(fixed_k_worlds)}; the time of an iteration with the official "
              f"mean k = {MEAN_K} adds {MEAN_K - 1} measured CFG roll-out steps to each side.")
    if cuda:
        print_projection(projections, device)


if __name__ == "__main__":
    main()
