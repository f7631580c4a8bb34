"""The weights files a finished training run hands out, each exported once.

    weights_file(run_dir, fmt)    the file of one format: trained_params, unet_folder (a zip), official_pt

trained_params.safetensors is what training writes. The two full-UNet formats (`recare.train.export`) are
made from the base model plus those trained parameters the first time they are asked for, unless training
wrote them (TrainConfig.outputs), and then served as files: each records the fingerprint of the trained
parameters it was made from (`recare.hashing.file_fingerprint`, in `<run>/exports.json`), so a later request
only reads that small record, and a run whose parameters changed (trained again) is exported again. One
export at a time per run: a second request for the same file waits for the first and reuses its result.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from types import MappingProxyType

from recare.atomic import atomic_write_json, read_json_object
from recare.errors import ConfigError, RunError
from recare.hashing import file_fingerprint

FORMATS = MappingProxyType({"trained_params": "trained_params.safetensors", "unet_folder": "unet.zip",
                            "official_pt": "ReCARE-Diffusers-UNet.pt"})  # format -> the file handed out
RECORD = "exports.json"   # format -> fingerprint of the trained parameters the file was made from
_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_LOCK = threading.Lock()


def _lock(run_dir: Path) -> threading.Lock:
    with _LOCKS_LOCK:
        return _LOCKS.setdefault(str(run_dir.resolve()), threading.Lock())


def weights_file(run_dir: str | Path, fmt: str, model: str | None = None) -> Path:
    """The file of format `fmt` for a finished training run, exported now when it is missing or stale.

    Args:
        run_dir: the training run's folder (trained_params.safetensors, config.json).
        fmt: a key of FORMATS.
        model: the base model (default: the run's config.json "train" "model", else the mini world).

    Raises:
        ConfigError: an unknown format.
        RunError: the run has no trained parameters.
    """
    from recare.models import MINI_WORLD, TRAINED_PARAMS_FILE

    if fmt not in FORMATS:
        raise ConfigError(f"unknown download format {str(fmt)[:40]!r}: use one of {list(FORMATS)}.")
    run_dir = Path(run_dir)
    params = run_dir / TRAINED_PARAMS_FILE
    if not params.is_file():
        raise RunError(f"run {run_dir.name} has no {TRAINED_PARAMS_FILE}.")
    if fmt == "trained_params":
        return params
    target = run_dir / FORMATS[fmt]
    with _lock(run_dir):
        fingerprint, record = file_fingerprint(params), read_json_object(run_dir / RECORD)
        made = record.get(fmt)
        if target.is_file() and made in (None, fingerprint):  # None: training wrote it with the parameters
            if made is None:
                atomic_write_json(run_dir / RECORD, {**record, fmt: fingerprint})
            return target
        if model is None:
            train = read_json_object(run_dir / "config.json").get("train")
            model = train.get("model") if isinstance(train, dict) else None
        _export(run_dir, fmt, target, model or MINI_WORLD, stale=made is not None)
        atomic_write_json(run_dir / RECORD, {**record, fmt: fingerprint})
    return target


def _export(run_dir: Path, fmt: str, target: Path, model: str, stale: bool) -> None:
    """Write `target` from the base model plus the run's trained parameters (a unet/ folder training wrote is
    zipped as it is, unless it is stale)."""
    from recare.models import load_pipeline
    from recare.train import export

    folder = run_dir / export.UNET_FOLDER
    if fmt == "official_pt" or stale or not folder.is_dir():
        pipe = load_pipeline(model, device="cpu", dtype="fp32", trained=run_dir)
        if fmt == "official_pt":
            export.save_official_pt(pipe.unet, target)
            return
        export.save_unet_folder(pipe.unet, folder)
        del pipe
    tmp = run_dir / f".unet-{time.time_ns()}"
    shutil.make_archive(str(tmp), "zip", root_dir=run_dir, base_dir=export.UNET_FOLDER)
    Path(f"{tmp}.zip").replace(target)


__all__ = ["weights_file", "FORMATS", "RECORD"]
