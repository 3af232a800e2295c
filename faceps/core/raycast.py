"""CPU ray casting of triangle meshes (Embree through ``open3d.t.geometry.RaycastingScene``).

:class:`RayCaster` builds the acceleration structure once and answers batches of rays:
first hits (:meth:`RayCaster.cast`), any-hit shadow queries (:meth:`RayCaster.occluded`)
and per-pixel maps of a pinhole camera (:meth:`RayCaster.render`, :func:`render_maps`).

Conventions (DESIGN.md): millimetres; the camera frame is OpenCV (x right, y down,
z forward) with the camera at the origin; pixel centres at integer coordinates, so the
ray of pixel (u, v) is ``camera.rays()[v, u]`` (a direction with z = 1, which makes the
hit distance along it equal to the depth z). Triangles are counter-clockwise seen from
outside, so ``(v1 - v0) x (v2 - v0)`` is the outward geometric normal.

Hit distances ``t`` are measured in units of the length of each ray's direction vector:
the hit point is ``origin + t * direction``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from faceps.core.camera import Camera
from faceps.core.errors import ConfigError, ShapeError, check_finite, check_shape
from faceps.core.mesh import vertex_normals as _vertex_normals

__all__ = ["RayCaster", "RayHits", "render_maps", "visible_vertices", "MAP_KEYS"]

#: keys of the per-pixel maps returned by :func:`render_maps` (plus any vertex attributes)
MAP_KEYS = ("mask", "depth", "points", "triangle", "barycentric", "normals", "backface")


@dataclass(frozen=True)
class RayHits:
    """First hits of N rays.

    Attributes:
        t: (N,) float64 hit distance in units of the ray direction's length; inf on a miss.
        triangle: (N,) int64 id of the hit triangle; -1 on a miss.
        barycentric: (N, 2) float64 weights (w1, w2) of the triangle's vertices 1 and 2
            (open3d's ``primitive_uvs``); vertex 0 has weight ``1 - w1 - w2``. Zero on a miss.
        normal: (N, 3) float64 unit geometric normal ``(v1 - v0) x (v2 - v0)`` of the hit
            triangle (outward for a counter-clockwise mesh, whichever side was hit); zero
            on a miss.
    """

    t: np.ndarray
    triangle: np.ndarray
    barycentric: np.ndarray
    normal: np.ndarray

    @property
    def hit(self) -> np.ndarray:
        """(N,) bool: which rays hit a triangle."""
        return self.triangle >= 0

    def weights(self) -> np.ndarray:
        """(N, 3) barycentric weights of the three corners (zeros on a miss)."""
        w = np.zeros((self.t.shape[0], 3))
        hit = self.hit
        w[hit, 1:] = self.barycentric[hit]
        w[hit, 0] = 1.0 - self.barycentric[hit].sum(axis=1)
        return w


def _check_rays(origins: np.ndarray, directions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    O = np.asarray(origins, dtype=np.float64)
    D = np.asarray(directions, dtype=np.float64)
    check_shape(O, "origins", ("N", 3))
    check_shape(D, "directions", (O.shape[0], 3))
    check_finite(O, "origins")
    check_finite(D, "directions")
    return O, D


class RayCaster:
    """A static triangle mesh prepared for fast CPU ray queries.

    Args:
        vertices: (V, 3) positions (mm, any frame; rays must be given in the same frame).
        triangles: (F, 3) integer vertex ids, counter-clockwise seen from outside.
        nthreads: worker threads for the queries (0: all cores).

    The mesh is stored in float32 inside the scene; hit points recomputed from the
    barycentric weights in float64 (see :meth:`render`) lie exactly on the triangles.
    """

    def __init__(self, vertices: np.ndarray, triangles: np.ndarray, nthreads: int = 0) -> None:
        import open3d as o3d

        V = np.asarray(vertices, dtype=np.float64)
        F = np.asarray(triangles)
        check_shape(V, "vertices", (None, 3))
        check_shape(F, "triangles", (None, 3))
        check_finite(V, "vertices")
        if F.shape[0] == 0:
            raise ShapeError("expected triangles to hold at least one triangle; got none")
        if not np.issubdtype(F.dtype, np.integer):
            raise ShapeError(f"expected triangles to be integers; got {F.dtype}")
        if F.min() < 0 or F.max() >= V.shape[0]:
            raise ShapeError(f"triangles index vertices outside [0, {V.shape[0]})")
        self.vertices = V
        self.triangles = F.astype(np.int64)
        self.nthreads = int(nthreads)
        self._o3c = o3d.core
        self._scene = o3d.t.geometry.RaycastingScene()
        self._scene.add_triangles(
            o3d.core.Tensor(np.ascontiguousarray(V, dtype=np.float32)),
            o3d.core.Tensor(np.ascontiguousarray(F, dtype=np.uint32)),
        )

    @property
    def n_triangles(self) -> int:
        return self.triangles.shape[0]

    def _rays_tensor(self, O: np.ndarray, D: np.ndarray):
        rays = np.concatenate([O, D], axis=1).astype(np.float32)
        return self._o3c.Tensor(np.ascontiguousarray(rays))

    # ---------------------------------------------------------------- queries
    def cast(self, origins: np.ndarray, directions: np.ndarray) -> RayHits:
        """First intersections of N rays.

        Args:
            origins: (N, 3) ray origins; directions: (N, 3) ray directions (any non-zero
                length; ``t`` is measured in units of it).

        Returns:
            :class:`RayHits` with t (N,), triangle (N,), barycentric (N, 2), normal (N, 3).
        """
        O, D = _check_rays(origins, directions)
        N = O.shape[0]
        if N == 0:
            return RayHits(np.zeros(0), np.zeros(0, np.int64), np.zeros((0, 2)), np.zeros((0, 3)))
        ans = self._scene.cast_rays(self._rays_tensor(O, D), nthreads=self.nthreads)
        prim = ans["primitive_ids"].numpy().astype(np.int64)
        t = ans["t_hit"].numpy().astype(np.float64)
        miss = (prim >= self.n_triangles) | ~np.isfinite(t)
        prim[miss] = -1
        t[miss] = np.inf
        uv = ans["primitive_uvs"].numpy().astype(np.float64)
        uv[miss] = 0.0
        hit = np.nonzero(~miss)[0]
        normal = np.zeros((N, 3))
        if hit.size:
            t[hit], uv[hit], normal[hit] = self._refine(O[hit], D[hit], prim[hit], t[hit],
                                                        uv[hit])
        return RayHits(t=t, triangle=prim, barycentric=uv, normal=normal)

    def first_hit_ids(self, origins: np.ndarray, directions: np.ndarray) -> np.ndarray:
        """(N,) int64 id of the first triangle each ray hits, -1 on a miss: Embree's answer
        alone (float32), without the float64 refinement of :meth:`cast` (for callers that
        recompute the hits exactly themselves).

        Args:
            origins: (N, 3); directions: (N, 3) (any non-zero length).
        """
        O, D = _check_rays(origins, directions)
        if O.shape[0] == 0:
            return np.zeros(0, np.int64)
        ans = self._scene.cast_rays(self._rays_tensor(O, D), nthreads=self.nthreads)
        prim = ans["primitive_ids"].numpy().astype(np.int64)
        prim[(prim >= self.n_triangles) | ~np.isfinite(ans["t_hit"].numpy())] = -1
        return prim

    def _refine(self, O: np.ndarray, D: np.ndarray, tri: np.ndarray, t: np.ndarray,
                uv: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Recompute t and the barycentric weights of known hits in float64 (Moller-Trumbore
        on the hit triangle; Embree's float32 answer is kept where the ray is parallel), and
        the hit triangles' unit geometric normals (computed here, only for hit triangles)."""
        F = self.triangles[tri]
        v0 = self.vertices[F[:, 0]]
        e1 = self.vertices[F[:, 1]] - v0
        e2 = self.vertices[F[:, 2]] - v0
        p = np.cross(D, e2)
        det = np.einsum("nk,nk->n", e1, p)
        ok = np.abs(det) > 1e-12 * np.linalg.norm(e1, axis=1) * np.linalg.norm(e2, axis=1) * \
            np.linalg.norm(D, axis=1)
        inv = np.where(ok, 1.0 / np.where(ok, det, 1.0), 0.0)
        s = O - v0
        q = np.cross(s, e1)
        u = np.einsum("nk,nk->n", s, p) * inv
        v = np.einsum("nk,nk->n", D, q) * inv
        tt = np.einsum("nk,nk->n", e2, q) * inv
        t_out = np.where(ok, tt, t)
        uv_out = np.where(ok[:, None], np.stack([u, v], axis=1), uv)
        n = np.cross(e1, e2)
        nn = np.linalg.norm(n, axis=1, keepdims=True)
        n = np.where(nn > 0, n / np.maximum(nn, 1e-300), 0.0)
        return t_out, uv_out, n

    def occluded(self, origins: np.ndarray, directions: np.ndarray, tmax: float | np.ndarray,
                 tmin: float = 0.0) -> np.ndarray:
        """Whether anything is hit with ``tmin < t < tmax`` (shadow rays).

        Args:
            origins: (N, 3); directions: (N, 3); tmax: scalar or (N,) upper bound of t in
                units of each direction's length (e.g. ``directions = light - point`` and
                ``tmax = 1`` tests the segment up to the light); tmin: lower bound (use a
                small value, or offset the origins, to avoid hitting the start surface).

        Returns:
            (N,) bool, True where the segment is blocked.
        """
        O, D = _check_rays(origins, directions)
        N = O.shape[0]
        tmax_arr = np.broadcast_to(np.asarray(tmax, dtype=np.float64), (N,))
        if N == 0:
            return np.zeros(0, bool)
        if np.any(tmax_arr < tmin) or np.isnan(tmax_arr).any():
            raise ShapeError("expected tmax >= tmin for every ray")
        if np.all(tmax_arr == tmax_arr[0]):
            res = self._scene.test_occlusions(self._rays_tensor(O, D), tnear=float(tmin),
                                              tfar=float(tmax_arr[0]), nthreads=self.nthreads)
            return res.numpy().astype(bool)
        # open3d takes one (tnear, tfar) per call: re-express every ray as the segment
        # from O + tmin D to O + tmax D with t in [0, 1] (or [0, inf) when tmax is inf)
        finite = np.isfinite(tmax_arr)
        live = tmax_arr > tmin  # an empty segment is never blocked
        Os = O + float(tmin) * D
        Ds = D.copy()
        Ds[finite] *= (tmax_arr[finite] - float(tmin))[:, None]
        out = np.zeros(N, bool)
        for sel, tfar in ((np.nonzero(finite & live)[0], 1.0), (np.nonzero(~finite)[0], np.inf)):
            if sel.size:
                res = self._scene.test_occlusions(self._rays_tensor(Os[sel], Ds[sel]),
                                                  tnear=0.0, tfar=tfar, nthreads=self.nthreads)
                out[sel] = res.numpy().astype(bool)
        return out

    def _pixels_in_bbox(self, camera: Camera, margin: int = 2) -> np.ndarray:
        """Flat ids of the pixels inside the projected bounding box of the mesh (all pixels
        when part of the mesh is at or behind the camera plane)."""
        W, H = camera.width, camera.height
        V = self.vertices
        if V.shape[0] == 0 or np.any(V[:, 2] <= 1e-6):
            return np.arange(W * H)
        uv = camera.project(V)
        lo = np.floor(uv.min(0)).astype(np.int64) - margin
        hi = np.ceil(uv.max(0)).astype(np.int64) + margin
        u0, v0 = max(lo[0], 0), max(lo[1], 0)
        u1, v1 = min(hi[0], W - 1), min(hi[1], H - 1)
        if u1 < u0 or v1 < v0:
            return np.zeros(0, np.int64)
        uu, vv = np.meshgrid(np.arange(u0, u1 + 1), np.arange(v0, v1 + 1))
        return (vv * W + uu).reshape(-1)

    def render(self, camera: Camera, vertex_normals: np.ndarray | None = None,
               vertex_attrs: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Per-pixel maps of the mesh seen by ``camera`` (mesh in the camera frame).

        See :func:`render_maps` for the returned maps.
        """
        if not isinstance(camera, Camera):
            raise ShapeError(f"expected camera to be a Camera; got {type(camera).__name__}")
        H, W = camera.height, camera.width
        nV = self.vertices.shape[0]
        attrs = dict(vertex_attrs or {})
        for name, a in attrs.items():
            if name in MAP_KEYS:
                raise ConfigError(f"vertex attribute name '{name}' clashes with a standard map")
            arr = np.asarray(a)
            if arr.ndim not in (1, 2) or arr.shape[0] != nV:
                raise ShapeError(f"expected vertex attribute '{name}' to have shape ({nV},) or "
                                 f"({nV}, C); got {arr.shape}")
        if vertex_normals is None:
            vn = _vertex_normals(self.vertices, self.triangles)
        else:
            vn = np.asarray(vertex_normals, dtype=np.float64)
            check_shape(vn, "vertex_normals", (nV, 3))

        # Only pixels inside the mesh's projected bounding box can see it: cast those.
        pix = self._pixels_in_bbox(camera)
        dirs = camera.rays(np.stack([pix % W, pix // W], axis=1).astype(np.float64))
        sub = self.cast(np.zeros_like(dirs), dirs)
        ok = sub.hit
        idx = pix[ok]                                       # flat pixel ids of hits
        hit = np.zeros(H * W, bool)
        hit[idx] = True
        tri_id = sub.triangle[ok]
        tri = self.triangles[tri_id]                        # (M, 3)
        w = sub.weights()[ok]                               # (M, 3)
        geo_normal = sub.normal[ok]
        dirs = dirs[ok]

        def interp(a: np.ndarray) -> np.ndarray:
            a = np.asarray(a, dtype=np.float64)
            if a.ndim == 1:
                return np.einsum("mk,mk->m", w, a[tri])
            return np.einsum("mk,mkc->mc", w, a[tri])

        def full(values: np.ndarray, fill: float = np.nan, dtype=np.float64) -> np.ndarray:
            out = np.full((H * W,) + values.shape[1:], fill, dtype=dtype)
            out[idx] = values
            return out.reshape((H, W) + values.shape[1:])

        points = interp(self.vertices)
        n = interp(vn)
        n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-300)
        back = np.einsum("mc,mc->m", geo_normal, dirs) > 0
        n[back] *= -1.0
        maps = {
            "mask": hit.reshape(H, W),
            "depth": full(points[:, 2]),
            "points": full(points),
            "triangle": full(tri_id, -1, np.int64),
            "barycentric": full(w),
            "normals": full(n),
            "backface": full(back.astype(np.float64), 0.0).astype(bool),
        }
        for name, a in attrs.items():
            maps[name] = full(interp(a))
        return maps


def render_maps(vertices_cam: np.ndarray, triangles: np.ndarray, camera: Camera,
                vertex_normals: np.ndarray | None = None,
                vertex_attrs: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Ray-cast per-pixel maps of a mesh given in the camera frame.

    One ray per pixel centre, ``camera.rays()`` (lens distortion is not applied).

    Args:
        vertices_cam: (V, 3) vertex positions in mm, OpenCV camera frame.
        triangles: (F, 3) integer vertex ids, counter-clockwise seen from outside.
        camera: the pinhole camera (image size W x H).
        vertex_normals: optional (V, 3) unit vertex normals in the camera frame; default:
            area-weighted normals of the mesh (:func:`faceps.core.mesh.vertex_normals`).
        vertex_attrs: optional name -> (V,) or (V, C) per-vertex values (e.g. ``albedo``)
            to interpolate; names must differ from :data:`MAP_KEYS`.

    Returns:
        dict of arrays, NaN (or -1 / False) where no surface is seen:

        - ``mask`` (H, W) bool: a triangle is hit;
        - ``depth`` (H, W) float64 z of the hit point in mm;
        - ``points`` (H, W, 3) float64 hit points in mm, camera frame;
        - ``triangle`` (H, W) int64 hit triangle id, -1 outside;
        - ``barycentric`` (H, W, 3) float64 weights of the triangle's three corners;
        - ``normals`` (H, W, 3) float64 barycentric-interpolated vertex normals,
          re-normalised; flipped where the back of a triangle is seen, so a surface facing
          the camera has n_z < 0;
        - ``backface`` (H, W) bool: the back (inside) of a triangle was hit;
        - one (H, W) or (H, W, C) float64 map per vertex attribute.
    """
    return RayCaster(vertices_cam, triangles).render(camera, vertex_normals, vertex_attrs)


def visible_vertices(vertices_cam: np.ndarray, triangles: np.ndarray,
                     caster: RayCaster | None = None, tol_mm: float = 0.5) -> np.ndarray:
    """(V,) bool: vertices of a camera-frame mesh whose viewing ray first hits the mesh at
    the vertex itself (within ``tol_mm``), i.e. vertices the camera sees."""
    G = np.asarray(vertices_cam, np.float64)
    caster = caster or RayCaster(G, triangles)
    dist = np.linalg.norm(G, axis=1)
    hits = caster.cast(np.zeros_like(G), G / dist[:, None])
    return hits.hit & (hits.t >= dist - tol_mm)
