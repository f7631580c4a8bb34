"""Typed job requests: the one path by which the app and the CLI start long work.

Every kind of job has one request class, built by whoever starts it (a tab of the app, the CLI,
the reviewer demo):

    TrainRequest      one training run (settings, the session's images and CARE-set to copy in)
    EvaluateRequest   one model's evaluation
    DemoRerunRequest  one bundled demo result recomputed (a training, then its evaluation)

`submit_requests(runner, requests, submitter)` checks every request before any job exists, in
this order, and refuses the whole batch with one sentence at the first problem:
1. the model policy (`Submitter.policy`): in public mode only 'mini-world', hub ids and the
   operator's allowed folders are models, trained weights must be runs of the store, and no field
   names a server path (images, CARE-set files, caption files, detector weights);
2. the bounds (`recare.limits.Limits`, `RECARE_MAX_*`): iterations, textual-inversion steps,
   stage-1 rounds, seeds, CARE images, CLIP captions, attack runs, images, prompts, seeds' range;
3. the quota for the whole batch at once (`JobRunner.submit_many` -> `RunStore.check_quota`):
   jobs in total, per client address, per owner, disk; all runs or none;
and then copies each request's inputs into its new run folder before it is queued (a browser
session's files may be gone when the job starts). The policy and the limits travel in the run's
config.json ("request"), and the worker checks the stored settings again before the job starts
(`recheck`), so a run folder that was changed on disk is refused too.

Helpers for raw values from a form or an API client: `run_ids` (a list of run ids, bounded) and
`parse_json` (JSON text with its nesting depth checked before it is parsed).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar

from recare.config import MAX_SEED, TrainConfig
from recare.errors import ConfigError, ModelLoadError, RecareError, RunError
from recare.jobs import targets
from recare.jobs.runner import JobRunner, JobSpec
from recare.limits import Limits
from recare.runs import Run, check_run_id

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
        from recare.models import LOCAL_USE, ModelPolicy

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


def _bound(limits: Limits, field: str, value: Any, what: str) -> None:
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
    from recare.models import MINI_WORLD, is_hub_id

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
            _bound(limits, "train_iterations", section.iterations, what)
    if config.stage1 is not None:
        _bound(limits, "stage1_iterations", config.stage1.esd.iterations, "stage-1 erase iterations per round")
        _bound(limits, "ti_steps", config.stage1.textual_inversion.steps, "textual-inversion steps per round")
        _bound(limits, "stage1_rounds", config.stage1.n_iterations, "the number of stage-1 rounds")
        _seed(config.stage1.textual_inversion.seed, "the textual-inversion seed")
    _bound(limits, "images", config.num_images, "the number of target images")


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
    _bound(limits, "eval_seeds", config.seeds, "seeds per prompt")
    _bound(limits, "care_images", config.care_images_per_prompt, "CARE images per prompt")
    _bound(limits, "clip_captions", config.clip_count, "the number of CLIP captions")
    _bound(limits, "ti_steps", config.cce_steps, "CCE's textual-inversion steps")
    _bound(limits, "images", config.cce_images, "CCE's images")
    _bound(limits, "attack_runs", getattr(config, "attack_runs", None), "attack runs")
    _bound(limits, "steps", config.steps, "denoising steps")
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


# ---------------------------------------------------------------------------------------------
# the requests


class JobRequest:
    """One job to submit: `check` (policy and bounds), then `spec` (what the runner creates and queues)."""

    kind: ClassVar[str] = ""
    target: ClassVar[str] = ""

    def check(self, submitter: Submitter, roots: list[str]) -> None:
        raise NotImplementedError

    def settings(self) -> dict:
        raise NotImplementedError

    def stage(self, run: Run) -> None:
        """Copy this request's inputs into the new run (default: nothing to copy)."""

    def spec(self, submitter: Submitter, roots: list[str], device: str) -> JobSpec:
        settings = {**self.settings(), REQUEST_KEY: {"kind": self.kind, **submitter.stored(roots)}}
        return JobSpec(self.run_kind, self.target, settings, device, stage=self.stage)

    @property
    def run_kind(self) -> str:
        return self.kind


@dataclasses.dataclass(frozen=True)
class TrainRequest(JobRequest):
    """One training run.

    Attributes:
        config: the training settings (`TrainConfig`; its device is where the job runs).
        task: a mini-world task whose images and CARE-set the job makes when the request brings none.
        images: target image files to copy into the run (a browser session's).
        careset: an official careset dict to copy into the run.
        preview: the preview settings (`recare.train.preview`), or None.
        command: who made it ("app", "cli").
    """

    kind: ClassVar[str] = "train"
    target: ClassVar[str] = targets.TRAIN

    config: TrainConfig
    task: str | None = None
    images: tuple[str, ...] = ()
    careset: dict | None = None
    preview: dict | None = None
    command: str = "app"

    def check(self, submitter: Submitter, roots: list[str]) -> None:
        check_train(self.config, submitter, roots)
        if len(self.images) > submitter.limits.images:
            raise ConfigError(submitter.limits.exceeded("images", f"{len(self.images):,} target images were given"))
        if self.task is not None:
            from recare.workflows import mini_world_task

            mini_world_task(self.task)
        if self.preview is not None:
            _bound(submitter.limits, "steps", self.preview.get("steps"), "preview steps")

    def settings(self) -> dict:
        data: dict[str, Any] = {"command": self.command, "train": self.config.to_dict()}
        if self.task:
            data["task"] = self.task
        if self.preview:
            data["preview"] = self.preview
        return data

    def stage(self, run: Run) -> None:
        """Copy the images and the CARE-set into `<run>/inputs/` now and point the settings there
        (`recare.workflows.stage_inputs`)."""
        if not self.images and self.careset is None:
            return
        from recare.workflows import stage_inputs

        inputs: dict[str, Any] = {"images": list(self.images)}
        if self.careset is not None:
            inputs["careset"] = self.careset
        stage_inputs(run, {**run.config(), "inputs": inputs})


@dataclasses.dataclass(frozen=True)
class EvaluateRequest(JobRequest):
    """One model's evaluation.

    Attributes:
        evaluation: `EvaluationConfig` fields (a dict, as config.json stores them).
        compare: Compare's label of the model ({"label", "model"}).
        command: who made it ("app", "cli").
    """

    kind: ClassVar[str] = "evaluate"
    target: ClassVar[str] = targets.EVALUATE

    evaluation: dict
    compare: dict | None = None
    command: str = "app"

    def check(self, submitter: Submitter, roots: list[str]) -> None:
        check_evaluation(self.evaluation, submitter, roots)

    def settings(self) -> dict:
        data: dict[str, Any] = {"command": self.command, "evaluation": self.evaluation}
        if self.compare is not None:
            data["compare"] = self.compare
        return data


@dataclasses.dataclass(frozen=True)
class DemoRerunRequest(JobRequest):
    """One bundled demo result recomputed: `recare.demo.rerun_job`'s settings (an evaluation, and for a
    trained model a training first). Its run is of kind "evaluate", so Compare lists it."""

    kind: ClassVar[str] = "demo-rerun"
    target: ClassVar[str] = targets.DEMO_RERUN

    job: dict

    @property
    def run_kind(self) -> str:
        return "evaluate"

    def check(self, submitter: Submitter, roots: list[str]) -> None:
        trained = self.job.get("train") is not None
        check_evaluation(self.job.get("evaluation") or {}, submitter, roots, resolve=not trained)
        if trained:
            check_train(TrainConfig.from_dict(self.job["train"]), submitter, roots)

    def settings(self) -> dict:
        return dict(self.job)

    def spec(self, submitter: Submitter, roots: list[str], device: str) -> JobSpec:
        spec = super().spec(submitter, roots, device)
        if self.job.get("train") is None:  # a base model: its evaluation alone
            return dataclasses.replace(spec, target=targets.EVALUATE)
        return spec


REQUESTS = {cls.kind: cls for cls in (TrainRequest, EvaluateRequest, DemoRerunRequest)}


def _roots(runner: JobRunner) -> list[str]:
    return [str(runner.store.root), *(str(b) for b in runner.store.bundled)]


def submit_requests(runner: JobRunner, requests: list[JobRequest], submitter: Submitter,
                    device: str = "cpu") -> list[Run]:
    """Check every request, then create, stage and queue all of them as one batch (all or nothing).

    Args:
        runner: the app's (or the CLI's) job runner.
        requests: the jobs of one user action (Compare's models, the demo's re-run, one training).
        submitter: who submits and under which policy and limits.
        device: where the jobs run.

    Returns:
        The queued runs, in the order of `requests`.

    Raises:
        RecareError: the first request that breaks the policy or a bound, or a limit of the quota
            (the message says which); no run was created.
    """
    if not requests:
        raise ConfigError("nothing to start.")
    if len(requests) > submitter.limits.ids_per_request:
        raise ConfigError(submitter.limits.exceeded("ids_per_request", f"{len(requests):,} jobs were asked for"))
    roots = _roots(runner)
    for request in requests:
        request.check(submitter, roots)
    specs = [request.spec(submitter, roots, device) for request in requests]
    return runner.submit_many(specs, owner=submitter.owner, client=submitter.client)


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
    if kind not in REQUESTS:
        raise RunError(f"the run's stored request names an unknown kind {str(kind)[:40]!r}; start a new run.")
    if isinstance(settings.get("train"), dict):
        check_train(TrainConfig.from_dict(settings["train"]), submitter, roots)
    if isinstance(settings.get("evaluation"), dict):
        check_evaluation(settings["evaluation"], submitter, roots, resolve=kind != "demo-rerun")


def client_hash(address: str | None) -> str:
    """A short stable name for a client address (the address itself is not stored)."""
    import hashlib

    if not address:
        return ""
    return "c-" + hashlib.sha256(address.encode("utf-8", "replace")).hexdigest()[:16]


__all__ = ["Submitter", "TrainRequest", "EvaluateRequest", "DemoRerunRequest", "JobRequest", "submit_requests",
           "recheck", "run_ids", "parse_json", "json_depth", "check_model", "check_train", "check_evaluation",
           "client_hash", "REQUEST_KEY"]
