"""The session's image set on disk: add images, check them for nudity, and list them for a gallery.

Images flagged by `recare.safety` (or every image, when the detector is unavailable and the user
has not opted in) are shown as blurred copies; the originals never leave the session folder
unless the user reveals them one by one.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

from PIL import Image

from recare import safety
from recare.config import GenerateConfig
from recare.generate import generation_metadata, write_manifest
from recare.atomic import atomic_write_bytes
from ui.common import md, served
from ui.session import Session


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def add_images(session: Session, images: Sequence[Image.Image], seeds: Sequence[int | None],
               run_id: int | None = None, replace: bool = False, source: str | None = None) -> bool:
    """Save `images` into the session folder, run the safety check on them, and append them.

    Args:
        session: the session (its image set grows).
        images: the new images.
        seeds: one seed per image (None for uploaded images).
        run_id: the generation run these images belong to; when given and the session has moved
            on (Cancel bumped `session.run_id`), nothing is added.
        replace: the images start a new set: the old one is dropped here, in the same step as the
            new images arrive, so a request that fails before it has any image keeps the old set.
        source: the new set's description (with `replace`).

    Returns:
        Whether the images were added.
    """
    try:  # the slow part runs outside the lock, so Cancel answers at once
        results = safety.check_images(images)
        flags, checked = [r.flagged for r in results], True
    except safety.SafetyUnavailableError:
        flags, checked = [True] * len(images), False
    with session.lock:
        if run_id is not None and session.run_id != run_id:
            return False
        if replace:
            session.clear_images()
            if source is not None:
                session.source = source
        session.checked = session.checked and checked
        for image, seed, flag in zip(images, seeds, flags):
            index = len(session.images)
            path = session.image_dir / f"{index:04d}.png"
            atomic_write_bytes(path, _png_bytes(image))
            if flag or not session.checked:
                atomic_write_bytes(_hidden_path(session, index), _png_bytes(safety.blur(image)))
            session.images.append(path)
            session.seeds.append(seed)
            session.flags.append(bool(flag))
    return True


def write_image_manifest(session: Session, pipe, config: GenerateConfig, model: str, seconds: float | None = None,
                         run_id: int | None = None) -> Path | None:
    """Write the session's `images/manifest.json` with the library's writer (`recare.generate.write_manifest`).

    Same schema as a CLI generate run, plus `safety`: {"flagged": one bool per image,
    "checked": False when the detector was unavailable (then every image is hidden)}.

    Args:
        session: the session whose generated images it describes.
        pipe, config: the pipeline and settings that made them.
        model: the model name the user picked ("mini-world", a hub id, a folder).
        seconds: time spent so far.
        run_id: the generation run writing it; when given and the session has moved on, nothing
            is written (the folder belongs to the next run).

    Returns:
        The manifest's path, or None when nothing was written.
    """
    with session.lock:  # files, seeds and flags from one moment; Cancel cannot interleave
        if run_id is not None and session.run_id != run_id:
            return None
        metadata = generation_metadata(pipe, config, list(session.seeds), seconds=seconds, model=model)
        return write_manifest(session.image_dir, metadata, [p.name for p in session.images],
                              safety={"flagged": list(session.flags), "checked": session.checked})


def _hidden_path(session: Session, index: int):
    return session.image_dir / f"{index:04d}.hidden.png"


def load_session_images(session: Session) -> list[Image.Image]:
    """The session's images as RGB PIL images (originals, for feature extraction)."""
    out = []
    for path in session.images:
        with Image.open(path) as im:
            out.append(im.convert("RGB"))
    return out


def gallery_items(session: Session) -> list[tuple[str, str]]:
    """(file path, caption) per image, the blurred copy where the image is hidden."""
    items = []
    for i, path in enumerate(session.images):
        seed = session.seeds[i]
        label = f"#{i} · seed {seed}" if seed is not None else f"#{i} · uploaded"
        if session.is_hidden(i):
            hidden = _hidden_path(session, i)
            if not hidden.is_file():
                with Image.open(path) as im:
                    atomic_write_bytes(hidden, _png_bytes(safety.blur(im)))
            why = "flagged by NudeNet" if session.checked else "not checked (detector unavailable)"
            items.append((served(hidden), f"{label} · hidden: {why}"))
        else:
            items.append((served(path), label + (" · revealed" if i in session.revealed else "")))
    return items


def summary_line(session: Session) -> str:
    """One Markdown line: how many images, how many hidden, and where they came from."""
    n = len(session.images)
    if n == 0:
        return "No images yet: generate some or upload images / a zip."
    hidden = sum(session.is_hidden(i) for i in range(n))
    flagged = sum(session.flags) if session.checked else None
    parts = [f"**{n} image{'s' if n != 1 else ''}** ({md(session.source)})"]
    if flagged is None:
        parts.append("the nudity detector is unavailable, so every image is blurred until you opt in")
    elif flagged:
        parts.append(f"{flagged} flagged by NudeNet")
    if hidden:
        parts.append(f"{hidden} shown blurred (select one and press *Reveal / hide*)")
    return " · ".join(parts)
