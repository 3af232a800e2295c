"""How far the proxy is from the camera, from the photometric data (near lights).

A landmark fit cannot tell a small face near the camera from a larger one farther away:
perspective separates them only weakly at capture distances, and the morphable model's
prior pulls the face toward the mean size. The fitted proxy of a synthetic session is
typically 2-16 mm too near at 500-630 mm (bench/RESULTS.md). Near point lights do see the
difference: the direction and distance of every light change along the camera rays, and
the normals and albedo of eq. 6 then cannot explain the images as well.

:func:`estimate_distance_scale` searches one factor ``s`` that scales the proxy about the
camera centre (every point ``V`` becomes ``s V``: the projection is unchanged, the normals
are unchanged, the distance to the camera changes by ``s``). For each candidate it
minimises eq. 6 over normals and albedo on a coarse copy of the images and compares the
energies:

- the images, points, proxy normals and masks are averaged over 2x2 blocks (as the
  coarse-to-fine levels of :func:`faceps.optimize.normal_albedo.update_normals_albedo` do)
  until at most ``max_pixels`` elements remain (4 halvings for a 300k-480k-pixel face);
- eq. 6 is solved at ``s = 1``; each other candidate starts from that albedo and runs
  ``warm_iterations`` outer iterations (the energy is compared after the same work);
- the candidates step by ``step`` from 1 in the direction of lower energy (at most
  ``max_steps`` beyond the first pair), and a parabola through the best one and its two
  neighbours gives ``s``.

Measured on the fitted proxies of six 1600x1200 sessions (true factors 1.0038, 1.0070,
1.0288, 1.0280, 1.0062, 1.0166): 1.0048, 1.0069, 1.0262, 1.0299, 1.0050, 1.0165, in
0.7-1.1 s each (1200-2100 coarse pixels). The energy of eq. 6 with the proxy prior is the
criterion, so the proxy's shape errors enter too; the estimate is clamped to the range
searched. With calibrated lights it sees nothing: they were fitted to the proxy where it
is.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from faceps.core.errors import ConfigError
from faceps.core.lights import PointLights
from faceps.optimize.normal_albedo import (
    NormalAlbedoConfig,
    _check_config,
    _check_pixel_inputs,
    _coarser,
    _element_adjacency,
    _pixel_elements,
    _solve,
    light_vectors,
)

__all__ = ["DistanceConfig", "DistanceScale", "estimate_distance_scale"]


@dataclass(frozen=True)
class DistanceConfig:
    """Options of :func:`estimate_distance_scale`.

    Attributes:
        max_pixels: coarsen (2x2 blocks) until the solved region has at most this many
            elements.
        step: spacing of the candidate factors (0.015: about 9 mm at 600 mm).
        max_steps: how many further steps beyond ``1 +- step`` the search may walk
            toward lower energy (the factor is clamped to ``1 +- (max_steps + 1) step``).
        warm_iterations: outer iterations of eq. 6 per candidate, started from the
            albedo solved at ``s = 1``.
    """

    max_pixels: int = 4000
    step: float = 0.015
    max_steps: int = 4
    warm_iterations: int = 12

    def __post_init__(self) -> None:
        if int(self.max_pixels) < 100:
            raise ConfigError(f"max_pixels must be >= 100; got {self.max_pixels!r}")
        if not np.isfinite(self.step) or not 0 < self.step < 0.2:
            raise ConfigError(f"step must be in (0, 0.2); got {self.step!r}")
        if int(self.max_steps) < 0:
            raise ConfigError(f"max_steps must be >= 0; got {self.max_steps!r}")
        if int(self.warm_iterations) < 1:
            raise ConfigError(f"warm_iterations must be >= 1; got {self.warm_iterations!r}")


@dataclass
class DistanceScale:
    """Result of :func:`estimate_distance_scale`.

    Attributes:
        scale: the factor ``s`` (points become ``s V``); 1 when the search had nothing to
            go on.
        samples: (factor, energy of eq. 6 per element) of every candidate, by factor.
        pixels: elements of the coarse copy that was solved.
        levels: 2x2 halvings from the input to that copy.
        seconds: wall time.
    """

    scale: float
    samples: list[tuple[float, float]] = field(default_factory=list)
    pixels: int = 0
    levels: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"scale": float(self.scale), "pixels": int(self.pixels),
                "levels": int(self.levels), "seconds": float(self.seconds),
                "samples": [[float(s), float(e)] for s, e in self.samples]}


def estimate_distance_scale(images: np.ndarray, points: np.ndarray,
                            proxy_normals: np.ndarray, mask: np.ndarray, lights: PointLights,
                            config: NormalAlbedoConfig | None = None,
                            search: DistanceConfig | None = None, *,
                            saturated: np.ndarray | None = None,
                            shadow: np.ndarray | None = None) -> DistanceScale:
    """The factor about the camera centre that best explains the images (module docstring).

    Args:
        images: (L, H, W, 3) linear images, one per light.
        points: (H, W, 3) proxy positions in mm, camera frame.
        proxy_normals: (H, W, 3) unit proxy normals.
        mask: (H, W) bool pixels to use.
        lights: the L lights (given, not calibrated against this proxy: calibrated lights
            already absorb the distance).
        config: the pixel-domain options of eq. 6 (weights, robust loss, iterations).
        search: the search options.
        saturated, shadow: optional (L, H, W) bool samples to drop, as for
            :func:`faceps.optimize.normal_albedo.update_normals_albedo`.

    Returns:
        :class:`DistanceScale`.

    Raises:
        ShapeError: inconsistent shapes.
        FitError: nothing to solve (empty mask or no lit sample).
    """
    t_start = time.perf_counter()
    config = _check_config(config, "pixel")
    search = search or DistanceConfig()
    images, lights, pts, nrm, valid = _check_pixel_inputs(
        "estimate_distance_scale", images, points, proxy_normals, mask, lights, saturated,
        shadow)
    rows = np.nonzero(valid.any(1))[0]
    cols = np.nonzero(valid.any(0))[0]
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    sat = None if saturated is None or not config.use_saturation else \
        np.asarray(saturated, bool)[(slice(None), *box)]
    if sat is not None and sat.ndim == 4:
        sat = sat.any(-1)                     # per-channel flags: the whole sample here
    sh = None if shadow is None else np.asarray(shadow, bool)[(slice(None), *box)]
    level = (images[(slice(None), *box)], pts[box], nrm[box], valid[box], sat, sh)
    halvings = 0
    while int(level[3].sum()) > int(search.max_pixels):
        level = _coarser(*level)
        halvings += 1
    imgs, P, N, ok, sat, sh = level

    idx, V, n0, I, usable, _ = _pixel_elements(imgs, P, N, ok, [sat, sh])
    adj = _element_adjacency(idx, ok.shape)

    base = _solve(I, light_vectors(V, lights), lights, n0, usable, adj, config, {})
    energies = {1.0: float(base.history[-1])}

    def energy(s: float) -> float:
        s = round(s, 9)
        if s not in energies:
            sol = _solve(I, light_vectors(V * s, lights), lights, n0, usable, adj, config, {},
                         rho_init=base.albedo, iterations=int(search.warm_iterations))
            energies[s] = float(sol.history[-1])
        return energies[s]

    h = float(search.step)
    energy(1.0 - h)
    energy(1.0 + h)
    for _ in range(int(search.max_steps)):
        ks = sorted(energies)
        best = min(ks, key=energies.__getitem__)
        if best == ks[0]:
            energy(best - h)
        elif best == ks[-1]:
            energy(best + h)
        else:
            break
    ks = sorted(energies)
    i = ks.index(min(ks, key=energies.__getitem__))
    scale = ks[i]
    if 0 < i < len(ks) - 1:
        e0, e1, e2 = energies[ks[i - 1]], energies[ks[i]], energies[ks[i + 1]]
        curvature = e0 - 2.0 * e1 + e2
        if curvature > 0:
            scale = ks[i] + 0.5 * h * (e0 - e2) / curvature
    scale = float(np.clip(scale, ks[0], ks[-1]))
    if not np.isfinite(scale) or scale <= 0:
        scale = 1.0
    return DistanceScale(scale=scale, samples=[(k, energies[k]) for k in ks],
                         pixels=int(idx.size), levels=halvings,
                         seconds=time.perf_counter() - t_start)
