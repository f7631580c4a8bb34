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

Both start from the same weights and get the same roll-out noise (recorded from ours), the same
h / anchor / retain prompts and the same TI draws; the losses of every iteration are compared and
must agree (rtol 1e-3 in fp32). Every iteration rolls out k = 1 step (the k draw is still made),
so that an iteration is short; the column "at k=24.5" adds the 23.5 missing roll-out steps of the
official mean k to each side, timed as the median roll-out UNet call (a CFG pair without
gradients, the same work on both sides). On the CPU the two sides run interleaved (ours i,
official i, ...) and each reports its fastest iteration, since other processes' load only ever
adds time; on CUDA one side runs after the other, so that ours' peak memory is its own.

Worlds:
  mini  the bundled mini world (64 px, its own UNet / VAE / text encoder), train_method noxattn.
  sd14  an SD v1.4-shaped model: the real v1.4 UNet config with random weights at a small latent
        (16x16 = 128 px on the CPU, 64x64 = 512 px on CUDA), the real v1.4 VAE config, a random
        CLIP text encoder of width 768 (2 layers on the CPU, 12 on CUDA) with the full 49,408-token
        vocabulary. train_method is xattn on the CPU (noxattn's AdamW state does not fit beside two
        3.4 GB UNets in 23 GB of shared memory), noxattn on CUDA.
On CUDA it also projects the full recipe (stage 1: 2 rounds of 200 ESD iterations + 3000 TI
steps; stage 2: 200 iterations) from the measured per-step times, with ours' peak GPU memory.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import gc
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
K_FIXED = 1              # the k every measured iteration rolls out (projected to MEAN_K in the table)
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
    fixed_k: int               # every iteration rolls out k steps (the k draw is still consumed)

    @property
    def resolution(self) -> int:
        return self.latent * 2 ** (len(self.vae.config.block_out_channels) - 1)


def mini_world(device: torch.device, fixed_k: int) -> World:
    from recare.models import load_pipeline

    pipe = load_pipeline("mini-world", device=device, dtype="fp32")
    latent = int(pipe.unet.config.sample_size)
    return World("mini world", pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, device,
                 latent, "noxattn", fixed_k)


def sd14_shaped(device: torch.device, latent: int, text_layers: int, train_method: str, fixed_k: int) -> World:
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
    rollout_calls: list[float] = dataclasses.field(default_factory=list)   # seconds of each CFG roll-out UNet call
    peak_gb: float = float("nan")

    def best(self, skip: int = 0) -> float:
        """The fastest iteration (after `skip` first ones, when there are more): other processes' load only adds."""
        xs = self.seconds[skip:] or self.seconds
        return min(xs)


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


def _record(measure: Measure, seconds: float, calls: list[tuple[int, float]], loss: float, k: int) -> None:
    measure.seconds.append(seconds)
    measure.calls.append(len(calls))
    measure.rows.append(sum(r for r, _ in calls))
    measure.losses.append(loss)
    measure.rollout_calls += [s for _, s in calls[:k]]   # the first k calls of an iteration are its roll-out


def compare_erasure(world: World, kind: str, iterations: int, amp: torch.dtype | None,
                    interleave: bool) -> tuple[Measure, Measure]:
    """ESD or stage-2 iterations, ours and the official-style loop, from the same weights and draws.

    Interleaved (ours i, official i, ours i + 1, ...) on the CPU, where other processes' load comes
    and goes; one side after the other on CUDA, so that ours' peak memory is its own.
    """
    base = world.unet
    if kind == "stage2":
        tokenizer, text_encoder, erase_concepts = _stage2_inputs(world)
        prompts = ["", *erase_concepts, *ANCHORS, *RETAIN]
    else:
        tokenizer, text_encoder, erase_concepts = world.tokenizer, world.text_encoder, [CONCEPT]
        prompts = ["", CONCEPT]
    esd_cfg = ESDConfig(iterations=iterations)
    s2_cfg = Stage2Config(iterations=iterations)
    flags = [p.requires_grad for p in base.parameters()]
    ours, ref = Measure([], [], [], []), Measure([], [], [], [])
    ks: list[int] = []

    # ---- ours
    student = copy.deepcopy(base)
    sampler = FixedK(world.scheduler, (4, world.latent, world.latent), RolloutConfig(), world.device,
                     fixed_k=world.fixed_k)
    embeddings = encode_prompts(tokenizer, text_encoder, prompts, world.device)   # once per run (ours)
    if kind == "stage2":
        trainer = Stage2Trainer(student, base, sampler, embeddings, erase_concepts, ANCHORS, RETAIN, s2_cfg,
                                train_method=world.train_method, seed=42, amp_dtype=amp)
    else:
        trainer = ESDTrainer(student, base, sampler, embeddings, CONCEPT, esd_cfg, train_method=world.train_method,
                             seed=42, amp_dtype=amp)
    meter = UNetMeter(world.device, student, base)

    def ours_step() -> None:
        sync(world.device)
        start = time.perf_counter()
        metrics = trainer.step()
        sync(world.device)
        ks.append(int(metrics["k"]))
        _record(ours, time.perf_counter() - start, meter.take(), metrics["loss"], ks[-1])

    # ---- official style, on the same weights, k, noise and prompts
    official = optimizer = None

    def official_step(i: int) -> None:
        nonlocal official, optimizer
        if official is None:
            official = OfficialStyle(world, base, tokenizer, text_encoder, world.train_method)
            optimizer = torch.optim.AdamW(official.parameters(),
                                          lr=(s2_cfg if kind == "stage2" else esd_cfg).learning_rate)
        noise = sampler.drawn[i][1]
        sync(world.device)
        start = time.perf_counter()
        if kind == "stage2":
            h, a, r = trainer.erase_order[i], trainer.anchor_order[i], trainer.retain_order[i]
            loss = official_stage2_iteration(official, optimizer, erase_concepts, h, a, r, ks[i], noise,
                                             s2_cfg.guidance_scale)
        else:
            loss = official_esd_iteration(official, optimizer, CONCEPT, ks[i], noise, esd_cfg.eta)
        sync(world.device)
        _record(ref, time.perf_counter() - start, meter.take(), loss, ks[i])

    try:
        peak_reset(world.device)
        if interleave:
            for i in range(iterations):
                ours_step()
                official_step(i)
        else:
            for _ in range(iterations):
                ours_step()
            ours.peak_gb = peak_gb(world.device)
            for i in range(iterations):
                official_step(i)
    finally:
        meter.close()
        if official is not None:
            official.close()
        for p, flag in zip(base.parameters(), flags):
            p.requires_grad_(flag)
    del trainer, student, official, optimizer
    gc.collect()
    return ours, ref


def compare_ti(world: World, steps: int, amp: torch.dtype | None, interleave: bool,
               n_images: int = 4) -> tuple[Measure, Measure]:
    """Textual-inversion steps: learn_token and the official-style step on the same draws.

    Interleaved on the CPU: each official step runs inside ours' progress callback, right after
    ours' step with the same draws, and is subtracted from ours' time.
    """
    images = random_images(n_images, world.resolution)
    config = TextualInversionConfig(steps=steps, initializer_token="person", placeholder="<ti*>",
                                    resolution=world.resolution, seed=42)
    autocast = (lambda: torch.autocast(world.device.type, dtype=amp)) if amp else contextlib.nullcontext
    # official style: same initial row (the encode-based initializer id), same draws from the same seed
    init_id = world.tokenizer.encode("person", add_special_tokens=False)[0]
    official = OfficialTI(world, world.unet, images, "<ti*>", init_id, config.effective_learning_rate)
    official.close()            # the UNet's flags go back until the official steps run
    generator = torch.Generator().manual_seed(config.seed)
    order = _ImageOrder(len(images), [], 0)
    templates = TEMPLATES[config.templates]
    meter = UNetMeter(world.device, world.unet)
    ours, ref = Measure([], [], [], []), Measure([], [], [], [])

    def official_step() -> float:
        draws = draw_step(generator, order, config.batch_size, len(templates), config.flip_p,
                          (4, world.latent, world.latent), int(world.scheduler.config.num_train_timesteps))
        flags = [p.requires_grad for p in world.unet.parameters()]
        world.unet.requires_grad_(False)               # frozen, as in the official run
        sync(world.device)
        begin = time.perf_counter()
        loss = official.step(draws, templates)
        sync(world.device)
        seconds = time.perf_counter() - begin
        for p, flag in zip(world.unet.parameters(), flags):
            p.requires_grad_(flag)
        _record(ref, seconds, meter.take(), loss, 0)
        return seconds

    last = [0.0]

    def progress(event):
        sync(world.device)
        now = time.perf_counter()
        _record(ours, now - last[0], meter.take(), event.metrics["loss"], 0)
        if interleave:
            official_step()
        last[0] = time.perf_counter()

    peak_reset(world.device)
    try:
        last[0] = time.perf_counter()
        with autocast():
            token = learn_token((world.unet, world.vae, world.text_encoder, world.tokenizer, world.scheduler), images,
                                config=config, progress=progress)
        ours.peak_gb = peak_gb(world.device)
        if not interleave:
            for _ in range(steps):
                official_step()
        learned = official.text_encoder.get_input_embeddings().weight[official.placeholder_id].detach().float().cpu()
    finally:
        meter.close()
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


def run_world(world: World, its: int, ti_steps: int, amp: torch.dtype | None, interleave: bool, rows: list,
              projections: dict) -> None:
    rtol = LOSS_RTOL if amp is None else 5e-2
    for what, label in (("esd", "ESD iteration"), ("ti", "TI step"), ("stage2", "stage-2 iteration")):
        if what == "ti":
            ours, ref = compare_ti(world, ti_steps, amp, interleave)
            o_s, r_s = ours.best(skip=1), ref.best(skip=1)   # ours' first step holds its one-time set-up
            o_k, r_k = o_s, r_s
        else:
            ours, ref = compare_erasure(world, what, its, amp, interleave)
            o_s, r_s = ours.best(), ref.best()
            # the same iteration with the official mean k: add the missing roll-out steps, each one CFG-pair
            # UNet call without gradients, the same work on both sides (timed as the median over both)
            step = float(np.median(ours.rollout_calls + ref.rollout_calls))
            o_k, r_k = o_s + (MEAN_K - world.fixed_k) * step, r_s + (MEAN_K - world.fixed_k) * step
        diff = check_losses(f"{world.name} {label}", ours, ref, rtol)
        rows.append((world.name, label, o_s, r_s, o_k, r_k, np.mean(ours.calls), np.mean(ref.calls),
                     np.mean(ours.rows), np.mean(ref.rows), ours.losses[-1], diff, ours.peak_gb))
        projections.setdefault(world.name, {})[what] = (o_k, r_k, ours.peak_gb)


def print_table(rows: list) -> None:
    head = (f"{'model':<26} {'what':<17} {'ours s':>8} {'official s':>10} {'speed-up':>8} "
            f"{'at k=24.5: ours / official s':>30} {'UNet calls':>11} {'UNet rows':>11} {'loss':>8} {'loss diff':>9}")
    print(head)
    print("-" * len(head))
    for (world, what, o_s, r_s, o_k, r_k, o_c, r_c, o_r, r_r, loss, diff, _) in rows:
        at_k = "-" if what == "TI step" else f"{o_k:.2f} / {r_k:.2f} ({r_k / o_k:.2f}x)"
        print(f"{world:<26} {what:<17} {o_s:>8.3f} {r_s:>10.3f} {r_s / o_s:>7.2f}x {at_k:>30} "
              f"{o_c:>4.0f} / {r_c:<4.0f} {o_r:>4.0f} / {r_r:<4.0f} {loss:>8.4f} {diff:>9}")


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
    interleave = not cuda   # on a shared CPU, other processes' load hits both sides alike
    rows: list = []
    projections: dict = {}
    print(f"train_speed  {datetime.date.today()}  {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if cuda else ""), flush=True)
    for name in [w.strip() for w in args.worlds.split(",") if w.strip()]:
        start = time.perf_counter()
        if name == "mini":
            world = mini_world(device, fixed_k=K_FIXED)
            its = args.iterations or (4 if args.quick else 10)
            ti_steps = args.ti_steps or (6 if args.quick else 30)
        elif name == "sd14":
            latent = args.sd_latent or (64 if cuda else 16)
            world = sd14_shaped(device, latent, 12 if cuda else 2, "noxattn" if cuda else "xattn", K_FIXED)
            its = args.iterations or (2 if args.quick else 4)
            ti_steps = args.ti_steps or (4 if args.quick else 10)
        else:
            raise SystemExit(f"unknown world {name!r}: use mini or sd14")
        print(f"[{world.name}] loaded in {time.perf_counter() - start:.0f} s; train_method {world.train_method}, "
              f"{its} iterations and {ti_steps} TI steps per side, k fixed to {world.fixed_k}, "
              f"{'interleaved' if interleave else 'one side after the other'}", flush=True)
        warm_up(world)
        run_world(world, its, ti_steps, amp, interleave, rows, projections)
        del world
        gc.collect()
    print()
    print_table(rows)
    print("\nours s / official s: the fastest iteration of each side (TI: after ours' first step, which holds its "
          "one-time set-up), k fixed to 1.\nat k=24.5: the same iteration at the official mean k, adding 23.5 CFG "
          "roll-out steps to each side (the median roll-out UNet call measured on both sides).\nUNet calls / rows: "
          "per iteration, ours / official (k = 1). loss diff: worst relative difference of the per-iteration losses.")
    if cuda:
        print_projection(projections, device)


if __name__ == "__main__":
    main()
