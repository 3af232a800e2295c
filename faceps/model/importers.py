"""Importers that turn research morphable models into a faceps model (DESIGN contract 5).

Each importer reads the model's own files and returns a :class:`MorphableModel` in
millimetres, in the model frame of contract 5 (x toward the subject's left, y up, z out of
the face), with triangles counter-clockwise seen from outside:

====================  ===========================================  ==========================
kind                  source                                       reader
====================  ===========================================  ==========================
``ict-facekit``       ICT-FaceKit folder (``FaceXModel/*.obj``)    :func:`import_ict_facekit`
``sfm``               Surrey Face Model folder or ``.bin``         :func:`import_sfm`
``bfm2009``           ``01_MorphableModel.mat``                    :func:`import_bfm2009`
``bfm2017``           ``model2017-1_*.h5``                         :func:`import_bfm2017`
``bfm2019``           ``model2019_*.h5``                           :func:`import_bfm2019`
``flame``             ``generic_model.pkl``                        :func:`import_flame`
====================  ===========================================  ==========================

:func:`import_model` dispatches on the kind. Every importer accepts ``landmarks``: a text or
JSON file of the 68 iBUG vertex ids (0-based, -1 for "no vertex"), which replaces the
model's own landmark ids (see :func:`read_landmark_ids`). Malformed sources raise
:class:`~faceps.core.errors.ModelError` naming the file and what is wrong; nothing here
unpickles with the standard unpickler (FLAME goes through :mod:`faceps.model.safe_pickle`).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from faceps.core.errors import ModelError
from faceps.core.mesh import vertex_normals
from faceps.model.morphable import MorphableModel
from faceps.model.safe_pickle import as_array, load_pickle

__all__ = [
    "KINDS",
    "import_model",
    "import_ict_facekit",
    "import_sfm",
    "import_bfm2009",
    "import_bfm2017",
    "import_bfm2019",
    "import_flame",
    "read_obj",
    "read_landmark_ids",
    "read_sfm_landmark_mapping",
    "orient_outward",
    "ICT_FACE_VERTICES",
    "ICT_LANDMARKS68",
]

log = logging.getLogger(__name__)

PathLike = str | os.PathLike

LICENSE_ICT = "MIT (ICT-FaceKit)"
LICENSE_SFM = "Surrey Face Model licence: non-commercial"
LICENSE_BFM = "BFM licence: non-commercial research"
LICENSE_FLAME = "FLAME licence: non-commercial"

CM_TO_MM = 10.0
UM_TO_MM = 1e-3
M_TO_MM = 1e3

#: ICT-FaceKit vertices 0 .. ICT_FACE_VERTICES - 1 are the face area (the readme's range
#: 0-9408); the rest are head, neck, mouth socket, eyes, teeth, gums.
ICT_FACE_VERTICES = 9409

#: The 68 Multi-PIE (iBUG) landmark vertex ids of the ICT-FaceKit mesh, 0-based, in order.
ICT_LANDMARKS68 = np.array([
    1225, 1888, 1052, 367, 1719, 1722, 2199, 1447, 966, 3661, 4390, 3927, 3924, 2608, 3272,
    4088, 3443, 268, 493, 1914, 2044, 1401, 3615, 4240, 4114, 2734, 2509, 978, 4527, 4942,
    4857, 1140, 2075, 1147, 4269, 3360, 1507, 1542, 1537, 1528, 1518, 1511, 3742, 3751, 3756,
    3721, 3725, 3732, 5708, 5695, 2081, 0, 4275, 6200, 6213, 6346, 6461, 5518, 5957, 5841,
    5702, 5711, 5533, 6216, 6207, 6470, 5517, 5966,
], dtype=np.int64)

ICT_NEUTRAL = "generic_neutral_mesh.obj"
_ICT_IDENTITY = re.compile(r"identity(\d+)\Z", re.IGNORECASE)

#: FLAME's shapedirs: the first 300 columns are identity, the rest (100) expression.
FLAME_N_SHAPE = 300

N_LANDMARKS = 68


# ====================================================================== helpers
def _no_landmarks() -> np.ndarray:
    return np.full(N_LANDMARKS, -1, np.int64)


def read_landmark_ids(path: PathLike, n_vertices: int) -> np.ndarray:
    """Read 68 iBUG landmark vertex ids (0-based; -1 where the model has no vertex).

    Accepted files: JSON (a list of 68 integers, or an object with a ``"landmarks68"`` list),
    or text with 68 integers separated by white space or commas (``#`` starts a comment).

    Args:
        path: the file.
        n_vertices: the vertex count of the mesh the ids refer to (for the range check).

    Returns:
        (68,) int64 vertex ids.

    Raises:
        ModelError: naming the file, when it is missing, unparsable, has another count, or
            holds ids outside [-1, n_vertices).
    """
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"{p}: landmark file not found")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"{p}: cannot read landmark file ({exc})") from None
    values: Any
    stripped = text.lstrip()
    if p.suffix.lower() == ".json" or stripped[:1] in ("[", "{"):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ModelError(f"{p}: not valid JSON ({exc})") from None
        if isinstance(values, dict):
            if "landmarks68" not in values:
                raise ModelError(f"{p}: JSON object has no 'landmarks68' list")
            values = values["landmarks68"]
        if not isinstance(values, list) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise ModelError(f"{p}: expected a JSON list of integer vertex ids")
    else:
        tokens = re.sub(r"#[^\n]*", " ", text).replace(",", " ").split()
        try:
            values = [int(t) for t in tokens]
        except ValueError as exc:
            raise ModelError(f"{p}: expected integer vertex ids ({exc})") from None
    ids = np.asarray(values, dtype=np.int64)
    if ids.shape != (N_LANDMARKS,):
        raise ModelError(f"{p}: expected {N_LANDMARKS} landmark vertex ids; got {ids.size}")
    bad = (ids < -1) | (ids >= n_vertices)
    if bad.any():
        raise ModelError(f"{p}: landmark ids must be -1 or in [0, {n_vertices}); "
                         f"point {int(np.argmax(bad)) + 1} is {int(ids[bad][0])}")
    return ids


def orient_outward(vertices: np.ndarray, triangles: np.ndarray, *, what: str = "mesh"
                   ) -> np.ndarray:
    """Triangles made counter-clockwise seen from outside, judged at the nose tip.

    The nose tip is taken as the triangle-referenced vertex with the largest z (the model
    frame has z out of the face); when its area-weighted vertex normal points to -z, every
    triangle is flipped. Returns a new (F, 3) int64 array.
    """
    V = np.asarray(vertices, np.float64)
    F = np.asarray(triangles, np.int64)
    used = np.unique(F)
    tip = used[np.argmax(V[used, 2])]
    n = vertex_normals(V, F)[tip]
    if n[2] < 0:
        log.info("%s: triangles are clockwise seen from outside; flipping them", what)
        return F[:, [0, 2, 1]].copy()
    return F.copy()


def _apply_landmarks(model_ids: np.ndarray, landmarks: PathLike | None, n_vertices: int
                     ) -> np.ndarray:
    if landmarks is None:
        return model_ids
    return read_landmark_ids(landmarks, n_vertices)


def _reshape_basis(flat: np.ndarray, n_vertices: int, what: str) -> np.ndarray:
    """(3V, K) interleaved xyz-per-vertex columns -> (V, 3, K) (C order: row 3i+c)."""
    if flat.ndim != 2 or flat.shape[0] != 3 * n_vertices:
        raise ModelError(f"{what} must have shape ({3 * n_vertices}, K); got {flat.shape}")
    return flat.reshape(n_vertices, 3, flat.shape[1])


def _reshape_mean(flat: np.ndarray, what: str) -> np.ndarray:
    flat = np.asarray(flat).reshape(-1)
    if flat.size == 0 or flat.size % 3:
        raise ModelError(f"{what} must hold 3V values (x, y, z per vertex); got {flat.size}")
    return flat.reshape(-1, 3)


def _std_from_variance(var: np.ndarray, what: str) -> np.ndarray:
    var = np.asarray(var, np.float64).reshape(-1)
    scale = max(float(np.abs(var).max(initial=0.0)), 1e-30)
    if np.any(var < -1e-6 * scale):
        raise ModelError(f"{what} holds negative variances")
    return np.sqrt(np.maximum(var, 0.0))


def _triangles_from(cells: np.ndarray, n_vertices: int, one_based: bool, what: str
                    ) -> np.ndarray:
    T = np.asarray(cells)
    if T.ndim != 2 or T.shape[1] != 3 or T.shape[0] == 0:
        raise ModelError(f"{what} must have shape (F, 3); got {T.shape}")
    if T.dtype.kind == "f":
        if not np.all(np.isfinite(T)) or np.any(T != np.round(T)):
            raise ModelError(f"{what} must hold integer vertex ids")
    T = T.astype(np.int64)
    if one_based:
        T = T - 1
    if T.min() < 0 or T.max() >= n_vertices:
        base = 1 if one_based else 0
        raise ModelError(f"{what} index vertices outside [{base}, {n_vertices + base})")
    return T


def _model(src: Path, **kw: Any) -> MorphableModel:
    try:
        return MorphableModel(source=str(src), **kw)
    except ModelError as exc:
        raise ModelError(f"{src}: {exc}") from None


# ==================================================================== OBJ reader
_V_PREFIX = (b"v ", b"v\t")
_F_PREFIX = (b"f ", b"f\t")


def _obj_lines(data: bytes) -> list[bytes]:
    """The lines of an OBJ file, with leading white space removed where there is any."""
    lines = data.split(b"\n")
    if b"\n " in data or b"\n\t" in data or data[:1] in (b" ", b"\t"):
        lines = [line.lstrip() for line in lines]
    return lines


_NEWLINE, _V, _SPACE, _TAB = 10, ord("v"), 32, 9


def _vertex_text(data: bytes) -> tuple[bytes, int] | None:
    """The ``v`` lines of an OBJ, joined by newlines, and their count.

    Vectorised: line starts are found with numpy, and a contiguous block of ``v`` lines
    (the usual layout) is sliced out in one piece. Returns None when some line is indented
    (the caller then takes the line-by-line path).
    """
    buf = np.frombuffer(data, np.uint8)
    nl = np.flatnonzero(buf == _NEWLINE)
    starts = np.concatenate([[0], nl + 1])
    ends = np.concatenate([nl, [buf.size]])
    keep = starts + 1 < buf.size
    starts, ends = starts[keep], ends[keep]
    first = buf[starts]
    if np.any((first == _SPACE) | (first == _TAB)):
        return None
    second = buf[starts + 1]
    is_v = (first == _V) & ((second == _SPACE) | (second == _TAB))
    vs, ve = starts[is_v], ends[is_v]
    if vs.size == 0:
        return b"", 0
    if np.all(vs[1:] == ve[:-1] + 1):
        return data[int(vs[0]):int(ve[-1])], int(vs.size)
    return b"\n".join(data[a:b] for a, b in zip(vs.tolist(), ve.tolist())), int(vs.size)


def _parse_vertices(text: bytes, n: int, path: Path) -> np.ndarray:
    """(n, 3) coordinates from ``n`` newline-separated ``v`` lines."""
    if n == 0:
        return np.zeros((0, 3))
    tokens = text.split()
    try:
        if len(tokens) == 4 * n and tokens[0::4].count(b"v") == n:
            del tokens[0::4]
            return np.array(list(map(float, tokens)), dtype=np.float64).reshape(n, 3)
        # Slow path: comments, w or colour columns, or short lines.
        vlines = text.split(b"\n")
        out = np.empty((n, 3))
        for i, line in enumerate(vlines):
            parts = line.split(b"#", 1)[0].split()
            if len(parts) < 4:
                raise ModelError(f"{path}: vertex {i + 1} has fewer than 3 coordinates: "
                                 f"{line.strip()[:60]!r}")
            out[i] = [float(parts[1]), float(parts[2]), float(parts[3])]
        return out
    except ValueError as exc:
        raise ModelError(f"{path}: unparsable vertex coordinate ({exc})") from None


def _parse_faces(lines: list[bytes], n_vertices: int, path: Path) -> np.ndarray:
    """Fan-triangulated faces in file order (orientation kept), 0-based.

    Negative ids count back from the last vertex defined before the face line.
    """
    tris: list[tuple[int, int, int]] = []
    seen_v = 0
    for number, line in enumerate(lines, start=1):
        head = line[:2]
        if head in _V_PREFIX:
            seen_v += 1
            continue
        if head not in _F_PREFIX:
            continue
        parts = line.split(b"#", 1)[0].split()[1:]
        if len(parts) < 3:
            raise ModelError(f"{path}: line {number}: a face needs at least 3 vertices")
        try:
            ids = [int(p.split(b"/", 1)[0]) for p in parts]
        except ValueError:
            raise ModelError(f"{path}: line {number}: unparsable face "
                             f"{line.strip()[:60]!r}") from None
        if 0 in ids:
            raise ModelError(f"{path}: line {number}: vertex index 0 (OBJ indices are 1-based)")
        row = [k - 1 if k > 0 else seen_v + k for k in ids]
        if min(row) < 0 or max(row) >= n_vertices:
            raise ModelError(f"{path}: line {number}: face indexes a vertex outside the "
                             f"{n_vertices} vertices")
        first = row[0]
        for j in range(1, len(row) - 1):
            tris.append((first, row[j], row[j + 1]))
    return np.array(tris, dtype=np.int64).reshape(-1, 3)


def read_obj(path: PathLike, *, faces: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Read the vertices (and triangulated faces) of a Wavefront OBJ file.

    Reads ``v`` lines (extra values such as ``w`` or vertex colours are ignored) and ``f``
    lines in the ``v``, ``v/vt``, ``v//vn`` and ``v/vt/vn`` forms with 1-based or negative
    (relative) indices; other lines are skipped. Polygons with more than three corners are
    fan-triangulated, keeping their orientation and the file order.

    Args:
        path: the .obj file.
        faces: when False only the vertices are read (faster) and None is returned for faces.

    Returns:
        vertices (V, 3) float64 in the file's units, and triangles (F, 3) int64 0-based.

    Raises:
        ModelError: naming the file, when it is missing or malformed.
    """
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"{p}: file not found")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ModelError(f"{p}: cannot read ({exc})") from None
    lines = None
    found = _vertex_text(data)
    if found is None:
        lines = _obj_lines(data)
        vlines = [line for line in lines if line[:2] in _V_PREFIX]
        found = (b"\n".join(vlines), len(vlines))
    vertices = _parse_vertices(*found, p)
    if vertices.shape[0] == 0:
        raise ModelError(f"{p}: no vertices ('v' lines) in the OBJ file")
    if not np.all(np.isfinite(vertices)):
        raise ModelError(f"{p}: vertex coordinates hold NaN or infinite values")
    if not faces:
        return vertices, None
    return vertices, _parse_faces(_obj_lines(data) if lines is None else lines,
                                  vertices.shape[0], p)


# ================================================================== ICT-FaceKit
def _ict_folder(folder: Path) -> Path:
    for cand in (folder / "FaceXModel", folder):
        if (cand / ICT_NEUTRAL).is_file():
            return cand
    if not folder.exists():
        raise ModelError(f"{folder}: ICT-FaceKit folder not found")
    raise ModelError(f"{folder / 'FaceXModel' / ICT_NEUTRAL}: ICT-FaceKit neutral mesh not found "
                     f"(give the ICT-FaceKit folder or its FaceXModel folder)")


def import_ict_facekit(folder: PathLike, whole_head: bool = False, *,
                       landmarks: PathLike | None = None) -> MorphableModel:
    """Import the ICT-FaceKit model (MIT licence) from its OBJ files.

    Reads ``FaceXModel/generic_neutral_mesh.obj``, the identity meshes ``identityNNN.obj``
    (any number present, in numeric order) and the expression meshes (every other ``.obj`` in
    that folder, ARKit names such as ``jawOpen``, ``mouthSmile_L``, in sorted name order). All
    share one topology; ICT-FaceKit is in centimetres with y up and z toward the viewer (the
    model frame of contract 5), so only the unit changes (cm -> mm).

    Each identity and expression mode is its mesh minus the neutral mesh. ICT-FaceKit's
    identity weights are N(0, 1), so the differences are the identity basis with
    ``id_std = 1``. Expression weights are blendshape weights in [0, 1] (1 = the full
    expression mesh); ``exp_std`` is 1 as well, so coefficient 1 is the full blendshape, and
    ``exp_names`` keeps the file names. The vertex order and the triangle orientation of the
    OBJ files are kept (quads are fan-triangulated).

    Args:
        folder: the ICT-FaceKit folder (or its ``FaceXModel`` subfolder).
        whole_head: keep every vertex (head, neck, mouth socket, eyes, teeth, ...) and mark
            the face area in ``face_region``; by default the model is cropped to the face
            area, vertices 0 .. 9408.
        landmarks: optional landmark file (:func:`read_landmark_ids`) with ids of the full
            mesh, replacing the built-in 68 Multi-PIE ids :data:`ICT_LANDMARKS68`.

    Raises:
        ModelError: naming the file, when one is missing or malformed, or when a mesh has
            another vertex count than the neutral mesh.
    """
    root = Path(folder)
    base = _ict_folder(root)
    neutral_path = base / ICT_NEUTRAL
    neutral, tris = read_obj(neutral_path)
    if tris.shape[0] == 0:
        raise ModelError(f"{neutral_path}: the neutral mesh has no faces")
    n_v = neutral.shape[0]

    identity: list[tuple[int, str, Path]] = []
    expression: list[tuple[str, Path]] = []
    for p in base.iterdir():
        if p.suffix.lower() != ".obj" or not p.is_file() or p.name == ICT_NEUTRAL:
            continue
        m = _ICT_IDENTITY.match(p.stem)
        if m:
            identity.append((int(m.group(1)), p.stem, p))
        else:
            expression.append((p.stem, p))
    identity.sort()
    expression.sort()

    def deltas(paths: list[Path]) -> np.ndarray:
        out = np.empty((n_v, 3, len(paths)), np.float32)
        for k, path in enumerate(paths):
            v, _ = read_obj(path, faces=False)
            if v.shape[0] != n_v:
                raise ModelError(f"{path}: has {v.shape[0]} vertices; the neutral mesh "
                                 f"{neutral_path.name} has {n_v}")
            out[:, :, k] = (v - neutral) * CM_TO_MM
        return out

    id_basis = deltas([p for _, _, p in identity])
    exp_basis = deltas([p for _, p in expression])
    log.info("ICT-FaceKit: %d vertices, %d identity and %d expression meshes",
             n_v, len(identity), len(expression))

    lm = ICT_LANDMARKS68.copy()
    if landmarks is not None:
        lm = read_landmark_ids(landmarks, n_v)
    elif n_v <= int(lm.max()):
        log.warning("%s: only %d vertices; ICT-FaceKit landmark ids beyond that become -1",
                    neutral_path, n_v)
        lm = np.where(lm < n_v, lm, -1)

    n_face = min(ICT_FACE_VERTICES, n_v)
    region = np.arange(n_v) < n_face
    model = _model(
        root,
        mean=neutral * CM_TO_MM, id_basis=id_basis, id_std=np.ones(id_basis.shape[2]),
        exp_basis=exp_basis, exp_std=np.ones(exp_basis.shape[2]), triangles=tris,
        landmarks68=lm, name="ICT-FaceKit" + (" (whole head)" if whole_head else " (face)"),
        license=LICENSE_ICT, face_region=region,
        exp_names=tuple(name for name, _ in expression),
        exp_lower=np.zeros(len(expression)),
        id_names=tuple(name for _, name, _ in identity),
    )
    if whole_head or n_face == n_v:
        return model
    try:
        return model.crop(np.arange(n_face))
    except ModelError as exc:
        raise ModelError(f"{neutral_path}: cannot crop to the face area ({exc})") from None


# ============================================================ Surrey Face Model
_SFM_EXTRA = "install the 'sfm' extra: pip install 'faceps[sfm]'"


def _import_eos() -> Any:
    try:
        import eos  # noqa: F401
        import eos.morphablemodel
    except ImportError:
        raise ModelError(f"reading the Surrey Face Model needs eos-py; {_SFM_EXTRA}") from None
    return eos


def _sfm_files(src: Path) -> tuple[Path, Path]:
    """The shape-model .bin and the folder holding its companion files."""
    if src.is_file():
        return src, src.parent
    if not src.is_dir():
        raise ModelError(f"{src}: Surrey Face Model folder or .bin file not found")
    preferred = src / "sfm_shape_3448.bin"
    if preferred.is_file():
        return preferred, src
    cands = sorted(p for p in src.glob("sfm_*.bin") if p.is_file())
    if len(cands) == 1:
        return cands[0], src
    if not cands:
        raise ModelError(f"{preferred}: Surrey Face Model file not found")
    raise ModelError(f"{src}: several Surrey Face Model files ({', '.join(p.name for p in cands)})"
                     f"; give the .bin path")


def read_sfm_landmark_mapping(path: PathLike, n_vertices: int) -> np.ndarray:
    """Read eos's ``ibug_to_sfm.txt`` (TOML ``[landmark_mappings]``: iBUG id = vertex id).

    iBUG ids are 1-based in the file; the result is (68,) int64 vertex ids with -1 for the
    unmapped points (e.g. the contour and the inner mouth corners).

    Raises:
        ModelError: naming the file, for unparsable lines or out-of-range ids.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"{p}: cannot read landmark mapping ({exc})") from None
    out = _no_landmarks()
    section = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("["):
            section = line.strip("[] ")
            continue
        if section != "landmark_mappings":
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ModelError(f"{p}: line {number}: expected 'ibug_id = vertex_id'")
        try:
            ibug = int(key.strip().strip("'\""))
            vid = int(value.strip().strip("'\""))
        except ValueError:
            raise ModelError(f"{p}: line {number}: expected integers, got {raw.strip()!r}"
                             ) from None
        if not 1 <= ibug <= N_LANDMARKS:
            raise ModelError(f"{p}: line {number}: iBUG id {ibug} outside 1..{N_LANDMARKS}")
        if not 0 <= vid < n_vertices:
            log.warning("%s: line %d: vertex %d is not in this %d-vertex model; point %d "
                        "left unmapped", p, number, vid, n_vertices, ibug)
            continue
        out[ibug - 1] = vid
    return out


def _eos_pca(pca: Any, n_vertices: int, what: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean (V, 3), orthonormal basis (V, 3, K), std (K,)) of an eos PcaModel."""
    mean = _reshape_mean(np.asarray(pca.get_mean(), np.float64), f"{what} mean")
    if mean.shape[0] != n_vertices:
        raise ModelError(f"{what} has {mean.shape[0]} vertices; expected {n_vertices}")
    basis = _reshape_basis(np.asarray(pca.get_orthonormal_pca_basis(), np.float64),
                           n_vertices, f"{what} basis")
    std = _std_from_variance(np.asarray(pca.get_eigenvalues()), f"{what} eigenvalues")
    if std.shape[0] != basis.shape[2]:
        raise ModelError(f"{what}: {std.shape[0]} eigenvalues for {basis.shape[2]} components")
    return mean, basis, std


def _eos_blendshapes(shapes: Sequence[Any], n_vertices: int, what: str
                     ) -> tuple[np.ndarray, tuple[str, ...]]:
    basis = np.empty((n_vertices, 3, len(shapes)), np.float32)
    names = []
    for k, b in enumerate(shapes):
        d = np.asarray(b.deformation, np.float64).reshape(-1)
        if d.size != 3 * n_vertices:
            raise ModelError(f"{what}: blendshape '{b.name}' has {d.size // 3} vertices; "
                             f"the shape model has {n_vertices}")
        basis[:, :, k] = d.reshape(n_vertices, 3)
        names.append(str(b.name) or f"blendshape{k}")
    return basis, tuple(names)


def import_sfm(src: PathLike, *, landmarks: PathLike | None = None) -> MorphableModel:
    """Import the Surrey Face Model (non-commercial licence) through eos-py.

    Reads ``sfm_shape_3448.bin`` (or the one ``sfm_*.bin`` of the folder, or the given
    ``.bin``), ``expression_blendshapes_<V>.bin`` and ``ibug_to_sfm.txt`` from the same folder.
    The SFM is in millimetres with y up and z toward the viewer. The identity model is the
    orthonormal PCA basis with ``id_std = sqrt(eigenvalues)``; the expression blendshapes
    become expression modes with ``exp_std = 1`` and their names (a model with a separate
    PCA expression model gets that instead). A colour model, when the file has one, becomes
    the albedo model (eos colour values in [0, 1], taken as linear RGB). Missing
    blendshapes or mapping files give a model without expressions or landmarks (logged).
    The iBUG ids of the mapping file (1-based) become ``landmarks68``; unmapped points are -1.

    Needs the optional dependency eos-py (``pip install 'faceps[sfm]'``), imported only here.

    Raises:
        ModelError: when eos-py is missing, or naming the file that is missing or malformed.
    """
    src_path = Path(src)
    shape_path, folder = _sfm_files(src_path)
    eos = _import_eos()
    try:
        m = eos.morphablemodel.load_model(str(shape_path))
    except (RuntimeError, MemoryError, ValueError) as exc:
        raise ModelError(f"{shape_path}: not a readable Surrey Face Model ({exc})") from None
    shape_model = m.get_shape_model()
    n_v = int(shape_model.get_data_dimension()) // 3
    mean, id_basis, id_std = _eos_pca(shape_model, n_v, f"{shape_path}: shape model")
    tris = _triangles_from(np.asarray(shape_model.get_triangle_list()), n_v, False,
                           f"{shape_path}: triangle list")
    tris = orient_outward(mean, tris, what=str(shape_path))

    exp_basis = np.zeros((n_v, 3, 0), np.float32)
    exp_std = np.zeros(0)
    exp_names: tuple[str, ...] | None = None
    if m.has_separate_expression_model():
        expr = m.get_expression_model()
        if isinstance(expr, list):
            exp_basis, exp_names = _eos_blendshapes(expr, n_v, str(shape_path))
            exp_std = np.ones(exp_basis.shape[2])
        else:
            exp_mean, exp_basis, exp_std = _eos_pca(expr, n_v, f"{shape_path}: expression model")
            mean = mean + exp_mean
    else:
        bs_path = folder / f"expression_blendshapes_{n_v}.bin"
        if bs_path.is_file():
            try:
                shapes = eos.morphablemodel.load_blendshapes(str(bs_path))
            except (RuntimeError, MemoryError, ValueError) as exc:
                raise ModelError(f"{bs_path}: not readable blendshapes ({exc})") from None
            exp_basis, exp_names = _eos_blendshapes(shapes, n_v, str(bs_path))
            exp_std = np.ones(exp_basis.shape[2])
        else:
            log.warning("%s not found: the model has no expression modes", bs_path)

    albedo: dict[str, Any] = {}
    if m.has_color_model():
        c_mean, c_basis, c_std = _eos_pca(m.get_color_model(), n_v, f"{shape_path}: colour model")
        albedo = {"albedo_mean": c_mean, "albedo_basis": c_basis, "albedo_std": c_std}

    if landmarks is not None:
        lm = read_landmark_ids(landmarks, n_v)
    elif (folder / "ibug_to_sfm.txt").is_file():
        lm = read_sfm_landmark_mapping(folder / "ibug_to_sfm.txt", n_v)
    else:
        log.warning("%s not found: the model has no landmarks", folder / "ibug_to_sfm.txt")
        lm = _no_landmarks()

    return _model(src_path, mean=mean, id_basis=id_basis, id_std=id_std,
                  exp_basis=exp_basis, exp_std=exp_std, triangles=tris, landmarks68=lm,
                  name=f"Surrey Face Model {n_v}", license=LICENSE_SFM, exp_names=exp_names,
                  exp_lower=np.zeros(exp_basis.shape[2]),
                  **albedo)


# ===================================================================== BFM 2009
_BFM2009_VARS = ("shapeMU", "shapePC", "shapeEV", "texMU", "texPC", "texEV", "tl")


def _read_mat(path: Path, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Variables of a MATLAB file: v5 via scipy.io, v7.3 (HDF5) via h5py (transposed back)."""
    import h5py

    if not path.is_file():
        raise ModelError(f"{path}: file not found")
    out: dict[str, np.ndarray] = {}
    if h5py.is_hdf5(str(path)):
        try:
            with h5py.File(path, "r") as f:
                for name in names:
                    if name in f:
                        obj = f[name]
                        if not isinstance(obj, h5py.Dataset):
                            raise ModelError(f"{path}: '{name}' is not a numeric array")
                        # MATLAB stores column-major: h5py sees the transposed array.
                        out[name] = np.asarray(obj[()]).T
        except ModelError:
            raise
        except (OSError, KeyError, ValueError, TypeError) as exc:
            raise ModelError(f"{path}: not a readable MATLAB v7.3 file ({exc})") from None
        return out
    import scipy.io

    try:
        data = scipy.io.loadmat(str(path), variable_names=list(names))
    except MemoryError:
        raise ModelError(f"{path}: malformed MATLAB file (implausible array sizes)") from None
    except Exception as exc:  # scipy raises many types for damaged files
        raise ModelError(f"{path}: not a readable MATLAB file ({type(exc).__name__}: {exc})"
                         ) from None
    for name in names:
        if name in data:
            out[name] = np.asarray(data[name])
    return out


def _numeric(arrays: dict[str, np.ndarray], name: str, path: Path) -> np.ndarray:
    if name not in arrays:
        raise ModelError(f"{path}: missing variable '{name}'")
    a = arrays[name]
    if a.dtype.kind not in "biuf":
        raise ModelError(f"{path}: '{name}' must be numeric; got {a.dtype}")
    return np.asarray(a, np.float64)


def import_bfm2009(path: PathLike, *, landmarks: PathLike | None = None) -> MorphableModel:
    """Import the Basel Face Model 2009 (``01_MorphableModel.mat``; non-commercial licence).

    Reads ``shapeMU`` (3V, 1), ``shapePC`` (3V, K), ``shapeEV`` (K, 1) standard deviations,
    ``texMU``/``texPC``/``texEV`` (colour 0..255), and ``tl`` (F, 3) 1-based triangles from
    a MATLAB v5 file (scipy.io) or a v7.3 file (HDF5, read with h5py). Vectors interleave
    x, y, z per vertex. BFM 2009 coordinates are micrometres (converted to mm) with y up and
    z toward the viewer. The colour model becomes the albedo model divided by 255 and taken
    as linear RGB (no sRGB decoding). Triangles are made counter-clockwise seen from outside
    (:func:`orient_outward`). There is no expression model (``exp_basis`` is (V, 3, 0)).
    Landmarks are -1 unless ``landmarks`` names a file of 68 vertex ids.

    Raises:
        ModelError: naming the file and what is missing or malformed.
    """
    p = Path(path)
    arrays = _read_mat(p, _BFM2009_VARS)
    mean = _reshape_mean(_numeric(arrays, "shapeMU", p), f"{p}: 'shapeMU'") * UM_TO_MM
    n_v = mean.shape[0]
    id_basis = _reshape_basis(_numeric(arrays, "shapePC", p), n_v, f"{p}: 'shapePC'") * UM_TO_MM
    id_std = _numeric(arrays, "shapeEV", p).reshape(-1)
    if id_std.shape[0] != id_basis.shape[2]:
        raise ModelError(f"{p}: 'shapeEV' has {id_std.shape[0]} values for "
                         f"{id_basis.shape[2]} components of 'shapePC'")
    tris = _triangles_from(_numeric(arrays, "tl", p), n_v, True, f"{p}: 'tl'")
    tris = orient_outward(mean, tris, what=str(p))

    albedo: dict[str, Any] = {}
    if "texMU" in arrays:
        tex_mean = _reshape_mean(_numeric(arrays, "texMU", p), f"{p}: 'texMU'") / 255.0
        if tex_mean.shape[0] != n_v:
            raise ModelError(f"{p}: 'texMU' has {tex_mean.shape[0]} vertices; 'shapeMU' has {n_v}")
        albedo["albedo_mean"] = tex_mean
        if "texPC" in arrays:
            tex_basis = _reshape_basis(_numeric(arrays, "texPC", p), n_v, f"{p}: 'texPC'") / 255.0
            tex_std = _numeric(arrays, "texEV", p).reshape(-1)
            if tex_std.shape[0] != tex_basis.shape[2]:
                raise ModelError(f"{p}: 'texEV' has {tex_std.shape[0]} values for "
                                 f"{tex_basis.shape[2]} components of 'texPC'")
            albedo.update(albedo_basis=tex_basis, albedo_std=tex_std)

    lm = _apply_landmarks(_no_landmarks(), landmarks, n_v)
    return _model(p, mean=mean, id_basis=id_basis, id_std=id_std,
                  exp_basis=np.zeros((n_v, 3, 0)), exp_std=np.zeros(0), triangles=tris,
                  landmarks68=lm, name="BFM 2009", license=LICENSE_BFM, **albedo)


# ============================================================= BFM 2017 / 2019
def _h5_pca(f: Any, group: str, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(mean (3V,), basis (3V, K), std (K,)) of a statismo model group, or None if absent."""
    import h5py

    if group not in f:
        return None
    g = f[group]
    parts = {}
    for key in ("mean", "pcaBasis", "pcaVariance"):
        obj = g.get(key) if isinstance(g, h5py.Group) else None
        if not isinstance(obj, h5py.Dataset):
            raise ModelError(f"{path}: missing dataset '{group}/{key}'")
        arr = np.asarray(obj[()])
        if arr.dtype.kind not in "biuf":
            raise ModelError(f"{path}: '{group}/{key}' must be numeric; got {arr.dtype}")
        parts[key] = arr.astype(np.float64)
    mean = parts["mean"].reshape(-1)
    basis = parts["pcaBasis"]
    if basis.ndim != 2 or basis.shape[0] != mean.size:
        raise ModelError(f"{path}: '{group}/pcaBasis' must have shape ({mean.size}, K); "
                         f"got {basis.shape}")
    std = _std_from_variance(parts["pcaVariance"], f"{path}: '{group}/pcaVariance'")
    if std.shape[0] != basis.shape[1]:
        raise ModelError(f"{path}: '{group}/pcaVariance' has {std.shape[0]} values for "
                         f"{basis.shape[1]} components")
    return mean, basis, std


def _import_bfm_h5(path: PathLike, year: int, landmarks: PathLike | None) -> MorphableModel:
    import h5py

    p = Path(path)
    if not p.is_file():
        raise ModelError(f"{p}: file not found")
    if not h5py.is_hdf5(str(p)):
        raise ModelError(f"{p}: not an HDF5 file (expected a BFM {year} .h5 model)")
    try:
        with h5py.File(p, "r") as f:
            shape = _h5_pca(f, "shape/model", p)
            if shape is None:
                raise ModelError(f"{p}: missing group 'shape/model'")
            cells_obj = f.get("shape/representer/cells")
            if not isinstance(cells_obj, h5py.Dataset):
                raise ModelError(f"{p}: missing dataset 'shape/representer/cells'")
            cells = np.asarray(cells_obj[()])
            color = _h5_pca(f, "color/model", p)
            expression = _h5_pca(f, "expression/model", p)
    except ModelError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise ModelError(f"{p}: not a readable BFM {year} file ({exc})") from None

    mean = _reshape_mean(shape[0], f"{p}: 'shape/model/mean'")
    n_v = mean.shape[0]
    id_basis = _reshape_basis(shape[1], n_v, f"{p}: 'shape/model/pcaBasis'")
    if cells.ndim != 2 or cells.shape[0] != 3:
        raise ModelError(f"{p}: 'shape/representer/cells' must have shape (3, F); "
                         f"got {cells.shape}")
    tris = _triangles_from(cells.T, n_v, False, f"{p}: 'shape/representer/cells'")

    exp_basis = np.zeros((n_v, 3, 0))
    exp_std = np.zeros(0)
    if expression is not None:
        exp_mean = _reshape_mean(expression[0], f"{p}: 'expression/model/mean'")
        if exp_mean.shape[0] != n_v:
            raise ModelError(f"{p}: the expression model has {exp_mean.shape[0]} vertices; "
                             f"the shape model has {n_v}")
        # The statismo expression model is a deformation model: its mean adds to the shape.
        mean = mean + exp_mean
        exp_basis = _reshape_basis(expression[1], n_v, f"{p}: 'expression/model/pcaBasis'")
        exp_std = expression[2]
    tris = orient_outward(mean, tris, what=str(p))

    albedo: dict[str, Any] = {}
    if color is not None:
        c_mean = _reshape_mean(color[0], f"{p}: 'color/model/mean'")
        if c_mean.shape[0] != n_v:
            raise ModelError(f"{p}: the colour model has {c_mean.shape[0]} vertices; the "
                             f"shape model has {n_v}")
        albedo = {"albedo_mean": c_mean,
                  "albedo_basis": _reshape_basis(color[1], n_v, f"{p}: 'color/model/pcaBasis'"),
                  "albedo_std": color[2]}

    lm = _apply_landmarks(_no_landmarks(), landmarks, n_v)
    return _model(p, mean=mean, id_basis=id_basis, id_std=shape[2], exp_basis=exp_basis,
                  exp_std=exp_std, triangles=tris, landmarks68=lm,
                  name=f"BFM {year} ({p.stem})", license=LICENSE_BFM, **albedo)


def import_bfm2017(path: PathLike, *, landmarks: PathLike | None = None) -> MorphableModel:
    """Import the Basel Face Model 2017 (statismo HDF5; non-commercial research licence).

    Reads ``shape/model/mean`` (3V,), ``shape/model/pcaBasis`` (3V, K) orthonormal,
    ``shape/model/pcaVariance`` (K,) (``id_std = sqrt``), ``shape/representer/cells`` (3, F)
    0-based triangles, and when present ``color/model/*`` (same layout, colour in [0, 1],
    taken as linear RGB albedo) and ``expression/model/*`` (its mean is added to the shape
    mean). Units are millimetres, y up, z toward the viewer. Triangles are made
    counter-clockwise seen from outside (:func:`orient_outward`). Landmarks are -1 unless
    ``landmarks`` names a file of 68 vertex ids.

    Raises:
        ModelError: naming the file and the missing or malformed dataset.
    """
    return _import_bfm_h5(path, 2017, landmarks)


def import_bfm2019(path: PathLike, *, landmarks: PathLike | None = None) -> MorphableModel:
    """Import the Basel Face Model 2019: the same layout and reader as :func:`import_bfm2017`."""
    return _import_bfm_h5(path, 2019, landmarks)


# ========================================================================= FLAME
def import_flame(path: PathLike, *, landmarks: PathLike | None = None) -> MorphableModel:
    """Import FLAME (``generic_model.pkl``; non-commercial licence) without running pickled code.

    The pickle is read by :func:`faceps.model.safe_pickle.load_pickle`, which admits only
    numpy arrays, scipy sparse matrices and chumpy values (as inert stand-ins). Fields used:
    ``v_template`` (V, 3) metres, ``shapedirs`` (V, 3, K): the first 300 columns are
    identity, the rest (100 in FLAME 2020) expression, both with N(0, 1) coefficients, so
    ``id_std = exp_std = 1``; ``f`` (F, 3) triangles. ``posedirs``, ``J_regressor`` and
    ``weights`` (pose and skinning) are ignored. Metres become millimetres; FLAME already has
    y up and z toward the viewer. Triangles are made counter-clockwise seen from outside
    (:func:`orient_outward`).

    FLAME's own landmark embedding places points by barycentric coordinates inside
    triangles, which contract 5 cannot hold, so ``landmarks68`` is -1 unless ``landmarks``
    names a file of 68 vertex ids.

    Raises:
        ModelError: naming the file, when it is malformed, lacks a field, or the pickle
            refers to anything outside the allowed classes.
    """
    p = Path(path)
    data = load_pickle(p)
    if not isinstance(data, dict):
        raise ModelError(f"{p}: expected a pickled dict of FLAME fields; got "
                         f"{type(data).__name__}")

    def field(name: str) -> np.ndarray:
        if name not in data:
            raise ModelError(f"{p}: missing field '{name}'")
        try:
            return as_array(data[name], name)
        except ModelError as exc:
            raise ModelError(f"{p}: {exc}") from None

    template = np.asarray(field("v_template"), np.float64)
    if template.ndim != 2 or template.shape[1] != 3 or template.shape[0] < 3:
        raise ModelError(f"{p}: 'v_template' must have shape (V, 3); got {template.shape}")
    n_v = template.shape[0]
    dirs = np.asarray(field("shapedirs"), np.float64)
    if dirs.ndim != 3 or dirs.shape[:2] != (n_v, 3):
        raise ModelError(f"{p}: 'shapedirs' must have shape ({n_v}, 3, K); got {dirs.shape}")
    tris = _triangles_from(field("f"), n_v, False, f"{p}: 'f'")
    mean = template * M_TO_MM
    dirs = dirs * M_TO_MM
    n_id = min(FLAME_N_SHAPE, dirs.shape[2])
    tris = orient_outward(mean, tris, what=str(p))
    lm = _apply_landmarks(_no_landmarks(), landmarks, n_v)
    return _model(p, mean=mean, id_basis=dirs[:, :, :n_id], id_std=np.ones(n_id),
                  exp_basis=dirs[:, :, n_id:], exp_std=np.ones(dirs.shape[2] - n_id),
                  triangles=tris, landmarks68=lm, name=f"FLAME ({p.stem})",
                  license=LICENSE_FLAME)


# ==================================================================== dispatcher
_IMPORTERS: dict[str, Callable[..., MorphableModel]] = {
    "ict-facekit": import_ict_facekit,
    "sfm": import_sfm,
    "bfm2009": import_bfm2009,
    "bfm2017": import_bfm2017,
    "bfm2019": import_bfm2019,
    "flame": import_flame,
}

#: The model kinds :func:`import_model` reads.
KINDS = tuple(_IMPORTERS)


def import_model(kind: str, src: PathLike, *, whole_head: bool = False,
                 landmarks: PathLike | None = None) -> MorphableModel:
    """Import a research morphable model of the given kind (see the module table).

    Args:
        kind: one of :data:`KINDS` (case-insensitive; ``_`` may stand for ``-``).
        src: the model's folder or file.
        whole_head: ICT-FaceKit only: keep the whole head instead of the face area. The
            other models are always imported whole.
        landmarks: optional file of 68 iBUG vertex ids (:func:`read_landmark_ids`) that
            replaces the model's own landmarks.

    Raises:
        ModelError: for an unknown kind, or from the importer (naming the file).
    """
    key = str(kind).strip().lower().replace("_", "-")
    if key not in _IMPORTERS:
        raise ModelError(f"unknown model kind '{kind}'; expected one of {', '.join(KINDS)}")
    if key == "ict-facekit":
        return import_ict_facekit(src, whole_head=whole_head, landmarks=landmarks)
    if whole_head:
        log.info("--whole-head applies to ict-facekit only; %s is imported whole", key)
    return _IMPORTERS[key](src, landmarks=landmarks)
