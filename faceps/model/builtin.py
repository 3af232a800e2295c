"""The built-in procedural morphable face model ``faceps-builtin``.

A complete contract-5 model written from scratch (no scan data, MIT): a human head from
below the chin to the top of the skull and round to behind the ears, with identity,
expression and albedo components. It is the proxy model of every pipeline and the default
of ``load_model("builtin")``.

Construction (all deterministic, fixed seeds):

* **Surface.** A cylindrical parametrisation (``theta`` around the vertical axis, 0 in
  front, positive toward the subject's left; height ``y``) of a head-like base surface:
  horizontal superellipse cross-sections whose widths and depths follow anthropometric
  profiles (:data:`_SEC_Y`), a neck ellipse, and a jaw line (in the ``(theta, y)`` plane)
  across which the head blends into the neck. Anatomical features are smooth radial
  offsets: brow ridge, orbits with a closed eyelid over each eyeball, nose (dorsum,
  lobule, alae, nostrils), cheekbones, philtrum, lips and mouth line, chin, ears.
* **Mesh.** A regular ``(row, column)`` grid: columns are ``theta`` values, denser in the
  central face; each column is resampled by weighted arc length, so steep parts (nose,
  under the chin) get as many rows as they need. Triangles are counter-clockwise seen from
  outside, mirror-symmetric about the mid-sagittal plane.
* **Identity.** Named smooth space warps (face width, lower-face length, face depth, jaw
  width, nose length and width, eye spacing, lip thickness, chin projection, ...) followed
  by smooth random fields (the principal components of random Gaussian-RBF sums on the
  parametric domain); all are made orthogonal (QR, in order of decreasing magnitude) and
  each mode is scaled so its largest per-vertex displacement is 1 mm, so ``id_std[k]`` is
  the largest displacement (mm) of mode k at one standard deviation. ``id_names`` names
  them (``field_NN`` for the random fields).
* **Expression.** Localised blendshape-like displacement fields (jaw rotation about the
  temporomandibular axis, smiles, pucker, brows, eye squeeze, ...) stored at their
  ``alpha = 1`` displacement with ``exp_std = 1``. They are designed for ``alpha`` in
  about [0, 2]; the mouth-opening modes (``jaw_open``, ``lip_funnel``,
  ``upper_lip_up``, ``lower_lip_down``) fold the closed lips into each other for
  ``alpha < -0.3``, the others are plausible both ways for ``|alpha| <= 1``.
* **Albedo.** Linear RGB: a mid skin tone with redder lips, cheeks, nose and ears,
  darker brows, lash lines, lip seam and nostrils, short dark hair on the scalp;
  components (all relative to the local colour, so they scale with it): skin tone (light
  to dark, darker is more saturated), redness, yellowness, lip colour, brow darkness,
  cheek flush, hair colour, periorbital darkness and low-frequency blotches. Samples with
  ``alpha ~ N(0, 1)`` stay in [0, 1] except for rare joint extremes (several components
  beyond about 2.5 sd), which :meth:`MorphableModel.albedo` clips.

Model frame (contract 5): x toward the subject's left, y up, z out of the face, mm,
origin near the head centre (between the ears, at eye level).

The model takes about a second to build; :func:`builtin_model` memoises it in-process and
caches the ``.npz`` in ``$XDG_CACHE_HOME/faceps`` (default ``~/.cache/faceps``) under a
name that changes whenever this module changes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from faceps.core.errors import ModelError
from faceps.core.mesh import vertex_normals
from faceps.model.morphable import MorphableModel

__all__ = [
    "builtin_model",
    "build_builtin_model",
    "builtin_cache_path",
    "BUILTIN_VERSION",
    "EXPRESSION_NAMES",
    "ONE_SIDED_EXPRESSIONS",
    "IDENTITY_NAMES",
    "ALBEDO_NAMES",
]

log = logging.getLogger(__name__)

#: bump when the design changes (the cache name also hashes this file's source)
BUILTIN_VERSION = "1.0"
NAME = "faceps-builtin"
LICENSE = "MIT (procedural model, part of faceps)"
SOURCE = "procedural, faceps.model.builtin"

# ------------------------------------------------------------------ mesh layout
THETA_MAX = np.radians(125.0)   # columns cover theta in [-THETA_MAX, THETA_MAX]
Y_TOP = 116.0                   # top of the skull cap (mm)
Y_BOTTOM = -150.0               # lower end of the neck (mm)
N_COLUMNS = 139                 # odd: a column on the mid-sagittal plane
N_ROWS = 113
_FINE_ROWS = 1400               # samples per column for the arc-length resampling
SEAM_GAP = 0.45                 # half-height (mm) of the closed lip seam strip

# ------------------------------------------------------------------ design landmarks (mm)
EYE_X = 32.0          # |x| of the eye centres (interpupillary distance 64 mm)
EYE_Y = 11.0          # height of the closed-lid line at the eye centre
BROW_Y = 29.0         # height of the brow ridge
NASION_Y = 19.0
TIP_Y = -23.0         # pronasale
SUBNASALE_Y = -31.0
MOUTH_Y = -53.0       # stomion
MOUTH_HALF = 25.0     # half mouth width (cheilion)
CHIN_Y = -88.0        # pogonion
R_ARC = 90.0          # mm per radian of theta used for parametric (arc) distances

#: names of the expression components, in order
EXPRESSION_NAMES = (
    "jaw_open", "smile_left", "smile_right", "mouth_frown", "lip_pucker", "lip_funnel",
    "lip_press", "upper_lip_up", "lower_lip_down", "mouth_left", "mouth_right",
    "cheek_puff", "nose_wrinkle", "brow_raise", "brow_inner_raise", "brow_lower",
    "eye_close_left", "eye_close_right", "jaw_left", "jaw_forward",
)
#: expressions that only make sense for alpha >= 0 (they open the closed lips)
ONE_SIDED_EXPRESSIONS = ("jaw_open", "lip_funnel", "upper_lip_up", "lower_lip_down")

_NAMED_IDENTITY = (
    "face_width", "lower_face_length", "face_depth", "jaw_width", "forehead_slope",
    "forehead_height", "cheek_fullness", "cheekbones", "nose_length", "nose_width",
    "nose_bridge", "nose_projection", "nose_tip_up", "eye_spacing", "eye_depth",
    "eye_height", "brow_ridge", "lip_thickness", "mouth_width", "mouth_height",
    "chin_projection", "chin_width", "head_size", "ear_protrusion", "nose_deviation",
    "temple_hollow",
)
#: largest per-vertex displacement (mm) of each named identity mode at one std dev
_IDENTITY_PEAK_MM = {
    "face_width": 3.5, "lower_face_length": 4.0, "face_depth": 3.5, "jaw_width": 3.0,
    "forehead_slope": 3.5, "forehead_height": 3.0, "cheek_fullness": 3.0, "cheekbones": 2.5,
    "nose_length": 3.0, "nose_width": 2.5, "nose_bridge": 2.0, "nose_projection": 3.0,
    "nose_tip_up": 2.0, "eye_spacing": 2.0, "eye_depth": 2.0, "eye_height": 2.0,
    "brow_ridge": 2.0, "lip_thickness": 1.5, "mouth_width": 2.5, "mouth_height": 2.0,
    "chin_projection": 3.0, "chin_width": 2.0, "head_size": 3.0, "ear_protrusion": 3.0,
    "nose_deviation": 1.2, "temple_hollow": 1.5,
}
_N_RANDOM_IDENTITY = 32
#: names of the identity components before sorting by magnitude (see model.id_names)
IDENTITY_NAMES = _NAMED_IDENTITY + tuple(f"field_{k:02d}" for k in range(_N_RANDOM_IDENTITY))

_SEED_IDENTITY = 20240611
_SEED_ALBEDO = 20240612


# ================================================================== smooth primitives
def _smoothstep(e0: float, e1: float, x: np.ndarray) -> np.ndarray:
    """Cubic Hermite step: 0 at ``e0``, 1 at ``e1`` (either order), C1."""
    t = np.clip((np.asarray(x, dtype=np.float64) - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _gauss(x: np.ndarray, y: np.ndarray, cx: float, cy: float, sx: float, sy: float
           ) -> np.ndarray:
    """Axis-aligned Gaussian bump of height 1 at (cx, cy) with std devs (sx, sy)."""
    return np.exp(-0.5 * (((x - cx) / sx) ** 2 + ((y - cy) / sy) ** 2))


def _band(y: np.ndarray, centre: np.ndarray, width: float) -> np.ndarray:
    """Gaussian ridge of height 1 along the curve ``y = centre`` with std ``width``."""
    return np.exp(-0.5 * ((y - centre) / width) ** 2)


def _profile(knots_x, knots_y):
    """Monotone cubic (PCHIP) interpolant, constant beyond the knots. Made on its first
    use: loading the model from its cache then needs no ``scipy.interpolate`` (0.1 s of
    import in every command)."""
    xs, ys = np.asarray(knots_x, float), np.asarray(knots_y, float)
    if xs[0] > xs[-1]:
        xs, ys = xs[::-1], ys[::-1]
    lo, hi = float(xs[0]), float(xs[-1])
    made = []

    def g(x: np.ndarray) -> np.ndarray:
        if not made:
            from scipy.interpolate import PchipInterpolator

            made.append(PchipInterpolator(xs, ys, extrapolate=False))
        return made[0](np.clip(np.asarray(x, float), lo, hi))

    return g


# ================================================================== base surface
# horizontal head cross-sections by height y: half-width A, front depth Bf (from the
# vertical axis to the face), back depth Bb, and the superellipse exponent p of the front
_SEC_Y = [-140, -100, -80, -65, -45, -25, -5, 10, 30, 50, 70, 85, 100, 112, 122]
_SEC_A = _profile(_SEC_Y, [47, 46, 49, 54, 60, 66, 70, 71, 71, 70, 66, 59, 47, 33, 15])
_SEC_BF = _profile(_SEC_Y, [80, 88, 92, 95, 96, 95, 92, 92, 95, 93, 87, 78, 63, 45, 20])
_SEC_BB = _profile(_SEC_Y, [60, 70, 75, 80, 85, 92, 98, 100, 100, 98, 93, 86, 74, 58, 30])
_SEC_P = _profile(_SEC_Y, [2.0, 2.0, 2.1, 2.2, 2.4, 2.5, 2.4, 2.3, 2.3, 2.3, 2.2, 2.1, 2.0,
                           2.0, 2.0])

# jaw line (centre of the head-to-neck blend) in the (theta * R_JAW, y) plane
_R_JAW = 60.0
_JAW_DEG = np.array([0, 20, 40, 60, 75, 85, 92, 100, 110, 130], float)
_JAW_Y = np.array([-101, -97, -89, -79, -72, -67, -52, -28, -16, -12], float)


def _head_radius(theta: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Distance from the vertical axis to the base head surface (mm).

    A superellipse in front blending into an ellipse at the sides and the back.
    """
    A, Bf, Bb, p = _SEC_A(y), _SEC_BF(y), _SEC_BB(y), _SEC_P(y)
    s, c = np.abs(np.sin(theta)), np.cos(theta)
    B = Bb + (Bf - Bb) * _smoothstep(-0.35, 0.35, c)
    pp = 2.0 + (p - 2.0) * np.clip(c, 0.0, 1.0) ** 2
    return ((s / A) ** pp + (np.abs(c) / B) ** pp) ** (-1.0 / pp)


def _neck_radius(theta: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Distance from the vertical axis to the neck: an ellipse centred at z = -10 mm."""
    flare = np.maximum(0.0, -125.0 - y)
    A = 47.0 + 0.15 * flare
    B = 52.0 + 0.10 * flare
    zc = -10.0
    s, c = np.sin(theta), np.cos(theta)
    qa = (s / A) ** 2 + (c / B) ** 2
    qb = -2.0 * c * zc / B**2
    qc = (zc / B) ** 2 - 1.0
    return (-qb + np.sqrt(qb * qb - 4.0 * qa * qc)) / (2.0 * qa)


def _curve_distance(u: np.ndarray, y: np.ndarray, pu: np.ndarray, py: np.ndarray
                    ) -> np.ndarray:
    """Signed distance (mm) from points (u, y) to the polyline through (pu, py) (pu
    increasing); positive above the curve."""
    P0 = np.stack([pu[:-1], py[:-1]], 1)
    D = np.stack([pu[1:], py[1:]], 1) - P0
    u = np.asarray(u, float)
    y = np.asarray(y, float)
    best = np.full(np.broadcast(u, y).shape, np.inf)
    for k in range(P0.shape[0]):
        du, dy = u - P0[k, 0], y - P0[k, 1]
        t = np.clip((du * D[k, 0] + dy * D[k, 1]) / (D[k] @ D[k]), 0.0, 1.0)
        best = np.minimum(best, np.hypot(du - t * D[k, 0], dy - t * D[k, 1]))
    return np.where(y > np.interp(u, pu, py), best, -best)


def _jaw_distance(theta: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Signed distance (mm) in the (theta * R_JAW, y) plane to the jaw line; > 0 above."""
    deg = np.concatenate([-_JAW_DEG[::-1], _JAW_DEG[1:]])
    jy = np.concatenate([_JAW_Y[::-1], _JAW_Y[1:]])
    return _curve_distance(np.asarray(theta, float) * _R_JAW, y, np.radians(deg) * _R_JAW, jy)


# ================================================================== feature curves
def _mouth_line(ax: np.ndarray) -> np.ndarray:
    """Height of the closed mouth line (stomion line) at |x| = ax."""
    return MOUTH_Y - 0.0016 * ax**2


def _lid_line(ax: np.ndarray) -> np.ndarray:
    """Height of the closed upper-lid margin (a gentle arc, lowest mid-eye)."""
    return EYE_Y - 0.5 + 0.006 * (ax - EYE_X - 1.0) ** 2


def _brow_line(ax: np.ndarray) -> np.ndarray:
    """Height of the brow (the hair line of the eyebrow) at |x| = ax."""
    return BROW_Y + 2.5 - 0.0035 * (ax - 28.0) ** 2


def _upper_lip_border(ax: np.ndarray) -> np.ndarray:
    """Height of the upper vermilion border (Cupid's bow)."""
    t = np.clip(ax / MOUTH_HALF, 0.0, 1.0)
    bow = 8.0 * (1.0 - t**1.6) + 1.2 * _gauss(ax, 0, 5.0, 0, 2.5, 1) - 1.0 * _gauss(
        ax, 0, 0.0, 0, 2.0, 1)
    return _mouth_line(ax) + bow


def _lower_lip_border(ax: np.ndarray) -> np.ndarray:
    """Height of the lower vermilion border."""
    t = np.clip(ax / (MOUTH_HALF - 1.0), 0.0, 1.0)
    return _mouth_line(ax) - 10.0 * (1.0 - t**2) ** 0.8


# nose profile above the base surface on the midline, and its half-width
_NOSE_PROFILE = _profile([24, 19, 12, 4, -6, -13, -18, -21, -23.5, -26, -28, -29.5, -31, -33],
                         [0, 1.5, 5.0, 8.5, 12.0, 14.5, 16.5, 17.5, 17.0, 15.0, 12.0, 8.0,
                          3.0, 0.0])
_NOSE_HALF_WIDTH = _profile([24, 12, 0, -12, -19, -24, -30, -34],
                            [8, 8.5, 10, 12.0, 12.0, 11.0, 9, 8])


def _nose(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Radial relief of the nose: dorsum and lobule, alae, nostrils."""
    ax = np.abs(x)
    h = _NOSE_PROFILE(y)                     # zero beyond the nasion and the subnasale
    t = np.clip(ax / _NOSE_HALF_WIDTH(y), 0.0, 1.0)
    out = h * np.cos(0.5 * np.pi * t) ** 2
    out += 8.0 * _gauss(ax, y, 12.5, -26.5, 4.0, 3.6)        # alae (nostril wings)
    groove = _band(np.hypot((ax - 12.5) / 1.15, y + 26.0), 6.2, 1.1)
    out -= 1.6 * groove * _smoothstep(-31.0, -27.0, y)       # alar-facial groove
    out += 5.0 * _gauss(x, y, 0.0, TIP_Y - 0.5, 7.0, 5.5)    # round tip lobule
    out -= 5.0 * _gauss(ax, y, 6.5, -29.0, 3.0, 1.6)         # nostrils
    return out


def _eyes(ax: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Orbits with a closed eyelid over each eyeball, lid crease and lid margin."""
    out = -16.0 * _gauss(ax, y, EYE_X - 1.0, EYE_Y + 1.0, 16.0, 9.5)     # orbit
    out += 14.0 * _gauss(ax, y, EYE_X, EYE_Y, 8.5, 6.0)                  # eyeball + lid
    span = _gauss(ax, 0.0, EYE_X, 0.0, 9.0, 1.0)
    out -= 0.9 * _band(y, _lid_line(ax), 0.7) * span                     # lid margin
    out += 0.5 * _band(y, _lid_line(ax) - 1.6, 1.0) * span               # lower lid
    crease = EYE_Y + 7.0 - 0.012 * (ax - EYE_X) ** 2
    out -= 1.2 * _band(y, crease, 1.2) * span                           # upper-lid crease
    out -= 1.5 * _gauss(ax, y, 18.0, EYE_Y - 1.0, 3.0, 3.0)              # inner canthus
    out -= 1.0 * _gauss(ax, y, EYE_X - 4.0, EYE_Y - 8.0, 9.0, 2.5)       # tear trough
    return out


def _mouth(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Maxillary bulge, philtrum, lips with a mouth line, labiomental fold, chin."""
    ax = np.abs(x)
    ym = _mouth_line(ax)
    out = 5.0 * _gauss(x, y, 0.0, -52.0, 22.0, 13.0)                    # dental arch
    up_b = _upper_lip_border(ax)
    lo_b = _lower_lip_border(ax)
    taper_u = _smoothstep(MOUTH_HALF + 1.0, MOUTH_HALF - 8.0, ax)
    taper_l = _smoothstep(MOUTH_HALF, MOUTH_HALF - 10.0, ax)
    # upper lip: the vermilion rolls forward below its border
    up_c = 0.55 * up_b + 0.45 * ym
    out += 3.0 * _band(y, up_c, 2.9) * taper_u
    # lower lip: fuller, its maximum below the middle of the vermilion
    lo_c = 0.5 * lo_b + 0.5 * ym - 0.5
    out += 3.6 * _band(y, lo_c, 3.6) * taper_l
    # mouth line and corners
    out -= 3.0 * _band(y, ym, 0.9) * _smoothstep(MOUTH_HALF + 1.0, MOUTH_HALF - 5.0, ax)
    out -= 2.0 * _gauss(ax, y, MOUTH_HALF + 1.0, ym, 3.0, 3.0)
    # philtrum: a groove between two columns
    out -= 1.0 * _gauss(x, y, 0.0, -39.0, 2.8, 5.0)
    out += 0.6 * _gauss(ax, y, 5.0, -39.0, 1.8, 5.0)
    out -= 3.0 * _gauss(x, y, 0.0, -70.0, 14.0, 3.5)                     # labiomental fold
    out += 5.0 * _gauss(x, y, 0.0, CHIN_Y + 1.0, 13.0, 8.0)             # chin
    # nasolabial folds from the alae toward the mouth corners
    nl_x = 19.0 + (-27.0 - y) * 0.45
    fold = _band(ax, nl_x, 2.5) * _smoothstep(-22.0, -28.0, y) * _smoothstep(-62.0, -52.0, y)
    out -= 1.2 * fold
    out += 0.8 * _band(ax, nl_x + 4.0, 3.5) * _smoothstep(-22.0, -30.0, y) * _smoothstep(
        -62.0, -50.0, y)
    return out


def _ears(theta: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Radial relief of a simplified outer ear (pinna) on each side of the head."""
    a = (np.degrees(np.abs(theta)) - 99.0) * (np.pi / 180.0 * 72.0)   # mm, + toward the back
    b = y - 2.0
    q = np.sqrt((a / 16.0) ** 2 + (b / 30.0) ** 2)
    env = _smoothstep(1.0, 0.82, q)
    h = env * (2.5 + 11.0 * _smoothstep(-16.0, 12.0, a))
    h += 2.0 * _band(q, 0.86, 0.05) * _smoothstep(-22.0, -8.0, b)          # helix rim
    h += 1.6 * _band(q, 0.55, 0.07) * _smoothstep(-5.0, 5.0, b)            # antihelix
    h -= 6.0 * _gauss(a, b, -1.0, -3.0, 6.0, 8.0) * env                   # concha
    h += 3.0 * _gauss(a, b, -13.0, -4.0, 2.5, 4.0)                        # tragus
    return h


def _features(theta: np.ndarray, y: np.ndarray, xb: np.ndarray) -> np.ndarray:
    """Radial offsets (mm) of the facial features; ``xb`` is the base surface's x."""
    x = xb
    ax = np.abs(x)
    off = 2.0 * _gauss(ax, y, 25.0, 58.0, 14.0, 12.0)                    # frontal eminences
    off -= 3.0 * _gauss(ax, y, 60.0, 28.0, 8.0, 14.0)                    # temples
    off += 5.5 * _band(y, BROW_Y - 0.0025 * (ax - 30.0) ** 2, 4.5) * _smoothstep(56, 40, ax)
    off += 2.5 * _gauss(x, y, 0.0, BROW_Y - 1.0, 10.0, 6.0)              # glabella
    off -= 2.0 * _gauss(x, y, 0.0, NASION_Y, 9.0, 4.0)                   # nasion saddle
    off += _eyes(ax, y)
    off += 6.0 * _gauss(ax, y, 47.0, -3.0, 12.0, 9.0)                    # cheekbones
    off += 4.5 * _gauss(ax, y, 40.0, -30.0, 16.0, 15.0)                  # cheek fullness
    off -= 1.0 * _gauss(ax, y, 54.0, -35.0, 9.0, 12.0)                   # submalar hollow
    off += _nose(x, y)
    off += _mouth(x, y)
    front = _smoothstep(np.radians(100.0), np.radians(80.0), np.abs(theta))
    return off * front


# ================================================================== surface evaluation
@dataclass(frozen=True)
class _Surface:
    """Points of the design surface and the design coordinates behind them.

    Attributes:
        points: (..., 3) mm, model frame.
        xb: (...) x of the base surface (frontal design coordinate of the features).
        jaw: (...) signed distance to the jaw line (> 0 on the face side).
    """

    points: np.ndarray
    xb: np.ndarray
    jaw: np.ndarray


def _surface(theta: np.ndarray, y: np.ndarray) -> _Surface:
    """Evaluate the design surface at parameters (theta, y)."""
    theta = np.asarray(theta, float)
    y = np.asarray(y, float)
    r0 = _head_radius(theta, y)
    xb = r0 * np.sin(theta)
    r_head = r0 + _features(theta, y, xb) + _ears(theta, y)
    r_neck = _neck_radius(theta, y)
    d = _jaw_distance(theta, y)
    back = _smoothstep(np.radians(85.0), np.radians(105.0), np.abs(theta))
    s = _smoothstep(-(6.0 + 14.0 * back), 10.0 + 16.0 * back, d)
    r = s * r_head + (1.0 - s) * r_neck
    pts = np.stack([r * np.sin(theta), y, r * np.cos(theta)], axis=-1)
    return _Surface(pts, xb, d)


def _nodes(lo: float, hi: float, density, n: int) -> np.ndarray:
    """``n`` nodes on [lo, hi] spaced inversely to ``density``."""
    x = np.linspace(lo, hi, 4001)
    w = density(x)
    c = np.concatenate([[0.0], np.cumsum(0.5 * (w[1:] + w[:-1]) * np.diff(x))])
    return np.interp(np.linspace(0.0, c[-1], n), c, x)


def _column_density(theta: np.ndarray) -> np.ndarray:
    """Relative column density: highest in the central face, raised again at the ears."""
    a = np.degrees(np.abs(theta))
    return (1.0 + 0.5 * _smoothstep(115, 105, a) + 1.6 * _smoothstep(45, 28, a)
            + 0.5 * _smoothstep(82, 90, a) * _smoothstep(118, 110, a))


def _row_density(y: np.ndarray) -> np.ndarray:
    """Relative row density along the arc length: face, mouth and eyes get more rows."""
    w = 1.0 + 1.8 * _smoothstep(-118, -100, y) * _smoothstep(52, 38, y)
    w += 0.5 * _smoothstep(30, 45, y) * _smoothstep(100, 85, y)      # hairline
    w += 1.0 * _smoothstep(-66, -58, y) * _smoothstep(-40, -48, y)
    w += 0.6 * _smoothstep(0, 6, y) * _smoothstep(22, 16, y)
    return w


def _row_curves(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Heights (per column) that grid rows follow exactly: the lip seam (mouth line), the
    half-height of the seam strip, and the closed-lid line."""
    ax_m = np.abs(_head_radius(theta, MOUTH_Y) * np.sin(theta))
    seam = _mouth_line(np.minimum(ax_m, MOUTH_HALF + 6.0))
    gap = SEAM_GAP + 1.2 * _smoothstep(MOUTH_HALF + 3.0, MOUTH_HALF + 25.0, ax_m)
    ax_e = np.abs(_head_radius(theta, EYE_Y) * np.sin(theta))
    lid = _lid_line(np.clip(ax_e, EYE_X - 14.0, EYE_X + 14.0))
    return seam, gap, lid


@dataclass(frozen=True)
class _Grid:
    """The mesh grid: parameters and points of all vertices, row-major (rows, columns).

    Row ``seam_row`` follows the mouth line, with rows ``seam_row - 1`` and
    ``seam_row + 1`` just below and above it (the lip seam the mouth opens along); row
    ``lid_row`` follows the closed-lid line.
    """

    theta: np.ndarray     # (R, C)
    y: np.ndarray         # (R, C) the height parameter (equal to the vertex y)
    surface: _Surface     # points (R, C, 3)
    seam_row: int
    lid_row: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.theta.shape


def _make_grid() -> _Grid:
    """The vertex grid: symmetric columns by :func:`_column_density`; in every column,
    rows spaced by arc length weighted with :func:`_row_density`, piecewise between the
    curves of :func:`_row_curves` so that fixed rows follow the lip seam and the lid."""
    half = _nodes(0.0, THETA_MAX, _column_density, N_COLUMNS // 2 + 1)
    theta = np.concatenate([-half[:0:-1], half])
    C = theta.size
    yf = np.linspace(Y_BOTTOM, Y_TOP, _FINE_ROWS)
    T, Yf = np.meshgrid(theta, yf)
    fine = _surface(T, Yf).points
    seg = np.linalg.norm(np.diff(fine, axis=0), axis=-1)
    seg *= _row_density(0.5 * (yf[1:] + yf[:-1]))[:, None]
    cum = np.concatenate([np.zeros((1, C)), np.cumsum(seg, axis=0)], axis=0)
    seam, gap, lid = _row_curves(theta)
    # rows of the constrained curves, from the arc-length fractions of the middle column
    mid = C // 2

    def row_of(yv: float) -> int:
        frac = np.interp(yv, yf, cum[:, mid]) / cum[-1, mid]
        return int(round(frac * (N_ROWS - 1)))

    seam_row, lid_row = row_of(seam[mid]), row_of(lid[mid])
    knots_row = [0, seam_row - 1, seam_row, seam_row + 1, lid_row, N_ROWS - 1]
    knots_y = np.stack([np.full(C, Y_BOTTOM), seam - gap, seam, seam + gap, lid,
                        np.full(C, Y_TOP)])
    Y = np.empty((N_ROWS, C))
    for j in range(C):
        for k in range(len(knots_row) - 1):
            r0, r1 = knots_row[k], knots_row[k + 1]
            c0, c1 = np.interp([knots_y[k, j], knots_y[k + 1, j]], yf, cum[:, j])
            Y[r0:r1 + 1, j] = np.interp(np.linspace(c0, c1, r1 - r0 + 1), cum[:, j], yf)
    Y = 0.5 * (Y + Y[:, ::-1])        # exact mirror symmetry
    TT = np.broadcast_to(theta, Y.shape).copy()
    return _Grid(TT, Y, _surface(TT, Y), seam_row, lid_row)


def _grid_triangles(rows: int, cols: int) -> np.ndarray:
    """Counter-clockwise (seen from outside) triangles of a (rows, cols) vertex grid whose
    columns run toward +x and rows upward; diagonals mirror about the middle column."""
    idx = np.arange(rows * cols).reshape(rows, cols)
    v00, v01 = idx[:-1, :-1], idx[:-1, 1:]
    v10, v11 = idx[1:, :-1], idx[1:, 1:]
    left = np.broadcast_to((np.arange(cols - 1) < (cols - 1) // 2)[None, :, None],
                           v00.shape + (3,))
    t1 = np.where(left, np.stack([v00, v01, v10], -1), np.stack([v00, v01, v11], -1))
    t2 = np.where(left, np.stack([v01, v11, v10], -1), np.stack([v00, v11, v10], -1))
    return np.concatenate([t1.reshape(-1, 3), t2.reshape(-1, 3)], axis=0).astype(np.int32)


# ================================================================== landmarks
# designed frontal (x, y) positions of iBUG points 17-67 (x < 0: the subject's right)
_BROW_R = [(-50.0, 27.5), (-42.0, 32.0), (-33.0, 33.5), (-24.5, 32.5), (-16.0, 30.0)]
_EYE_R = [(-45.5, 11.0), (-37.5, 13.0), (-27.5, 13.0), (-19.0, 10.5), (-27.5, 8.5),
          (-37.5, 8.5)]
_NOSE_BRIDGE_Y = (16.0, 6.0, -5.0)
_NOSE_BASE = [(-12.5, SUBNASALE_Y + 2.0), (-6.5, SUBNASALE_Y + 0.5), (0.0, SUBNASALE_Y - 0.5),
              (6.5, SUBNASALE_Y + 0.5), (12.5, SUBNASALE_Y + 2.0)]


def _mirror(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    return [(-x, y) for x, y in points]


def _lip_targets() -> list[tuple[float, float]]:
    """iBUG 48-67: outer lip contour from the right corner, then the inner contour."""
    def up(x):
        return float(_upper_lip_border(np.abs(np.asarray(x))))

    def lo(x):
        return float(_lower_lip_border(np.abs(np.asarray(x))))

    def ym(x):
        return float(_mouth_line(np.abs(np.asarray(x))))

    c = MOUTH_HALF
    outer = [(-c, ym(c)), (-15.5, up(15.5)), (-6.0, up(6.0)), (0.0, up(0.0)), (6.0, up(6.0)),
             (15.5, up(15.5)), (c, ym(c)), (15.5, lo(15.5)), (6.0, lo(6.0)), (0.0, lo(0.0)),
             (-6.0, lo(6.0)), (-15.5, lo(15.5))]
    ci = c - 3.0
    inner = [(-ci, ym(ci)), (-10.0, ym(10.0) + 0.6), (0.0, ym(0.0) + 0.6), (10.0, ym(10.0) + 0.6),
             (ci, ym(ci)), (10.0, ym(10.0) - 0.6), (0.0, ym(0.0) - 0.6), (-10.0, ym(10.0) - 0.6)]
    return outer + inner


def _contour_landmarks(P: np.ndarray, usable: np.ndarray) -> np.ndarray:
    """iBUG 0-16: the frontal silhouette of the face from ear level on the subject's right,
    round the chin, to the left; equally spaced along the silhouette."""
    centre = np.array([0.0, -15.0])
    ids = np.nonzero(usable)[0]
    rel = P[ids, :2] - centre
    ang = np.degrees(np.arctan2(rel[:, 1], rel[:, 0])) % 360.0
    rad = np.hypot(rel[:, 0], rel[:, 1])
    start = np.degrees(np.arctan2(EYE_Y - 3.0 - centre[1], -70.0))    # ~160 deg
    sweep = np.linspace(start, 540.0 - start, 361)
    sil = []
    for a in sweep:
        diff = np.abs((ang - a + 180.0) % 360.0 - 180.0)
        near = diff < 1.0
        sil.append(ids[near][np.argmax(rad[near])])
    sil = np.asarray(sil)
    pts = P[sil, :2]
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(pts, axis=0), axis=1))])
    picks = np.interp(np.linspace(0.0, arc[-1], 17), arc, np.arange(sil.size))
    return sil[np.round(picks).astype(int)]


def _landmarks(P: np.ndarray, theta: np.ndarray, jaw: np.ndarray) -> np.ndarray:
    """The 68 iBUG landmark vertex ids of the mean shape."""
    front = (np.abs(theta) < np.radians(80.0)) & (P[:, 2] > 0) & (jaw > 0)
    lm = np.full(68, -1, np.int64)
    silhouette_ok = (jaw > 4.0) & (np.abs(theta) < np.radians(86.0))
    lm[0:17] = _contour_landmarks(P, silhouette_ok)
    targets = (_BROW_R + _mirror(_BROW_R)[::-1]
               + [(0.0, yb) for yb in _NOSE_BRIDGE_Y] + [None] + _NOSE_BASE
               + _EYE_R + _mirror(_EYE_R[3:4] + _EYE_R[2:0:-1] + _EYE_R[0:1]
                                  + _EYE_R[5:3:-1]) + _lip_targets())
    used = set(lm[0:17].tolist())
    cand = np.nonzero(front)[0]
    for k, tgt in enumerate(targets, start=17):
        if tgt is None:            # 30: the nose tip, the most anterior midline vertex
            mid = cand[np.abs(P[cand, 0]) < 1.0]
            lm[k] = mid[np.argmax(P[mid, 2])]
        else:
            d2 = (P[cand, 0] - tgt[0]) ** 2 + (P[cand, 1] - tgt[1]) ** 2
            for j in np.argsort(d2)[:8]:
                if int(cand[j]) not in used:
                    lm[k] = cand[j]
                    break
        used.add(int(lm[k]))
    return lm


# ================================================================== per-vertex design frame
@dataclass(frozen=True)
class _Design:
    """Per-vertex quantities the components are designed on (V vertices)."""

    P: np.ndarray        # (V, 3) mean positions
    theta: np.ndarray    # (V,)
    y: np.ndarray        # (V,) height parameter
    xb: np.ndarray       # (V,) base-surface x (frontal design x)
    jaw: np.ndarray      # (V,) signed distance to the jaw line
    normals: np.ndarray  # (V, 3) smoothed outward normals of the mean
    front: np.ndarray    # (V,) 1 on the face side, 0 from the ears backward
    region: np.ndarray   # (V,) bool face region
    row: np.ndarray      # (V,) grid row of each vertex
    seam_row: int        # row along the mouth line
    lid_row: int         # row along the closed-lid line

    @property
    def ax(self) -> np.ndarray:
        return np.abs(self.xb)

    @property
    def u(self) -> np.ndarray:
        """Arc coordinate around the head (mm)."""
        return self.theta * R_ARC

    def lip_side(self) -> np.ndarray:
        """(V,) -1 below the lip seam row, 0 on it, +1 above (meaningful at the mouth)."""
        return np.sign(self.row - self.seam_row).astype(np.float64)


def _design(grid: _Grid, triangles: np.ndarray) -> _Design:
    R, C = grid.shape
    P = grid.surface.points.reshape(-1, 3)
    n = vertex_normals(P, triangles).reshape(R, C, 3)
    from scipy.ndimage import gaussian_filter  # only when the model is built

    n = gaussian_filter(n, sigma=(3.0, 3.0, 0.0), mode="nearest")
    n = n.reshape(-1, 3)
    n /= np.linalg.norm(n, axis=1, keepdims=True)
    theta = grid.theta.reshape(-1)
    y = grid.y.reshape(-1)
    jaw = grid.surface.jaw.reshape(-1)
    front = _smoothstep(np.radians(100.0), np.radians(75.0), np.abs(theta))
    region = (jaw > 3.0) & (y < 74.0) & (np.abs(theta) < np.radians(78.0))
    row = np.repeat(np.arange(R), C)
    return _Design(P, theta, y, grid.surface.xb.reshape(-1), jaw, n, front, region, row,
                   grid.seam_row, grid.lid_row)


# ================================================================== identity
def _tilt_upper_head(d: _Design) -> np.ndarray:
    """Displacement tilting the skull above the brows backward (a sloping forehead) about
    a transverse axis at brow height; a rigid rotation above, fading below the brows."""
    y0 = BROW_Y - 5.0
    dy, dz = d.P[:, 1] - y0, d.P[:, 2]
    a = np.radians(1.0)
    w = _smoothstep(y0 - 5.0, y0 + 35.0, d.P[:, 1])
    out = np.zeros_like(d.P)
    out[:, 1] = (np.cos(a) * dy + np.sin(a) * dz - dy) * w
    out[:, 2] = (-np.sin(a) * dy + np.cos(a) * dz - dz) * w
    return out


def _named_identity(d: _Design) -> list[tuple[np.ndarray, float]]:
    """(displacement field (V, 3), magnitude) of each named identity mode.

    Only the shape of each field matters; the magnitude (its largest per-vertex
    displacement in mm at one standard deviation) is :data:`_IDENTITY_PEAK_MM`.
    """
    x, y, z = d.P[:, 0], d.P[:, 1], d.P[:, 2]
    ax, n, fr = d.ax, d.normals, d.front
    sx = np.tanh(x / 4.0)                          # smooth sign: no tear at x = 0
    zero = np.zeros_like(x)
    lower = _smoothstep(-25.0, -105.0, y)          # lower face (and what hangs below it)
    jaw_zone = _smoothstep(-35.0, -70.0, y) * _smoothstep(-140.0, -95.0, y)
    mouth_w = _gauss(ax, y, 12.0, MOUTH_Y, 20.0, 10.0) * fr
    nose_w = _gauss(x, y, 0.0, -6.0, 12.0, 17.0) * fr
    eye_w = _gauss(ax, y, EYE_X, EYE_Y + 2.0, 13.0, 10.0) * fr
    ear_w = _gauss(np.degrees(np.abs(d.theta)), y, 100.0, 2.0, 12.0, 30.0)
    lips_fwd = _gauss(ax, y, 0.0, MOUTH_Y, 18.0, 7.0) * fr
    lips_open = (_band(y, _upper_lip_border(ax), 2.5) - _band(y, _lower_lip_border(ax), 3.0)
                 ) * _smoothstep(MOUTH_HALF + 4.0, MOUTH_HALF - 8.0, ax) * fr

    def vec(dx, dy, dz):
        return np.stack([dx + zero, dy + zero, dz + zero], axis=1)

    def along_normal(w):
        return n * w[:, None]

    fields = {
        "face_width": vec(x, 0, 0),
        "lower_face_length": vec(0, -lower, 0),
        "face_depth": vec(0, 0, z * _smoothstep(0.0, 60.0, z)),
        "jaw_width": vec(x * jaw_zone, 0, 0),
        "forehead_slope": _tilt_upper_head(d),
        "forehead_height": vec(0, _smoothstep(25.0, 95.0, y), 0),
        "cheek_fullness": along_normal(_gauss(ax, y, 40.0, -32.0, 15.0, 15.0) * fr),
        "cheekbones": along_normal(_gauss(ax, y, 50.0, -2.0, 12.0, 10.0) * fr),
        "nose_length": vec(0, -nose_w * _smoothstep(NASION_Y, TIP_Y, y), 0),
        "nose_width": vec(x * nose_w * _smoothstep(8.0, -18.0, y), 0, 0),
        "nose_bridge": vec(0, 0, _gauss(x, y, 0.0, 4.0, 7.0, 11.0) * fr),
        "nose_projection": vec(0, 0, _gauss(x, y, 0.0, TIP_Y, 9.0, 7.0) * fr),
        "nose_tip_up": vec(0, _gauss(x, y, 0.0, TIP_Y - 2.0, 8.0, 5.0) * fr, 0),
        "eye_spacing": vec(sx * eye_w, 0, 0),
        "eye_depth": vec(0, 0, -eye_w),
        "eye_height": vec(0, _gauss(ax, y, EYE_X, EYE_Y + 8.0, 20.0, 14.0) * fr, 0),
        "brow_ridge": vec(0, 0, _gauss(ax, y, 24.0, BROW_Y, 22.0, 5.0) * fr),
        "lip_thickness": vec(0, 0.55 * lips_open, lips_fwd),
        "mouth_width": vec(x * mouth_w, 0, 0),
        "mouth_height": vec(0, -_smoothstep(-32.0, -50.0, y) * _smoothstep(-85.0, -62.0, y)
                            * _smoothstep(40.0, 25.0, ax), 0),
        "chin_projection": vec(0, 0, _gauss(x, y, 0.0, CHIN_Y, 16.0, 10.0) * fr),
        "chin_width": vec(x * _gauss(x, y, 0.0, CHIN_Y - 4.0, 22.0, 10.0), 0, 0),
        "head_size": d.P.copy(),
        "ear_protrusion": vec(sx * ear_w, 0, 0),
        "nose_deviation": vec(nose_w * _smoothstep(NASION_Y, TIP_Y, y), 0, 0),
        "temple_hollow": along_normal(-_gauss(ax, y, 58.0, 30.0, 10.0, 14.0) * fr),
    }
    return [(fields[k], _IDENTITY_PEAK_MM[k]) for k in _NAMED_IDENTITY]


def _random_fields(d: _Design, count: int, rng: np.random.Generator
                   ) -> list[tuple[np.ndarray, float]]:
    """Smooth random displacement fields: the leading principal components of a pool of
    Gaussian-RBF sums on the (arc, height) domain (a Karhunen-Loeve basis of a smooth
    random process on the surface), mostly along the smoothed normal.

    Returns ``count`` (displacement, magnitude) pairs with decreasing magnitude (mm).
    """
    y = d.y
    # the arc coordinate is constant along a column: evaluate its Gaussian factor per column
    cols, col_of = np.unique(d.u, return_inverse=True)
    pool = 3 * count
    M = np.empty((3 * y.size, pool))
    for k in range(pool):
        scale = rng.uniform(20.0, 45.0)
        nc = 16
        cu = rng.uniform(-180.0, 180.0, nc)
        cy = rng.uniform(-140.0, 115.0, nc)
        w = rng.standard_normal((nc, 3)) * np.array([0.3, 0.3, 1.0])
        gu = np.exp(-0.5 * ((cols[:, None] - cu) / scale) ** 2)[col_of]
        phi = gu * np.exp(-0.5 * ((y[:, None] - cy) / scale) ** 2)
        f = phi @ w                                           # (V, 3): tx, ty, normal
        disp = f[:, 2:3] * d.normals
        disp[:, :2] += f[:, :2]
        M[:, k] = disp.reshape(-1)
    evals, evecs = np.linalg.eigh(M.T @ M)
    top = np.argsort(evals)[::-1][:count]
    sv = np.sqrt(np.maximum(evals[top], 0.0))
    modes = M @ (evecs[:, top] / np.maximum(sv, 1e-12))       # orthonormal columns
    out = []
    for k in range(count):
        out.append((modes[:, k].reshape(-1, 3), 2.0 * float(sv[k] / sv[0]) ** 0.6))
    return out


def _orthogonal_modes(modes: list[tuple[np.ndarray, float]], names: tuple[str, ...]
                      ) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Orthogonalise displacement modes (QR, largest designed magnitude first).

    Each input mode is scaled so its largest per-vertex displacement equals its designed
    magnitude. Returns the basis (V, 3, K), each mode scaled so its largest per-vertex
    displacement is 1 mm; the stds (K,): the largest displacement (mm) of each
    orthogonalised mode at one standard deviation; and the names; sorted by decreasing std.
    """
    order = sorted(range(len(modes)), key=lambda k: -modes[k][1])
    V = modes[0][0].shape[0]
    M = np.empty((3 * V, len(modes)))
    for col, k in enumerate(order):
        disp, mag = modes[k]
        peak = float(np.max(np.linalg.norm(disp, axis=1)))
        M[:, col] = disp.reshape(-1) * (mag / peak)
    # thin QR through the Cholesky factor of the Gram matrix (Rm = L^T, Q = M Rm^-1):
    # the same orthogonalisation as Gram-Schmidt, fast for a tall matrix of few columns
    L = np.linalg.cholesky(M.T @ M)
    Rm = L.T
    Q = np.linalg.solve(L, M.T).T
    stds, basis = [], []
    for col in range(Q.shape[1]):
        q = Q[:, col].reshape(V, 3)
        peak = float(np.max(np.linalg.norm(q, axis=1)))
        basis.append(q / peak)
        stds.append(abs(Rm[col, col]) * peak)
    stds = np.asarray(stds)
    final = np.argsort(-stds, kind="stable")
    B = np.stack([basis[i] for i in final], axis=2)
    return B, stds[final], tuple(names[order[i]] for i in final)


# ================================================================== expressions
def _jaw_rotation(d: _Design, angle_deg: float) -> np.ndarray:
    """Displacement rotating points about the temporomandibular axis (x axis through
    y = 3, z = 8), opening the mouth for positive angles."""
    a = np.radians(angle_deg)
    y0, z0 = 3.0, 8.0
    dy, dz = d.P[:, 1] - y0, d.P[:, 2] - z0
    ny = y0 + np.cos(a) * dy - np.sin(a) * dz
    nz = z0 + np.sin(a) * dy + np.cos(a) * dz
    out = np.zeros_like(d.P)
    out[:, 1] = ny - d.P[:, 1]
    out[:, 2] = nz - d.P[:, 2]
    return out


def _lower_jaw_weight(d: _Design, split: bool = True) -> np.ndarray:
    """1 on the parts that move with the mandible (lower lip, chin, jaw), 0 above, with
    smooth fades; ``split``: the lips part along the lip seam (else the lips stretch)."""
    ax, y = d.ax, d.y
    ym = _mouth_line(ax)
    if split:
        lips = 0.5 - 0.5 * d.lip_side()                       # split at the lip seam
    else:
        lips = _smoothstep(ym + 6.0, ym - 6.0, y)
    cheek = _smoothstep(MOUTH_Y + 12.0, MOUTH_Y - 22.0, y)    # cheeks stretch gradually
    # the split fades toward the mouth corners, which stay closed
    near_mouth = _smoothstep(MOUTH_HALF + 4.0, MOUTH_HALF - 7.0, ax)
    w = near_mouth * lips + (1.0 - near_mouth) * cheek
    w *= _smoothstep(np.radians(100.0), np.radians(70.0), np.abs(d.theta))
    neck = _smoothstep(-40.0, 8.0, d.jaw)                    # skin under the jaw stretches
    return w * neck


def _mouth_cavity(d: _Design) -> np.ndarray:
    """Bump along the mouth line (0..1) used to push the lip contact inward when the lips
    part, so the parted lips show a recess rather than a flat sheet."""
    on_seam = np.select([d.row == d.seam_row, np.abs(d.row - d.seam_row) == 1], [1.0, 0.25],
                        0.0)
    return on_seam * _smoothstep(MOUTH_HALF - 1.0, MOUTH_HALF - 10.0, d.ax) * d.front


def _expressions(d: _Design) -> np.ndarray:
    """(V, 3, Ke) expression displacements at alpha = 1 (mm)."""
    x, y = d.P[:, 0], d.P[:, 1]
    ax, fr = d.ax, d.front
    n = d.normals
    zero = np.zeros_like(x)
    ym = _mouth_line(ax)
    side = d.lip_side()
    upper_lip = (0.5 + 0.5 * side) * _gauss(ax, y, 0.0, ym + 5.0, 20.0, 7.0)
    lower_lip = (0.5 - 0.5 * side) * _gauss(ax, y, 0.0, ym - 6.0, 20.0, 8.0)
    lips = _gauss(ax, y, 0.0, MOUTH_Y, 24.0, 11.0) * fr
    cavity = _mouth_cavity(d)
    jaw_w = _lower_jaw_weight(d)
    jaw_soft = _lower_jaw_weight(d, split=False)
    # weights without a jump at the seam, for modes that keep the lips together
    lips_soft = _gauss(ax, y, 0.0, ym, 20.0, 7.0) * fr
    upper_soft = _smoothstep(ym - 4.0, ym + 4.0, y) * _gauss(ax, y, 0.0, ym + 5.0, 20.0, 7.0)
    borders = (_band(y, _upper_lip_border(ax), 2.5) - _band(y, _lower_lip_border(ax), 3.0)) * fr

    def vec(dx, dy, dz):
        return np.stack([dx + zero, dy + zero, dz + zero], axis=1)

    def corner(side: float) -> np.ndarray:
        return _gauss(x, y, side * MOUTH_HALF, MOUTH_Y, 11.0, 9.0) * fr

    def smile(side: float) -> np.ndarray:
        c = corner(side)
        cheek = _gauss(x, y, side * 38.0, -22.0, 13.0, 12.0) * fr
        lid = _gauss(x, y, side * EYE_X, EYE_Y - 5.0, 9.0, 4.0) * fr
        return (vec(side * 4.0 * c, 6.0 * c + 2.5 * cheek + 1.2 * lid, -2.5 * c)
                + 1.5 * cheek[:, None] * n)

    def eye_close(side: float) -> np.ndarray:
        lid = _gauss(x, y, side * EYE_X, EYE_Y, 9.0, 5.0) * fr
        below = _gauss(x, y, side * EYE_X, EYE_Y - 7.0, 11.0, 4.0) * fr
        above = _gauss(x, y, side * (EYE_X + 4.0), BROW_Y - 2.0, 14.0, 6.0) * fr
        cheek = _gauss(x, y, side * 40.0, -8.0, 12.0, 9.0) * fr
        return (vec(0.0, 2.2 * below - 1.8 * above + 1.2 * cheek, -1.6 * lid)
                + 0.8 * cheek[:, None] * n)

    jaw_open = _jaw_rotation(d, 5.0) * jaw_w[:, None] + vec(0, 0, -9.0 * cavity)
    brow_band = _smoothstep(EYE_Y + 4.0, BROW_Y - 2.0, y) * _smoothstep(80.0, BROW_Y + 4.0, y)
    brow_span = _smoothstep(60.0, 45.0, ax) * fr
    inner = _gauss(ax, y, 12.0, BROW_Y, 14.0, 12.0) * fr
    exps = {
        "jaw_open": jaw_open,
        "smile_left": smile(1.0),
        "smile_right": smile(-1.0),
        "mouth_frown": vec(1.0 * np.tanh(x / 4.0) * (corner(1) + corner(-1)),
                           -3.5 * (corner(1) + corner(-1))
                           + 1.2 * _gauss(ax, y, 0.0, CHIN_Y + 8.0, 16.0, 8.0) * fr,
                           -0.8 * (corner(1) + corner(-1))),
        "lip_pucker": vec(-0.32 * x * lips, 0.0, 7.0 * lips * _smoothstep(34.0, 10.0, ax)),
        "lip_funnel": (vec(-0.12 * x * lips, 2.5 * upper_lip - 3.5 * lower_lip,
                           4.5 * lips * _smoothstep(34.0, 10.0, ax) - 6.0 * cavity)),
        "lip_press": vec(0.0, -0.8 * borders + 1.5 * _gauss(ax, y, 0.0, CHIN_Y, 15.0, 10.0) * fr,
                         -2.8 * lips_soft),
        "upper_lip_up": vec(0.0, 4.0 * upper_lip * _smoothstep(28.0, 8.0, ax)
                            + 1.2 * _gauss(ax, y, 14.0, -27.0, 8.0, 5.0) * fr,
                            0.8 * upper_lip - 5.0 * cavity * _smoothstep(24.0, 6.0, ax)),
        "lower_lip_down": vec(0.0, -4.5 * lower_lip * _smoothstep(28.0, 8.0, ax),
                              0.8 * lower_lip - 5.0 * cavity * _smoothstep(24.0, 6.0, ax)),
        "mouth_left": vec(5.0 * _gauss(ax, y, 0.0, MOUTH_Y, 26.0, 13.0) * fr, 0.0, 0.0),
        "mouth_right": vec(-5.0 * _gauss(ax, y, 0.0, MOUTH_Y, 26.0, 13.0) * fr, 0.0, 0.0),
        "cheek_puff": (6.0 * (_gauss(ax, y, 38.0, -42.0, 14.0, 15.0) * fr)[:, None] * n
                       + vec(0, 0, 1.5 * lips)),
        "nose_wrinkle": vec(0.0, 3.5 * _gauss(ax, y, 12.0, -18.0, 9.0, 10.0) * fr
                            + 2.0 * upper_soft - 2.5 * inner,
                            -1.2 * _gauss(ax, y, 0.0, 2.0, 8.0, 10.0) * fr),
        "brow_raise": vec(0.0, 5.0 * brow_band * brow_span, 0.6 * brow_band * brow_span),
        "brow_inner_raise": vec(0.0, 4.0 * inner * brow_band, 0.0),
        "brow_lower": vec(-2.0 * np.tanh(x / 6.0) * inner, -3.5 * brow_band * brow_span,
                          1.2 * _gauss(ax, y, 0.0, BROW_Y, 10.0, 8.0) * fr),
        "eye_close_left": eye_close(1.0),
        "eye_close_right": eye_close(-1.0),
        "jaw_left": vec(4.0 * jaw_soft, 0.0, 0.0),
        "jaw_forward": vec(0.0, 0.0, 4.0 * jaw_soft),
    }
    return np.stack([exps[k] for k in EXPRESSION_NAMES], axis=2)


# ================================================================== albedo
SKIN_LINEAR = np.array([0.47, 0.30, 0.22])     # mid skin tone, linear RGB
HAIR_LINEAR = np.array([0.045, 0.031, 0.022])  # dark brown short hair, linear RGB
LIP_LINEAR = np.array([0.42, 0.17, 0.15])      # lip vermilion, linear RGB

_N_BLOTCHES = 5
#: names of the albedo components, in order
ALBEDO_NAMES = ("skin_tone", "redness", "yellowness", "lip_colour", "brow_darkness",
                "cheek_flush", "hair_colour", "periorbital") + tuple(
    f"blotch_{k}" for k in range(_N_BLOTCHES))

# hairline by |theta| (degrees): forehead, temples, sideburn in front of the ear, above
# the ear, down to the nape
_HAIR_DEG = np.array([0, 25, 45, 60, 72, 80, 84, 88, 93, 108, 116, 125, 140], float)
_HAIR_Y = np.array([79, 80, 80, 74, 61, 40, 14, 16, 36, 34, 5, -30, -40], float)


def _hair_mask(theta: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(V,) 0..1: short scalp hair above the hairline, with a soft edge measured
    perpendicular to the hairline in the (arc, height) plane."""
    d = _curve_distance(np.degrees(np.abs(theta)) * (np.pi / 180.0 * 75.0), y,
                        _HAIR_DEG * (np.pi / 180.0 * 75.0), _HAIR_Y)
    return _smoothstep(-2.5, 3.0, d)


def _albedo(d: _Design, rng: np.random.Generator
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The albedo model in linear RGB, components in the order of :data:`ALBEDO_NAMES`.

    Returns:
        albedo_mean (V, 3); albedo_basis (V, 3, Ka), each component scaled to unit RMS over
        the face region; albedo_std (Ka,): each component's RMS change over the face region
        at one standard deviation.
    """
    x, y = d.P[:, 0], d.P[:, 1]
    ax, fr = d.ax, d.front
    up_b, lo_b = _upper_lip_border(ax), _lower_lip_border(ax)
    # vermilion mask: between the lip borders, soft edges, fading at the corners
    lip = (_smoothstep(up_b + 1.6, up_b - 1.6, y) * _smoothstep(lo_b - 1.8, lo_b + 1.8, y)
           * _smoothstep(MOUTH_HALF + 0.5, MOUTH_HALF - 3.0, ax) * fr)
    brow_c = _brow_line(ax)
    brow_half = 2.7 - 1.4 * _smoothstep(20.0, 52.0, ax)     # thick medially, thin laterally
    brow = (_smoothstep(brow_half + 2.2, brow_half - 1.6, np.abs(y - brow_c))
            * _smoothstep(53.0, 45.0, ax) * _smoothstep(12.0, 18.0, ax) * fr)
    eye_span = (_smoothstep(EYE_X + 14.5, EYE_X + 11.0, ax)
                * _smoothstep(EYE_X - 14.5, EYE_X - 11.0, ax) * fr)
    lash = np.select([d.row == d.lid_row, d.row == d.lid_row - 1], [1.0, 0.45], 0.0) * eye_span
    seam = np.select([d.row == d.seam_row, np.abs(d.row - d.seam_row) == 1], [1.0, 0.55], 0.0)
    seam *= _smoothstep(MOUTH_HALF + 1.0, MOUTH_HALF - 3.0, ax) * fr
    lidshade = _gauss(ax, y, EYE_X, EYE_Y + 3.5, 11.0, 5.0) * fr
    nostril = _gauss(ax, y, 6.5, -29.3, 2.6, 1.3) * fr
    cheeks = _gauss(ax, y, 40.0, -18.0, 18.0, 16.0) * fr
    nose = _gauss(x, y, 0.0, -20.0, 10.0, 9.0) * fr
    ears = _gauss(np.degrees(np.abs(d.theta)), y, 100.0, 2.0, 12.0, 30.0)
    hair = _hair_mask(d.theta, y)

    def paint(base: np.ndarray, weight: np.ndarray, rgb) -> np.ndarray:
        w = np.clip(weight, 0.0, 1.0)[:, None]
        return base * (1.0 - w) + np.asarray(rgb, float) * w

    skin = np.tile(SKIN_LINEAR, (x.size, 1))
    red = np.array([1.0, 0.86, 0.86])
    mean = skin * (1.0 + (red - 1.0) * (0.45 * cheeks + 0.5 * nose + 0.5 * ears)[:, None])
    mean = mean * (1.0 - 0.12 * lidshade[:, None] * np.array([1.0, 1.1, 1.0]))
    mean = paint(mean, lip, LIP_LINEAR)
    mean = paint(mean, 0.7 * brow, [0.09, 0.06, 0.045])
    mean = paint(mean, 0.85 * lash, [0.03, 0.025, 0.02])
    mean = paint(mean, 0.9 * seam, [0.05, 0.02, 0.02])
    mean = paint(mean, 0.85 * nostril, [0.06, 0.03, 0.025])
    mean = paint(mean, 0.92 * hair, HAIR_LINEAR)

    # each component: the change (V, 3) at one standard deviation, relative to the local
    # colour so that dark features (brows, lashes, hair) stay dark and non-negative
    comps = [
        # skin tone: darker is more saturated (blue falls fastest)
        -mean * np.array([0.225, 0.265, 0.29]),
        mean * np.array([0.05, -0.04, -0.02]),                           # redness
        mean * np.array([0.025, 0.02, -0.06]),                           # yellowness
        0.22 * lip[:, None] * mean * (LIP_LINEAR / SKIN_LINEAR - 1.0),   # lip colour
        -0.2 * brow[:, None] * mean,                                     # brow darkness
        (cheeks + 0.6 * nose)[:, None] * mean * np.array([0.06, -0.05, -0.035]),  # flush
        hair[:, None] * mean * np.array([0.26, 0.23, 0.20]),             # hair colour
        -(_gauss(ax, y, EYE_X, EYE_Y - 2.0, 13.0, 8.0) * fr)[:, None] * mean
        * np.array([0.10, 0.12, 0.08]),                                  # periorbital
    ]
    # low-frequency blotches (brightness and hue), decreasing magnitude
    u = d.u
    for k in range(_N_BLOTCHES):
        nc = 10
        cu = rng.uniform(-170.0, 170.0, nc)
        cy = rng.uniform(-135.0, 110.0, nc)
        scale = 40.0 - 5.0 * k
        phi = np.exp(-0.5 * ((u[:, None] - cu) ** 2 + (y[:, None] - cy) ** 2) / scale**2)
        f = phi @ rng.standard_normal(nc)
        f /= max(np.abs(f).max(), 1e-9)
        tint = np.array([0.05, 0.06, 0.05]) + np.array([0.015, -0.01, -0.02]) * (k % 2)
        comps.append(f[:, None] * mean * tint * 0.85**k)

    basis, std = [], []
    for disp in comps:
        rms = float(np.sqrt(np.mean(np.sum(disp[d.region] ** 2, axis=1))))
        basis.append(disp / rms)
        std.append(rms)
    return mean, np.stack(basis, axis=2), np.asarray(std)


# ================================================================== assembly
def build_builtin_model() -> MorphableModel:
    """Build the procedural model from scratch (no caching); deterministic."""
    grid = _make_grid()
    R, C = grid.shape
    triangles = _grid_triangles(R, C)
    d = _design(grid, triangles)
    landmarks = _landmarks(d.P, d.theta, d.jaw)

    rng = np.random.default_rng(_SEED_IDENTITY)
    modes = _named_identity(d) + _random_fields(d, _N_RANDOM_IDENTITY, rng)
    id_basis, id_std, id_names = _orthogonal_modes(modes, IDENTITY_NAMES)
    exp_basis = _expressions(d)
    alb_mean, alb_basis, alb_std = _albedo(d, np.random.default_rng(_SEED_ALBEDO))
    return MorphableModel(
        mean=d.P, id_basis=id_basis, id_std=id_std,
        exp_basis=exp_basis, exp_std=np.ones(exp_basis.shape[2]),
        triangles=triangles, landmarks68=landmarks,
        name=NAME, license=LICENSE, source=SOURCE,
        albedo_mean=alb_mean, albedo_basis=alb_basis, albedo_std=alb_std,
        face_region=d.region, exp_names=EXPRESSION_NAMES, id_names=id_names,
        exp_lower=np.array([0.0 if n in ONE_SIDED_EXPRESSIONS else -np.inf
                            for n in EXPRESSION_NAMES]),
    )


def _version_hash() -> str:
    from faceps import __version__

    h = hashlib.sha256()
    h.update(f"{BUILTIN_VERSION}|{__version__}".encode())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()[:12]


def builtin_cache_path() -> Path:
    """Where :func:`builtin_model` caches the model: ``$XDG_CACHE_HOME/faceps`` or
    ``~/.cache/faceps``, named after the model version and this module's source."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "faceps" / f"builtin-{_version_hash()}.npz"


_LOCK = threading.Lock()
_MODEL: MorphableModel | None = None


def builtin_model() -> MorphableModel:
    """The built-in model, memoised in-process and cached on disk.

    A cache file that cannot be read is rebuilt and rewritten (atomically); a cache folder
    that cannot be written is skipped with a debug log message. Writing a new cache file
    removes the files of other versions.
    """
    global _MODEL
    with _LOCK:
        if _MODEL is not None:
            return _MODEL
        path = builtin_cache_path()
        model = None
        if path.is_file():
            try:
                model = MorphableModel.load(path)
            except ModelError as exc:
                log.debug("rebuilding the built-in model: unreadable cache (%s)", exc)
        if model is None:
            model = build_builtin_model()
            try:
                model.save(path)
            except OSError as exc:
                log.debug("could not cache the built-in model at %s (%s)", path, exc)
            else:
                _prune_stale_caches(path)
        _MODEL = model
        return model


def _prune_stale_caches(current: Path) -> None:
    """Remove cached builds of other versions next to ``current`` (best effort)."""
    for old in current.parent.glob("builtin-*.npz"):
        if old != current:
            try:
                old.unlink()
            except OSError as exc:
                log.debug("could not remove stale cache %s (%s)", old, exc)
