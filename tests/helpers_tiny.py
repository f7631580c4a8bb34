"""Tiny seeded models for CPU tests, saved with save_pretrained so they load exactly as real ones do.

Reusable by every test module:
    make_tiny_pipeline(path)  -> a StableDiffusionPipeline folder (64x64 images, a few MB)
    make_tiny_clip(path)      -> a transformers CLIPModel + CLIPTokenizer + CLIPImageProcessor folder
    make_tiny_tokenizer(path) -> a CLIPTokenizer folder (the real CLIP BPE, first 500 merges only)

Sizes follow diffusers' own tests (block_out_channels=(4, 8), hidden size 32).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch

from recare.miniworld.tokenizer import _bytes_to_unicode as bytes_to_unicode

TINY_MERGES = 500    # first merges of the CLIP BPE: common words become one token, the rest splits
TINY_HIDDEN = 32     # text hidden size = UNet cross-attention size


def make_tiny_tokenizer(path: str | Path, num_merges: int = TINY_MERGES) -> Path:
    """Save a CLIPTokenizer whose vocabulary is the real CLIP BPE cut to its first `num_merges` merges.

    Args:
        path: folder to write vocab.json, merges.txt and the tokenizer config into.
        num_merges: merges kept; vocabulary size = 512 + num_merges + 2.
    """
    from open_clip.tokenizer import default_bpe
    from transformers import CLIPTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:1 + num_merges]]
    chars = list(bytes_to_unicode().values())  # the first 512 vocabulary entries come from it
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    (path / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77, "do_lower_case": True}))
    tokenizer = CLIPTokenizer.from_pretrained(path)  # reads the vocab files in every transformers version
    tokenizer.save_pretrained(path)
    return path


def tiny_vocab_size(num_merges: int = TINY_MERGES) -> int:
    return 512 + num_merges + 2


def _tiny_text_config(num_merges: int = TINY_MERGES):
    from transformers import CLIPTextConfig

    vocab_size = tiny_vocab_size(num_merges)
    return CLIPTextConfig(
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
        hidden_size=TINY_HIDDEN, intermediate_size=37, layer_norm_eps=1e-5, num_attention_heads=4,
        num_hidden_layers=2, vocab_size=vocab_size, max_position_embeddings=77, projection_dim=16,
    )


def build_tiny_pipeline(seed: int = 0, tokenizer_dir: str | Path | None = None):
    """A StableDiffusionPipeline with random weights from `seed` (UNet (4, 8) channels, 64x64 images).

    Args:
        seed: torch seed for the random weights.
        tokenizer_dir: an existing tiny tokenizer folder; made in a temp folder when None.
    """
    import tempfile

    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TINY_HIDDEN, norm_num_groups=2,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=[4, 8], in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], latent_channels=4, norm_num_groups=2,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_tiny_text_config())
    if tokenizer_dir is None:
        tokenizer_dir = make_tiny_tokenizer(Path(tempfile.mkdtemp(prefix="tiny-tok-")))
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def make_tiny_pipeline(path: str | Path, seed: int = 0) -> Path:
    """Save a tiny StableDiffusionPipeline to `path` (a diffusers folder with model_index.json).

    Args:
        path: destination folder.
        seed: torch seed for the random weights.
    """
    path = Path(path)
    tokenizer_dir = make_tiny_tokenizer(path / "_tokenizer_src")
    pipe = build_tiny_pipeline(seed, tokenizer_dir=tokenizer_dir)
    pipe.save_pretrained(path)
    for f in sorted(tokenizer_dir.iterdir()):
        f.unlink()
    tokenizer_dir.rmdir()
    return path


def make_tiny_clip(path: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """Save a tiny transformers CLIPModel with its CLIPTokenizer and CLIPImageProcessor to `path`.

    Args:
        path: destination folder.
        seed: torch seed for the random weights.
        image_size: input resolution of the vision tower.
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionConfig

    path = Path(path)
    make_tiny_tokenizer(path)
    vision = CLIPVisionConfig(
        hidden_size=TINY_HIDDEN, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        image_size=image_size, patch_size=8, projection_dim=16,
    )
    config = CLIPConfig(text_config=_tiny_text_config().to_dict(), vision_config=vision.to_dict(), projection_dim=16)
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(path)
    CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
    ).save_pretrained(path)
    return path


TINY_CAPTIONS = ("a photo of a fish", "a man on the grass", "a boat on a lake")


def make_tiny_eval_world(root: str | Path, captions_text: str = "\n".join(TINY_CAPTIONS) + "\n") -> Path:
    """`root` with what an evaluation on tiny models needs: pipeline/, clip/ and captions.txt."""
    root = Path(root)
    make_tiny_pipeline(root / "pipeline")
    make_tiny_clip(root / "clip")
    (root / "captions.txt").write_text(captions_text)
    return root


def cancel_after(token, count: int, seen: list):
    """A progress callback that records every event in `seen` and sets `token` at the `count`-th."""
    def progress(event):
        seen.append(event)
        if len(seen) == count:
            token.cancel()
    return progress
