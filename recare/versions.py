"""The one record of library versions that run files carry (an evaluation's manifest.json, a training
run's config.json, a detector's `version`): Python, recare and each library the numbers depend on.
"""

from __future__ import annotations

import importlib.metadata
import platform

# the distributions whose versions change an image or a number (pip names)
RECORDED = ("torch", "diffusers", "transformers", "numpy", "accelerate", "open_clip_torch", "torchvision",
            "nudenet", "onnxruntime", "Pillow", "safetensors")


def package_version(package: str) -> str:
    """The installed version of a distribution, or "not installed".

    Args:
        package: its pip name ("torch", "open_clip_torch", ...).
    """
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def library_versions(packages: tuple[str, ...] = RECORDED) -> dict[str, str]:
    """{"python", "recare", and each of `packages`: its version} (a package that is missing: "not installed").

    Args:
        packages: pip names to record (default `RECORDED`).
    """
    import recare

    return {"python": platform.python_version(), "recare": recare.__version__,
            **{package: package_version(package) for package in packages}}


__all__ = ["RECORDED", "package_version", "library_versions"]
