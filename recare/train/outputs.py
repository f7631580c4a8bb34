"""What a finished (or started) training run writes besides its state: config.json, careset.json, the
learned tokens and the trained UNet in the formats `TrainConfig.outputs` asks for (recare.train.export)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Sequence

import torch

from recare.atomic import atomic_write_json
from recare.careset_io import write_careset_json
from recare.config import TrainConfig
from recare.versions import library_versions

CARESET_FILE = "careset.json"
CONFIG_FILE = "config.json"


def write_config(config: TrainConfig, pipe, out_dir: Path, careset=None, images=None,
                 extra: dict | None = None) -> dict:
    """config.json: every setting, the base model's fingerprint, library versions (plus `extra`, kept as given).

    Args:
        config: the run's settings.
        pipe: the base pipeline (its UNet is fingerprinted).
        out_dir: the run folder.
        careset: the CARE-set used (also written to careset.json in the official format).
        images: the target images (their count is recorded).
        extra: keys already in the folder's config.json to keep (a job's submitted settings).
    """
    from recare.train.export import model_fingerprint

    data = {**(extra or {}), "train": config.to_dict(), "base_model": {
        "name": config.model, "unet_fingerprint": model_fingerprint(pipe.unet),
        "text_encoder_fingerprint": model_fingerprint(pipe.text_encoder)},
        "versions": library_versions(), "target_images": len(images) if images is not None else None}
    atomic_write_json(out_dir / CONFIG_FILE, data)
    if careset is not None:
        write_careset_json(careset, out_dir / CARESET_FILE)
    return data


def write_outputs(config: TrainConfig, base: torch.nn.Module, unet: torch.nn.Module, tokens: Sequence,
                  out_dir: Path) -> dict[str, str]:
    """Write the learned tokens and the UNet in the formats `config.outputs` asks for (recare.train.export).

    Args:
        config: the run's settings (outputs, train_method, method).
        base: the base UNet (fingerprint; what "changed" is measured against).
        unet: the trained UNet.
        tokens: the learned tokens.
        out_dir: the run folder.

    Returns:
        {output name: path relative to out_dir}.
    """
    from recare.models import OFFICIAL_UNET_FILE, TRAINED_PARAMS_FILE
    from recare.train import export

    files: dict[str, str] = {}
    base_fingerprint = export.model_fingerprint(base)
    if tokens:
        for path in export.save_learned_tokens(list(tokens), out_dir, {"base_fingerprint": base_fingerprint}):
            files[f"tokens/{path.stem}"] = str(path.relative_to(out_dir))
    saved = copy.deepcopy(unet).to(base.dtype) if unet.dtype != base.dtype else unet  # the base model's dtype
    writers = {
        "trained_params": lambda: export.save_trained_params(
            saved, base.state_dict(), out_dir / TRAINED_PARAMS_FILE, config.train_method, base_fingerprint,
            {"method": config.method, "reference_word": config.reference_word}),
        "unet_folder": lambda: export.save_unet_folder(saved, out_dir / export.UNET_FOLDER),
        "official_pt": lambda: export.save_official_pt(saved, out_dir / OFFICIAL_UNET_FILE),
    }
    for name in config.outputs:
        files[name] = str(Path(writers[name]()).relative_to(out_dir))
    return files
