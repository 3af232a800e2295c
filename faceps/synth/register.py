"""Registration of a morphable model's template to a face scan (optimal-step non-rigid ICP).

The "Light Stage" augmentation path of the method (paper section 3.3): a neutral parametric
template is registered to a face scan with non-rigid ICP, closest points on the scan serve as
correspondences, and the scan's colours (albedo) are transferred to the model topology
through those correspondences. Three steps (:func:`register_scan`):

1. **Similarity alignment** of the model's mean shape to the scan. With 68 scan landmarks:
   the Umeyama similarity from the model's landmark vertices to them. Without landmarks:
   candidate starts (model axes equal to the scan axes, or the scan in the OpenCV camera
   frame; the template's nose tip on the scan's most forward point, or centroid on
   centroid), each refined by point-to-plane ICP with scale, then again with the nose tips
   pinned together (the scan's is its most forward point near the aligned template's);
   the start with the smallest robust residual wins. Landmark-free alignment therefore
   needs a roughly frontal, upright scan, in either the model frame (x toward the
   subject's left, y up, z out of the face) or the camera frame (x right, y down, face
   toward -z), whose nose is its most forward part; give landmarks for anything else.
2. **Optimal-step NICP** (Amberg, Romdhani and Vetter, CVPR 2007). Each template vertex
   ``i`` carries an affine transform ``X_i`` (4 x 3, applied as ``[v_i, 1] X_i``). For each
   stiffness ``alpha`` of a decreasing schedule, the sparse linear least-squares problem

   ``E(X) = ||alpha (M kron G) X||^2 + ||W (D X - U)||^2 + beta^2 ||D_L X - U_L||^2``

   is solved repeatedly (closest points ``U`` recomputed each time) until the transforms
   change by less than a tolerance. ``M`` is the node-arc incidence matrix of the template
   edges, ``G = diag(1, 1, 1, gamma)``, ``D`` holds the rows ``[v_i, 1]``, ``W`` the 0/1
   weights of the accepted correspondences (closest point on the scan surface; rejected
   when too far, when the normals differ by more than a threshold, or when the closest
   point lies on the scan's border) and ``D_L``, ``U_L`` the landmark rows and targets
   (without landmarks: the nose tips of step 1 as one pseudo-landmark). The normal
   equations ``A^T A X = A^T B`` are solved with a sparse direct factorisation, which is
   reused while the accepted set changes little; the closest-point iterations are
   Anderson-accelerated with an energy safeguard (as in AA-ICP, Pavlov et al., ICRA 2018,
   and Zhang, Yao and Deng, "Fast and robust iterative closest point", TPAMI 2021),
   because plain closest-point iterations creep along the surface for dozens of
   iterations per level.
3. **Coefficient fit**: identity and expression coefficients (units of standard
   deviations) that best explain the registered template, by Tikhonov-regularised linear
   least squares alternated with a similarity alignment; the residual measures how well
   the coarse model proxy follows the scan.

Units: the registration works in millimetres. Scans come in arbitrary units; the
``scan_scale`` option of :class:`RegistrationConfig` (a factor, or ``"auto"``, see
:func:`estimate_scan_scale`) brings the scan to mm first, and every length in the result
is in that scaled scan frame.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from faceps.core.color import decode, parse_encoding
from faceps.core.errors import ConfigError, FacepsError, FitError, ShapeError, check_shape
from faceps.core.mesh import vertex_adjacency, vertex_normals
from faceps.model.morphable import MorphableModel

__all__ = [
    "ScanError",
    "Scan",
    "load_scan",
    "estimate_scan_scale",
    "Similarity",
    "umeyama",
    "RegistrationConfig",
    "Correspondences",
    "LevelStats",
    "CoefficientFit",
    "Registration",
    "closest_points",
    "fit_coefficients",
    "register_scan",
    "SCAN_SUFFIXES",
    "STANDARD_UNITS",
]

log = logging.getLogger(__name__)

#: file types :func:`load_scan` reads
SCAN_SUFFIXES = (".obj", ".ply")

#: factors from common length units to mm, tried by ``scan_scale="auto"``
STANDARD_UNITS = {"mm": 1.0, "cm": 10.0, "inch": 25.4, "m": 1000.0}

#: barycentric weights below this count as zero when testing for points on a scan border
_BARY_TOL = 1e-5

#: with landmarks, ``scan_scale="auto"`` snaps to a standard unit within this ratio
_UNIT_SNAP_RATIO = 1.3

#: template size at which ``RegistrationConfig.alphas`` apply unscaled (see its docstring)
_STIFFNESS_REFERENCE_VERTICES = 7500.0

#: largest rotation (radians) and log-scale change of one ICP step of the initial alignment
_MAX_ICP_ROTATION = 0.2
_MAX_ICP_LOG_SCALE = 0.1

#: the initial alignment gives up on a start whose scale leaves [_MIN_SCALE, 1 / _MIN_SCALE]
_MIN_SCALE = 0.25

#: camera-frame orientation of a model-frame head (DESIGN.md: a frontal face has this R)
_MODEL_TO_CAMERA = np.diag([1.0, -1.0, -1.0])


class ScanError(FacepsError):
    """A scan file is missing, unreadable, empty or malformed; the message names the file."""


# =============================================================================== scans
@dataclass(frozen=True, eq=False)
class Scan:
    """A triangulated face scan.

    Attributes
    ----------
    vertices : (N, 3) float64
        Positions, in the file's units (mm after :meth:`scaled` with the right factor).
    triangles : (M, 3) int64
        Vertex ids, counter-clockwise seen from outside (as stored in the file).
    colors : (N, 3) float64 or None
        Linear RGB in [0, 1] per vertex (decoded from the file's vertex colours or sampled
        from its texture), None when the file has no colour.
    path : str or None
        The file the scan came from.
    """

    vertices: np.ndarray
    triangles: np.ndarray
    colors: np.ndarray | None = None
    path: str | None = None

    def __post_init__(self) -> None:
        V = np.ascontiguousarray(self.vertices, dtype=np.float64)
        F = np.asarray(self.triangles)
        name = self.path or "scan"
        if V.ndim != 2 or V.shape[1] != 3:
            raise ScanError(f"{name}: vertices must have shape (N, 3); got {V.shape}")
        if F.ndim != 2 or F.shape[1] != 3:
            raise ScanError(f"{name}: triangles must have shape (M, 3); got {F.shape}")
        if V.shape[0] < 3 or F.shape[0] == 0:
            raise ScanError(f"{name}: the mesh is empty ({V.shape[0]} vertices, "
                            f"{F.shape[0]} triangles)")
        if not np.issubdtype(F.dtype, np.integer):
            raise ScanError(f"{name}: triangles must be integer vertex ids; got {F.dtype}")
        if F.min() < 0 or F.max() >= V.shape[0]:
            raise ScanError(f"{name}: triangles index vertices outside [0, {V.shape[0]})")
        if not np.all(np.isfinite(V)):
            raise ScanError(f"{name}: vertices hold NaN or infinite values")
        object.__setattr__(self, "vertices", V)
        object.__setattr__(self, "triangles", np.ascontiguousarray(F, dtype=np.int64))
        if self.colors is not None:
            C = np.ascontiguousarray(self.colors, dtype=np.float64)
            if C.shape != V.shape:
                raise ScanError(f"{name}: colors must have shape {V.shape}; got {C.shape}")
            object.__setattr__(self, "colors", C)

    @property
    def n_vertices(self) -> int:
        return self.vertices.shape[0]

    @property
    def n_triangles(self) -> int:
        return self.triangles.shape[0]

    @property
    def bbox_diagonal(self) -> float:
        """Length of the axis-aligned bounding-box diagonal (scan units)."""
        return float(np.linalg.norm(self.vertices.max(0) - self.vertices.min(0)))

    def scaled(self, factor: float) -> Scan:
        """The scan with its positions multiplied by ``factor`` (e.g. 1000 for metres)."""
        f = float(factor)
        if not (math.isfinite(f) and f > 0):
            raise ConfigError(f"scale factor must be a positive number; got {factor!r}")
        return Scan(self.vertices * f, self.triangles, self.colors, self.path)


def load_scan(path: str | os.PathLike, *, scale: float = 1.0,
              color_encoding: str = "srgb") -> Scan:
    """Read a triangulated scan from an OBJ or PLY file.

    Geometry is read with trimesh (``process=False``); polygons are triangulated, vertices
    that the file splits along texture seams are merged back (exactly equal positions) and
    unreferenced vertices dropped, so the scan is one connected surface. Colour comes from
    per-vertex colours or, for a textured mesh, from the diffuse texture (OBJ: ``map_Kd``
    of its ``.mtl``; PLY: the ``TextureFile`` header comment) sampled bilinearly at the
    vertices' UV coordinates (averaged over the seam copies of a vertex). A texture that
    cannot be found is logged and ignored.

    Parameters
    ----------
    path : str or PathLike
        ``.obj`` or ``.ply`` file.
    scale : float
        Factor applied to the positions (1000 for a scan in metres); registration can also
        estimate it (``RegistrationConfig.scan_scale="auto"``).
    color_encoding : str
        Encoding of 8/16-bit colours and textures (``srgb``, ``linear`` or ``gamma:<g>``);
        float textures are taken as linear. :attr:`Scan.colors` is always linear.

    Returns
    -------
    Scan

    Raises
    ------
    ScanError
        Missing or unreadable file, unsupported type, no triangles, non-finite positions.
    """
    import trimesh

    p = Path(path)
    if not p.is_file():
        raise ScanError(f"{p}: scan file not found")
    suffix = p.suffix.lower()
    if suffix not in SCAN_SUFFIXES:
        raise ScanError(f"{p}: unsupported scan type '{p.suffix}' (expected "
                        f"{', '.join(SCAN_SUFFIXES)})")
    parse_encoding(color_encoding)
    f = float(scale)
    if not (math.isfinite(f) and f > 0):
        raise ConfigError(f"scale must be a positive number; got {scale!r}")
    if p.stat().st_size == 0:
        raise ScanError(f"{p}: empty file")
    try:
        if suffix == ".obj":
            parts = _read_obj_parts(p)
            texture = _obj_texture(p)
        else:
            parts = [_read_ply_part(p)]
            texture = _ply_texture(p)
    except ScanError:
        raise
    except Exception as exc:  # trimesh raises many kinds of errors on malformed input
        raise ScanError(f"{p}: not a readable {suffix[1:].upper()} mesh ({exc})") from None

    verts, tris, cols, uvs = [], [], [], []
    offset = 0
    for part in parts:
        mesh = trimesh.Trimesh(part["vertices"], part["faces"], process=False)
        v = np.asarray(mesh.vertices, dtype=np.float64)
        fcs = np.asarray(mesh.faces, dtype=np.int64).reshape(-1, 3)
        verts.append(v)
        tris.append(fcs + offset)
        cols.append(_vertex_colors(part.get("vertex_colors"), v.shape[0]))
        uv = part.get("uv")
        uvs.append(None if uv is None or len(uv) != v.shape[0] else np.asarray(uv, np.float64))
        offset += v.shape[0]
    if offset == 0 or sum(t.shape[0] for t in tris) == 0:
        raise ScanError(f"{p}: the mesh is empty (no vertices or no triangles)")
    V = np.concatenate(verts)
    F = np.concatenate(tris)

    colors: np.ndarray | None = None
    if texture is not None and all(u is not None for u in uvs):
        try:
            colors = _sample_texture(texture, np.concatenate(uvs), color_encoding)
        except FacepsError as exc:
            log.warning("%s: texture not used (%s)", p, exc)
    elif texture is not None:
        log.warning("%s: texture %s named but the mesh has no UV coordinates", p, texture)
    if colors is None and all(c is not None for c in cols):
        colors = np.asarray(decode(np.concatenate(cols), color_encoding), dtype=np.float64)

    V, F, colors = _merge_vertices(V, F, colors)
    if F.shape[0] == 0:
        raise ScanError(f"{p}: the mesh has no non-degenerate triangle")
    return Scan(V * f, F, None if colors is None else np.clip(colors, 0.0, 1.0), str(p))


def _read_obj_parts(p: Path) -> list[dict]:
    """Geometry of an OBJ as a list of dicts (vertices, faces, optional uv, vertex_colors).

    Materials are skipped here (trimesh would need an imaging library for them); the
    texture is located by :func:`_obj_texture`.
    """
    from trimesh.exchange.obj import load_obj

    with open(p, "rb") as fh:
        loaded = load_obj(fh, skip_materials=True, group_material=False)
    parts = []
    for kw in loaded.get("geometry", {}).values():
        part = {"vertices": np.asarray(kw.get("vertices", np.zeros((0, 3))), np.float64),
                "faces": np.asarray(kw.get("faces", np.zeros((0, 3))), np.int64)}
        if part["faces"].ndim != 2 or part["faces"].shape[0] == 0:
            continue
        visual = kw.get("visual")
        uv = getattr(visual, "uv", None)
        if uv is not None:
            part["uv"] = np.asarray(uv, np.float64)
        if kw.get("vertex_colors") is not None:
            part["vertex_colors"] = kw["vertex_colors"]
        parts.append(part)
    return parts


def _read_ply_part(p: Path) -> dict:
    """Geometry of a PLY (vertices, faces, optional uv, vertex_colors)."""
    from trimesh.exchange.ply import load_ply

    with open(p, "rb") as fh:
        kw = load_ply(fh, resolver=None)
    faces = kw.get("faces")
    if faces is None or len(faces) == 0:
        raise ScanError(f"{p}: the mesh has no triangles (a point cloud is not a scan)")
    part = {"vertices": np.asarray(kw["vertices"], np.float64),
            "faces": np.asarray(faces, np.int64)}
    visual = kw.get("visual")
    uv = getattr(visual, "uv", None)
    if uv is not None:
        part["uv"] = np.asarray(uv, np.float64)
    vc = kw.get("vertex_colors")
    if vc is None and visual is not None and getattr(visual, "kind", None) == "vertex":
        vc = visual.vertex_colors
    if vc is not None:
        part["vertex_colors"] = vc
    return part


def _vertex_colors(vc, n: int) -> np.ndarray | None:
    """Per-vertex colour code values (n, 3) in [0, 1] from trimesh's colour array."""
    if vc is None:
        return None
    c = np.asarray(vc)
    if c.ndim != 2 or c.shape[0] != n or c.shape[1] < 3:
        return None
    c = c[:, :3]
    if c.dtype.kind in "iu":
        return c.astype(np.float64) / 255.0
    return np.clip(c.astype(np.float64), 0.0, 1.0)


def _resolve_relative(base: Path, text: str) -> Path | None:
    """The existing file named by the tail of ``text`` (options may precede the name)."""
    tokens = text.split()
    for i in range(len(tokens)):
        name = " ".join(tokens[i:]).strip().strip('"')
        if not name:
            continue
        cand = (base / name.replace("\\", "/"))
        if cand.is_file():
            return cand
    return None


def _obj_texture(p: Path) -> Path | None:
    """The diffuse texture (``map_Kd``) of an OBJ's material library, None without one."""
    libs = []
    with open(p, "rb") as fh:
        for raw in fh:
            if raw.startswith(b"mtllib"):
                libs.append(raw[6:].decode("utf-8", "replace").strip())
    maps: list[Path] = []
    for lib in libs:
        mtl = _resolve_relative(p.parent, lib)
        if mtl is None:
            log.info("%s: material library '%s' not found; no texture", p, lib)
            continue
        with open(mtl, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                s = line.strip()
                if s.lower().startswith("map_kd"):
                    tex = _resolve_relative(mtl.parent, s[6:])
                    if tex is None:
                        log.warning("%s: texture '%s' named in %s not found", p, s[6:].strip(),
                                    mtl.name)
                    elif tex not in maps:
                        maps.append(tex)
    if len(maps) > 1:
        log.warning("%s: %d diffuse textures; sampling only %s", p, len(maps), maps[0].name)
    return maps[0] if maps else None


def _ply_texture(p: Path) -> Path | None:
    """The texture named by a PLY header's ``comment TextureFile`` line, if it exists."""
    with open(p, "rb") as fh:
        for _ in range(200):
            raw = fh.readline()
            if not raw or raw.strip() == b"end_header":
                break
            s = raw.decode("ascii", "replace").strip()
            if s.lower().startswith("comment texturefile"):
                tex = _resolve_relative(p.parent, s[len("comment texturefile"):])
                if tex is None:
                    log.warning("%s: texture '%s' not found", p, s[19:].strip())
                return tex
    return None


def _sample_texture(texture: Path, uv: np.ndarray, color_encoding: str) -> np.ndarray:
    """Bilinear, wrapping samples (n, 3) linear RGB of an image at OBJ-convention UVs."""
    from scipy.ndimage import map_coordinates

    from faceps.core.imageio import read_image

    img, depth = read_image(texture)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if depth != "float":
        img = decode(img, color_encoding)
    H, W = img.shape[:2]
    uv = np.nan_to_num(np.asarray(uv, np.float64))
    rows = (1.0 - uv[:, 1]) * H - 0.5
    cols = uv[:, 0] * W - 0.5
    return np.stack([map_coordinates(img[..., c].astype(np.float64), [rows, cols], order=1,
                                     mode="grid-wrap") for c in range(3)], axis=1)


def _merge_vertices(V: np.ndarray, F: np.ndarray, colors: np.ndarray | None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Merge exactly equal positions (colours averaged), drop degenerate index triples and
    unreferenced vertices; keeps the order of first occurrence."""
    _, first, inverse = np.unique(V, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(first)
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    new_id = rank[inverse]
    Vm = V[first[order]]
    Fm = new_id[F]
    ok = (Fm[:, 0] != Fm[:, 1]) & (Fm[:, 1] != Fm[:, 2]) & (Fm[:, 0] != Fm[:, 2])
    Fm = Fm[ok]
    Cm = None
    if colors is not None:
        cnt = np.bincount(new_id, minlength=Vm.shape[0]).astype(np.float64)
        Cm = np.stack([np.bincount(new_id, colors[:, c], minlength=Vm.shape[0])
                       for c in range(3)], axis=1) / np.maximum(cnt, 1.0)[:, None]
    used = np.zeros(Vm.shape[0], bool)
    used[Fm.reshape(-1)] = True
    if not used.all():
        remap = -np.ones(Vm.shape[0], np.int64)
        remap[used] = np.arange(int(used.sum()))
        Vm, Fm = Vm[used], remap[Fm]
        Cm = None if Cm is None else Cm[used]
    return Vm, Fm, Cm


def estimate_scan_scale(scan: Scan, model: MorphableModel,
                        scan_landmarks: np.ndarray | None = None) -> float:
    """Factor that converts the scan's units to mm.

    With landmarks (at least 4 usable): the ratio of the RMS spread of the model's
    landmark vertices to that of the scan landmarks, snapped to a standard unit
    (:data:`STANDARD_UNITS`) when it is within a factor 1.3 of one, so a scan in a real
    unit keeps its true size (faces differ in size by less than that). Without
    landmarks: the standard unit that brings the scan's bounding-box diagonal closest (in
    ratio) to the model mean's, which tolerates scans of only the face or of head and
    shoulders because the units are at least 2.5x apart.

    Parameters
    ----------
    scan : Scan
    model : MorphableModel
        The mean shape (mm) is the size reference.
    scan_landmarks : (68, 3) array or None
        iBUG-68 points on the scan (scan units); NaN rows are missing points.

    Returns
    -------
    float
        Positive factor; multiply the scan's positions by it.
    """
    mean = model.geometry()
    if scan_landmarks is not None:
        L = np.asarray(scan_landmarks, dtype=np.float64)
        check_shape(L, "scan_landmarks", (68, 3))
        ok = (model.landmarks68 >= 0) & np.all(np.isfinite(L), axis=1)
        if ok.sum() >= 4:
            M = mean[model.landmarks68[ok]]
            spread_model = float(np.sqrt(np.mean(np.sum((M - M.mean(0)) ** 2, axis=1))))
            spread_scan = float(np.sqrt(np.mean(np.sum((L[ok] - L[ok].mean(0)) ** 2, axis=1))))
            if spread_scan > 0 and spread_model > 0:
                ratio = spread_model / spread_scan
                unit = min(STANDARD_UNITS.values(), key=lambda u: abs(math.log(ratio / u)))
                return unit if abs(math.log(ratio / unit)) < math.log(_UNIT_SNAP_RATIO) \
                    else ratio
    ref = float(np.linalg.norm(mean.max(0) - mean.min(0)))
    diag = scan.bbox_diagonal
    if diag <= 0:
        raise ScanError(f"{scan.path or 'scan'}: all vertices coincide; cannot estimate units")
    return min(STANDARD_UNITS.values(), key=lambda u: abs(math.log(u * diag / ref)))


# ============================================================================ geometry
@dataclass(frozen=True)
class Similarity:
    """``x -> scale * R @ x + t`` (applied to row vectors as ``scale * x @ R.T + t``).

    Attributes
    ----------
    scale : float
        Isotropic scale (dimensionless).
    rotation : (3, 3) float64
        Proper rotation.
    translation : (3,) float64
        Translation in mm of the target frame.
    """

    scale: float
    rotation: np.ndarray
    translation: np.ndarray

    @classmethod
    def identity(cls) -> Similarity:
        return cls(1.0, np.eye(3), np.zeros(3))

    def apply(self, points: np.ndarray) -> np.ndarray:
        """Transform (N, 3) points."""
        return self.scale * np.asarray(points, np.float64) @ self.rotation.T + self.translation

    def apply_vectors(self, vectors: np.ndarray) -> np.ndarray:
        """Rotate (N, 3) directions (normals); the scale is not applied."""
        return np.asarray(vectors, np.float64) @ self.rotation.T

    def inverse(self) -> Similarity:
        Rt = self.rotation.T
        return Similarity(1.0 / self.scale, Rt, -(Rt @ self.translation) / self.scale)

    def compose(self, inner: Similarity) -> Similarity:
        """``self(inner(x))``."""
        return Similarity(self.scale * inner.scale, self.rotation @ inner.rotation,
                          self.scale * self.rotation @ inner.translation + self.translation)

    @property
    def matrix(self) -> np.ndarray:
        """(4, 4) homogeneous matrix."""
        M = np.eye(4)
        M[:3, :3] = self.scale * self.rotation
        M[:3, 3] = self.translation
        return M

    def to_dict(self) -> dict:
        return {"scale": float(self.scale), "rotation": self.rotation.tolist(),
                "translation": self.translation.tolist()}


def umeyama(src: np.ndarray, dst: np.ndarray, *, with_scale: bool = True,
            weights: np.ndarray | None = None) -> Similarity:
    """Least-squares similarity (Umeyama 1991) with ``dst ~ s R src + t``.

    Parameters
    ----------
    src, dst : (N, 3) float
        Corresponding points, N >= 3 and not all collinear.
    with_scale : bool
        Estimate the scale (else 1).
    weights : (N,) float or None
        Non-negative weights.

    Returns
    -------
    Similarity
    """
    X = np.asarray(src, np.float64)
    Y = np.asarray(dst, np.float64)
    check_shape(X, "src", ("N", 3))
    check_shape(Y, "dst", (X.shape[0], 3))
    w = np.ones(X.shape[0]) if weights is None else np.asarray(weights, np.float64)
    if w.shape != (X.shape[0],) or np.any(w < 0) or w.sum() <= 0:
        raise ShapeError("expected weights to be (N,) non-negative with a positive sum")
    w = w / w.sum()
    mx, my = w @ X, w @ Y
    Xc, Yc = X - mx, Y - my
    S = (Yc * w[:, None]).T @ Xc
    U, sig, Vt = np.linalg.svd(S)
    d = np.ones(3)
    if np.linalg.det(U) * np.linalg.det(Vt) < 0:
        d[2] = -1.0
    R = U @ np.diag(d) @ Vt
    var = float(w @ np.sum(Xc * Xc, axis=1))
    s = float(np.sum(sig * d) / var) if (with_scale and var > 0) else 1.0
    return Similarity(s, R, my - s * R @ mx)


def _rotvec_matrix(w: np.ndarray) -> np.ndarray:
    """Rodrigues: rotation matrix of the rotation vector ``w`` (radians)."""
    th = float(np.linalg.norm(w))
    if th < 1e-15:
        return np.eye(3)
    k = w / th
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(th) * K + (1 - math.cos(th)) * (K @ K)


# ===================================================================== configuration
@dataclass
class RegistrationConfig:
    """Options of :func:`register_scan` (lengths in mm of the scaled scan frame).

    Attributes
    ----------
    scan_scale : float or "auto"
        Factor from scan units to mm, or ``"auto"`` (:func:`estimate_scan_scale`).
    template_region : {"all", "face", "crop"}
        ``"all"``: the whole template is fitted to the scan; ``"face"``: the whole template
        is deformed but only the model's face region has data terms (the rest follows the
        stiffness term; for scans with hair, hats or clothes); ``"crop"``: only the face
        region is registered (faster; :attr:`Registration.vertex_ids` maps back).
    alphas : sequence of float
        Stiffness schedule, one level each (Amberg et al. use 50, 35, 20, 15, 7, 3, 2, 1).
        The stiffness term is evaluated on the template normalised to unit RMS radius and
        ``alpha`` is multiplied by ``sqrt(V / 7500)`` for V template vertices: the data term
        grows with V while the stiffness energy of a smooth deformation does not, so this
        keeps the balance of a schedule across template resolutions (7500 vertices is the
        size of a typical face-region template).
    betas : sequence of float or None
        Landmark weight per stiffness level, decreasing to 0; 1 gives the landmark set the
        same total weight as the data term. Applies to the scan landmarks, or without them
        to the nose-tip pseudo-landmark (``nose_pin``). Padded with zeros (or cut) to the
        length of ``alphas``. None: no landmark term.
    gamma : float
        Weight of the translation against the linear part in the stiffness term,
        ``G = diag(1, 1, 1, gamma)``.
    max_iterations : int
        Inner iterations (closest points + solve) per stiffness level at most.
    tolerance : float
        A level ends when ``||X_new - X_old||_F / sqrt(V)`` (normalised units) falls below.
    max_distance : float or None
        Correspondences farther than this (mm) are rejected.
    max_distance_median : float or None
        ... and those farther than this multiple of the median distance (but never below
        ``distance_floor``).
    distance_floor : float
        Lower bound (mm) of the median-based threshold.
    normal_angle : float
        Reject correspondences whose normals differ by more than this (degrees).
    reject_boundary : bool
        Reject closest points on the scan's border (open edges) ...
    border_tolerance : float
        ... unless the vertex is within this distance (mm): it lies on the scan's edge
        rather than beyond it.
    estimate_scale : bool
        Include a scale in the initial similarity.
    initial_icp_iterations : int
        Point-to-plane ICP rounds of the landmark-free alignment.
    coefficient_regularization : float
        Tikhonov weight (mm^2 per unit of squared coefficient, against the mean squared
        vertex residual in mm^2) of the coefficient fit.
    coefficient_iterations : int
        Joint Gauss-Newton steps of coefficients and similarity (:func:`fit_coefficients`).
    min_correspondences : int
        Fewer accepted correspondences than this raise :class:`FitError`.
    nose_pin : bool
        Without scan landmarks, use the nose tips matched by the initial alignment (the
        template's most forward point and the scan's) as a pseudo-landmark with the
        ``betas`` schedule; it keeps the stiff levels from sliding the face along the scan
        toward the best fit of its broad shape.
    anderson_window : int
        Past iterates used by the Anderson acceleration of the inner iterations (0: off).
    refactor_fraction : float
        The system matrix is factorised again when the accepted correspondences differ
        from those it was built with at more than this fraction of the vertices; in
        between, newly rejected vertices get no data force and newly accepted ones wait.
    """

    scan_scale: float | str = "auto"
    template_region: str = "all"
    alphas: Sequence[float] = (50.0, 35.0, 20.0, 15.0, 7.0, 3.0, 2.0, 1.0)
    betas: Sequence[float] | None = (1.0, 0.5, 0.25, 0.1, 0.0)
    gamma: float = 1.0
    max_iterations: int = 20
    tolerance: float = 1e-3
    max_distance: float | None = 20.0
    max_distance_median: float | None = None
    distance_floor: float = 1.0
    normal_angle: float = 60.0
    reject_boundary: bool = True
    border_tolerance: float = 0.1
    estimate_scale: bool = True
    initial_icp_iterations: int = 30
    coefficient_regularization: float = 0.05
    coefficient_iterations: int = 5
    min_correspondences: int = 10
    nose_pin: bool = True
    anderson_window: int = 5
    refactor_fraction: float = 0.01

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid option."""
        if isinstance(self.scan_scale, str):
            if self.scan_scale != "auto":
                raise ConfigError(f"scan_scale must be a positive number or 'auto'; got "
                                  f"{self.scan_scale!r}")
        elif not (math.isfinite(float(self.scan_scale)) and float(self.scan_scale) > 0):
            raise ConfigError(f"scan_scale must be positive; got {self.scan_scale!r}")
        if self.template_region not in ("all", "face", "crop"):
            raise ConfigError(f"template_region must be 'all', 'face' or 'crop'; got "
                              f"{self.template_region!r}")
        if len(self.alphas) == 0 or any(not (a >= 0 and math.isfinite(a)) for a in self.alphas):
            raise ConfigError("alphas must be a non-empty sequence of non-negative numbers")
        if self.betas is not None and any(not (b >= 0 and math.isfinite(b))
                                          for b in self.betas):
            raise ConfigError("betas must be non-negative numbers")
        if not self.gamma > 0:
            raise ConfigError(f"gamma must be positive; got {self.gamma}")
        if int(self.max_iterations) < 1:
            raise ConfigError("max_iterations must be >= 1")
        if not self.tolerance > 0:
            raise ConfigError("tolerance must be positive")
        for name in ("max_distance", "max_distance_median"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ConfigError(f"{name} must be positive or None; got {v}")
        if not (self.distance_floor >= 0 and self.border_tolerance >= 0):
            raise ConfigError("distance_floor and border_tolerance must be >= 0")
        if not 0 < self.normal_angle <= 180:
            raise ConfigError("normal_angle must be in (0, 180] degrees")
        if int(self.initial_icp_iterations) < 0 or int(self.coefficient_iterations) < 0:
            raise ConfigError("initial_icp_iterations and coefficient_iterations must be >= 0")
        if not self.coefficient_regularization >= 0:
            raise ConfigError("coefficient_regularization must be >= 0")
        if int(self.min_correspondences) < 3:
            raise ConfigError("min_correspondences must be >= 3")
        if int(self.anderson_window) < 0:
            raise ConfigError("anderson_window must be >= 0")
        if not 0 <= self.refactor_fraction < 1:
            raise ConfigError("refactor_fraction must be in [0, 1)")

    def beta_schedule(self) -> list[float]:
        """Landmark weight per level (zeros when none), as long as :attr:`alphas`."""
        b = [float(x) for x in (self.betas or ())][:len(self.alphas)]
        return b + [0.0] * (len(self.alphas) - len(b))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["alphas"] = [float(a) for a in self.alphas]
        d["betas"] = None if self.betas is None else [float(b) for b in self.betas]
        return d


# ============================================================================= results
@dataclass(frozen=True, eq=False)
class Correspondences:
    """Closest scan points of the registered template vertices.

    Attributes
    ----------
    points : (V, 3) float64
        Closest point on the scan surface (mm, scaled scan frame).
    triangle : (V,) int64
        Scan triangle holding the point.
    barycentric : (V, 3) float64
        Weights of that triangle's three corners (sum to 1).
    distance : (V,) float64
        Distance from the vertex to the point (mm).
    valid : (V,) bool
        Accepted by the rejection tests (distance, normal angle, scan border).
    """

    points: np.ndarray
    triangle: np.ndarray
    barycentric: np.ndarray
    distance: np.ndarray
    valid: np.ndarray

    def interpolate(self, triangles: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Per-vertex ``values`` (N, C) of the scan interpolated at the points: (V, C)."""
        vals = np.asarray(values, np.float64)
        corner = np.asarray(triangles)[self.triangle]
        return np.einsum("vk,vkc->vc", self.barycentric, vals[corner])


@dataclass(frozen=True)
class LevelStats:
    """What happened at one stiffness level.

    Attributes
    ----------
    alpha, beta : float
        Stiffness and landmark weight of the level (as configured).
    iterations : int
        Closest-point/solve rounds run.
    mean_distance, median_distance : float
        Of the accepted correspondences at the last round (mm).
    n_accepted : int
        Accepted correspondences at the last round.
    step : float
        Last ``||X_new - X_old||_F / sqrt(V)``.
    converged : bool
        ``step`` fell below the tolerance.
    """

    alpha: float
    beta: float
    iterations: int
    mean_distance: float
    median_distance: float
    n_accepted: int
    step: float
    converged: bool


@dataclass(frozen=True, eq=False)
class CoefficientFit:
    """Model coefficients explaining a registered template.

    Attributes
    ----------
    alpha_id : (Ki,) float64, alpha_exp : (Ke,) float64
        Coefficients in units of standard deviations.
    similarity : Similarity
        Model frame -> scan frame.
    vertices : (V, 3) float64
        The fitted model geometry in the scan frame (mm).
    residual : float
        RMS distance (mm) between fitted and registered vertices over the fitted set.
    n_vertices : int
        Vertices used in the fit.
    """

    alpha_id: np.ndarray
    alpha_exp: np.ndarray
    similarity: Similarity
    vertices: np.ndarray
    residual: float
    n_vertices: int


@dataclass(frozen=True, eq=False)
class Registration:
    """Result of :func:`register_scan` (lengths in mm of the scaled scan frame).

    Attributes
    ----------
    vertices : (V, 3) float64
        The registered template (model topology, ``triangles``).
    vertex_ids : (V,) int64
        Model vertex id of each registered vertex (all vertices unless the template was
        cropped to the face region).
    triangles : (F, 3) int64
        Triangles of the registered template.
    similarity : Similarity
        Model frame -> scan frame, from the coefficient fit.
    initial_similarity : Similarity
        The alignment NICP started from.
    correspondences : Correspondences
        Closest scan points of ``vertices`` (how scan colours reach the model topology).
    alpha_id : (Ki,) float64, alpha_exp : (Ke,) float64
        Fitted coefficients (std units).
    coefficient_residual : float
        RMS (mm) of the coefficient fit over the face region's valid vertices.
    fitted_vertices : (V, 3) float64
        The model geometry of the coefficients under ``similarity`` (the coarse proxy).
    history : tuple of LevelStats
        One entry per stiffness level.
    converged : bool
        The last stiffness level met the tolerance.
    timings : dict
        Seconds: ``setup`` (units, closest-point structure), ``alignment``, ``nicp``,
        ``coefficients``, ``total``.
    scan_scale : float
        Factor applied to the scan's units to get mm.
    n_scan_vertices, n_scan_triangles : int
        Size of the scan registered to (checked by :meth:`transfer_colors`).
    config : RegistrationConfig
    """

    vertices: np.ndarray
    vertex_ids: np.ndarray
    triangles: np.ndarray
    similarity: Similarity
    initial_similarity: Similarity
    correspondences: Correspondences
    alpha_id: np.ndarray
    alpha_exp: np.ndarray
    coefficient_residual: float
    fitted_vertices: np.ndarray
    history: tuple[LevelStats, ...]
    converged: bool
    timings: dict
    scan_scale: float
    n_scan_vertices: int
    n_scan_triangles: int
    config: RegistrationConfig = field(default_factory=RegistrationConfig)

    @property
    def valid(self) -> np.ndarray:
        """(V,) bool: vertices with an accepted correspondence."""
        return self.correspondences.valid

    def transfer_colors(self, scan: Scan, *, only_valid: bool = True) -> np.ndarray:
        """Colours of ``scan`` at the correspondences: (V, 3) float64 linear RGB.

        Parameters
        ----------
        scan : Scan
            The scan that was registered (same vertices and triangles; its scale does
            not matter).
        only_valid : bool
            NaN where the correspondence was rejected (else the colour of the closest
            point anyway).

        Raises
        ------
        ScanError
            The scan has no colours or is not the one registered.
        """
        if scan.colors is None:
            raise ScanError(f"{scan.path or 'scan'}: the scan has no colours to transfer")
        if (scan.n_vertices, scan.n_triangles) != (self.n_scan_vertices, self.n_scan_triangles):
            raise ScanError(f"{scan.path or 'scan'}: not the registered scan "
                            f"({scan.n_vertices} vertices / {scan.n_triangles} triangles; "
                            f"registered {self.n_scan_vertices} / {self.n_scan_triangles})")
        out = self.correspondences.interpolate(scan.triangles, scan.colors)
        if only_valid:
            out[~self.correspondences.valid] = np.nan
        return out

    def summary(self) -> dict:
        """JSON-ready numbers: distances, coefficients, history, timings, config."""
        c = self.correspondences
        d = c.distance[c.valid]
        return {
            "n_vertices": int(self.vertices.shape[0]),
            "n_valid": int(c.valid.sum()),
            "mean_distance_mm": float(d.mean()) if d.size else float("nan"),
            "median_distance_mm": float(np.median(d)) if d.size else float("nan"),
            "coefficient_residual_mm": float(self.coefficient_residual),
            "alpha_id": self.alpha_id.tolist(),
            "alpha_exp": self.alpha_exp.tolist(),
            "similarity": self.similarity.to_dict(),
            "scan_scale": float(self.scan_scale),
            "converged": bool(self.converged),
            "history": [dataclasses.asdict(h) for h in self.history],
            "timings": dict(self.timings),
            "config": self.config.to_dict(),
        }


# ================================================================== closest points
class _ScanSurface:
    """The scan prepared for closest-point queries (open3d / Embree), mm."""

    def __init__(self, vertices: np.ndarray, triangles: np.ndarray) -> None:
        import open3d as o3d

        self.vertices = np.asarray(vertices, np.float64)
        self.triangles = np.asarray(triangles, np.int64)
        self._o3c = o3d.core
        self._scene = o3d.t.geometry.RaycastingScene()
        self._scene.add_triangles(
            o3d.core.Tensor(np.ascontiguousarray(self.vertices, dtype=np.float32)),
            o3d.core.Tensor(np.ascontiguousarray(self.triangles, dtype=np.uint32)))
        self.normals = vertex_normals(self.vertices, self.triangles)
        F = self.triangles
        e0 = F.reshape(-1)
        e1 = F[:, [1, 2, 0]].reshape(-1)
        key = np.minimum(e0, e1) * np.int64(self.vertices.shape[0]) + np.maximum(e0, e1)
        _, inv, cnt = np.unique(key, return_inverse=True, return_counts=True)
        #: (M, 3) edge k (corner k -> k + 1) of each triangle is used by no other triangle
        self.edge_border = (cnt[inv.reshape(-1)] == 1).reshape(-1, 3)
        self.vertex_border = np.zeros(self.vertices.shape[0], bool)
        self.vertex_border[e0[self.edge_border.reshape(-1)]] = True
        self.vertex_border[e1[self.edge_border.reshape(-1)]] = True
        #: +1, or -1 when the scan is wound clockwise (set by the alignment or the first NICP
        #: iteration)
        self.orientation = 1.0

    def query(self, points: np.ndarray) -> tuple[np.ndarray, ...]:
        """Closest surface points of (N, 3) query points.

        Returns (closest (N, 3), triangle (N,), barycentric (N, 3), normal (N, 3) unit,
        distance (N,), on_border (N,) bool).
        """
        q = self._o3c.Tensor(np.ascontiguousarray(points, dtype=np.float32))
        ans = self._scene.compute_closest_points(q)
        tri = ans["primitive_ids"].numpy().astype(np.int64)
        uv = ans["primitive_uvs"].numpy().astype(np.float64)
        bad = (tri < 0) | (tri >= self.triangles.shape[0])
        tri = np.where(bad, 0, tri)
        w = np.empty((tri.size, 3))
        w[:, 1:] = np.clip(uv, 0.0, 1.0)
        w[:, 0] = np.clip(1.0 - w[:, 1] - w[:, 2], 0.0, 1.0)
        w /= np.maximum(w.sum(1, keepdims=True), 1e-12)
        corner = self.triangles[tri]
        closest = np.einsum("nk,nkc->nc", w, self.vertices[corner])
        n = np.einsum("nk,nkc->nc", w, self.normals[corner])
        nn = np.linalg.norm(n, axis=1, keepdims=True)
        fn = ans["primitive_normals"].numpy().astype(np.float64)
        n = np.where(nn > 1e-12, n / np.maximum(nn, 1e-300), fn) * self.orientation
        dist = np.linalg.norm(closest - np.asarray(points, np.float64), axis=1)
        border = np.zeros(tri.size, bool)
        eb = self.edge_border[tri]
        for k in range(3):
            border |= eb[:, k] & (w[:, (k + 2) % 3] <= _BARY_TOL)
            border |= (w[:, k] >= 1.0 - _BARY_TOL) & self.vertex_border[corner[:, k]]
        dist[bad] = np.inf
        return closest, tri, w, n, dist, border


def _accept(dist: np.ndarray, cos: np.ndarray, border: np.ndarray,
            config: RegistrationConfig, mask: np.ndarray | None = None) -> np.ndarray:
    """The rejection tests of :class:`RegistrationConfig` as a (N,) bool."""
    ok = np.isfinite(dist) & (cos >= math.cos(math.radians(config.normal_angle)))
    if config.reject_boundary:
        ok &= ~border | (dist <= config.border_tolerance)
    if mask is not None:
        ok &= mask
    if config.max_distance is not None:
        ok &= dist <= config.max_distance
    if config.max_distance_median is not None and ok.any():
        thr = max(config.max_distance_median * float(np.median(dist[ok])), config.distance_floor)
        ok &= dist <= thr
    return ok


def closest_points(scan: Scan, points: np.ndarray, normals: np.ndarray | None = None,
                   config: RegistrationConfig | None = None) -> Correspondences:
    """Closest points on ``scan`` of (N, 3) ``points`` with the rejection tests applied.

    Parameters
    ----------
    scan : Scan
        In the same units as ``points``.
    points : (N, 3) float
    normals : (N, 3) float or None
        Unit normals of the points for the normal-angle test (skipped when None).
    config : RegistrationConfig or None
        Rejection thresholds (defaults when None).

    Returns
    -------
    Correspondences
    """
    P = np.asarray(points, np.float64)
    check_shape(P, "points", ("N", 3))
    cfg = config or RegistrationConfig()
    surf = _ScanSurface(scan.vertices, scan.triangles)
    closest, tri, w, n, dist, border = surf.query(P)
    if normals is None:
        cos = np.ones(P.shape[0])
    else:
        N = np.asarray(normals, np.float64)
        check_shape(N, "normals", (P.shape[0], 3))
        cos = np.sum(N * n, axis=1)
    return Correspondences(closest, tri, w, dist, _accept(dist, cos, border, cfg))


# ================================================================== initial alignment
def _icp_similarity(src: np.ndarray, src_normals: np.ndarray, surface: _ScanSurface,
                    init: Similarity, iterations: int, with_scale: bool,
                    config: RegistrationConfig,
                    pin: tuple[np.ndarray, np.ndarray] | None = None
                    ) -> tuple[Similarity, float]:
    """Point-to-plane ICP of a similarity; returns it and a robust residual (mm).

    ``pin`` = (source point, target point) adds a point-to-point term as strong as all
    data terms together. The residual is the mean of per-point distances truncated at
    10 mm, counting points with incompatible normals as 10 mm, so that starts which put
    the face on the wrong part of the scan score badly.
    """
    sim = init
    cos_min = math.cos(math.radians(config.normal_angle))
    cap = 10.0
    n_par = 7 if with_scale else 6
    for _ in range(iterations):
        P = sim.apply(src)
        N = sim.apply_vectors(src_normals)
        q, _, _, nq, dist, border = surface.query(P)
        cos = np.sum(N * nq, axis=1)
        ok = np.isfinite(dist) & (cos >= cos_min) & ~border
        if ok.sum() < 12:
            break
        thr = max(3.0 * float(np.median(dist[ok])), 2.0)
        if config.max_distance is not None:
            thr = min(thr, max(float(config.max_distance), 2.0))
        ok &= dist <= thr
        if ok.sum() < 12:
            break
        p, qq, n = P[ok], q[ok], nq[ok]
        c = p.mean(0)
        pc = p - c
        r = np.sum(n * (p - qq), axis=1)
        cols = [np.cross(pc, n), n] + ([np.sum(n * pc, 1)[:, None]] if with_scale else [])
        J = np.concatenate(cols, axis=1)
        if pin is not None:
            pa = sim.apply(pin[0][None])[0]
            a = pa - c
            skew = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
            Jp = np.concatenate([-skew, np.eye(3)] + ([a[:, None]] if with_scale else []), 1)
            wp = math.sqrt(p.shape[0])
            J = np.concatenate([J, wp * Jp])
            r = np.concatenate([r, wp * (pa - pin[1])])
        H = J.T @ J
        x = -np.linalg.solve(H + 1e-9 * np.trace(H) * np.eye(n_par), J.T @ r)
        if not np.all(np.isfinite(x)):
            break
        # damp steps that are too large to trust the linearisation (a start far off)
        shrink = min(1.0, _MAX_ICP_ROTATION / max(float(np.linalg.norm(x[:3])), 1e-300),
                     _MAX_ICP_LOG_SCALE / max(abs(float(x[6])) if with_scale else 0.0, 1e-300))
        x = x * shrink
        omega, tau = x[:3], x[3:6]
        sigma = float(x[6]) if with_scale else 0.0
        Rw = _rotvec_matrix(omega)
        es = math.exp(sigma)
        step = Similarity(es, Rw, c + tau - es * Rw @ c)
        sim = step.compose(sim)
        if not _MIN_SCALE < sim.scale < 1.0 / _MIN_SCALE:
            return sim, float("inf")
        if np.linalg.norm(omega) < 1e-6 and np.linalg.norm(tau) < 1e-4 and abs(sigma) < 1e-6:
            break
    P = sim.apply(src)
    N = sim.apply_vectors(src_normals)
    _, _, _, nq, dist, _ = surface.query(P)
    cos = np.sum(N * nq, axis=1)
    d = np.where((cos >= cos_min) & np.isfinite(dist), np.minimum(dist, cap), cap)
    return sim, float(d.mean())


def _local_front_point(surface: _ScanSurface, near: np.ndarray, forward: np.ndarray,
                       radius: float) -> np.ndarray:
    """The scan vertex farthest along ``forward`` within ``radius`` mm of ``near`` (or
    ``near``'s closest scan point when no vertex is that close)."""
    S = surface.vertices
    close = np.linalg.norm(S - near, axis=1) <= radius
    if not close.any():
        return surface.query(near[None])[0][0]
    cand = S[close]
    return cand[np.argmax(cand @ forward)]


def _landmark_free_alignment(template: np.ndarray, template_normals: np.ndarray,
                             surface: _ScanSurface, config: RegistrationConfig,
                             rng: np.random.Generator
                             ) -> tuple[Similarity, int, np.ndarray]:
    """Similarity from the template (model frame) to the scan without landmarks.

    For each candidate orientation (model frame, camera frame) and start (the template's
    most forward point on the scan's, or centroid on centroid): point-to-plane ICP with
    scale, then the scan's most forward point within 40 mm of the aligned template nose
    tip is taken as the nose tip, and ICP is repeated with the two tips pinned together
    (whole-face ICP alone tends to trade the features for the broad shape of the face
    when template and scan differ). The candidate with the smallest robust residual wins.
    The scan's winding is taken per candidate from the normals of its most forward part
    (they must face forward) and set on ``surface``.

    Returns
    -------
    (Similarity, int, (3,) array)
        The similarity, the template vertex id of the nose tip (its most forward point)
        and the matching scan point, used as a pseudo-landmark by NICP.
    """
    n_sub = min(template.shape[0], 3000)
    sub = np.sort(rng.choice(template.shape[0], n_sub, replace=False))
    src, src_n = template[sub], template_normals[sub]
    tip_id = int(np.argmax(template[:, 2]))
    tip = template[tip_id]
    centroid_t = template.mean(0)
    S = surface.vertices
    centroid_s = S.mean(0)
    iters = int(config.initial_icp_iterations)
    best: tuple[float, Similarity, np.ndarray, float] | None = None
    for frame, R0 in (("model", np.eye(3)), ("camera", _MODEL_TO_CAMERA)):
        ahead = S @ R0[:, 2]
        front = S[np.argmax(ahead)]
        # the scan's winding as seen from this frame: its most forward part faces forward
        foremost = np.argsort(ahead)[-20:]
        surface.orientation = 1.0 if np.sum(surface.normals[foremost] @ R0[:, 2]) >= 0 else -1.0
        for anchor, a_t, a_s in (("front", tip, front), ("centroid", centroid_t, centroid_s)):
            start = Similarity(1.0, R0, a_s - R0 @ a_t)
            sim, _ = _icp_similarity(src, src_n, surface, start, iters,
                                     config.estimate_scale, config)
            target = _local_front_point(surface, sim.apply(tip[None])[0], sim.rotation[:, 2],
                                        40.0)
            sim, score = _icp_similarity(src, src_n, surface, sim, iters,
                                         config.estimate_scale, config, pin=(tip, target))
            log.debug("alignment start (%s frame, %s): residual %.2f mm", frame, anchor, score)
            if best is None or score < best[0]:
                best = (score, sim, target, surface.orientation)
    assert best is not None
    surface.orientation = best[3]
    return best[1], tip_id, best[2]


# ============================================================================== NICP
def _stiffness_matrix(triangles: np.ndarray, n_vertices: int, gamma: float) -> sp.csr_matrix:
    """``(M kron G)^T (M kron G) = L kron G^2`` for the template's edge graph (4V x 4V)."""
    A = vertex_adjacency(triangles, n_vertices)
    L = sp.diags(np.asarray(A.sum(axis=1)).ravel()) - A
    return sp.kron(L, sp.diags([1.0, 1.0, 1.0, gamma * gamma]), format="csr")


def _block_diagonal(blocks: np.ndarray) -> sp.csr_matrix:
    """Sparse block-diagonal matrix of (V, 4, 4) blocks."""
    V = blocks.shape[0]
    return sp.bsr_matrix((blocks, np.arange(V), np.arange(V + 1)),
                         shape=(4 * V, 4 * V)).tocsr()


def _factor_spd(N: sp.spmatrix):
    """Sparse LU factorisation of a symmetric positive definite matrix (symmetric mode)."""
    try:
        return spla.splu(N.tocsc(), permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0,
                         options={"SymmetricMode": True})
    except RuntimeError as exc:
        raise FitError(f"NICP system could not be factorised ({exc})") from None


def _solve_factored(lu, rhs: np.ndarray) -> np.ndarray:
    x = lu.solve(rhs)
    if not np.all(np.isfinite(x)):
        raise FitError("NICP system solve produced non-finite values")
    return x


class _Anderson:
    """Anderson acceleration (type II, window ``m``) of a fixed-point map ``x -> G(x)``."""

    def __init__(self, m: int) -> None:
        self.m = int(m)
        self.reset()

    def reset(self) -> None:
        self._dg: list[np.ndarray] = []
        self._dG: list[np.ndarray] = []
        self._g: np.ndarray | None = None
        self._G: np.ndarray | None = None

    def update(self, x: np.ndarray, G: np.ndarray) -> np.ndarray:
        """The accelerated next iterate from the current ``x`` and its image ``G``."""
        g = (G - x).reshape(-1)
        Gf = G.reshape(-1)
        if self._g is not None:
            self._dg.append(g - self._g)
            self._dG.append(Gf - self._G)
            if len(self._dg) > self.m:
                self._dg.pop(0)
                self._dG.pop(0)
        self._g, self._G = g, Gf.copy()
        if not self._dg or self.m <= 0:
            return G
        A = np.stack(self._dg, axis=1)
        gamma, *_ = np.linalg.lstsq(A, g, rcond=None)
        if not np.all(np.isfinite(gamma)):
            self.reset()
            return G
        return (Gf - np.stack(self._dG, axis=1) @ gamma).reshape(G.shape)


def _nicp(template: np.ndarray, triangles: np.ndarray, surface: _ScanSurface,
          data_mask: np.ndarray, lm_ids: np.ndarray, lm_targets: np.ndarray,
          config: RegistrationConfig, bar) -> tuple[np.ndarray, list[LevelStats]]:
    """Optimal-step NICP of the (aligned) template; returns vertices (V, 3) and history.

    Works in normalised coordinates (template centred, unit RMS radius). Each inner
    iteration is the fixed-point map ``X -> argmin E(X; closest points of X)``; it is
    Anderson-accelerated with a safeguard: an accelerated iterate whose energy (stiffness
    + truncated squared distances + landmarks) exceeds the previous one is replaced by the
    plain iterate.
    """
    V = template.shape[0]
    center = template.mean(0)
    radius = float(np.sqrt(np.mean(np.sum((template - center) ** 2, axis=1))))
    D = np.concatenate([(template - center) / radius, np.ones((V, 1))], axis=1)   # (V, 4)
    DD = D[:, :, None] * D[:, None, :]                                            # (V, 4, 4)
    K = _stiffness_matrix(triangles, V, config.gamma)
    alpha_scale = math.sqrt(V / _STIFFNESS_REFERENCE_VERTICES)
    X = np.tile(np.eye(4, 3), (V, 1, 1))                                          # (V, 4, 3)
    n_lm = lm_ids.size
    lm_scale = math.sqrt(V / max(n_lm, 1))
    U_lm = (lm_targets - center) / radius if n_lm else np.zeros((0, 3))
    trunc = (config.max_distance if config.max_distance is not None else 20.0) / radius
    prox = 1e-9
    refactor_limit = max(int(config.refactor_fraction * V), 0)
    state = {"orientation_checked": False}

    def correspond(X: np.ndarray) -> dict:
        P = np.einsum("vi,vij->vj", D, X) * radius + center
        normals = vertex_normals(P, triangles)
        q, _, _, nq, dist, border = surface.query(P)
        cos = np.sum(normals * nq, axis=1)
        if not state["orientation_checked"]:
            state["orientation_checked"] = True
            near = np.isfinite(dist) & data_mask
            if near.any() and np.median(cos[near]) < -0.2:
                log.warning("scan normals point against the template's; the scan seems "
                            "wound clockwise, its normals are flipped")
                surface.orientation = -surface.orientation
                nq, cos = -nq, -cos
        ok = _accept(dist, cos, border, config, data_mask)
        dn = np.minimum(np.where(np.isfinite(dist), dist, np.inf) / radius, trunc)
        return {"q": q, "dist": dist, "ok": ok, "data": float(np.sum(dn[data_mask] ** 2))}

    def energy(X: np.ndarray, cur: dict, a2: float, b2: float) -> float:
        Xf = X.reshape(4 * V, 3)
        e = a2 * float(np.sum(Xf * (K @ Xf))) + cur["data"]
        if b2 > 0:
            r = np.einsum("vi,vij->vj", D[lm_ids], X[lm_ids]) - U_lm
            e += b2 * float(np.sum(r * r))
        return e

    history: list[LevelStats] = []
    for alpha, beta in zip(config.alphas, config.beta_schedule()):
        a2 = (float(alpha) * alpha_scale) ** 2
        b2 = (float(beta) * lm_scale) ** 2 if n_lm else 0.0
        accel = _Anderson(config.anderson_window)
        step = float("inf")
        converged = False
        iterations = 0
        cur = correspond(X)
        e_prev = float("inf")
        X_plain: np.ndarray | None = None
        stats = (float("nan"), float("nan"), 0)
        lu = None
        weights = np.zeros(V, bool)
        for _ in range(int(config.max_iterations)):
            iterations += 1
            e = energy(X, cur, a2, b2)
            if X_plain is not None and e > e_prev:
                X = X_plain
                cur = correspond(X)
                e = energy(X, cur, a2, b2)
                accel.reset()
            e_prev = e
            ok = cur["ok"]
            n_ok = int(ok.sum())
            if n_ok < config.min_correspondences:
                raise FitError(f"only {n_ok} correspondences accepted at stiffness {alpha} "
                               f"(need {config.min_correspondences}); is the scan aligned and "
                               f"in mm? (scan_scale, landmarks)")
            stats = (float(cur["dist"][ok].mean()), float(np.median(cur["dist"][ok])), n_ok)
            if lu is None or np.count_nonzero(ok != weights) > refactor_limit:
                weights = ok.copy()
                blocks = weights[:, None, None] * DD + prox * np.eye(4)
                if b2 > 0:
                    np.add.at(blocks, lm_ids, b2 * DD[lm_ids])
                lu = _factor_spd(a2 * K + _block_diagonal(blocks))
            # vertices accepted when the system was factorised but rejected now are pulled
            # to where they are (no force); newly accepted ones wait for the next factorisation
            U = (cur["q"] - center) / radius
            stale = weights & ~ok
            if stale.any():
                U[stale] = np.einsum("vi,vij->vj", D[stale], X[stale])
            rhs = weights[:, None, None] * D[:, :, None] * U[:, None, :] + prox * X
            if b2 > 0:
                np.add.at(rhs, lm_ids, b2 * D[lm_ids][:, :, None] * U_lm[:, None, :])
            G = _solve_factored(lu, rhs.reshape(4 * V, 3)).reshape(V, 4, 3)
            step = float(np.linalg.norm(G - X) / math.sqrt(V))
            if bar is not None:
                bar.set_postfix(alpha=alpha, dist=f"{stats[0]:.2f}mm", step=f"{step:.1e}")
            if step < config.tolerance:
                X = G
                converged = True
                break
            X_plain = G
            X = accel.update(X, G)
            cur = correspond(X)
        history.append(LevelStats(float(alpha), float(beta) if n_lm else 0.0, iterations,
                                  stats[0], stats[1], stats[2], step, converged))
        log.debug("NICP alpha %.3g: %d iterations, mean distance %.3f mm, %d accepted, "
                  "step %.2e", alpha, iterations, stats[0], stats[2], step)
        if bar is not None:
            bar.update(1)
    return np.einsum("vi,vij->vj", D, X) * radius + center, history


# ======================================================================= coefficients
def fit_coefficients(model: MorphableModel, vertices: np.ndarray, *,
                     vertex_ids: np.ndarray | None = None, weights: np.ndarray | None = None,
                     regularization: float = 0.05, iterations: int = 5,
                     with_scale: bool = True) -> CoefficientFit:
    """Identity and expression coefficients of ``model`` that explain ``vertices``.

    Minimises ``E = sum_i w_i |s R G_i(c) + t - y_i|^2 / (s^2 sum_i w_i) + lambda |c|^2``
    over the stacked coefficients ``c = (alpha_id, alpha_exp)`` (std units) and the
    similarity ``(s, R, t)``: the Umeyama alignment of the mean shape, the regularised
    linear least-squares solve for ``c`` under it, then Gauss-Newton steps on ``c`` and the
    similarity together (width and length modes of a model trade off against the scale, so
    alternating the two converges slowly).

    Parameters
    ----------
    model : MorphableModel
    vertices : (V, 3) float
        Target positions (mm, any frame) of the model vertices ``vertex_ids``.
    vertex_ids : (V,) int or None
        Model vertex ids of ``vertices`` (all, in order, when None).
    weights : (V,) bool or float or None
        Vertices to use, or their non-negative weights (all when None).
    regularization : float
        ``lambda`` in mm^2 per squared std unit.
    iterations : int
        Joint Gauss-Newton steps after the linear solve (0: similarity of the mean only).
    with_scale : bool
        Estimate the similarity's scale.

    Returns
    -------
    CoefficientFit
    """
    Y = np.asarray(vertices, np.float64)
    ids = np.arange(model.n_vertices) if vertex_ids is None else np.asarray(vertex_ids, np.int64)
    check_shape(Y, "vertices", (ids.size, 3))
    w = np.ones(ids.size) if weights is None else np.asarray(weights, np.float64)
    if w.shape != (ids.size,) or np.any(w < 0):
        raise ShapeError(f"expected weights to have shape ({ids.size},) and be >= 0")
    use = w > 0
    if use.sum() < 3:
        raise FitError(f"coefficient fit needs at least 3 vertices; got {int(use.sum())}")
    lam = float(regularization)
    mean = model.mean[ids].astype(np.float64)
    B = np.concatenate([model.id_basis[ids].astype(np.float64) * model.id_std,
                        model.exp_basis[ids].astype(np.float64) * model.exp_std], axis=2)
    K = B.shape[2]
    wu = w[use]
    n = float(wu.sum())
    Yu, Mu, Bu = Y[use], mean[use], B[use]                     # (n, 3), (n, 3), (n, 3, K)
    c = np.zeros(K)

    # similarity of the mean, then the linear solve for c in the model frame
    sim = umeyama(Mu, Yu, with_scale=with_scale, weights=wu)
    if K:
        Ym = sim.inverse().apply(Yu)
        A = Bu.reshape(-1, K)
        ww = np.repeat(wu, 3)
        H = (A * ww[:, None]).T @ A / n + lam * np.eye(K)
        c = np.linalg.solve(H, (A * ww[:, None]).T @ (Ym - Mu).reshape(-1) / n)

    # joint Gauss-Newton on (c, rotation vector, translation, log scale)
    n_sim = 7 if with_scale else 6
    sw = np.sqrt(wu)[:, None, None]
    for _ in range(max(0, int(iterations))):
        Gm = Mu + Bu @ c
        P = sim.apply(Gm)
        r = (P - Yu) / sim.scale                                # (n, 3), model-frame mm
        Pc = (P - sim.translation) / sim.scale
        J = np.zeros((Yu.shape[0], 3, K + n_sim))
        J[:, :, :K] = np.einsum("ij,njk->nik", sim.rotation, Bu)
        # d(omega x Pc)/d omega = -[Pc]x
        J[:, 0, K + 1], J[:, 0, K + 2] = Pc[:, 2], -Pc[:, 1]
        J[:, 1, K + 0], J[:, 1, K + 2] = -Pc[:, 2], Pc[:, 0]
        J[:, 2, K + 0], J[:, 2, K + 1] = Pc[:, 1], -Pc[:, 0]
        J[:, :, K + 3:K + 6] = np.eye(3) / sim.scale
        if with_scale:
            J[:, :, K + 6] = Pc
        Jw = (J * sw).reshape(-1, K + n_sim)
        rw = (r * sw[:, :, 0]).reshape(-1)
        H = Jw.T @ Jw / n
        g = Jw.T @ rw / n
        H[:K, :K] += lam * np.eye(K)
        g[:K] += lam * c
        delta = -np.linalg.solve(H + 1e-12 * np.trace(H) * np.eye(K + n_sim), g)
        c = c + delta[:K]
        omega, tau = delta[K:K + 3], delta[K + 3:K + 6]
        sigma = float(delta[K + 6]) if with_scale else 0.0
        sim = Similarity(sim.scale * math.exp(sigma), _rotvec_matrix(omega) @ sim.rotation,
                         sim.translation + tau)
        if np.max(np.abs(delta)) < 1e-9:
            break
    fitted = sim.apply(mean + B @ c) if K else sim.apply(mean)
    res = float(np.sqrt(np.sum(wu * np.sum((fitted[use] - Yu) ** 2, 1)) / n))
    return CoefficientFit(c[:model.n_id].copy(), c[model.n_id:].copy(), sim, fitted, res,
                          int(use.sum()))


# ======================================================================== top level
def register_scan(scan: Scan, model: MorphableModel, *, scan_landmarks: np.ndarray | None = None,
                  config: RegistrationConfig | None = None, progress: bool = False,
                  seed: int = 0) -> Registration:
    """Register the neutral template (mean shape) of ``model`` to ``scan``.

    Parameters
    ----------
    scan : Scan
        The scan, in its own units (see ``config.scan_scale``).
    model : MorphableModel
        Its mean shape is the template; its bases are used for the coefficient fit.
    scan_landmarks : (68, 3) float or None
        iBUG-68 points on the scan, scan units; NaN rows (or model landmarks that are -1)
        are ignored. With them the initial alignment is the Umeyama similarity of the
        model's landmark vertices and the landmark term (schedule ``config.betas``) pulls
        those vertices to them. Without them the alignment is landmark-free (see the
        module docstring: roughly frontal, upright scans whose nose is their most forward
        part) and the matched nose tips act as one pseudo-landmark (``config.nose_pin``).
    config : RegistrationConfig or None
        Options (defaults when None).
    progress : bool
        Show a progress bar over the stiffness levels.
    seed : int
        Seed of the point subsampling used by the landmark-free alignment.

    Returns
    -------
    Registration

    Raises
    ------
    FitError
        Too few landmarks for the alignment, too few accepted correspondences, or an
        unsolvable system.
    ConfigError, ShapeError
        Invalid options or landmark array.
    """
    cfg = config or RegistrationConfig()
    cfg.validate()
    if not isinstance(scan, Scan):
        raise ConfigError(f"scan must be a Scan; got {type(scan).__name__}")
    if not isinstance(model, MorphableModel):
        raise ConfigError(f"model must be a MorphableModel; got {type(model).__name__}")
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    L_scan = None
    if scan_landmarks is not None:
        L_scan = np.asarray(scan_landmarks, dtype=np.float64)
        check_shape(L_scan, "scan_landmarks", (68, 3))

    # ---- units
    t0 = time.perf_counter()
    if cfg.scan_scale == "auto":
        k = estimate_scan_scale(scan, model, L_scan)
    else:
        k = float(cfg.scan_scale)
    log.info("scan %s: scale %.6g to mm", scan.path or "", k)
    S = scan.vertices * k
    L_mm = None if L_scan is None else L_scan * k
    surface = _ScanSurface(S, scan.triangles)
    timings["setup"] = time.perf_counter() - t0

    # ---- template
    if cfg.template_region == "crop":
        vertex_ids = np.nonzero(model.region)[0].astype(np.int64)
        if vertex_ids.size < 3:
            raise FitError("the model's face region is empty; use template_region='all'")
        sub = model.crop(vertex_ids)
        triangles = sub.triangles.astype(np.int64)
        landmarks = sub.landmarks68
    else:
        vertex_ids = np.arange(model.n_vertices, dtype=np.int64)
        triangles = model.triangles.astype(np.int64)
        landmarks = model.landmarks68
    region_full = model.region[vertex_ids]
    mean = model.geometry()[vertex_ids]
    data_mask = region_full if cfg.template_region == "face" else np.ones(vertex_ids.size, bool)

    # ---- initial alignment
    t0 = time.perf_counter()
    lm_ids = np.zeros(0, np.int64)
    lm_targets = np.zeros((0, 3))
    if L_mm is not None:
        ok = (landmarks >= 0) & np.all(np.isfinite(L_mm), axis=1)
        if ok.sum() < 4:
            raise FitError(f"only {int(ok.sum())} usable landmark pairs; need at least 4")
        lm_ids = landmarks[ok].astype(np.int64)
        lm_targets = L_mm[ok]
        init = umeyama(mean[lm_ids], lm_targets, with_scale=cfg.estimate_scale)
    else:
        use = np.nonzero(region_full if region_full.sum() >= 100
                         else np.ones(vertex_ids.size, bool))[0]
        normals = vertex_normals(mean, triangles)
        init, tip, target = _landmark_free_alignment(mean[use], normals[use], surface, cfg,
                                                     np.random.default_rng(seed))
        if cfg.nose_pin:
            lm_ids = np.array([use[tip]], np.int64)
            lm_targets = target[None]
    timings["alignment"] = time.perf_counter() - t0
    log.info("initial similarity: scale %.4f, translation %s", init.scale,
             np.round(init.translation, 2))

    # ---- NICP
    t0 = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(cfg.alphas), desc="nicp", unit="level")
    try:
        registered, history = _nicp(init.apply(mean), triangles, surface, data_mask, lm_ids,
                                    lm_targets, cfg, bar)
    finally:
        if bar is not None:
            bar.close()
    timings["nicp"] = time.perf_counter() - t0

    # ---- final correspondences
    normals = vertex_normals(registered, triangles)
    q, tri, w, nq, dist, border = surface.query(registered)
    valid = _accept(dist, np.sum(normals * nq, axis=1), border, cfg)
    corr = Correspondences(q, tri, w, dist, valid)

    # ---- coefficients
    t0 = time.perf_counter()
    fit_w = valid & region_full
    if fit_w.sum() < 100:
        fit_w = valid if valid.sum() >= 3 else np.ones(vertex_ids.size, bool)
    fit = fit_coefficients(model, registered, vertex_ids=vertex_ids, weights=fit_w,
                           regularization=cfg.coefficient_regularization,
                           iterations=cfg.coefficient_iterations,
                           with_scale=cfg.estimate_scale)
    timings["coefficients"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    log.info("registration: mean distance %.3f mm over %d of %d vertices, coefficient "
             "residual %.3f mm, %.1f s", float(dist[valid].mean()) if valid.any() else np.nan,
             int(valid.sum()), valid.size, fit.residual, timings["total"])
    return Registration(
        vertices=registered, vertex_ids=vertex_ids, triangles=triangles,
        similarity=fit.similarity, initial_similarity=init, correspondences=corr,
        alpha_id=fit.alpha_id, alpha_exp=fit.alpha_exp, coefficient_residual=fit.residual,
        fitted_vertices=fit.vertices, history=tuple(history),
        converged=bool(history and history[-1].converged), timings=timings, scan_scale=k,
        n_scan_vertices=scan.n_vertices, n_scan_triangles=scan.n_triangles,
        config=dataclasses.replace(cfg))
