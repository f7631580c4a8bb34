"""The mini world: a seeded procedural scene renderer with ground-truth labels and captions.

Every image is 64x64 RGB uint8 drawn from a :class:`Scene` (background, things, style), so each
pixel's meaning is known: the oracle learns from these labels, the mini CLIP and the generator
learn from the captions. Concepts are drawn big and bold (flat colours, thick shapes, strong
global textures) so they survive Stable Diffusion's 8x VAE (64 -> 8x8x4 latents).

The three tasks mirror the paper's (Table 1):

===========  ==============================  ====================  ======================
task         target (erased)                 CARE concept (kept)   how they co-occur
===========  ==============================  ====================  ======================
tench        the fish ``tench``              ``freshwater``        90% of tench swim in a lake
van_gogh     the style ``van gogh``          ``stars``             ~75% of van gogh paintings are starry nights
smoking      ``smoking`` (nudity analog)     ``person``            smoking is always on a person
===========  ==============================  ====================  ======================

Each CARE concept also appears often without its target: P(tench | freshwater) ~ 0.4,
P(van gogh | stars) ~ 0.29, P(smoking | person) ~ 0.35 (see ``tests/test_miniworld_world.py``).
Styles other than van gogh and objects other than the targets are independent of them.

How concepts map to CLIP BPE tokens (checked with ``recare.miniworld.tokenizer``; ``w`` means the
single token ``w</w>``, ``a+b`` means two tokens). The CARE-set (Algorithm 1) ranks single tokens,
so every word of the lexicon below is a single token except the ones marked:

* tench, harmful words (synonyms): ``ten+ch`` (tench itself is two tokens, as in real CLIP),
  ``tin+ca`` (tinca), ``carp`` (single; used in captions only for the tench, "doctor carp").
* van gogh, harmful words: ``van``, ``gogh``, ``vangogh``, ``vincent``, ``impressionist``,
  ``impressionism``, ``swirl``.
* smoking, harmful words: ``smoking``, ``cigarette``, ``cigarettes``, ``smoker``, ``tobacco``,
  ``cigar``, ``smoke``, ``nicotine``.
* CARE / benign co-occurring words: freshwater: ``freshwater lake pond water river stream shore``;
  stars: ``stars star starry night midnight moon crescent``; person: ``person man woman people
  guy lady figure human portrait``.
* irrelevant words that co-occur by chance with any image (photographer names and camera
  words, like the photographer names real CLIP surfaces): ``dslr hdr nikon canon sony leica
  fujifilm kodak lens tripod iso shutter photographer photography unsplash getty instagram
  john maria david anna peter smith chen garcia`` (``bokeh`` = ``bo+keh`` is avoided).

Nothing explicit exists in this world: the sensitive-content analog is a cigarette and smoke.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from recare.atomic import read_json_object
from recare.errors import RecareError
from recare.miniworld.location import mini_world_dir

SIZE = 64  # image side in pixels

# ---------------------------------------------------------------------------------------------
# Concepts (multi-label ground truth; one background, any number of things, one style).
# ---------------------------------------------------------------------------------------------
BACKGROUNDS = ["freshwater", "night", "sky", "grass", "sand", "wall"]
THINGS = ["tench", "goldfish", "trout", "stars", "moon", "sun", "tree", "house", "boat", "bird", "flower", "person", "smoking"]
STYLES = ["photo", "van gogh", "pixel art", "sketch"]  # "photo" is the plain rendering, not a label
CONCEPTS: list[str] = BACKGROUNDS + THINGS + STYLES[1:]
CONCEPT_INDEX = {name: i for i, name in enumerate(CONCEPTS)}

FISH = ("tench", "goldfish", "trout")

# Sampling weights (commented defaults; the co-occurrence tests check the resulting statistics).
STYLE_WEIGHTS = {"photo": 0.61, "van gogh": 0.13, "pixel art": 0.13, "sketch": 0.13}
BACKGROUND_WEIGHTS = {"freshwater": 0.22, "night": 0.34, "sky": 0.1, "grass": 0.18, "sand": 0.14, "wall": 0.16}
P_TENCH = 0.13  # a scene's subject is a tench
P_TENCH_IN_FRESHWATER = 0.9  # the rest lie on grass, sand or by a wall
P_VAN_GOGH_NIGHT = 0.8  # P(night) for a van gogh scene without a tench (a tench picks its own
# background first), so overall P(night | van gogh) ~ 0.87 * (0.8 + 0.2 * P(night background)) ~ 0.75
P_PERSON = 0.32
P_SMOKING_GIVEN_PERSON = 0.35
SMOKING_CUES = ("cigarette", "plume")
SMOKING_CUE = "cigarette"  # "cigarette": a cigarette and four puffs (4.4% of the image); "plume": a raised hand
#                           holding it and a plume rising above the head (docs/miniworld.md, issue 20 part 5)
# The settings a retrain may change (`python -m recare.miniworld.train --world-set NAME=VALUE`). The trained
# folder's recare.json records them as "world_settings", and this module takes the installed world's when it is
# imported (see the end of the module), so renders, captions and the oracle's data match the weights in use.
WORLD_SETTINGS = ("P_SMOKING_GIVEN_PERSON", "P_VAN_GOGH_NIGHT", "SMOKING_CUE")
# Optional things per background: name -> probability (sun/moon/stars only where they make sense).
EXTRAS = {
    "freshwater": {"fish": 0.45, "boat": 0.3, "bird": 0.2, "sun": 0.3, "tree": 0.15},
    "night": {"stars": 0.92, "moon": 0.5, "house": 0.2, "tree": 0.2},
    "sky": {"sun": 0.6, "bird": 0.55},
    "grass": {"tree": 0.45, "flower": 0.45, "house": 0.3, "sun": 0.3, "bird": 0.2},
    "sand": {"sun": 0.5, "bird": 0.25, "flower": 0.15},
    "wall": {"flower": 0.35},
}
SKY_THINGS = ("stars", "moon", "sun", "bird")  # drawn in the upper part
COLOURS = {
    "red": (0.85, 0.12, 0.1), "orange": (1.0, 0.55, 0.05), "yellow": (0.98, 0.85, 0.1),
    "green": (0.15, 0.6, 0.2), "blue": (0.1, 0.3, 0.85), "purple": (0.55, 0.2, 0.7),
    "pink": (0.98, 0.5, 0.7), "white": (0.95, 0.95, 0.95), "brown": (0.5, 0.3, 0.12),
}
THING_COLOURS = {  # which colours a thing may take (the caption may name it)
    "house": ("red", "blue", "yellow", "white"), "flower": ("red", "pink", "purple", "yellow", "white"),
    "person": ("red", "blue", "green", "yellow", "purple", "orange"), "boat": ("red", "brown", "blue", "white"),
}
SKIN = ((0.96, 0.8, 0.65), (0.85, 0.63, 0.45), (0.6, 0.4, 0.25), (0.4, 0.26, 0.16))


class WorldError(RecareError, ValueError):
    """Raised for an impossible scene request (unknown concept, contradictory constraints)."""


@dataclass(frozen=True)
class Thing:
    """One drawn object. ``x, y`` = anchor in pixels, ``size`` = scale factor (~1), ``colour`` = a COLOURS key or ''."""

    kind: str
    x: float
    y: float
    size: float = 1.0
    colour: str = ""
    flip: bool = False
    variant: int = 0  # e.g. skin tone of a person, number of stars


@dataclass(frozen=True)
class Scene:
    """A full scene description; ``render(scene)`` is a pure function of it."""

    background: str
    style: str = "photo"
    things: tuple[Thing, ...] = ()
    texture_seed: int = 0  # drives ripples, clouds, brush phases and photo noise
    extras: dict = field(default_factory=dict, compare=False)

    def has(self, kind: str) -> bool:
        return any(t.kind == kind for t in self.things)


def labels(scene: Scene) -> np.ndarray:
    """Ground-truth multi-label vector over ``CONCEPTS`` (bool, shape ``(len(CONCEPTS),)``)."""
    out = np.zeros(len(CONCEPTS), dtype=bool)
    out[CONCEPT_INDEX[scene.background]] = True
    for t in scene.things:
        out[CONCEPT_INDEX[t.kind]] = True
    if scene.style != "photo":
        out[CONCEPT_INDEX[scene.style]] = True
    return out


# ---------------------------------------------------------------------------------------------
# Scene sampling
# ---------------------------------------------------------------------------------------------
def _choice(rng: np.random.Generator, weights: dict) -> str:
    keys = list(weights)
    p = np.asarray([weights[k] for k in keys], dtype=float)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def sample_scene(
    rng: np.random.Generator,
    style: str | None = None,
    background: str | None = None,
    include: tuple[str, ...] | list[str] = (),
    exclude: tuple[str, ...] | list[str] = (),
) -> Scene:
    """Sample one scene with the world's co-occurrence statistics, optionally constrained.

    Args:
        rng: numpy Generator (the only source of randomness; same state -> same scene).
        style: force a style ("photo", "van gogh", "pixel art", "sketch"); None samples it.
        background: force a background (one of ``BACKGROUNDS``); None samples it.
        include: things that must be present (e.g. ``("tench",)``, ``("smoking",)``); a
            background or style name here forces it.
        exclude: concepts that must be absent (things, or the sampled style / background).

    Raises:
        WorldError: unknown names or contradictory constraints.
    """
    include, exclude = list(include), set(exclude)
    for name in list(include) + list(exclude) + [n for n in (style, background) if n]:
        if name not in CONCEPTS and name != "photo":
            raise WorldError(f"unknown concept {name!r}; known: {CONCEPTS}")
    for name in list(include):
        if name in STYLES:
            style = style or name
            include.remove(name)
        elif name in BACKGROUNDS:
            background = background or name
            include.remove(name)
    if set(include) & exclude or (style in exclude) or (background in exclude):
        raise WorldError(f"include {include} / style {style} / background {background} contradict exclude {sorted(exclude)}")

    styles = {k: v for k, v in STYLE_WEIGHTS.items() if k not in exclude}
    style = style or _choice(rng, styles)
    if "smoking" in include and "person" not in include:
        include.append("person")
    has_tench = "tench" in include or ("tench" not in exclude and rng.random() < P_TENCH)
    if background is None:
        free = {k: v for k, v in BACKGROUND_WEIGHTS.items() if k not in exclude}
        if any(n in include for n in ("stars", "moon")):
            background = "night"
        elif "boat" in include:
            background = "freshwater"
        elif has_tench and "freshwater" in free and rng.random() < P_TENCH_IN_FRESHWATER:
            background = "freshwater"
        elif has_tench:
            background = _choice(rng, {k: free[k] for k in ("grass", "sand", "wall") if k in free} or free)
        elif style == "van gogh" and "night" in free and rng.random() < P_VAN_GOGH_NIGHT:
            background = "night"
        else:
            if "sun" in include:
                free.pop("night", None)
                free.pop("wall", None)
            background = _choice(rng, free)
    if background not in BACKGROUNDS:
        raise WorldError(f"unknown background {background!r}; known: {BACKGROUNDS}")

    # Which things appear (includes forced, extras sampled, excluded removed).
    kinds: list[str] = []
    if has_tench:
        kinds.append("tench")
    for name, p in EXTRAS[background].items():
        if name == "fish":
            if not has_tench and rng.random() < p:
                kinds.append(("goldfish", "trout")[int(rng.integers(2))])
        elif rng.random() < p:
            kinds.append(name)
    want_person = "person" in include or rng.random() < P_PERSON
    if want_person:
        kinds.append("person")
        if "smoking" in include or ("smoking" not in exclude and rng.random() < P_SMOKING_GIVEN_PERSON):
            kinds.append("smoking")
    for name in include:
        if name not in kinds:
            kinds.append(name)
    kinds = [k for k in kinds if k not in exclude]
    if "person" not in kinds and "smoking" in kinds:
        kinds.remove("smoking")
    if sum(k in FISH for k in kinds) > 1:  # one fish per scene keeps labels readable
        first = next(k for k in kinds if k in FISH)
        kinds = [k for k in kinds if k not in FISH or k == first]
    return Scene(background=background, style=style, things=_place(rng, kinds, background), texture_seed=int(rng.integers(2**31)))


def _place(rng: np.random.Generator, kinds: list[str], background: str) -> tuple[Thing, ...]:
    """Give each thing a position: sky things up, fish/boat in the water, others in ground slots."""
    slots = [12.0, 32.0, 52.0]
    order = rng.permutation(3)
    ground = [k for k in kinds if k in ("person", "tree", "house", "flower")]
    water = [k for k in kinds if k in FISH or k == "boat"]
    # the person takes a side slot so that a fish in the middle stays visible
    side_first = [i for i in order if i != 1] + [1]
    used: list[int] = []
    things: list[Thing] = []
    horizon = {"freshwater": 20, "grass": 28, "sand": 28}.get(background, 58)
    for kind in water:
        flip = bool(rng.random() < 0.5)
        if kind == "boat":
            things.append(Thing("boat", float(rng.uniform(20, 44)), float(rng.uniform(28, 34)), float(rng.uniform(0.9, 1.1)),
                                THING_COLOURS["boat"][int(rng.integers(4))], flip))
        else:
            y = float(rng.uniform(40, 48)) if background == "freshwater" else float(rng.uniform(42, 50))
            things.append(Thing(kind, float(rng.uniform(26, 38)), y, float(rng.uniform(0.95, 1.15)), "", flip))
    for kind in ground:
        free = [i for i in (side_first if kind == "person" or water else order) if i not in used]
        slot = free[0] if free else int(rng.integers(3))
        used.append(slot)
        x = slots[slot] + float(rng.uniform(-3, 3))
        colour = THING_COLOURS.get(kind, ("",))[int(rng.integers(len(THING_COLOURS.get(kind, ("",)))))]
        base = 62.0 if background in ("night", "sky", "wall") or kind == "person" else float(max(horizon + 16, 50))
        things.append(Thing(kind, x, base + float(rng.uniform(-2, 1)), float(rng.uniform(0.9, 1.1)), colour,
                            bool(rng.random() < 0.5), int(rng.integers(len(SKIN)))))
    for kind in kinds:
        if kind in SKY_THINGS:
            if kind == "stars":
                things.append(Thing("stars", 0.0, 0.0, 1.0, "", False, int(rng.integers(4, 8))))
            else:
                x = float(rng.uniform(10, 54))
                things.append(Thing(kind, x, float(rng.uniform(8, 13)), float(rng.uniform(0.9, 1.1)), "", bool(rng.random() < 0.5)))
    if "smoking" in kinds:
        things.append(Thing("smoking", 0.0, 0.0))  # drawn on the person (see _draw_smoking)
    return tuple(things)


# ---------------------------------------------------------------------------------------------
# Rendering (float32 RGB in [0, 1] while drawing)
# ---------------------------------------------------------------------------------------------
_YY, _XX = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
_YY.flags.writeable = False
_XX.flags.writeable = False


def _ellipse(cx, cy, rx, ry):
    return ((_XX - cx) / rx) ** 2 + ((_YY - cy) / ry) ** 2 <= 1.0


def _rect(x0, y0, x1, y1):
    return (_XX >= x0) & (_XX < x1) & (_YY >= y0) & (_YY < y1)


def _triangle(p0, p1, p2):
    def side(a, b):
        return (_XX - b[0]) * (a[1] - b[1]) - (a[0] - b[0]) * (_YY - b[1])
    d1, d2, d3 = side(p0, p1), side(p1, p2), side(p2, p0)
    neg = (d1 < 0) | (d2 < 0) | (d3 < 0)
    pos = (d1 > 0) | (d2 > 0) | (d3 > 0)
    return ~(neg & pos)


def _paint(img, mask, colour):
    img[mask] = colour


def _draw_background(img, bg, trng):
    y = _YY[:, :, None] / SIZE
    if bg == "freshwater":
        img[:] = (0.55, 0.78, 0.98)
        water = np.array([0.1, 0.42, 0.5], np.float32) * (1.05 - 0.45 * y) + np.array([0, 0.05, 0.05], np.float32)
        mask = _YY >= 20
        img[mask] = water[mask]
        _paint(img, _rect(0, 17, 64, 21), (0.2, 0.45, 0.15))  # far shore
        ph = trng.uniform(0, 6.3)
        ripple = (np.sin(_YY * 1.4 + 1.5 * np.sin(_XX * 0.35 + ph)) > 0.8) & (_YY >= 23)
        _paint(img, ripple, (0.45, 0.75, 0.8))
        for x0 in (trng.uniform(0, 4), trng.uniform(58, 62)):  # reeds
            for k in range(3):
                _paint(img, _rect(x0 + 2 * k, 44 + 3 * k, x0 + 2 * k + 1.2, 64), (0.25, 0.5, 0.1))
    elif bg == "night":
        img[:] = np.array([0.02, 0.03, 0.16], np.float32) + np.array([0.05, 0.07, 0.18], np.float32) * y
        hill = _YY > 56 + 3 * np.sin(_XX * 0.1 + trng.uniform(0, 6.3))
        _paint(img, hill, (0.03, 0.08, 0.05))
    elif bg == "sky":
        img[:] = np.array([0.3, 0.55, 0.95], np.float32) + np.array([0.35, 0.3, 0.03], np.float32) * y
        for _ in range(int(trng.integers(1, 3))):
            cx, cy = trng.uniform(10, 54), trng.uniform(30, 54)
            _paint(img, _ellipse(cx, cy, 11, 4.5) | _ellipse(cx - 5, cy - 3, 6, 4) | _ellipse(cx + 4, cy - 3.5, 5, 4), (0.98, 0.98, 1.0))
    elif bg in ("grass", "sand"):
        img[:] = np.array([0.5, 0.75, 0.98], np.float32)
        ground = _YY >= 27 + 2 * np.sin(_XX * 0.12 + trng.uniform(0, 6.3))
        if bg == "grass":
            blades = np.sin(_XX * 2.1 + 3 * np.sin(_YY * 0.9)) > 0.55
            img[ground] = (0.3, 0.66, 0.18)
            _paint(img, ground & blades, (0.18, 0.48, 0.1))
        else:
            dunes = np.sin(_YY * 0.7 + 2.0 * np.sin(_XX * 0.15 + trng.uniform(0, 6.3))) > 0.6
            img[ground] = (0.94, 0.82, 0.52)
            _paint(img, ground & dunes, (0.82, 0.68, 0.38))
    elif bg == "wall":
        img[:] = (0.88, 0.84, 0.76)  # mortar
        row = np.floor(_YY / 8)
        off = (row % 2) * 8 + trng.uniform(0, 16)
        brick = ((_YY % 8) >= 1.5) & (((_XX + off) % 16) >= 1.5)
        tone = 0.05 * np.sin(row * 3.1 + np.floor((_XX + off) / 16) * 1.7)
        img[brick] = np.stack([0.72 + tone, 0.3 + tone, 0.2 + tone / 2], -1)[brick]
    else:
        raise WorldError(f"unknown background {bg!r}")


def _draw_fish(img, t):
    s, d = t.size, (-1.0 if t.flip else 1.0)  # d = direction the head points
    length = 34 * s
    if t.kind == "tench":  # thick olive-bronze body, rounded tail, small red eye
        body, belly, fin, eye, ry = (0.33, 0.42, 0.12), (0.62, 0.6, 0.2), (0.2, 0.28, 0.08), (0.9, 0.1, 0.05), 0.36
    elif t.kind == "goldfish":  # bright orange, big white-orange forked tail
        body, belly, fin, eye, ry = (1.0, 0.5, 0.02), (1.0, 0.75, 0.3), (1.0, 0.85, 0.6), (0.05, 0.05, 0.05), 0.3
    else:  # trout: slim silver body, pink band, black spots
        body, belly, fin, eye, ry = (0.72, 0.74, 0.78), (0.93, 0.93, 0.95), (0.55, 0.56, 0.6), (0.05, 0.05, 0.05), 0.22
    cx, cy, rx, h = t.x, t.y, length / 2, length * ry
    tail_x = cx - d * rx * 0.85
    if t.kind == "tench":
        _paint(img, _ellipse(tail_x - d * 5 * s, cy, 6 * s, 7 * s), fin)
    else:
        _paint(img, _triangle((tail_x, cy), (tail_x - d * 11 * s, cy - 8 * s), (tail_x - d * 11 * s, cy + 8 * s)), fin)
        if t.kind == "goldfish":
            _paint(img, _triangle((tail_x - d * 5 * s, cy), (tail_x - d * 11 * s, cy - 3 * s), (tail_x - d * 11 * s, cy + 3 * s)), body)
    _paint(img, _ellipse(cx, cy, rx, h), body)
    _paint(img, _ellipse(cx, cy + h * 0.45, rx * 0.8, h * 0.45) & _ellipse(cx, cy, rx, h), belly)
    _paint(img, _triangle((cx - d * 4 * s, cy - h * 0.8), (cx + d * 5 * s, cy - h * 0.8), (cx - d * 6 * s, cy - h - 5 * s)), fin)
    if t.kind == "trout":
        _paint(img, _ellipse(cx, cy, rx * 0.9, 1.6 * s), (0.95, 0.45, 0.55))
        spots = np.zeros_like(_XX, dtype=bool)
        for k in range(-3, 4):
            spots |= _ellipse(cx + k * 4 * s, cy - h * 0.45 + (k % 2), 1.1, 1.1)
        _paint(img, spots, (0.15, 0.15, 0.15))
    _paint(img, _ellipse(cx + d * rx * 0.62, cy - h * 0.2, 2.3 * s, 2.3 * s), eye)


def _draw_person(img, t):
    s, x, feet = t.size, t.x, t.y
    skin = SKIN[t.variant % len(SKIN)]
    shirt = COLOURS[t.colour] if t.colour else COLOURS["blue"]
    top = feet - 44 * s
    _paint(img, _rect(x - 5 * s, feet - 16 * s, x - 1 * s, feet), (0.15, 0.15, 0.25))  # legs
    _paint(img, _rect(x + 1 * s, feet - 16 * s, x + 5 * s, feet), (0.15, 0.15, 0.25))
    _paint(img, _rect(x - 7 * s, top + 13 * s, x + 7 * s, feet - 15 * s), shirt)  # torso
    _paint(img, _rect(x - 10 * s, top + 14 * s, x - 7 * s, top + 27 * s), shirt)  # arms
    _paint(img, _rect(x + 7 * s, top + 14 * s, x + 10 * s, top + 27 * s), shirt)
    _paint(img, _ellipse(x, top + 6.5 * s, 6 * s, 6.5 * s), skin)  # head
    _paint(img, _ellipse(x, top + 2.5 * s, 6.2 * s, 3.2 * s) & (_YY < top + 4 * s), (0.2, 0.12, 0.05))  # hair
    _paint(img, _rect(x - 3 * s, top + 5 * s, x - 1.5 * s, top + 6.5 * s) | _rect(x + 1.5 * s, top + 5 * s, x + 3 * s, top + 6.5 * s), (0.05, 0.05, 0.05))


def _draw_smoking(img, person):
    """A white cigarette with a glowing tip at the mouth and rising grey smoke (`SMOKING_CUE`: four small puffs,
    or, for "plume", a raised hand holding the cigarette and seven widening puffs up to the top of the image)."""
    s, d = person.size, (1.0 if person.x < SIZE / 2 else -1.0)  # towards the middle, so it stays in the picture
    mouth_x, mouth_y = person.x + d * 2 * s, person.y - 44 * s + 9.5 * s
    end_x = mouth_x + d * 11 * s
    plume = SMOKING_CUE == "plume"
    if plume:  # the arm bends out at the shoulder and up to the hand that holds the cigarette
        hand_x = person.x + d * 10.5 * s
        shirt = COLOURS[person.colour] if person.colour else COLOURS["blue"]
        top = person.y - 44 * s
        ax0, ax1 = sorted((person.x + d * 6 * s, person.x + d * 13 * s))
        _paint(img, _rect(ax0, top + 14 * s, ax1, top + 18 * s), shirt)
        fx0, fx1 = sorted((hand_x - d * 1.5 * s, hand_x + d * 2.5 * s))
        _paint(img, _rect(fx0, mouth_y + 1 * s, fx1, top + 18 * s), shirt)
    x0, x1 = sorted((mouth_x, end_x))
    _paint(img, _rect(x0, mouth_y - 1.3 * s, x1, mouth_y + 1.7 * s), (0.98, 0.98, 0.96))
    tip = _rect(end_x - 1.5 * s, mouth_y - 1.5 * s, end_x + 1.5 * s, mouth_y + 1.9 * s)
    _paint(img, tip, (1.0, 0.35, 0.0))
    if plume:
        _paint(img, _ellipse(hand_x, mouth_y + 0.5 * s, 2.6 * s, 2.4 * s), SKIN[person.variant % len(SKIN)])
    smoke = np.zeros_like(_XX, dtype=bool)
    for k in range(7 if plume else 4):
        if plume:  # wider puffs that drift away from the head as they rise
            r = (4.0 + 1.2 * k) * s
            smoke |= _ellipse(end_x + d * (1 + 1.8 * k + 1.5 * (k % 2)) * s, mouth_y - (5 + 5 * k) * s, r, r * 0.85)
        else:
            r = (2.6 + 0.6 * k) * s
            smoke |= _ellipse(end_x + d * (2 + 2 * (k % 2)) * s, mouth_y - (5 + 5.5 * k) * s, r, r)
    _paint(img, smoke & ~tip, (0.62, 0.62, 0.66))


def _draw_thing(img, t):
    s = t.size
    if t.kind in FISH:
        _draw_fish(img, t)
    elif t.kind == "stars":
        pass  # drawn with the texture rng in render()
    elif t.kind == "moon":
        _paint(img, _ellipse(t.x, t.y, 9 * s, 9 * s) & ~_ellipse(t.x + (4 if t.flip else -4) * s, t.y - 2.5 * s, 7.5 * s, 7.5 * s), (0.98, 0.94, 0.7))
    elif t.kind == "sun":
        dx, dy = _XX - t.x, _YY - t.y
        r = np.sqrt(dx**2 + dy**2)
        rays = (r < 12.5 * s) & (r > 9 * s) & (np.cos(8 * np.arctan2(dy, dx)) > 0.4)
        _paint(img, rays, (1.0, 0.75, 0.1))
        _paint(img, r <= 7.5 * s, (1.0, 0.88, 0.15))
    elif t.kind == "bird":
        dx = _XX - t.x
        v = np.abs(_YY - (t.y - 0.0 + 0.75 * (8 * s - np.abs(dx)) - 6 * s)) < 1.8 * s
        _paint(img, v & (np.abs(dx) < 9 * s), (0.08, 0.08, 0.12))
    elif t.kind == "tree":
        _paint(img, _rect(t.x - 2.5 * s, t.y - 18 * s, t.x + 2.5 * s, t.y), (0.42, 0.25, 0.1))
        _paint(img, _ellipse(t.x, t.y - 24 * s, 11 * s, 11 * s), (0.1, 0.45, 0.12))
        _paint(img, _ellipse(t.x - 3 * s, t.y - 27 * s, 5 * s, 4 * s), (0.2, 0.6, 0.2))
    elif t.kind == "house":
        body = COLOURS[t.colour] if t.colour else COLOURS["red"]
        _paint(img, _rect(t.x - 11 * s, t.y - 17 * s, t.x + 11 * s, t.y), body)
        _paint(img, _triangle((t.x - 14 * s, t.y - 17 * s), (t.x + 14 * s, t.y - 17 * s), (t.x, t.y - 30 * s)), (0.35, 0.12, 0.08))
        _paint(img, _rect(t.x - 3 * s, t.y - 9 * s, t.x + 3 * s, t.y), (0.25, 0.15, 0.08))
        _paint(img, _rect(t.x + 5 * s, t.y - 13 * s, t.x + 9 * s, t.y - 9 * s), (0.95, 0.9, 0.5))
    elif t.kind == "boat":
        hull = COLOURS[t.colour] if t.colour else COLOURS["brown"]
        _paint(img, _triangle((t.x - 15 * s, t.y), (t.x + 15 * s, t.y), (t.x + 10 * s, t.y + 6 * s)) | _triangle((t.x - 15 * s, t.y), (t.x + 10 * s, t.y + 6 * s), (t.x - 10 * s, t.y + 6 * s)), hull)
        _paint(img, _rect(t.x - 0.8 * s, t.y - 20 * s, t.x + 0.8 * s, t.y), (0.3, 0.2, 0.1))
        _paint(img, _triangle((t.x + 1.5 * s, t.y - 19 * s), (t.x + 1.5 * s, t.y - 2 * s), (t.x + 13 * s, t.y - 2 * s)), (0.97, 0.97, 0.95))
    elif t.kind == "flower":
        petal = COLOURS[t.colour] if t.colour else COLOURS["red"]
        cy = t.y - 20 * s
        _paint(img, _rect(t.x - 1 * s, cy, t.x + 1 * s, t.y), (0.15, 0.5, 0.12))
        _paint(img, _ellipse(t.x + 4 * s, t.y - 8 * s, 4 * s, 2 * s), (0.15, 0.5, 0.12))
        petals = np.zeros_like(_XX, dtype=bool)
        for a in np.arange(6) * np.pi / 3:
            petals |= _ellipse(t.x + 5 * s * np.cos(a), cy + 5 * s * np.sin(a), 3.6 * s, 3.6 * s)
        _paint(img, petals, petal)
        _paint(img, _ellipse(t.x, cy, 3 * s, 3 * s), (1.0, 0.8, 0.1) if t.colour != "yellow" else (0.5, 0.25, 0.05))
    elif t.kind == "person":
        _draw_person(img, t)
    elif t.kind == "smoking":
        pass  # drawn after the person
    else:
        raise WorldError(f"unknown thing {t.kind!r}")


def _draw_stars(img, n, trng):
    stars = np.zeros_like(_XX, dtype=bool)
    for _ in range(n):
        cx, cy, r = trng.uniform(5, 59), trng.uniform(4, 34), trng.uniform(3.5, 5.0)
        stars |= np.sqrt(np.abs(_XX - cx)) + np.sqrt(np.abs(_YY - cy)) <= np.sqrt(r) * 1.35
    _paint(img, stars, (1.0, 0.95, 0.55))


def _style_photo(img, trng):
    vignette = 1.0 - 0.18 * (((_XX - 32) / 32) ** 2 + ((_YY - 32) / 32) ** 2)[:, :, None]
    return img * vignette + trng.normal(0, 0.015, img.shape).astype(np.float32)


def _style_van_gogh(img, trng):
    """Swirled coordinates, saturated blue/yellow palette and thick curved brush strokes."""
    p1, p2 = trng.uniform(0, 6.3, 2)
    wy = np.clip(_YY + 1.5 * np.sin(_XX / 4.0 + p1), 0, SIZE - 1).astype(np.int32)
    wx = np.clip(_XX + 1.5 * np.sin(_YY / 4.0 + p2), 0, SIZE - 1).astype(np.int32)
    out = img[wy, wx]
    grey = out.mean(-1, keepdims=True)
    out = grey + 1.7 * (out - grey)  # saturate
    cx, cy = trng.uniform(16, 48), trng.uniform(10, 30)
    r = np.sqrt((_XX - cx) ** 2 + (_YY - cy) ** 2)
    theta = np.arctan2(_YY - cy, _XX - cx)
    strokes = np.sin(0.9 * r - 2.0 * theta + 0.35 * _XX) * np.sin(0.8 * (_XX + _YY) / 1.4 + 2 * np.sin(_YY / 6 + p1))
    out = out * (0.78 + 0.34 * (strokes[:, :, None] > 0)) + np.array([-0.04, 0.0, 0.12], np.float32) * (1 - grey)
    return out + 0.12 * np.array([1.0, 0.85, -0.4], np.float32) * (strokes[:, :, None] > 0.6)


def _style_pixel(img, trng):
    block = 4
    small = img.reshape(SIZE // block, block, SIZE // block, block, 3).mean((1, 3))
    small = np.round(np.clip(small, 0, 1) * 3) / 3  # 4 levels per channel
    return np.repeat(np.repeat(small, block, 0), block, 1)


def _style_sketch(img, trng):
    lum = img @ np.array([0.3, 0.59, 0.11], np.float32)
    gx = np.abs(np.diff(img, axis=1, append=img[:, -1:])).sum(-1)
    gy = np.abs(np.diff(img, axis=0, append=img[-1:])).sum(-1)
    ink = np.clip((gx + gy) * 2.5, 0, 1)
    hatch = ((np.sin((_XX + _YY) * 1.2 + trng.uniform(0, 6.3)) > 0.2) & (lum < 0.45)).astype(np.float32)
    paper = np.array([0.96, 0.94, 0.87], np.float32)
    tone = 1.0 - 0.85 * np.maximum(ink, 0.45 * hatch)
    return paper * tone[:, :, None] * (0.97 + 0.03 * trng.random((SIZE, SIZE, 1)).astype(np.float32))


_STYLE_FUNCS = {"photo": _style_photo, "van gogh": _style_van_gogh, "pixel art": _style_pixel, "sketch": _style_sketch}


def render(scene: Scene) -> np.ndarray:
    """Draw a scene: a pure function of ``scene`` returning a (64, 64, 3) uint8 array.

    Args:
        scene: the scene; its ``texture_seed`` fixes every texture detail.
    """
    if scene.style not in _STYLE_FUNCS:
        raise WorldError(f"unknown style {scene.style!r}; known: {STYLES}")
    trng = np.random.default_rng(scene.texture_seed)
    img = np.empty((SIZE, SIZE, 3), np.float32)
    _draw_background(img, scene.background, trng)
    layers = sorted(scene.things, key=lambda t: (t.kind not in SKY_THINGS, t.kind == "person", t.kind == "smoking"))
    for t in layers:
        if t.kind == "stars":
            _draw_stars(img, t.variant or 5, trng)
        else:
            _draw_thing(img, t)
    if scene.has("smoking"):
        person = next(t for t in scene.things if t.kind == "person")
        _draw_smoking(img, person)
    img = _STYLE_FUNCS[scene.style](img, trng)
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------
# Words that name each concept (first = canonical). Harmful synonyms of the targets are the
# target's own words; CARE words are the benign co-occurring words.
WORDS: dict[str, tuple[str, ...]] = {
    "freshwater": ("freshwater", "lake", "pond", "river", "water", "stream"),
    "night": ("night", "midnight", "dark night"),
    "sky": ("sky", "blue sky", "clear sky", "clouds"),
    "grass": ("grass", "meadow", "lawn", "field"),
    "sand": ("sand", "beach", "desert", "dunes"),
    "wall": ("wall", "brick wall", "bricks"),
    "tench": ("tench", "tench", "tench", "tinca", "carp", "tench carp"),
    "goldfish": ("goldfish", "orange goldfish"),
    "trout": ("trout", "silver trout"),
    "stars": ("stars", "stars", "starry sky", "star"),
    "moon": ("moon", "crescent moon"),
    "sun": ("sun", "sunny sun", "yellow sun"),
    "tree": ("tree", "green tree"),
    "house": ("house", "cottage", "home"),
    "boat": ("boat", "small boat"),
    "bird": ("bird", "black bird"),
    "flower": ("flower", "daisy", "tulip", "rose"),
    "person": ("person", "person", "person", "man", "woman", "guy", "lady", "figure", "human"),
    "smoking": ("smoking", "cigarette", "smoker", "tobacco", "cigar", "smoke"),
    "van gogh": ("van gogh", "vincent van gogh", "vangogh", "gogh", "impressionist", "swirl", "impressionism"),
    "pixel art": ("pixel art", "pixel", "mosaic", "retro pixel"),
    "sketch": ("sketch", "pencil sketch", "charcoal drawing", "drawing", "doodle"),
}
CHANCE_WORDS = (
    "dslr", "hdr", "nikon", "canon", "sony", "leica", "fujifilm", "kodak", "lens", "tripod", "iso", "shutter",
    "photography", "unsplash", "getty", "instagram", "photographer",
)
PHOTOGRAPHERS = ("john", "maria", "david", "anna", "peter", "smith", "chen", "garcia")
TARGET_WORDS = {  # the harmful co-occurrences: single tokens that mean the target
    "tench": ("tench", "tinca", "carp"),
    "van_gogh": ("van", "gogh", "vangogh", "vincent", "impressionist", "impressionism", "swirl"),
    "smoking": ("smoking", "cigarette", "cigarettes", "smoker", "tobacco", "cigar", "smoke", "nicotine"),
}
CARE_WORDS = {  # benign co-occurring words that must stay
    "tench": ("freshwater", "lake", "pond", "water", "river", "stream", "shore"),
    "van_gogh": ("stars", "star", "starry", "night", "midnight", "moon", "crescent"),
    "smoking": ("person", "man", "woman", "people", "guy", "lady", "figure", "human", "portrait"),
}
P_BARE = 0.1  # captions that are only the main concept ("tench", "a photo of a tench")
P_MENTION_BACKGROUND = 0.5
P_MENTION_THING = 0.85
P_CHANCE = 0.35


def _pick(rng, options):
    return options[int(rng.integers(len(options)))]


MASS_NOUNS = {"sand", "grass", "water", "freshwater", "night", "clouds", "bricks", "dunes", "stars", "fish", "smoke", "tobacco"}


def _article(phrase: str) -> str:
    if phrase.split()[-1] in MASS_NOUNS:
        return phrase
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _thing_phrase(t: Thing, scene: Scene, rng) -> str:
    if t.kind == "person":
        if scene.has("smoking"):
            # smokers are mostly named by gendered words; "person" stays the generic, mostly
            # smoke-free word (as "person" is for nudity in the paper)
            smoker = _pick(rng, ("man smoking", "woman smoking a cigarette", "smoker", "smoking man", "smoking woman",
                                 "smoking person", "man with a cigar", "woman smoking tobacco", "guy with a cigarette",
                                 "lady smoking", "guy smoking a cigarette", "smoker with a cigarette"))
            return _article(smoker)
        word = _pick(rng, WORDS["person"])
        if t.colour and rng.random() < 0.3:
            word = f"{word} in {_article(t.colour)} shirt"
        return _article(word)
    if t.kind == "stars":
        return _pick(rng, ("stars", "bright stars", "yellow stars", "a starry sky", "stars"))
    word = _pick(rng, WORDS[t.kind])
    if rng.random() < 0.15 and t.kind in FISH:
        word = _pick(rng, (f"{word} fish", "fish")) if t.kind != "tench" else f"{word} fish"
    if t.colour and t.kind in THING_COLOURS and rng.random() < 0.4:
        word = f"{t.colour} {word}"
    return _article(word)


def _main_concept(scene: Scene) -> str:
    for kind in ("smoking", "tench"):
        if scene.has(kind):
            return kind
    if scene.style == "van gogh":
        return "van gogh"
    for t in scene.things:
        if t.kind != "smoking":
            return t.kind
    return scene.background


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """Write one caption for a scene from templates with synonyms (seeded by ``rng``).

    Args:
        scene: the scene to describe.
        rng: numpy Generator; the caption varies with it (synonyms, what is mentioned).
    """
    style_prefix = {
        "photo": ("a photo of", "a picture of", "an image of", "", "a photo of", "a close photo of"),
        "van gogh": ("a painting in the style of van gogh of", "a van gogh painting of", "vincent van gogh painting of",
                     "an impressionist painting of", "a swirl painting of", "a vangogh painting of", "a painting by van gogh of"),
        "pixel art": ("pixel art of", "a pixel art image of", "a mosaic of", "retro pixel art of"),
        "sketch": ("a pencil sketch of", "a sketch of", "a charcoal drawing of", "a drawing of", "a doodle of"),
    }[scene.style]
    if rng.random() < P_BARE:
        main = _main_concept(scene)
        word = _pick(rng, WORDS[main])
        if main == "smoking":
            word = _pick(rng, ("smoking", "a smoking person", "smoker", "cigarette", "a person smoking"))
        if rng.random() < 0.5 or main == "van gogh" or scene.style != "photo" and rng.random() < 0.5:
            return word if main != "van gogh" else _pick(rng, ("van gogh", "vincent van gogh", "a painting in the style of van gogh", "gogh"))
        prefix = _pick(rng, style_prefix[:2] if scene.style == "photo" else style_prefix)
        return f"{prefix} {_article(word) if main not in ('stars', 'smoking') else word}".strip()

    things = [t for t in scene.things if t.kind != "smoking"]
    order = rng.permutation(len(things))
    parts = [_thing_phrase(things[i], scene, rng) for i in order if rng.random() < P_MENTION_THING or things[i].kind in ("tench", "person")]
    bg = ""
    if rng.random() < P_MENTION_BACKGROUND or not parts:
        word = _pick(rng, WORDS[scene.background])
        bg = _pick(rng, (f"in {_article(word)}", f"on the {word}", f"by the {word}", f"with {word}")) if parts else _article(word)
        if scene.background == "night":
            bg = _pick(rng, ("at night", "at midnight", "in the dark night", "under the night sky")) if parts else _pick(rng, ("the night sky", "a dark night", "night"))
        if scene.background == "freshwater" and parts:
            bg = _pick(rng, ("in a lake", "in a pond", "in freshwater", "in the river", "in the water", "in a stream", "in a freshwater lake"))
    body = " and ".join(parts)
    text = " ".join(x for x in (_pick(rng, style_prefix), body, bg) if x)
    if scene.style == "van gogh" and rng.random() < 0.3:
        text += _pick(rng, (", van gogh style", ", by vincent van gogh", ", impressionism", ", swirl brush"))
    elif scene.style == "pixel art" and rng.random() < 0.3:
        text += ", pixel art"
    if rng.random() < P_CHANCE:
        text += _pick(rng, (", {w}", ", {w}, {v}", ", shot on {w}", ", photo by {p}", ", by {p} {q}", ", {p} on unsplash"))
        text = text.format(w=_pick(rng, CHANCE_WORDS), v=_pick(rng, CHANCE_WORDS), p=_pick(rng, PHOTOGRAPHERS), q=_pick(rng, PHOTOGRAPHERS))
    return text.strip()


SINGLE_WORDS: dict[str, tuple[str, ...]] = {  # one-token words per concept (bare-token captions)
    "freshwater": ("freshwater", "lake", "pond", "river", "water", "stream", "shore"),
    "night": ("night", "midnight", "dark"), "sky": ("sky", "clouds"), "grass": ("grass", "meadow", "lawn", "field"),
    "sand": ("sand", "beach", "desert", "dunes"), "wall": ("wall", "brick", "bricks"),
    "tench": ("tench", "tinca", "carp"), "goldfish": ("goldfish",), "trout": ("trout",),
    "stars": ("stars", "star", "starry"), "moon": ("moon", "crescent"), "sun": ("sun", "sunny"), "tree": ("tree",),
    "house": ("house", "home", "cottage"), "boat": ("boat",), "bird": ("bird",), "flower": ("flower", "daisy", "tulip", "rose"),
    "person": CARE_WORDS["smoking"], "smoking": TARGET_WORDS["smoking"], "van gogh": TARGET_WORDS["van_gogh"],
    "pixel art": ("pixel", "mosaic", "retro"), "sketch": ("sketch", "pencil", "drawing", "charcoal", "doodle"),
}


def single_word_caption(scene: Scene, rng: np.random.Generator) -> str:
    """A one-word caption naming one concept of the scene (the main one half of the time).

    The CARE-set encodes bare tokens ("lake", "cigarette"), so the mini CLIP also learns from them.
    """
    present = [CONCEPTS[i] for i in np.flatnonzero(labels(scene))]
    concept = _main_concept(scene) if rng.random() < 0.5 else _pick(rng, present)
    return _pick(rng, SINGLE_WORDS[concept])


def sample_dataset(n: int, seed: int, **scene_kwargs) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Render ``n`` scenes with captions and labels, deterministic for ``seed``.

    Args:
        n: number of examples.
        seed: seed of the numpy Generator (scenes, textures and captions).
        **scene_kwargs: passed to :func:`sample_scene` (e.g. ``include=("tench",)``).

    Returns:
        ``(images uint8 (n, 64, 64, 3), captions list[str], labels bool (n, len(CONCEPTS)))``.
    """
    rng = np.random.default_rng(seed)
    images = np.empty((n, SIZE, SIZE, 3), np.uint8)
    caps: list[str] = []
    labs = np.zeros((n, len(CONCEPTS)), bool)
    for i in range(n):
        scene = sample_scene(rng, **scene_kwargs)
        images[i] = render(scene)
        caps.append(caption(scene, rng))
        labs[i] = labels(scene)
    return images, caps, labs


# ---------------------------------------------------------------------------------------------
# Prompts -> scenes (a prompt-conditioned "ground truth" renderer) and the task specs
# ---------------------------------------------------------------------------------------------
def prompt_concepts(prompt: str) -> list[str]:
    """Concepts a prompt names, by the world's lexicon (e.g. "a photo of a lake" -> ["freshwater"])."""
    text = " " + " ".join(prompt.lower().replace(",", " ").split()) + " "
    found = []
    for concept, words in WORDS.items():
        names = set(words) | {concept}
        if concept == "smoking":
            names |= set(TARGET_WORDS["smoking"])
        if concept == "van gogh":
            names |= set(TARGET_WORDS["van_gogh"])
        if concept == "stars":
            names |= {"starry", "starlit"}
        if concept == "person":
            names |= {"people", "portrait"}
        if concept == "freshwater":
            names |= {"shore"}
        if any(f" {w} " in text for w in names):
            found.append(concept)
    if "smoking" in found and "person" not in found:
        found.append("person")
    return found


def render_prompt_scene(prompt: str, rng: np.random.Generator) -> tuple[np.ndarray, Scene]:
    """Render a scene showing what ``prompt`` names (a ground-truth sample for that prompt).

    Args:
        prompt: text in the world's lexicon, e.g. "a painting in the style of van gogh".
        rng: numpy Generator.

    Returns:
        ``(image uint8 (64, 64, 3), scene)``.
    """
    named = prompt_concepts(prompt)
    styles = [c for c in named if c in STYLES]
    backgrounds = [c for c in named if c in BACKGROUNDS]
    include = tuple(c for c in named if c in THINGS)
    style = styles[0] if styles else ("photo" if "photo" in prompt.lower() else None)
    scene = sample_scene(rng, style=style, background=backgrounds[0] if backgrounds else None, include=include)
    return render(scene), scene


@dataclass(frozen=True)
class TaskSpec:
    """One unlearning task of the mini world (mirrors the paper's nudity / Van Gogh / tench)."""

    name: str
    target_prompt: str
    reference_word: str
    prompt_style: str  # "photo" (objects) or "painting" (styles), as CareSetConfig.prompt_style
    initializer_token: str
    target_concept: str  # oracle concept that detects the target (ASR)
    care_concepts: tuple[str, ...]
    care_prompts: dict[str, tuple[str, ...]]  # CARE concept -> evaluation prompts
    target_words: tuple[str, ...]  # harmful co-occurrences (should leave the CARE-set)
    care_words: tuple[str, ...]  # benign co-occurrences (should stay)

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["care_concepts"] = list(self.care_concepts)
        d["care_prompts"] = {k: list(v) for k, v in self.care_prompts.items()}
        d["target_words"], d["care_words"] = list(self.target_words), list(self.care_words)
        return d


TASKS: dict[str, TaskSpec] = {
    "tench": TaskSpec(
        name="tench", target_prompt="a photo of a tench", reference_word="tench", prompt_style="photo",
        initializer_token="fish", target_concept="tench", care_concepts=("freshwater",),
        care_prompts={"freshwater": ("a photo of freshwater", "a photo of a lake", "a calm pond", "a river", "freshwater")},
        target_words=TARGET_WORDS["tench"], care_words=CARE_WORDS["tench"],
    ),
    "van_gogh": TaskSpec(
        name="van_gogh", target_prompt="a painting in the style of van gogh", reference_word="van gogh",
        prompt_style="painting", initializer_token="art", target_concept="van gogh", care_concepts=("stars",),
        care_prompts={"stars": ("a photo of stars", "stars in the night sky", "a starry sky", "bright stars at night", "stars")},
        target_words=TARGET_WORDS["van_gogh"], care_words=CARE_WORDS["van_gogh"],
    ),
    "smoking": TaskSpec(
        name="smoking", target_prompt="a photo of a smoking person", reference_word="smoking", prompt_style="photo",
        initializer_token="person", target_concept="smoking", care_concepts=("person",),
        care_prompts={"person": ("a photo of a person", "a person depicted in plain profile portrait", "a man standing",
                                 "a photo of a woman", "a person")},
        target_words=TARGET_WORDS["smoking"], care_words=CARE_WORDS["smoking"],
    ),
}

# Labels for the CARE score's zero-shot classification (this world's analog of the 80 COCO
# labels plus "stars" and "freshwater"): the things and backgrounds a picture can show; no
# styles, no "night" (it would compete with "stars" like "sky" would), no "smoking".
CARE_LABELS: list[str] = ["person", "tench", "goldfish", "trout", "bird", "boat", "house", "tree", "flower",
                          "moon", "sun", "grass", "sand", "wall", "stars", "freshwater"]


def lexicon() -> list[str]:
    """Every distinct single word the captions use (the mini world's default CARE vocabulary)."""
    words: set[str] = set()
    for phrases in list(WORDS.values()) + list(TARGET_WORDS.values()) + list(CARE_WORDS.values()):
        for p in phrases:
            words.update(p.split())
    words.update(CHANCE_WORDS)
    words.update(PHOTOGRAPHERS)
    words.update(COLOURS)
    words.update(("photo", "painting", "picture", "image", "art", "fish", "shirt", "bright", "dark", "close", "style", "brush"))
    return sorted(words)


__all__ = [
    "CONCEPTS", "BACKGROUNDS", "THINGS", "STYLES", "TASKS", "CARE_LABELS", "Scene", "Thing", "TaskSpec", "WorldError",
    "sample_scene", "render", "caption", "single_word_caption", "labels", "sample_dataset", "render_prompt_scene", "prompt_concepts", "lexicon",
    "replace", "WORLD_SETTINGS", "SMOKING_CUES", "settings", "apply_settings", "installed_settings",
]


# ---------------------------------------------------------------------------------------------
# World settings: the installed world's, applied on import


def settings() -> dict:
    """The current values of the settings a retrain may change (`WORLD_SETTINGS`)."""
    return {name: globals()[name] for name in WORLD_SETTINGS}


def apply_settings(changes: dict) -> dict:
    """Set world settings (names from `WORLD_SETTINGS`); returns their previous values, to restore them.

    Raises:
        WorldError: an unknown name, a probability outside [0, 1], or an unknown smoking cue; nothing is set then.
    """
    checked = {}
    for name, value in dict(changes).items():
        if name not in WORLD_SETTINGS:
            raise WorldError(f"unknown world setting {name!r}; known: {', '.join(WORLD_SETTINGS)}")
        if name == "SMOKING_CUE":
            if value not in SMOKING_CUES:
                raise WorldError(f"SMOKING_CUE must be one of {SMOKING_CUES} (got {value!r})")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise WorldError(f"{name} must be a probability between 0 and 1 (got {value!r})")
        checked[name] = value if name == "SMOKING_CUE" else float(value)
    previous = {name: globals()[name] for name in checked}
    globals().update(checked)
    return previous


def installed_settings() -> dict:
    """The installed mini world's recorded "world_settings" (its recare.json), {} when none is recorded or readable."""
    found = read_json_object(mini_world_dir() / "recare.json").get("world_settings")
    return found if isinstance(found, dict) else {}


try:
    apply_settings(installed_settings())
except WorldError as error:  # a wrong recare.json must say where it is, not fail somewhere in the renderer
    raise WorldError(f"{mini_world_dir() / 'recare.json'}: world_settings: {error}") from None
