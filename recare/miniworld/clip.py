"""The mini CLIP: a small ``transformers.CLIPModel`` trained contrastively on mini-world renders.

It plays the role of CLIP ViT-B/32 in this world: the CARE-set's encoder (Algorithm 1) and the
CARE score's zero-shot classifier. It uses the real CLIP tokenizer (49,408 BPE tokens, context
77), so every token of the CLIP vocabulary has a text feature; only the tokens the captions use
are trained, which is why the mini world's default CARE vocabulary is its lexicon
(``recare.miniworld.world.lexicon()``), not the full BPE vocabulary.

Saved with ``save_pretrained`` (model fp16 + CLIPTokenizer + CLIPImageProcessor) so that
``CLIPModel.from_pretrained(folder)`` and ``recare.models.load_encoder("mini-world")`` load it
like any local transformers CLIP folder; its config asks for float32 (``load_as_float32``), so
a plain ``from_pretrained`` gives a float32 model on the CPU.

Zero-shot protocol (``zero_shot_report``), texts encoded as bare labels:
* objects and backgrounds: held-out photo renders of one concept of ``CARE_LABELS`` alone
  (a thing on a background where the world puts it, e.g. fish in the lake, and no other thing;
  a background with no thing), classified
  among ``CARE_LABELS``, except that the image's own background label is left out of the
  candidates for thing images (a tench in a lake is right as "tench", not "freshwater");
* styles: renders of random scenes in each style, classified among the four style names
  ("photo", "van gogh", "pixel art", "sketch");
* smoking: photo renders of a person smoking vs a person not smoking, classified between the
  task's target prompt "a photo of a smoking person" and "a photo of a person" (bare "smoking"
  vs "person" is ill-posed: a smoker is a person, both labels are true).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from recare.progress import ProgressCallback
from recare.errors import RecareError
from recare.miniworld import world as W
from recare.miniworld.oracle import augment
from recare.miniworld.tokenizer import CONTEXT_LENGTH, build_clip_tokenizer, write_vocab_files
from recare.atomic import atomic_write_dir


class MiniClipError(RecareError, RuntimeError):
    """Raised when a mini CLIP folder is missing or inconsistent."""


@dataclass
class MiniClipConfig:
    """Architecture + training recipe (written to ``training_config.json`` beside the weights)."""

    vision_hidden: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    patch_size: int = 16
    text_hidden: int = 64  # token embedding 49,408 x 64 dominates the size (6.3 MB in fp16)
    text_layers: int = 3
    text_heads: int = 4
    projection_dim: int = 64
    n_scenes: int = 12000  # rendered once; captions are re-drawn every epoch
    epochs: int = 20
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    p_single_word: float = 0.25  # share of one-word captions ("lake", "cigarette")
    p_augment: float = 0.5  # share of images blurred/jittered like generated images
    label_loss_weight: float = 5.0  # sigmoid loss of each image against one word per concept (its labels)
    pair_loss_weight: float = 0.5  # specific-vs-generic choice on images of the generic concept (SPECIFIC_PAIRS)
    seed: int = 0


def build_model(config: MiniClipConfig):
    """A freshly initialised ``CLIPModel`` of the configured size (CLIP BPE vocabulary, context 77)."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(config.seed)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=config.text_hidden, intermediate_size=4 * config.text_hidden,
                         num_hidden_layers=config.text_layers, num_attention_heads=config.text_heads,
                         max_position_embeddings=CONTEXT_LENGTH, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
                         projection_dim=config.projection_dim),
        vision_config=dict(image_size=W.SIZE, patch_size=config.patch_size, hidden_size=config.vision_hidden,
                           intermediate_size=4 * config.vision_hidden, num_hidden_layers=config.vision_layers,
                           num_attention_heads=config.vision_heads, projection_dim=config.projection_dim),
        projection_dim=config.projection_dim,
    )
    return CLIPModel(cfg)


def build_image_processor(mean, std):
    """``CLIPImageProcessor`` for 64x64 inputs with the mini world's own normalisation."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": W.SIZE}, crop_size={"height": W.SIZE, "width": W.SIZE},
                              do_resize=True, do_center_crop=True, do_normalize=True, do_convert_rgb=True,
                              image_mean=[float(m) for m in mean], image_std=[float(s) for s in std], resample=2)


class MiniClip:
    """Model + tokenizer + normalisation, with batched feature functions (L2-normalised float32)."""

    def __init__(self, model, tokenizer, mean, std, device="cpu"):
        self.model = model.to(device).float().eval()
        self.tokenizer = tokenizer
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.device = torch.device(device)

    @torch.no_grad()
    def encode_images(self, images, batch_size: int = 128) -> np.ndarray:
        """uint8 (n, 64, 64, 3) or a list of PIL images -> (n, D) L2-normalised features."""
        from recare.miniworld.oracle import images_to_tensor

        x = images_to_tensor(images)
        out = []
        for i in range(0, len(x), batch_size):
            px = ((x[i : i + batch_size] - self.mean) / self.std).to(self.device)
            out.append(F.normalize(_features(self.model.get_image_features(pixel_values=px)), dim=-1).cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, self.model.config.projection_dim), np.float32)

    @torch.no_grad()
    def encode_texts(self, texts: list[str], batch_size: int = 512) -> np.ndarray:
        """Texts -> (n, D) L2-normalised features."""
        out = []
        for i in range(0, len(texts), batch_size):
            tok = self.tokenizer(list(texts[i : i + batch_size]), padding=True, truncation=True, max_length=CONTEXT_LENGTH, return_tensors="pt")
            feats = _features(self.model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                                           attention_mask=tok["attention_mask"].to(self.device)))
            out.append(F.normalize(feats, dim=-1).cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, self.model.config.projection_dim), np.float32)


def _features(out) -> torch.Tensor:
    """``get_*_features`` returns a tensor (transformers < 5) or an output object (>= 5)."""
    if isinstance(out, torch.Tensor):
        return out
    return out.pooler_output


def load_mini_clip(path: str | os.PathLike | None = None, device="cpu") -> MiniClip:
    """Load a mini CLIP folder (``save_pretrained`` layout).

    Args:
        path: the folder; default ``<mini-world>/clip``.
        device: torch device.

    Raises:
        MiniClipError: the folder is missing or is not a CLIPModel folder.
    """
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    if path is None:
        from recare.models.policy import mini_world_dir

        path = mini_world_dir() / "clip"
    path = Path(path)
    if not (path / "config.json").is_file():
        raise MiniClipError(f"no mini CLIP at {path} (needs a transformers CLIPModel folder); "
                            "train one with `python -m recare.miniworld.train --out DIR`.")
    from recare.models.construction import building_modules

    with building_modules():
        model = CLIPModel.from_pretrained(str(path), torch_dtype=torch.float32)
    proc = CLIPImageProcessor.from_pretrained(str(path))
    return MiniClip(model, CLIPTokenizer.from_pretrained(str(path)), proc.image_mean, proc.image_std, device)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def _captions_for_epoch(scenes, rng, p_single_word):
    return [W.single_word_caption(s, rng) if rng.random() < p_single_word else W.caption(s, rng) for s in scenes]


def _contrastive_loss(img, txt, scale, captions):
    """Symmetric InfoNCE; identical captions in a batch count as positives of each other."""
    logits = scale * img @ txt.t()
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    key = torch.tensor([ids[c] for c in captions])
    target = (key[:, None] == key[None, :]).float()
    target = target / target.sum(1, keepdim=True)
    return 0.5 * (torch.sum(-target * F.log_softmax(logits, 1), 1).mean() + torch.sum(-target * F.log_softmax(logits.t(), 1), 1).mean())


def _label_loss(model, tokenizer, img, labels, rng, bias):
    """Each image against one word per concept (the concept's name or a one-token synonym), as a
    multi-label sigmoid loss: the bare words the CARE-set and the CARE score encode learn to
    point at the right images, and a concept's word is pushed away from images without it."""
    words = [c if rng.random() < 0.5 else W.SINGLE_WORDS[c][int(rng.integers(len(W.SINGLE_WORDS[c])))] for c in W.CONCEPTS]
    tok = tokenizer(words, padding=True, return_tensors="pt")
    txt = F.normalize(_features(model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])), dim=-1)
    return F.binary_cross_entropy_with_logits(10.0 * img @ txt.t() + bias, labels)


SPECIFIC_PAIRS = {
    # specific concept -> (phrases naming it, phrases naming only the generic concept it implies)
    "smoking": (("a photo of a smoking person", "a smoking person", "a man smoking", "a woman smoking a cigarette", "a smoker"),
                ("a photo of a person", "a person", "a man", "a woman", "a photo of a man")),
}
"""Specific concepts that imply a generic one (a smoker is a person), with phrases for each side."""


def _pair_loss(model, tokenizer, img, labels, rng):
    """On images of the generic concept, choose between a phrase naming the specific concept and one
    naming only the generic one (2-way softmax over phrases, not bare words, so that the bare
    word "person" stays close to smokers as in real CLIP): "a man smoking" vs "a man"."""
    losses = []
    for specific, (specific_phrases, generic_phrases) in SPECIFIC_PAIRS.items():
        generic = "person"
        has_generic = labels[:, W.CONCEPT_INDEX[generic]] > 0
        if not has_generic.any():
            continue
        pick = int(rng.integers(len(generic_phrases)))
        words = [specific_phrases[pick % len(specific_phrases)], generic_phrases[pick]]
        tok = tokenizer(words, padding=True, return_tensors="pt")
        txt = F.normalize(_features(model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])), dim=-1)
        target = (labels[has_generic, W.CONCEPT_INDEX[specific]] <= 0).long()  # 0 = specific, 1 = generic
        losses.append(F.cross_entropy(20.0 * img[has_generic] @ txt.t(), target))
    return torch.stack(losses).mean() if losses else img.sum() * 0


def train_clip(out_dir: str | os.PathLike | None, config: MiniClipConfig | None = None, smoke: bool = False,
               progress: bool | ProgressCallback = True, n_eval: int = 100) -> tuple[MiniClip, dict]:
    """Train the mini CLIP from scratch on renders + captions (CPU, deterministic for ``config.seed``).

    Args:
        out_dir: folder to ``save_pretrained`` into (model fp16, tokenizer, image processor,
            ``training_config.json``); None = do not save.
        config: recipe; default :class:`MiniClipConfig`.
        smoke: a few steps at a tiny size (for CI; not a usable model).
        progress: the library's progress callback (`recare.progress`); True: tqdm bars, False: none.
        n_eval: held-out renders per concept for the zero-shot report.

    Returns:
        ``(mini_clip, metrics)`` with the zero-shot accuracy per concept and the training time.
    """
    import contextlib

    from recare.progress import emit, listening

    config = config or MiniClipConfig()
    if smoke:
        config = MiniClipConfig(**{**asdict(config), "n_scenes": 64, "epochs": 1, "batch_size": 64, "vision_hidden": 32,
                                   "vision_layers": 1, "text_hidden": 16, "text_layers": 1, "projection_dim": 16})
        n_eval = min(n_eval, 4)
    start = time.time()
    tokenizer = build_clip_tokenizer()
    model = build_model(config)
    g = torch.Generator().manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    bars = contextlib.ExitStack()
    listener = bars.enter_context(listening(progress))   # the library's progress protocol (True: tqdm bars)
    scenes = []
    for k in range(config.n_scenes):
        scenes.append(W.sample_scene(rng))
        emit(listener, "render", k + 1, config.n_scenes)
    images = torch.from_numpy(np.stack([W.render(s) for s in scenes])).permute(0, 3, 1, 2).contiguous()
    mean = (images.float() / 255).mean((0, 2, 3)).tolist()
    std = (images.float() / 255).std((0, 2, 3)).tolist()
    mean_t, std_t = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)

    labels = torch.from_numpy(np.stack([W.labels(s) for s in scenes])).float()
    bias = torch.nn.Parameter(torch.tensor(-5.0))  # training-only offset of the label loss
    opt = torch.optim.AdamW(list(model.parameters()) + [bias], lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.98))
    steps_per_epoch = config.n_scenes // config.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch, pct_start=0.1)
    total, step = config.epochs * steps_per_epoch, 0
    model.train()
    for _ in range(config.epochs):
        captions = _captions_for_epoch(scenes, rng, config.p_single_word)
        order = torch.randperm(config.n_scenes, generator=g)
        for s in range(steps_per_epoch):
            idx = order[s * config.batch_size : (s + 1) * config.batch_size]
            x = images[idx].float() / 255.0
            aug = augment(x, g)
            x = torch.where((torch.rand(len(idx), generator=g) < config.p_augment)[:, None, None, None], aug, x)
            caps = [captions[i] for i in idx.tolist()]
            tok = tokenizer(caps, padding=True, truncation=True, max_length=CONTEXT_LENGTH, return_tensors="pt")
            img = F.normalize(_features(model.get_image_features(pixel_values=(x - mean_t) / std_t)), dim=-1)
            txt = F.normalize(_features(model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])), dim=-1)
            loss = _contrastive_loss(img, txt, model.logit_scale.exp().clamp(max=100), caps)
            if config.label_loss_weight:
                loss = loss + config.label_loss_weight * _label_loss(model, tokenizer, img, labels[idx], rng, bias)
            if config.pair_loss_weight:
                loss = loss + config.pair_loss_weight * _pair_loss(model, tokenizer, img, labels[idx], rng)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            emit(listener, "mini clip", step, total, loss=loss.item())
    bars.close()
    model.eval()
    clip = MiniClip(model, tokenizer, mean, std)
    report = zero_shot_report(clip, n=n_eval, seed=config.seed * 1000 + 777)
    metrics = {"zero_shot_top1": report, "min_top1": min(report[k] for k in BAR_CONCEPTS),
               "train_seconds": round(time.time() - start, 1)}
    if out_dir is not None:
        save_mini_clip(clip, out_dir, config, metrics)
    return clip, metrics


def load_as_float32(config_file: str | os.PathLike) -> None:
    """Make a saved transformers ``config.json`` ask for float32 weights on load.

    The weights are stored in float16 to keep the bundled folders small, and ``save_pretrained``
    writes that dtype into the config. transformers >= 5 loads a model in the config's dtype when
    no dtype is given, so a plain ``from_pretrained(folder)`` would give a float16 model on the
    CPU; next to diffusers' float32 UNet that fails ("mat1 and mat2 must have the same dtype").
    With "float32" in the config, transformers upcasts the float16 weights on load (as older
    versions always did), and an explicit ``dtype=`` still wins.

    Args:
        config_file: the ``config.json`` written by ``save_pretrained`` (rewritten in place;
            call it on a temporary folder before that folder is renamed into place).
    """
    path = Path(config_file)
    config = json.loads(path.read_text(encoding="utf-8"))
    for key in ("dtype", "torch_dtype"):  # transformers >= 4.56 writes "dtype", older ones "torch_dtype"
        if key in config:
            config[key] = "float32"
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_mini_clip(clip: MiniClip, out_dir: str | os.PathLike, config: MiniClipConfig, metrics: dict) -> Path:
    """``save_pretrained`` model (fp16 safetensors), tokenizer and image processor, atomically."""
    out = Path(out_dir)
    with atomic_write_dir(out) as tmp:  # built beside `out`, swapped in whole; a failure keeps the old folder
        clip.model.half().save_pretrained(str(tmp))
        clip.model.float()
        load_as_float32(tmp / "config.json")
        clip.tokenizer.save_pretrained(str(tmp))
        # ship the tokenizer as vocab.json + merges.txt (1.5 MB) instead of tokenizer.json (3.6 MB);
        # CLIPTokenizer.from_pretrained rebuilds the same tokenizer from them
        (tmp / "tokenizer.json").unlink(missing_ok=True)
        write_vocab_files(tmp)
        build_image_processor(clip.mean.flatten().tolist(), clip.std.flatten().tolist()).save_pretrained(str(tmp))
        (tmp / "training_config.json").write_text(json.dumps({"config": asdict(config), "metrics": metrics}, indent=2))
    return out


# ---------------------------------------------------------------------------------------------
# Zero-shot evaluation
# ---------------------------------------------------------------------------------------------
STYLE_LABELS = ["photo", "van gogh", "pixel art", "sketch"]


def natural_backgrounds(thing: str) -> list[str]:
    """Backgrounds a thing appears on in the world's training distribution (fish: the lake)."""
    if thing in W.FISH:
        return ["freshwater"]
    return [b for b, extras in W.EXTRAS.items() if thing in extras] or list(W.BACKGROUNDS)


def zero_shot_sets(n: int, seed: int) -> dict[str, tuple[np.ndarray, list[str], str]]:
    """Held-out evaluation sets: concept -> (images, candidate labels, correct label). See module doc."""
    rng = np.random.default_rng(seed)
    sets = {}
    for concept in W.CARE_LABELS:
        imgs, bgs = [], []
        for _ in range(n):
            if concept in W.BACKGROUNDS:
                scene = W.sample_scene(rng, style="photo", background=concept, exclude=[t for t in W.THINGS])
            else:
                bgs = natural_backgrounds(concept)
                scene = W.sample_scene(rng, style="photo", background=bgs[int(rng.integers(len(bgs)))], include=(concept,),
                                       exclude=[t for t in W.THINGS if t != concept])
            imgs.append(W.render(scene))
            bgs.append(scene.background)
        # a thing is judged against every other label except its own scene's background
        labels = [c for c in W.CARE_LABELS if concept in W.BACKGROUNDS or c not in W.BACKGROUNDS]
        sets[concept] = (np.stack(imgs), labels, concept)
    for style in STYLE_LABELS[1:] + ["photo"]:
        imgs = [W.render(W.sample_scene(rng, style=style)) for _ in range(n)]
        sets[f"style:{style}"] = (np.stack(imgs), STYLE_LABELS, style)
    for smoking, name in ((True, "smoking"), (False, "person (not smoking)")):
        kw = {"include": ("smoking",)} if smoking else {"include": ("person",), "exclude": ("smoking",)}
        imgs = [W.render(W.sample_scene(rng, style="photo", **kw)) for _ in range(n)]
        labels = [W.TASKS["smoking"].target_prompt, "a photo of a person"]
        sets[name] = (np.stack(imgs), labels, labels[0] if smoking else labels[1])
    return sets


BAR_CONCEPTS = ("tench", "freshwater", "style:van gogh", "stars", "smoking", "person (not smoking)", "person")
"""Rows held to the >= 0.90 bar: each task's target and CARE concept (the others are informative;
e.g. a moon without stars is rare in the world, so "moon" loses to "stars")."""


def zero_shot_report(clip: MiniClip, n: int = 100, seed: int = 777) -> dict[str, float]:
    """Zero-shot top-1 accuracy per concept on held-out renders (protocol in the module doc).

    Args:
        clip: the mini CLIP.
        n: renders per concept.
        seed: seed of the held-out renders.
    """
    report = {}
    for name, (imgs, labels, correct) in zero_shot_sets(n, seed).items():
        img = clip.encode_images(imgs)
        txt = clip.encode_texts(labels)
        pred = np.argmax(img @ txt.T, axis=1)
        report[name] = float(np.mean(np.asarray(labels)[pred] == correct))
    return report
