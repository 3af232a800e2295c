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
with scipy's L-BFGS-B on gradients from torch's autograd (float64).
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
from faceps.core.threads import torch_threads
from faceps.model.morphable import Coefficients, MorphableModel
from faceps.optimize.proxy import ProxyFit

log = logging.getLogger(__name__)

#: unit of the light-position parameters of the joint refinement (mm)
_LIGHT_STEP_MM = 50.0
#: unit of the pose-angle parameters (radians). L-BFGS starts from a unit-scaled step and
#: builds its curvature model from there: in radians, a unit of an angle moves the face's
#: vertices ~100x further than a standard deviation of a shape coefficient moves them, so
#: the first iterations were spent on the pose scale. In units of 0.01 rad the proxy normal
#: error after 3 x 30 iterations fell from 6.09 to 5.82 deg (mean of six 800x600 sessions,
#: the other options as they were then); with the current defaults it is 4.87 deg, as good
#: as 3 x 100 iterations without the scaling (4.93) at a third of the time.
_ANGLE_STEP_RAD = 0.01

__all__ = ["PhotometricConfig", "refine_joint", "refine_photometric"]


@dataclass(frozen=True)
class PhotometricConfig:
    """Options of the photometric refinement.

    Attributes:
        n_id, n_exp, n_albedo: leading components refined (None: all).
        outer: visibility/shadow updates; inner: L-BFGS iterations per update.
        w_landmarks: weight of the landmark term (per squared pixel, relative to the
            photometric term normalised per sample).
        prior_id, prior_exp, prior_albedo: weights of |alpha|^2 (std units). The shape
            priors were 0.02 with the leading 40 identity components: every component with
            0.005 lowered the proxy normal error from 5.82 to 4.87 deg (six 800x600
            sessions; 0.002: 4.97) and, in `faceps reconstruct`, the normal error from
            3.76 / 4.86 / 4.93 to 3.33 / 3.68 / 4.42 deg (bench/RESULTS.md).
        huber: Huber threshold, as a fraction of the median observed intensity.
        dark: samples darker than this fraction of the median intensity are shadow.
        max_vertices: visible face vertices used (evenly subsampled).
        min_cos: vertices seen at a grazing angle are not sampled.
        huber_relative: Huber threshold of the joint refinement's relative residuals.
        specular_deg: the joint refinement leaves out observations whose half-vector lies
            within this angle of the proxy normal (the sheen's peak).
        threads: torch intra-op threads for the fit (None: torch's setting). The tensors
            are small; one thread is as fast on an idle machine and several times faster
            on a busy one (see :func:`faceps.core.threads.torch_threads`).
    """

    n_id: int | None = None
    n_exp: int | None = None
    n_albedo: int | None = None
    outer: int = 3
    inner: int = 30
    w_landmarks: float = 0.05
    prior_id: float = 0.005
    prior_exp: float = 0.005
    prior_albedo: float = 0.02
    huber: float = 0.1
    dark: float = 0.05
    max_vertices: int = 6000
    min_cos: float = 0.25
    huber_relative: float = 0.05
    albedo: str = "model"
    specular_deg: float = 20.0
    threads: int | None = 1

    def __post_init__(self) -> None:
        if self.outer < 1 or self.inner < 1:
            raise ConfigError("outer and inner iterations must be >= 1")
        if self.threads is not None and int(self.threads) < 1:
            raise ConfigError(f"threads must be >= 1 or None; got {self.threads!r}")


def refine_photometric(model: MorphableModel, capture: Capture, fit: ProxyFit,
                       lights: PointLights, config: PhotometricConfig | None = None,
                       landmarks: np.ndarray | None = None) -> ProxyFit:
    """Refine a landmark fit with all images of the capture, the lights fixed.

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
    return _refine(model, capture, fit, lights, config or PhotometricConfig(), landmarks,
                   refine_lights=False)[0]


def refine_joint(model: MorphableModel, capture: Capture, fit: ProxyFit,
                 lights: PointLights, config: PhotometricConfig | None = None,
                 landmarks: np.ndarray | None = None) -> tuple[ProxyFit, PointLights]:
    """Refine the proxy and the light positions and intensities together.

    The self-calibration alternative of section 3.2: starting from calibrated lights
    (:func:`faceps.capture.calibrate_from_proxy`) the shape, pose, light positions and
    intensities are optimised jointly. The albedo is unknown per vertex and eliminated in
    closed form (variable projection, as in the calibration), so only the ratios between
    the images constrain shape and lights; residuals are relative to each vertex's mean
    intensity, samples near the specular peak (``config.specular_deg``) are left out.

    Args: as :func:`refine_photometric`; ``lights`` are the initial lights.

    Returns:
        (the refined proxy, the refined isotropic lights). The intensities keep the
        initial lights' per-channel sums (the gauge the images cannot fix).
    """
    return _refine(model, capture, fit, lights, config or PhotometricConfig(), landmarks,
                   refine_lights=True)


def _refine(model: MorphableModel, capture: Capture, fit: ProxyFit, lights: PointLights,
            config: PhotometricConfig, landmarks: np.ndarray | None, refine_lights: bool
            ) -> tuple[ProxyFit, PointLights]:
    with torch_threads(config.threads):
        return _refine_body(model, capture, fit, lights, config, landmarks, refine_lights)


def _refine_body(model: MorphableModel, capture: Capture, fit: ProxyFit, lights: PointLights,
                 config: PhotometricConfig, landmarks: np.ndarray | None, refine_lights: bool
                 ) -> tuple[ProxyFit, PointLights]:
    """Shared body of :func:`refine_photometric` and :func:`refine_joint`.

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

    t0 = time.perf_counter()
    if config.albedo not in ("model", "vertex"):
        raise ConfigError(f"albedo must be 'model' or 'vertex'; got {config.albedo!r}")
    vertex_albedo = refine_lights or config.albedo == "vertex"
    if len(lights) != capture.n_images:
        raise FitError(f"{capture.root}: {capture.n_images} images but {len(lights)} lights")
    lm = capture.landmarks if landmarks is None else np.asarray(landmarks, np.float64)
    ki = model.n_id if config.n_id is None else min(config.n_id, model.n_id)
    ke = model.n_exp if config.n_exp is None else min(config.n_exp, model.n_exp)
    ka = model.n_albedo if config.n_albedo is None else min(config.n_albedo, model.n_albedo)
    dt = torch.float64
    T = model.torch_tensors(dtype=dt)
    K = torch.tensor(capture.camera.K, dtype=dt)
    # light positions in units of _LIGHT_STEP_MM from the start: L-BFGS needs parameters
    # of comparable sensitivity, and a millimetre moves the residuals far less than a
    # standard deviation of a shape coefficient
    P0 = torch.tensor(lights.positions, dtype=dt)
    dP = torch.zeros_like(P0, requires_grad=refine_lights)
    log_B = torch.tensor(np.log(np.maximum(lights.intensities, 1e-30)), dtype=dt,
                         requires_grad=refine_lights)
    log_B0_sum = torch.logsumexp(log_B.detach(), dim=0)
    a_id = torch.tensor(fit.coefficients.id[:ki], dtype=dt, requires_grad=True)
    a_exp = torch.tensor(fit.coefficients.exp[:ke], dtype=dt, requires_grad=True)
    a_alb = torch.zeros(ka, dtype=dt, requires_grad=True)
    # pose angles in units of _ANGLE_STEP_RAD (see there)
    angles_u = torch.tensor(np.asarray(fit.angles, np.float64) / _ANGLE_STEP_RAD, dtype=dt,
                            requires_grad=True)
    trans = torch.tensor(fit.translation, dtype=dt, requires_grad=True)
    log_gain = torch.zeros(3, dtype=dt, requires_grad=True)
    exp_lower = None if model.exp_lower is None else np.asarray(model.exp_lower[:ke],
                                                                  np.float64)
    lm_ids = model.landmarks68
    lm_use = (lm_ids >= 0) & np.all(np.isfinite(lm), axis=1) if lm is not None else None
    lm_t = None if lm is None else torch.tensor(np.nan_to_num(lm), dtype=dt)

    def rotation():
        return pose_rotation_torch((_ANGLE_STEP_RAD * angles_u)[None])[0]

    def geometry_cam():
        return model.geometry_torch(a_id[None], a_exp[None])[0] @ rotation().T + trans

    history = list(fit.history)
    # the intensity scale of the loss: the median positive value of the images, read on
    # every 4th pixel of every 4th row (the whole 1600x1200 stack took 0.2 s, a quarter of
    # the refinement; the scale only sets the Huber threshold and the normalisation)
    images = capture.images[:, ::4, ::4]
    med = float(np.median(images[images > 0])) if np.any(images > 0) else 1.0
    for outer in range(config.outer):
        with torch.no_grad():
            Gc = geometry_cam().numpy()
        P_now = (P0 + _LIGHT_STEP_MM * dP).detach().numpy()
        ids, obs, ok = _vertex_samples(model, capture, Gc, P_now, config, med,
                                       specular_deg=config.specular_deg if vertex_albedo
                                       else 0.0)
        obs_t = torch.tensor(np.nan_to_num(obs), dtype=dt)
        w_t = torch.tensor(ok.astype(np.float64))
        n_samples = float(ok.sum())
        delta = config.huber * med
        # relative residuals of the joint problem: each vertex's mean used intensity
        cnt = ok.sum(0)
        scale = np.where(cnt > 0, (obs.mean(-1) * ok).sum(0) / np.maximum(cnt, 1), 1.0)
        inv_scale_t = torch.tensor(1.0 / np.maximum(scale, config.dark * med), dtype=dt)
        if refine_lights:
            params = [a_id, a_exp, angles_u, trans, dP, log_B]
        elif vertex_albedo:
            params = [a_id, a_exp, angles_u, trans]
        else:
            params = [a_id, a_exp, a_alb, angles_u, trans, log_gain]
        sub = _Submesh(model, T, ids, lm_ids[lm_use] if lm_t is not None else None, ki, ke,
                       ka if not vertex_albedo else 0)

        def objective(sub=sub, obs_t=obs_t, w_t=w_t, n_samples=n_samples, delta=delta,
                      inv_scale_t=inv_scale_t):
            G = sub.geometry(a_id, a_exp) @ rotation().T + trans
            N = sub.sample_normals(G)
            V = G[sub.ids]
            d = (P0 + _LIGHT_STEP_MM * dP)[:, None, :] - V[None]
            dist = d.norm(dim=-1)
            g = ((N[None] * d).sum(-1)).clamp_min(0.0) / dist**3                  # (L, n)
            shading = torch.exp(log_B)[:, None, :] * g[..., None]                # (L, n, 3)
            if vertex_albedo:
                # albedo eliminated per vertex and channel (variable projection)
                w3 = w_t[..., None]
                alb = ((w3 * obs_t * shading).sum(0)
                       / ((w3 * shading**2).sum(0) + 1e-30))                     # (n, 3)
                r = (alb[None] * shading - obs_t) * w3 * inv_scale_t[None, :, None]
                loss = torch.nn.functional.huber_loss(
                    r, torch.zeros_like(r), delta=config.huber_relative,
                    reduction="sum") / (n_samples * config.huber_relative**2)
                # the gauge the images cannot fix: per-channel sums of the intensities
                loss = loss + ((torch.logsumexp(log_B, dim=0) - log_B0_sum) ** 2).sum()
            else:
                alb = sub.albedo(a_alb) * torch.exp(log_gain)
                r = (alb[None] * shading - obs_t) * w_t[..., None]
                loss = torch.nn.functional.huber_loss(r, torch.zeros_like(r), delta=delta,
                                                      reduction="sum") / (n_samples * med**2)
            if lm_t is not None and lm_use.any():
                Gl = G[sub.landmarks]
                proj = Gl @ K.T
                uvp = proj[:, :2] / proj[:, 2:3]
                loss = loss + config.w_landmarks * ((uvp - lm_t[lm_use]) ** 2).sum(-1).mean()
            loss = loss + config.prior_id * (a_id**2).sum() + config.prior_exp * (a_exp**2).sum()
            return loss + config.prior_albedo * (a_alb**2).sum()

        lower = {id(a_exp): exp_lower} if exp_lower is not None else {}
        loss = _minimize_lbfgs(objective, params, config.inner, lower)
        if not np.isfinite(loss):
            raise FitError(f"{capture.root}: the photometric refinement diverged")
        history.append({"iteration": f"{'joint' if refine_lights else 'photometric'}-{outer}",
                        "loss": loss,
                        "samples": int(ok.sum()), "vertices": int(ids.size)})
    with torch.no_grad():
        Gc = geometry_cam().numpy()
    coef = Coefficients(
        np.concatenate([a_id.detach().numpy(), np.zeros(model.n_id - ki)]),
        np.concatenate([a_exp.detach().numpy(), np.zeros(model.n_exp - ke)]),
        np.concatenate([a_alb.detach().numpy(), np.zeros(model.n_albedo - ka)]))
    with torch.no_grad():
        R = rotation().numpy()
    rmse = fit.landmark_rmse_px
    if lm is not None and lm_use.any():
        uvl = capture.camera.project(Gc[lm_ids[lm_use]])
        rmse = float(np.sqrt(np.mean((uvl - lm[lm_use]) ** 2)))
    stage = "joint" if refine_lights else "photometric"
    timings = {**fit.timings, stage: time.perf_counter() - t0}
    new_fit = replace(fit, coefficients=coef, angles=pose_to_euler(R),
                      translation=trans.detach().numpy().copy(), landmark_rmse_px=rmse,
                      history=history, timings=timings)
    new_lights = lights
    if refine_lights:
        beta = torch.exp(log_B).detach().numpy()
        beta = beta * (lights.intensities.sum(0) / beta.sum(0))[None]   # the exact gauge
        new_lights = PointLights((P0 + _LIGHT_STEP_MM * dP).detach().numpy(), beta,
                                 names=lights.names)
    return new_fit, new_lights


def _minimize_lbfgs(objective, params: list, iterations: int,
                    lower: dict[int, np.ndarray]) -> float:
    """Minimise ``objective()`` (a scalar torch tensor of ``params``) in place with
    scipy's L-BFGS-B, gradients by autograd.

    scipy rather than ``torch.optim.LBFGS``: its bounds keep the one-sided expression
    coefficients (``lower``: ``id(param)`` -> lower bounds) feasible at every step
    instead of clipping after the fact, and any ``torch.optim`` optimiser imports
    ``torch._dynamo`` on first use, about 0.9 s of every ``faceps fit`` or ``reconstruct``
    run (measured with ``python -X importtime``) for a problem of ~100 parameters.

    Returns:
        the final loss.
    """
    import torch
    from scipy.optimize import minimize

    sizes = [p.numel() for p in params]
    cuts = np.cumsum(sizes)[:-1]

    def assign(x: np.ndarray) -> None:
        with torch.no_grad():
            for p, part in zip(params, np.split(x, cuts)):
                p.copy_(torch.from_numpy(part).reshape(p.shape))

    def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
        assign(x)
        for p in params:
            p.grad = None
        loss = objective()
        loss.backward()
        grad = np.concatenate([(p.grad if p.grad is not None else torch.zeros_like(p))
                               .detach().numpy().ravel() for p in params])
        value = float(loss.detach())
        if not np.isfinite(value):
            # L-BFGS-B's line search backs off from a non-finite trial step
            return np.inf, np.zeros_like(grad)
        return value, grad

    x0 = np.concatenate([p.detach().numpy().ravel() for p in params]).astype(np.float64)
    bounds = None
    if lower:
        lo = np.concatenate([np.broadcast_to(lower.get(id(p), -np.inf), (p.numel(),))
                             for p in params])
        bounds = [(None if not np.isfinite(v) else float(v), None) for v in lo]
        x0 = np.maximum(x0, lo)
    # the limits of the torch L-BFGS used before: ``iterations`` iterations, at most 1.25 x
    # as many evaluations, a history of 100 pairs, a gradient tolerance of 1e-7
    res = minimize(fun, x0, jac=True, method="L-BFGS-B", bounds=bounds,
                   options={"maxiter": int(iterations), "maxfun": int(iterations * 1.25),
                            "maxcor": 100, "gtol": 1e-7, "ftol": 1e-12})
    assign(res.x)
    return float(res.fun)


class _Submesh:
    """The part of the model one outer iteration of the refinement evaluates: the sampled
    vertices, every triangle incident to one of them (their vertex normals are then exactly
    those of the whole mesh) and the landmark vertices. The closure runs a few hundred
    times per refinement; on the built-in model this is about 40 % of the vertices and
    triangles, and the forward and backward passes shrink with them.

    Args:
        model: the morphable model; T: its ``torch_tensors`` (dtype of the refinement).
        ids: (n,) sampled vertex ids; landmarks: (k,) landmark vertex ids or None.
        ki, ke, ka: identity, expression and albedo components refined (ka = 0: the model
            albedo is not evaluated).
    """

    def __init__(self, model: MorphableModel, T: dict, ids: np.ndarray,
                 landmarks: np.ndarray | None, ki: int, ke: int, ka: int) -> None:
        import torch

        tri = np.asarray(model.triangles)
        sampled = np.zeros(model.n_vertices, bool)
        sampled[ids] = True
        tris = tri[sampled[tri].any(1)]
        keep = [tris.reshape(-1), np.asarray(ids)]
        if landmarks is not None:
            keep.append(np.asarray(landmarks))
        verts = np.unique(np.concatenate(keep))
        local = -np.ones(model.n_vertices, np.int64)
        local[verts] = np.arange(verts.size)
        rows = torch.as_tensor((3 * verts[:, None] + np.arange(3)).reshape(-1))
        vt = torch.as_tensor(verts)
        self.mean = T["mean"][vt]
        self.id_basis = T["id"][rows, :ki]
        self.exp_basis = T["exp"][rows, :ke]
        self.tri = torch.as_tensor(local[tris])
        self.ids = torch.as_tensor(local[ids])
        self.landmarks = None if landmarks is None else torch.as_tensor(local[landmarks])
        self.n_albedo = ka
        if ka and model.has_albedo:
            arows = torch.as_tensor((3 * np.asarray(ids)[:, None] + np.arange(3)).reshape(-1))
            self.albedo_mean = T["albedo_mean"][torch.as_tensor(ids)]
            self.albedo_basis = T["albedo"][arows, :ka]
        self._model, self._sample_t = model, torch.as_tensor(np.asarray(ids, np.int64))

    def geometry(self, a_id, a_exp):
        """(n_sub, 3) model-frame positions of the submesh's vertices."""
        off = self.id_basis @ a_id + self.exp_basis @ a_exp
        return self.mean + off.reshape(-1, 3)

    def sample_normals(self, G):
        """(n, 3) unit vertex normals (area-weighted) of the sampled vertices."""
        import torch

        tri = self.tri
        v0, v1, v2 = G[tri[:, 0]], G[tri[:, 1]], G[tri[:, 2]]
        fn = torch.cross(v1 - v0, v2 - v0, dim=-1)
        acc = torch.zeros_like(G)
        for k in range(3):
            acc = acc.index_add(0, tri[:, k], fn)
        return torch.nn.functional.normalize(acc[self.ids], dim=-1)

    def albedo(self, a_alb):
        """(n, 3) model albedo of the sampled vertices (not clipped)."""
        if not (self.n_albedo and self._model.has_albedo):
            return self._model.albedo_torch(a_alb[None])[0][self._sample_t]
        return self.albedo_mean + (self.albedo_basis @ a_alb).reshape(-1, 3)


def _vertex_samples(model: MorphableModel, capture: Capture, Gc: np.ndarray,
                    light_positions: np.ndarray, config: PhotometricConfig, med: float,
                    specular_deg: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Visible face vertices of the current proxy and their image samples.

    Args:
        Gc: (V, 3) proxy vertices in the camera frame (mm).
        light_positions: (L, 3) current light positions (for the cast-shadow rays).
        med: median observed intensity (the dark threshold is relative to it).
        specular_deg: leave out observations whose half-vector lies within this angle of
            the proxy normal (0: keep all).

    Returns:
        ids (n,) vertex ids; obs (L, n, 3) bilinear samples of the linear images;
        ok (L, n) bool usable observations (unsaturated, lit, not in a cast shadow).
    """
    images = capture.images
    Nc = model.vertex_normals(Gc)
    caster = RayCaster(Gc, model.triangles)
    vis = visible_vertices(Gc, model.triangles, caster)
    view = Gc / np.linalg.norm(Gc, axis=1, keepdims=True)
    vis &= model.region & (-np.einsum("ij,ij->i", Nc, view) > config.min_cos)
    ids = np.nonzero(vis)[0]
    if ids.size < 50:
        raise FitError(f"{capture.root}: only {ids.size} visible proxy vertices to sample")
    if ids.size > config.max_vertices:
        ids = ids[np.linspace(0, ids.size - 1, config.max_vertices).astype(int)]
    uv = capture.camera.project(Gc[ids])
    obs = np.stack([sample_bilinear(images[j], uv) for j in range(capture.n_images)])
    sat = np.stack([sample_bilinear(capture.saturated[j][..., None].astype(float), uv)[:, 0]
                    for j in range(capture.n_images)])
    ok = np.all(np.isfinite(obs), axis=-1) & (np.nan_to_num(sat, nan=1.0) < 0.01)
    ok &= obs.mean(-1) > config.dark * med
    o = Gc[ids] + 0.5 * Nc[ids]
    for j in range(capture.n_images):
        d = light_positions[j] - o
        dist = np.linalg.norm(d, axis=1)
        ok[j] &= ~caster.occluded(o, d / dist[:, None], dist - 1.0)
        if specular_deg > 0:
            half = d / dist[:, None] - view[ids]
            half /= np.linalg.norm(half, axis=1, keepdims=True)
            ok[j] &= np.einsum("ij,ij->i", half, Nc[ids]) < np.cos(np.radians(specular_deg))
    if ok.sum() < 100:
        raise FitError(f"{capture.root}: too few lit, unsaturated samples for the photometric "
                       "refinement (images too dark or saturated?)")
    return ids, obs, ok
