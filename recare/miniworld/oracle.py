"""The oracle: a small multi-label CNN that says which mini-world concepts an image shows.

It stands in for human annotation and for the paper's ASR detectors (NudeNet, the WikiArt and
ImageNet classifiers): it is trained on rendered ground truth, with augmentations (blur, noise,
colour jitter, a down/up-sample, shifts) so that it still reads the blurrier, imperfect images
a small diffusion model generates.

Files (``checkpoints/mini-world/oracle/``): ``model.safetensors`` + ``config.json`` (concepts,
architecture, training recipe and held-out accuracy).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recare.progress import ProgressCallback
from recare.errors import RecareError
from recare.miniworld import world as W
from recare.atomic import atomic_save, atomic_write_json


class OracleError(RecareError, RuntimeError):
    """Raised when an oracle folder is missing or inconsistent."""


@dataclass
class OracleConfig:
    """Architecture + training recipe (written to config.json beside the weights)."""

    concepts: list[str] = field(default_factory=lambda: list(W.CONCEPTS))
    widths: tuple[int, ...] = (24, 48, 64, 96)  # one stride-2 stage each: 64 -> 32 -> 16 -> 8 -> 4
    n_train: int = 20000  # rendered training scenes
    epochs: int = 6
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0


class OracleNet(nn.Module):
    """Stride-2 conv-bn-relu stages (the last two with a second conv) -> global average + max pool -> linear.

    Max pooling keeps small evidence (a cigarette) that averaging over the 4x4 grid would dilute.
    """

    def __init__(self, n_concepts: int, widths=(24, 48, 64, 96)):
        super().__init__()
        layers, c_in = [], 3
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(c_in, w, 3, 2, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            if i >= len(widths) - 2:
                layers += [nn.Conv2d(w, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            c_in = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(2 * c_in, n_concepts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (n, 3, 64, 64) float in [0, 1] -> logits (n, C)."""
        h = self.features((x - 0.5) / 0.25)
        return self.head(torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1))


class Oracle:
    """A trained oracle: ``predict(images) -> (n, C)`` probabilities over ``concepts``."""

    def __init__(self, net: OracleNet, config: OracleConfig, device: str | torch.device = "cpu"):
        self.net = net.to(device).eval()
        self.config = config
        self.concepts = list(config.concepts)
        self.device = torch.device(device)

    @torch.no_grad()
    def predict(self, images, batch_size: int = 256) -> np.ndarray:
        """Concept probabilities for images.

        Args:
            images: uint8 array (n, H, W, 3), or a list of PIL images / uint8 arrays (any size;
                resized to 64x64).
            batch_size: images per forward pass.

        Returns:
            float32 array (n, len(concepts)) of independent per-concept probabilities.
        """
        x = images_to_tensor(images)
        out = [torch.sigmoid(self.net(x[i : i + batch_size].to(self.device))).cpu() for i in range(0, len(x), batch_size)]
        return torch.cat(out).numpy().astype(np.float32) if out else np.zeros((0, len(self.concepts)), np.float32)

    def detect(self, images, concept: str, threshold: float = 0.5) -> np.ndarray:
        """Bool per image: does it show ``concept``?"""
        if concept not in self.concepts:
            raise OracleError(f"unknown concept {concept!r}; the oracle knows {self.concepts}")
        return self.predict(images)[:, self.concepts.index(concept)] >= threshold


def predict(oracle: Oracle, images) -> np.ndarray:
    """Functional form of :meth:`Oracle.predict`."""
    return oracle.predict(images)


def images_to_tensor(images) -> torch.Tensor:
    """uint8 (n, H, W, 3) array or list of PIL images/arrays -> float (n, 3, 64, 64) in [0, 1]."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        arr = images
    elif len(images) == 0:
        arr = np.zeros((0, W.SIZE, W.SIZE, 3), np.uint8)
    else:
        from PIL import Image

        pils = [im if hasattr(im, "convert") else Image.fromarray(np.asarray(im, np.uint8)) for im in images]
        arr = np.stack([np.asarray(im.convert("RGB").resize((W.SIZE, W.SIZE), Image.BILINEAR)) for im in pils])
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float() / 255.0
    if x.shape[-2:] != (W.SIZE, W.SIZE):
        x = F.interpolate(x, size=(W.SIZE, W.SIZE), mode="bilinear", align_corners=False, antialias=True)
    return x


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Make renders look like generated images: shift, flip, colour jitter, blur, down/up-sample, noise.

    Args:
        x: (n, 3, 64, 64) float in [0, 1].
        g: torch Generator (the only randomness).
    """
    n = x.shape[0]

    def u(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(n, *shape, generator=g)

    flip = torch.rand(n, generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    dx, dy = int(torch.randint(-4, 5, (1,), generator=g)), int(torch.randint(-4, 5, (1,), generator=g))
    x = torch.roll(x, (dy, dx), (2, 3))
    grey = x.mean(1, keepdim=True)
    x = grey + u(0.6, 1.4, 1, 1, 1) * (x - grey)  # saturation
    x = (x - 0.5) * u(0.75, 1.25, 1, 1, 1) + 0.5 + u(-0.1, 0.1, 1, 1, 1) + u(-0.04, 0.04, 3, 1, 1)  # contrast, brightness, tint
    # blur a random half with a Gaussian of random width
    sigma = u(0.3, 1.6)
    k = torch.arange(-3, 4).float()
    kern = torch.exp(-(k[None] ** 2) / (2 * sigma[:, None] ** 2))
    kern = kern / kern.sum(1, keepdim=True)
    blurred = x.reshape(1, n * 3, 64, 64)
    kx = kern.repeat_interleave(3, 0)[:, None, None, :]
    blurred = F.conv2d(F.pad(blurred, (3, 3, 0, 0), mode="replicate"), kx, groups=n * 3)
    blurred = F.conv2d(F.pad(blurred, (0, 0, 3, 3), mode="replicate"), kx.transpose(2, 3), groups=n * 3)
    do_blur = (torch.rand(n, generator=g) < 0.5)[:, None, None, None]
    x = torch.where(do_blur, blurred.reshape(n, 3, 64, 64), x)
    # down/up-sample a random quarter (like a VAE's 8x bottleneck losing fine detail)
    small = F.interpolate(F.interpolate(x, size=32, mode="bilinear", antialias=True, align_corners=False), size=64, mode="bilinear", align_corners=False)
    x = torch.where((torch.rand(n, generator=g) < 0.25)[:, None, None, None], small, x)
    x = x + torch.randn(x.shape, generator=g) * u(0.0, 0.06, 1, 1, 1)
    return x.clamp(0, 1)


def _save_oracle_files(net: nn.Module, config: OracleConfig, out_dir: Path, metrics: dict) -> None:
    """Write model.safetensors, then config.json (with the metrics), each atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    atomic_save(out_dir / "model.safetensors", lambda tmp: save_file(tensors, str(tmp)))
    cfg = asdict(config)
    cfg["widths"] = list(config.widths)
    cfg["metrics"] = metrics
    atomic_write_json(out_dir / "config.json", cfg)


def load_oracle(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> Oracle:
    """Load a trained oracle folder (``config.json`` + ``model.safetensors``).

    Args:
        path: the folder; default ``<mini-world>/oracle`` (``RECARE_MINI_WORLD`` overrides the root).
        device: torch device.

    Raises:
        OracleError: the folder or its files are missing.
    """
    from safetensors.torch import load_file

    if path is None:
        from recare.models.policy import mini_world_dir

        path = mini_world_dir() / "oracle"
    path = Path(path)
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise OracleError(f"no oracle at {path} (needs config.json and model.safetensors); "
                          "train one with `python -m recare.miniworld.train --out DIR`.")
    raw = json.loads((path / "config.json").read_text())
    raw.pop("metrics", None)
    config = OracleConfig(**{k: v for k, v in raw.items() if k in OracleConfig.__dataclass_fields__})
    config.widths = tuple(config.widths)
    from recare.models.construction import building_modules

    with building_modules():  # a diffusers load in another thread would leave this net on meta
        net = OracleNet(len(config.concepts), config.widths)
    net.load_state_dict(load_file(str(path / "model.safetensors")))
    return Oracle(net, config, device)


def evaluate(oracle: Oracle, n: int = 2000, seed: int = 12345, images=None, labels=None) -> dict[str, float]:
    """Per-concept accuracy (threshold 0.5) on held-out renders.

    Args:
        oracle: the model.
        n: number of held-out renders (seeded by ``seed``, disjoint from training seeds).
        images, labels: evaluate on these instead of fresh renders.
    """
    if images is None:
        images, _, labels = W.sample_dataset(n, seed)
    pred = oracle.predict(images) >= 0.5
    return {c: float((pred[:, i] == labels[:, i]).mean()) for i, c in enumerate(oracle.concepts)}


def train_oracle(out_dir: str | os.PathLike | None, config: OracleConfig | None = None, smoke: bool = False,
                 progress: bool | ProgressCallback = True, n_eval: int = 2000) -> tuple[Oracle, dict]:
    """Train the oracle from scratch on rendered ground truth (CPU, deterministic for ``config.seed``).

    Args:
        out_dir: where to save (``model.safetensors`` + ``config.json``); None = do not save.
        config: recipe; default :class:`OracleConfig`.
        smoke: a few steps at a tiny size (for CI; the result is not a usable oracle).
        progress: the library's progress callback (`recare.progress`); True: tqdm bars, False: none.
        n_eval: held-out renders for the reported accuracy.

    Returns:
        ``(oracle, metrics)``; metrics has per-concept held-out accuracy and the training time.
    """
    import contextlib

    from recare.progress import emit, listening

    config = config or OracleConfig()
    if smoke:
        config = OracleConfig(**{**asdict(config), "n_train": 128, "epochs": 1, "batch_size": 64, "widths": (8, 16, 16, 16)})
        n_eval = min(n_eval, 32)
    torch.manual_seed(config.seed)
    g = torch.Generator().manual_seed(config.seed)
    start = time.time()
    images, _, labels = W.sample_dataset(config.n_train, seed=config.seed * 1000 + 1)
    x_all = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    y_all = torch.from_numpy(labels).float()
    net = OracleNet(len(config.concepts), config.widths)
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = config.n_train // config.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch, pct_start=0.15)
    bars = contextlib.ExitStack()
    listener = bars.enter_context(listening(progress))   # the library's progress protocol (True: tqdm bars)
    total, step = config.epochs * steps_per_epoch, 0
    net.train()
    for _ in range(config.epochs):
        order = torch.randperm(config.n_train, generator=g)
        for s in range(steps_per_epoch):
            idx = order[s * config.batch_size : (s + 1) * config.batch_size]
            x = augment(x_all[idx].float() / 255.0, g)
            loss = F.binary_cross_entropy_with_logits(net(x), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            emit(listener, "oracle", step, total, loss=loss.item())
    bars.close()
    oracle = Oracle(net, config)
    acc = evaluate(oracle, n=n_eval, seed=config.seed * 1000 + 999)
    metrics = {"heldout_accuracy": acc, "min_accuracy": min(acc.values()), "n_eval": n_eval,
               "train_seconds": round(time.time() - start, 1)}
    if out_dir is not None:
        _save_oracle_files(net, config, Path(out_dir), metrics)
    return oracle, metrics
