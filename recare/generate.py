"""Seeded, batched image generation, and reading images a user brings instead (folder or zip).

Image i always starts from the noise of seed `base_seed + i` (official: 42 + i): each image gets its
own `torch.Generator`, so the batch size changes speed and memory, never the images.
Generators live on the CPU so the same seed gives the same starting noise on every device.

    iter_generation(pipe, config, progress, cancel)  -> one GeneratedBatch per pipeline call
    generate_images(pipe, config, progress, cancel)  -> all of them, as a GenerationResult
    save_generation(result, folder)                  -> 000.png, 001.png, ... + manifest.json
    write_manifest(folder, metadata, files, safety)  -> the one manifest.json schema (CLI and app)
"""

from __future__ import annotations

import dataclasses
import io
import time
import zipfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from PIL import Image, UnidentifiedImageError

from recare.config import GenerateConfig
from recare.progress import CancelToken, ProgressCallback, emit
from recare.runs import atomic_write_bytes, atomic_write_json

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


def iter_generation(
    pipe,
    config: GenerateConfig,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
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

    Yields:
        One `GeneratedBatch` per pipeline call, in seed order.
    """
    config.validate()
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
) -> GenerationResult:
    """Generate `config.num_images` images of `config.prompt` (every batch of `iter_generation`).

    Args:
        pipe: a diffusers StableDiffusionPipeline (see `recare.models.load_pipeline`).
        config: prompt, number of images, base seed, steps, guidance, batch size, size.
        progress: optional callback, called with a `recare.progress.ProgressEvent` per batch.
        cancel: optional `recare.progress.CancelToken` (or threading.Event), checked before each
            batch; when set, the images made so far are returned and `metadata["cancelled"]` is True.
    """
    started = time.perf_counter()
    images: list[Image.Image] = []
    seeds: list[int] = []
    for batch in iter_generation(pipe, config, progress, cancel):
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


# ---------------------------------------------------------------------------------------------
# images the user brings


def load_image_folder(path: str | Path) -> list[Image.Image]:
    """Every .png/.jpg/.jpeg/.webp image directly inside `path`, sorted by name, as RGB.

    Args:
        path: the folder.

    Raises:
        ImageInputError: no such folder, no images in it, or an image that cannot be read (named).
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ImageInputError(f"{folder} is not a folder of images.")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not p.name.startswith("."))
    if not files:
        raise ImageInputError(f"{folder} has no images (.png, .jpg, .jpeg or .webp): add some or pick another folder.")
    return [_decode(p.read_bytes(), str(p)) for p in files]


def load_images(source: str | Path | Image.Image | Iterable[str | Path | Image.Image]) -> list[Image.Image]:
    """Images from a folder, a .zip, image files, PIL images, or a list mixing them (e.g. an upload).

    Args:
        source: one of the above; a list is read item by item, in order.

    Raises:
        ImageInputError: empty input, missing path, unreadable image (named), broken or image-less zip.
    """
    items = [source] if isinstance(source, (str, Path, Image.Image)) else list(source)
    images: list[Image.Image] = []
    for item in items:
        images.extend(_load_one(item))
    if not images:
        raise ImageInputError("no images were given: upload images, a zip of images, or pick a folder.")
    return images


def _load_one(item: str | Path | Image.Image) -> list[Image.Image]:
    if isinstance(item, Image.Image):
        return [item.convert("RGB")]
    path = Path(item).expanduser()
    if path.is_dir():
        return load_image_folder(path)
    if not path.is_file():
        raise ImageInputError(f"{path} does not exist.")
    if path.suffix.lower() == ".zip":
        return _load_zip(path)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise ImageInputError(f"{path.name} is not an image or a zip (use .png, .jpg, .jpeg, .webp or .zip).")
    return [_decode(path.read_bytes(), path.name)]


def _load_zip(path: Path) -> list[Image.Image]:
    try:
        with zipfile.ZipFile(path) as archive:
            names = sorted(n for n in archive.namelist() if _is_image_member(n))
            if not names:
                raise ImageInputError(f"{path.name} has no images (.png, .jpg, .jpeg or .webp) inside.")
            return [_decode(archive.read(n), f"{path.name}:{n}") for n in names]
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as e:
        raise ImageInputError(f"{path.name} is not a readable zip file ({e}); re-create the archive.") from e


def _is_image_member(name: str) -> bool:
    parts = Path(name).parts
    if not parts or name.endswith("/") or any(p.startswith(".") or p == "__MACOSX" for p in parts):
        return False
    return Path(name).suffix.lower() in IMAGE_SUFFIXES


def _decode(data: bytes, label: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ImageInputError(f"cannot read image {label}: the file is corrupt or not an image ({e}).") from e


def images_summary(images: Sequence[Image.Image]) -> dict[str, Any]:
    """A small description of a list of images for configs and logs: count and distinct sizes.

    Args:
        images: the images.
    """
    return {"count": len(images), "sizes": sorted({f"{im.width}x{im.height}" for im in images})}
