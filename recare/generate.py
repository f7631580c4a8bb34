"""Seeded, batched image generation, and reading images a user brings instead (folder or zip).

Image i always starts from the noise of seed `base_seed + i` (official: 42 + i): each image gets its
own `torch.Generator`, so the batch size changes speed and memory, never the images.
Generators live on the CPU so the same seed gives the same starting noise on every device.
"""

from __future__ import annotations

import dataclasses
import io
import time
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, Sequence

import torch
from PIL import Image, UnidentifiedImageError

from recare.config import GenerateConfig
from recare.runs import atomic_write_bytes, atomic_write_json

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


from recare.errors import ImageInputError  # noqa: E402  (re-exported: raised by this module)


class CancelToken(Protocol):
    def is_set(self) -> bool: ...


@dataclasses.dataclass
class GenerationResult:
    """What `generate_images` made.

    Attributes:
        images: the images, image i made from seed `seeds[i]`.
        seeds: one seed per image.
        metadata: prompt, seeds, model, settings, timing, and whether it was cancelled.
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


def generate_images(
    pipe,
    config: GenerateConfig,
    progress: Callable[[int, int], None] | None = None,
    cancel: CancelToken | None = None,
) -> GenerationResult:
    """Generate `config.num_images` images of `config.prompt`, `config.batch_size` per pipeline call.

    Args:
        pipe: a diffusers StableDiffusionPipeline (see `recare.models.load_pipeline`).
        config: prompt, number of images, base seed, steps, guidance, batch size, size.
        progress: optional `progress(done, total)` called after each batch.
        cancel: optional object with `.is_set()` (e.g. threading.Event), checked before each batch;
            when set, the images made so far are returned and `metadata["cancelled"]` is True.
    """
    config.validate()
    seeds = image_seeds(config)
    images: list[Image.Image] = []
    cancelled = False
    started = time.perf_counter()
    for start in range(0, len(seeds), config.batch_size):
        if cancel is not None and cancel.is_set():
            cancelled = True
            break
        batch = seeds[start:start + config.batch_size]
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
        images.extend(output.images)
        if progress is not None:
            progress(len(images), len(seeds))
    made = seeds[:len(images)]
    metadata = {
        "prompt": config.prompt,
        "negative_prompt": config.negative_prompt,
        "seeds": made,
        "model": _model_name(pipe),
        "scheduler": type(pipe.scheduler).__name__,
        "device": str(getattr(pipe, "device", "")),
        "dtype": str(getattr(pipe, "dtype", "")).replace("torch.", ""),
        "settings": config.to_dict(),
        "num_requested": config.num_images,
        "num_images": len(images),
        "cancelled": cancelled,
        "seconds": round(time.perf_counter() - started, 3),
    }
    if cancelled:
        metadata["note"] = f"cancelled after {len(images)} of {config.num_images} images; the images made are kept"
    return GenerationResult(images=images, seeds=made, metadata=metadata)


def _model_name(pipe) -> str:
    config = getattr(pipe, "config", None)
    name = getattr(config, "_name_or_path", None) if config is not None else None
    if name is None and isinstance(config, dict):
        name = config.get("_name_or_path")
    return str(name or getattr(pipe, "name_or_path", "") or "unknown")


def save_generation(result: GenerationResult, out_dir: str | Path) -> Path:
    """Write the images as `000.png, 001.png, ...` and `manifest.json` (metadata + file names).

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
    atomic_write_json(out_dir / "manifest.json", {**result.metadata, "files": files})
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
