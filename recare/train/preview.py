"""Preview images while a model trains: fixed prompts on fixed seeds, every N erase iterations.

    writer = PreviewWriter(PreviewConfig(prompts=[target_prompt, care_prompt], every=20), run_dir, pipe)
    writer.write_base()                                    # previews/base.png, once, with the base UNet
    train(..., preview=writer)                             # previews/<phase>-<step>.png every 20 iterations

Each preview is one PNG: a grid with one row per prompt and one column per seed, made with the
student UNet as it stands at that iteration (the rest of the pipeline is the base's, shared
read-only). `previews/previews.jsonl` lists them in order, one JSON line each, so a viewer finds
the latest without listing the folder. The same seeds are used for the base grid, so the two can
be put side by side.

Nothing explicit is stored: every image is checked with `recare.safety`; a flagged image (or
every image, when the detector is unavailable) is blurred before the grid is written, and the
line says how many tiles were hidden.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path
from typing import Any

from recare.config import ConfigError, GenerateConfig, JsonConfig, _check_int, _check_text
from recare.metrics_io import read_json_lines
from recare.timestamps import now_iso

PREVIEW_DIR = "previews"
INDEX_FILE = "previews.jsonl"
BASE_FILE = "base.png"
PREVIEW_STAGES = ("stage1.erase", "stage2", "esd")  # erase loops change the UNet; textual inversion does not


@dataclasses.dataclass
class PreviewConfig(JsonConfig):
    """What to preview and how often (kept in the run's config.json under "preview", outside "train").

    Attributes:
        prompts: the prompts, one grid row each (the app sends the target prompt and one CARE prompt).
        seeds: the fixed seeds, one grid column each.
        every: erase iterations between previews (the last iteration of a loop is always previewed).
        steps: DDIM steps of a preview image.
        guidance: classifier-free guidance of a preview image.
        height, width: image size; None: the model's native size.
    """

    prompts: list[str] = dataclasses.field(default_factory=lambda: ["a photo of a tench"])
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0, 1])
    every: int = 20
    steps: int = 25
    guidance: float = 7.5
    height: int | None = None
    width: int | None = None

    def validate(self) -> None:
        if not isinstance(self.prompts, list) or not 1 <= len(self.prompts) <= 4:
            raise ConfigError("preview prompts must be a list of 1 to 4 prompts.")
        for prompt in self.prompts:
            _check_text("preview prompt", prompt)
            if not prompt.strip():
                raise ConfigError("a preview prompt is empty.")
        if not isinstance(self.seeds, list) or not 1 <= len(self.seeds) <= 4:
            raise ConfigError("preview seeds must be a list of 1 to 4 seeds.")
        for name, value in [("preview seed", s) for s in self.seeds] + [("preview every", self.every),
                                                                        ("preview steps", self.steps)]:
            _check_int(name, value)
        if self.every < 1 or self.steps < 1 or min(self.seeds) < 0:
            raise ConfigError("preview every and steps must be at least 1, and seeds not negative.")


def preview_file_name(phase: str, step: int) -> str:
    """`stage1.erase[2]`, step 20 -> `stage1.erase-r2-000020.png`; `stage2`, 5 -> `stage2-000005.png`."""
    match = re.fullmatch(r"(.+)\[(\d+)\]", phase)
    stem = f"{match.group(1)}-r{match.group(2)}" if match else phase
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', stem)}-{step:06d}.png"


class PreviewWriter:
    """Makes the preview grids of one run; pass it to `recipe.train(..., preview=writer)`.

    Args:
        config: prompts, seeds, how often.
        run_dir: the run folder (grids go to `run_dir/previews`).
        pipe: the base pipeline (its VAE, text encoder, tokenizer and scheduler config are used).
    """

    def __init__(self, config: PreviewConfig, run_dir: str | Path, pipe):
        self.config = config
        self.folder = Path(run_dir) / PREVIEW_DIR
        self.pipe = pipe

    def _generate(self, unet) -> tuple[Any, int]:
        """The grid image made with `unet` (rows: prompts, columns: seeds) and how many tiles were blurred."""
        import torch
        from PIL import Image

        from recare import safety
        from recare.generate import generate_images

        components = dict(self.pipe.components)
        components["unet"] = unet
        components["scheduler"] = type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)
        pipe = type(self.pipe)(**components)
        pipe.set_progress_bar_config(disable=True)
        rows = []
        was_training = unet.training
        unet.eval()
        try:
            with torch.no_grad():
                for prompt in self.config.prompts:
                    images = []
                    for seed in self.config.seeds:  # one call per seed: each image is exactly "seed s"
                        gen = GenerateConfig(prompt=prompt, num_images=1, base_seed=int(seed), steps=self.config.steps,
                                             guidance=self.config.guidance, batch_size=1, height=self.config.height,
                                             width=self.config.width)
                        images.extend(generate_images(pipe, gen).images)
                    rows.append(images)
        finally:
            unet.train(was_training)
        flat = [im for row in rows for im in row]
        try:
            flags = [r.flagged for r in safety.check_images(flat)]
        except safety.SafetyUnavailableError:
            flags = [True] * len(flat)  # unchecked images are never stored as they are
        w, h = flat[0].size
        grid = Image.new("RGB", (w * len(self.config.seeds), h * len(rows)), "white")
        for i, (image, flagged) in enumerate(zip(flat, flags)):
            tile = safety.blur(image) if flagged else image
            grid.paste(tile.convert("RGB"), ((i % len(self.config.seeds)) * w, (i // len(self.config.seeds)) * h))
        return grid, sum(flags)

    def _save(self, name: str, unet, line: dict) -> Path:
        from recare.atomic import atomic_write_bytes
        import io

        self.folder.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        grid, hidden = self._generate(unet)
        buffer = io.BytesIO()
        grid.save(buffer, format="PNG")
        path = atomic_write_bytes(self.folder / name, buffer.getvalue())
        entry = {**line, "file": name, "prompts": list(self.config.prompts), "seeds": list(self.config.seeds),
                 "hidden": hidden, "seconds": round(time.perf_counter() - started, 3), "time": now_iso()}
        with open(self.folder / INDEX_FILE, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")
        return Path(path)

    def write_base(self) -> Path:
        """previews/base.png with the base UNet (once; kept when the run resumes)."""
        path = self.folder / BASE_FILE
        if path.is_file():
            return path
        return self._save(BASE_FILE, self.pipe.unet, {"phase": "base", "step": 0, "total": 0})

    def __call__(self, phase: str, step: int, total: int, unet) -> Path | None:
        """Write a preview of `unet` when `step` is a multiple of `every` or the loop's last step.

        Args:
            phase: the recipe's phase name ("stage1.erase[1]", "stage2", "esd").
            step: the iteration just finished (1-based).
            total: the loop's iterations.
            unet: the student UNet as it stands now.
        """
        if step % self.config.every and step != total:
            return None
        return self._save(preview_file_name(phase, step), unet, {"phase": phase, "step": step, "total": total})


def read_previews(run_dir: str | Path) -> list[dict]:
    """The preview lines of a run, oldest first (a torn last line from a crash is skipped)."""
    return [row for row in read_json_lines(Path(run_dir) / PREVIEW_DIR / INDEX_FILE)
            if isinstance(row.get("file"), str) and "/" not in row["file"]]


__all__ = ["PreviewConfig", "PreviewWriter", "read_previews", "preview_file_name", "PREVIEW_DIR", "BASE_FILE"]
