"""Seeded, batched image generation, and reading images a user brings instead (folder or zip).

Image i always starts from the noise of seed `base_seed + i` (official: 42 + i): each image gets its
own `torch.Generator`, so on the CPU the batch size changes speed and memory, never the images.
Generators live on the CPU so the same seed gives the same starting noise on every device. On a
GPU the same seeds in the same batches repeat bit for bit, but another batch size picks other
kernels: an SD v1.4-shaped model at 512 px moved pixels by up to 1 (fp32) to 11 (bf16) levels of
255 between batches of 8 and of 1 on an H200 (benchmarks/gpu_check.py).

    iter_generation(pipe, config, progress, cancel)  -> one GeneratedBatch per pipeline call
    generate_images(pipe, config, progress, cancel)  -> all of them, as a GenerationResult
    save_generation(result, folder)                  -> 000.png, 001.png, ... + manifest.json
    write_manifest(folder, metadata, files, safety)  -> the one manifest.json schema (CLI and app)
"""

from __future__ import annotations

import dataclasses
import io
import lzma
import re
import threading
import time
import weakref
import zipfile
import zlib
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from PIL import Image, UnidentifiedImageError

from recare.config import ConfigError, GenerateConfig
from recare.limits import Limits, human_bytes
from recare.progress import CancelToken, ProgressCallback, emit
from recare.atomic import atomic_write_bytes, atomic_write_json

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MANIFEST_NAME = "manifest.json"
STAGE = "generate"  # the ProgressEvent stage of generation


from recare.errors import ImageInputError  # noqa: E402  (re-exported: raised by this module)


@dataclasses.dataclass
class GeneratedBatch:
    """The images of one pipeline call, as `iter_generation` yields them.

    Attributes:
        images: the images, image j made from seed `seeds[j]`.
        seeds: one seed per image.
        start: index of the first image in the whole run (its seed is base_seed + start).
        total: images the run was asked for.
    """

    images: list[Image.Image]
    seeds: list[int]
    start: int
    total: int

    @property
    def end(self) -> int:
        """Index one past the last image of this batch (= images made so far)."""
        return self.start + len(self.images)


@dataclasses.dataclass
class GenerationResult:
    """What `generate_images` made.

    Attributes:
        images: the images, image i made from seed `seeds[i]`.
        seeds: one seed per image.
        metadata: prompt, seeds, model, settings, timing, and whether it was cancelled
            (see `generation_metadata`).
    """

    images: list[Image.Image]
    seeds: list[int]
    metadata: dict[str, Any]


def image_seeds(config: GenerateConfig) -> list[int]:
    """The seed of every image: base_seed + i.

    Args:
        config: the generation settings.
    """
    return [config.base_seed + i for i in range(config.num_images)]


def check_generate_limits(config: GenerateConfig, limits: Limits | None = None) -> None:
    """ConfigError when a generation asks for more than the limits allow (before anything runs).

    Args:
        config: the generation settings.
        limits: images per request, steps, pixels per image and prompt length (default
            `Limits.from_env()`).
    """
    limits = limits or Limits.from_env()
    if config.num_images > limits.generate_images:
        raise ConfigError(limits.exceeded("generate_images", f"{config.num_images:,} images were asked for"))
    if config.steps > limits.steps:
        raise ConfigError(limits.exceeded("steps", f"{config.steps:,} steps were asked for"))
    for name in ("prompt", "negative_prompt"):
        if len(getattr(config, name)) > limits.prompt_chars:
            raise ConfigError(limits.exceeded("prompt_chars", f"the {name.replace('_', ' ')} has "
                                                              f"{len(getattr(config, name)):,} characters"))
    if config.height is not None and config.width is not None:
        pixels = config.height * config.width
    else:  # one side given: the other is the model's native size, at most 1024 for SD models
        pixels = max(config.height or 0, config.width or 0) * 1024
    if pixels > limits.generate_pixels:
        raise ConfigError(limits.exceeded("generate_pixels", f"{config.height} x {config.width} images were asked for"))


def call_pipeline(pipe):
    """A pipeline for one generation call: `pipe`'s components with a scheduler of its own.

    A diffusers pipeline call sets its scheduler's timesteps (and its own guidance scale) for that
    call, so two calls on one cached pipeline from two threads (two app visitors) would change each
    other's steps mid-way. The copy shares every model (nothing is duplicated) and costs a few
    milliseconds (`recare.models.derive_pipeline`). The tokenizer is shared too, and is not safe to
    use from two threads at once, so the copy's prompt encoding takes turns with every other call on
    that tokenizer. Anything that is not a diffusers pipeline (a test's stand-in) is returned as it is.

    Args:
        pipe: the shared pipeline.
    """
    from diffusers import DiffusionPipeline

    from recare.models.pipelines import derive_pipeline

    if not isinstance(pipe, DiffusionPipeline) or getattr(pipe, "scheduler", None) is None:
        return pipe

    call = derive_pipeline(pipe)
    if getattr(call, "tokenizer", None) is not None and hasattr(call, "encode_prompt"):
        call.encode_prompt = _serialised(call.encode_prompt, _tokenizer_lock(call.tokenizer))
    return call


# transformers 5 tokenizers keep their padding and truncation settings on one shared backend object,
# and encode_prompt tokenizes twice with different padding ("max_length", then "longest"): two
# threads on one tokenizer can swap those settings mid-call and get 9-token embeddings instead of
# 77, or silently different images (tests/test_generate_concurrent.py). A copy of a 49k-word
# tokenizer costs ~0.7 s, so calls on one tokenizer take turns at prompt encoding instead.
_TOKENIZER_LOCKS: "weakref.WeakKeyDictionary[object, threading.Lock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def _tokenizer_lock(tokenizer) -> threading.Lock:
    with _LOCKS_GUARD:
        return _TOKENIZER_LOCKS.setdefault(tokenizer, threading.Lock())


def _serialised(function, lock: threading.Lock):
    def call(*args, **kwargs):
        with lock:
            return function(*args, **kwargs)
    return call


def iter_generation(
    pipe,
    config: GenerateConfig,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    limits: Limits | None = None,
) -> Iterator[GeneratedBatch]:
    """Generate `config.num_images` images, `config.batch_size` per pipeline call, one batch at a time.

    A caller can show each batch as it arrives and stop whenever it likes (stop iterating, or set
    `cancel`). Progress events (stage "generate", step = images made, total = images asked for)
    come before each batch ("image 5-8 of 64") and once at the end.

    Args:
        pipe: a diffusers StableDiffusionPipeline (see `recare.models.load_pipeline`).
        config: prompt, number of images, base seed, steps, guidance, batch size, size.
        progress: optional callback, called with a `recare.progress.ProgressEvent`.
        cancel: optional `recare.progress.CancelToken` (or any object with `.is_set()`, such as a
            threading.Event), checked before each batch; when set, the iteration ends quietly and
            the batches already yielded are the images made.
        limits: bounds on images, steps, size and prompt length (default `Limits.from_env()`; see
            `check_generate_limits`), checked before the first batch.

    Yields:
        One `GeneratedBatch` per pipeline call, in seed order.
    """
    config.validate()
    check_generate_limits(config, limits)
    pipe = call_pipeline(pipe)
    seeds = image_seeds(config)
    total = len(seeds)
    for start in range(0, total, config.batch_size):
        batch = seeds[start:start + config.batch_size]
        emit(progress, STAGE, start, total, f"image {start + 1}-{start + len(batch)} of {total}")
        if cancel is not None and cancel.is_set():  # after the event, so a listener may still cancel
            return
        generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in batch]
        output = pipe(
            prompt=[config.prompt] * len(batch),
            negative_prompt=[config.negative_prompt] * len(batch) if config.negative_prompt else None,
            num_inference_steps=config.steps,
            guidance_scale=config.guidance,
            height=config.height,
            width=config.width,
            generator=generators,
            output_type="pil",
        )
        if start + len(batch) == total:
            emit(progress, STAGE, total, total, f"{total} image{'s' if total != 1 else ''}")
        yield GeneratedBatch(images=list(output.images), seeds=batch, start=start, total=total)


def generate_images(
    pipe,
    config: GenerateConfig,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    limits: Limits | None = None,
) -> GenerationResult:
    """Generate `config.num_images` images of `config.prompt` (every batch of `iter_generation`).

    Args:
        pipe: a diffusers StableDiffusionPipeline (see `recare.models.load_pipeline`).
        config: prompt, number of images, base seed, steps, guidance, batch size, size.
        progress: optional callback, called with a `recare.progress.ProgressEvent` per batch.
        cancel: optional `recare.progress.CancelToken` (or threading.Event), checked before each
            batch; when set, the images made so far are returned and `metadata["cancelled"]` is True.
        limits: see `iter_generation`.
    """
    started = time.perf_counter()
    images: list[Image.Image] = []
    seeds: list[int] = []
    for batch in iter_generation(pipe, config, progress, cancel, limits):
        images.extend(batch.images)
        seeds.extend(batch.seeds)
    metadata = generation_metadata(pipe, config, seeds, cancelled=len(images) < config.num_images,
                                   seconds=time.perf_counter() - started)
    return GenerationResult(images=images, seeds=seeds, metadata=metadata)


def generation_metadata(
    pipe,
    config: GenerateConfig,
    seeds: Sequence[int | None],
    cancelled: bool = False,
    seconds: float | None = None,
    model: str | None = None,
) -> dict[str, Any]:
    """What a manifest says about a set of generated images (see `write_manifest`).

    Args:
        pipe: the pipeline that made them (scheduler, device and dtype are read from it).
        config: the settings the run was asked for.
        seeds: the seed of each image made (fewer than `config.num_images` when cancelled).
        cancelled: the run stopped before making every image.
        seconds: wall time of the run so far, if measured.
        model: the model's name as the user gave it ("mini-world", a hub id); default: the
            pipeline's own `_name_or_path`.
    """
    metadata = {
        "prompt": config.prompt,
        "negative_prompt": config.negative_prompt,
        "seeds": list(seeds),
        "model": model or _model_name(pipe),
        "scheduler": type(pipe.scheduler).__name__,
        "device": str(getattr(pipe, "device", "")),
        "dtype": str(getattr(pipe, "dtype", "")).replace("torch.", ""),
        "settings": config.to_dict(),
        "num_requested": config.num_images,
        "num_images": len(seeds),
        "cancelled": bool(cancelled),
    }
    if seconds is not None:
        metadata["seconds"] = round(float(seconds), 3)
    if cancelled:
        metadata["note"] = f"cancelled after {len(seeds)} of {config.num_images} images; the images made are kept"
    return metadata


def _model_name(pipe) -> str:
    config = getattr(pipe, "config", None)
    name = getattr(config, "_name_or_path", None) if config is not None else None
    if name is None and isinstance(config, dict):
        name = config.get("_name_or_path")
    return str(name or getattr(pipe, "name_or_path", "") or "unknown")


def write_manifest(
    folder: str | Path,
    metadata: Mapping[str, Any],
    files: Sequence[str],
    safety: Mapping[str, Any] | None = None,
) -> Path:
    """Write `<folder>/manifest.json`: the one description of a folder of generated images.

    Schema: everything of `generation_metadata` (prompt, negative_prompt, seeds, model, scheduler,
    device, dtype, settings, num_requested, num_images, cancelled, [seconds], [note]), then
    `files` (file i was made from `seeds[i]`) and, when given, `safety` (e.g. the app's
    {"flagged": [...], "checked": bool}). Written atomically, so a reader never sees half a file.

    Args:
        folder: the folder holding the images.
        metadata: what `generation_metadata` returned.
        files: image file names inside `folder`, one per seed.
        safety: optional safety-check results, one entry per file where it is a list.

    Returns:
        The manifest's path.
    """
    files = [str(f) for f in files]
    seeds = metadata.get("seeds", [])
    if len(files) != len(seeds):  # a caller's bug: the manifest would pair files with wrong seeds
        raise ValueError(f"write_manifest: {len(files)} files but {len(seeds)} seeds.")
    manifest = {**metadata, "files": files}
    if safety is not None:
        manifest["safety"] = dict(safety)
    path = Path(folder) / MANIFEST_NAME
    atomic_write_json(path, manifest)
    return path


def save_generation(result: GenerationResult, out_dir: str | Path) -> Path:
    """Write the images as `000.png, 001.png, ...` and `manifest.json` (see `write_manifest`).

    Each file is written under a temporary name and renamed; the manifest comes last, so a folder
    with a manifest is complete.

    Args:
        result: what `generate_images` returned.
        out_dir: the folder (created if missing), usually a run folder from `recare.runs.new_run_dir`.

    Returns:
        The folder.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    width = max(3, len(str(len(result.images) - 1)))
    files = []
    for i, image in enumerate(result.images):
        name = f"{i:0{width}d}.png"
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        atomic_write_bytes(out_dir / name, buffer.getvalue())
        files.append(name)
    write_manifest(out_dir, result.metadata, files)
    return out_dir


def generated_images(pipe, config: GenerateConfig, folder: str | Path, progress: ProgressCallback | None = None,
                     cancel: CancelToken | None = None) -> list[Image.Image]:
    """The images of a generation folder made once: read back when its manifest is there, else
    generated in full and saved (a job's target images, reused when the job resumes).

    Raises:
        Cancelled: the cancel token stopped generation before every image was made (nothing is saved).
    """
    folder = Path(folder)
    if (folder / MANIFEST_NAME).is_file():  # the manifest is written last: the folder is complete
        return load_images(folder)
    result = generate_images(pipe, config, progress, cancel)
    if len(result.images) < config.num_images:
        from recare.errors import Cancelled

        raise Cancelled("generating the target images was cancelled")
    save_generation(result, folder)
    return result.images


# ---------------------------------------------------------------------------------------------
# images the user brings


def load_image_folder(path: str | Path, limits: Limits | None = None) -> list[Image.Image]:
    """Every .png/.jpg/.jpeg/.webp image directly inside `path`, sorted by name, as RGB.

    Args:
        path: the folder.
        limits: image count, size and pixel bounds (default `Limits.from_env()`; see `load_images`).

    Raises:
        ImageInputError: no such folder, no images in it, an image that cannot be read (named), or
            a limit exceeded.
    """
    return _load_folder(Path(path).expanduser(), _ImageBudget(limits))


def load_images(source: str | Path | Image.Image | Iterable[str | Path | Image.Image],
                limits: Limits | None = None) -> list[Image.Image]:
    """Images from a folder, a .zip, image files, PIL images, or a list mixing them (e.g. an upload).

    Every image passes one guard, whichever way it came (`recare.limits.Limits`): the number of
    images is counted before any is decoded, each image's size is read from its header and checked
    (pixels, aspect ratio, the load's total pixels) before its pixels are decoded, and a zip's
    entries are checked (count, declared sizes, encryption, compression method) before any is read.

    Args:
        source: one of the above; a list is read item by item, in order.
        limits: the bounds (default `Limits.from_env()`).

    Raises:
        ImageInputError: empty input, missing path, unreadable image (named), broken or image-less
            zip, an encrypted zip entry or one compressed in a way that cannot be read, or a limit
            exceeded (the message names the limit and its RECARE_MAX_... variable).
    """
    budget = _ImageBudget(limits)
    items = [source] if isinstance(source, (str, Path, Image.Image)) else list(source)
    images: list[Image.Image] = []
    for item in items:
        images.extend(_load_one(item, budget))
    if not images:
        raise ImageInputError("no images were given: upload images, a zip of images, or pick a folder.")
    return images


# Decoders tried on a user's image: only the formats its suffix may claim (a .png that is really a
# PSD or a TIFF is refused instead of reaching a decoder nobody meant to expose).
_DECODERS = ("PNG", "JPEG", "WEBP")  # JPEG covers camera MPO files too
# zip compression methods Python can read: stored, deflate, bzip2, lzma
_ZIP_METHODS = frozenset({zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA})


class _ImageBudget:
    """What one load may still take (images, pixels); every image of the load passes through it."""

    def __init__(self, limits: Limits | None):
        self.limits = limits or Limits.from_env()
        self.images = 0
        self.pixels = 0

    def reserve(self, count: int, where: str) -> None:
        """Count `count` more images before decoding any of them."""
        if self.images + count > self.limits.images:
            raise ImageInputError(self.limits.exceeded(
                "images", f"{where} brings the images to {self.images + count:,}"))
        self.images += count

    def check_bytes(self, size: int, label: str) -> None:
        """Refuse an image file larger than the per-image byte limit, before it is read."""
        if size > self.limits.image_bytes:
            raise ImageInputError(self.limits.exceeded("image_bytes", f"image {label} is {human_bytes(size)}"))

    def admit(self, size: tuple[int, int], label: str) -> None:
        """Check an image's header size (width, height) before its pixels are decoded."""
        width, height = size
        pixels = width * height
        limits = self.limits
        if width < 1 or height < 1:
            raise ImageInputError(f"image {label} is {width} x {height} pixels: it has no pixels.")
        if pixels > limits.image_pixels:
            raise ImageInputError(limits.exceeded(
                "image_pixels", f"image {label} is {width} x {height} = {pixels:,} pixels"))
        if max(width, height) > limits.image_aspect * min(width, height):
            raise ImageInputError(limits.exceeded(
                "image_aspect", f"image {label} is {width} x {height} pixels, a side ratio of "
                                f"{max(width, height) / min(width, height):,.0f} to 1"))
        if self.pixels + pixels > limits.total_pixels:
            raise ImageInputError(limits.exceeded(
                "total_pixels", f"with image {label} the images hold {self.pixels + pixels:,} pixels"))
        self.pixels += pixels


def _load_folder(folder: Path, budget: _ImageBudget) -> list[Image.Image]:
    if not folder.is_dir():
        raise ImageInputError(f"{folder} is not a folder of images.")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not p.name.startswith("."))
    if not files:
        raise ImageInputError(f"{folder} has no images (.png, .jpg, .jpeg or .webp): add some or pick another folder.")
    budget.reserve(len(files), f"the folder {folder.name}")
    return [_read_file(p, str(p), budget) for p in files]


def _read_file(path: Path, label: str, budget: _ImageBudget) -> Image.Image:
    budget.check_bytes(path.stat().st_size, label)
    return _decode(path.read_bytes(), label, budget)


def _load_one(item: str | Path | Image.Image, budget: _ImageBudget) -> list[Image.Image]:
    if isinstance(item, Image.Image):
        budget.reserve(1, "this image")
        budget.admit(item.size, "(in memory)")
        return [item.convert("RGB")]
    path = Path(item).expanduser()
    try:
        is_dir, is_file = path.is_dir(), path.is_file()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte
        is_dir = is_file = False
    if is_dir:
        return _load_folder(path, budget)
    if not is_file:
        raise ImageInputError(f"{str(path)[:200]} does not exist.")
    if path.suffix.lower() == ".zip":
        return _load_zip(path, budget)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise ImageInputError(f"{path.name} is not an image or a zip (use .png, .jpg, .jpeg, .webp or .zip).")
    budget.reserve(1, path.name)
    return [_read_file(path, path.name, budget)]


def _load_zip(path: Path, budget: _ImageBudget) -> list[Image.Image]:
    limits = budget.limits
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
            if len(entries) > limits.zip_members:
                raise ImageInputError(limits.exceeded("zip_members", f"{path.name} holds {len(entries):,} entries"))
            members = sorted((e for e in entries if _is_image_member(e.filename)), key=lambda e: e.filename)
            if not members:
                raise ImageInputError(f"{path.name} has no images (.png, .jpg, .jpeg or .webp) inside.")
            budget.reserve(len(members), path.name)
            for entry in members:  # everything the central directory tells, before anything is inflated
                _check_zip_entry(entry, f"{path.name}:{entry.filename}", budget)
            total = sum(e.file_size for e in members)
            if total > limits.zip_bytes:
                raise ImageInputError(limits.exceeded(
                    "zip_bytes", f"the images in {path.name} unpack to {human_bytes(total)}"))
            images = []
            for entry in members:
                label = f"{path.name}:{entry.filename}"
                with archive.open(entry) as member:
                    data = member.read(limits.image_bytes + 1)  # a size the header understated stops here
                budget.check_bytes(len(data), label)
                images.append(_decode(data, label, budget))
            return images
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, NotImplementedError, zlib.error,
            lzma.LZMAError) as e:
        raise ImageInputError(f"{path.name} is not a readable zip file ({e}); re-create the archive.") from e


def _check_zip_entry(entry: zipfile.ZipInfo, label: str, budget: _ImageBudget) -> None:
    if entry.flag_bits & 0x1:
        raise ImageInputError(f"{label} is encrypted: zip the images without a password.")
    if entry.compress_type not in _ZIP_METHODS:
        method = zipfile.compressor_names.get(entry.compress_type, f"method {entry.compress_type}")
        raise ImageInputError(f"{label} is compressed with {method}, which cannot be read: "
                              "re-create the zip with ordinary (deflate) compression.")
    budget.check_bytes(entry.file_size, label)


def _is_image_member(name: str) -> bool:
    parts = Path(name).parts
    if not parts or name.endswith("/") or any(p.startswith(".") or p == "__MACOSX" for p in parts):
        return False
    return Path(name).suffix.lower() in IMAGE_SUFFIXES


def _decode(data: bytes, label: str, budget: _ImageBudget) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data), formats=_DECODERS) as image:
            budget.admit(image.size, label)  # the header is read; no pixel is decoded yet
            image.load()
            return image.convert("RGB")
    except Image.DecompressionBombError as e:  # PIL's own guard (Image.MAX_IMAGE_PIXELS) fired at open
        claimed = re.search(r"\((\d+) pixels\)", str(e))
        what = f"{int(claimed.group(1)):,} pixels" if claimed else "too many pixels"
        raise ImageInputError(budget.limits.exceeded("image_pixels", f"image {label} claims {what}")) from e
    except UnidentifiedImageError as e:  # PIL's message only names an in-memory buffer
        raise ImageInputError(f"cannot read image {label}: the file is corrupt or not an image "
                              "(PNG, JPEG or WebP).") from e
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        if isinstance(e, ImageInputError):
            raise
        raise ImageInputError(f"cannot read image {label}: the file is corrupt or not an image ({e}).") from e


def images_summary(images: Sequence[Image.Image]) -> dict[str, Any]:
    """A small description of a list of images for configs and logs: count and distinct sizes.

    Args:
        images: the images.
    """
    return {"count": len(images), "sizes": sorted({f"{im.width}x{im.height}" for im in images})}
