"""Stage 1 as a search: how strongly each round's learned token draws the target.

After round r's textual inversion, "a photo of <vr*>" ("a painting in the style of <vr*>" for styles,
the task's prompt style) is generated on a small fixed seed set (`Stage1Config.probe_seeds`, seeds
base_seed + i of the generation settings) twice: on the model as round r's erasure left it, then on the
original model (the frozen teacher of Eq. 13; the closing search skips this one where it cannot change the
search, `closing_needs_original`). The judge (the mini world's oracle; for another model
the target detector the evaluation would pick, `recare.eval.config`) says in which images the target
is. The two fractions tell whether stage 1 found a token that draws the target at all (original) and
whether it recovers the target from the partly erased model (erased). The probe never changes a
model, a token or a training generator: the trained weights do not depend on it.

    probe = build_probe(config, pipe)                      # None when probe_seeds is 0
    strength = probe(round_index, token, erased_unet)      # a TokenStrength

The detector is loaded at the first probe; when it cannot be loaded (a classifier whose weights are not
on this machine), `JudgeUnavailable` says why and the recipe records that instead of failing the training.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any, Callable, Sequence

import torch

PROBE_STAGE = "stage1.probe"
Judge = Callable[[Sequence[Any]], Sequence[bool]]   # images -> target present, one per image


class JudgeUnavailable(RuntimeError):
    """The probe's detector cannot be loaded here; the message says why."""


@dataclasses.dataclass(frozen=True)
class TokenStrength:
    """One round's probe.

    Attributes:
        round: the round, from 1.
        token: the placeholder ("<v1*>").
        prompt: the generated prompt.
        original: fraction of images judged as the target on the original model; None where the closing search
            skipped it because it could not change the search's decision (`Stage1Probe.__call__`'s `original_if`).
        erased: the same on the round's erased model.
        seeds: images per model.
        norm: the token embedding's L2 norm (trained words of the mini world sit at <= 0.53).
        seconds: the probe's wall time.
        joins_h: whether the token joins stage 2's erase set H (`Stage1Config.min_token_strength`: a token
            that does not draw the target on the original model is not an adversarial concept of it).
        attempt: which textual inversion of the round's search (`Stage1Config.attempts`), from 1.
        kept: whether it is the round's strongest so far on the original model (the one the round keeps).
        steps: the inversion's textual-inversion steps when probed (0: not recorded; the closing search probes
            one inversion on the way and at its end, `Stage2Config.closing_probe_steps`).
    """

    round: int
    token: str
    prompt: str
    original: float | None
    erased: float
    seeds: int
    norm: float
    seconds: float = 0.0
    joins_h: bool = True
    attempt: int = 1
    kept: bool = True
    steps: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def metrics(self) -> dict[str, float]:
        """The numbers of a metrics.jsonl line (a ProgressEvent's metrics are numbers only)."""
        numbers = {"original": self.original, "erased": self.erased, "seeds": float(self.seeds), "norm": self.norm,
                   "seconds": self.seconds, "joins_h": float(self.joins_h), "attempt": float(self.attempt),
                   "kept": float(self.kept), "steps": float(self.steps)}
        return {k: v for k, v in numbers.items() if v is not None}

    def sentence(self, attempts: int = 1) -> str:
        """ "round 1: <v1*> draws the target in 56% on the original, 12% on the erased model" (with the
        inversion's number when the round searches with several). """
        which = f", inversion {self.attempt} of up to {attempts}" if attempts > 1 else ""
        left_out = "" if self.joins_h else "; too weak to join stage 2's erase set"
        return (f"round {self.round}{which}: {self.token} draws the target in {self.original:.0%} of images on the "
                f"original, {self.erased:.0%} on the erased model{left_out}")

    def closing_sentence(self, k: int, attempts: int, checkpoints: int = 1) -> str:
        """ "closing round 1, inversion 2 of up to 3, after 250 steps: <v3*> draws the target in 100% of images on
        the original, 38% on the trained model; joins H" (`attempt` counts probes: `checkpoints` per inversion) """
        verdict = "joins H" if self.joins_h else "stays out of H"
        after = f", after {self.steps} steps" if self.steps else ""
        where = (f"{self.erased:.0%} of images on the trained model, less than the round's kept candidate (the original "
                 "was not probed)" if self.original is None else
                 f"{self.original:.0%} of images on the original, {self.erased:.0%} on the trained model")
        return (f"closing round {k + 1}, inversion {(self.attempt - 1) // checkpoints + 1} of up to {attempts}{after}: "
                f"{self.token} draws the target in {where}; {verdict}")


def probe_prompt(placeholder: str, style: str) -> str:
    """The probe's prompt: "a photo of <v1*>", or "a painting in the style of <v1*>" for the painting style."""
    return f"a painting in the style of {placeholder}" if style == "painting" else f"a photo of {placeholder}"


def generation_settings(model: str, seeds: int):
    """The probe's GenerateConfig: the mini world's generation settings, else the library defaults."""
    from recare.config import GenerateConfig

    if model == "mini-world":
        from recare.worldspec import generate_defaults

        base = generate_defaults()
    else:
        base = GenerateConfig()
    return dataclasses.replace(base, prompt="probe", num_images=seeds)


def detector_judge(model: str, concept: str, style: str) -> Judge:
    """The target detector the evaluation picks for this model and concept, as a judge."""
    from recare.eval.config import _default_detector, _detector_defaults
    from recare.eval.detectors import make_detector

    name = _default_detector(model, concept, style)
    detector = make_detector(name, **_detector_defaults(name, concept, ""))
    return lambda images: [r.positive for r in detector.detect(list(images))]


PROBED, ORIGINAL = "probed", "original"    # each judged image's `info["probe_model"]`: which model drew it


def draw_rate(pipe, unet: torch.nn.Module, text, prompt: str, judge: Judge, generation, model: str = PROBED) -> float:
    """Fraction of `generation`'s seeds whose image of `prompt` the judge calls the target.

    Args:
        pipe: the base pipeline (its VAE and scheduler config are used, not changed).
        unet: the UNet to generate with.
        text: (tokenizer, text encoder) that know the token, `with_learned_tokens(pipe.tokenizer,
            pipe.text_encoder, [token])` (made once per token: copying the tokenizer takes about 0.5 s on the mini
            world).
        prompt: the prompt, naming the token's placeholder.
        judge: images -> bools.
        generation: a GenerateConfig (its prompt is replaced).
        model: written into each image's `info["probe_model"]` before it is judged (a planted judge in a test
            reads it; a detector ignores it).
    """
    from recare.generate import generate_images

    tokenizer, encoder = text
    components = {**pipe.components, "unet": unet, "tokenizer": tokenizer, "text_encoder": encoder,
                  "scheduler": type(pipe.scheduler).from_config(pipe.scheduler.config)}
    if "requires_safety_checker" in inspect.signature(type(pipe).__init__).parameters:
        components["requires_safety_checker"] = getattr(pipe.config, "requires_safety_checker", False)
    probe_pipe = type(pipe)(**components)
    probe_pipe.set_progress_bar_config(disable=True)
    images = generate_images(probe_pipe, dataclasses.replace(generation, prompt=prompt)).images
    for image in images:
        image.info["probe_model"] = model
    hits = [bool(h) for h in judge(images)]
    return sum(hits) / len(hits) if hits else 0.0


class Stage1Probe:
    """Measures each stage-1 token on the original and on the erased model.

    Args:
        pipe: the base pipeline (its UNet is the original model).
        judge: images -> target present (`detector_judge`, or any callable in tests).
        generation: the GenerateConfig whose seeds and settings the probe uses (`generation_settings`).
        style: "photo" or "painting" (the probe's prompt).
    """

    def __init__(self, pipe, judge: Judge | Callable[[], Judge], generation, style: str = "photo", *,
                 lazy: bool = False):
        self.pipe, self.generation, self.style = pipe, generation, style
        self._judge, self._make_judge = (None, judge) if lazy else (judge, None)

    @property
    def judge(self) -> Judge:
        """The judge (a lazy one is built at the first call; JudgeUnavailable when it cannot be)."""
        if self._judge is None:
            from recare.errors import EvaluationError, ModelLoadError

            try:
                self._judge = self._make_judge()
            except (EvaluationError, ModelLoadError, OSError) as e:
                raise JudgeUnavailable(f"stage 1's token probe was skipped: its detector could not be loaded ({e})") \
                    from e
        return self._judge

    def __call__(self, round_index: int, token, erased_unet: torch.nn.Module,
                 original_if: Callable[[float], bool] | None = None) -> TokenStrength:
        """Probe `token` on the erased model, then on the original one (the images are judged in that order).

        Args:
            round_index: the round, from 0.
            token: the LearnedToken.
            erased_unet: the erased (or trained) UNet.
            original_if: given the erased model's fraction, whether the original model is probed too (the closing
                search skips it where it cannot change the search's decision); None: always.
        """
        import time

        from recare.train.textual_inversion import with_learned_tokens

        started = time.perf_counter()
        judge = self.judge
        prompt = probe_prompt(token.placeholder, self.style)
        text = with_learned_tokens(self.pipe.tokenizer, self.pipe.text_encoder, [token])
        erased = draw_rate(self.pipe, erased_unet, text, prompt, judge, self.generation)
        original = (draw_rate(self.pipe, self.pipe.unet, text, prompt, judge, self.generation, ORIGINAL)
                    if original_if is None or original_if(erased) else None)
        norm = float(token.embedding.float().norm())
        return TokenStrength(round=round_index + 1, token=token.placeholder, prompt=prompt, original=original,
                             erased=erased, seeds=int(self.generation.num_images),
                             norm=round(norm, 4) if math.isfinite(norm) else norm,
                             seconds=round(time.perf_counter() - started, 1))


def build_probe(config, pipe, judge: Judge | None = None) -> Stage1Probe | None:
    """The probe a TrainConfig asks for (None without stage 1 or with `stage1.probe_seeds` 0).

    Args:
        config: the TrainConfig.
        pipe: the base pipeline.
        judge: overrides the evaluation's target detector (tests pass a planted one).
    """
    s1 = config.stage1
    if s1 is None or s1.probe_seeds == 0:
        return None
    style = s1.textual_inversion.templates
    generation = generation_settings(config.model, s1.probe_seeds)
    if judge is not None:
        return Stage1Probe(pipe, judge, generation, style)
    return Stage1Probe(pipe, lambda: detector_judge(config.model, config.reference_word, style), generation, style,
                       lazy=True)


def record_strength(summary: dict, strength: TokenStrength, attempt: int, min_token_strength: float) -> TokenStrength:
    """Record one probed inversion of a round's search in a training summary's "stage1_probe" (one entry per
    round: the strongest inversion so far on the original model, the earliest on a tie, with every inversion
    under "attempts"). Returns `strength` with its attempt (from 1), `kept` and `joins_h` set.

    Args:
        summary: the recipe's summary (result.json's fields); changed in place.
        strength: the probe's measurement of the inversion.
        attempt: the inversion's index in the round's search, from 0.
        min_token_strength: `Stage1Config.min_token_strength` (0: every token joins H).
    """
    joins = min_token_strength == 0 or strength.original >= min_token_strength
    return _record_inversion(summary, "stage1_probe", "round", strength.round, strength, attempt, joins,
                             rank=lambda entry: entry["original"])


def record_closing(summary: dict, k: int, strength: TokenStrength, attempt: int,
                   min_token_strength: float) -> TokenStrength:
    """Record one probed inversion of the closing search's round k (from 0) in a training summary's
    "closing_probe" (one entry per round: the candidate that draws the target most often on the trained UNet,
    `erased` here, then on the original; the earliest on a tie; every candidate under "attempts"). `attempt`
    numbers the round's probes from 0: one per inversion, or one per inversion and checkpoint with
    `Stage2Config.closing_probe_steps`. Returns `strength` with its attempt (from 1), `kept` and `joins_h` (it
    draws the target on the trained UNet at all and on the original at least `min_token_strength`) set. A candidate
    whose original was not probed (`closing_needs_original` said no) ranks below the kept one and does not join."""
    joins = strength.erased > 0 and strength.original is not None and strength.original >= min_token_strength
    return _record_inversion(summary, "closing_probe", "closing_round", k + 1, strength, attempt, joins,
                             rank=_closing_rank)


def _closing_rank(entry: dict) -> tuple[float, float]:
    return entry["erased"], -1.0 if entry["original"] is None else entry["original"]


def closing_needs_original(summary: dict, k: int, attempt: int, early_stop: float) -> Callable[[float], bool]:
    """Whether closing round k's probe number `attempt` (from 0) must also probe the original model, given its
    fraction on the trained UNet: only where that can change the search. The kept candidate is the strongest on
    the trained UNet (the original breaks ties), joining H needs the original, and the search stops early at
    `early_stop` on the trained UNet; a candidate below the kept one and below `early_stop` changes nothing."""
    kept = _kept_before(summary, "closing_probe", "closing_round", k + 1, attempt)
    return lambda erased: kept is None or erased >= kept["erased"] or erased >= early_stop


def _kept_before(summary: dict, key: str, round_field: str, round_number: int, attempt: int) -> dict | None:
    """The round's kept entry from its earlier probes, None before its first (a probe recorded again on resume,
    the same `attempt`, does not count as earlier)."""
    entry = next((e for e in summary.get(key, []) if e.get(round_field) == round_number), None)
    return entry if entry is not None and entry.get("attempt", 1) != attempt + 1 else None


def _record_inversion(summary: dict, key: str, round_field: str, round_number: int, strength: TokenStrength,
                      attempt: int, joins: bool, rank: Callable[[dict], Any]) -> TokenStrength:
    """One search's bookkeeping for `record_strength` and `record_closing`: `summary[key]` holds one entry per
    round (`round_field` = `round_number`), the inversion ranked highest by `rank` so far (the earliest on a tie),
    with every inversion of the round under "attempts"."""
    entries = {p.get(round_field): p for p in summary.get(key, [])}
    round_entry = entries.get(round_number)
    previous = _kept_before(summary, key, round_field, round_number, attempt)
    kept = previous is None or rank(strength.to_dict()) > rank(previous)
    strength = dataclasses.replace(strength, attempt=attempt + 1, kept=kept, joins_h=joins)
    tries = [t for t in (round_entry or {}).get("attempts", []) if t.get("attempt", 1) < attempt + 1]
    tries.append({k: v for k, v in strength.to_dict().items()
                  if k in ("attempt", "original", "erased", "norm", "seconds") or (k == "steps" and v)})
    entries[round_number] = {**(strength.to_dict() if kept else previous), round_field: round_number, "attempts": tries}
    summary[key] = [entries[k] for k in sorted(entries)]
    return strength


def joins_h(summary: dict, token) -> bool:
    """Whether a stage-1 token joins stage 2's H: as its round's probe entry says (`record_strength`); a token
    without one (no probe, no judge) joins, as the official code keeps every token."""
    for probe in summary.get("stage1_probe", []):
        if probe.get("token") == token.placeholder:
            return bool(probe.get("joins_h", True))
    return True


def probe_rows(rows: Sequence[dict]) -> list[dict]:
    """The stage-1 probe records among metrics.jsonl rows, one per round in round order: the round's kept token
    (its strongest inversion on the original model; the earliest on a tie), with "inversions", how many were
    probed."""
    found: dict[int, dict] = {}
    tried: dict[int, set] = {}
    for row in rows:
        if row.get("stage") != PROBE_STAGE:
            continue
        r = int(row.get("step") or 0)
        tried.setdefault(r, set()).add(row.get("attempt", 1.0))
        if row.get("kept", 1.0):   # `record_strength` decided it: the round's strongest so far (older lines: each)
            found[r] = row
    return [{**found[k], "inversions": len(tried[k])} for k in sorted(found)]
