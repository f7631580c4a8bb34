"""Can the mini world's data separate each target from its CARE concept? Scene statistics and pixel signals.

    python -m benchmarks.world_separation [--scenes 20000] [--pixels 400] [--seed 0]
        [--set P_VAN_GOGH_NIGHT=0.3 --set P_SMOKING_GIVEN_PERSON=0.15 ...]

Samples scenes with the world's sampler (`recare.miniworld.world.sample_scene`, no training, no model) and
prints, for the current world and for the world with each `--set NAME=VALUE` applied to
`recare.miniworld.world` (a proposed change, measured before anyone retrains):

* co-occurrence: how often each target appears without its CARE concept and the CARE concept without the
  target (the contrast the generator and the mini CLIP can learn the difference from);
* pixel signal: on scenes that hold both, the mean absolute pixel change (0-255) that the target itself makes
  (the scene rendered with and without it) against the change its CARE concept makes, and the share of the
  image each touches. A target whose own signal is a few pixels beside a large CARE-concept signal is hard to
  tell apart from it in a 64 x 64 image.

With `--directions N`, the bundled generator too: for each task, the cosine between the target prompt's
guidance direction d(p) = eps(x_t, p) - eps(x_t, "") and each CARE prompt's, over N noised latents of the
target prompt's world renders (t = 200, 400, 600, 800). Stage 2's erase target pushes away from the target
along d(target) and towards the anchor along d(CARE) while the retain loss holds eps(CARE prompt): when the
two directions are nearly parallel the model cannot move one without the other.
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from recare.miniworld import world
from recare.miniworld.train import parse_world_settings

PAIRS = (("tench", "freshwater"), ("van gogh", "stars"), ("smoking", "person"))


def _has(scene: world.Scene, concept: str) -> bool:
    return scene.style == concept or scene.background == concept or scene.has(concept)


def _without(scene: world.Scene, concept: str) -> world.Scene:
    """The same scene without `concept`: a thing removed (the person takes its smoking along), a style
    rendered as a photo, a background replaced by a grass field."""
    if scene.style == concept:
        return dataclasses.replace(scene, style="photo")
    if scene.background == concept:
        return dataclasses.replace(scene, background="grass")
    gone = {concept, "smoking"} if concept == "person" else {concept}
    return dataclasses.replace(scene, things=tuple(t for t in scene.things if t.kind not in gone))


def _signal(scene: world.Scene, concept: str) -> tuple[float, float]:
    """(mean absolute pixel change over the image, share of pixels that change by > 8 levels) that `concept`
    makes. Rendered without the photo style's noise and, for a thing or background, as a plain photo: the
    texture generator then draws the same strokes and noise with and without it, so only its own pixels differ."""
    if scene.style != concept:
        scene = dataclasses.replace(scene, style="photo")
    photo = world._STYLE_FUNCS["photo"]
    world._STYLE_FUNCS["photo"] = lambda img, trng: img
    try:
        a = world.render(scene).astype(np.int16)
        b = world.render(_without(scene, concept)).astype(np.int16)
    finally:
        world._STYLE_FUNCS["photo"] = photo
    diff = np.abs(a - b).max(-1)
    return float(np.abs(a - b).mean()), float((diff > 8).mean())


def measure(scenes: int, pixels: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    sampled = [world.sample_scene(rng) for _ in range(scenes)]
    out = {}
    for target, care in PAIRS:
        t = np.array([_has(s, target) for s in sampled])
        c = np.array([_has(s, care) for s in sampled])
        both = [s for s, x in zip(sampled, t & c) if x][:pixels]
        sig_t = np.array([_signal(s, target) for s in both]) if both else np.zeros((1, 2))
        sig_c = np.array([_signal(s, care) for s in both]) if both else np.zeros((1, 2))
        out[target] = {"care": care, "target": int(t.sum()), "care_scenes": int(c.sum()), "both": int((t & c).sum()),
                       "target_without_care": int((t & ~c).sum()), "care_without_target": int((c & ~t).sum()),
                       "p_care_given_target": float(c[t].mean()) if t.any() else None,
                       "p_target_given_care": float(t[c].mean()) if c.any() else None,
                       "pixel_change_target": float(sig_t[:, 0].mean()), "area_target": float(sig_t[:, 1].mean()),
                       "pixel_change_care": float(sig_c[:, 0].mean()), "area_care": float(sig_c[:, 1].mean()),
                       "pixel_scenes": len(both)}
    return out


def directions(latents: int, seed: int) -> dict:
    """{task: (mean cosine of d(target prompt) with d(CARE prompt) over prompts and latents, per-prompt means)}."""
    import torch

    from recare import worldspec
    from recare.models import load_pipeline

    pipe = load_pipeline("mini-world", device="cpu", dtype="fp32")
    spec = worldspec.mini_world_spec()

    def embed(prompt: str):
        ids = pipe.tokenizer([prompt], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return pipe.text_encoder(ids)[0]

    out = {}
    gen = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        for name, task in spec["tasks"].items():
            rng = np.random.default_rng(seed)
            images = np.stack([world.render_prompt_scene(task["target_prompt"], rng)[0] for _ in range(latents)])
            x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
            z0 = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
            prompts = [p for ps in task["care_prompts"].values() for p in ps]
            cond = {p: embed(p) for p in ["", task["target_prompt"], *prompts]}
            cos = {p: [] for p in prompts}
            for t in (200, 400, 600, 800):
                noise = torch.randn(z0.shape, generator=gen)
                zt = pipe.scheduler.add_noise(z0, noise, torch.tensor([t]))
                eps = {p: pipe.unet(zt, t, encoder_hidden_states=c.expand(len(zt), -1, -1)).sample
                       for p, c in cond.items()}
                d_target = (eps[task["target_prompt"]] - eps[""]).flatten(1).double()
                for p in prompts:
                    d_care = (eps[p] - eps[""]).flatten(1).double()
                    cos[p] += torch.nn.functional.cosine_similarity(d_target, d_care, dim=1).tolist()
            per = {p: float(np.mean(v)) for p, v in cos.items()}
            out[name] = (float(np.mean(list(per.values()))), per)
    return out


def print_rows(name: str, result: dict) -> None:
    for target, r in result.items():
        print(f"| {name} | {target} / {r['care']} | {r['target']} | {r['target_without_care']} | "
              f"{r['care_without_target']} | {r['p_care_given_target']:.2f} | {r['p_target_given_care']:.2f} | "
              f"{r['pixel_change_target']:.1f} ({100 * r['area_target']:.1f}%) | "
              f"{r['pixel_change_care']:.1f} ({100 * r['area_care']:.1f}%) |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenes", type=int, default=20000, help="scenes sampled (default 20000)")
    parser.add_argument("--pixels", type=int, default=400, help="scenes with both concepts rendered twice for the "
                                                                "pixel signal (default 400)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="a world setting changed for a proposed world (world.WORLD_SETTINGS; repeat)")
    parser.add_argument("--directions", type=int, default=0, metavar="N",
                        help="also measure the generator's guidance directions on N latents per timestep (default 0: "
                             "skip)")
    args = parser.parse_args(argv)
    if args.directions:
        print("| task | cos(d(target), d(CARE prompt)), mean | per CARE prompt |")
        print("|---|---|---|")
        for name, (mean, per) in directions(args.directions, args.seed).items():
            print(f"| {name} | {mean:.3f} | " + "; ".join(f"{p}: {c:.3f}" for p, c in per.items()) + " |")
        print()
    print("| world | target / CARE concept | target scenes | target without CARE | CARE without target | "
          "P(CARE given target) | P(target given CARE) | target's pixel signal (area) | CARE's pixel signal (area) |")
    print("|---" * 9 + "|")
    print_rows("current", measure(args.scenes, args.pixels, args.seed))
    if args.set:
        saved = world.apply_settings(parse_world_settings(args.set))
        try:
            print_rows(", ".join(args.set), measure(args.scenes, args.pixels, args.seed))
        finally:
            world.apply_settings(saved)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
