"""Coarse 3DMM proxy from 2D landmarks (paper section 3.2, first step).

The fit alternates
1. the rigid pose by PnP (OpenCV ``solvePnP``: EPnP to start, then Levenberg-Marquardt
   from the previous pose) on the current shape's landmark vertices, and
2. identity and expression coefficients by a regularised *linear* least-squares solve:
   with the pose fixed, ``u = fx X/Z + cx`` becomes linear in the coefficients after
   multiplying by Z (``fx X - (u - cx) Z = 0``); rows are divided by the current depth so
   residuals are in pixels, and a Tikhonov term ``lambda |alpha|^2`` (coefficients are in
   standard deviations) keeps the shape plausible.

Jaw-line landmarks (iBUG 0-16) of a detector lie on the face's silhouette, not on fixed
vertices: with ``contour=True`` each of them slides, at every iteration, to the outermost
vertex (in the image, along the face's horizontal axis) of a band of model vertices at its
height. Synthetic sessions annotate fixed vertices, so there ``contour=False`` is right.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from faceps.core.camera import Camera
from faceps.core.errors import ConfigError, FitError, check_shape
from faceps.core.rotation import pose_rotation, pose_to_euler
from faceps.model.morphable import Coefficients, MorphableModel

log = logging.getLogger(__name__)

__all__ = ["ProxyFitConfig", "ProxyFit", "fit_landmarks", "CONTOUR"]

#: iBUG indices of the jaw line (silhouette landmarks for a detector)
CONTOUR = tuple(range(17))


@dataclass(frozen=True)
class ProxyFitConfig:
    """Options of the landmark fit.

    Attributes:
        n_id: leading identity components to fit (None: all).
        n_exp: leading expression components to fit (None: all).
        reg_id, reg_exp: Tikhonov weights on the coefficients (std units) relative to the
            squared pixel residual of one landmark coordinate.
        iterations: maximum pose/shape alternations.
        tol_px: stop when the landmark RMSE changes by less than this.
        contour: let the jaw-line landmarks slide along the silhouette.
        contour_band_mm: half-height of the vertex band a jaw landmark may slide in.
    """

    n_id: int | None = 40
    n_exp: int | None = None
    reg_id: float = 4.0
    reg_exp: float = 4.0
    iterations: int = 10
    tol_px: float = 0.01
    contour: bool = False
    contour_band_mm: float = 3.0

    def __post_init__(self) -> None:
        if self.reg_id < 0 or self.reg_exp < 0:
            raise ConfigError("regularisation weights must be >= 0")
        if self.iterations < 1:
            raise ConfigError("iterations must be >= 1")


@dataclass
class ProxyFit:
    """A fitted proxy.

    Attributes:
        coefficients: identity, expression (and albedo, zeros here) in std units.
        angles: (3,) pitch, yaw, roll in radians; translation: (3,) mm. The pose maps the
            model frame to the camera frame: ``X_cam = pose_rotation(angles) X + t``.
        model_name: the model the coefficients belong to.
        landmark_rmse_px: final RMS landmark reprojection error (pixels, over the used
            landmarks and both coordinates).
        history: per iteration: ``{"stage", "rmse_px"}``.
        converged: the RMSE stopped changing within ``iterations``.
        vertex_ids: (68,) the model vertex each landmark was matched to in the end (-1:
            unused), after contour sliding.
        timings: seconds per stage.
    """

    coefficients: Coefficients
    angles: np.ndarray
    translation: np.ndarray
    model_name: str
    landmark_rmse_px: float
    history: list[dict] = field(default_factory=list)
    converged: bool = False
    vertex_ids: np.ndarray | None = None
    timings: dict = field(default_factory=dict)

    @property
    def rotation(self) -> np.ndarray:
        return pose_rotation(self.angles)

    def geometry(self, model: MorphableModel, frame: str = "camera") -> np.ndarray:
        """(V, 3) proxy vertices in the camera frame (or ``frame="model"``)."""
        G = model.geometry(self.coefficients.id, self.coefficients.exp)
        return G if frame == "model" else G @ self.rotation.T + self.translation

    def to_dict(self) -> dict:
        """The ``proxy.json`` content (contract 2)."""
        return {"model": self.model_name, "coefficients": self.coefficients.to_dict(),
                "pose": {"angles_rad": np.asarray(self.angles).tolist(),
                         "angles_order": "pitch, yaw, roll",
                         "translation_mm": np.asarray(self.translation).tolist()},
                "landmark_rmse_px": self.landmark_rmse_px, "converged": self.converged,
                "history": self.history, "timings": self.timings}


def _solve_pnp(obj: np.ndarray, img: np.ndarray, camera: Camera,
               guess: tuple[np.ndarray, np.ndarray] | None) -> tuple[np.ndarray, np.ndarray]:
    import cv2

    K = camera.K.astype(np.float64)
    obj = np.ascontiguousarray(obj, np.float64)
    img = np.ascontiguousarray(img, np.float64)
    if guess is None:
        ok, rvec, tvec = cv2.solvePnP(obj, img, K, None, flags=cv2.SOLVEPNP_EPNP)
        if not ok:
            raise FitError("PnP failed on the landmarks")
        # the face must be in front of the camera and look at it
        R0, _ = cv2.Rodrigues(rvec)
        if tvec[2, 0] <= 0:
            raise FitError("PnP put the face behind the camera")
        if (R0 @ np.array([0.0, 0.0, 1.0]))[2] > 0:
            # mirrored solution facing away: start from a frontal face at that distance
            rvec, _ = cv2.Rodrigues(pose_rotation(np.zeros(3)))
    else:
        rvec, _ = cv2.Rodrigues(guess[0])
        tvec = guess[1].reshape(3, 1).astype(np.float64)
    ok, rvec, tvec = cv2.solvePnP(obj, img, K, None, rvec, tvec, useExtrinsicGuess=True,
                                  flags=cv2.SOLVEPNP_ITERATIVE)
    if not ok or not np.all(np.isfinite(tvec)):
        raise FitError("PnP refinement failed on the landmarks")
    R, _ = cv2.Rodrigues(rvec)
    return R, tvec.reshape(3)


def _contour_bands(model: MorphableModel, band_mm: float) -> dict[int, np.ndarray]:
    """Candidate vertices for each jaw landmark: face-region vertices on the landmark's side
    at its height (mean shape)."""
    G = model.mean.astype(np.float64)
    cand = np.nonzero(model.region)[0] if model.face_region is not None else np.arange(len(G))
    bands = {}
    for k in CONTOUR:
        vid = model.landmarks68[k]
        if vid < 0:
            continue
        p = G[vid]
        side = np.sign(p[0]) if abs(p[0]) > 5 else 0.0
        sel = cand[np.abs(G[cand, 1] - p[1]) < band_mm]
        if side != 0:
            sel = sel[np.sign(G[sel, 0]) == side]
        bands[k] = sel if sel.size else np.array([vid])
    return bands


def fit_landmarks(model: MorphableModel, landmarks: np.ndarray, camera: Camera,
                  config: ProxyFitConfig | None = None) -> ProxyFit:
    """Fit identity, expression and pose of ``model`` to 2D landmarks.

    Args:
        model: the morphable model (needs landmark vertices).
        landmarks: (68, 2) iBUG points in pixels (NaN rows are ignored).
        camera: the capture camera (undistorted).
        config: fit options.

    Returns:
        :class:`ProxyFit`.

    Raises:
        FitError: fewer than 6 usable landmarks, or PnP fails.
    """
    config = config or ProxyFitConfig()
    t_start = time.perf_counter()
    lm = np.asarray(landmarks, np.float64)
    check_shape(lm, "landmarks", (68, 2))
    use = np.all(np.isfinite(lm), axis=1) & (model.landmarks68 >= 0)
    if use.sum() < 6:
        raise FitError(f"only {int(use.sum())} usable landmarks (need at least 6)")
    idx = np.nonzero(use)[0]
    vid = model.landmarks68.copy()
    ki = model.n_id if config.n_id is None else min(config.n_id, model.n_id)
    ke = model.n_exp if config.n_exp is None else min(config.n_exp, model.n_exp)
    Bid = (model.id_basis[:, :, :ki] * model.id_std[:ki]).astype(np.float64)   # (V, 3, ki)
    Bexp = (model.exp_basis[:, :, :ke] * model.exp_std[:ke]).astype(np.float64)
    mean = model.mean.astype(np.float64)
    lower = (np.full(ke, -np.inf) if model.exp_lower is None
             else model.exp_lower[:ke].astype(np.float64))
    alpha = np.zeros(ki + ke)
    bands = _contour_bands(model, config.contour_band_mm) if config.contour else {}
    fx, fy = camera.K[0, 0], camera.K[1, 1]
    cx, cy, skew = camera.K[0, 2], camera.K[1, 2], camera.K[0, 1]
    history: list[dict] = []
    pose = None
    rmse_prev = np.inf
    converged = False

    def shape_at(ids: np.ndarray) -> np.ndarray:
        return (mean[ids] + np.einsum("nck,k->nc", Bid[ids], alpha[:ki])
                + np.einsum("nck,k->nc", Bexp[ids], alpha[ki:]))

    for it in range(config.iterations):
        # -- contour sliding (needs a pose)
        if bands and pose is not None:
            R, t = pose
            x_axis = R @ np.array([1.0, 0.0, 0.0])
            for k, cand in bands.items():
                if not use[k]:
                    continue
                P = shape_at(cand) @ R.T + t
                uv = camera.project(P)
                centre = camera.project(t[None])[0]
                # outermost along the face's image-horizontal direction, on the landmark's
                # side of the face
                d = x_axis[:2] / max(np.linalg.norm(x_axis[:2]), 1e-9)
                side = np.sign(mean[model.landmarks68[k], 0]) or 1.0
                score = side * ((uv - centre) @ d)
                vid[k] = cand[int(np.nanargmax(score))]
        ids = vid[idx]
        # -- pose
        obj = shape_at(ids)
        R, t = _solve_pnp(obj, lm[idx], camera, pose)
        pose = (R, t)
        # -- shape: linear in alpha with the pose fixed
        Xm = shape_at(ids) @ R.T + t                                           # (n, 3)
        z = np.maximum(Xm[:, 2], 1e-6)
        Bc = np.concatenate([Bid[ids], Bexp[ids]], axis=2)                     # (n, 3, k)
        Bcam = np.einsum("rc,nck->nrk", R, Bc)                                 # (n, 3, k)
        base = mean[ids] @ R.T + t
        u, v = lm[idx, 0], lm[idx, 1]
        # fx X + skew Y - (u - cx) Z = 0 and fy Y - (v - cy) Z = 0, divided by Z
        Au = (fx * Bcam[:, 0] + skew * Bcam[:, 1] - (u - cx)[:, None] * Bcam[:, 2]) / z[:, None]
        bu = (fx * base[:, 0] + skew * base[:, 1] - (u - cx) * base[:, 2]) / z
        Av = (fy * Bcam[:, 1] - (v - cy)[:, None] * Bcam[:, 2]) / z[:, None]
        bv = (fy * base[:, 1] - (v - cy) * base[:, 2]) / z
        A = np.concatenate([Au, Av])
        b = -np.concatenate([bu, bv])
        reg = np.concatenate([np.full(ki, config.reg_id), np.full(ke, config.reg_exp)])
        alpha = np.linalg.solve(A.T @ A + np.diag(reg), A.T @ b)
        # one-sided expression components: clamp and re-solve the others
        low = alpha[ki:] < lower
        if low.any():
            fixed = np.concatenate([np.zeros(ki, bool), low])
            alpha[fixed] = np.concatenate([np.zeros(ki), lower])[fixed]
            free = ~fixed
            Af = A[:, free]
            alpha[free] = np.linalg.solve(Af.T @ Af + np.diag(reg[free]),
                                          Af.T @ (b - A[:, fixed] @ alpha[fixed]))
        # -- residual after both steps
        uv = camera.project(shape_at(ids) @ R.T + t)
        rmse = float(np.sqrt(np.mean((uv - lm[idx]) ** 2)))
        history.append({"iteration": it, "rmse_px": rmse})
        if not np.isfinite(rmse):
            raise FitError("the landmark fit diverged (non-finite residual)")
        if abs(rmse_prev - rmse) < config.tol_px:
            converged = True
            break
        rmse_prev = rmse
    # final pose for the final shape
    R, t = _solve_pnp(shape_at(vid[idx]), lm[idx], camera, pose)
    uv = camera.project(shape_at(vid[idx]) @ R.T + t)
    rmse = float(np.sqrt(np.mean((uv - lm[idx]) ** 2)))
    coef = Coefficients(np.concatenate([alpha[:ki], np.zeros(model.n_id - ki)]),
                        np.concatenate([alpha[ki:], np.zeros(model.n_exp - ke)]),
                        np.zeros(model.n_albedo))
    out_ids = np.where(use, vid, -1)
    log.info("landmark fit: %.2f px RMSE after %d iterations", rmse, len(history))
    return ProxyFit(coef, pose_to_euler(R), t, model.name, rmse, history, converged, out_ids,
                    {"landmarks": time.perf_counter() - t_start})
