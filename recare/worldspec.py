"""The mini world's task spec (`checkpoints/mini-world/recare.json`) read as starting values.

The CLI and the app both start from it when the user picks the mini world: generation settings,
recommended CARE-set parameters, the tasks (target prompt, reference word, prompt style) and the
default candidate vocabulary. Everything missing falls back to the library defaults, so both
views work whether or not the mini world is installed. The file itself is written by
`recare.miniworld.train` (see `recare_spec` there for its layout).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from recare import models
from recare.atomic import read_json_object
from recare.config import CareSetConfig, ConfigError, GenerateConfig


def mini_world_spec() -> dict[str, Any]:
    """The parsed recare.json of the mini world, or {} when absent or unreadable."""
    return read_json_object(models.mini_world_dir() / "recare.json")


def _config_from(section: Any, cls, extra: dict | None = None):
    """`cls` built from the library defaults, the section's known fields, then `extra`."""
    names = {f.name for f in dataclasses.fields(cls)}
    fields = {k: v for k, v in (section if isinstance(section, dict) else {}).items() if k in names}
    try:
        return cls.from_dict({**cls().to_dict(), **fields, **(extra or {})})
    except (ConfigError, TypeError):
        return cls(**(extra or {})) if extra else cls()


def mini_world_tasks(spec: dict | None = None) -> list[dict]:
    """The tasks (dicts with target_prompt, reference_word, prompt_style, ...) in file order."""
    spec = mini_world_spec() if spec is None else spec
    tasks = spec.get("tasks")
    tasks = list(tasks.values()) if isinstance(tasks, dict) else (tasks if isinstance(tasks, list) else [])
    return [t for t in tasks if isinstance(t, dict) and isinstance(t.get("target_prompt"), str)
            and isinstance(t.get("reference_word"), str)]


def _same(a: str, b: str) -> bool:
    return " ".join((a or "").lower().split()) == " ".join((b or "").lower().split())


def task_for_prompt(prompt: str, spec: dict | None = None) -> dict | None:
    """The task whose target prompt is `prompt` (case and spaces ignored), else None."""
    return next((t for t in mini_world_tasks(spec) if _same(t["target_prompt"], prompt)), None)


def task_for_reference(word: str, spec: dict | None = None) -> dict | None:
    """The task whose reference word is `word` (case and spaces ignored), else None."""
    return next((t for t in mini_world_tasks(spec) if _same(t["reference_word"], word)), None)


def task_careset_fields(task: dict | None) -> dict[str, str]:
    """reference_word and prompt_style of a task, as CareSetConfig fields."""
    if not task:
        return {}
    out = {"reference_word": task["reference_word"]}
    if task.get("prompt_style") in ("photo", "painting"):
        out["prompt_style"] = task["prompt_style"]
    return out


def generate_defaults(spec: dict | None = None) -> GenerateConfig:
    """GenerateConfig from the spec's generation settings; the first task's prompt when none is given."""
    spec = mini_world_spec() if spec is None else spec
    tasks = mini_world_tasks(spec)
    section = spec.get("generation") if isinstance(spec.get("generation"), dict) else {}
    extra = {"prompt": tasks[0]["target_prompt"]} if tasks and "prompt" not in section else {}
    return _config_from(section, GenerateConfig, extra)


def careset_defaults(spec: dict | None = None, task: dict | None = None) -> CareSetConfig:
    """CareSetConfig from the spec's recommended parameters, for `task` (default: the first task)."""
    spec = mini_world_spec() if spec is None else spec
    tasks = mini_world_tasks(spec)
    task = task if task is not None else (tasks[0] if tasks else None)
    return _config_from(spec.get("careset"), CareSetConfig, task_careset_fields(task))


def mini_world_words(spec: dict | None = None) -> list[str] | None:
    """The default candidate vocabulary of the mini world (its lexicon), or None when absent."""
    spec = mini_world_spec() if spec is None else spec
    vocab = spec.get("vocabulary")
    words = vocab.get("words") if isinstance(vocab, dict) else vocab
    if isinstance(words, list) and words and all(isinstance(w, str) for w in words):
        return list(words)
    return None
