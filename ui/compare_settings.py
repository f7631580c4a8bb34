"""What Compare evaluates, as data: the models a browser can pick and the settings every picked model runs with.

No Gradio here (`ui.compare_tab` lays out the form and wires its events):
- `model_options` / `model_label`: the base (the header's model), the owner's finished training runs and
  uploaded checkpoints (run folders of kind "checkpoint").
- `CompareSettings`: the form's raw values checked and bounded; `evaluation` gives one model's EvaluationConfig.
- `evaluation_requests`: one `recare.jobs.requests.EvaluateRequest` per picked model, every model checked before
  any job exists (the caller submits them as one batch).
- `task_prompts`: the target prompt and CARE prompts a mini-world task fills in.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from recare import models
from recare.errors import ConfigError, ModelLoadError, RecareError, RunError
from recare.eval import attacks as eval_attacks
from recare.eval.config import EvaluationConfig
from recare.runs import DONE
from ui.common import number

BASE = "base"  # the model list's value for the header's base model
CHECKPOINT_KIND = "checkpoint"
CHECKPOINT_NAMES = (models.TRAINED_PARAMS_FILE, models.OFFICIAL_UNET_FILE)
ATTACK_CHOICES = tuple(a for a in ("erased", "cce", "ud", "adversarial", "completion", "noise") if a in eval_attacks.ATTACKS)
DEFAULT_ATTACK_RUNS = 2   # runs of each learned attack (CCE, UnlearnDiff) a Compare evaluation makes
TOKEN_ATTACKS = ("adversarial",)  # need the model's own learned tokens: skipped for models without them
MAX_CUSTOM_PROMPTS, MAX_PROMPT_CHARS = 8, 300


def task_prompts(task) -> tuple[str, str]:
    """(target prompt, CARE prompts as JSON) of a mini-world task."""
    from recare.workflows import mini_world_task

    t = mini_world_task(task)
    return t.get("target_prompt", ""), json.dumps(t.get("care_prompts") or {}, indent=1)


def model_options(ctx, owner: str) -> list[tuple[str, str]]:
    """(label, value) of every model the owner can compare: the base, finished training runs, checkpoints."""
    options = [("base model (header)", BASE)]
    for kind in ("train", CHECKPOINT_KIND):
        for run in ctx.runs.list(owner=owner, kind=kind):
            if run.bundled:
                continue
            try:
                if run.status().get("state") != DONE:
                    continue
                options.append((model_label(run), run.id))
            except RecareError:
                continue
    return options


def model_label(run) -> str:
    config = run.config()
    if "checkpoint" in config:
        return f"uploaded {config['checkpoint'].get('file')} ({run.id})"
    train = config.get("train") or {}
    concept = train.get("reference_word", "")
    return f"{run.id} ({train.get('method', '')}{', ' + concept if concept else ''})"


def _care_prompts(text) -> dict[str, list[str]]:
    from recare.jobs.checks import parse_json

    value = parse_json(text or "{}", "the CARE prompts")  # depth checked before Python's parser recurses
    if not isinstance(value, dict) or not value:
        raise ConfigError('the CARE prompts must map each CARE concept to a list of prompts: {"person": ["..."]}.')
    return value


def _custom_prompts(text) -> list[str]:
    """The custom prompts box: one prompt per line, blank lines and repeats dropped."""
    if text is not None and not isinstance(text, str):
        raise ConfigError("the custom prompts must be text, one prompt per line.")
    prompts = list(dict.fromkeys(line.strip() for line in (text or "").splitlines() if line.strip()))
    if len(prompts) > MAX_CUSTOM_PROMPTS:
        raise ConfigError(f"at most {MAX_CUSTOM_PROMPTS} custom prompts (got {len(prompts)}).")
    long = [p for p in prompts if len(p) > MAX_PROMPT_CHARS]
    if long:
        raise ConfigError(f"a custom prompt is longer than {MAX_PROMPT_CHARS} characters: {long[0][:40]!r}...")
    return prompts


@dataclasses.dataclass(frozen=True)
class CompareSettings:
    """What Evaluate runs: the same prompts, attacks and seeds for every picked model.

    Attributes:
        picked: the model list's values (BASE, training run ids, checkpoint run ids).
        task: the mini-world task (None for another base model).
        target_prompt: the erased attack's prompt (None: the task's).
        care_prompts: CARE concept -> prompts.
        attacks: attack names; TOKEN_ATTACKS are dropped for a model without learned tokens.
        seeds: images per attack and custom prompt; care_images: per CARE prompt; clip_count: CLIP captions.
        custom_prompts: extra prompts, made and judged, never scored.
        model_name: the header's base model.
        attack_runs: runs of each learned attack (CCE, UnlearnDiff).
    """

    picked: tuple[str, ...]
    task: str | None
    target_prompt: str | None
    care_prompts: dict
    attacks: tuple[str, ...]
    seeds: int
    care_images: int
    clip_count: int
    custom_prompts: tuple[str, ...]
    model_name: str
    attack_runs: int = DEFAULT_ATTACK_RUNS

    @classmethod
    def from_inputs(cls, picked, task, target_prompt, care_prompts, attacks, seeds, care_images, clip_count,
                    custom_prompts, model_name, attack_runs=DEFAULT_ATTACK_RUNS) -> "CompareSettings":
        """Check the form's raw values (ConfigError with what to fix)."""
        from recare.jobs.checks import run_ids

        picked = tuple(run_ids(picked, what="models"))
        if not picked:
            raise ConfigError("pick at least one model.")
        if attacks is not None and not isinstance(attacks, (list, tuple)):
            raise ConfigError(f"the attacks must be a list of names from {', '.join(ATTACK_CHOICES)}.")
        attacks = tuple(dict.fromkeys(a for a in (attacks or []) if isinstance(a, str)))
        if not attacks:
            raise ConfigError(f"pick at least one attack ({', '.join(ATTACK_CHOICES)}).")
        for name, value in (("the target prompt", target_prompt), ("the task", task), ("the model", model_name)):
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"{name} must be text, not {type(value).__name__}.")
        base_model = str(model_name or models.MINI_WORLD)
        return cls(picked=picked, task=task if base_model == models.MINI_WORLD and task else None,
                   target_prompt=(target_prompt or "").strip() or None, care_prompts=_care_prompts(care_prompts),
                   attacks=attacks, seeds=int(number(seeds, "seeds")),
                   care_images=int(number(care_images, "CARE images per prompt")),
                   clip_count=int(number(clip_count, "CLIP captions")), custom_prompts=tuple(_custom_prompts(
                       custom_prompts)), model_name=base_model,
                   attack_runs=int(number(attack_runs, "runs per learned attack")))

    def evaluation(self, model: str, unet: str | None, has_tokens: bool, device: str) -> EvaluationConfig:
        """The EvaluationConfig of one model (ConfigError when none of the attacks applies to it)."""
        attacks = [a for a in self.attacks if has_tokens or a not in TOKEN_ATTACKS]
        if not attacks:
            raise ConfigError(f"{', '.join(TOKEN_ATTACKS)} needs a training run's learned tokens; pick another attack "
                              "too for the base model and uploaded checkpoints.")
        return EvaluationConfig(model=model, unet=unet, task=self.task if model == models.MINI_WORLD else None,
                                target_prompt=self.target_prompt, care_prompts=self.care_prompts, attacks=attacks,
                                seeds=self.seeds, care_images_per_prompt=self.care_images, clip_count=self.clip_count,
                                extra_prompts=list(self.custom_prompts), attack_runs=self.attack_runs, device=device)


def _has_tokens(weights: Path) -> bool:
    try:
        models.find_token_files(weights)
    except ModelLoadError:
        return False
    return True


def evaluation_requests(ctx, settings: CompareSettings, owner: str) -> list:
    """One EvaluateRequest per picked model (RecareError naming the first model that cannot be evaluated).

    Args:
        ctx: the app's context (run store, model cache's device).
        settings: the checked form.
        owner: whose runs the picked ids must be.
    """
    from recare.jobs.requests import EvaluateRequest

    device = str(ctx.models.device)
    jobs = []
    for value in settings.picked:
        if value == BASE:
            config = settings.evaluation(settings.model_name, None, False, device)
            label = f"base ({settings.model_name})"
        else:
            run = ctx.runs.get(value, owner)
            if run.bundled or run.kind not in ("train", CHECKPOINT_KIND):
                raise RunError(f"run {run.id} is not a model: pick the base, a training run or a checkpoint.")
            if run.status().get("state") != DONE:
                raise RunError(f"run {run.id} has not finished.")
            stored = run.config()
            weights = run.path / stored["checkpoint"]["file"] if "checkpoint" in stored else run.path
            model = (stored.get("checkpoint") or stored.get("train") or {}).get("model") or settings.model_name
            config = settings.evaluation(model, str(weights), _has_tokens(weights), device)
            label = model_label(run)
        jobs.append(EvaluateRequest(config.to_dict(), compare={"label": label, "model": value}))
    return jobs
