"""Visual report of reconstructions: one self-contained HTML page per folder or comparison.

:func:`write_report` turns a reconstruction folder (contract 2 of DESIGN.md, written by
``faceps reconstruct`` or ``faceps infer``) into ``OUT_DIR/report.html``:

- the input images, when the session is known (given, named in ``report.json``, or the
  parent of a synthetic session's ``ground_truth/`` folder);
- the normal map, the fitted proxy's normals (rendered from ``proxy.json`` with the
  session's camera when the morphable model is available), the albedo and the depth
  (colour-mapped, with a colour bar in mm);
- ``mesh.ply`` shaded from two viewpoints (frontal and turned by 45 degrees; Lambertian,
  a headlight at the viewer, ray cast with :class:`faceps.core.raycast.RayCaster`);
- with a ground truth (contract 3 ``ground_truth/``): a table of errors (angular error
  mean and median in degrees, % of pixels below 11.25/20/30 degrees, coverage of the face
  region, depth error after removing the median offset, mm) and error maps with colour
  bars;
- the per-stage timings and the warnings of ``report.json``.

:func:`write_comparison` puts several reconstructions of one session side by side (the
page of ``faceps demo``). Both accept extra :class:`Section` objects.

The page embeds every picture as a base64 PNG data URI and carries its CSS inline: no
script, no network reference; it is written atomically.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from faceps import __version__
from faceps.core.atomic import atomic_path
from faceps.core.errors import FacepsError, SessionError, ShapeError
from faceps.core.imageio import normals_to_rgb
from faceps.core.viz import error_map, tonemap

log = logging.getLogger(__name__)

__all__ = [
    "REPORT_NAME",
    "Figure",
    "FigureGrid",
    "Table",
    "Section",
    "GroundTruth",
    "ReconstructionFolder",
    "Scores",
    "load_reconstruction",
    "load_ground_truth",
    "score",
    "ProxyRender",
    "render_proxy",
    "mesh_views",
    "render_page",
    "write_report",
    "write_comparison",
]

#: file name of the page inside a reconstruction folder
REPORT_NAME = "report.html"
#: upper end of the angular error colour scale (degrees)
ANGLE_VMAX = 30.0
#: thresholds of the "% below" columns (degrees)
THRESHOLDS = (11.25, 20.0, 30.0)
#: yaw angles of the two mesh views (degrees)
VIEW_YAWS = (0.0, 45.0)
#: size (W, H) of a mesh view in pixels
VIEW_SIZE = (300, 340)
#: pictures of the single-folder page and of the comparison page are this tall (pixels)
TILE_HEIGHT = 320
COMPARE_HEIGHT = 260
_BACKGROUND = 236  # grey level behind the mesh renders


# ------------------------------------------------------------------ page content
@dataclass
class Figure:
    """One picture of the page.

    Attributes:
        image: (H, W, 3) uint8 RGB (or (H, W) grey).
        caption: text under it.
    """

    image: np.ndarray
    caption: str = ""


@dataclass
class FigureGrid:
    """Pictures in a table: one row per item (e.g. a method), one column per kind.

    Attributes:
        columns: column titles.
        rows: (row label, one :class:`Figure` or None per column).
    """

    columns: Sequence[str]
    rows: Sequence[tuple[str, Sequence[Figure | None]]]


@dataclass
class Table:
    """A table of text.

    Attributes:
        header: column titles.
        rows: cells; ``str`` is escaped, numbers are formatted with ``digits`` decimals,
            None shows as an en dash.
        caption: text above the table.
        digits: decimals of float cells.
        collapsed: shown folded (an HTML ``<details>`` element) under ``caption``.
    """

    header: Sequence[str]
    rows: Sequence[Sequence[Any]]
    caption: str = ""
    digits: int = 2
    collapsed: bool = False


@dataclass
class Section:
    """A section of the page: a title, then notes, paragraphs, tables, grids, figures.

    Attributes:
        title: heading.
        paragraphs: plain text paragraphs (escaped).
        notes: highlighted remarks (warnings, skipped steps).
        tables: :class:`Table` objects.
        grids: :class:`FigureGrid` objects.
        figures: pictures side by side.
        anchor: id of the section (default: from the title).
    """

    title: str
    paragraphs: Sequence[str] = ()
    notes: Sequence[str] = ()
    tables: Sequence[Table] = ()
    grids: Sequence[FigureGrid] = ()
    figures: Sequence[Figure] = ()
    anchor: str | None = None


# ------------------------------------------------------------------ inputs
@dataclass
class ReconstructionFolder:
    """The maps of a contract-2 folder.

    Attributes:
        path: the folder.
        normals: (H, W, 3) float32 unit normals, NaN outside.
        depth: (H, W) float32 mm, NaN outside (all NaN when the file is missing).
        albedo: (H, W, 3) float32 linear albedo, NaN outside or unknown (all NaN when
            missing).
        mask: (H, W) bool reconstructed region (finite normals when ``mask.png`` is missing).
        report: the ``report.json`` content ({} when missing or unreadable).
        proxy: the ``proxy.json`` content ({} when missing or unreadable).
        notes: what was missing or unreadable (shown on the page).
    """

    path: Path
    normals: np.ndarray
    depth: np.ndarray
    albedo: np.ndarray
    mask: np.ndarray
    report: dict
    proxy: dict
    notes: list[str] = field(default_factory=list)

    @property
    def size(self) -> tuple[int, int]:
        """(W, H)."""
        return self.normals.shape[1], self.normals.shape[0]

    @property
    def mesh_path(self) -> Path:
        return self.path / "mesh.ply"


def _load_array(path: Path, what: str, error: type[FacepsError] = FacepsError) -> np.ndarray:
    """``np.load`` without pickle; any failure is a project error naming the file."""
    if not path.is_file():
        raise error(f"{path}: missing (the {what})")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        reason = ("not a .npy array file, or one holding pickled objects (never loaded)"
                  if "pickle" in str(exc) else str(exc))
        raise error(f"{path}: unreadable {what}: {reason}") from None


def _load_json(path: Path, notes: list[str]) -> dict:
    if not path.is_file():
        notes.append(f"{path.name} is missing")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        notes.append(f"{path.name} is unreadable ({exc})")
        return {}
    return data if isinstance(data, dict) else {}


def _read_mask(path: Path) -> np.ndarray | None:
    import cv2

    if not path.is_file():
        return None
    m = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    return None if m is None else m > 0


def load_reconstruction(out_dir: str | os.PathLike) -> ReconstructionFolder:
    """Read the maps of a reconstruction folder (contract 2).

    ``normals.npy`` is required; the other files are optional (their absence is noted).

    Raises:
        FacepsError: the folder or ``normals.npy`` is missing or unreadable (the message
            names the file).
        ShapeError: a map has the wrong shape (the message names the file).
    """
    path = Path(out_dir)
    if not path.is_dir():
        raise FacepsError(f"{path}: no such reconstruction folder")
    notes: list[str] = []
    normals = _load_array(path / "normals.npy",
                          "normal map of a contract-2 reconstruction folder")
    if normals.ndim != 3 or normals.shape[2] != 3 or not np.issubdtype(normals.dtype,
                                                                          np.floating):
        raise ShapeError(f"{path / 'normals.npy'}: expected a float (H, W, 3) normal map; got "
                         f"{normals.dtype} {normals.shape}")
    H, W = normals.shape[:2]
    normals = normals.astype(np.float32)
    maps: dict[str, np.ndarray] = {}
    for name, shape in (("depth", (H, W)), ("albedo", (H, W, 3))):
        file = path / f"{name}.npy"
        try:
            arr = _load_array(file, f"{name} map")
        except FacepsError as exc:
            notes.append(str(exc).replace(f"{file}: ", f"{file.name}: "))
            arr = np.full(shape, np.nan, np.float32)
        if arr.shape != shape:
            raise ShapeError(f"{file}: expected shape {shape} (the normal map's size); got "
                             f"{arr.shape}")
        maps[name] = arr.astype(np.float32)
    mask = _read_mask(path / "mask.png")
    finite = np.all(np.isfinite(normals), -1)
    if mask is None or mask.shape != (H, W):
        if mask is not None:
            notes.append(f"mask.png has shape {mask.shape}, not {(H, W)}: ignored")
        mask = finite
    report = _load_json(path / "report.json", notes)
    proxy = _load_json(path / "proxy.json", notes)
    if not (path / "mesh.ply").is_file():
        notes.append("mesh.ply is missing")
    return ReconstructionFolder(path, normals, maps["depth"], maps["albedo"], mask & finite,
                                report, proxy, notes)


@dataclass
class GroundTruth:
    """The ground truth of a synthetic session (contract 3 ``ground_truth/``).

    Attributes:
        path: the folder.
        normals: (H, W, 3) float32; depth: (H, W) float32 mm; NaN outside.
        region: (H, W) bool pixels scored: the face region (``face_mask.png``), else
            ``mask.png``, else the finite normals.
        region_name: which of these it is.
    """

    path: Path
    normals: np.ndarray
    depth: np.ndarray
    region: np.ndarray
    region_name: str


def load_ground_truth(path: str | os.PathLike) -> GroundTruth:
    """Read ``normals.npy``, ``depth.npy`` and ``face_mask.png`` / ``mask.png`` of a
    ground-truth folder.

    Raises:
        SessionError: a missing folder or normal map, or unreadable / misshapen maps
            (naming the file).
    """
    gt = Path(path)
    if not gt.is_dir():
        raise SessionError("no such ground-truth folder", path=gt)
    normals = _load_array(gt / "normals.npy", "ground-truth normals", SessionError)
    if normals.ndim != 3 or normals.shape[2] != 3:
        raise SessionError(f"expected (H, W, 3) normals; got {normals.shape}",
                           path=gt / "normals.npy")
    H, W = normals.shape[:2]
    if (gt / "depth.npy").is_file():
        depth = _load_array(gt / "depth.npy", "ground-truth depth", SessionError)
        if depth.shape != (H, W):
            raise SessionError(f"expected shape {(H, W)}; got {depth.shape}",
                               path=gt / "depth.npy")
    else:
        depth = np.full((H, W), np.nan, np.float32)
    finite = np.all(np.isfinite(normals), -1)
    region, name = finite, "finite ground-truth normals"
    for file, what in (("face_mask.png", "face region"), ("mask.png", "rendered face")):
        m = _read_mask(gt / file)
        if m is not None and m.shape == (H, W):
            region, name = m & finite, f"{what} ({file})"
            break
    return GroundTruth(gt, normals.astype(np.float32), depth.astype(np.float32), region, name)


def _find_session(session: str | os.PathLike | None, folders: Sequence[ReconstructionFolder],
                  ground_truth: Path | None) -> Path | None:
    """The session folder: given, named in a report.json, or the ground truth's parent."""
    candidates: list[Path] = []
    if session is not None:
        candidates.append(Path(session))
    for f in folders:
        for key in ("session", "session_path"):
            value = f.report.get(key)
            if isinstance(value, str) and value:
                p = Path(value)
                candidates.append(p if p.is_absolute() else f.path / p)
    if ground_truth is not None:
        candidates.append(ground_truth.parent)
    for p in candidates:
        if (p / "session.json").is_file() or (p.is_file() and p.suffix == ".json"):
            return p
    return None


def _load_capture(session: Path | None, notes: list[str]) -> Any:
    """The ingested session, or None (with a note) when absent or unreadable."""
    if session is None:
        notes.append("the session is not known (pass it to show the input images and the "
                     "proxy normals)")
        return None
    from faceps.capture import load_session

    try:
        return load_session(session)
    except FacepsError as exc:
        notes.append(f"the session could not be read: {exc}")
        return None


# ------------------------------------------------------------------ scores
@dataclass
class Scores:
    """Errors of a reconstruction against a ground truth.

    Attributes:
        stats: ``count``, ``mean``, ``median``, ``below_11.25``, ``below_20``,
            ``below_30`` (degrees, %), ``coverage`` (% of the scored region with a
            normal), ``depth_mae_mm``, ``depth_median_mm``, ``depth_rmse_mm`` (after
            removing the median offset), ``depth_offset_mm``, ``depth_count``.
        angular: (H, W) float32 angular error in degrees, NaN where not scored.
        depth: (H, W) float32 absolute depth error in mm after the offset, NaN where not
            scored.
    """

    stats: dict
    angular: np.ndarray
    depth: np.ndarray


def score(normals: np.ndarray, depth: np.ndarray | None, gt: GroundTruth) -> Scores:
    """Score normals (and depth) against a ground truth inside its scored region.

    Args:
        normals: (H, W, 3) unit normals, NaN where none; depth: (H, W) mm or None.
        gt: the ground truth (same size).

    Raises:
        ShapeError: the sizes differ.
    """
    from faceps.optimize import angular_error_deg

    n = np.asarray(normals, np.float32)
    if n.shape != gt.normals.shape:
        raise ShapeError(f"the reconstruction is {n.shape[1]}x{n.shape[0]} but the ground "
                         f"truth ({gt.path}) is {gt.normals.shape[1]}x{gt.normals.shape[0]}")
    region = gt.region
    err = angular_error_deg(n, gt.normals).astype(np.float32)
    err[~region] = np.nan
    e = err[np.isfinite(err)].astype(np.float64)
    n_region = max(int(region.sum()), 1)
    stats: dict[str, Any] = {"count": int(e.size),
                             "coverage": 100.0 * e.size / n_region}
    if e.size:
        stats.update(mean=float(e.mean()), median=float(np.median(e)),
                     **{f"below_{t:g}": float(100.0 * np.mean(e < t)) for t in THRESHOLDS})
    derr = np.full(region.shape, np.nan, np.float32)
    if depth is not None:
        d = np.asarray(depth, np.float64)
        common = region & np.isfinite(d) & np.isfinite(gt.depth)
        if common.any():
            diff = d[common] - gt.depth[common]
            offset = float(np.median(diff))
            a = np.abs(diff - offset)
            derr[common] = a
            stats.update(depth_mae_mm=float(a.mean()), depth_median_mm=float(np.median(a)),
                         depth_rmse_mm=float(np.sqrt(np.mean(a ** 2))),
                         depth_offset_mm=offset, depth_count=int(common.sum()))
    return Scores(stats, err, derr)


# ------------------------------------------------------------------ pictures
def _png_data_uri(image: np.ndarray) -> str:
    import cv2

    img = np.asarray(image)
    if img.dtype != np.uint8:
        raise ShapeError(f"expected a uint8 picture; got {img.dtype}")
    if img.ndim == 3:
        img = img[..., ::-1]
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(img))
    if not ok:
        raise FacepsError("could not encode a picture as PNG")
    return "data:image/png;base64," + base64.b64encode(buf.tobytes()).decode("ascii")


def _crop_box(masks: Sequence[np.ndarray], size: tuple[int, int], pad: float = 0.08
              ) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) around the union of the masks, padded (the whole image when empty)."""
    W, H = size
    union = np.zeros((H, W), bool)
    for m in masks:
        if m is not None and m.shape == (H, W):
            union |= m
    if not union.any():
        return 0, 0, W, H
    ys, xs = np.nonzero(union)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    p = int(round(pad * max(x1 - x0, y1 - y0)))
    return max(0, x0 - p), max(0, y0 - p), min(W, x1 + p), min(H, y1 + p)


def _resize(img: np.ndarray, height: int, nearest: bool = False) -> np.ndarray:
    import cv2

    h, w = img.shape[:2]
    if h == height:
        return img
    width = max(1, int(round(w * height / h)))
    if nearest:
        interp = cv2.INTER_NEAREST
    else:
        interp = cv2.INTER_AREA if height < h else cv2.INTER_LINEAR
    return cv2.resize(img, (width, height), interpolation=interp)


class _View:
    """Crop box and display height shared by the pictures of one page."""

    def __init__(self, box: tuple[int, int, int, int], height: int) -> None:
        self.box = box
        self.height = height

    def crop(self, a: np.ndarray) -> np.ndarray:
        x0, y0, x1, y1 = self.box
        return a[y0:y1, x0:x1]

    def picture(self, rgb: np.ndarray) -> np.ndarray:
        """A uint8 picture of the full frame, cropped and resized."""
        return _resize(np.ascontiguousarray(self.crop(rgb)), self.height)

    def values(self, a: np.ndarray) -> np.ndarray:
        """A float map of the full frame, cropped and resized (NaN kept)."""
        a = np.ascontiguousarray(self.crop(a).astype(np.float32))
        return _resize(a, self.height, nearest=True)


def _colour_bar(height: int, colours: np.ndarray, ticks: Sequence[tuple[float, str]],
                width: int = 96) -> np.ndarray:
    """A vertical colour bar (top = ``colours[-1]``) with tick labels, (height, width, 3)."""
    import cv2

    bar = np.full((height, width, 3), 255, np.uint8)
    top, bottom = max(int(0.08 * height), 12) + 6, height - max(int(0.08 * height), 12) - 6
    n = max(bottom - top, 2)
    idx = np.linspace(len(colours) - 1, 0, n).round().astype(int)
    bar[top:top + n, 6:20] = colours[idx][:, None, :]
    scale = max(0.33, min(0.45, height / 700))
    for frac, text in ticks:
        y = int(round(bottom - frac * (bottom - top)))
        cv2.putText(bar, text, (23, y + 4), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1,
                    cv2.LINE_AA)
    return bar


def _turbo(t: np.ndarray) -> np.ndarray:
    import cv2

    idx = np.round(np.clip(t, 0, 1) * 255).astype(np.uint8)
    bgr = cv2.applyColorMap(idx.reshape(-1, 1), cv2.COLORMAP_TURBO)
    return np.ascontiguousarray(bgr.reshape(idx.shape + (3,))[..., ::-1])


def depth_range(depth: np.ndarray, mask: np.ndarray | None = None) -> tuple[float, float]:
    """(near, far) mm: the 1st and 99th percentiles of the finite depths."""
    d = np.asarray(depth, np.float64)
    sel = np.isfinite(d) if mask is None else (mask & np.isfinite(d))
    if not sel.any():
        return 0.0, 1.0
    lo, hi = np.percentile(d[sel], [1, 99])
    return float(lo), float(max(hi, lo + 1e-3))


def depth_picture(depth: np.ndarray, near: float, far: float, background: int = 40
                  ) -> np.ndarray:
    """(H, W) depth in mm -> (H, W + bar, 3) uint8: near red, far blue, with a colour bar."""
    d = np.asarray(depth, np.float32)
    rgb = _turbo(np.nan_to_num((far - d) / (far - near), nan=0.0))
    rgb[~np.isfinite(d)] = background
    ramp = _turbo(np.linspace(0, 1, 256))
    ticks = [(1.0, f"{near:.0f} mm"), (0.5, f"{0.5 * (near + far):.0f}"),
             (0.0, f"{far:.0f} mm")]
    return np.concatenate([rgb, _colour_bar(d.shape[0], ramp, ticks)], axis=1)


def _nice_ceiling(x: float) -> float:
    """The smallest of 1, 2, 2.5, 5 times a power of ten that is >= x."""
    if not np.isfinite(x) or x <= 0:
        return 1.0
    p = 10 ** np.floor(np.log10(x))
    for m in (1, 2, 2.5, 5, 10):
        if m * p >= x * (1 - 1e-9):
            return float(m * p)
    return float(10 * p)


def _mesh_framing(vertices: np.ndarray, yaws: Sequence[float], size: tuple[int, int]
                  ) -> list[tuple[np.ndarray, np.ndarray, Any, float]]:
    """Per yaw: (rotation, centre, camera, distance) framing ``vertices`` in a view of
    ``size``: the vertices are turned about the centre and moved ``distance`` mm in front
    of the camera."""
    from faceps.core.camera import Camera

    V = np.asarray(vertices, np.float64)
    centre = 0.5 * (V.min(0) + V.max(0))
    extent = float(np.linalg.norm(V.max(0) - V.min(0))) or 1.0
    distance = 2.5 * extent
    # turn the way the face already looks (its closest points, the nose, lie to that side
    # of the centre): the turned view shows the profile, not the cut-off far cheek
    closest = V[np.argsort(V[:, 2])[:max(1, len(V) // 50)]]
    sign = -1.0 if closest[:, 0].mean() > centre[0] else 1.0
    W, H = size
    out = []
    for yaw in yaws:
        a = np.radians(sign * yaw)
        # turn about the vertical (y, down) axis through the centre
        R = np.array([[np.cos(a), 0.0, np.sin(a)], [0.0, 1.0, 0.0],
                      [-np.sin(a), 0.0, np.cos(a)]])
        P = (V - centre) @ R.T + np.array([0.0, 0.0, distance])
        x, y = P[:, 0] / P[:, 2], P[:, 1] / P[:, 2]
        margin = 0.06
        f = min(W * (1 - 2 * margin) / max(np.ptp(x), 1e-9),
                H * (1 - 2 * margin) / max(np.ptp(y), 1e-9))
        cx = (W - 1) / 2 - f * 0.5 * (x.max() + x.min())
        cy = (H - 1) / 2 - f * 0.5 * (y.max() + y.min())
        K = np.array([[f, 0.0, cx], [0.0, f, cy], [0.0, 0.0, 1.0]])
        out.append((R, centre, Camera(K, (W, H)), distance))
    return out


def mesh_views(vertices: np.ndarray, triangles: np.ndarray, *,
               yaws: Sequence[float] = VIEW_YAWS, size: tuple[int, int] = VIEW_SIZE,
               frame_vertices: np.ndarray | None = None) -> list[np.ndarray]:
    """Grey Lambertian renders of a camera-frame mesh under a headlight.

    The mesh is turned about the vertical axis through the centre of its bounding box by
    each yaw (0: as the capture camera sees it; others in the direction the face already
    looks, so that the view shows its profile) and ray cast
    (:class:`faceps.core.raycast.RayCaster`) by a camera that frames it; the light sits at
    the viewer. Normals are the mesh's own area-weighted vertex normals (the shape of the
    surface, not of the normal map).

    Args:
        vertices: (V, 3) mm, camera frame; triangles: (F, 3) counter-clockwise.
        yaws: degrees, one picture each.
        size: (W, H) pixels of each picture.
        frame_vertices: vertices that set the framing (default ``vertices``): pass the
            same to render several meshes at one scale.

    Returns:
        one (H, W, 3) uint8 picture per yaw.
    """
    from faceps.core.color import linear_to_srgb
    from faceps.core.raycast import RayCaster

    V = np.asarray(vertices, np.float64)
    F = np.asarray(triangles)
    ref = V if frame_vertices is None else np.asarray(frame_vertices, np.float64)
    W, H = size
    pictures = []
    for R, centre, cam, distance in _mesh_framing(ref, yaws, size):
        P = (V - centre) @ R.T + np.array([0.0, 0.0, distance])
        maps = RayCaster(P, F).render(cam)
        hit = maps["mask"]
        n = np.nan_to_num(maps["normals"])
        pts = np.nan_to_num(maps["points"])
        to_eye = -pts / np.maximum(np.linalg.norm(pts, axis=-1, keepdims=True), 1e-9)
        lambert = np.clip(np.sum(n * to_eye, -1), 0.0, 1.0)
        grey = linear_to_srgb(0.02 + 0.6 * lambert ** 1.3)
        img = np.full((H, W), _BACKGROUND, np.uint8)
        img[hit] = np.round(np.clip(grey[hit], 0, 1) * 255).astype(np.uint8)
        pictures.append(np.repeat(img[..., None], 3, -1))
    return pictures


def _read_mesh(path: Path, notes: list[str]) -> tuple[np.ndarray, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        import trimesh

        mesh = trimesh.load(str(path), process=False, force="mesh")
        V = np.asarray(mesh.vertices, np.float64)
        F = np.asarray(mesh.faces, np.int64)
    except Exception as exc:  # noqa: BLE001 - any reader failure is reported on the page
        notes.append(f"{path.name} could not be read ({type(exc).__name__}: {exc})")
        return None
    if len(F) == 0 or not np.all(np.isfinite(V)):
        notes.append(f"{path.name} holds no usable triangles")
        return None
    return V, F


def _builtin_or(model: Any, name: str | None) -> Any:
    from faceps.model import load_model

    if model is not None:
        return load_model(model)
    builtin = load_model("builtin")
    return builtin if name in (None, builtin.name) else None


@dataclass
class ProxyRender:
    """The fitted proxy of a ``proxy.json`` seen by the session's camera.

    Attributes:
        normals: (H, W, 3) float32 unit normals, NaN where the front of the proxy is not
            seen.
        depth: (H, W) float32 z in mm, NaN where ``normals`` is.
        vertices: (V, 3) float64 proxy vertices in the camera frame (mm).
        triangles: (F, 3) the triangles of the model's face region.
    """

    normals: np.ndarray
    depth: np.ndarray
    vertices: np.ndarray
    triangles: np.ndarray


def render_proxy(proxy: Mapping[str, Any], camera: Any, model: Any = None
                 ) -> ProxyRender | None:
    """Ray cast the fitted proxy of a ``proxy.json`` with the session's camera.

    Args:
        proxy: the ``proxy.json`` content (model name, coefficients, pose).
        camera: :class:`faceps.core.camera.Camera` of the session.
        model: the morphable model (a model, a path, ``"builtin"``); default: the built-in
            model when ``proxy.json`` names it.

    Returns:
        :class:`ProxyRender`, or None when the model is not available or ``proxy.json``
        is incomplete.
    """
    from faceps.core.raycast import RayCaster
    from faceps.core.rotation import pose_rotation

    try:
        coef = proxy["coefficients"]
        angles = np.asarray(proxy["pose"]["angles_rad"], np.float64)
        translation = np.asarray(proxy["pose"]["translation_mm"], np.float64)
        m = _builtin_or(model, proxy.get("model"))
        if m is None:
            return None
        G = m.geometry(np.asarray(coef["id"], np.float64), np.asarray(coef["exp"], np.float64))
        Gc = G @ pose_rotation(angles).T + translation
    except (KeyError, TypeError, ValueError, FacepsError) as exc:
        log.info("proxy not rendered: %s", exc)
        return None
    maps = RayCaster(Gc, m.triangles).render(camera)
    seen = maps["mask"] & ~maps["backface"]
    normals = np.where(seen[..., None], maps["normals"], np.nan).astype(np.float32)
    depth = np.where(seen, maps["depth"], np.nan).astype(np.float32)
    face = m.region[m.triangles].all(1)
    return ProxyRender(normals, depth, Gc, m.triangles[face])


# ------------------------------------------------------------------ HTML
_CSS = """
*{box-sizing:border-box}
body{margin:0;background:#f3f4f7;color:#1e2430;line-height:1.45;
font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",Helvetica,Arial,sans-serif}
main{max-width:1560px;margin:0 auto;padding:22px 28px 40px}
h1{font-size:25px;margin:0 0 4px}
h2{font-size:18px;margin:0 0 10px}
.meta{color:#5a6375;font-size:13.5px;margin:0}
nav{font-size:13.5px;margin:10px 0 0}
nav a{color:#2f5f9e;text-decoration:none;margin-right:14px}
section{background:#fff;border:1px solid #dcdfe6;border-radius:8px;padding:14px 18px;
margin:16px 0}
p{margin:6px 0}
.figs{display:flex;flex-wrap:wrap;gap:14px;align-items:flex-start}
figure{margin:0}
figcaption{font-size:13px;color:#3b4252;text-align:center;margin-top:4px}
img{display:block;border-radius:3px}
.note{background:#fff6dc;border-left:4px solid #e0a800;padding:7px 12px;margin:8px 0;
font-size:14px}
.scroll{overflow-x:auto}
table{border-collapse:collapse;font-size:14px;font-variant-numeric:tabular-nums;margin:6px 0}
th,td{padding:5px 11px;border-bottom:1px solid #e4e7ec;text-align:right;white-space:nowrap}
th:first-child,td:first-child{text-align:left}
th:last-child{text-align:left}
thead th{background:#eef1f5;font-weight:600;white-space:normal;vertical-align:bottom}
td.sub{padding-left:26px;color:#5a6375}
td.total{font-weight:600}
td.wrap{white-space:normal;text-align:left;min-width:220px;font-size:13px;color:#3b4252}
.bar{height:10px;background:#5b8cc8;border-radius:2px;min-width:1px}
.bars{width:240px}
table.grid td,table.grid th{border:none;padding:4px 5px;text-align:center;
vertical-align:middle}
table.grid th{background:none;font-size:13.5px}
table.grid td.rowlabel{text-align:right;font-weight:600;font-size:13.5px;
white-space:normal;max-width:130px}
.missing{color:#8a93a3;font-size:13px}
details summary{cursor:pointer;color:#2f5f9e;font-size:14px;margin:6px 0}
.caption{font-size:14px;color:#3b4252;margin:8px 0 2px}
footer{color:#6b7383;font-size:12.5px;margin-top:18px}
"""


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def _cell(value: Any, digits: int) -> str:
    if value is None:
        return "&ndash;"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | np.integer):
        return f"{int(value):,}"
    if isinstance(value, float | np.floating):
        return "&ndash;" if not np.isfinite(value) else f"{float(value):.{digits}f}"
    if isinstance(value, _Raw):
        return value.html
    return _esc(value)


class _Raw:
    """Trusted HTML for a table cell (built by this module only)."""

    def __init__(self, html_text: str, css: str = "") -> None:
        self.html = html_text
        self.css = css


def _figure_html(fig: Figure) -> str:
    img = np.asarray(fig.image)
    h, w = img.shape[:2]
    cap = f"<figcaption>{_esc(fig.caption)}</figcaption>" if fig.caption else ""
    return (f'<figure><img src="{_png_data_uri(img)}" width="{w}" height="{h}" '
            f'alt="{_esc(fig.caption or "picture")}">{cap}</figure>')


def _table_html(t: Table) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in t.header)
    body = []
    for row in t.rows:
        cells = []
        for v in row:
            css = f' class="{v.css}"' if isinstance(v, _Raw) and v.css else ""
            cells.append(f"<td{css}>{_cell(v, t.digits)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    table = (f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
             f'<tbody>{"".join(body)}</tbody></table></div>')
    if t.collapsed:
        return f"<details><summary>{_esc(t.caption or 'details')}</summary>{table}</details>"
    cap = f'<p class="caption">{_esc(t.caption)}</p>' if t.caption else ""
    return cap + table


def _grid_html(g: FigureGrid) -> str:
    head = "<th></th>" + "".join(f"<th>{_esc(c)}</th>" for c in g.columns)
    rows = []
    for name, figs in g.rows:
        cells = [f'<td class="rowlabel">{_esc(name)}</td>']
        for fig in figs:
            if fig is None:
                cells.append('<td class="missing">&ndash;</td>')
            else:
                img = np.asarray(fig.image)
                h, w = img.shape[:2]
                cells.append(f'<td><img src="{_png_data_uri(img)}" width="{w}" height="{h}" '
                             f'alt="{_esc(name)}: {_esc(fig.caption or "picture")}"></td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<div class="scroll"><table class="grid"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


def _anchor(section: Section, i: int) -> str:
    if section.anchor:
        return section.anchor
    slug = "".join(c if c.isalnum() else "-" for c in section.title.lower()).strip("-")
    return f"s{i}-{slug}" if slug else f"s{i}"


def render_page(title: str, sections: Sequence[Section], *, subtitle: Sequence[str] = ()
                ) -> str:
    """The HTML text of a page: a header, a table of contents and the sections.

    Args:
        title: page title; subtitle: lines under it.
        sections: the content, in order.
    """
    anchors = [_anchor(s, i) for i, s in enumerate(sections)]
    nav = "".join(f'<a href="#{_esc(a)}">{_esc(s.title)}</a>'
                  for a, s in zip(anchors, sections))
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body><main>",
             f"<header><h1>{_esc(title)}</h1>"]
    parts += [f'<p class="meta">{_esc(line)}</p>' for line in subtitle]
    parts.append(f"<nav>{nav}</nav></header>")
    for a, s in zip(anchors, sections):
        parts.append(f'<section id="{_esc(a)}"><h2>{_esc(s.title)}</h2>')
        parts += [f'<p class="note">{_esc(n)}</p>' for n in s.notes]
        parts += [f"<p>{_esc(p)}</p>" for p in s.paragraphs]
        parts += [_table_html(t) for t in s.tables]
        parts += [_grid_html(g) for g in s.grids]
        if s.figures:
            parts.append('<div class="figs">' + "".join(_figure_html(f) for f in s.figures)
                         + "</div>")
        parts.append("</section>")
    parts.append(f"<footer>faceps {_esc(__version__)} &middot; written "
                 f"{_esc(time.strftime('%Y-%m-%d %H:%M:%S'))}</footer>")
    parts.append("</main></body></html>")
    return "\n".join(parts) + "\n"


def _write_text(path: Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------ timings
#: readable names of the stages of both pipelines (timings keys of report.json)
_STAGE_NAMES = {
    "load": "load networks", "downscale": "downscale", "fit": "proxy and lights",
    "fit.landmarks": "landmarks", "fit.landmark_fit": "landmark fit",
    "proxy_maps": "proxy maps", "landmarks": "landmarks", "crop": "crop",
    "proxynet": "ProxyNet", "render": "render layer", "normalnet": "NormalNet",
    "paste": "paste to full size", "height_field": "height field", "albedo": "albedo",
    "resample": "resample", "write_mesh": "write mesh",
}
_NOT_STAGES = ("total", "session")


def _stage_name(key: str) -> str:
    if key in _STAGE_NAMES:
        return _STAGE_NAMES[key]
    for prefix, name in (("fit.photometric_", "photometric refinement, round "),
                         ("fit.calibration_", "light calibration, round "),
                         ("normal_albedo_", "normals and albedo, pass "),
                         ("height_field_", "height field, pass ")):
        if key.startswith(prefix) and key[len(prefix):].isdigit():
            return name + str(int(key[len(prefix):]) + 1)
    return key.replace("_", " ").replace(".", ": ")


def _timings(report: Mapping[str, Any]) -> dict[str, float]:
    t = report.get("timings")
    if not isinstance(t, Mapping):
        return {}
    return {str(k): float(v) for k, v in t.items() if isinstance(v, int | float)}


def timing_table(report: Mapping[str, Any], caption: str = "", collapsed: bool = False
                 ) -> Table | None:
    """Per-stage seconds of a ``report.json`` with bars relative to the total (None when
    it has no timings). Sub-stages (``fit.*``) are indented."""
    t = _timings(report)
    if not t:
        return None
    total = t.get("total") or sum(v for k, v in t.items()
                                  if "." not in k and k not in _NOT_STAGES) or 1.0
    rows: list[list[Any]] = []
    for key, sec in t.items():
        if key in _NOT_STAGES:
            continue
        sub = "." in key
        width = 100.0 * min(sec / total, 1.0)
        rows.append([_Raw(_esc(_stage_name(key)), "sub" if sub else ""), sec,
                     100.0 * sec / total,
                     _Raw(f'<div class="bar" style="width:{width:.1f}%"></div>', "bars")])
    rows.append([_Raw("total", "total"), t.get("total", total), 100.0, _Raw("", "bars")])
    if "session" in t and "load" in t:
        rows.append([_Raw("total without loading the networks", "sub"), t["session"],
                     100.0 * t["session"] / total, _Raw("", "bars")])
    return Table(["stage", "seconds", "% of total", ""], rows, caption=caption,
                 collapsed=collapsed)


def stage_summary(report: Mapping[str, Any], top: int = 4) -> str:
    """The longest stages of a ``report.json`` in one line, e.g. ``proxy and lights 52 s,
    normals and albedo 16 s``; sub-stages and passes are merged."""
    merged: dict[str, float] = {}
    for key, sec in _timings(report).items():
        if key in _NOT_STAGES or "." in key or sec <= 0:
            continue
        name = _stage_name(key).split(", pass")[0]
        merged[name] = merged.get(name, 0.0) + sec
    parts = sorted(merged.items(), key=lambda kv: -kv[1])[:top]
    return ", ".join(f"{n} {s:.1f} s" if s >= 0.95 else f"{n} {s:.2f} s" for n, s in parts)


# ------------------------------------------------------------------ shared content
def _input_figures(capture: Any, view: _View, region: np.ndarray | None) -> list[Figure]:
    figs = []
    for j in range(capture.n_images):
        img = tonemap(capture.images[j], region)
        figs.append(Figure(view.picture(img), f"image {j + 1}: {capture.light_names[j]}"))
    return figs


def _normals_picture(normals: np.ndarray, view: _View) -> np.ndarray:
    return view.picture(normals_to_rgb(normals, background=40))


def _albedo_picture(albedo: np.ndarray, mask: np.ndarray, view: _View) -> np.ndarray | None:
    known = mask & np.all(np.isfinite(albedo), -1)
    if not known.any():
        return None
    # the 95th percentile: specular or shadowed pixels give a few far too bright values
    img = tonemap(np.where(known[..., None], albedo, 0.0), known, percentile=95.0,
                  target=0.85)
    img[~known] = 40
    return view.picture(img)


def _error_picture(err: np.ndarray, vmax: float, unit: str, view: _View) -> np.ndarray:
    return error_map(view.values(err), vmax, unit=unit)


def _depth_figure(depth: np.ndarray, near: float, far: float, view: _View) -> np.ndarray:
    return depth_picture(view.values(depth), near, far)


def error_row(name: str, stats: Mapping[str, Any]) -> list[Any]:
    """One row of the error table (see :data:`ERROR_HEADER`)."""
    return [name, stats.get("mean"), stats.get("median"),
            *[stats.get(f"below_{t:g}") for t in THRESHOLDS], stats.get("coverage"),
            stats.get("depth_mae_mm"), stats.get("depth_rmse_mm")]


#: columns of :func:`error_row`
ERROR_HEADER = ("method", "mean (deg)", "median (deg)",
                *[f"< {t:g} deg (%)" for t in THRESHOLDS], "coverage (%)",
                "depth MAE (mm)", "depth RMSE (mm)")


def _facts(rec: ReconstructionFolder) -> list[str]:
    r = rec.report
    facts = [f"{rec.size[0]} x {rec.size[1]} pixels, {int(rec.mask.sum()):,} reconstructed"]
    if "working_size" in r and r.get("working_size") != r.get("input_size"):
        ws = r["working_size"]
        facts.append(f"worked at {ws[0]} x {ws[1]}")
    if r.get("images"):
        facts.append(f"network input: {len(r['images'])} image(s) ({', '.join(r['images'])})")
    if r.get("lights_source"):
        facts.append(f"lights: {r['lights_source']}")
    lm = r.get("landmarks")
    if isinstance(lm, Mapping) and lm.get("source"):
        facts.append(f"landmarks: {lm['source']}")
    rmse = lm.get("rmse_px") if isinstance(lm, Mapping) else None
    if rmse is None and isinstance(r.get("proxy"), Mapping):
        rmse = r["proxy"].get("landmark_rmse_px")
    if rmse is not None:
        facts.append(f"proxy landmark RMSE {float(rmse):.2f} px")
    hf = r.get("height_field")
    gap = hf.get("normal_gap_deg") if isinstance(hf, Mapping) else None
    if isinstance(gap, Mapping) and gap.get("mean") is not None:
        facts.append(f"depth vs normals: mean gap {float(gap['mean']):.2f} deg")
    t = _timings(r)
    if "total" in t:
        facts.append(f"total {t['total']:.1f} s")
    return facts


def _kind(rec: ReconstructionFolder) -> str:
    r = rec.report
    if str(r.get("format", "")).startswith("faceps.infer-report"):
        return "network inference (faceps infer)"
    if "passes" in r or "lights_source" in r:
        return "optimisation (faceps reconstruct)"
    return "reconstruction"


# ------------------------------------------------------------------ single folder
def write_report(out_dir: str | os.PathLike, *, ground_truth: str | os.PathLike | None = None,
                 extra: Sequence[Section] = (), session: str | os.PathLike | None = None,
                 model: Any = None, path: str | os.PathLike | None = None) -> Path:
    """Write ``OUT_DIR/report.html`` for a reconstruction folder (contract 2).

    Args:
        out_dir: the folder written by ``faceps reconstruct`` or ``faceps infer``.
        ground_truth: a synthetic session's ``ground_truth/`` folder: adds the error
            table and error maps.
        extra: more sections, appended after the standard ones.
        session: the capture session (for the input images and the proxy normals);
            default: the one named in ``report.json``, else the ground truth's parent.
        model: the morphable model of ``proxy.json`` (default: the built-in model when
            ``proxy.json`` names it).
        path: where to write the page (default ``OUT_DIR/report.html``).

    Returns:
        the path of the page.

    Raises:
        FacepsError: a missing folder, a missing or unreadable ``normals.npy`` (naming
            the file); SessionError: an unusable ground truth; ShapeError: maps of
            different sizes.
    """
    rec = load_reconstruction(out_dir)
    gt = load_ground_truth(ground_truth) if ground_truth is not None else None
    if gt is not None and gt.normals.shape != rec.normals.shape:
        raise ShapeError(f"{gt.path}: the ground truth is {gt.normals.shape[1]}x"
                         f"{gt.normals.shape[0]} but the reconstruction {rec.path} is "
                         f"{rec.size[0]}x{rec.size[1]}")
    notes = list(rec.notes)
    capture = _load_capture(_find_session(session, [rec], gt.path if gt else None), notes)
    if capture is not None and capture.camera.image_size != rec.size:
        notes.append(f"the session ({capture.root}) is {capture.width}x{capture.height}, "
                     f"not {rec.size[0]}x{rec.size[1]}: not used")
        capture = None

    proxy = None
    if capture is not None and rec.proxy:
        proxy = render_proxy(rec.proxy, capture.camera, model)
        if proxy is None:
            notes.append(f"the proxy of proxy.json (model '{rec.proxy.get('model')}') "
                         f"could not be rendered: its morphable model is not available")
    view = _View(_crop_box([rec.mask] + ([gt.region] if gt else []), rec.size), TILE_HEIGHT)
    sections: list[Section] = []
    warnings = [str(w) for w in rec.report.get("warnings", []) or []]
    sections.append(Section("Summary", paragraphs=[f"{_kind(rec)}: {rec.path}",
                                                   " \u00b7 ".join(_facts(rec))],
                            notes=notes + [f"warning: {w}" for w in warnings]))
    if capture is not None:
        sections.append(Section("Input images", figures=_input_figures(capture, view,
                                                                         rec.mask)))

    maps = [Figure(_normals_picture(rec.normals, view), "normals")]
    if proxy is not None:
        maps.append(Figure(_normals_picture(proxy.normals, view),
                           "proxy normals (fitted model)"))
    alb = _albedo_picture(rec.albedo, rec.mask, view)
    map_notes = []
    if alb is not None:
        maps.append(Figure(alb, "albedo"))
    else:
        map_notes.append("no albedo (the session gives no lights, or albedo.npy is missing)")
    if np.isfinite(rec.depth[rec.mask]).any():
        near, far = depth_range(rec.depth, rec.mask)
        maps.append(Figure(_depth_figure(rec.depth, near, far, view), "depth (mm)"))
    else:
        map_notes.append("no depth map")
    sections.append(Section("Normals, albedo, depth", figures=maps, notes=map_notes))

    mesh_notes: list[str] = []
    mesh = _read_mesh(rec.mesh_path, mesh_notes)
    if mesh is not None:
        views = mesh_views(*mesh)
        figs = [Figure(v, f"mesh, {'frontal' if y == 0 else f'turned {y:g} deg'}")
                for v, y in zip(views, VIEW_YAWS)]
        sections.append(Section("Mesh", figures=figs, notes=mesh_notes, paragraphs=[
            "mesh.ply shaded with its own surface normals, light at the viewer."]))
    else:
        sections.append(Section("Mesh", notes=mesh_notes or ["mesh.ply is missing"]))

    if gt is not None:
        s = score(rec.normals, rec.depth, gt)
        rows = [error_row(_kind(rec).split(" (")[0], s.stats)]
        figs = [Figure(_error_picture(s.angular, ANGLE_VMAX, "deg", view),
                       "angular error (deg)")]
        if proxy is not None:
            sp = score(proxy.normals, proxy.depth, gt)
            rows.append(error_row("proxy (fitted model)", sp.stats))
            figs.append(Figure(_error_picture(sp.angular, ANGLE_VMAX, "deg", view),
                               "proxy: angular error (deg)"))
        if "depth_mae_mm" in s.stats:
            vmax = _nice_ceiling(float(np.nanpercentile(s.depth, 95)))
            figs.append(Figure(_error_picture(s.depth, vmax, "mm", view),
                               "depth error (mm, median offset removed)"))
        sections.append(Section(
            "Accuracy against the ground truth",
            paragraphs=[f"Scored on the {gt.region_name} of {gt.path}: "
                        f"{int(gt.region.sum()):,} pixels. Coverage: share of them with a "
                        f"reconstructed normal. Depth errors after removing the median "
                        f"offset."],
            tables=[Table(ERROR_HEADER, rows)], figures=figs))

    t = timing_table(rec.report)
    sections.append(Section("Timings", tables=[t] if t else [],
                            notes=[] if t else ["report.json gives no timings"]))
    sections.extend(extra)
    present = sorted(p.name for p in rec.path.iterdir() if p.is_file()
                     and not p.name.startswith(".") and p.name != REPORT_NAME)
    sections.append(Section("Files", paragraphs=[", ".join(present) or "none"]))
    text = render_page(f"faceps report: {rec.path.name}", sections,
                       subtitle=[str(rec.path.resolve())])
    return _write_text(Path(path) if path is not None else rec.path / REPORT_NAME, text)


# ------------------------------------------------------------------ comparison
def write_comparison(path: str | os.PathLike, methods: Mapping[str, str | os.PathLike], *,
                     ground_truth: str | os.PathLike | None = None,
                     session: str | os.PathLike | None = None, proxy_of: str | None = None,
                     model: Any = None, title: str = "faceps: reconstructions compared",
                     notes: Sequence[str] = (), comments: Sequence[str] = (),
                     extra: Sequence[Section] = ()) -> Path:
    """Write one page comparing reconstructions of one session side by side.

    Args:
        path: the HTML file to write.
        methods: display name -> reconstruction folder (contract 2), in page order.
        ground_truth: the session's ``ground_truth/`` folder (errors, error maps, a ground
            truth row).
        session: the capture session (default: from ``report.json`` or the ground truth).
        proxy_of: the method whose fitted proxy (``proxy.json``) gets a row of its own.
        model: the morphable model of the proxies (default: built-in when named).
        title: page title; notes: highlighted remarks at the top (e.g. a skipped method).
        comments: paragraphs under the comparison table.
        extra: more sections, after the comparison table.

    Returns:
        the path of the page.

    Raises:
        FacepsError: a folder or its ``normals.npy`` is missing or unreadable;
        SessionError: an unusable ground truth; ShapeError: maps of different sizes.
    """
    recs = {name: load_reconstruction(p) for name, p in methods.items()}
    gt = load_ground_truth(ground_truth) if ground_truth is not None else None
    sizes = {r.size for r in recs.values()} | ({(gt.normals.shape[1], gt.normals.shape[0])}
                                               if gt else set())
    if len(sizes) > 1:
        raise ShapeError(f"the reconstructions and the ground truth differ in size: "
                         f"{sorted(sizes)}")
    all_notes = list(notes)
    for name, r in recs.items():
        all_notes += [f"{name}: {n}" for n in r.notes]
    capture = _load_capture(_find_session(session, list(recs.values()),
                                          gt.path if gt else None), all_notes)
    size = next(iter(sizes)) if sizes else (0, 0)
    if capture is not None and capture.camera.image_size != size:
        all_notes.append(f"the session ({capture.root}) has another size: not used")
        capture = None
    masks = [r.mask for r in recs.values()] + ([gt.region] if gt else [])
    view = _View(_crop_box(masks, size), COMPARE_HEIGHT)

    # the rows: ground truth, proxy, then the methods
    rows: list[dict[str, Any]] = []
    if gt is not None:
        rows.append({"name": "ground truth", "normals": gt.normals, "depth": gt.depth,
                     "albedo": None, "mask": gt.region, "mesh": None, "scores": None})
        gt_albedo = gt.path / "albedo.npy"
        if gt_albedo.is_file():
            try:
                rows[0]["albedo"] = np.load(gt_albedo, allow_pickle=False).astype(np.float32)
            except (OSError, ValueError):
                pass
        if capture is not None:
            from faceps.optimize.reconstruct import height_field_mesh

            m = height_field_mesh(np.where(gt.region, gt.depth, np.nan), capture.camera)
            rows[0]["mesh"] = (np.asarray(m.vertices), np.asarray(m.faces))
    if proxy_of is not None and proxy_of in recs and capture is not None:
        pr = render_proxy(recs[proxy_of].proxy, capture.camera, model)
        if pr is None:
            all_notes.append(f"the proxy of {proxy_of} could not be rendered (its morphable "
                             f"model is not available)")
        else:
            rows.append({"name": f"proxy ({proxy_of})", "normals": pr.normals,
                         "depth": pr.depth, "albedo": None,
                         "mask": np.all(np.isfinite(pr.normals), -1),
                         "mesh": (pr.vertices, pr.triangles), "report": recs[proxy_of].report,
                         "proxy": True})
    for name, r in recs.items():
        mesh_notes: list[str] = []
        rows.append({"name": name, "normals": r.normals, "depth": r.depth,
                     "albedo": r.albedo, "mask": r.mask,
                     "mesh": _read_mesh(r.mesh_path, mesh_notes), "report": r.report})
        all_notes += [f"{name}: {n}" for n in mesh_notes]
    if gt is not None:
        for row in rows[1:]:
            row["scores"] = score(row["normals"], row["depth"], gt)

    sections: list[Section] = []
    subtitle = []
    if capture is not None:
        subtitle.append(f"session {capture.root} ({capture.width} x {capture.height}, "
                        f"{capture.n_images} images: {', '.join(capture.light_names)})")
    if all_notes:
        sections.append(Section("Notes", notes=all_notes))
    if capture is not None:
        sections.append(Section("Input images",
                                figures=_input_figures(capture, view,
                                                       gt.region if gt else None)))

    # comparison table: errors and time
    header = list(ERROR_HEADER) if gt is not None else ["method"]
    header += ["time (s)", "longest stages"]
    trows = []
    for row in rows[1 if gt is not None else 0:]:
        rep = row.get("report") or {}
        if row.get("proxy"):
            t = _timings(rep)
            tsum = sum(v for k, v in t.items() if k in ("downscale", "fit", "proxy_maps"))
            timing: list[Any] = [tsum or None, _Raw(f"fitted in {_esc(proxy_of)}", "wrap")]
        else:
            t = _timings(rep)
            timing = [t.get("total"), _Raw(_esc(stage_summary(rep, top=3)), "wrap")]
        errs = error_row(row["name"], row["scores"].stats) if row.get("scores") else \
            [row["name"]]
        trows.append(errs + timing)
    tables = [Table(header, trows)]
    for name, r in recs.items():
        t = timing_table(r.report, caption=f"timings of {name} (per stage)", collapsed=True)
        if t is not None:
            tables.append(t)
    para = []
    if gt is not None:
        para.append(f"Errors on the {gt.region_name}: {int(gt.region.sum()):,} pixels. "
                    f"Coverage: share of them with a reconstructed normal; depth errors after "
                    f"removing the median offset.")
    para += list(comments)
    sections.append(Section("Methods compared", paragraphs=para, tables=tables))
    sections.extend(extra)

    # side by side pictures
    depth_ref = gt.depth if gt is not None else next(iter(recs.values())).depth
    near, far = depth_range(depth_ref, gt.region if gt else None)
    dvals = [np.nanpercentile(r["scores"].depth, 95) for r in rows
             if r.get("scores") is not None and np.isfinite(r["scores"].depth).any()]
    dvmax = _nice_ceiling(float(max(dvals))) if dvals else 1.0
    frame = next((r["mesh"][0] for r in rows if r.get("mesh") is not None
                  and not r.get("proxy")), None)
    geometry_columns = ["normals"] + (["angular error"] if gt is not None else []) + \
        ["depth"] + (["depth error"] if gt is not None else [])
    look_columns = ["albedo", "mesh, frontal", f"mesh, turned {VIEW_YAWS[1]:g} deg"]
    mesh_h = COMPARE_HEIGHT
    mesh_size = (int(round(mesh_h * VIEW_SIZE[0] / VIEW_SIZE[1])), mesh_h)
    geometry_rows, look_rows = [], []
    for row in rows:
        sc = row.get("scores")
        figs: list[Figure | None] = [Figure(_normals_picture(row["normals"], view))]
        if gt is not None:
            figs.append(None if sc is None else
                        Figure(_error_picture(sc.angular, ANGLE_VMAX, "deg", view)))
        has_depth = row["depth"] is not None and np.isfinite(row["depth"]).any()
        figs.append(Figure(_depth_figure(row["depth"], near, far, view)) if has_depth
                    else None)
        if gt is not None:
            figs.append(None if sc is None or "depth_mae_mm" not in sc.stats else
                        Figure(_error_picture(sc.depth, dvmax, "mm", view)))
        geometry_rows.append((row["name"], figs))
        alb = None if row["albedo"] is None else _albedo_picture(row["albedo"], row["mask"],
                                                                 view)
        looks: list[Figure | None] = [None if alb is None else Figure(alb)]
        if row.get("mesh") is not None:
            looks += [Figure(v) for v in mesh_views(*row["mesh"], size=mesh_size,
                                                     frame_vertices=frame)]
        else:
            looks += [None, None]
        look_rows.append((row["name"], looks))
    sections.append(Section(
        "Normals and depth", grids=[FigureGrid(geometry_columns, geometry_rows)],
        paragraphs=[f"Normal colours: RGB = (x, y, z) toward right, up, viewer. Angular "
                    f"errors from 0 to {ANGLE_VMAX:g} deg; depth near red, far blue, and depth "
                    f"errors from 0 to {dvmax:g} mm, each on one scale for all rows."]))
    sections.append(Section(
        "Albedo and mesh", grids=[FigureGrid(look_columns, look_rows)],
        paragraphs=["Albedo in the scale of each method's lights (automatic exposure). "
                    "Meshes: each mesh.ply (the proxy: its face region) shaded with its own "
                    "surface normals, light at the viewer, one framing for all rows."]))
    text = render_page(title, sections, subtitle=subtitle)
    return _write_text(Path(path), text)
