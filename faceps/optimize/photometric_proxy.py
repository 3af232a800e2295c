"""Photometric refinement of the coarse proxy (paper section 3.2, after the landmark fit).

All images of a capture share the face's shape, expression, albedo and pose; only the
light changes. With the lights known (given or calibrated), the refinement adjusts
identity, expression, albedo coefficients and pose so that eq. 1 evaluated on the proxy's
visible vertices reproduces the linear images sampled at their projections:

    E = sum_{v, j} rho(sum_c huber(I_obs(v, j, c) - s_c * A_vc * beta_jc * g_j(V_v, N_v)))
        + w_lm * landmark reprojection + priors |alpha|^2

with ``g_j = max(0, n . (P_j - V)) / |P_j - V|^3``, a per-channel gain ``s`` (the
albedo model's scale is arbitrary), samples excluded where saturated, dark, in a cast
shadow of the current proxy (shadow rays) or facing away from the camera. Visibility and
cast shadows are recomputed a few times (outer loop); inside, the smooth problem is solved
with L-BFGS in torch (float64).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import numpy as np

from faceps.capture import Capture
from faceps.core.errors import ConfigError, FitError
from faceps.core.imageio import sample_bilinear
from faceps.core.lights import PointLights
from faceps.core.raycast import RayCaster, visible_vertices
from faceps.core.rotation import pose_rotation_torch, pose_to_euler
from faceps.model.morphable import Coefficients, MorphableModel
from faceps.optimize.proxy import ProxyFit

log = logging.getLogger(__name__)

__all__ = ["PhotometricConfig", "refine_photometric"]


@dataclass(frozen=True)
class PhotometricConfig:
    """Options of the photometric refinement.

    Attributes:
        n_id, n_exp, n_albedo: leading components refined (None: all).
        outer: visibility/shadow updates; inner: L-BFGS iterations per update.
        w_landmarks: weight of the landmark term (per squared pixel, relative to the
            photometric term normalised per sample).
        prior_id, prior_exp, prior_albedo: weights of |alpha|^2 (std units).
        huber: Huber threshold, as a fraction of the median observed intensity.
        dark: samples darker than this fraction of the median intensity are shadow.
        max_vertices: visible face vertices used (evenly subsampled).
        min_cos: vertices seen at a grazing angle are not sampled.
    """

    n_id: int | None = 40
    n_exp: int | None = None
    n_albedo: int | None = None
    outer: int = 3
    inner: int = 30
    w_landmarks: float = 0.05
    prior_id: float = 0.02
    prior_exp: float = 0.02
    prior_albedo: float = 0.02
    huber: float = 0.1
    dark: float = 0.05
    max_vertices: int = 6000
    min_cos: float = 0.25

    def __post_init__(self) -> None:
        if self.outer < 1 or self.inner < 1:
            raise ConfigError("outer and inner iterations must be >= 1")


def refine_photometric(model: MorphableModel, capture: Capture, fit: ProxyFit,
                       lights: PointLights, config: PhotometricConfig | None = None,
                       landmarks: np.ndarray | None = None) -> ProxyFit:
    """Refine a landmark fit with all images of the capture.

    Args:
        model: the morphable model of ``fit``.
        capture: the ingested session (linear images, saturation, camera).
        fit: the starting proxy (e.g. :func:`faceps.optimize.proxy.fit_landmarks`).
        lights: the lights of the images (given or calibrated), in the capture's order.
        config: options.
        landmarks: (68, 2) pixels for the landmark term (default: the capture's).

    Returns:
        a new :class:`ProxyFit` (albedo coefficients filled, history extended).
    """
    import torch

    config = config or PhotometricConfig()
    t0 = time.perf_counter()
    if len(lights) != capture.n_images:
        raise FitError(f"{capture.n_images} images but {len(lights)} lights")
    lm = capture.landmarks if landmarks is None else np.asarray(landmarks, np.float64)
    ki = model.n_id if config.n_id is None else min(config.n_id, model.n_id)
    ke = model.n_exp if config.n_exp is None else min(config.n_exp, model.n_exp)
    ka = model.n_albedo if config.n_albedo is None else min(config.n_albedo, model.n_albedo)
    dt = torch.float64
    T = model.torch_tensors(dtype=dt)
    K = torch.tensor(capture.camera.K, dtype=dt)
    P = torch.tensor(lights.positions, dtype=dt)
    B = torch.tensor(lights.intensities, dtype=dt)
    a_id = torch.tensor(fit.coefficients.id[:ki], dtype=dt, requires_grad=True)
    a_exp = torch.tensor(fit.coefficients.exp[:ke], dtype=dt, requires_grad=True)
    a_alb = torch.zeros(ka, dtype=dt, requires_grad=True)
    angles = torch.tensor(fit.angles, dtype=dt, requires_grad=True)
    trans = torch.tensor(fit.translation, dtype=dt, requires_grad=True)
    log_gain = torch.zeros(3, dtype=dt, requires_grad=True)
    tri = T["triangles"]
    exp_lower = (None if model.exp_lower is None
                 else torch.tensor(model.exp_lower[:ke], dtype=dt))
    lm_ids = model.landmarks68
    lm_use = (lm_ids >= 0) & np.all(np.isfinite(lm), axis=1) if lm is not None else None
    lm_t = None if lm is None else torch.tensor(np.nan_to_num(lm), dtype=dt)

    def geometry_cam():
        G = model.geometry_torch(a_id[None], a_exp[None])[0]
        R = pose_rotation_torch(angles[None])[0]
        return G @ R.T + trans

    def vertex_normals_t(G):
        v0, v1, v2 = G[tri[:, 0]], G[tri[:, 1]], G[tri[:, 2]]
        fn = torch.cross(v1 - v0, v2 - v0, dim=-1)
        acc = torch.zeros_like(G)
        for k in range(3):
            acc = acc.index_add(0, tri[:, k], fn)
        return torch.nn.functional.normalize(acc, dim=-1)

    history = list(fit.history)
    images = capture.images
    med = float(np.median(images[images > 0])) if np.any(images > 0) else 1.0
    region = model.region
    for outer in range(config.outer):
        with torch.no_grad():
            Gc = geometry_cam().numpy()
        Nc = model.vertex_normals(Gc)
        caster = RayCaster(Gc, model.triangles)
        vis = visible_vertices(Gc, model.triangles, caster)
        view = Gc / np.linalg.norm(Gc, axis=1, keepdims=True)
        vis &= region & (-np.einsum("ij,ij->i", Nc, view) > config.min_cos)
        ids = np.nonzero(vis)[0]
        if ids.size < 50:
            raise FitError(f"only {ids.size} visible proxy vertices to sample")
        if ids.size > config.max_vertices:
            ids = ids[np.linspace(0, ids.size - 1, config.max_vertices).astype(int)]
        uv = capture.camera.project(Gc[ids])
        obs = np.stack([sample_bilinear(images[j], uv) for j in range(capture.n_images)])
        sat = np.stack([sample_bilinear(capture.saturated[j][..., None].astype(float), uv)[:, 0]
                        for j in range(capture.n_images)])
        ok = np.all(np.isfinite(obs), axis=-1) & (np.nan_to_num(sat, nan=1.0) < 0.01)
        ok &= obs.mean(-1) > config.dark * med
        # cast shadows of the current proxy
        for j in range(capture.n_images):
            o = Gc[ids] + 0.5 * Nc[ids]
            d = lights.positions[j] - o
            dist = np.linalg.norm(d, axis=1)
            ok[j] &= ~caster.occluded(o, d / dist[:, None], dist - 1.0)
        if ok.sum() < 100:
            raise FitError("too few lit, unsaturated samples for the photometric refinement")
        obs_t = torch.tensor(np.nan_to_num(obs), dtype=dt)
        w_t = torch.tensor(ok.astype(np.float64))
        ids_t = torch.tensor(ids, dtype=torch.long)
        n_samples = float(ok.sum())
        delta = config.huber * med
        params = [a_id, a_exp, a_alb, angles, trans, log_gain]
        opt = torch.optim.LBFGS(params, lr=1.0, max_iter=config.inner,
                                line_search_fn="strong_wolfe")

        def closure(opt=opt, ids_t=ids_t, obs_t=obs_t, w_t=w_t, n_samples=n_samples,
                    delta=delta):
            opt.zero_grad()
            G = geometry_cam()
            N = vertex_normals_t(G)[ids_t]
            V = G[ids_t]
            d = P[:, None, :] - V[None]
            dist = d.norm(dim=-1)
            g = ((N[None] * d).sum(-1)).clamp_min(0.0) / dist**3                  # (L, n)
            alb = model.albedo_torch(a_alb[None])[0][ids_t] * torch.exp(log_gain)  # (n, 3)
            pred = alb[None] * B[:, None, :] * g[..., None]
            r = (pred - obs_t) * w_t[..., None]
            loss = torch.nn.functional.huber_loss(r, torch.zeros_like(r), delta=delta,
                                                  reduction="sum") / (n_samples * med**2)
            if lm_t is not None and lm_use.any():
                Gl = G[torch.tensor(lm_ids[lm_use], dtype=torch.long)]
                proj = Gl @ K.T
                uvp = proj[:, :2] / proj[:, 2:3]
                loss = loss + config.w_landmarks * ((uvp - lm_t[lm_use]) ** 2).sum(-1).mean()
            loss = loss + config.prior_id * (a_id**2).sum() + config.prior_exp * (a_exp**2).sum()
            loss = loss + config.prior_albedo * (a_alb**2).sum()
            loss.backward()
            return loss

        loss = float(opt.step(closure).detach())
        if exp_lower is not None:
            with torch.no_grad():
                a_exp.copy_(torch.maximum(a_exp, exp_lower))
        if not np.isfinite(loss):
            raise FitError("the photometric refinement diverged")
        history.append({"iteration": f"photometric-{outer}", "loss": loss,
                        "samples": int(ok.sum()), "vertices": int(ids.size)})
    with torch.no_grad():
        Gc = geometry_cam().numpy()
    coef = Coefficients(
        np.concatenate([a_id.detach().numpy(), np.zeros(model.n_id - ki)]),
        np.concatenate([a_exp.detach().numpy(), np.zeros(model.n_exp - ke)]),
        np.concatenate([a_alb.detach().numpy(), np.zeros(model.n_albedo - ka)]))
    R = pose_rotation_torch(angles.detach()[None])[0].numpy()
    rmse = fit.landmark_rmse_px
    if lm is not None and lm_use.any():
        uvl = capture.camera.project(Gc[lm_ids[lm_use]])
        rmse = float(np.sqrt(np.mean((uvl - lm[lm_use]) ** 2)))
    timings = {**fit.timings, "photometric": time.perf_counter() - t0}
    return replace(fit, coefficients=coef, angles=pose_to_euler(R),
                   translation=trans.detach().numpy().copy(), landmark_rmse_px=rmse,
                   history=history, timings=timings)
