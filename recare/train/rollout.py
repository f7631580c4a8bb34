"""The x_t roll-out shared by ESD and stage 2 (METHOD.md section 3, "How x_t is drawn").

Official procedure (damilab/CARE `train_erasing` / `robust_erase_for_care`), per iteration:
1. the scheduler is set to 50 DDIM steps; k = randint(1, 49), i.e. uniform in [1, 48];
2. noise x_T ~ N(0, I) (times the scheduler's init sigma, 1 for DDIM) is denoised for k DDIM steps
   (eta 0) by the *model being fine-tuned*, conditioned on the erase prompt with classifier-free
   guidance 3, without gradients;
3. the scheduler is switched to 1000 steps and every prediction of the iteration is made on that
   latent at `timesteps[int(k / 50 * 1000)]`.

About step 3's timestep: METHOD.md writes it t = 999 - 20k; the value the official expression
gives depends on the scheduler's `steps_offset`. With SD v1.4's DDIM config (steps_offset 1, also
the mini world's) the 1000-step schedule is 1000, 999, ..., 1, so t = 1000 - 20k; with
steps_offset 0 it is 999 - 20k. We keep the official expression (read from the scheduler), so the
timestep is the official one for every base model. The latent itself sits at the 50-step
schedule's timesteps[k] (981 - 20k with steps_offset 1).

What is cheaper than the official loop and samples the same thing: text embeddings are encoded
once per prompt (not every iteration); the [uncond, cond] embedding pair is concatenated once per
prompt; the two schedules are built once, never reset; the denoising runs under
`torch.inference_mode` (no autograd bookkeeping even though the UNet has trainable parameters).
The random draws come from an explicit CPU `torch.Generator` in the official order (k, then the
noise), so the same seed gives the same x_t on every device.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, ContextManager

import torch

from recare.config import RolloutConfig
from recare.models.traced_calls import predict_noise


@dataclasses.dataclass(frozen=True)
class Rollout:
    """One drawn x_t.

    Attributes:
        latents: x_t, shape (1, C, h, w), a normal tensor (usable with autograd).
        k: DDIM steps run, in [1, steps - 2].
        timestep: the timestep every prediction of this iteration uses (official 1000-step index 20k).
    """

    latents: torch.Tensor
    k: int
    timestep: int


def amp_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `TrainConfig.dtype` on `device` (None = full fp32, the official precision).

    Args:
        dtype: "auto" (bf16 on CUDA when supported, else fp16 there; fp32 elsewhere), "fp32", "bf16", "fp16".
        device: the training device.
    """
    if dtype == "fp32" or (dtype == "auto" and device.type != "cuda"):
        return None
    if dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]


def no_autocast() -> ContextManager:
    return contextlib.nullcontext()


def autocast_factory(device: torch.device, dtype: torch.dtype | None) -> Callable[[], ContextManager]:
    """A zero-argument factory of autocast contexts (a no-op for fp32 / None).

    Args:
        device: where the UNet runs.
        dtype: torch.float16 / torch.bfloat16 for mixed precision, None or torch.float32 for none.
    """
    if dtype is None or dtype == torch.float32:
        return no_autocast
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


class XtSampler:
    """Draws x_t with the official procedure; holds the two schedules, built once.

    Args:
        scheduler: the pipeline's scheduler (its config is copied into a DDIMScheduler).
        latent_shape: (C, h, w) of one latent, e.g. (4, 64, 64) for SD v1.4 at 512 px.
        config: roll-out steps and guidance.
        device: where the latents live.
    """

    def __init__(self, scheduler, latent_shape: tuple[int, int, int], config: RolloutConfig | None = None,
                 device: str | torch.device = "cpu"):
        from diffusers import DDIMScheduler

        self.config = config or RolloutConfig()
        self.device = torch.device(device)
        self.latent_shape = tuple(latent_shape)
        self.ddim = DDIMScheduler.from_config(scheduler.config)
        self.ddim.set_timesteps(self.config.steps, device=self.device)
        self.init_noise_sigma = float(self.ddim.init_noise_sigma)
        prediction = DDIMScheduler.from_config(scheduler.config)
        # official: set_timesteps(1000); the expression below indexes that list
        prediction.set_timesteps(1000)
        self.prediction_timesteps = [int(t) for t in prediction.timesteps]
        self.rollout_timesteps = [int(t) for t in self.ddim.timesteps]
        # 0-dim timestep tensors on the device, made once (the UNet takes a tensor)
        self._t_rollout = [torch.tensor(t, device=self.device) for t in self.rollout_timesteps]

    def draw_k(self, generator: torch.Generator) -> int:
        """k uniform in [1, steps - 2] (official `torch.randint(1, nsteps - 1, (1,))`)."""
        return int(torch.randint(1, self.config.steps - 1, (1,), generator=generator).item())

    def prediction_timestep(self, k: int) -> int:
        """The official `timesteps[int(k / 50 * 1000)]` of the 1000-step schedule (1000 - 20k for SD v1.4)."""
        return self.prediction_timesteps[int(k / self.config.steps * 1000)]

    def initial_noise(self, generator: torch.Generator) -> torch.Tensor:
        """x_T: N(0, I) from the CPU generator, times the scheduler's init sigma, moved to the device."""
        noise = torch.randn((1, *self.latent_shape), generator=generator, dtype=torch.float32)
        return (noise * self.init_noise_sigma).to(self.device)

    def sample(
        self,
        unet: torch.nn.Module,
        cfg_embeddings: torch.Tensor,
        generator: torch.Generator,
        autocast: Callable[[], ContextManager] = no_autocast,
    ) -> Rollout:
        """Draw k, then denoise fresh noise for k DDIM steps with the model being fine-tuned.

        Args:
            unet: the model being fine-tuned (used as it is now; no gradients are taken).
            cfg_embeddings: (2, 77, D) text embeddings [empty prompt, erase prompt] (`cfg_pair`).
            generator: the run's CPU generator (k first, then the noise, as the official order).
            autocast: mixed-precision context factory (see `autocast_factory`).
        """
        return self.sample_batch(unet, [cfg_embeddings], generator, autocast)[0]

    def sample_batch(
        self,
        unet: torch.nn.Module,
        cfg_embeddings: list[torch.Tensor],
        generator: torch.Generator,
        autocast: Callable[[], ContextManager] = no_autocast,
    ) -> list[Rollout]:
        """Roll-outs of several iterations in one batch, all with the UNet as it is now.

        The draws are those `sample` would make one after the other (k_1, noise_1, k_2, noise_2, ...).
        With one embedding pair this *is* `sample`. With several (the opt-in `RolloutConfig.batch`),
        later iterations' roll-outs use weights a few optimizer steps old; that is the only
        difference. Roll-outs are ordered by k, longest first, and the batch shrinks as each one
        reaches its k, so the UNet does the same total work in fewer, larger calls.

        Args:
            unet: the model being fine-tuned.
            cfg_embeddings: one (2, 77, D) [empty, erase prompt] pair per roll-out.
            generator: the run's CPU generator.
            autocast: mixed-precision context factory.
        """
        draws = [(self.draw_k(generator), self.initial_noise(generator)) for _ in cfg_embeddings]
        order = sorted(range(len(draws)), key=lambda j: -draws[j][0])  # stable: ties keep draw order
        ks = [draws[j][0] for j in order]
        latents = torch.cat([draws[j][1] for j in order])
        uncond = torch.cat([cfg_embeddings[j][0:1] for j in order])
        cond = torch.cat([cfg_embeddings[j][1:2] for j in order])
        latents = self._denoise_sorted(unet, latents, uncond, cond, ks, autocast)
        out: list[Rollout | None] = [None] * len(draws)
        for row, j in enumerate(order):
            k = ks[row]
            out[j] = Rollout(latents=latents[row:row + 1].clone(), k=k, timestep=self.prediction_timestep(k))
        return out  # type: ignore[return-value]

    def _denoise_sorted(self, unet, latents, uncond, cond, ks: list[int], autocast) -> torch.Tensor:
        """DDIM (eta 0) with guidance; row r stops after ks[r] steps (ks sorted, largest first)."""
        guidance = self.config.guidance
        with torch.inference_mode():
            latents = latents.clone()
            for i in range(ks[0] if ks else 0):
                n = sum(k > i for k in ks)               # rows still running: a prefix
                t, x = self._t_rollout[i], latents[:n]
                with autocast():
                    both = predict_noise(unet, torch.cat([x, x]), t, torch.cat([uncond[:n], cond[:n]]))
                u, c = both.float().chunk(2)             # official order: uncond first
                latents[:n] = self.ddim.step(u + guidance * (c - u), t, x).prev_sample
        return latents.clone()  # out of inference mode: autograd may use it as an input

    def denoise(self, unet, latents, cfg_embeddings, k: int, autocast=no_autocast) -> torch.Tensor:
        """k DDIM steps (eta 0) from `latents` (1, C, h, w) with guidance (official `diffusion`)."""
        return self._denoise_sorted(unet, latents, cfg_embeddings[0:1], cfg_embeddings[1:2], [k], autocast)


def cfg_pair(empty: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    """[empty, prompt] text embeddings as one (2, 77, D) batch, the official CFG order (uncond first).

    Args:
        empty: (1, 77, D) embedding of "".
        prompt: (1, 77, D) embedding of the erase prompt.
    """
    return torch.cat([empty, prompt])


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str], device: str | torch.device | None = None,
                   batch_size: int = 32) -> dict[str, torch.Tensor]:
    """Text embeddings of each distinct prompt, (1, 77, D) each, computed once for a whole run.

    Padding to the tokenizer's max length and truncation as the official `get_text_embeddings`.

    Args:
        tokenizer: the pipeline's CLIPTokenizer (with any learned tokens added).
        text_encoder: its CLIPTextModel.
        prompts: the prompts (duplicates are encoded once).
        device: where the embeddings go (default: the text encoder's device).
        batch_size: prompts per text-encoder call.
    """
    device = torch.device(device) if device is not None else text_encoder.device
    unique = list(dict.fromkeys(prompts))
    out: dict[str, torch.Tensor] = {}
    for start in range(0, len(unique), batch_size):
        chunk = unique[start:start + batch_size]
        ids = tokenizer(chunk, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(text_encoder.device)
        hidden = text_encoder(ids)[0].to(device=device, dtype=torch.float32)
        out.update({p: hidden[i:i + 1] for i, p in enumerate(chunk)})
    return out
