"""The plan of an evaluation run: every image it makes (attack, prompt, seed, file), in batches.

Per attack, its prompts x seeds base_seed + i; the CARE prompts x care_images_per_prompt seeds; one
image per CLIP caption (caption i: seed base_seed + i). A batch is `batch_size` consecutive images of
one attack, always the same images whatever the process count (the unit of work, resume and sharding).
`prompt_table` and `planned_counts` describe the same plan without loading any model.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from recare.eval.attacks import ATTACKS, Attack, AttackContext
from recare.eval.config import EvaluationConfig, _tokens_dir, attack_runs_of

CARE, CLIP = "care", "clip"   # the two image sets that are not attacks
EXTRA = "extra"               # custom prompts (config.extra_prompts): generated and judged, never in an ASR


@dataclasses.dataclass(frozen=True)
class PlanItem:
    """One image of the evaluation.

    Attributes:
        index: position in the plan (the order of records.csv).
        attack: an attack name, "care" or "clip".
        concept: the target concept (attacks), the CARE concept (care) or "" (clip).
        prompt: the prompt it is generated from.
        seed: its seed.
        file: its path inside the run folder.
        run: the learned attack's run (0 for everything else).
    """

    index: int
    attack: str
    concept: str
    prompt: str
    seed: int
    file: str
    run: int = 0

    @property
    def key(self) -> tuple[str, int, str, str, int]:
        """What identifies the image across runs and processes (the resume key)."""
        return (self.attack, self.run, self.concept, self.prompt, self.seed)


@dataclasses.dataclass(frozen=True)
class PlanBatch:
    """Consecutive images of one attack made by one pipeline call (the unit of work, resume and sharding)."""

    number: int
    attack: str
    items: tuple[PlanItem, ...]


def _plain(ctx: AttackContext, run: int = 0):
    return ctx.pipe


# the CARE-score and CLIP-score images: the model itself on their prompts (rows beside the attack table)
IMAGE_SETS: dict[str, Attack] = {
    CARE: Attack(CARE, "CARE-score prompts (Eq. 4)", (), lambda ctx: [], _plain),
    CLIP: Attack(CLIP, "CLIP-score captions (utility)", (), lambda ctx: [], _plain),
    EXTRA: Attack(EXTRA, "custom prompts (shown, not scored)", (), lambda ctx: list(ctx.config.extra_prompts), _plain),
}


def build_plan(config: EvaluationConfig, ctx: AttackContext, captions: Sequence[str]) -> list[PlanBatch]:
    """Every image of the run, in batches.

    Args:
        config: the resolved settings.
        ctx: the attack context (prompts of "adversarial" come from its tokens).
        captions: the CLIP-score prompts (`recare.eval.utility.clip_prompts`).
    """
    groups: list[tuple[str, list[tuple[str, str, int, str, int]]]] = []
    seeds = [config.base_seed + i for i in range(config.seeds)]
    for name in config.attacks:
        prompts = ATTACKS[name].prompts(ctx)
        for run in range(attack_runs_of(config, name)):   # a batch never mixes two runs (two pipelines)
            folder = f"images/{name}" + (f"/run{run}" if run else "")
            groups.append((name, [(config.target_concept, p, s, f"{folder}/p{k:02d}-s{s}.png", run)
                                  for k, p in enumerate(prompts) for s in seeds]))
    if config.extra_prompts:  # the attacks' seeds, so a custom prompt lines up with the target prompt's images
        groups.append((EXTRA, [("", p, s, f"images/{EXTRA}/p{k:03d}-s{s}.png", 0)
                               for k, p in enumerate(config.extra_prompts) for s in seeds]))
    care = [(c, p) for c, ps in config.care_prompts.items() for p in ps]
    care_seeds = [config.base_seed + i for i in range(config.care_images_per_prompt)]
    groups.append((CARE, [(c, p, s, f"images/care/p{k:03d}-s{s}.png", 0) for k, (c, p) in enumerate(care)
                          for s in care_seeds]))
    groups.append((CLIP, [("", p, config.base_seed + k, f"images/clip/p{k:05d}-s{config.base_seed + k}.png", 0)
                          for k, p in enumerate(captions)]))
    batches, index = [], 0
    for name, entries in groups:
        for start in range(0, len(entries), config.batch_size):
            items = []
            for concept, prompt, seed, file, run in entries[start:start + config.batch_size]:
                items.append(PlanItem(index, name, concept, prompt, seed, file, run))
                index += 1
            batches.append(PlanBatch(len(batches), name, tuple(items)))
    return batches


def prompt_table(config: EvaluationConfig) -> list[dict[str, Any]]:
    """Every prompt of the run's plan except the CLIP captions, with its seeds, loading no model.

    Returns:
        [{"set": an attack, "extra" or "care", "run": the learned attack's run (else 0), "concept": ...,
        "prompt": ..., "seeds": [...]}] in plan order (the "adversarial" prompts name the run's own token
        placeholders; UnlearnDiff's are its prompts before the attack).

    Args:
        config: the resolved settings (`resolve_config`).
    """
    ctx = AttackContext(config, None, tokens_dir=_tokens_dir(config.unet))
    seeds = [config.base_seed + i for i in range(config.seeds)]
    care_seeds = [config.base_seed + i for i in range(config.care_images_per_prompt)]
    rows = [{"set": name, "run": run, "concept": config.target_concept, "prompt": p, "seeds": seeds}
            for name in config.attacks for run in range(attack_runs_of(config, name)) for p in ATTACKS[name].prompts(ctx)]
    rows += [{"set": EXTRA, "run": 0, "concept": "", "prompt": p, "seeds": seeds} for p in config.extra_prompts]
    rows += [{"set": CARE, "run": 0, "concept": c, "prompt": p, "seeds": care_seeds}
             for c, ps in config.care_prompts.items() for p in ps]
    return rows


def planned_counts(config: EvaluationConfig) -> dict[str, int]:
    """How many images each set of the run's plan holds (each attack, "extra", "care", "clip"), loading no model.

    Equals the counts of `build_plan` for the same settings.

    Args:
        config: the resolved settings (`resolve_config`).
    """
    from recare.eval.utility import read_prompt_file

    out = {name: 0 for name in config.attacks}
    for row in prompt_table(config):
        out[row["set"]] = out.get(row["set"], 0) + len(row["seeds"])
    out[CARE] = out.get(CARE, 0)
    if config.clip_prompts is not None:
        out[CLIP] = len(read_prompt_file(config.clip_prompts, config.clip_count))
    elif config.model == "mini-world":
        from recare.miniworld.heldout import DEFAULT_CAPTIONS

        out[CLIP] = config.clip_count or DEFAULT_CAPTIONS
    else:
        out[CLIP] = 0
    return out
