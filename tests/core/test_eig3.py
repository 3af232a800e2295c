"""Closed-form symmetric 3x3 eigen-decomposition against LAPACK."""

import numpy as np
import pytest

from faceps.core.eig3 import CHUNK, eigh3
from faceps.core.errors import ShapeError


def _check(A: np.ndarray, tol: float = 1e-13) -> None:
    lam, Q = eigh3(A)
    assert lam.shape == (A.shape[0], 3) and Q.shape == (A.shape[0], 3, 3)
    scale = np.maximum(np.linalg.norm(A, axis=(1, 2)), 1e-300)
    # eigenvalues: LAPACK's, ascending
    np.testing.assert_array_less(np.abs(lam - np.linalg.eigvalsh(A)).max(1) / scale, tol)
    assert np.all(np.diff(lam, axis=1) >= 0)
    # eigenvectors: orthonormal, and A q = lambda q
    np.testing.assert_allclose(np.einsum("mki,mkj->mij", Q, Q),
                               np.broadcast_to(np.eye(3), Q.shape), atol=1e-13)
    resid = np.linalg.norm(np.einsum("mij,mjk->mik", A, Q) - Q * lam[:, None, :], axis=1)
    np.testing.assert_array_less(resid.max(1) / scale, tol)


def test_random_symmetric_matrices_match_lapack():
    rng = np.random.default_rng(0)
    B = rng.standard_normal((3 * CHUNK + 17, 3, 3))      # several chunks and a remainder
    _check(B + B.transpose(0, 2, 1))
    _check(1e-9 * (B + B.transpose(0, 2, 1)))           # scale does not matter
    _check(1e9 * (B + B.transpose(0, 2, 1)))


def test_rank_deficient_matrices_of_one_and_two_lights():
    # a pixel seen by one (two) lights has a data matrix of rank one (two)
    g = np.random.default_rng(1).standard_normal((5000, 2, 3))
    _check(np.einsum("mi,mj->mij", g[:, 0], g[:, 0]))
    _check(np.einsum("mi,mj->mij", g[:, 0], g[:, 0]) + np.einsum("mi,mj->mij", g[:, 1], g[:, 1]),
           tol=1e-10)


@pytest.mark.parametrize("values", [(1, 1, 2), (1, 2, 2), (3, 3, 3), (0, 0, 1e-9), (-1, 0, 0),
                                    (1e-8, 1, 1 + 1e-12), (-5, 2, 2)])
def test_repeated_and_nearly_repeated_eigenvalues(values):
    # the textbook closed form (cross products of rows) fails here; the robust one must not
    rng = np.random.default_rng(2)
    Q, _ = np.linalg.qr(rng.standard_normal((2000, 3, 3)))
    A = np.einsum("mik,k,mjk->mij", Q, np.asarray(values, float), Q)
    _check(A, tol=1e-12)


def test_exact_cases_and_errors():
    lam, Q = eigh3(np.zeros((2, 3, 3)))
    np.testing.assert_array_equal(lam, 0.0)
    np.testing.assert_array_equal(Q, np.broadcast_to(np.eye(3), (2, 3, 3)))
    lam, Q = eigh3(np.diag([3.0, 1.0, 2.0])[None])
    np.testing.assert_allclose(lam, [[1.0, 2.0, 3.0]], atol=1e-15)
    np.testing.assert_allclose(np.abs(Q[0]), [[0, 0, 1], [1, 0, 0], [0, 1, 0]], atol=1e-15)
    assert eigh3(np.zeros((0, 3, 3)))[0].shape == (0, 3)
    with pytest.raises(ShapeError):
        eigh3(np.zeros((4, 3)))
