"""What a job request must satisfy, checked at submit time and again by the worker.

`recare.jobs.requests` builds and submits the requests; this module holds the checks alone, so the
worker (`recare.jobs.worker`) can run them again (`recheck`) without importing the runner.

    Submitter        who submits, under which policy and limits
    run_ids          a list of run ids from a form or an API client, bounded
    parse_json       JSON text with its nesting depth checked before it is parsed
    check_model / check_train / check_evaluation   the model policy and the bounds
    recheck          the worker's second look at a run's stored settings
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from recare.config import MAX_SEED, TrainConfig
from recare.errors import ConfigError, ModelLoadError, RecareError, RunError
from recare.hashing import text_hash
from recare.limits import Limits
from recare.runs import Run, check_run_id

REQUEST_KINDS = ("train", "evaluate", "demo-rerun")  # the request classes of recare.jobs.requests
REQUEST_KEY = "request"          # config.json's section with the policy and limits the run was submitted under


# ---------------------------------------------------------------------------------------------
# who submits, under which policy


@dataclasses.dataclass(frozen=True)
class Submitter:
    """Who submits and under which rules.

    Attributes:
        owner: the owner key of the runs ("" for the CLI).
        client: the client address (hashed) the request came from ("" for the CLI).
        public: public mode: no server path is a model, weights or input (`recare.models.ModelPolicy`).
        allowed_dirs: folders whose models may be loaded in public mode (the operator's).
        limits: the bounds (default `Limits.from_env()`).
    """

    owner: str = ""
    client: str = ""
    public: bool = False
    allowed_dirs: tuple[str, ...] = ()
    limits: Limits = dataclasses.field(default_factory=Limits.from_env)

    @classmethod
    def of(cls, policy, limits: Limits | None = None, owner: str = "", client: str = "") -> "Submitter":
        """A submitter under a `recare.models.ModelPolicy`."""
        return cls(owner=owner, client=client, public=policy.public_mode,
                   allowed_dirs=tuple(str(d) for d in policy.allowed_dirs), limits=limits or Limits.from_env())

    def policy(self):
        """The `recare.models.ModelPolicy` of this submitter."""
        from recare.models.policy import LOCAL_USE, ModelPolicy

        return ModelPolicy.public(self.allowed_dirs, self.limits) if self.public else LOCAL_USE

    def stored(self, roots: list[str]) -> dict:
        """What travels into the run's config.json: the policy, the limits, the folders weights may come from."""
        return {"public": self.public, "allowed_dirs": list(self.allowed_dirs), "roots": roots,
                "limits": dataclasses.asdict(self.limits)}

    @classmethod
    def from_stored(cls, data: dict) -> "Submitter":
        try:
            limits = Limits(**{k: v for k, v in (data.get("limits") or {}).items()
                               if k in {f.name for f in dataclasses.fields(Limits)}})
            return cls(public=bool(data.get("public")), allowed_dirs=tuple(data.get("allowed_dirs") or ()),
                       limits=limits)
        except (TypeError, RecareError) as e:
            raise RunError(f"the run's stored request is damaged ({e}); start a new run.") from None


# ---------------------------------------------------------------------------------------------
# raw values


def run_ids(value: Any, limits: Limits | None = None, what: str = "runs") -> list[str]:
    """Run ids from a form or an API client: a list of texts, or one text of ids separated by spaces or commas.

    Args:
        value: what was sent (None or "" for none).
        limits: `ids_per_request` bounds how many (default `Limits.from_env()`).
        what: what the ids are, for the message.

    Raises:
        ConfigError: anything but text or a list of texts, or too many ids.
    """
    limits = limits or Limits.from_env()
    if value is None:
        return []
    if isinstance(value, str):
        if len(value) > limits.ids_per_request * 200:
            raise ConfigError(limits.exceeded("ids_per_request", f"the {what} list is {len(value):,} characters long"))
        value = [i for i in value.replace(",", " ").split() if i]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"the {what} must be run ids (text, or a list of texts), not {type(value).__name__} "
                          f"{str(value)[:40]!r}.")
    if len(value) > limits.ids_per_request:
        raise ConfigError(limits.exceeded("ids_per_request", f"{len(value):,} {what} were named in one request"))
    ids = []
    for item in value:
        if not isinstance(item, str):
            raise ConfigError(f"the {what} must be run ids (text), not {type(item).__name__} {str(item)[:40]!r}.")
        if item.strip():
            ids.append(check_run_id(item.strip()))
    return list(dict.fromkeys(ids))


def json_depth(text: str) -> int:
    """The deepest nesting of [ and { in JSON text (brackets inside strings are not counted); linear time."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def parse_json(text: Any, what: str, limits: Limits | None = None) -> Any:
    """JSON text parsed after its size and nesting depth were checked (Python's parser recurses).

    Args:
        text: what was sent.
        what: what it is, for the message ("the CARE prompts").
        limits: `careset_file_bytes` and `json_depth` (default `Limits.from_env()`).
    """
    limits = limits or Limits.from_env()
    if not isinstance(text, str):
        raise ConfigError(f"{what} must be JSON text, not {type(text).__name__}.")
    if len(text) > limits.careset_file_bytes:
        raise ConfigError(limits.exceeded("careset_file_bytes", f"{what} are {len(text):,} characters long"))
    depth = json_depth(text)
    if depth > limits.json_depth:
        raise ConfigError(limits.exceeded("json_depth", f"{what} are nested {depth:,} levels deep"))
    try:
        return json.loads(text)
    except ValueError as e:
        raise ConfigError(f"{what} are not JSON ({e}).") from None


# ---------------------------------------------------------------------------------------------
# checks shared by the requests (and by the worker's re-check)


def check_bound(limits: Limits, field: str, value: Any, what: str) -> None:
    if isinstance(value, int) and not isinstance(value, bool) and value > getattr(limits, field):
        raise ConfigError(limits.exceeded(field, f"{what} is {value:,}"))


def _seed(value: Any, what: str = "the seed") -> None:
    if isinstance(value, int) and not isinstance(value, bool) and not 0 <= value <= MAX_SEED:
        raise ConfigError(f"{what} must be between 0 and {MAX_SEED} (got {str(value)[:40]}).")


def _inside(path: str | Path, roots: list[str | Path]) -> bool:
    try:
        resolved = Path(path).expanduser().resolve()
    except (OSError, RuntimeError, ValueError):
        return False
    for root in roots:
        root = Path(root).resolve()
        if resolved == root or root in resolved.parents:
            return True
    return False


def _looks_like_path(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return any(_looks_like_path(v) for v in value)
    return isinstance(value, str) and ("/" in value or "\\" in value or value.startswith(("~", ".")))


def check_model(name: Any, submitter: Submitter, what: str = "model") -> str:
    """The model name if the policy lets it load; else the one refusal public mode gives for any path.

    Nothing on disk is looked at in public mode outside the allowed folders, so the message never
    tells whether a server path exists.
    """
    from recare.models.policy import MINI_WORLD, is_hub_id

    policy = submitter.policy()
    try:
        name = policy.check_name(name, what)
    except ModelLoadError as e:
        raise ConfigError(str(e)) from None
    if name == MINI_WORLD or (what == "encoder" and name.startswith("open_clip:")):
        return name
    if policy.local_folder(name) is None and not (what == "model" and is_hub_id(name)):
        raise ConfigError(str(policy.refuse(what)))
    return name


def _server_path(value: Any, field: str, submitter: Submitter, roots: list[str | Path]) -> None:
    """In public mode a field naming a file or folder must point inside `roots` (the run, the run store)."""
    if value is None or not submitter.public:
        return
    if not isinstance(value, str) or not _inside(value, roots):
        raise ConfigError(f"{field} names a file on the server, which this public app does not read; "
                          "use the app's own inputs instead.")


def check_train(config: TrainConfig, submitter: Submitter, roots: list[str | Path]) -> None:
    """Policy and bounds of one training's settings (see the module docstring)."""
    limits = submitter.limits
    check_model(config.model, submitter)
    _server_path(config.images, "the target images", submitter, roots)
    _server_path(config.careset, "the CARE-set", submitter, roots)
    _seed(config.seed)
    for section, what in ((config.stage2, "stage-2 iterations"), (config.esd, "ESD iterations")):
        if section is not None:
            check_bound(limits, "train_iterations", section.iterations, what)
    if config.stage2 is not None and config.stage2.closing_rounds > 0:
        check_bound(limits, "train_iterations", config.stage2.closing_iterations,
                    "stage-2 iterations after each closing round")
        check_bound(limits, "ti_steps", config.stage2.closing_ti_steps, "textual-inversion steps per closing inversion")
    if config.stage1 is not None:
        check_bound(limits, "stage1_iterations", config.stage1.esd.iterations, "stage-1 erase iterations per round")
        check_bound(limits, "ti_steps", config.stage1.textual_inversion.steps, "textual-inversion steps per round")
        check_bound(limits, "stage1_rounds", config.stage1.n_iterations, "the number of stage-1 rounds")
        _seed(config.stage1.textual_inversion.seed, "the textual-inversion seed")
    check_bound(limits, "images", config.num_images, "the number of target images")


def check_evaluation(data: dict, submitter: Submitter, roots: list[str | Path], resolve: bool = True) -> None:
    """Policy and bounds of one evaluation's settings (an EvaluationConfig dict), before it is resolved.

    Args:
        resolve: also `resolve_config` it (False for the demo's re-run, whose trained UNet, and so its
            own adversarial tokens, exists only once the job's training part ran).
    """
    from recare.eval.config import EvaluationConfig, resolve_config

    config = EvaluationConfig.from_dict(data)
    limits = submitter.limits
    if config.model is not None:
        check_model(config.model, submitter)
    if config.encoder is not None:
        check_model(config.encoder, submitter, "encoder")
    if config.unet is not None and submitter.public and not _inside(config.unet, roots):
        raise ConfigError("the trained weights must be one of your runs or an uploaded checkpoint; this public app "
                          "reads no other file on the server.")
    for field in ("clip_prompts",):
        _server_path(getattr(config, field), "the CLIP caption file", submitter, roots)
    if config.reference_images not in (None, "world", "base"):
        _server_path(config.reference_images, "the reference images", submitter, roots)
    if submitter.public and any(_looks_like_path(v) for v in config.detector_options.values()):
        raise ConfigError("a detector option names a file on the server, which this public app does not read.")
    check_bound(limits, "eval_seeds", config.seeds, "seeds per prompt")
    check_bound(limits, "care_images", config.care_images_per_prompt, "CARE images per prompt")
    check_bound(limits, "clip_captions", config.clip_count, "the number of CLIP captions")
    check_bound(limits, "ti_steps", config.cce_steps, "CCE's textual-inversion steps")
    check_bound(limits, "images", config.cce_images, "CCE's images")
    check_bound(limits, "attack_runs", getattr(config, "attack_runs", None), "attack runs")
    check_bound(limits, "steps", config.steps, "denoising steps")
    for name in ("height", "width"):
        value = getattr(config, name)
        if isinstance(value, int) and value * value > limits.generate_pixels:
            raise ConfigError(limits.exceeded("generate_pixels", f"{name} {value} makes {value * value:,} pixels"))
    for name in ("base_seed", "cce_seed", "reference_seed"):
        _seed(getattr(config, name), name.replace("_", " "))
    if isinstance(config.seeds, int) and config.base_seed + config.seeds - 1 > MAX_SEED:
        raise ConfigError(f"base_seed + seeds must stay below {MAX_SEED}.")
    care = config.care_prompts or {}
    count = sum(len(v) for v in care.values() if isinstance(v, list))
    if len(care) + count > limits.prompt_list:
        raise ConfigError(limits.exceeded("prompt_list", f"the CARE prompts hold {len(care)} concepts and {count:,} "
                                                         "prompts"))
    if len(config.extra_prompts) > limits.prompt_list:
        raise ConfigError(limits.exceeded("prompt_list", f"{len(config.extra_prompts):,} custom prompts were given"))
    for prompt in [config.target_prompt or "", *config.extra_prompts, *(p for v in care.values() for p in v)]:
        if len(prompt) > limits.prompt_chars:
            raise ConfigError(limits.exceeded("prompt_chars", f"a prompt has {len(prompt):,} characters"))
    if resolve:
        resolve_config(config)  # an unknown task, missing prompts: refused before any job starts


def recheck(run: Run) -> None:
    """The worker's second look: the stored settings under the policy and limits they were submitted with.

    Runs without a stored request (made by a library user or a test straight through the runner)
    are trusted as they are.

    Raises:
        RecareError: the settings break the stored policy or a bound.
    """
    settings = run.config()
    stored = settings.get(REQUEST_KEY)
    if not isinstance(stored, dict):
        return
    submitter = Submitter.from_stored(stored)
    roots = [run.path, *(stored.get("roots") or [])]
    kind = stored.get("kind")
    if kind not in REQUEST_KINDS:
        raise RunError(f"the run's stored request names an unknown kind {str(kind)[:40]!r}; start a new run.")
    if isinstance(settings.get("train"), dict):
        check_train(TrainConfig.from_dict(settings["train"]), submitter, roots)
    if isinstance(settings.get("evaluation"), dict):
        check_evaluation(settings["evaluation"], submitter, roots, resolve=kind != "demo-rerun")


def client_hash(address: str | None) -> str:
    """A short stable name for a client address (the address itself is not stored)."""
    if not address:
        return ""
    return "c-" + text_hash(address, 16)
