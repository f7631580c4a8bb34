"""UnlearnDiff (Zhang et al. 2024, "To Generate or Not? Safety-Driven Unlearned Diffusion Models Are Still
Easy To Generate Unsafe Images"): the unlearned model as a diffusion classifier, attacked with a prompt.

For one prompt p and the *original* model's image x0 of p (its VAE latent, the distribution's mean):

1. k prefix tokens, each a probability vector over the candidate vocabulary (rows of P, k x V), start
   uniform (1/V each).
2. For each timestep t of the schedule (`attack_timesteps`: 10, 30, ..., 990 for 50), `iterations` times:
   * straight-through sampling: each row draws one token from its distribution (a one-hot row);
     the backward pass hands the gradient on, clipped to [-1, 1] (hardtanh);
   * the prefix's token embeddings are one-hot @ E (E: the candidates' rows of the text encoder's
     token embedding); they replace positions 1..k of "<sot> _ x k p <eot> ..." (the last k padding
     positions fall off the 77), and the installed transformers text encoder runs on that sequence
     (`PrefixEmbedding` swaps its input embedding, nothing else is copied);
   * noise n ~ N(0, I) (the attack's own seeded generator), x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) n,
     loss = || eps_unlearned(x_t, t, text(prefix + p)) - n ||^2 (mean), Adam (lr 0.01, weight decay 0.1);
   * P <- its Euclidean projection onto the probability simplex, row by row (`project_to_simplex`).
3. After each timestep's iterations, the discrete prompt: argmax token of each row, then p; the unlearned
   model generates it (the attack seed) and the judge looks; the first success ends the attack.

Before any of this the plain prompt is judged at the attack seed: a prompt whose plain image already
shows the target is a success "before the attack" (Diffusion-MU-Attack's check_asr counts a prompt
positive before or after the attack). k = 3 for objects and styles, 5 for nudity; 50 timesteps x 40
iterations (paper Appendix D). Facts from the reference implementation (OPTML-Group/Diffusion-MU-Attack,
src/attackers/text_grad_.py, src/tasks/classifier_.py); the code here is our own.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from recare.errors import ConfigError
from recare.models.traced_calls import predict_noise
from recare.progress import CancelToken, ProgressCallback, check_cancel, emit

STAGE_UD = "ud"
PAPER_K = {"objects": 3, "styles": 3, "nudity": 5}


def k_for_concept(concept: str) -> int:
    """The paper's prefix length: 5 for nudity, 3 for objects and styles."""
    return PAPER_K["nudity"] if concept.strip().lower() in ("nudity", "nude", "naked") else PAPER_K["objects"]


@dataclasses.dataclass(frozen=True)
class UnlearnDiffSettings:
    """One UnlearnDiff attack's settings (paper Appendix D defaults)."""

    k: int = 3                     # prefix tokens (3 objects and styles, 5 nudity)
    timesteps: int = 50            # timesteps of the schedule, 10 .. 990 for 50
    iterations: int = 40           # optimiser steps per timestep
    learning_rate: float = 0.01    # Adam
    weight_decay: float = 0.1      # Adam's (L2) weight decay
    seed: int = 42                 # sampling of the prefix and the diffusion noise


@dataclasses.dataclass
class UnlearnDiffResult:
    """What one prompt's attack found.

    Attributes:
        prompt: the prompt attacked.
        final_prompt: the prompt the attack's images use: the plain prompt when it succeeded before the
            attack, else the last discrete adversarial prompt (the successful one when there was one).
        success: the judge saw the target at the attack seed (before or after the attack).
        before: it already did on the plain prompt (no optimisation ran).
        timestep: the timestep after which it succeeded (None: before the attack, or never).
        prefix: the adversarial prefix tokens (as the tokenizer spells them).
        losses: the mean loss of each timestep's iterations.
        checks: how many images the attack generated and judged.
    """

    prompt: str
    final_prompt: str
    success: bool
    before: bool
    timestep: int | None = None
    prefix: list[str] = dataclasses.field(default_factory=list)
    losses: list[float] = dataclasses.field(default_factory=list)
    checks: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def attack_timesteps(count: int = 50, num_train_timesteps: int = 1000) -> list[int]:
    """The schedule: `count` timesteps spaced T // count apart from T // count // 2 (10, 30, ..., 990)."""
    if count < 1:
        raise ConfigError(f"UnlearnDiff needs at least one timestep (got {count}).")
    step = max(num_train_timesteps // count, 1)
    return list(range(step // 2, num_train_timesteps, step))[:count]


def project_to_simplex(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row of `v` onto the probability simplex {x >= 0, sum x = 1}.

    (The reference bisects for the threshold mu with the rows clipped to [0, 1]; on the simplex no
    entry exceeds 1, so this sort-based closed form gives the same point.)

    Args:
        v: (..., V) rows.
    """
    u, _ = torch.sort(v, dim=-1, descending=True)
    css = u.cumsum(dim=-1) - 1.0
    idx = torch.arange(1, v.shape[-1] + 1, device=v.device, dtype=v.dtype)
    support = (u - css / idx) > 0
    rho = support.to(v.dtype).cumsum(dim=-1).argmax(dim=-1, keepdim=True)   # the last index where it holds
    theta = css.gather(-1, rho) / (rho + 1).to(v.dtype)
    return (v - theta).clamp(min=0.0)


class _StraightThroughSample(torch.autograd.Function):
    """Forward: one token per row drawn from the row's distribution, as one-hot rows.
    Backward: the incoming gradient clipped to [-1, 1] (hardtanh), passed straight to the probabilities."""

    @staticmethod
    def forward(ctx, probs: torch.Tensor, generator: torch.Generator | None):
        index = torch.multinomial(probs.detach().float().cpu(), 1, generator=generator).view(-1)
        return F.one_hot(index, probs.shape[-1]).to(probs.device, probs.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return F.hardtanh(grad), None


def straight_through_sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One-hot rows sampled from `probs` (k, V), with the straight-through gradient."""
    return _StraightThroughSample.apply(probs, generator)


class PrefixEmbedding(torch.nn.Module):
    """A token embedding that returns `base`'s rows, except positions 1..k, which read `prefix` (k, D).

    Set as the input embedding of a weight-sharing copy of the text encoder, it lets the installed
    transformers text encoder run on soft (or one-hot-selected) prefix tokens.
    """

    def __init__(self, base: torch.nn.Embedding):
        super().__init__()
        self.base = base
        self.prefix: torch.Tensor | None = None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids)
        if self.prefix is None:
            return out
        k = self.prefix.shape[0]
        prefix = self.prefix.to(out.dtype).unsqueeze(0).expand(out.shape[0], -1, -1)
        return torch.cat([out[:, :1], prefix, out[:, 1 + k:]], dim=1)


def candidate_ids(tokenizer, words: Sequence[str] | None = None) -> list[int]:
    """The candidate vocabulary: the single-token words of `words`, or every token but the special ones.

    Args:
        tokenizer: the model's tokenizer.
        words: a lexicon (the mini world's words); None: the whole vocabulary (SD v1.4: 49,406 tokens).

    Raises:
        ConfigError: no word of `words` is one token.
    """
    special = set(tokenizer.all_special_ids)
    if words is None:
        return [i for i in range(len(tokenizer)) if i not in special]
    ids = []
    for word in words:
        pieces = tokenizer.encode(word, add_special_tokens=False)
        if len(pieces) == 1 and pieces[0] not in special:
            ids.append(int(pieces[0]))
    ids = list(dict.fromkeys(ids))
    if not ids:
        raise ConfigError("UnlearnDiff's candidate vocabulary is empty: no word of the lexicon is a single token.")
    return ids


def prefixed_ids(tokenizer, prompt: str, k: int) -> torch.Tensor:
    """(1, L) ids "<sot> x k, the prompt's tokens, <eot>, padding", cut to the tokenizer's length L.

    Positions 1..k hold the end-of-text id as a placeholder; `PrefixEmbedding` replaces their rows.
    """
    length = int(tokenizer.model_max_length)
    ids = tokenizer(prompt, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
    filler = torch.full((1, k), int(tokenizer.eos_token_id), dtype=ids.dtype)
    out = torch.cat([ids[:, :1], filler, ids[:, 1:]], dim=1)[:, :length]
    if int((out[0] == tokenizer.eos_token_id).sum()) <= k:
        raise ConfigError(f"the prompt {prompt[:40]!r}... is too long for {k} prefix tokens: shorten it.")
    return out


class UnlearnDiff:
    """The attack on one model (its UNet, text encoder and tokenizer are only read).

    Args:
        unet: the unlearned model's UNet (the diffusion classifier).
        text_encoder, tokenizer: the model's.
        scheduler: gives the noise schedule (alphas_cumprod) and num_train_timesteps.
        candidates: token ids the prefix chooses from (`candidate_ids`).
        settings: k, timesteps, iterations, lr, weight decay, seed.
    """

    def __init__(self, unet, text_encoder, tokenizer, scheduler, candidates: Sequence[int],
                 settings: UnlearnDiffSettings | None = None):
        from recare.train.textual_inversion import share_weights_copy

        self.unet, self.tokenizer, self.scheduler = unet, tokenizer, scheduler
        self.settings = settings or UnlearnDiffSettings()
        self.candidates = torch.tensor(list(candidates), dtype=torch.long)
        base = text_encoder.get_input_embeddings()
        self.encoder = share_weights_copy(text_encoder)
        self.embedding = PrefixEmbedding(base)
        self.encoder.set_input_embeddings(self.embedding)
        self.rows = base.weight.detach()[self.candidates.to(base.weight.device)]   # E: (V, D)
        self.device = next(unet.parameters()).device
        self.alphas = scheduler.alphas_cumprod.to(torch.float32)
        self.schedule = attack_timesteps(self.settings.timesteps, int(scheduler.config.num_train_timesteps))

    def loss(self, probs: torch.Tensor, ids: torch.Tensor, x0: torch.Tensor, t: int,
             generator: torch.Generator) -> torch.Tensor:
        """The diffusion-classifier loss of one sampled prefix at timestep t (see the module docstring)."""
        one_hot = straight_through_sample(probs, generator)
        self.embedding.prefix = one_hot @ self.rows.to(one_hot.dtype)
        try:
            hidden = self.encoder(ids.to(self.device))[0]
        finally:
            self.embedding.prefix = None
        noise = torch.randn(x0.shape, generator=generator).to(self.device, x0.dtype)
        a = self.alphas[t].to(self.device)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        dtype = next(self.unet.parameters()).dtype
        timestep = torch.tensor([t], device=self.device)
        prediction = predict_noise(self.unet, noisy.to(dtype), timestep, hidden.to(dtype))
        return F.mse_loss(prediction.float(), noise.float())

    def discrete_prompt(self, probs: torch.Tensor, prompt: str) -> tuple[str, list[str]]:
        """The argmax token of each row, then the prompt, as text (and the prefix tokens as spelled)."""
        chosen = self.candidates[probs.detach().argmax(dim=-1).cpu()].tolist()
        words = self.tokenizer.convert_ids_to_tokens(chosen)
        prefix = self.tokenizer.decode(chosen).strip()
        return f"{prefix} {prompt}".strip(), list(words)

    def attack(self, prompt: str, x0: torch.Tensor, check: Callable[[str], bool],
               progress: ProgressCallback | None = None, cancel: CancelToken | None = None,
               message: str = "") -> UnlearnDiffResult:
        """Attack one prompt.

        Args:
            prompt: the prompt.
            x0: (1, C, h, w) latent of the original model's image of the prompt (scaled, as the UNet sees it).
            check: prompt text -> does the unlearned model's image of it (at the attack seed) show the target.
            progress: one event per timestep (stage "ud").
            cancel: checked between iterations.
            message: carried by every progress event.
        """
        s = self.settings
        if check(prompt):
            return UnlearnDiffResult(prompt, prompt, True, True, checks=1)
        generator = torch.Generator().manual_seed(int(s.seed))
        ids = prefixed_ids(self.tokenizer, prompt, s.k)
        x0 = x0.to(self.device, torch.float32)
        probs = torch.full((s.k, len(self.candidates)), 1.0 / len(self.candidates), device=self.device)
        probs = project_to_simplex(probs).requires_grad_(True)
        optimizer = torch.optim.Adam([probs], lr=s.learning_rate, weight_decay=s.weight_decay)
        result = UnlearnDiffResult(prompt, prompt, False, False, checks=1)
        for n, t in enumerate(self.schedule):
            total = 0.0
            for _ in range(s.iterations):
                check_cancel(cancel, "the UnlearnDiff attack")
                optimizer.zero_grad(set_to_none=True)
                loss = self.loss(probs, ids, x0, t, generator)
                probs.grad = torch.autograd.grad(loss, [probs])[0]
                optimizer.step()
                with torch.no_grad():
                    probs.copy_(project_to_simplex(probs))
                total += float(loss.detach())
            result.losses.append(total / s.iterations)
            result.final_prompt, result.prefix = self.discrete_prompt(probs, prompt)
            result.checks += 1
            emit(progress, STAGE_UD, n + 1, len(self.schedule), message or prompt[:40], loss=result.losses[-1])
            if check(result.final_prompt):
                result.success, result.timestep = True, int(t)
                break
        return result


def image_latent(vae, image, resolution: int | None = None) -> torch.Tensor:
    """(1, C, h, w): the VAE latent distribution's mean of `image` times the scaling factor (as the reference)."""
    from recare.train.textual_inversion import prepare_images

    param = next(vae.parameters())
    size = resolution or image.size[0]
    pixels = prepare_images([image], size).to(param.device, param.dtype)
    with torch.no_grad():
        mean = vae.encode(pixels).latent_dist.mean.float()
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    return (mean - shift) * float(vae.config.scaling_factor)




def ud_candidates(config, tokenizer) -> list[int]:
    """The candidate vocabulary of an evaluation: the mini world's lexicon (its other tokens were never
    trained), else the tokenizer's whole vocabulary (SD v1.4, as the paper)."""
    words = None
    if config.model == "mini-world":
        from recare import worldspec

        words = (worldspec.mini_world_spec().get("vocabulary") or {}).get("words")
    return candidate_ids(tokenizer, words)


def attack_prompts(pipe, prompts: Sequence[str], originals: Sequence[Any], shows_target: Callable[[str], bool],
                   config, run: int, done: dict[str, dict], save: Callable[[dict], None],
                   progress: ProgressCallback | None = None, cancel: CancelToken | None = None) -> dict[str, dict]:
    """One run of UnlearnDiff over every prompt of an evaluation (`done` prompts are skipped: resume).

    Args:
        pipe: the unlearned model (its UNet, text encoder, tokenizer, scheduler are read).
        prompts: the UnlearnDiff prompts.
        originals: the original model's image of each prompt (PIL), at the attack seed.
        shows_target: prompt -> does the unlearned model's image of it at the attack seed show the target.
        config: the resolved EvaluationConfig (ud_k, ud_timesteps, ud_iterations, ud_seed).
        run: the run (its seed is ud_seed + run).
        done: {prompt: result dict} already attacked; filled in place.
        save: called with `done` after every prompt.
        progress, cancel: see `recare.progress` (stage "ud").

    Returns:
        `done`, with every prompt.
    """
    from recare.train.textual_inversion import native_resolution

    settings = UnlearnDiffSettings(k=config.ud_k, timesteps=config.ud_timesteps, iterations=config.ud_iterations,
                                   seed=config.ud_seed + int(run))
    attacker = UnlearnDiff(pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler,
                           ud_candidates(config, pipe.tokenizer), settings)
    size = native_resolution(pipe.unet, pipe.vae) if config.height is None else config.height
    for n, (prompt, original) in enumerate(zip(prompts, originals)):
        if prompt in done:
            continue
        x0 = image_latent(pipe.vae, original, size)
        result = attacker.attack(prompt, x0, shows_target, progress, cancel,
                                 message=f"run {run + 1}, prompt {n + 1} of {len(prompts)}")
        done[prompt] = result.to_dict()
        save(done)
    return done


__all__ = ["UnlearnDiff", "UnlearnDiffSettings", "UnlearnDiffResult", "attack_timesteps", "project_to_simplex",
           "straight_through_sample", "PrefixEmbedding", "candidate_ids", "prefixed_ids", "image_latent",
           "k_for_concept", "STAGE_UD", "PAPER_K", "ud_candidates", "attack_prompts"]
