"""Fine detail: growing selections of triangles, and detail that does not depend on which
points are evaluated or which triangles are refined."""

import numpy as np

from faceps.model import load_model
from faceps.synth.detail import (
    DetailConfig,
    detail_height,
    detailed_mesh,
    facing_triangles,
    grow_selection,
    sample_detail,
    subdivide,
)
from tests.tolerances import assert_close


def test_grow_selection_adds_vertex_sharing_rings():
    # a strip of triangles 0-1-2-3-4, each sharing an edge with the next
    F = np.array([[0, 1, 2], [1, 3, 2], [2, 3, 4], [3, 5, 4], [4, 5, 6]])
    sel = np.array([True, False, False, False, False])
    assert grow_selection(sel, F, 0).tolist() == sel.tolist()
    assert grow_selection(sel, F, 1).tolist() == [True, True, True, False, False]
    assert grow_selection(sel, F, 2).all()
    assert sel.tolist() == [True, False, False, False, False]  # input untouched


def test_detail_is_the_same_whichever_points_are_evaluated():
    """The height at a point depends on the point (and the draw), not on the others: the
    refined part of a face can change with the view without changing its detail."""
    model = load_model("builtin")
    params = sample_detail(np.random.default_rng(2), DetailConfig())
    rest = model.mean.astype(np.float64)
    R = subdivide(rest, model.triangles, 1)[0]
    lm = model.landmark_points(rest)
    z_back = float(rest[:, 2].min())
    h = detail_height(R, lm, params, z_back=z_back)
    front = np.nonzero(R[:, 2] > np.median(R[:, 2]))[0]
    assert np.abs(h[front]).max() > 0.1
    assert np.array_equal(detail_height(R[front], lm, params, z_back=z_back), h[front])
    # and detailed_mesh passes the whole mean shape's back, whatever is refined
    G = rest @ np.diag([1.0, -1.0, -1.0]) + [0, 0, 600.0]
    region = model.region.astype(np.float64)
    wide = facing_triangles(G, model.triangles)
    centroid_z = rest[model.triangles].mean(1)[:, 2]
    narrow = wide & (centroid_z > np.percentile(centroid_z, 60))
    Va, _, Sa = detailed_mesh(G, rest, model.triangles, lm, params, 1, region, refine=wide)
    Vb, _, Sb = detailed_mesh(G, rest, model.triangles, lm, params, 1, region, refine=narrow)
    assert Vb.shape[0] < Va.shape[0]
    from scipy.spatial import cKDTree

    # the vertices deep inside the narrow selection are where they are in the wide mesh
    inner = ~grow_selection(~narrow, model.triangles, 2)
    ids = np.unique(model.triangles[inner])
    pa = Sa @ rest  # rest positions identify vertices across the two meshes
    pb = Sb @ rest
    deep = cKDTree(pb).query(rest[ids])[1]
    j = cKDTree(pa).query(pb[deep])[1]
    assert deep.size > 500
    assert_close(Vb[deep], Va[j], atol=1e-9, name="detailed vertices")


def test_bumps_are_off_by_default_and_leave_the_other_draws_alone():
    """Bumps are drawn only when asked for: faces without them keep their old random
    stream, and with them the wrinkles and pores are the same plus a smooth field."""
    model = load_model("builtin")
    rest = model.mean.astype(np.float64)
    lm = model.landmark_points(rest)
    z_back = float(rest[:, 2].min())
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    plain = sample_detail(rng_a, DetailConfig())
    bumpy = sample_detail(rng_b, DetailConfig(bumps=(3.0, 6.0)))
    assert plain.bumps == 0.0 and 3.0 <= bumpy.bumps <= 6.0
    assert {k: v for k, v in bumpy.to_dict().items() if k != "bumps"} == \
        {k: v for k, v in plain.to_dict().items() if k != "bumps"}
    h0 = detail_height(rest, lm, plain, z_back=z_back)
    h1 = detail_height(rest, lm, bumpy, z_back=z_back)
    diff = h1 - h0
    face = model.region & (rest[:, 2] > np.percentile(rest[:, 2], 60))
    # mm-scale shape change on the face, nothing on the back of the head
    assert np.abs(diff[face]).max() > 1.0
    eye_z = 0.5 * (lm[36, 2] + lm[45, 2])
    back = rest[:, 2] < eye_z - 60
    assert np.abs(diff[back]).max() < 1e-6
    # smooth: neighbouring vertices (about 1-2 mm apart) differ far less than the bumps
    e = np.array(sorted({tuple(sorted(p)) for t in model.triangles[:20000]
                         for p in ((t[0], t[1]), (t[1], t[2]))}))
    step = np.abs(diff[e[:, 0]] - diff[e[:, 1]])
    length = np.linalg.norm(rest[e[:, 0]] - rest[e[:, 1]], axis=1)
    assert np.max(step / np.maximum(length, 1e-9)) < 1.5
    # the same whichever points are evaluated
    sub = np.nonzero(face)[0]
    assert np.array_equal(detail_height(rest[sub], lm, bumpy, z_back=z_back), h1[sub])


def test_bumps_range_is_checked():
    import pytest

    from faceps.core.errors import ConfigError

    for bad in ((-1.0, 2.0), (3.0, 2.0), (1.0,)):
        with pytest.raises(ConfigError, match="bumps"):
            DetailConfig(bumps=bad)


def _sphere_error(V: np.ndarray, F: np.ndarray, radius: float) -> tuple[float, float]:
    """(largest distance from the sphere (mm), mean angle (deg) between the mesh's vertex
    normals and the sphere's)."""
    from faceps.core.mesh import vertex_normals

    r = np.linalg.norm(V, axis=1)
    n = vertex_normals(V, F)
    cos = np.clip(np.sum(n * V / r[:, None], axis=1), -1.0, 1.0)
    return float(np.abs(r - radius).max()), float(np.degrees(np.arccos(cos)).mean())


def test_phong_tessellation_rounds_the_facets_and_keeps_the_corners():
    """Subdivided at pixel scale, a coarse mesh's flat facets would show in the rendered
    normals; Phong tessellation curves them toward the surface the corners' normals
    describe, here a sphere, and leaves the coarse vertices where they are."""
    import trimesh

    from faceps.core.mesh import vertex_normals
    from faceps.synth.detail import phong_tessellate, subdivision_operator

    radius = 100.0
    ico = trimesh.creation.icosphere(subdivisions=1, radius=radius)
    C, T = np.asarray(ico.vertices, np.float64), np.asarray(ico.faces)
    S, F = subdivision_operator(T, C.shape[0], 3)
    flat = S @ C
    nc = vertex_normals(C, T)
    off = phong_tessellate(S, C, nc, 0.5) - flat
    dist_flat, ang_flat = _sphere_error(flat, F, radius)
    dist_phong, ang_phong = _sphere_error(flat + off, F, radius)
    assert dist_flat > 5.0 and ang_flat > 5.0  # 80 coarse triangles: large facets
    # 1/2 is exact to second order on a sphere: ten times closer in place and normal
    assert dist_phong < 0.12 * dist_flat
    assert ang_phong < 0.12 * ang_flat
    # more rounding overshoots
    assert _sphere_error(phong_tessellate(S, C, nc, 0.75), F, radius)[0] > 2 * dist_phong
    # the coarse corners stay (rows of S that select one coarse vertex)
    corner = np.asarray((S == 1.0).sum(axis=1)).ravel() == 1
    assert corner.sum() == C.shape[0]
    assert np.abs(off[corner]).max() < 1e-9
    # alpha 0: midpoint subdivision unchanged
    assert np.abs(phong_tessellate(S, C, nc, 0.0) - flat).max() == 0.0


def test_phong_tessellation_leaves_the_edges_of_unrefined_triangles_straight():
    """Where subdivided triangles meet ones left coarse, the subdivided vertices on their
    shared edges must stay on the straight coarse edge, or the mesh would crack there."""
    model = load_model("builtin")
    rest = model.mean.astype(np.float64)
    G = rest @ np.diag([1.0, -1.0, -1.0]) + [0, 0, 600.0]
    tri = model.triangles
    refine = facing_triangles(G, tri)
    lm = model.landmark_points(rest)
    V0, F0, S0 = detailed_mesh(G, rest, tri, lm, None, 2, refine=refine)
    V1, F1, S1 = detailed_mesh(G, rest, tri, lm, None, 2, refine=refine, smoothing=0.5)
    assert np.array_equal(F0, F1)
    moved = np.linalg.norm(V1 - V0, axis=1)
    assert moved.max() > 0.05  # the subdivided facets are curved ...
    outside = np.zeros(G.shape[0], bool)
    outside[tri[~refine].reshape(-1)] = True
    on_coarse_part = np.asarray(S1 @ (~outside).astype(float)).ravel() == 0
    assert on_coarse_part.sum() > 1000
    # ... but not where they touch the coarse part: every vertex of an unrefined triangle
    # and every subdivided vertex on its edges keeps the midpoint position
    assert moved[on_coarse_part].max() == 0.0
