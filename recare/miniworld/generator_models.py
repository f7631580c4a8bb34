"""Architectures of the mini world's text-to-image model (Stable Diffusion v1.4 in miniature).

Same parts, same wiring, same file layout as SD v1.4, only smaller, so every ReCARE code path
(textual inversion on the CLIP text encoder, ESD / ReCARE fine-tuning of the UNet, DDIM
sampling with classifier-free guidance) runs on it unchanged:

* ``AutoencoderKL``: SD's factor-8, 4-channel latent (64x64x3 -> 8x8x4);
* ``CLIPTextModel``: the real CLIP BPE vocabulary (49,408 tokens), 77 positions, small width;
* ``UNet2DConditionModel``: epsilon prediction on 8x8x4 latents, cross-attention on the text states;
* ``DDIMScheduler``: SD v1.4's betas (scaled_linear 0.00085-0.012, 1000 steps).

Every size lives in :class:`GeneratorRecipe`; the model code here has no I/O.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from .tokenizer import CONTEXT_LENGTH, VOCAB_SIZE

BOS_ID = VOCAB_SIZE - 2  # <|startoftext|>
EOS_ID = VOCAB_SIZE - 1  # <|endoftext|> (also CLIP's padding token, as in SD v1.4)


@dataclass(frozen=True)
class GeneratorRecipe:
    """Every size and training knob of the mini-world generator (defaults = the bundled model)."""

    # data
    num_images: int = 32_000  # rendered once, kept in memory as uint8 (~390 MB)
    data_seed: int = 1_000  # world seed offset (the world's own tests use small seeds)
    # autoencoder (AutoencoderKL, factor 8, 4 latent channels)
    vae_channels: tuple[int, ...] = (8, 16, 32, 64)  # one entry per level: 64, 32, 16, 8 px
    vae_layers_per_block: int = 1
    vae_norm_groups: int = 8
    vae_steps: int = 700  # AdamW steps on rendered images
    vae_batch: int = 32
    vae_lr: float = 1.5e-3
    vae_kl_weight: float = 1e-6  # times the per-image KL sum; reconstruction is a per-pixel mean
    decoder_steps: int = 1_200  # then decoder-only refinement (encoder frozen: same latent space)
    decoder_lr: float = 1e-3
    edge_weight: float = 1.0  # L1 on image gradients during decoder refinement (sharp thin details)
    # detail refinement of the saved decoder: the cigarette is ~180 of 4,096 pixels, so a plain
    # per-pixel loss lets the decoder blur it away; these renders weight its pixels up
    detail_images: int = 8_000
    detail_steps: int = 1_800
    detail_lr: float = 5e-4
    detail_mask_weight: float = 20.0  # loss weight of cigarette/smoke pixels (1 elsewhere)
    detail_smoking_share: float = 0.5  # share of the renders that include smoking
    # text encoder (CLIPTextModel)
    text_hidden: int = 96
    text_layers: int = 3
    text_heads: int = 4
    text_mlp: int = 384
    # UNet (UNet2DConditionModel on 8x8x4 latents)
    unet_channels: tuple[int, ...] = (64, 128)  # 8, 4 latent px
    unet_layers_per_block: int = 1
    unet_heads: int = 4
    unet_norm_groups: int = 32
    unet_steps: int = 3_200  # ~58 min at 1.08 s a step beside the other core's stages (train.py)
    unet_batch: int = 64
    unet_lr: float = 1e-3
    text_lr: float = 1e-3
    warmup_steps: int = 100
    caption_dropout: float = 0.1  # empty caption for classifier-free guidance
    min_snr_gamma: float = 5.0  # Min-SNR loss weighting (0 = plain epsilon MSE)
    aux_weight: float = 0.1  # text encoder: predict the concepts the caption names (head not saved)
    ema_decay: float = 0.995  # EMA of UNet + text encoder weights (what is saved)
    # runtime
    num_threads: int = 1  # torch CPU threads: on a shared, oversubscribed CPU 1 thread ran 6x faster than 2
    save_fp16: bool = True  # store weights in float16 (loads as float32 with torch_dtype)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def smoke(cls) -> "GeneratorRecipe":
        """Tiny sizes and a few steps: the whole recipe in seconds (for CI)."""
        return replace(
            cls(), num_images=256, vae_channels=(8, 8, 8, 8), vae_norm_groups=4, vae_steps=3, decoder_steps=2, vae_batch=8,
            detail_images=16, detail_steps=2,
            text_hidden=16, text_layers=1, text_heads=2, text_mlp=32, unet_channels=(32, 32), unet_heads=2,
            unet_norm_groups=8, unet_steps=3, unet_batch=8, warmup_steps=1,
        )


def build_vae(recipe: GeneratorRecipe):
    """SD-style ``AutoencoderKL``: 64x64x3 <-> 8x8x4 (len(vae_channels) == 4 levels => factor 8)."""
    from diffusers import AutoencoderKL

    n = len(recipe.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(recipe.vae_channels), layers_per_block=recipe.vae_layers_per_block,
        norm_num_groups=recipe.vae_norm_groups,
    )


def build_text_encoder(recipe: GeneratorRecipe):
    """A standard ``CLIPTextModel`` over the full CLIP BPE vocabulary (textual inversion adds rows)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=recipe.text_hidden, intermediate_size=recipe.text_mlp,
        num_hidden_layers=recipe.text_layers, num_attention_heads=recipe.text_heads,
        max_position_embeddings=CONTEXT_LENGTH, hidden_act="quick_gelu", projection_dim=recipe.text_hidden,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID,
    )
    return CLIPTextModel(config)


def build_unet(recipe: GeneratorRecipe):
    """``UNet2DConditionModel`` on 8x8x4 latents; cross-attention at every level but the last."""
    from diffusers import UNet2DConditionModel

    n = len(recipe.unet_channels)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=tuple(recipe.unet_channels),
        layers_per_block=recipe.unet_layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=recipe.text_hidden, attention_head_dim=recipe.unet_heads,  # diffusers: = number of heads
        norm_num_groups=recipe.unet_norm_groups,
    )


def scheduler_kwargs() -> dict:
    """SD v1.4's noise schedule (shared by the training DDPM scheduler and the saved DDIM one)."""
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def build_scheduler():
    """The pipeline's ``DDIMScheduler``, configured as SD v1.4 ships it."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**scheduler_kwargs(), clip_sample=False, set_alpha_to_one=False, steps_offset=1)
