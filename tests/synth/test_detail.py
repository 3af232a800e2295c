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
