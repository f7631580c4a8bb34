"""One dataclass per stage; every default is the official one unless a comment says otherwise.

Each config round-trips through JSON (`to_json` / `from_json`) and is written beside every
artifact it made, so a run folder always says how it was produced.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from recare.errors import ConfigError

T = TypeVar("T", bound="JsonConfig")

PROJECTIONS = ("tsne", "umap")
PROMPT_STYLES = ("photo", "painting")

__all__ = ["ConfigError", "JsonConfig", "GenerateConfig", "CareSetConfig", "PROJECTIONS", "PROMPT_STYLES",
           "TextualInversionConfig", "TI_TEMPLATES", "RolloutConfig", "ESDConfig", "Stage1Config", "Stage2Config",
           "TrainConfig", "TRAIN_METHODS", "original_esd_config", "eta_from_negative_guidance", "ESD_NEGATIVE_GUIDANCE", "TRAIN_DTYPES", "TRAINING_METHODS", "OUTPUT_FORMATS"]


@dataclasses.dataclass
class JsonConfig:
    """Mixin: dict/JSON round trip that rejects unknown fields instead of silently dropping them.

    A config validates itself when it is built (`__post_init__` calls `validate`), so an invalid
    config never exists. A field whose type is another JsonConfig (a training config holds a
    stage-1 and a stage-2 config) is rebuilt from its dict by `from_dict`, recursively.
    """

    def __post_init__(self) -> None:
        self.validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown field(s) {unknown}; expected some of {sorted(names)}")
        hints = typing.get_type_hints(cls)
        values = {name: _nested(hints.get(name), value, f"{cls.__name__}.{name}") for name, value in data.items()}
        try:
            return cls(**values)
        except TypeError as e:  # e.g. a field given as a list where a number belongs
            raise ConfigError(f"{cls.__name__}: {e}") from e

    @classmethod
    def from_json(cls: type[T], text_or_path: str | Path) -> T:
        p = Path(text_or_path) if not str(text_or_path).lstrip().startswith("{") else None
        text = p.read_text() if p is not None else str(text_or_path)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{cls.__name__}: not valid JSON ({e})") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.__name__}: expected a JSON object")
        return cls.from_dict(data)

    def validate(self) -> None:  # overridden where there is something to check
        pass


def _nested(hint: Any, value: Any, where: str) -> Any:
    """Rebuild `value` as the JsonConfig subclass named by `hint` (also inside `X | None`)."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)
    for option in options:
        if isinstance(option, type) and issubclass(option, JsonConfig):
            if value is None and type(None) in options:
                return None
            if isinstance(value, option):
                return value
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: expected an object of {option.__name__} fields, got {value!r}")
            return option.from_dict(value)
    return value


@dataclasses.dataclass
class GenerateConfig(JsonConfig):
    """Target-image generation (METHOD.md section 1)."""

    prompt: str = "A photo of a tench"
    num_images: int = 8          # official: 500
    base_seed: int = 42          # image i uses seed base_seed + i (official 42 + i)
    steps: int = 50              # DDIM steps (official 50)
    guidance: float = 7.5        # classifier-free guidance scale (official 7.5)
    batch_size: int = 4          # images per pipeline call; does not change the images
    negative_prompt: str = ""
    height: int | None = None    # None: the model's native size (512 for SD v1.4)
    width: int | None = None

    def validate(self) -> None:
        for name in ("prompt", "negative_prompt"):
            _check_text(name, getattr(self, name))
        if not self.prompt.strip():
            raise ConfigError("The prompt is empty: type what the target images should show.")
        for name in ("num_images", "base_seed", "steps", "batch_size"):
            _check_int(name, getattr(self, name))
        if self.num_images < 1:
            raise ConfigError(f"num_images must be at least 1 (got {self.num_images}).")
        # image i uses seed base_seed + i, and torch.Generator.manual_seed takes a 64-bit integer
        if self.base_seed < 0 or self.base_seed + self.num_images - 1 > MAX_SEED:
            raise ConfigError(f"the seed must be between 0 and {MAX_SEED - self.num_images + 1} for "
                              f"{self.num_images} images (image i uses seed + i; got {self.base_seed}).")
        if self.steps < 1:
            raise ConfigError(f"steps must be at least 1 (got {self.steps}).")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1 (got {self.batch_size}).")
        _check_number("guidance", self.guidance)
        if self.guidance < 0:
            raise ConfigError(f"guidance must be >= 0 (got {self.guidance}).")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value)
                if value < 8 or value % 8:  # the VAE downsamples by 8
                    raise ConfigError(f"{name} must be a multiple of 8 and at least 8, or left unset (got {value}).")


@dataclasses.dataclass
class CareSetConfig(JsonConfig):
    """CARE-set construction, Algorithm 1 (METHOD.md section 2)."""

    reference_word: str = "nudity"   # the target concept; its text feature is e_c (Eq. 6)
    prompt_style: str = "photo"      # "photo" -> "A photo of <w>", "painting" -> "A painting of <w>"
    top_k: int = 50                  # K: tokens kept per image (Eq. 5)
    top_n: int = 100                 # N: most frequent tokens over all images = candidates
    projection: str = "tsne"         # "tsne" (official: init=pca, learning_rate=auto) or "umap"
    n_clusters: int = 6              # paper n=6 (Table 4 ablates 4/5/6); the official code uses 7
    k_each_side: int = 1             # clusters dropped at each end of the mean-residual order (Eq. 7)
    alpha: float = 0.01              # intra-cluster tolerance (Eq. 9)
    min_cluster_size: int = 2        # clusters smaller than this skip intra-cluster refinement
    seed: int = 42                   # t-SNE/UMAP and k-means random_state
    global_clustering: bool = True   # ablation switch (paper Table 3)
    intra_refinement: bool = True    # ablation switch (paper Table 3)

    def validate(self) -> None:
        _check_text("reference_word", self.reference_word)
        if not self.reference_word.strip():
            raise ConfigError("reference_word is empty: name the concept to erase (e.g. 'nudity').")
        if not careset_key(self.reference_word):  # careset.json's keys are made from it
            raise ConfigError(f"reference_word {self.reference_word!r} has no letters or digits (a-z, 0-9) to "
                              "make the careset.json key from: name the concept in plain letters (e.g. 'van gogh').")
        if self.prompt_style not in PROMPT_STYLES:
            raise ConfigError(f"prompt_style must be one of {PROMPT_STYLES} (got {self.prompt_style!r}).")
        if self.projection not in PROJECTIONS:
            raise ConfigError(f"projection must be one of {PROJECTIONS} (got {self.projection!r}).")
        for name in ("top_k", "top_n", "n_clusters", "min_cluster_size", "k_each_side", "seed"):
            _check_int(name, getattr(self, name))
        for name in ("top_k", "top_n", "n_clusters", "min_cluster_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1 (got {getattr(self, name)}).")
        if self.k_each_side < 0:
            raise ConfigError(f"k_each_side must be >= 0 (got {self.k_each_side}).")
        if not 0 <= self.seed <= MAX_SKLEARN_SEED:  # t-SNE, UMAP and k-means take a 32-bit random_state
            raise ConfigError(f"seed must be between 0 and {MAX_SKLEARN_SEED} (got {self.seed}).")
        _check_number("alpha", self.alpha)
        if self.alpha < 0:
            raise ConfigError(f"alpha must be >= 0 (got {self.alpha}).")
        for name in ("global_clustering", "intra_refinement"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false (got {getattr(self, name)!r}).")


MAX_SEED = 2**63 - 1            # torch.Generator.manual_seed takes a signed 64-bit seed
MAX_SKLEARN_SEED = 2**32 - 1    # numpy's RandomState (sklearn, UMAP) takes 0 .. 2**32 - 1
MAX_PROBE_SEEDS = 256           # stage 1's token probe: images per model and round
MAX_STAGE1_ATTEMPTS = 8         # stage 1: textual inversions per round
MAX_CLOSING_ROUNDS = 4          # stage 2's closing search: rounds (each up to closing_attempts inversions)


def careset_key(reference_word: str) -> str:
    """careset.json's key for a reference word: lower-case, spaces removed, only [a-z0-9_-] ("" if none).

    'Van Gogh' -> 'vangogh', as the official code does (recare.careset_io.reference_key raises for "").

    Args:
        reference_word: the concept's name.
    """
    return re.sub(r"[^a-z0-9_-]", "", reference_word.lower().replace(" ", ""))


def _check_text(name: str, value: Any) -> None:
    """ConfigError unless `value` is a string that can be written as UTF-8 (no lone surrogates)."""
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be text (got {type(value).__name__} {value!r:.40}).")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"{name} holds characters that are not valid Unicode text (a lone surrogate); "
                          "retype it.") from None


def _check_int(name: str, value: Any) -> None:
    """ConfigError unless `value` is a whole number (a bool is not)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{name} must be a whole number (got {value!r:.40}).")


def _check_number(name: str, value: Any) -> None:
    """ConfigError unless `value` is a finite real number (NaN and infinity are refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number (got {value!r:.40}).")


TI_TEMPLATES = ("photo", "painting")


@dataclasses.dataclass
class TextualInversionConfig(JsonConfig):
    """Textual inversion of one fresh placeholder token (METHOD.md section 3, stage 1; also evaluation's CCE).

    The official code runs diffusers' textual-inversion example: AdamW (betas 0.9/0.999, weight
    decay 1e-2, eps 1e-8), a constant learning rate scaled by the batch size, random horizontal
    flip 0.5, the ImageNet "a photo of a {}" templates for objects and "a painting in the style of
    {}" templates for styles.
    """

    steps: int = 3000                    # optimisation steps (official 3000)
    learning_rate: float = 5e-3          # base lr; the optimiser uses learning_rate * batch_size when scale_lr
    scale_lr: bool = True                # official: lr x batch size (x gradient accumulation x processes)
    batch_size: int = 1                  # images per step (official 1)
    flip_p: float = 0.5                  # probability of a horizontal flip per image per step (official 0.5)
    templates: str = "photo"             # "photo" (objects, nudity) or "painting" (styles)
    resolution: int | None = None        # None: the model's native size (512 for SD v1.4)
    initializer_token: str = "person"    # the new row starts as this token's embedding (one token)
    placeholder: str = "<v*>"            # the new token's text; must not already be in the vocabulary
    seed: int = 42                       # noise, timesteps, templates and flips all come from this seed
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8

    @property
    def effective_learning_rate(self) -> float:
        """The optimiser's lr: learning_rate x batch_size when scale_lr (official), else learning_rate."""
        return self.learning_rate * self.batch_size if self.scale_lr else self.learning_rate

    def validate(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"steps must be at least 1 (got {self.steps}).")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be > 0 (got {self.learning_rate}).")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1 (got {self.batch_size}).")
        if not 0.0 <= self.flip_p <= 1.0:
            raise ConfigError(f"flip_p must be in [0, 1] (got {self.flip_p}).")
        if self.templates not in TI_TEMPLATES:
            raise ConfigError(f"templates must be one of {TI_TEMPLATES} (got {self.templates!r}).")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise ConfigError(f"resolution must be a multiple of 8 and at least 8, or None (got {self.resolution}).")
        if not self.initializer_token or not self.initializer_token.strip():
            raise ConfigError("initializer_token is empty: name a word the new token starts from (e.g. 'person').")
        if not self.placeholder or not self.placeholder.strip() or any(c.isspace() for c in self.placeholder):
            raise ConfigError(f"placeholder must be a non-empty string without spaces (got {self.placeholder!r}).")
        if not 0.0 <= self.adam_beta1 < 1.0 or not 0.0 <= self.adam_beta2 < 1.0:
            raise ConfigError(f"adam betas must be in [0, 1) (got {self.adam_beta1}, {self.adam_beta2}).")
        if self.adam_weight_decay < 0 or self.adam_epsilon <= 0:
            raise ConfigError("adam_weight_decay must be >= 0 and adam_epsilon > 0.")


# ---------------------------------------------------------------------------------------------
# training (METHOD.md section 3): ESD, stage 1, stage 2 and the recipe that chains them

TRAIN_METHODS = ("noxattn", "xattn", "selfattn", "full")          # trainable-parameter sets (recare.train.params)
TRAIN_DTYPES = ("auto", "fp32", "bf16", "fp16")                   # compute precision; weights stay fp32
TRAINING_METHODS = ("recare", "esd", "recare-no-adv", "recare-no-retain", "custom")
OUTPUT_FORMATS = ("trained_params", "unet_folder", "official_pt")  # what the run folder gets (recare.train.export)


@dataclasses.dataclass
class RolloutConfig(JsonConfig):
    """How x_t is drawn in both stages (METHOD.md section 3, "How x_t is drawn")."""

    steps: int = 50                  # DDIM steps of the roll-out schedule; k is uniform in [1, steps - 2] (official 50)
    guidance: float = 3.0            # classifier-free guidance of the roll-out (official 3)
    resolution: int | None = None    # image size x_t stands for; None: the UNet's native size (official 512)
    batch: int = 1                   # roll-outs of this many upcoming iterations drawn in one batch with the
    #                                  current weights; 1 = official (each iteration rolls out with its own weights)

    def validate(self) -> None:
        if self.batch < 1:
            raise ConfigError(f"rollout batch must be at least 1 (got {self.batch}).")
        if self.steps < 3:
            raise ConfigError(f"rollout steps must be at least 3 so that k in [1, steps - 2] exists (got {self.steps}).")
        if self.guidance < 0:
            raise ConfigError(f"rollout guidance must be >= 0 (got {self.guidance}).")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise ConfigError(f"rollout resolution must be a multiple of 8 and at least 8, or None (got {self.resolution}).")


ESD_NEGATIVE_GUIDANCE = 1.0   # the original ESD's --negative_guidance (eta_o); eta = eta_o + 2 in ESDConfig's notation


def eta_from_negative_guidance(eta_o: float) -> float:
    """ESDConfig.eta for the original ESD's negative guidance eta_o (target e_0 - eta_o (e_c - e_0)): eta_o + 2."""
    return float(eta_o) + 2.0


@dataclasses.dataclass
class ESDConfig(JsonConfig):
    """ESD erasure: stage 1's erase step (official CARE), and the `esd` baseline (the original ESD).

    Loss: || eps_theta(c) - (eps*(c) - (eta - 1) N(eps*(c) - eps*(0); eps*(c))) ||^2. With w = 1 the
    target is eps*(0) - (eta - 2)(eps*(c) - eps*(0)):
      * eta = 2 (the defaults here) pulls eps_theta(c) onto the empty prompt with no push away: the
        official CARE code's stage-1 erase, deliberately partial. It is not the ESD baseline.
      * eta = eta_o + 2 is the original ESD (rohitgandikota/erasing `train-esd.py`: target
        e_0 - eta_o (e_c - e_0), negative guidance eta_o = 1, so eta = 3), which `TrainConfig.for_method("esd")`
        sets, with the original's 1000 iterations at lr 1e-5 and its optimizer: torch Adam without
        weight decay (AdamW with weight_decay 0 makes exactly Adam's update).
    """

    iterations: int = 200            # stage 1: 200 (official CARE --iterations); the esd baseline: 1000 (original ESD)
    learning_rate: float = 0.5e-5    # stage 1: 0.5e-5 (official --recare_stage1_lr); the esd baseline: 1e-5 (original ESD)
    eta: float = 2.0                 # stage 1: 2 (official CARE --negative_guidance 2.0); the esd baseline: 3 (eta_o = 1)
    projection_weight: float = 1.0   # w in N(d; p) = d_orth + w d_par (official 1.0, so N(d; p) = d)
    weight_decay: float = 1e-2       # AdamW weight decay; stage 1: torch's default 1e-2 (official CARE); the esd
    #                                  baseline: 0 (the original ESD's torch.optim.Adam)

    @property
    def negative_guidance(self) -> float:
        """The original ESD's eta_o for this eta (eta - 2): 0 for stage 1's erase, 1 for the ESD baseline."""
        return self.eta - 2.0

    def validate(self) -> None:
        _check_int("ESD iterations", self.iterations)
        if self.iterations < 1:
            raise ConfigError(f"ESD iterations must be at least 1 (got {self.iterations}).")
        for name in ("learning_rate", "eta", "projection_weight", "weight_decay"):
            _check_number(f"ESD {name}", getattr(self, name))
        if not self.learning_rate > 0:
            raise ConfigError(f"ESD learning_rate must be > 0 (got {self.learning_rate}).")
        if self.weight_decay < 0:
            raise ConfigError(f"ESD weight_decay must be >= 0 (got {self.weight_decay}).")


def original_esd_config(**fields: Any) -> ESDConfig:
    """The original ESD's settings (rohitgandikota/erasing `train-esd.py`): negative guidance 1 (eta = 3),
    1000 iterations, lr 1e-5, Adam (AdamW without weight decay); `fields` on top."""
    values = {"iterations": 1000, "learning_rate": 1e-5, "eta": eta_from_negative_guidance(ESD_NEGATIVE_GUIDANCE),
              "weight_decay": 0.0, **fields}
    return ESDConfig(**values)


@dataclasses.dataclass
class Stage1Config(JsonConfig):
    """Stage 1, iterative textual inversion: `n_iterations` rounds of ESD erase -> textual inversion.

    Round i erases the current concept (round 0: the reference word; later: the previous round's
    token) from the UNet as left by the previous rounds, then learns a fresh token against the
    erased model on the i-th disjoint slice of the target images (len(images) // n_iterations each).
    """

    n_iterations: int = 2            # rounds, one adversarial token each (official --n_iterations 2)
    esd: ESDConfig = dataclasses.field(default_factory=ESDConfig)
    textual_inversion: TextualInversionConfig = dataclasses.field(default_factory=TextualInversionConfig)
    probe_seeds: int = 16            # not official: images per model with which each round's token is judged on
    #                                  the original and the erased model (recare.train.stage1_probe); 0 = off
    min_token_strength: float = 0.0  # not official: a round's token joins stage 2's H only when the probe finds it
    #                                  drawing the target in at least this fraction of images on the original model;
    #                                  0 = every token (official). Needs probe_seeds > 0.
    attempts: int = 1                # not official: textual inversions per round (TI seed + a for the a-th), each
    #                                  probed; the round keeps the one strongest on the original model and stops at
    #                                  the first that reaches min_token_strength. 1 = one inversion (official).
    search_original: bool = False    # not official: when no inversion of a round reaches min_token_strength, one more
    #                                  against the original UNet (TI seed + attempts), probed like the others.

    @property
    def max_inversions(self) -> int:
        """The most textual inversions one round's search runs: `attempts`, plus the last resort."""
        return self.attempts + (1 if self.search_original else 0)

    def validate(self) -> None:
        _check_int("stage 1 probe_seeds", self.probe_seeds)
        if not 0 <= self.probe_seeds <= MAX_PROBE_SEEDS:
            raise ConfigError(f"stage 1 probe_seeds must be between 0 and {MAX_PROBE_SEEDS} (got {self.probe_seeds}).")
        _check_number("stage 1 min_token_strength", self.min_token_strength)
        if not 0.0 <= self.min_token_strength <= 1.0:
            raise ConfigError(f"stage 1 min_token_strength must be a fraction between 0 and 1 "
                              f"(got {self.min_token_strength!r}).")
        _check_int("stage 1 attempts", self.attempts)
        if not 1 <= self.attempts <= MAX_STAGE1_ATTEMPTS:
            raise ConfigError(f"stage 1 attempts must be between 1 and {MAX_STAGE1_ATTEMPTS} (got {self.attempts}).")
        if self.attempts > 1 and self.probe_seeds == 0:
            raise ConfigError("stage 1 attempts above 1 need the token probe to choose among them: set probe_seeds "
                              "above 0.")
        if not isinstance(self.search_original, bool):
            raise ConfigError(f"stage 1 search_original must be true or false (got {self.search_original!r}).")
        if self.search_original and self.min_token_strength == 0:
            raise ConfigError("stage 1 search_original needs min_token_strength above 0 (it runs when no inversion "
                              "reaches it).")
        if self.min_token_strength > 0 and self.probe_seeds == 0:
            raise ConfigError("stage 1 min_token_strength needs the token probe: set probe_seeds above 0 "
                              "(or min_token_strength to 0 to keep every token, the official behaviour).")
        if self.n_iterations < 1:
            raise ConfigError(f"stage 1 n_iterations must be at least 1 (got {self.n_iterations}); "
                              "train without adversarial tokens with method 'recare-no-adv' instead.")


@dataclasses.dataclass
class Stage2Config(JsonConfig):
    """Stage 2, ReCARE (Eqs. 11-13) on a fresh copy of the base UNet."""

    iterations: int = 200            # official --iterations 200
    learning_rate: float = 2e-5      # official --recare_stage2_lr 2e-5
    retain_weight: float = 1.0       # lambda in Eq. 11 (official 1); 0 = the recare-no-retain ablation
    guidance_scale: float = 2.0      # s in Eq. 13 (official --compositional_guidance_scale 2)
    projection_weight: float = 1.0   # w in N(d; p) (official 1.0)
    weight_decay: float = 1e-2       # AdamW weight decay (official: torch's default 1e-2)
    closing_rounds: int = 0          # not official: after stage 2, up to this many rounds of the attacker's own search
    #                                  against the trained UNet (recare.train.recipe, "closing search"): a token that
    #                                  still draws the target there joins H and stage 2 goes on; 0 = off (official).
    #                                  Needs stage 1 (its textual-inversion settings, probe and images).
    closing_attempts: int = 3        # textual inversions per closing round (the attack's 3 runs)
    closing_iterations: int = 100    # stage-2 iterations after each closing round whose token joins H
    closing_ti_steps: int | None = None  # steps of each closing inversion; None = stage 1's textual-inversion steps
    closing_probe_steps: int | None = None  # also probe each closing inversion after this many steps, then let it go
    #                                  on to closing_ti_steps: one inversion, two candidates (None = at its end only)

    def validate(self) -> None:
        if self.iterations < 1:
            raise ConfigError(f"stage 2 iterations must be at least 1 (got {self.iterations}).")
        for name, low, high in (("closing_rounds", 0, MAX_CLOSING_ROUNDS), ("closing_attempts", 1, MAX_STAGE1_ATTEMPTS)):
            _check_int(f"stage 2 {name}", getattr(self, name))
            if not low <= getattr(self, name) <= high:
                raise ConfigError(f"stage 2 {name} must be between {low} and {high} (got {getattr(self, name)}).")
        _check_int("stage 2 closing_iterations", self.closing_iterations)
        if self.closing_iterations < 1:
            raise ConfigError(f"stage 2 closing_iterations must be at least 1 (got {self.closing_iterations}).")
        for name in ("closing_ti_steps", "closing_probe_steps"):   # None: stage 1's steps / no probe on the way
            value = getattr(self, name)
            if value is not None:
                _check_int(f"stage 2 {name}", value)
                if value < 1:
                    raise ConfigError(f"stage 2 {name} must be at least 1 (got {value}).")
        if not self.learning_rate > 0:
            raise ConfigError(f"stage 2 learning_rate must be > 0 (got {self.learning_rate}).")
        if self.retain_weight < 0:
            raise ConfigError(f"stage 2 retain_weight (lambda) must be >= 0 (got {self.retain_weight}).")
        if self.weight_decay < 0:
            raise ConfigError(f"stage 2 weight_decay must be >= 0 (got {self.weight_decay}).")


@dataclasses.dataclass
class TrainConfig(JsonConfig):
    """One training run: which stages run and with what (METHOD.md section 3).

    The method is the shape of the values, not a branch in the code: `stage1` set = adversarial
    tokens are learned and join H; `stage2` set = ReCARE makes the final UNet; `esd` set = the ESD
    baseline makes it instead. Exactly one of `stage2` and `esd` is set. `TrainConfig.for_method`
    fills the official values of each named method; `method` records which preset that was.

    `initializer_token` is copied into `stage1.textual_inversion` on construction, so the saved
    config shows what ran.
    """

    method: str = "recare"                   # the preset these values came from (see for_method), or "custom"
    model: str = "mini-world"                # base model: "mini-world", a hub id (CompVis/stable-diffusion-v1-4) or a folder
    target_prompt: str = "a photo of a tench"  # makes the target images when none are given (official "A photo of a tench")
    reference_word: str = "tench"            # the concept erased: ESD's prompt and H's first element (official --erase_concept)
    initializer_token: str = "fish"          # adversarial tokens start from this word (official person / art / an object word)
    train_method: str = "noxattn"            # trainable UNet parameters (official noxattn)
    seed: int = 42                           # roll-out noise, k, H/anchor/retain order (official 42)
    device: str = "auto"                     # "auto": CUDA, then MPS, then CPU
    dtype: str = "auto"                      # compute precision: auto = fp32 on CPU, bf16 autocast on CUDA (official fp32)
    gradient_checkpointing: bool = False     # trade compute for memory in the student's backward pass
    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
    stage1: Stage1Config | None = dataclasses.field(default_factory=Stage1Config)
    stage2: Stage2Config | None = dataclasses.field(default_factory=Stage2Config)
    esd: ESDConfig | None = None             # set only for the esd baseline (original ESD: eta_o 1, Adam, 1000 it, lr 1e-5)
    images: str | None = None                # target images (folder, zip or generation run); None: generate them
    num_images: int = 8                      # images generated when `images` is None (official 500)
    careset: str | None = None               # careset.json (official or rich) for stage 2's anchors and retain prompts
    save_every: int = 50                     # iterations between resumable-state saves (also saved when cancelled)
    outputs: list[str] = dataclasses.field(default_factory=lambda: ["trained_params"])  # see OUTPUT_FORMATS

    def __post_init__(self) -> None:
        if isinstance(self.stage1, Stage1Config) and isinstance(self.initializer_token, str) \
                and self.stage1.textual_inversion.initializer_token != self.initializer_token:
            ti = dataclasses.replace(self.stage1.textual_inversion, initializer_token=self.initializer_token)
            self.stage1 = dataclasses.replace(self.stage1, textual_inversion=ti)
        super().__post_init__()

    @classmethod
    def for_method(cls, method: str, **fields: Any) -> "TrainConfig":
        """The official values of a named method, with `fields` on top.

        Args:
            method: "recare" (stages 1 + 2), "esd" (the baseline: the original ESD alone, negative guidance 1
                (eta = 3), Adam, 1000 it, lr 1e-5; ESD-u = noxattn; pass train_method="xattn" for ESD-x, styles),
                "recare-no-adv" (stage 2 with H = {target}), "recare-no-retain" (lambda = 0).
            **fields: any TrainConfig field, e.g. model="mini-world", seed=0.
        """
        presets: dict[str, dict[str, Any]] = {
            "recare": {},
            "esd": {"stage1": None, "stage2": None, "esd": original_esd_config()},
            "recare-no-adv": {"stage1": None},
            "recare-no-retain": {"stage2": Stage2Config(retain_weight=0.0)},
        }
        if method not in presets:
            raise ConfigError(f"unknown method {method!r}: use one of {sorted(presets)}.")
        return cls(**{"method": method, **presets[method], **fields})

    def validate(self) -> None:
        if self.method not in TRAINING_METHODS:
            raise ConfigError(f"method must be one of {TRAINING_METHODS} (got {self.method!r}).")
        if self.train_method not in TRAIN_METHODS:
            raise ConfigError(f"train_method must be one of {TRAIN_METHODS} (got {self.train_method!r}).")
        if self.dtype not in TRAIN_DTYPES:
            raise ConfigError(f"dtype must be one of {TRAIN_DTYPES} (got {self.dtype!r}).")
        for name in ("model", "target_prompt", "reference_word", "initializer_token", "device"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"{name} is empty.")
        if (self.stage2 is None) == (self.esd is None):
            raise ConfigError("set exactly one of stage2 (ReCARE makes the final UNet) and esd (the ESD baseline "
                              "makes it); TrainConfig.for_method fills a consistent pair.")
        if self.stage1 is not None and self.stage2 is None:
            raise ConfigError("stage1 learns adversarial tokens for stage 2: it needs stage2 set.")
        if self.stage2 is not None and self.stage2.closing_rounds > 0 and self.stage1 is None:
            raise ConfigError("stage 2's closing_rounds search with stage 1's textual inversion, probe and images: "
                              "they need stage1 set (method 'recare'), or closing_rounds 0.")
        if (self.stage2 is not None and self.stage1 is not None and self.stage2.closing_probe_steps is not None
                and self.stage2.closing_probe_steps >= self.closing_ti_steps):
            raise ConfigError(f"stage 2 closing_probe_steps ({self.stage2.closing_probe_steps}) must be below the "
                              f"closing inversions' {self.closing_ti_steps} steps: it is a probe on the way.")
        if self.stage1 is not None and self.num_images < self.stage1.n_iterations:
            raise ConfigError(f"num_images ({self.num_images}) must be at least stage1.n_iterations "
                              f"({self.stage1.n_iterations}): each round learns from its own slice of the images.")
        if self.num_images < 1:
            raise ConfigError(f"num_images must be at least 1 (got {self.num_images}).")
        if self.save_every < 1:
            raise ConfigError(f"save_every must be at least 1 (got {self.save_every}).")
        if not isinstance(self.outputs, list) or not self.outputs or any(o not in OUTPUT_FORMATS for o in self.outputs):
            raise ConfigError(f"outputs must be a non-empty list of {OUTPUT_FORMATS} (got {self.outputs!r}).")

    @property
    def closing_ti_steps(self) -> int:
        """Steps of one inversion of stage 2's closing search (`stage2.closing_ti_steps`, else stage 1's)."""
        return self.stage2.closing_ti_steps or self.stage1.textual_inversion.steps

    @property
    def closing_checkpoints(self) -> tuple[int, ...]:
        """The steps at which each closing inversion is probed: (`closing_probe_steps`, `closing_ti_steps`), or
        the last alone."""
        probe_at = self.stage2.closing_probe_steps
        return (probe_at, self.closing_ti_steps) if probe_at else (self.closing_ti_steps,)

    @property
    def n_adversarial_tokens(self) -> int:
        """How many adversarial tokens stage 1 adds to H (0 when stage 1 is off)."""
        return self.stage1.n_iterations if self.stage1 is not None else 0
