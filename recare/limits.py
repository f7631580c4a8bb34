"""Resource limits: every bound on what one request may ask of the machine, in one place.

Anybody may send a public app anything, and a CLI user may point it at anything, so each input
that costs memory, CPU time or disk in proportion to its size has a limit here. Each default is
sized for the paper's scale (500 target images, the 49,408-token CLIP vocabulary, N = 100
candidates) with room to spare, and each can be changed without code through an environment
variable `RECARE_MAX_<FIELD>` (e.g. `RECARE_MAX_IMAGES=2000`, `RECARE_MAX_UPLOAD_BYTES=500M`;
sizes take a K, M or G suffix, powers of 1024).

`Limits.from_env()` reads them; every library function that takes `limits=None` uses it, so the
CLI, the app and library users get the same bounds. A request over a limit fails before the
expensive work starts with a `RecareError` whose message names the limit and its variable.
"""

from __future__ import annotations

import dataclasses
import os
import re

from recare.errors import ConfigError

ENV_PREFIX = "RECARE_MAX_"
_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]?)i?b?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}

MiB = 1 << 20
GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Limits:
    """Upper bounds on inputs (defaults below; override with RECARE_MAX_<FIELD> or by constructing one).

    Images (recare.generate's loaders: folders, files, zips, uploads):
        images: images in one load (an upload, a folder, a zip); the paper uses 500.
        image_pixels: width x height of one image, read from its header before it is decoded.
        image_aspect: longest side / shortest side of one image (encoders resize the short side to
            224 pixels, so a 30000 x 1 image would become 6.7 million x 224).
        total_pixels: pixels of all images of one load together (about 3 bytes each in memory).
        image_bytes: one image file, or one image inside a zip, uncompressed.
        zip_members: entries in one zip (of any kind).
        zip_bytes: uncompressed size of the images in one zip together.
        upload_bytes: one uploaded file (the app's Gradio `max_file_size`).
    Generation:
        generate_images: images in one generation request.
        generate_pixels: height x width of a generated image.
        steps: denoising steps of one generation.
        prompt_chars: characters of a prompt or negative prompt.
    CARE-set files and edits:
        careset_file_bytes: a careset.json or rich JSON file (checked before it is parsed).
        careset_tokens: tokens in a careset file (candidates, prompts or custom tokens).
        custom_tokens: custom tokens of one CARE-set.
        token_chars: characters of one token.
    Vocabularies:
        word_list_bytes: an uploaded word-list file.
        word_list_words: entries of a word list.
        vocab_cache_bytes: the vocabulary-feature cache folder; the least recently used files go first.
    Names:
        name_chars: characters of a model or encoder name or path.
    Job requests (recare.jobs.requests: the app's and the CLI's training and evaluation settings):
        train_iterations: stage-2 or ESD iterations of one training (official 200; ESD 1000).
        stage1_iterations: stage-1 erase iterations per round (official 200).
        stage1_rounds: stage-1 rounds, one adversarial token each (official 2).
        ti_steps: textual-inversion steps per round, and CCE's (official 3000).
        eval_seeds: images per attack prompt of an evaluation (paper 500).
        care_images: CARE-score images per CARE prompt (official 10).
        clip_captions: CLIP-score captions of an evaluation.
        attack_runs: repeated runs of a random attack in one evaluation.
        ids_per_request: run or model ids named in one request (Compare's models and evaluations).
        prompt_list: prompts in one list (all CARE prompts together, the custom prompts).
        json_depth: nesting depth of a JSON value a request carries (the CARE prompts).
    Checkpoint uploads (recare.models.load_trained_unet_state, inspected before anything is inflated):
        checkpoint_tensors: tensors in one weights file (also never more than the base UNet has).
        checkpoint_header_bytes: a safetensors header, or the pickle of a torch zip file.
    Jobs of the whole server (recare.runs.RunStore.check_quota, through recare.jobs):
        jobs_total: queued plus running jobs of every visitor together.
        jobs_per_client: queued plus running jobs sent from one client address (Gradio's request,
            proxies included): invented owner keys do not multiply it.
        runs_disk_bytes: disk used by all runs together.
    Jobs per owner (a browser key or signed-in user; the CLI has none):
        jobs_per_owner: queued plus running jobs of one owner.
        owner_disk_bytes: disk used by one owner's runs together.
    """

    images: int = 1000
    image_pixels: int = 4096 * 4096
    image_aspect: int = 16
    total_pixels: int = 256 * 1024 * 1024
    image_bytes: int = 64 * MiB
    zip_members: int = 5000
    zip_bytes: int = 1 * GiB
    upload_bytes: int = 256 * MiB
    generate_images: int = 1000
    generate_pixels: int = 2048 * 2048
    steps: int = 1000
    prompt_chars: int = 4000
    careset_file_bytes: int = 32 * MiB
    careset_tokens: int = 10_000
    custom_tokens: int = 1000
    token_chars: int = 200
    word_list_bytes: int = 8 * MiB
    word_list_words: int = 100_000
    vocab_cache_bytes: int = 2 * GiB
    name_chars: int = 1024
    train_iterations: int = 10_000
    stage1_iterations: int = 10_000
    stage1_rounds: int = 10
    ti_steps: int = 10_000
    eval_seeds: int = 1000
    care_images: int = 100
    clip_captions: int = 10_000
    attack_runs: int = 10
    ids_per_request: int = 16
    prompt_list: int = 200
    json_depth: int = 32
    checkpoint_tensors: int = 20_000
    checkpoint_header_bytes: int = 16 * MiB
    jobs_total: int = 32
    jobs_per_client: int = 4
    runs_disk_bytes: int = 200 * GiB
    jobs_per_owner: int = 4
    owner_disk_bytes: int = 20 * GiB

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"limit {field.name} must be a whole number >= 1 (got {value!r}).")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "Limits":
        """The defaults with every `RECARE_MAX_<FIELD>` set in the environment applied.

        Args:
            environ: the variables to read (default os.environ).

        Raises:
            ConfigError: a variable that is not a whole number >= 1 (with an optional K/M/G suffix).
        """
        environ = os.environ if environ is None else environ
        values = {}
        for field in dataclasses.fields(cls):
            name = env_name(field.name)
            raw = environ.get(name)
            if raw is not None and raw.strip():
                values[field.name] = parse_size(raw, name)
        return cls(**values)

    def exceeded(self, field: str, what: str) -> str:
        """A message for `what` going over limit `field`: '<what>; the limit is N (RECARE_MAX_FIELD).'

        Args:
            field: the Limits field.
            what: what was asked for, e.g. "the zip holds 6,000 entries".
        """
        return f"{what}; the limit is {describe(field, getattr(self, field))} ({env_name(field)})."


def env_name(field: str) -> str:
    """The environment variable of a Limits field: `images` -> `RECARE_MAX_IMAGES`."""
    return ENV_PREFIX + field.upper()


def parse_size(text: str, name: str = "limit") -> int:
    """A whole number with an optional K/M/G suffix (powers of 1024): '256M' -> 268435456.

    Args:
        text: the value.
        name: what it is called in the error message.
    """
    match = _SIZE.match(str(text))
    if not match:
        raise ConfigError(f"{name} must be a whole number, optionally with K, M or G (got {text!r}).")
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


def describe(field: str, value: int) -> str:
    """A limit's value for people: sizes in MB/GB, counts with thousands separators."""
    if field.endswith("_bytes"):
        return human_bytes(value)
    return f"{value:,}"


def human_bytes(n: int) -> str:
    """1536 -> '1.5 KB' (powers of 1024)."""
    for unit, size in (("GB", GiB), ("MB", MiB), ("KB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}".replace(".0 ", " ")
    return f"{n} bytes"
