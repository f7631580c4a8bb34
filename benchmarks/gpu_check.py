"""The paper-scale path on one GPU: speed, peak memory and seeding of an SD v1.4-shaped model, as one table.

    python -m benchmarks.gpu_check OUT_DIR [--device auto] [--tiny] [--parts gen,careset,train,eval]

It builds a Stable Diffusion v1.4-shaped pipeline with random weights from the real configs (the
v1.4 UNet and VAE configs of `benchmarks.train_speed`, a CLIP ViT-L/14-shaped text encoder of 12
layers over the full 49,408-token CLIP BPE), saves it with `save_pretrained` and loads it back
through `recare.models.load_pipeline`, exactly as a hub folder. Then, on the device:

  gen      generation at the model's 512 px, 50 DDIM steps, guidance 7.5, batches of 8: fp32 weights
           (what a training job uses), fp32 under bf16 autocast, fp16, bf16: images/s, the
           projection for 500 images, peak memory; and seeding: the images of seeds 42 + i made
           twice in the same batches are compared bit for bit, and made one at a time (max pixel
           difference).
  careset  the CARE-set with random CLIP encoders of the real shapes (ViT-B/32, D = 512, the
           official encoder; ViT-L/14, D = 768) saved and loaded as transformers folders: encoding
           500 images and the 49,408 vocabulary entries on the device, candidate selection
           500 x 49,408 x D (numpy, on the CPU, as the library does it), refinement (t-SNE, k-means).
  train    one textual-inversion step, one stage-1 ESD iteration and one stage-2 iteration (with
           the x_t roll-out at the official mean k = 24.5: the mean of one iteration at k = 24 and
           one at k = 25, after a warm-up iteration), the recipe's way (base loaded in fp32, the
           student a float32 copy, autocast as `TrainConfig.dtype`), for noxattn and xattn, fp32 /
           bf16 / fp16 autocast, with and without gradient checkpointing; peak memory of each stage
           (`torch.cuda.max_memory_allocated`), and what stays allocated after it (a leak check).
  eval     one evaluation batch of 16 images through the judges: NudeNet (its ONNX weights ship in
           its wheel; ONNX Runtime), a ResNet-50 top-3 classifier, a ViT-B/16 image classifier and
           CLIP zero-shot (ViT-L/14) with random weights of the real shapes (the real weights come
           from the hub, which the measuring machine cannot reach: speed does not depend on them).

The full recipe is projected from those figures with the official settings (stage 1: 2 rounds of
200 ESD iterations and 3000 TI steps on 250 images; stage 2: 200 iterations) against the paper's
one-H100 anchor (CARE-set 1.78 min; textual inversion 23.23 + ReCARE 5.10 = 28.33 min; 24 GB) and
our goal (<= 10 min, <= 16 GB). It prints one table and writes OUT_DIR/gpu_check.json after every
part (a run cut short keeps what it measured). `--tiny` shrinks every model (and the vocabulary,
the image counts and the timed steps) so that the CPU dry run takes seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import json
import platform
import shutil
import tempfile
import time
import warnings
from pathlib import Path

from recare.runtime import set_process_defaults

if __name__ == "__main__":  # a process entry: set OMP_WAIT_POLICY before anything imports torch
    set_process_defaults()

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.train_speed import (  # noqa: E402
    ADV_TOKENS, ANCHORS, CONCEPT, MEAN_K, RECIPE, RETAIN, SD14_SCHEDULER, SD14_UNET, SD14_VAE, FixedK,
    random_images, sync,
)

PAPER = {"careset_min": 1.78, "ti_min": 23.23, "recare_min": 5.10, "train_min": 28.33, "memory_gb": 24.0}
GOAL = {"train_min": 10.0, "memory_gb": 16.0}
PARTS = ("gen", "careset", "train", "eval")
TARGET_IMAGES = 500
AMPS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
K_LOW, K_HIGH = int(MEAN_K), int(MEAN_K) + 1     # 24 and 25: their mean is the official mean k
CLIP_SHAPES = {  # (vision: hidden, layers, heads, patch; text: hidden, layers, heads; projection)
    "ViT-B/32": dict(vision=(768, 12, 12, 32), text=(512, 12, 8), projection=512),
    "ViT-L/14": dict(vision=(1024, 24, 16, 14), text=(768, 12, 12), projection=768),
}
TINY_CLIP = dict(vision=(32, 2, 2, 16), text=(32, 2, 2), projection=16)


def tokenizer_dir() -> Path:
    """The bundled full CLIP BPE tokenizer (49,408 tokens), the one SD v1.4 uses."""
    from recare.models import mini_world_dir

    return mini_world_dir() / "pipeline" / "tokenizer"


# ---------------------------------------------------------------------------------------------
# the models, built from configs and saved as folders


def build_pipeline_folder(folder: Path, tiny: bool) -> Path:
    """An SD v1.4-shaped StableDiffusionPipeline with random weights, saved with save_pretrained."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    if tiny:
        unet = UNet2DConditionModel(**{**SD14_UNET, "block_out_channels": (32, 32, 64, 64), "layers_per_block": 1,
                                       "cross_attention_dim": 64, "attention_head_dim": 2}, sample_size=8)
        vae = AutoencoderKL(**{**SD14_VAE, "block_out_channels": (32, 32, 32, 32), "layers_per_block": 1},
                            sample_size=64)
        width, layers, heads, inner = 64, 2, 2, 128
    else:
        unet = UNet2DConditionModel(sample_size=64, **SD14_UNET)
        vae = AutoencoderKL(sample_size=512, **SD14_VAE)
        width, layers, heads, inner = 768, 12, 12, 3072
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=width, intermediate_size=inner, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406,
        eos_token_id=49407, pad_token_id=49407, projection_dim=width))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir()),
                                   unet=unet, scheduler=DDIMScheduler(**SD14_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def build_clip_folder(folder: Path, shape: dict, seed: int = 0) -> Path:
    """A transformers CLIPModel of `shape` with random weights, its CLIP BPE tokenizer and image processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    v_width, v_layers, v_heads, patch = shape["vision"]
    t_width, t_layers, t_heads = shape["text"]
    image_size = 224 if patch >= 14 and v_width > 64 else 32
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=t_width, intermediate_size=4 * t_width,
                         num_hidden_layers=t_layers, num_attention_heads=t_heads, max_position_embeddings=77,
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_act="quick_gelu"),
        vision_config=dict(hidden_size=v_width, intermediate_size=4 * v_width, num_hidden_layers=v_layers,
                           num_attention_heads=v_heads, patch_size=patch, image_size=image_size,
                           hidden_act="quick_gelu"),
        projection_dim=shape["projection"])
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(folder)
    CLIPTokenizer.from_pretrained(tokenizer_dir()).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
                       ).save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------
# measuring helpers


def peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def gib(n: int) -> float:
    return round(n / 2**30, 2)


def peak(device: torch.device) -> float | None:
    return gib(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def timed(fn, device: torch.device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


# ---------------------------------------------------------------------------------------------
# parts


GEN_VARIANTS = {  # label: (weights dtype, autocast dtype); a training job generates with the fp32 pipeline
    "fp32": ("fp32", None), "fp32 + bf16 autocast": ("fp32", torch.bfloat16),
    "fp16": ("fp16", None), "bf16": ("bf16", None),
}


def part_generation(folder: Path, device: torch.device, tiny: bool, labels: list[str] | None = None,
                    out: dict | None = None) -> dict:
    """Images/s at the model's native size, 50 DDIM steps; seeds 42 + i repeat bit for bit (same batches).

    Each variant generates the timed images twice (the repeat must be bit-identical) and the first
    two once more one at a time (how far the batch size moves the pixels). Variants go into `out`
    as they are measured.
    """
    from recare.config import GenerateConfig
    from recare.generate import generate_images
    from recare.models import load_pipeline
    from recare.train.rollout import autocast_factory

    n_images, batch = (4, 2) if tiny else (8, 8)
    steps = 4 if tiny else 50
    out = out if out is not None else {}
    out.update({"steps": steps, "batch_size": batch, "images_timed": n_images, "dtypes": {}})
    labels = labels or (list(GEN_VARIANTS) if device.type == "cuda" else ["fp32"])
    pipe, loaded = None, None
    for label in labels:
        weights, amp = GEN_VARIANTS[label]
        if weights != loaded:
            del pipe
            release(device)
            pipe, loaded = load_pipeline(str(folder), device=device, dtype=weights), weights
            pipe.set_progress_bar_config(disable=True)
        config = GenerateConfig(prompt="A photo of a tench", num_images=n_images, steps=steps, batch_size=batch)
        with autocast_factory(device, amp)():
            generate_images(pipe, GenerateConfig(prompt=config.prompt, num_images=batch, steps=2, batch_size=batch))
            peak_reset(device)
            seconds, result = timed(lambda: generate_images(pipe, config), device)
            memory = peak(device)
            again = generate_images(pipe, config)
            single = generate_images(pipe, GenerateConfig(prompt=config.prompt, num_images=2, steps=steps,
                                                          batch_size=1))
        repeat_equal = all(a.tobytes() == b.tobytes() for a, b in zip(result.images, again.images))
        batch_diff = max(int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())
                         for a, b in zip(result.images, single.images))
        out["dtypes"][label] = {
            "seconds": round(seconds, 2), "images_per_s": round(n_images / seconds, 3),
            "projected_500_min": round(TARGET_IMAGES / (n_images / seconds) / 60, 2), "peak_gb": memory,
            "seeds_repeat_bit_identical": repeat_equal, "batch1_vs_batch_max_pixel_diff": batch_diff,
            "resolution": result.images[0].size[0]}
        print(f"[gen] {label}: {n_images / seconds:.2f} images/s, peak {memory} GB, same seeds repeat "
              f"bit-identical: {repeat_equal}, batch 1 vs {batch}: max pixel difference {batch_diff}", flush=True)
        del result, again, single
    del pipe
    release(device)
    return out


def part_careset(work: Path, device: torch.device, tiny: bool) -> dict:
    """Encoding images and the vocabulary on the device, candidate selection and refinement."""
    from recare.careset import build_care_set, select_candidates
    from recare.config import CareSetConfig
    from recare.encoders import clip_bpe_vocabulary, vocabulary_features
    from recare.models import load_encoder

    vocab = clip_bpe_vocabulary()
    if tiny:
        vocab = type(vocab)(tokens=vocab.tokens[:3000], texts=vocab.texts[:3000], source="clip-bpe-first-3000")
    n_images = 20 if tiny else TARGET_IMAGES
    images = random_images(n_images, 64 if tiny else 512)
    shapes = {"tiny": TINY_CLIP} if tiny else CLIP_SHAPES
    out: dict = {"images": n_images, "vocabulary": len(vocab), "encoders": {}}
    for name, shape in shapes.items():
        folder = build_clip_folder(work / f"clip-{name.replace('/', '-')}", shape)
        encoder = load_encoder(str(folder), device=device)
        encoder.encode_texts(["warm up"] * 4)
        peak_reset(device)
        img_s, image_features = timed(lambda: encoder.encode_images(images, batch_size=64), device)
        vocab_s, vocab_features = timed(lambda: vocabulary_features(encoder, vocab, cache_dir=work / "vocab-cache",
                                                                    batch_size=1024), device)
        select_s, _ = timed(lambda: select_candidates(image_features, vocab_features, 50, 100), device)
        target = encoder.encode_texts(["tench"])[0]
        build_s, careset = timed(lambda: build_care_set(image_features, vocab_features, vocab.tokens, target,
                                                        CareSetConfig(reference_word="tench")), device)
        total = img_s + vocab_s + build_s
        out["encoders"][name] = {
            "dim": int(vocab_features.shape[1]), "encode_images_s": round(img_s, 2), "encode_vocabulary_s": round(vocab_s, 2),
            "candidate_selection_s": round(select_s, 3), "build_care_set_s": round(build_s, 2),
            "total_min": round(total / 60, 3), "peak_gb": peak(device), "final_tokens": len(careset.final_tokens())}
        print(f"[careset] {name} (D={vocab_features.shape[1]}): images {img_s:.1f} s, vocabulary {vocab_s:.1f} s, "
              f"selection {select_s:.2f} s, build {build_s:.1f} s, total {total / 60:.2f} min", flush=True)
        del encoder
        release(device)
    return out


class _Ks(FixedK):
    """Rolls out the given k's in turn (the k draw is still consumed, so the noise stays the run's)."""

    def __init__(self, *args, ks: list[int], **kwargs):
        super().__init__(*args, **kwargs)
        self.ks = list(ks)

    def draw_k(self, generator):
        super().draw_k(generator)
        return self.ks.pop(0) if self.ks else K_LOW


def _stage_steps(make_trainer, device, n: int) -> tuple[list[float], float | None]:
    """Seconds of each of n trainer steps, and the stage's peak memory (student and optimizer included)."""
    peak_reset(device)
    trainer = make_trainer()
    seconds = []
    for _ in range(n):
        s, _ = timed(trainer.step, device)
        seconds.append(s)
    result = peak(device)
    del trainer
    return seconds, result


def part_training(folder: Path, device: torch.device, tiny: bool, combos: list[tuple[str, str, bool]],
                  out: dict | None = None, repeat: bool = True) -> dict:
    """TI step, ESD iteration and stage-2 iteration per (train_method, autocast, gradient checkpointing).

    Rows go into `out` as they are measured (a part that fails later keeps them).
    """
    from recare.config import ESDConfig, RolloutConfig, Stage2Config, TextualInversionConfig
    from recare.models import load_pipeline
    from recare.train.esd import ESDTrainer
    from recare.train.rollout import autocast_factory, encode_prompts
    from recare.train.stage2 import Stage2Trainer
    from recare.train.textual_inversion import learn_token, with_learned_tokens

    pipe = load_pipeline(str(folder), device=device, dtype="fp32")     # as recare.train.recipe loads it
    base = pipe.unet
    latent = int(base.config.sample_size)
    resolution = latent * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    hidden = pipe.text_encoder.get_input_embeddings().embedding_dim
    g = torch.Generator().manual_seed(1)
    tokens = {t: 0.02 * torch.randn(hidden, generator=g) for t in ADV_TOKENS}
    tok2, enc2 = with_learned_tokens(pipe.tokenizer, pipe.text_encoder, tokens)
    h = [CONCEPT, *ADV_TOKENS]
    emb_esd = encode_prompts(pipe.tokenizer, pipe.text_encoder, ["", CONCEPT], device)
    emb_s2 = encode_prompts(tok2, enc2, ["", *h, *ANCHORS, *RETAIN], device)
    ti_images = random_images(4, resolution)
    ks = [1, K_LOW, K_HIGH] if not tiny else [1, 2, 3]
    baseline = allocated(device)
    out = out if out is not None else {}
    out.update({"resolution": resolution, "k": [K_LOW, K_HIGH], "base_gb": gib(baseline), "rows": []})

    def student(gcp: bool):
        s = copy.deepcopy(base).float()
        if gcp:
            s.enable_gradient_checkpointing()
        return s

    def sampler(chosen=None):
        return _Ks(pipe.scheduler, (4, latent, latent), RolloutConfig(), device, ks=list(chosen or ks))

    ti_done: set = set()
    for method, amp_name, gcp in combos:
        amp = AMPS[amp_name]
        row: dict = {"train_method": method, "autocast": amp_name, "gradient_checkpointing": gcp}
        label = f"{method} {amp_name}{' +gc' if gcp else ''}"
        try:
            esd, row["esd_peak_gb"] = _stage_steps(lambda: ESDTrainer(
                student(gcp), base, sampler(), emb_esd, CONCEPT, ESDConfig(iterations=len(ks)), train_method=method,
                amp_dtype=amp), device, len(ks))
            row["esd_s"] = round(float(np.mean(esd[1:])), 3)
            release(device)
            s2, row["stage2_peak_gb"] = _stage_steps(lambda: Stage2Trainer(
                student(gcp), base, sampler(), emb_s2, h, ANCHORS, RETAIN, Stage2Config(iterations=len(ks)),
                train_method=method, amp_dtype=amp), device, len(ks))
            row["stage2_s"] = round(float(np.mean(s2[1:])), 3)
            release(device)
            if (amp_name, gcp) not in ti_done:
                # textual inversion trains one embedding row against the erased UNet (frozen): the method
                # does not change it, so it is measured once per autocast / checkpointing setting
                ti_done.add((amp_name, gcp))
                erased = student(gcp).requires_grad_(False)
                steps: list[float] = []
                last = [0.0]

                def progress(event):
                    sync(device)
                    now = time.perf_counter()
                    steps.append(now - last[0])
                    last[0] = now

                peak_reset(device)
                config = TextualInversionConfig(steps=4, initializer_token="person", placeholder="<ti*>",
                                                resolution=resolution, seed=42)
                with autocast_factory(device, amp)():
                    last[0] = time.perf_counter()
                    learn_token((erased, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler), ti_images,
                                config=config, progress=progress)
                row["ti_s"] = round(float(np.mean(steps[1:])), 3)
                row["ti_peak_gb"] = peak(device)
                del erased
            release(device)
            row["left_allocated_gb"] = gib(allocated(device) - baseline)
        except torch.cuda.OutOfMemoryError as e:
            row["error"] = f"out of memory: {str(e).splitlines()[0][:200]}"
            release(device)
        out["rows"].append(row)
        print(f"[train] {label}: " + ", ".join(f"{k} {v}" for k, v in row.items()
                                               if k not in ("train_method", "autocast", "gradient_checkpointing")),
              flush=True)
    if repeat:
        _repeat(out, device, student, sampler, base, emb_esd, ks)
    del pipe, base, tok2, enc2
    release(device)
    return out


def _repeat(out: dict, device, student, sampler, base, emb_esd, ks) -> None:
    """Two ESD runs of 2 iterations from the same weights and seed, without and with
    recare.train.determinism.deterministic() (warn-only, strict): bit-identical tensors or not, and the cost."""
    from recare.config import ESDConfig
    from recare.train.determinism import deterministic
    from recare.train.esd import ESDTrainer

    amp = torch.bfloat16 if device.type == "cuda" else None
    out["repeat"] = []
    for mode in ("off", "warn-only", "strict"):
        finals, times = [], []
        error = None
        with deterministic(mode != "off", warn_only=mode == "warn-only"), \
                warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            peak_reset(device)
            for _ in range(2):
                trainer = ESDTrainer(student(False), base, sampler([1, ks[1]]), emb_esd, CONCEPT,
                                     ESDConfig(iterations=2), train_method="noxattn", amp_dtype=amp)
                try:
                    trainer.step()
                    times.append(timed(trainer.step, device)[0])
                except RuntimeError as e:   # strict mode: an op without a deterministic implementation
                    error = str(e).splitlines()[0][:300]
                    break
                finals.append({n: t.detach().cpu() for n, t in trainer.params.items()})
                del trainer
                release(device)
        if error is not None:
            out["repeat"].append({"deterministic": mode, "error": error})
            print(f"[train] deterministic {mode}: {error}", flush=True)
            del trainer, finals
            release(device)
            continue
        flagged = sorted({str(w.message).splitlines()[0][:160] for w in caught
                          if "determinis" in str(w.message).lower()})
        same = all(torch.equal(finals[0][n], finals[1][n]) for n in finals[0])
        out["repeat"].append({"deterministic": mode, "autocast": "bf16" if amp else "fp32", "bit_identical": same,
                              "esd_s_at_k": round(float(np.mean(times)), 3), "k": ks[1], "peak_gb": peak(device),
                              "flagged_ops": flagged})
        print(f"[train] ESD twice from the same state, deterministic {mode}: bit-identical {same}, "
              f"{np.mean(times):.3f} s per iteration at k={ks[1]}, peak {peak(device)} GB, flagged {flagged}",
              flush=True)
        del finals


def part_eval(work: Path, device: torch.device, tiny: bool, clip_folder: Path | None) -> dict:
    """One batch of 16 images through each judge (random weights of the real shapes; NudeNet's own)."""
    from recare.eval.detectors import (
        ClipZeroShotDetector, HFClassifierDetector, NudeNetDetector, TorchvisionClassifierDetector,
    )
    from recare.models import load_encoder

    images = random_images(16, 64 if tiny else 512, seed=3)
    judges: dict = {}
    try:
        judges["nudenet (ONNX Runtime)"] = NudeNetDetector()
    except Exception as e:  # the package is optional
        print(f"[eval] NudeNet unavailable: {e}", flush=True)
    import torchvision

    torch.manual_seed(0)
    weights = work / "resnet50-random.safetensors"
    from safetensors.torch import save_file

    save_file(torchvision.models.resnet50(num_classes=1000).state_dict(), str(weights))
    judges["resnet50 top-3"] = TorchvisionClassifierDetector(targets=("tench",), weights_path=weights,
                                                             device=str(device))
    from transformers import AutoImageProcessor, ViTConfig, ViTForImageClassification

    vit_folder = work / "vit-wikiart"
    labels = [f"style {i}" for i in range(27)]
    vit_cfg = ViTConfig(num_labels=27, id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)},
                        **({"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                            "intermediate_size": 64, "image_size": 32, "patch_size": 8} if tiny else {}))
    ViTForImageClassification(vit_cfg).save_pretrained(vit_folder)
    from transformers import ViTImageProcessor

    ViTImageProcessor(size={"height": vit_cfg.image_size, "width": vit_cfg.image_size}).save_pretrained(vit_folder)
    AutoImageProcessor.from_pretrained(vit_folder)
    judges["vit-b/16 style top-3"] = HFClassifierDetector(vit_folder, targets=["style 3"], device=str(device))
    if clip_folder is not None:
        judges["clip zero-shot"] = ClipZeroShotDetector("tench", encoder=load_encoder(str(clip_folder), device=device))
    out: dict = {"images": len(images), "judges": {}}
    for name, judge in judges.items():
        judge.detect(images[:2])
        seconds, results = timed(lambda: judge.detect(images), device)
        out["judges"][name] = {"seconds": round(seconds, 3), "images_per_s": round(len(images) / seconds, 1)}
        print(f"[eval] {name}: {len(images)} images in {seconds:.2f} s", flush=True)
    return out


# ---------------------------------------------------------------------------------------------
# projection and table


def projection(report: dict) -> dict:
    """The official recipe's minutes and peak memory from each measured training row."""
    rows = []
    ti_by_setting = {(r["autocast"], r["gradient_checkpointing"]): r for r in report.get("train", {}).get("rows", [])
                     if "ti_s" in r}
    encoders = report.get("careset", {}).get("encoders", {})
    careset = (encoders.get("ViT-B/32") or next(iter(encoders.values()), {})).get("total_min")  # the official encoder
    generation = report.get("gen", {}).get("dtypes", {})
    # a training job generates its 500 target images with the pipeline it trains (fp32 weights)
    gen = (generation.get("fp32") or next(iter(generation.values()), {})).get("projected_500_min")
    for r in report.get("train", {}).get("rows", []):
        ti = ti_by_setting.get((r["autocast"], r["gradient_checkpointing"]))
        if "error" in r or ti is None:
            continue
        stage1_min = (RECIPE["esd"] * r["esd_s"] + RECIPE["ti"] * ti["ti_s"]) / 60
        stage2_min = RECIPE["stage2"] * r["stage2_s"] / 60
        train_min = stage1_min + stage2_min
        memory = max(r["esd_peak_gb"] or 0, r["stage2_peak_gb"] or 0, ti["ti_peak_gb"] or 0) or None
        rows.append({
            "setting": f"{r['train_method']} {r['autocast']}{' +gc' if r['gradient_checkpointing'] else ''}",
            "stage1_min": round(stage1_min, 2), "ti_min": round(RECIPE["ti"] * ti["ti_s"] / 60, 2),
            "stage2_min": round(stage2_min, 2), "train_min": round(train_min, 2), "peak_gb": memory,
            "with_generation_and_careset_min": (round(train_min + gen + careset, 2)
                                                if gen is not None and careset is not None else None),
            "vs_paper_train": round(PAPER["train_min"] / train_min, 2),
            "goal_time_met": train_min <= GOAL["train_min"],
            "goal_memory_met": None if memory is None else memory <= GOAL["memory_gb"]})
    return {"recipe": dict(RECIPE), "paper": PAPER, "goal": GOAL, "rows": rows}


def _table(title: str, columns: list[str], rows: list[list]) -> None:
    print(f"\n## {title}")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(x) for x in row) + " |")


def print_table(report: dict) -> None:
    print(f"\n# gpu_check {report['date']} on {report['device_name']}, torch {report['torch']}, "
          f"CUDA {report['cuda']}, diffusers {report['diffusers']}, transformers {report['transformers']}")
    gen = report.get("gen")
    if gen and gen.get("dtypes"):
        _table(f"generation ({next(iter(gen['dtypes'].values()))['resolution']} px, {gen['steps']} DDIM steps, "
               f"batch {gen['batch_size']})",
               ["dtype", "images/s", "500 images (min)", "peak GB", "seeds repeat", "batch-1 max pixel diff"],
               [[name, d["images_per_s"], d["projected_500_min"], d["peak_gb"], d["seeds_repeat_bit_identical"],
                 d["batch1_vs_batch_max_pixel_diff"]] for name, d in gen["dtypes"].items()])
    cs = report.get("careset")
    if cs:
        _table(f"CARE-set ({cs['images']} images x {cs['vocabulary']:,} tokens)",
               ["encoder", "D", "encode images s", "encode vocabulary s", "candidate selection s", "build s",
                "total min"],
               [[name, d["dim"], d["encode_images_s"], d["encode_vocabulary_s"], d["candidate_selection_s"],
                 d["build_care_set_s"], d["total_min"]] for name, d in cs["encoders"].items()])
    tr = report.get("train")
    if tr and "rows" in tr:
        _table(f"training steps ({tr['resolution']} px; roll-out at k = {MEAN_K}; base pipeline fp32 {tr['base_gb']} GB "
               "resident)",
               ["method", "autocast", "grad ckpt", "ESD s", "ESD peak GB", "stage-2 s", "stage-2 peak GB", "TI s",
                "TI peak GB", "left allocated GB"],
               [[r["train_method"], r["autocast"], r["gradient_checkpointing"], r["error"]] if "error" in r else
                [r["train_method"], r["autocast"], r["gradient_checkpointing"], r["esd_s"], r["esd_peak_gb"],
                 r["stage2_s"], r["stage2_peak_gb"], r.get("ti_s", "="), r.get("ti_peak_gb", "="),
                 r["left_allocated_gb"]] for r in tr["rows"]])
    for r in (tr or {}).get("repeat", []):
        if "error" in r:
            print(f"repeat ESD (deterministic={r['deterministic']}): {r['error']}")
            continue
        print(f"repeat ESD ({r['autocast']}, deterministic={r['deterministic']}): bit-identical {r['bit_identical']}, "
              f"{r['esd_s_at_k']} s per iteration at k={r['k']}, peak {r['peak_gb']} GB; flagged ops: "
              f"{r['flagged_ops'] or 'none'}")
    ev = report.get("eval")
    if ev:
        _table(f"evaluation batch ({ev['images']} images)", ["judge", "seconds", "images/s"],
               [[name, d["seconds"], d["images_per_s"]] for name, d in ev["judges"].items()])
    pr = report.get("projection")
    if pr and pr["rows"]:
        _table(f"full recipe projected ({RECIPE['esd']} ESD + {RECIPE['ti']} TI steps, {RECIPE['stage2']} stage-2 "
               f"iterations) vs the paper's {PAPER['train_min']} min / {PAPER['memory_gb']:.0f} GB, goal <= "
               f"{GOAL['train_min']:.0f} min / {GOAL['memory_gb']:.0f} GB",
               ["setting", "stage 1 min (TI)", "stage 2 min", "training min", "peak GB", "+ generation + CARE-set min",
                "vs paper", "time goal", "memory goal"],
               [[r["setting"], f"{r['stage1_min']} ({r['ti_min']})", r["stage2_min"], r["train_min"], r["peak_gb"],
                 r["with_generation_and_careset_min"], f"{r['vs_paper_train']}x", _verdict(r["goal_time_met"]),
                 _verdict(r["goal_memory_met"])] for r in pr["rows"]])


def _verdict(met: bool | None) -> str:
    return "n/a" if met is None else "met" if met else "missed"


def all_combos(tiny: bool, cuda: bool) -> list[tuple[str, str, bool]]:
    amps = ["fp32", "bf16", "fp16"] if cuda else ["fp32"]
    return [(m, a, g) for m in ("noxattn", "xattn") for a in amps for g in (False, True)]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="folder for gpu_check.json")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tiny", action="store_true", help="tiny models and counts: the CPU dry run (seconds)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    ap.add_argument("--combos", default="", help="train rows as method:autocast[:gc], comma separated (default all)")
    ap.add_argument("--gen", default="", help=f"generation variants, comma separated: {', '.join(GEN_VARIANTS)} "
                    "(default all on CUDA, fp32 elsewhere)")
    ap.add_argument("--no-repeat", action="store_true", help="train part: skip the repeatability rows")
    ap.add_argument("--work", default=None, help="folder for the built models (default a temporary one)")
    args = ap.parse_args(argv)

    import diffusers
    import transformers

    from recare.models import resolve_device

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise SystemExit(f"unknown parts {unknown}: use {', '.join(PARTS)}")
    combos = all_combos(args.tiny, cuda)
    if args.combos:
        combos = []
        for item in args.combos.split(","):
            method, amp, *rest = item.strip().split(":")
            combos.append((method, amp, bool(rest and rest[0] == "gc")))
    gen_labels = [g.strip() for g in args.gen.split(",") if g.strip()] or None
    if gen_labels and not set(gen_labels) <= set(GEN_VARIANTS):
        raise SystemExit(f"unknown generation variants {sorted(set(gen_labels) - set(GEN_VARIANTS))}: use "
                         f"{', '.join(GEN_VARIANTS)}")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else (platform.processor() or platform.machine()),
        "torch": torch.__version__, "cuda": torch.version.cuda if cuda else None,
        "diffusers": diffusers.__version__, "transformers": transformers.__version__,
        "tiny": args.tiny, "seconds": {}}

    def save() -> None:
        (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))

    started = time.perf_counter()
    try:
        t, folder = timed(lambda: build_pipeline_folder(work / "sd14", args.tiny), device)
        report["seconds"]["build"] = round(t, 1)
        print(f"[build] SD v1.4-shaped pipeline saved in {t:.0f} s", flush=True)
        for part in parts:
            begin = time.perf_counter()
            try:
                if part == "gen":
                    report["gen"] = {}
                    part_generation(folder, device, args.tiny, gen_labels, report["gen"])
                elif part == "careset":
                    report["careset"] = part_careset(work, device, args.tiny)
                elif part == "train":
                    report["train"] = {}
                    part_training(folder, device, args.tiny, combos, report["train"], repeat=not args.no_repeat)
                    report["projection"] = projection(report)
                elif part == "eval":
                    clip = next(iter(sorted(work.glob("clip-ViT-L*")) or sorted(work.glob("clip-*"))), None)
                    report["eval"] = part_eval(work, device, args.tiny, clip)
            except Exception as e:  # one part's failure must not lose the others' figures
                import traceback

                traceback.print_exc()
                report.setdefault("errors", {})[part] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            report["seconds"][part] = round(time.perf_counter() - begin, 1)
            report["projection"] = projection(report)
            save()
    finally:
        report["seconds"]["total"] = round(time.perf_counter() - started, 1)
        save()
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print_table(report)
    return report


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
