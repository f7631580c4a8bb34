"""One dataclass per stage; every default is the official one unless a comment says otherwise.

Each config round-trips through JSON (`to_json` / `from_json`) and is written beside every
artifact it made, so a run folder always says how it was produced.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from recare.errors import ConfigError

T = TypeVar("T", bound="JsonConfig")

PROJECTIONS = ("tsne", "umap")
PROMPT_STYLES = ("photo", "painting")

__all__ = ["ConfigError", "JsonConfig", "GenerateConfig", "CareSetConfig", "PROJECTIONS", "PROMPT_STYLES"]


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
        if not self.prompt or not self.prompt.strip():
            raise ConfigError("The prompt is empty: type what the target images should show.")
        if self.num_images < 1:
            raise ConfigError(f"num_images must be at least 1 (got {self.num_images}).")
        if self.steps < 1:
            raise ConfigError(f"steps must be at least 1 (got {self.steps}).")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1 (got {self.batch_size}).")
        if self.guidance < 0:
            raise ConfigError(f"guidance must be >= 0 (got {self.guidance}).")


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
        if not self.reference_word or not self.reference_word.strip():
            raise ConfigError("reference_word is empty: name the concept to erase (e.g. 'nudity').")
        if self.prompt_style not in PROMPT_STYLES:
            raise ConfigError(f"prompt_style must be one of {PROMPT_STYLES} (got {self.prompt_style!r}).")
        if self.projection not in PROJECTIONS:
            raise ConfigError(f"projection must be one of {PROJECTIONS} (got {self.projection!r}).")
        for name in ("top_k", "top_n", "n_clusters", "min_cluster_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1 (got {getattr(self, name)}).")
        if self.k_each_side < 0:
            raise ConfigError(f"k_each_side must be >= 0 (got {self.k_each_side}).")
        if self.alpha < 0:
            raise ConfigError(f"alpha must be >= 0 (got {self.alpha}).")
