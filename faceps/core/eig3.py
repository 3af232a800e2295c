"""Closed-form eigen-decomposition of many symmetric 3x3 matrices at once.

``numpy.linalg.eigh`` on an (M, 3, 3) stack calls LAPACK once per matrix: about 0.8 us per
matrix here, the largest single cost of the normal step of the normal/albedo update (which
solves a 3x3 problem per pixel, millions of times per reconstruction). The eigenvalues of
a symmetric 3x3 matrix have a closed form (the roots of its characteristic cubic, by the
trigonometric method), and its eigenvectors follow from cross products; done on whole
arrays that is several times faster. Why not the naive closed form: the textbook
eigenvectors (a cross product of two rows of ``A - lambda I``) break down when two
eigenvalues (nearly) coincide, which is common here (a pixel seen by one light has a
rank-one data matrix: two zero eigenvalues). This follows the robust non-iterative scheme
of D. Eberly ("A Robust Eigensolver for 3x3 Symmetric Matrices", Geometric Tools, 2014):

1. scale the matrix by its largest entry and shift it by its mean eigenvalue ``q``;
2. the eigenvalues are ``q + p * 2 cos(phi + 2 pi k / 3)`` with ``p`` the deviatoric size
   and ``3 phi = acos(det(B) / 2)``, ``B = (A - q I) / p``;
3. the eigenvector of the eigenvalue farthest from the other two (the largest when
   ``det(B) >= 0``, else the smallest) is the longest cross product of two rows of
   ``A - lambda I``; the second eigenvector solves a 2x2 problem in the plane orthogonal
   to the first (well conditioned whatever the multiplicity); the third is their cross
   product;
4. the eigenvalues are recomputed as the Rayleigh quotients of those eigenvectors (the
   trigonometric ones lose half their digits next to a repeated eigenvalue, where the
   arc cosine is taken near +-1).

Accuracy (tests/core/test_eig3.py, against LAPACK on random, rank-deficient and
repeated-eigenvalue matrices): eigenvalues and ``|A q - lambda q|`` within 1e-13 of the
matrix norm (1e-10 for sums of two rank-one matrices), eigenvectors orthonormal to 1e-13.
Speed: about 3x LAPACK's (``bench/bench_eig3.py``: 7.7 against 23.9 ms for 30k matrices).
"""

from __future__ import annotations

import numpy as np

from faceps.core.errors import check_shape

__all__ = ["CHUNK", "eigh3", "eigh3_chunk"]

#: deviatoric size (relative to the largest entry) below which a matrix is taken as a
#: multiple of the identity (its eigenvectors are then arbitrary; rounding noise is not
#: a direction)
_ROUND = 1e-12
#: matrices per chunk of :func:`eigh3`: small enough that the many element-wise passes
#: over a chunk stay in the CPU cache
CHUNK = 8192


def _cross(a: tuple, b: tuple) -> tuple:
    return (a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0])


def _dot(a: tuple, b: tuple) -> np.ndarray:
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


def _unit(a: tuple) -> tuple:
    n = np.sqrt(_dot(a, a))
    inv = np.where(n > 0, 1.0 / np.where(n > 0, n, 1.0), 0.0)
    return (a[0] * inv, a[1] * inv, a[2] * inv)


def _where(cond: np.ndarray, a: tuple, b: tuple) -> tuple:
    return tuple(np.where(cond, x, y) for x, y in zip(a, b))


def _vector_of(m: tuple, lam: np.ndarray) -> tuple:
    """Unit null vector of ``A - lam I`` for an eigenvalue of multiplicity one (the
    longest of the three cross products of its rows). ``m`` = (a00, a01, a02, a11, a12,
    a22)."""
    a00, a01, a02, a11, a12, a22 = m
    r0 = (a00 - lam, a01, a02)
    r1 = (a01, a11 - lam, a12)
    r2 = (a02, a12, a22 - lam)
    c01, c02, c12 = _cross(r0, r1), _cross(r0, r2), _cross(r1, r2)
    d01, d02, d12 = _dot(c01, c01), _dot(c02, c02), _dot(c12, c12)
    best = _where(d01 >= d02, c01, c02)
    dbest = np.maximum(d01, d02)
    best = _where(dbest >= d12, best, c12)
    return _unit(best)


def _complement(w: tuple) -> tuple[tuple, tuple]:
    """An orthonormal pair (u, v) with u, v, w right-handed (w a unit vector)."""
    wx, wy, wz = w
    x_big = np.abs(wx) > np.abs(wy)
    inv_a = 1.0 / np.sqrt(np.maximum(wx * wx + wz * wz, 1e-300))
    inv_b = 1.0 / np.sqrt(np.maximum(wy * wy + wz * wz, 1e-300))
    zero = np.zeros_like(wx)
    u = _where(x_big, (-wz * inv_a, zero, wx * inv_a), (zero, wz * inv_b, -wy * inv_b))
    return u, _cross(w, u)


def _second_vector(m: tuple, w: tuple, lam: np.ndarray) -> tuple:
    """Unit eigenvector of eigenvalue ``lam`` orthogonal to the unit eigenvector ``w``:
    the null vector of the 2x2 restriction of ``A - lam I`` to the plane orthogonal to
    ``w``, from its larger row (the plane itself when the restriction vanishes, i.e. a
    repeated eigenvalue)."""
    a00, a01, a02, a11, a12, a22 = m
    u, v = _complement(w)

    def apply(x: tuple) -> tuple:
        return (a00 * x[0] + a01 * x[1] + a02 * x[2], a01 * x[0] + a11 * x[1] + a12 * x[2],
                a02 * x[0] + a12 * x[1] + a22 * x[2])

    au, av = apply(u), apply(v)
    m00 = _dot(u, au) - lam
    m01 = _dot(u, av)
    m11 = _dot(v, av) - lam
    # null vector (x, y) of [[m00, m01], [m01, m11]] from the row with the larger entries:
    # row (m00, m01) -> (m01, -m00); row (m01, m11) -> (m11, -m01); then (x u + y v)
    use_first = np.abs(m00) >= np.abs(m11)
    x = np.where(use_first, m01, m11)
    y = np.where(use_first, -m00, -m01)
    n = np.sqrt(x * x + y * y)
    ok = n > 0
    inv = 1.0 / np.where(ok, n, 1.0)
    x = np.where(ok, x * inv, 1.0)          # repeated eigenvalue: any vector of the plane
    y = np.where(ok, y * inv, 0.0)
    return (x * u[0] + y * v[0], x * u[1] + y * v[1], x * u[2] + y * v[2])


def eigh3(A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (ascending) and eigenvectors of symmetric 3x3 matrices, batched.

    Same contract as ``numpy.linalg.eigh`` for an (M, 3, 3) stack (only the upper
    triangle is read): ``A[m] @ Q[m, :, k] = lam[m, k] * Q[m, :, k]``, ``Q[m]``
    orthonormal. Eigenvector signs may differ from LAPACK's. The work runs in chunks of
    :data:`CHUNK` matrices so the many element-wise passes stay in the CPU cache.

    Args:
        A: (M, 3, 3) finite symmetric matrices.

    Returns:
        lam (M, 3) float64 ascending, Q (M, 3, 3) float64 (eigenvectors in the columns).
    """
    A = np.asarray(A, dtype=np.float64)
    check_shape(A, "A", (None, 3, 3))
    M = A.shape[0]
    lam = np.empty((M, 3))
    Q = np.empty((M, 3, 3))
    for i in range(0, M, CHUNK):
        lam[i:i + CHUNK], Q[i:i + CHUNK] = eigh3_chunk(A[i:i + CHUNK])
    return lam, Q


def eigh3_chunk(A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`eigh3` in one pass (no chunking; for callers that chunk their own work)."""
    M = A.shape[0]
    # scale by the largest entry (no overflow in the products; a zero matrix stays zero)
    raw = (A[:, 0, 0], A[:, 0, 1], A[:, 0, 2], A[:, 1, 1], A[:, 1, 2], A[:, 2, 2])
    s = np.max(np.abs(np.stack(raw)), axis=0)
    inv_s = np.where(s > 0, 1.0 / np.where(s > 0, s, 1.0), 0.0)
    m = tuple(np.ascontiguousarray(x) * inv_s for x in raw)
    a00, a01, a02, a11, a12, a22 = m
    q = (a00 + a11 + a22) / 3.0
    b00, b11, b22 = a00 - q, a11 - q, a22 - q
    p = np.sqrt((b00 * b00 + b11 * b11 + b22 * b22
                 + 2.0 * (a01 * a01 + a02 * a02 + a12 * a12)) / 6.0)
    round_ = p > _ROUND                             # A = q I (to rounding): any basis
    inv_p = 1.0 / np.where(round_, p, 1.0)
    c00, c11, c22 = b00 * inv_p, b11 * inv_p, b22 * inv_p
    c01, c02, c12 = a01 * inv_p, a02 * inv_p, a12 * inv_p
    half_det = 0.5 * (c00 * (c11 * c22 - c12 * c12) - c01 * (c01 * c22 - c12 * c02)
                      + c02 * (c01 * c12 - c11 * c02))
    half_det = np.clip(np.where(round_, half_det, 0.0), -1.0, 1.0)
    phi = np.arccos(half_det) / 3.0
    beta2 = 2.0 * np.cos(phi)                            # largest
    beta0 = 2.0 * np.cos(phi + 2.0 * np.pi / 3.0)        # smallest
    beta1 = -(beta0 + beta2)
    lam0, lam1, lam2 = q + p * beta0, q + p * beta1, q + p * beta2
    # the eigenvalue farthest from the others first: lam2 when det(B) >= 0, else lam0
    top = half_det >= 0
    first = _vector_of(m, np.where(top, lam2, lam0))
    second = _second_vector(m, first, lam1)
    third = _cross(first, second)   # top: first x second = e2 x e1 -> -e0; flip below
    e0 = _where(top, tuple(-x for x in third), first)
    e2 = _where(top, first, third)  # not top: e0 x e1 = e2
    e1 = second
    eye = np.eye(3)
    Q = np.empty((M, 3, 3))
    vecs = []
    for k, e in enumerate((e0, e1, e2)):
        e = tuple(np.where(round_, e[r], eye[r, k]) for r in range(3))
        vecs.append(e)
        for r in range(3):
            Q[:, r, k] = e[r]
    # Rayleigh quotients: the trigonometric eigenvalues lose half their digits next to a
    # repeated eigenvalue (acos near +-1); the quotients of the (accurate) eigenvectors
    # do not. Kept ascending (they can swap by rounding where two coincide).
    lam = np.empty((M, 3))
    for k, e in enumerate(vecs):
        lam[:, k] = (a00 * e[0] * e[0] + a11 * e[1] * e[1] + a22 * e[2] * e[2]
                     + 2.0 * (a01 * e[0] * e[1] + a02 * e[0] * e[2] + a12 * e[1] * e[2]))
    lam[:, 1] = np.maximum(lam[:, 1], lam[:, 0])
    lam[:, 2] = np.maximum(lam[:, 2], lam[:, 1])
    return lam * s[:, None], Q
