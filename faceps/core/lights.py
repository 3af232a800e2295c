"""Lights and the imaging model of the method (paper eq. 1).

Near point light j at position P_j (mm, camera frame) with RGB intensity beta_j lights a
surface point V with unit normal n and albedo rho as::

    I = rho * beta_j * max(0, n . (P_j - V)) / |P_j - V|^3 * led_j(V)

with the optional LED anisotropy ``led_j(V) = max(0, d_j . (V - P_j) / |V - P_j|)^mu_j``
(d_j the LED's unit axis, mu_j >= 0; mu_j = 0 is an isotropic point light). The clamp at
zero is the attached shadow; cast shadows need the geometry and live in the renderer.

A distant light has a unit direction l (from surface toward the light) and intensity
beta: ``I = rho * beta * max(0, n . l)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from faceps.core.errors import ShapeError, check_finite, check_shape

__all__ = [
    "PointLights",
    "DirectionalLights",
    "point_irradiance",
    "shade_point",
    "shade_directional",
    "point_irradiance_torch",
    "shade_point_torch",
    "LIGHT_ROW",
]

#: layout of one light as a row of the HDF5 ``lights`` array (contract 4)
LIGHT_ROW = ("px", "py", "pz", "r", "g", "b", "dx", "dy", "dz", "anisotropy", "valid")


def _as_rgb(value: object, name: str) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 0:
        arr = np.repeat(arr, 3)
    if arr.shape != (3,):
        raise ShapeError(f"expected {name} to be one number or 3 RGB values; got shape {arr.shape}")
    return arr


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _number_or_list(value: object, name: str) -> object:
    if _is_number(value) or (isinstance(value, list | tuple | np.ndarray)
                             and all(_is_number(v) for v in np.asarray(value).reshape(-1)
                                     .tolist())):
        return value
    raise ShapeError(f"{name}: expected a number or a list of numbers; got {value!r}")


def _vector(value: object, name: str, n: int) -> np.ndarray:
    """A list of n numbers (n = 0: one number) as float64, or a ShapeError naming it."""
    if n == 0:
        if not _is_number(value):
            raise ShapeError(f"{name}: expected a number; got {value!r}")
        return np.float64(value)
    if (not isinstance(value, list | tuple | np.ndarray) or len(value) != n
            or not all(_is_number(v) for v in np.asarray(value, dtype=object).tolist())):
        raise ShapeError(f"{name}: expected a list of {n} numbers; got {value!r}")
    return np.asarray(value, dtype=np.float64)


@dataclass(frozen=True)
class PointLights:
    """A set of L near point lights (optionally LEDs with a main axis).

    Attributes:
        positions: (L, 3) float64 mm, camera frame.
        intensities: (L, 3) float64 RGB intensities beta (>= 0), in image units x mm^2.
        directions: (L, 3) float64 unit LED axes (pointing from the LED into the scene),
            or zeros where the light is isotropic.
        anisotropy: (L,) float64 exponents mu >= 0 (0: isotropic).
        names: L names (e.g. ``left``, ``front``, ``right``).
    """

    positions: np.ndarray
    intensities: np.ndarray
    directions: np.ndarray | None = None
    anisotropy: np.ndarray | None = None
    names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        P = np.asarray(self.positions, dtype=np.float64)
        if P.shape == (3,):
            P = P[None]
        check_shape(P, "positions", (None, 3))
        L = P.shape[0]
        inten = np.asarray(self.intensities, dtype=np.float64)
        if inten.ndim == 1 and inten.shape[0] == L:
            inten = np.repeat(inten[:, None], 3, axis=1)
        check_shape(inten, "intensities", (L, 3))
        D = (np.zeros((L, 3)) if self.directions is None
             else np.asarray(self.directions, dtype=np.float64))
        if D.shape == (3,) and L == 1:
            D = D[None]
        check_shape(D, "directions", (L, 3))
        mu = (np.zeros(L) if self.anisotropy is None
              else np.atleast_1d(np.asarray(self.anisotropy, dtype=np.float64)))
        check_shape(mu, "anisotropy", (L,))
        for arr, nm in ((P, "positions"), (inten, "intensities"), (D, "directions"),
                        (mu, "anisotropy")):
            check_finite(arr, nm)
        if np.any(inten < 0):
            raise ShapeError("light intensities must be >= 0")
        if np.any(mu < 0):
            raise ShapeError("LED anisotropy must be >= 0")
        norms = np.linalg.norm(D, axis=1)
        if np.any((mu > 0) & (norms < 1e-9)):
            raise ShapeError("an LED with anisotropy > 0 needs a non-zero direction")
        D = np.where(norms[:, None] > 1e-9, D / np.maximum(norms, 1e-12)[:, None], 0.0)
        names = (tuple(f"light{i}" for i in range(L)) if self.names is None
                 else tuple(str(n) for n in self.names))
        if len(names) != L:
            raise ShapeError(f"expected {L} light names; got {len(names)}")
        object.__setattr__(self, "positions", P)
        object.__setattr__(self, "intensities", inten)
        object.__setattr__(self, "directions", D)
        object.__setattr__(self, "anisotropy", mu)
        object.__setattr__(self, "names", names)

    def __len__(self) -> int:
        return self.positions.shape[0]

    def select(self, index: Sequence[int] | np.ndarray) -> PointLights:
        """A subset of the lights, in the given order."""
        idx = np.asarray(index, dtype=int)
        return PointLights(self.positions[idx], self.intensities[idx], self.directions[idx],
                           self.anisotropy[idx], tuple(self.names[i] for i in idx))

    # -------------------------------------------------------------- schema
    def to_dict(self) -> dict[str, dict]:
        """The session's ``lights`` JSON object (names -> fields)."""
        out = {}
        for i, name in enumerate(self.names):
            entry = {"position": self.positions[i].tolist(),
                     "intensity": self.intensities[i].tolist()}
            if self.anisotropy[i] > 0 or np.any(self.directions[i] != 0):
                entry["direction"] = self.directions[i].tolist()
                entry["anisotropy"] = float(self.anisotropy[i])
            out[name] = entry
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Mapping], order: Sequence[str] | None = None
                  ) -> PointLights:
        """Build from the session's ``lights`` object; ``order`` picks and orders names.

        Raises:
            ShapeError: for a missing name or a malformed entry, naming the field (the
            session reader wraps it into a ``SessionError`` naming the file).
        """
        names = list(order) if order is not None else list(data.keys())
        P, B, D, M = [], [], [], []
        for n in names:
            if n not in data or not isinstance(data[n], Mapping):
                raise ShapeError(f"lights.{n}: not defined")
            e = data[n]
            P.append(_vector(e.get("position"), f"lights.{n}.position", 3))
            B.append(_as_rgb(_number_or_list(e.get("intensity", 1.0), f"lights.{n}.intensity"),
                             f"lights.{n}.intensity"))
            D.append(_vector(e.get("direction", [0.0, 0.0, 0.0]), f"lights.{n}.direction", 3))
            M.append(float(_vector(e.get("anisotropy", 0.0), f"lights.{n}.anisotropy", 0)))
        return cls(np.array(P).reshape(-1, 3), np.array(B).reshape(-1, 3),
                   np.array(D).reshape(-1, 3), np.array(M), tuple(names))

    def to_array(self) -> np.ndarray:
        """(L, 11) float32 rows as in contract 4 (see :data:`LIGHT_ROW`), valid flag 1."""
        return np.concatenate([self.positions, self.intensities, self.directions,
                               self.anisotropy[:, None], np.ones((len(self), 1))],
                              axis=1).astype(np.float32)

    @classmethod
    def from_array(cls, rows: np.ndarray, names: Sequence[str] | None = None) -> PointLights:
        """Inverse of :meth:`to_array`; rows whose valid flag is 0 are dropped."""
        rows = np.asarray(rows, dtype=np.float64)
        check_shape(rows, "rows", (None, len(LIGHT_ROW)))
        keep = rows[:, 10] > 0.5
        kept_names = None if names is None else tuple(n for n, k in zip(names, keep) if k)
        r = rows[keep]
        return cls(r[:, 0:3], r[:, 3:6], r[:, 6:9], r[:, 9], kept_names)


@dataclass(frozen=True)
class DirectionalLights:
    """L distant lights.

    Attributes:
        directions: (L, 3) unit vectors from the surface toward the light (camera frame).
        intensities: (L, 3) RGB intensities.
    """

    directions: np.ndarray
    intensities: np.ndarray

    def __post_init__(self) -> None:
        D = np.asarray(self.directions, dtype=np.float64).reshape(-1, 3)
        inten = np.asarray(self.intensities, dtype=np.float64)
        if inten.ndim == 1 and inten.shape[0] == D.shape[0]:
            inten = np.repeat(inten[:, None], 3, axis=1)
        check_shape(inten, "intensities", (D.shape[0], 3))
        n = np.linalg.norm(D, axis=1, keepdims=True)
        if np.any(n < 1e-12):
            raise ShapeError("directional light directions must be non-zero")
        object.__setattr__(self, "directions", D / n)
        object.__setattr__(self, "intensities", inten)

    def __len__(self) -> int:
        return self.directions.shape[0]


# ------------------------------------------------------------------ numpy model
def point_irradiance(points: np.ndarray, normals: np.ndarray, lights: PointLights
                     ) -> np.ndarray:
    """Geometric factor of eq. 1 per light (without albedo and intensity).

    Args:
        points: (..., 3) surface positions V in mm (camera frame).
        normals: (..., 3) unit normals.
        lights: L point lights.

    Returns:
        (L, ...) float64 ``max(0, n . (P - V)) / |P - V|^3 * led(V)``.
    """
    V = np.asarray(points, dtype=np.float64)
    N = np.asarray(normals, dtype=np.float64)
    check_shape(V, "points", (3,), leading=True)
    if N.shape != V.shape:
        raise ShapeError(f"expected normals to have shape {V.shape}; got {N.shape}")
    P = lights.positions.reshape((len(lights),) + (1,) * (V.ndim - 1) + (3,))
    d = P - V[None]
    dist = np.linalg.norm(d, axis=-1)
    ndotl = np.maximum(np.einsum("...k,...k->...", N[None], d), 0.0)
    out = ndotl / np.maximum(dist, 1e-9) ** 3
    if np.any(lights.anisotropy > 0):
        axis = lights.directions.reshape(P.shape)
        mu = lights.anisotropy.reshape((len(lights),) + (1,) * (V.ndim - 1))
        cos = np.maximum(np.einsum("...k,...k->...", axis, -d) / np.maximum(dist, 1e-9), 0.0)
        out = out * np.where(mu > 0, cos ** mu, 1.0)
    return out


def shade_point(points: np.ndarray, normals: np.ndarray, albedo: np.ndarray,
                lights: PointLights) -> np.ndarray:
    """Lambertian near-light images by eq. 1.

    Args:
        points: (..., 3) positions (mm); normals: (..., 3) unit normals;
        albedo: (..., 3) linear RGB albedo.

    Returns:
        (L, ..., 3) float32 linear intensities, one image per light.
    """
    A = np.asarray(albedo, dtype=np.float64)
    if A.shape != np.shape(points):
        raise ShapeError(f"expected albedo to have shape {np.shape(points)}; got {A.shape}")
    E = point_irradiance(points, normals, lights)
    beta = lights.intensities.reshape((len(lights),) + (1,) * (A.ndim - 1) + (3,))
    return (A[None] * beta * E[..., None]).astype(np.float32)


def shade_directional(normals: np.ndarray, albedo: np.ndarray, lights: DirectionalLights
                      ) -> np.ndarray:
    """Lambertian images under distant lights: (L, ..., 3) float32."""
    N = np.asarray(normals, dtype=np.float64)
    A = np.asarray(albedo, dtype=np.float64)
    check_shape(N, "normals", (3,), leading=True)
    Lshape = (len(lights),) + (1,) * (N.ndim - 1) + (3,)
    ndotl = np.maximum(np.einsum("...k,...k->...", N[None], lights.directions.reshape(Lshape)),
                       0.0)
    return (A[None] * lights.intensities.reshape(Lshape) * ndotl[..., None]).astype(np.float32)


# ------------------------------------------------------------------ torch model
def point_irradiance_torch(points, normals, positions, directions=None, anisotropy=None):
    """Torch version of :func:`point_irradiance` (differentiable).

    Args:
        points: (..., 3); normals: (..., 3); positions: (L, 3) tensors;
        directions: optional (L, 3) unit LED axes; anisotropy: optional (L,) exponents.

    Returns:
        (L, ...) tensor.
    """
    import torch

    L = positions.shape[0]
    P = positions.reshape((L,) + (1,) * (points.dim() - 1) + (3,))
    d = P - points.unsqueeze(0)
    dist = d.norm(dim=-1).clamp_min(1e-9)
    out = (normals.unsqueeze(0) * d).sum(-1).clamp_min(0.0) / dist**3
    if anisotropy is not None and bool((anisotropy > 0).any()):
        axis = directions.reshape(P.shape)
        mu = anisotropy.reshape((L,) + (1,) * (points.dim() - 1))
        cos = ((-d * axis).sum(-1) / dist).clamp_min(0.0)
        led = cos.clamp_min(1e-12) ** mu * (cos > 0)
        out = out * torch.where(mu > 0, led, torch.ones_like(cos))
    return out


def shade_point_torch(points, normals, albedo, positions, intensities, directions=None,
                      anisotropy=None):
    """Torch version of :func:`shade_point`: (L, ..., 3)."""
    E = point_irradiance_torch(points, normals, positions, directions, anisotropy)
    L = positions.shape[0]
    beta = intensities.reshape((L,) + (1,) * (albedo.dim() - 1) + (3,))
    return albedo.unsqueeze(0) * beta * E.unsqueeze(-1)
