import numpy as np
import pytest
import trimesh

from faceps.core import (
    ShapeError,
    face_normals,
    face_normals_torch,
    triangle_neighbors,
    triangle_one_ring,
    vertex_adjacency,
    vertex_normals,
    vertex_normals_torch,
)
from tests.tolerances import assert_close


def test_icosphere_vertex_normals_are_normalised_positions():
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=2.5)
    V, F = np.asarray(sphere.vertices), np.asarray(sphere.faces)
    n = vertex_normals(V, F)
    # area weighting of a slightly irregular one-ring: exact only in the limit
    radial = V / np.linalg.norm(V, axis=1, keepdims=True)
    assert_close(n, radial, atol=6e-3, name="normals")
    angle = np.degrees(np.arccos(np.clip(np.einsum("ij,ij->i", n, radial), -1, 1)))
    assert angle.max() < 0.4  # halves with each subdivision
    fn, area = face_normals(V, F, return_area=True)
    centres = V[F].mean(1)
    assert np.all(np.einsum("ij,ij->i", fn, centres) > 0)  # outward (CCW from outside)
    assert_close(area.sum(), sphere.area)


def test_area_weighting():
    # a vertex shared by a big and a small triangle: the big one dominates
    V = np.array([[0, 0, 0], [10, 0, 0], [0, 10, 0], [0, 0, 1.0], [0, -1, 0]], float)
    F = np.array([[0, 1, 2], [0, 3, 4]])
    n = vertex_normals(V, F)
    big, small = np.array([0, 0, 1.0]), np.array([1.0, 0, 0])
    expected = 100 * big / 2 * 2 + 1 * small
    expected /= np.linalg.norm(expected)
    assert_close(n[0], expected)


def test_triangle_neighbors_on_a_square():
    F = np.array([[0, 1, 2], [0, 2, 3]])
    nb = triangle_neighbors(F)
    assert nb[0].tolist() == [-1, -1, 1]  # edge (2, 0) is shared
    assert nb[1].tolist() == [0, -1, -1]  # edge (0, 2)


def test_one_ring_and_vertex_adjacency():
    F = np.array([[0, 1, 2], [1, 3, 2], [3, 4, 5]])
    A = triangle_one_ring(F).toarray()
    assert A.tolist() == [[0, 1, 0], [1, 0, 1], [0, 1, 0]]
    E = vertex_adjacency(F, 6).toarray()
    assert E[0, 1] == 1 and E[1, 0] == 1 and E[0, 3] == 0 and E.trace() == 0


def test_bad_triangles():
    with pytest.raises(ShapeError):
        vertex_normals(np.zeros((3, 3)), np.array([[0, 1, 3]]))
    with pytest.raises(ShapeError):
        face_normals(np.zeros((3, 3)), np.array([[0.0, 1.0, 2.0]]))


def test_torch_normals_agree():
    torch = pytest.importorskip("torch")
    sphere = trimesh.creation.icosphere(subdivisions=2)
    V, F = np.asarray(sphere.vertices), np.asarray(sphere.faces)
    Vt = torch.tensor(np.stack([V, 2 * V]), dtype=torch.float64)
    Ft = torch.tensor(F, dtype=torch.long)
    assert_close(vertex_normals_torch(Vt, Ft)[1], vertex_normals(V, F))
    assert_close(face_normals_torch(Vt, Ft)[0], face_normals(V, F))
