"""Triangle-mesh helpers: face normals, area-weighted vertex normals, adjacency.

Triangles are (F, 3) integer vertex ids, counter-clockwise seen from outside, so
``(v1 - v0) x (v2 - v0)`` points outward.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from faceps.core.errors import ShapeError, check_shape

__all__ = [
    "face_normals",
    "vertex_normals",
    "triangle_neighbors",
    "triangle_one_ring",
    "vertex_adjacency",
    "face_normals_torch",
    "vertex_normals_torch",
]


def _check_mesh(vertices: np.ndarray, triangles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    V = np.asarray(vertices, dtype=np.float64)
    F = np.asarray(triangles)
    check_shape(V, "vertices", (None, 3))
    check_shape(F, "triangles", (None, 3))
    if not np.issubdtype(F.dtype, np.integer):
        raise ShapeError(f"expected triangles to be integers; got {F.dtype}")
    if F.size and (F.min() < 0 or F.max() >= V.shape[0]):
        raise ShapeError(f"triangles index vertices outside [0, {V.shape[0]})")
    return V, F


def _face_cross(V: np.ndarray, F: np.ndarray) -> np.ndarray:
    """(F, 3) cross products (v1 - v0) x (v2 - v0), computed column-wise (gathers of
    contiguous columns and explicit products are several times faster than row gathers
    and np.cross on million-triangle meshes)."""
    cols = [np.ascontiguousarray(V[:, k]) for k in range(3)]
    f0, f1, f2 = (np.ascontiguousarray(F[:, k]) for k in range(3))
    ax, ay, az = (c[f1] - c[f0] for c in cols)
    bx, by, bz = (c[f2] - c[f0] for c in cols)
    return np.stack([ay * bz - az * by, az * bx - ax * bz, ax * by - ay * bx], axis=1)


def face_normals(vertices: np.ndarray, triangles: np.ndarray, return_area: bool = False):
    """Unit face normals (F, 3) (and areas (F,) in mm^2 when ``return_area``).

    Degenerate triangles get a zero normal.
    """
    V, F = _check_mesh(vertices, triangles)
    cross = _face_cross(V, F)
    norm = np.linalg.norm(cross, axis=1)
    n = np.where(norm[:, None] > 0, cross / np.maximum(norm, 1e-300)[:, None], 0.0)
    return (n, 0.5 * norm) if return_area else n


def vertex_normals(vertices: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """Area-weighted unit vertex normals (V, 3): the sum of incident face cross products.

    Vertices on no triangle get a zero normal.
    """
    V, F = _check_mesh(vertices, triangles)
    cross = _face_cross(V, F)
    # scatter-add of the face cross products to their corners; bincount is an order of
    # magnitude faster than np.add.at on million-triangle meshes
    idx = F.reshape(-1)
    acc = np.stack([np.bincount(idx, weights=np.repeat(cross[:, c], 3), minlength=V.shape[0])
                    for c in range(3)], axis=1)
    norm = np.linalg.norm(acc, axis=1, keepdims=True)
    return np.where(norm > 0, acc / np.maximum(norm, 1e-300), 0.0)


def triangle_neighbors(triangles: np.ndarray) -> np.ndarray:
    """Edge-adjacent triangles: (F, 3) ids; entry k is the triangle across the edge from
    corner k to corner k+1 (mod 3), -1 on a boundary edge. On a non-manifold edge only one
    pair of its triangles is linked."""
    F = np.asarray(triangles, dtype=np.int64)
    check_shape(F, "triangles", (None, 3))
    nF = F.shape[0]
    e0 = F[:, [0, 1, 2]].reshape(-1)
    e1 = F[:, [1, 2, 0]].reshape(-1)
    lo, hi = np.minimum(e0, e1), np.maximum(e0, e1)
    key = lo * (F.max() + 1 if F.size else 1) + hi
    order = np.argsort(key, kind="stable")
    ks = key[order]
    out = -np.ones(3 * nF, dtype=np.int64)
    same = np.nonzero(ks[1:] == ks[:-1])[0]
    a, b = order[same], order[same + 1]
    out[a] = b // 3
    out[b] = a // 3
    return out.reshape(nF, 3)


def triangle_one_ring(triangles: np.ndarray, n_vertices: int | None = None) -> sp.csr_matrix:
    """One-ring adjacency of triangles: a symmetric (F, F) 0/1 sparse matrix with 1 where
    two distinct triangles share at least one vertex."""
    F = np.asarray(triangles, dtype=np.int64)
    check_shape(F, "triangles", (None, 3))
    nV = int(F.max()) + 1 if n_vertices is None else int(n_vertices)
    nF = F.shape[0]
    incid = sp.csr_matrix((np.ones(3 * nF), (np.repeat(np.arange(nF), 3), F.reshape(-1))),
                          shape=(nF, nV))
    A = (incid @ incid.T).tocsr()
    A.setdiag(0)
    A.eliminate_zeros()
    A.data[:] = 1.0
    return A


def vertex_adjacency(triangles: np.ndarray, n_vertices: int) -> sp.csr_matrix:
    """Symmetric (V, V) 0/1 sparse matrix of mesh edges."""
    F = np.asarray(triangles, dtype=np.int64)
    i = F[:, [0, 1, 2]].reshape(-1)
    j = F[:, [1, 2, 0]].reshape(-1)
    A = sp.csr_matrix((np.ones(i.size), (i, j)), shape=(n_vertices, n_vertices))
    A = ((A + A.T) > 0).astype(np.float64)
    return A.tocsr()


def face_normals_torch(vertices, triangles):
    """Batched torch face normals: vertices (..., V, 3), triangles (F, 3) long -> (..., F, 3)."""
    import torch

    v0 = vertices[..., triangles[:, 0], :]
    v1 = vertices[..., triangles[:, 1], :]
    v2 = vertices[..., triangles[:, 2], :]
    return torch.nn.functional.normalize(torch.cross(v1 - v0, v2 - v0, dim=-1), dim=-1)


def vertex_normals_torch(vertices, triangles):
    """Batched torch area-weighted vertex normals: (..., V, 3)."""
    import torch

    v0 = vertices[..., triangles[:, 0], :]
    v1 = vertices[..., triangles[:, 1], :]
    v2 = vertices[..., triangles[:, 2], :]
    cross = torch.cross(v1 - v0, v2 - v0, dim=-1)
    acc = torch.zeros_like(vertices)
    for k in range(3):
        acc = acc.index_add(-2, triangles[:, k], cross)
    return torch.nn.functional.normalize(acc, dim=-1)
