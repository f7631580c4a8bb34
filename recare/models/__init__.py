"""Loading models by name: text-to-image pipelines, image/text encoders, and trained UNet weights.

This module loads what a user names (a pipeline, an encoder, a training run's weights or learned
tokens). A few bundled or optional models are loaded by their own modules, each from a fixed place:
  recare/miniworld/oracle.py     the mini world's judge (`load_oracle`: a small classifier, safetensors)
  recare/miniworld/clip.py       the mini CLIP as the world's scorer (`load_mini_clip`)
  recare/miniworld/generator.py  the world's own VAE/UNet parts while building the mini world
  recare/safety.py               NudeNet (ONNX, through the `nudenet` package) for the safety flags
Everything else receives models as arguments. `recare.model_cache.ModelCache` keeps loaded ones
per process.

Names a user can give:
  pipelines: "mini-world" (the bundled offline world), a Hugging Face hub id such as
             "CompVis/stable-diffusion-v1-4" (the paper's model), or a local diffusers folder.
  encoders:  "mini-world" (the bundled mini CLIP), "open_clip:<arch>/<pretrained>" such as
             "open_clip:ViT-B-32/openai" (official) or "open_clip:ViT-B-16-SigLIP/webli", or a local
             transformers CLIPModel folder.
  trained:   a training run folder, or one of its weight formats (see `find_trained_weights`):
             `trained_params.safetensors` (only the changed UNet tensors), a diffusers `unet/`
             folder, or the official `ReCARE-Diffusers-UNet.pt` (the full UNet state dict).

Offline first: a hub model is read from the local Hugging Face cache when it is there; when it is
not and the hub cannot be reached (HF_HUB_OFFLINE=1, no network), loading fails at once with a
`ModelLoadError` that says what to do, never a hang or a traceback.

Public deployments: a `ModelPolicy` says which names a caller may load. The default (local use)
allows everything above. `ModelPolicy.public(allowed_dirs)` (the app on a Space, with --share or
--public) allows the bundled mini world, hub ids and open_clip names, and local folders only inside
the listed folders; every other path is refused with one message that says nothing about the
server's file system (an existing file, a folder and a missing path read the same).

Modules (each one job; this package re-exports their public names):
  policy.py     the names (mini world, hub ids, defaults) and `ModelPolicy` (who may load what)
  device.py     device and dtype ("auto": CUDA, then MPS, then CPU; fp16 on CUDA)
  hub.py        offline flags, the bounded hub probe, the offline message
  pipelines.py  `load_pipeline`, `derive_pipeline`
  weights.py    trained UNet weights and learned tokens (`find_trained_weights`, `apply_trained`, ...)
  encoders.py   `load_encoder` (mini CLIP, open_clip, transformers CLIP folders)

Imports: torch, diffusers, transformers, safetensors and open_clip are imported inside the
functions that need them, so `import recare.models` (names, device policy, offline checks) is cheap.
"""

from recare.errors import ModelLoadError
from recare.models.device import check_device_available, resolve_device, resolve_dtype
from recare.models.encoders import load_encoder
from recare.models.hub import HUB_PROBE_TIMEOUT_S, hub_offline_flag, hub_reachable
from recare.models.pipelines import derive_pipeline, load_pipeline
from recare.models.policy import (
    DEFAULT_HUB_MODEL, DEFAULT_OPEN_CLIP, LOCAL_USE, MINI_WORLD, PUBLIC_REFUSAL, REPO_ROOT, ModelPolicy, is_hub_id,
    mini_world_dir,
)
from recare.models.weights import (
    DIFFUSERS_UNET, OFFICIAL_UNET_FILE, STATE_DICT, TOKENS_DIR, TRAINED_PARAMS, TRAINED_PARAMS_FILE, TrainedWeights,
    apply_trained, find_token_files, find_trained_weights, load_learned_tokens, load_trained_unet_state,
)

__all__ = [
    "ModelLoadError", "check_device_available", "resolve_device", "resolve_dtype", "load_encoder",
    "HUB_PROBE_TIMEOUT_S", "hub_offline_flag", "hub_reachable", "derive_pipeline", "load_pipeline",
    "DEFAULT_HUB_MODEL", "DEFAULT_OPEN_CLIP", "LOCAL_USE", "MINI_WORLD", "PUBLIC_REFUSAL", "REPO_ROOT", "ModelPolicy",
    "is_hub_id", "mini_world_dir", "DIFFUSERS_UNET", "OFFICIAL_UNET_FILE", "STATE_DICT", "TOKENS_DIR",
    "TRAINED_PARAMS", "TRAINED_PARAMS_FILE", "TrainedWeights", "apply_trained", "find_token_files",
    "find_trained_weights", "load_learned_tokens", "load_trained_unet_state",
]
