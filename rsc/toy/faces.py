"""Deterministic procedural faces for the toy world.

Faces are drawn with PIL at twice the requested size and downsampled, so edges
are anti-aliased. Each face has three attributes:

- ``group``: one of four made-up groups (:data:`GROUPS`), told apart by a
  saturated skin hue and by the colour and style of the hair;
- ``gender``: :data:`GENDERS`, told apart by hair length, jaw shape and
  eyebrow thickness;
- ``stereotype``: a planted visible distortion that belongs to no group's
  definition (face squashed to ~68% of its height, eyes ~1.9x larger, a heavy
  dark outline and a warped mouth). The biased toy training data ties it to
  some groups; the refiner is meant to remove it.

Within a group, faces vary in position, scale, face proportions, eye spacing,
expression, skin and hair tone, clothing and a neutral grey background.

Facial features (:data:`FACE_PARTS`: brows, eyes, nose, mouth) can be left
undrawn (``omit=``), for the facial-quality judge's "erased features"
degradation (:mod:`rsc.toy.quality`); the default draws all of them.

Every random draw is made in a fixed order that does not depend on the
attributes, so one generator state gives the same pose, proportions and
background whatever the attributes are: rendering the same ``(seed, index)``
with and without the stereotype gives a matched pair that differs only in the
distortion.
"""

from __future__ import annotations

import colorsys
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "FACE_PARTS",
    "GENDERS",
    "GROUPS",
    "FaceAttributes",
    "random_attributes",
    "render_face",
    "render_faces",
]

#: Made-up, neutral group names (index = group id).
GROUPS: tuple[str, ...] = ("ardan", "belor", "cyran", "dovek")
#: Gender names (index = gender id).
GENDERS: tuple[str, ...] = ("woman", "man")
#: Facial features that ``render_face(..., omit=...)`` can leave undrawn.
FACE_PARTS: tuple[str, ...] = ("brows", "eyes", "nose", "mouth")

# Skin: (hue in degrees, saturation, value) centres; four hues ~90 degrees apart
# (ochre-orange, green, blue, purple) so groups stay separable after a lossy
# autoencoder. Within-group jitter is small compared with the gaps.
_SKIN_HSV: tuple[tuple[float, float, float], ...] = (
    (115.0, 0.55, 0.78),  # ardan: green
    (205.0, 0.58, 0.88),  # belor: blue
    (28.0, 0.68, 0.90),  # cyran: ochre-orange
    (285.0, 0.50, 0.82),  # dovek: purple
)
_SKIN_JITTER = (7.0, 0.06, 0.06)

# Hair: (hue, saturation, value) centres; none is near-white or grey.
_HAIR_HSV: tuple[tuple[float, float, float], ...] = (
    (220.0, 0.30, 0.13),  # ardan: black
    (48.0, 0.85, 0.92),  # belor: golden yellow
    (22.0, 0.70, 0.34),  # cyran: dark brown
    (352.0, 0.82, 0.62),  # dovek: wine red
)
_HAIR_JITTER = (5.0, 0.06, 0.05)

_STEREO_HEIGHT = 0.68  # face height factor of the stereotype
_STEREO_EYES = 1.9  # eye size factor of the stereotype


@dataclass(frozen=True)
class FaceAttributes:
    """The attributes of one face.

    Attributes:
        group: Index into :data:`GROUPS`.
        gender: Index into :data:`GENDERS`.
        stereotype: Whether the planted stereotype distortion is drawn.
    """

    group: int
    gender: int
    stereotype: bool

    def __post_init__(self) -> None:
        _check_index("group", self.group, len(GROUPS), GROUPS)
        _check_index("gender", self.gender, len(GENDERS), GENDERS)


def _check_index(name: str, value: object, n: int, names: tuple[str, ...]) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or not 0 <= value < n:
        raise ValueError(f"{name} must be an integer index in [0, {n - 1}] (one of {names}), got {value!r}")


def _hsv(h_deg: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb((h_deg / 360.0) % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return (round(r * 255), round(g * 255), round(b * 255))


def _shade(rgb: tuple[int, int, int], f: float) -> tuple[int, int, int]:
    return tuple(min(255, max(0, round(c * f))) for c in rgb)  # type: ignore[return-value]


def _ellipse(cx: float, cy: float, rx: float, ry: float) -> tuple[float, float, float, float]:
    return (cx - rx, cy - ry, cx + rx, cy + ry)


def _check_omit(omit: Collection[str]) -> frozenset[str]:
    if isinstance(omit, str):  # a bare "eyes" would otherwise be read as the letters e, y, e, s
        raise ValueError(f"omit must be a collection of part names from {FACE_PARTS}, got the string {omit!r}")
    unknown = sorted(set(omit) - set(FACE_PARTS))
    if unknown:
        raise ValueError(f"omit names unknown face parts {unknown}; expected a subset of {FACE_PARTS}")
    return frozenset(omit)


def render_face(
    attrs: FaceAttributes, rng: np.random.Generator, size: int = 64, omit: Collection[str] = ()
) -> np.ndarray:
    """Render one face.

    The generator is advanced by the same number of draws whatever the
    attributes (and ``omit``), so equal generator states give matched faces.

    Args:
        attrs: Group, gender and stereotype of the face.
        rng: Source of the natural variation (pose, proportions, tones).
        size: Output height and width in pixels (drawn at twice this size).
        omit: Facial features (from :data:`FACE_PARTS`) to leave undrawn; the
            skin shows where they would be.

    Returns:
        ``uint8`` array of shape ``(size, size, 3)``.
    """
    if not isinstance(attrs, FaceAttributes):
        raise ValueError(f"attrs must be a FaceAttributes, got {type(attrs).__name__}")
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 16:
        raise ValueError(f"size must be an integer >= 16 (pixels), got {size!r}")
    size = int(size)
    skip = _check_omit(omit)

    # All draws up front, in a fixed order independent of the attributes.
    u = rng.random(32)
    n = rng.standard_normal(8)

    S = 2 * size
    woman = attrs.gender == 0
    g = attrs.group

    # Colours.
    sh, ss, sv = _SKIN_HSV[g]
    skin = _hsv(sh + _SKIN_JITTER[0] * (2 * u[0] - 1), ss + _SKIN_JITTER[1] * (2 * u[1] - 1),
                sv + _SKIN_JITTER[2] * (2 * u[2] - 1))
    hh, hs, hv = _HAIR_HSV[g]
    hair = _hsv(hh + _HAIR_JITTER[0] * (2 * u[3] - 1), hs + _HAIR_JITTER[1] * (2 * u[4] - 1),
                hv + _HAIR_JITTER[2] * (2 * u[5] - 1))
    grey = 0.40 + 0.45 * u[6]
    bg = _hsv(360.0 * u[7], 0.05 * u[8], grey)
    # Muted clothing, kept darker or lighter than the background.
    shirt_v = grey - 0.25 if u[9] < 0.5 else min(grey + 0.25, 0.97)
    shirt = _hsv(360.0 * u[10], 0.05 + 0.15 * u[11], shirt_v)

    # Geometry (canvas pixels).
    scale = S * (0.92 + 0.16 * u[12])
    # Position jitter kept small: features must land on the same latent cells often enough for a tiny SD to learn them.
    cx = S * (0.5 + 0.03 * n[0].clip(-2, 2))
    cy = S * (0.47 + 0.02 * n[1].clip(-2, 2))
    a = 0.19 * scale * (0.92 + 0.16 * u[13]) * (1.07 if not woman else 1.0)  # half width
    b0 = 0.25 * scale * (0.93 + 0.14 * u[14])  # half height
    b = b0 * (_STEREO_HEIGHT if attrs.stereotype else 1.0)
    eye_dx = a * (0.36 + 0.12 * u[15])
    eye_y = cy - b * (0.08 + 0.12 * u[16])
    eye_rx = 0.042 * scale * (0.9 + 0.2 * u[17])
    eye_ry = eye_rx * (0.62 + 0.12 * u[18])
    if attrs.stereotype:
        eye_rx *= _STEREO_EYES
        eye_ry *= _STEREO_EYES
    gaze = 0.3 * eye_rx * n[2].clip(-1.5, 1.5)
    mouth_y = cy + b * (0.48 + 0.08 * u[19])
    mouth_w = a * (0.30 + 0.16 * u[20])
    smile = 0.045 * scale * (1.3 * u[21] - 0.3)  # < 0: frown, > 0: smile
    jaw = 0.9 + 0.2 * u[22]
    flip = u[23] < 0.5  # side of the swept hair / part

    img = Image.new("RGB", (S, S), bg)
    d = ImageDraw.Draw(img)

    # Torso.
    d.ellipse(_ellipse(cx, S * 1.05, 0.36 * scale, 0.22 * scale), fill=shirt)

    # Hair behind the head.
    if woman:
        top = cy - b * 1.14
        bottom = cy + b0 * (1.25 + 0.25 * u[24])
        d.rounded_rectangle((cx - a * 1.3, top, cx + a * 1.3, bottom), radius=a * 0.9, fill=hair)
    else:
        d.ellipse(_ellipse(cx, cy - b * 0.22, a * 1.07, b * 0.95), fill=hair)
        # Ears.
        for sgn in (-1, 1):
            d.ellipse(_ellipse(cx + sgn * a * 0.97, cy, a * 0.15, b * 0.2), fill=_shade(skin, 0.9))

    # Neck.
    d.rectangle((cx - a * 0.4, cy, cx + a * 0.4, cy + b0 * 1.3), fill=_shade(skin, 0.85))

    # Face outline: elliptic forehead, gendered jaw.
    pts: list[tuple[float, float]] = []
    for t in np.linspace(np.pi, 2 * np.pi, 13):
        pts.append((cx + a * np.cos(t), cy + b * np.sin(t)))
    if woman:  # narrow, pointed chin
        jaw_pts = [(1.0, 0.0), (0.92, 0.42), (0.7, 0.74), (0.34 * jaw, 0.97), (0.0, 1.04)]
    else:  # wide, square jaw
        jaw_pts = [(1.0, 0.0), (1.0, 0.5), (0.92 * jaw, 0.84), (0.55 * jaw, 1.0), (0.0, 1.02)]
    right = [(cx + a * x, cy + b * y) for x, y in jaw_pts[1:]]
    left = [(cx - a * x, cy + b * y) for x, y in reversed(jaw_pts[1:-1])]
    pts.extend(right + left)
    if attrs.stereotype:
        d.polygon(pts, fill=skin, outline=(18, 14, 16), width=max(2, round(0.05 * S)))
    else:
        d.polygon(pts, fill=skin, outline=_shade(skin, 0.8), width=max(1, round(0.008 * S)))

    # Front hair, by group.
    ftop = cy - b * 1.12
    if g == 0:  # straight fringe
        fb = cy - b * (0.52 + 0.08 * u[25])
        d.rounded_rectangle((cx - a * 1.04, ftop, cx + a * 1.04, fb), radius=a * 0.35, fill=hair)
    elif g == 1:  # middle part: two rounded halves
        for sgn in (-1, 1):
            d.pieslice(_ellipse(cx + sgn * a * 0.05, cy - b * 0.45, a * 1.05, b * 0.7),
                       180 if sgn < 0 else 270, 270 if sgn < 0 else 360, fill=hair)
        d.line((cx, ftop + b * 0.2, cx, cy - b * 0.7), fill=_shade(skin, 0.95), width=max(1, round(0.012 * S)))
    elif g == 2:  # curls around the hairline
        r = 0.052 * scale
        k = 9 if woman else 7
        ring = np.linspace(np.pi * 1.03, np.pi * 1.97, k)
        for t in ring:
            d.ellipse(_ellipse(cx + a * 1.02 * np.cos(t), cy - b * 0.25 + b * 0.9 * np.sin(t), r, r), fill=hair)
        if woman:
            for sgn in (-1, 1):
                for j in range(4):
                    yy = cy + b0 * (-0.1 + 0.38 * j)
                    d.ellipse(_ellipse(cx + sgn * a * 1.12, yy, r * 1.1, r * 1.1), fill=hair)
    else:  # swept to one side
        sgn = -1.0 if flip else 1.0
        sweep = [
            (cx - sgn * a * 1.05, cy - b * 0.2),
            (cx - sgn * a * 0.95, ftop + b * 0.05),
            (cx, ftop - b * 0.06),
            (cx + sgn * a * 0.95, ftop + b * 0.1),
            (cx + sgn * a * 1.06, cy - b * 0.45),
            (cx + sgn * a * 0.35, cy - b * 0.58),
            (cx - sgn * a * 0.55, cy - b * 0.5),
        ]
        d.polygon(sweep, fill=hair)

    # Eyebrows (thicker for men), eyes, nose, mouth.
    brow = _shade(hair, 0.8) if g != 1 else _shade(hair, 0.6)
    brow_w = max(2, round((0.032 if not woman else 0.018) * scale))
    brow_y = eye_y - eye_ry - 0.035 * scale - 0.01 * scale * u[26]
    for sgn in (-1, 1):
        ex = cx + sgn * eye_dx
        if "brows" not in skip:
            d.line((ex - eye_rx * 1.1, brow_y + 0.01 * scale, ex + eye_rx * 1.1,
                    brow_y - 0.006 * scale * sgn * (u[27] - 0.5)), fill=brow, width=brow_w)
        if "eyes" not in skip:
            d.ellipse(_ellipse(ex, eye_y, eye_rx, eye_ry), fill=(244, 242, 238))
            ir = eye_ry * 0.85
            d.ellipse(_ellipse(ex + gaze, eye_y, ir, ir), fill=(38, 28, 24))
    nose_len = b0 * (0.16 + 0.08 * u[28])
    nose_y = cy + b * 0.12
    if "nose" not in skip:
        d.line((cx, nose_y, cx + a * 0.08, nose_y + nose_len * (b / b0), cx - a * 0.05, nose_y + nose_len * (b / b0)),
               fill=_shade(skin, 0.62), width=max(2, round(0.02 * S)), joint="curve")

    lip = (120 + round(40 * u[29]), 30, 40)
    xs = np.linspace(-1.0, 1.0, 11)
    if attrs.stereotype and "mouth" not in skip:  # wide, wavy, heavy mouth
        w = a * 0.72
        amp = 0.035 * scale
        mpts = [(cx + w * x, mouth_y + amp * np.sin(2.5 * np.pi * x + 0.6)) for x in xs]
        d.line(mpts, fill=(70, 10, 20), width=max(2, round(0.04 * S)), joint="curve")
    elif "mouth" not in skip:
        mpts = [(cx + mouth_w * x, mouth_y + smile * (0.5 - x * x)) for x in xs]
        d.line(mpts, fill=lip, width=max(2, round(0.032 * S)), joint="curve")

    out = img.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(out, dtype=np.uint8)


def render_faces(
    groups: Sequence[int],
    genders: Sequence[int],
    stereotypes: Sequence[bool],
    seed: int,
    size: int = 64,
    omit: Collection[str] = (),
) -> np.ndarray:
    """Render a batch of faces deterministically.

    Image ``i`` depends only on ``(seed, i)`` and its attributes (it uses
    ``np.random.default_rng([seed, i])``), so rendering a subset of indices
    gives the same images as the same indices of a full render.

    Args:
        groups: Group index per image (into :data:`GROUPS`).
        genders: Gender index per image (into :data:`GENDERS`).
        stereotypes: Whether each image carries the stereotype distortion.
        seed: Non-negative integer seed.
        size: Output height and width in pixels.
        omit: Facial features (from :data:`FACE_PARTS`) to leave undrawn on
            every face; the rest of each face is unchanged.

    Returns:
        ``uint8`` array of shape ``(N, size, size, 3)``.
    """
    groups_a = np.asarray(groups)
    genders_a = np.asarray(genders)
    stereo_a = np.asarray(stereotypes)
    for name, arr in (("groups", groups_a), ("genders", genders_a), ("stereotypes", stereo_a)):
        if arr.ndim != 1:
            raise ValueError(f"{name} must be a 1-D sequence, got an array of shape {arr.shape}")
    if not len(groups_a) == len(genders_a) == len(stereo_a):
        raise ValueError(
            "groups, genders and stereotypes must have the same length, got "
            f"{len(groups_a)}, {len(genders_a)} and {len(stereo_a)}"
        )
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    for name, arr, names in (("groups", groups_a, GROUPS), ("genders", genders_a, GENDERS)):
        if len(arr) and not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{name} must hold integer indices into {names}, got dtype {arr.dtype}")
        bad = np.flatnonzero((arr < 0) | (arr >= len(names))) if len(arr) else []
        if len(bad):
            raise ValueError(
                f"{name}[{bad[0]}] = {arr[bad[0]]} is out of range: expected an index in "
                f"[0, {len(names) - 1}] (one of {names})"
            )
    if len(stereo_a) and not (stereo_a.dtype == bool or np.isin(stereo_a, (0, 1)).all()):
        raise ValueError(f"stereotypes must hold booleans (or 0/1), got {stereo_a[:5]!r}...")
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 16:
        raise ValueError(f"size must be an integer >= 16 (pixels), got {size!r}")

    _check_omit(omit)  # before any drawing, also for an empty batch
    out = np.empty((len(groups_a), size, size, 3), dtype=np.uint8)
    for i in range(len(groups_a)):
        attrs = FaceAttributes(int(groups_a[i]), int(genders_a[i]), bool(stereo_a[i]))
        out[i] = render_face(attrs, np.random.default_rng([int(seed), i]), size=size, omit=omit)
    return out


def random_attributes(n: int, seed: int, stereotype_rate: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw balanced attributes for ``n`` faces.

    Every (group, gender) combination appears ``n // 8`` or ``n // 8 + 1``
    times, in random order; each face carries the stereotype independently
    with probability ``stereotype_rate``.

    Args:
        n: Number of faces.
        seed: Non-negative integer seed.
        stereotype_rate: Probability in [0, 1] of the stereotype.

    Returns:
        ``(groups, genders, stereotypes)``: ``int64``, ``int64`` and ``bool``
        arrays of length ``n``.
    """
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not 0.0 <= float(stereotype_rate) <= 1.0:
        raise ValueError(f"stereotype_rate must be a probability in [0, 1], got {stereotype_rate!r}")
    rng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(1,)))
    k = len(GROUPS) * len(GENDERS)
    combo = rng.permutation(np.arange(n, dtype=np.int64) % k)
    groups = combo % len(GROUPS)
    genders = combo // len(GROUPS)
    stereotypes = rng.random(n) < stereotype_rate
    return groups, genders, stereotypes
