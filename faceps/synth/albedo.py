"""Albedo transfer from a reconstruction onto the morphable model's topology.

Paper section 3.3: albedos recovered from real captures are transferred to faces with
random shapes, which works because every face shares the model's topology. Given a
per-pixel albedo map and the fitted proxy (coefficients and pose) of the same capture, each
visible proxy vertex takes the albedo under its projection (bilinear); vertices that are
hidden, outside the map or on NaN pixels are filled by harmonic interpolation over the
mesh (a sparse Laplace solve with the sampled vertices fixed).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from faceps.core.camera import Camera
from faceps.core.errors import FitError, check_shape
from faceps.core.imageio import sample_bilinear
from faceps.core.mesh import vertex_adjacency
from faceps.core.raycast import visible_vertices
from faceps.core.rotation import pose_rotation
from faceps.model.morphable import Coefficients, MorphableModel

__all__ = ["transfer_albedo", "harmonic_fill", "sample_bilinear"]


def harmonic_fill(values: np.ndarray, known: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """Fill unknown per-vertex values by harmonic interpolation over the mesh.

    Args:
        values: (V, C) values (entries of unknown vertices are ignored).
        known: (V,) bool vertices whose values are fixed.
        triangles: (F, 3) mesh.

    Returns:
        (V, C) values; components with no known vertex at all keep the mean of the known.
    """
    V = values.shape[0]
    if not known.any():
        raise FitError("no vertex has a known value to interpolate from")
    A = vertex_adjacency(triangles, V)
    deg = np.asarray(A.sum(1)).ravel()
    Lap = sp.diags(deg) - A
    unk = np.nonzero(~known)[0]
    out = np.asarray(values, np.float64).copy()
    if unk.size == 0:
        return out
    kn = np.nonzero(known)[0]
    Luu = Lap[unk][:, unk].tocsc()
    Luk = Lap[unk][:, kn]
    # isolated unknown parts (no path to a known vertex) make Luu singular: a tiny
    # diagonal term pulls them to the mean instead
    Luu = Luu + 1e-8 * sp.identity(unk.size, format="csc")
    rhs = -(Luk @ out[kn]) + 1e-8 * out[kn].mean(0)[None, :]
    solve = spla.factorized(Luu)
    for c in range(out.shape[1]):
        out[unk, c] = solve(np.ascontiguousarray(rhs[:, c]))
    return out


def transfer_albedo(albedo_map: np.ndarray, camera: Camera, model: MorphableModel,
                    coefficients: Coefficients, angles: np.ndarray, translation: np.ndarray,
                    *, min_cos: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Per-vertex albedo of ``model`` from a reconstruction's albedo map.

    Args:
        albedo_map: (H, W, 3) linear albedo of the capture (NaN where unknown).
        camera: the capture's camera (no distortion).
        model: the morphable model of the proxy.
        coefficients, angles, translation: the fitted proxy (pose maps model to camera).
        min_cos: vertices seen at a grazing angle (cosine between normal and view ray below
            this) are not sampled.

    Returns:
        (albedo (V, 3) in [0, 1], sampled (V,) bool vertices that took their value from
        the map; the others are interpolated).
    """
    check_shape(albedo_map, "albedo_map", (camera.height, camera.width, 3))
    R = pose_rotation(np.asarray(angles, np.float64))
    G = model.geometry(coefficients.id, coefficients.exp) @ R.T + np.asarray(translation)
    n = model.vertex_normals(G)
    uv = camera.project(G)
    visible = visible_vertices(G, model.triangles)
    dirs = G / np.linalg.norm(G, axis=1, keepdims=True)
    facing = -np.einsum("ij,ij->i", n, dirs) > min_cos
    vals = sample_bilinear(albedo_map, uv)
    sampled = visible & facing & np.all(np.isfinite(vals), axis=1)
    filled = harmonic_fill(np.nan_to_num(vals), sampled, model.triangles)
    return np.clip(filled, 0.0, 1.0), sampled
