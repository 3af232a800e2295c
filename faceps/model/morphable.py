"""Morphable face models (3DMM) in the ``faceps.morphable/1`` format (DESIGN contract 5).

Geometry ``G = mean + id_basis @ (alpha_id * id_std) + exp_basis @ (alpha_exp * exp_std)``:
coefficients are in units of standard deviations, so ``alpha ~ N(0, I)`` samples the model.
Model frame: x toward the subject's left, y up, z out of the face, millimetres.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from faceps.core.atomic import save_npz
from faceps.core.errors import ModelError
from faceps.core.mesh import face_normals, vertex_normals

__all__ = ["MorphableModel", "Coefficients", "FORMAT"]

FORMAT = "faceps.morphable/1"

_REQUIRED = ("mean", "id_basis", "id_std", "exp_basis", "exp_std", "triangles", "landmarks68")
_STRINGS = ("name", "license", "source")


@dataclass(frozen=True)
class Coefficients:
    """Model coefficients in units of standard deviations.

    Attributes:
        id: (Ki,) identity; exp: (Ke,) expression; albedo: (Ka,) albedo (empty without an
        albedo model).
    """

    id: np.ndarray
    exp: np.ndarray
    albedo: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def to_dict(self) -> dict:
        return {"id": np.asarray(self.id).tolist(), "exp": np.asarray(self.exp).tolist(),
                "albedo": np.asarray(self.albedo).tolist()}


@dataclass(frozen=True, eq=False)
class MorphableModel:
    """A linear shape (identity + expression) and optional albedo model on one mesh.

    Attributes:
        mean: (V, 3) float32 mean shape, mm, model frame.
        id_basis: (V, 3, Ki) float32 unit-variance identity modes; id_std: (Ki,) std devs.
        exp_basis: (V, 3, Ke) float32 expression modes; exp_std: (Ke,).
        triangles: (F, 3) int32, counter-clockwise seen from outside.
        landmarks68: (68,) int32 iBUG-68 vertex ids, -1 where the model has none.
        name, license, source: free text.
        albedo_mean: optional (V, 3) linear RGB in [0, 1]; albedo_basis (V, 3, Ka);
            albedo_std (Ka,).
        face_region: optional (V,) bool, True on the face proper (not neck, ears, back of
            the head); a faceps extension key, all True when absent.
        exp_names: optional Ke names of the expression modes (extension key).
        id_names: optional Ki names of the identity modes (extension key).
        exp_lower: optional (Ke,) lower bound of each expression coefficient (extension
            key): 0 for one-sided blendshapes (e.g. jaw open), -inf when unbounded.
            :meth:`sample` respects it.
    """

    mean: np.ndarray
    id_basis: np.ndarray
    id_std: np.ndarray
    exp_basis: np.ndarray
    exp_std: np.ndarray
    triangles: np.ndarray
    landmarks68: np.ndarray
    name: str = "unnamed"
    license: str = "unknown"
    source: str = "unknown"
    albedo_mean: np.ndarray | None = None
    albedo_basis: np.ndarray | None = None
    albedo_std: np.ndarray | None = None
    face_region: np.ndarray | None = None
    exp_names: tuple[str, ...] | None = None
    id_names: tuple[str, ...] | None = None
    exp_lower: np.ndarray | None = None

    def __post_init__(self) -> None:
        f32 = lambda a: None if a is None else np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
        object.__setattr__(self, "mean", f32(self.mean))
        object.__setattr__(self, "id_basis", f32(self.id_basis))
        object.__setattr__(self, "id_std", f32(self.id_std))
        object.__setattr__(self, "exp_basis", f32(self.exp_basis))
        object.__setattr__(self, "exp_std", f32(self.exp_std))
        object.__setattr__(self, "albedo_mean", f32(self.albedo_mean))
        object.__setattr__(self, "albedo_basis", f32(self.albedo_basis))
        object.__setattr__(self, "albedo_std", f32(self.albedo_std))
        object.__setattr__(self, "triangles", np.ascontiguousarray(self.triangles, np.int32))
        object.__setattr__(self, "landmarks68", np.ascontiguousarray(self.landmarks68, np.int32))
        if self.face_region is not None:
            object.__setattr__(self, "face_region", np.asarray(self.face_region, dtype=bool))
        if self.exp_names is not None:
            object.__setattr__(self, "exp_names", tuple(str(s) for s in self.exp_names))
        if self.id_names is not None:
            object.__setattr__(self, "id_names", tuple(str(s) for s in self.id_names))
        if self.exp_lower is not None:
            object.__setattr__(self, "exp_lower", np.asarray(self.exp_lower, np.float32))
        object.__setattr__(self, "_torch_cache", {})
        self.validate()

    # ------------------------------------------------------------ validation
    def validate(self) -> None:
        """Check shapes, ranges and finiteness; raise :class:`ModelError` naming the field."""
        V = self.mean.shape[0] if self.mean.ndim == 2 else -1
        if self.mean.ndim != 2 or self.mean.shape[1] != 3 or V < 3:
            raise ModelError(f"'mean' must have shape (V, 3) with V >= 3; got {self.mean.shape}")

        def basis(b: np.ndarray, s: np.ndarray, nb: str, ns: str) -> None:
            if b.ndim != 3 or b.shape[:2] != (V, 3):
                raise ModelError(f"'{nb}' must have shape ({V}, 3, K); got {b.shape}")
            if s.shape != (b.shape[2],):
                raise ModelError(f"'{ns}' must have shape ({b.shape[2]},) to match '{nb}'; "
                                 f"got {s.shape}")
            if not (np.all(np.isfinite(b)) and np.all(np.isfinite(s))):
                raise ModelError(f"'{nb}' or '{ns}' holds NaN or infinite values")
            if np.any(s < 0):
                raise ModelError(f"'{ns}' must be >= 0")

        if not np.all(np.isfinite(self.mean)):
            raise ModelError("'mean' holds NaN or infinite values")
        basis(self.id_basis, self.id_std, "id_basis", "id_std")
        basis(self.exp_basis, self.exp_std, "exp_basis", "exp_std")
        F = self.triangles
        if F.ndim != 2 or F.shape[1] != 3 or F.shape[0] == 0:
            raise ModelError(f"'triangles' must have shape (F, 3) with F > 0; got {F.shape}")
        if F.min() < 0 or F.max() >= V:
            raise ModelError(f"'triangles' index vertices outside [0, {V})")
        lm = self.landmarks68
        if lm.shape != (68,):
            raise ModelError(f"'landmarks68' must have shape (68,); got {lm.shape}")
        if lm.min() < -1 or lm.max() >= V:
            raise ModelError(f"'landmarks68' must hold vertex ids in [0, {V}) or -1")
        if self.albedo_mean is not None:
            if self.albedo_mean.shape != (V, 3):
                raise ModelError(f"'albedo_mean' must have shape ({V}, 3); "
                                 f"got {self.albedo_mean.shape}")
            if not np.all(np.isfinite(self.albedo_mean)):
                raise ModelError("'albedo_mean' holds NaN or infinite values")
            if (self.albedo_basis is None) != (self.albedo_std is None):
                raise ModelError("'albedo_basis' and 'albedo_std' must be given together")
            if self.albedo_basis is not None:
                basis(self.albedo_basis, self.albedo_std, "albedo_basis", "albedo_std")
        elif self.albedo_basis is not None or self.albedo_std is not None:
            raise ModelError("'albedo_basis' given without 'albedo_mean'")
        if self.face_region is not None and self.face_region.shape != (V,):
            raise ModelError(f"'face_region' must have shape ({V},); got {self.face_region.shape}")
        if self.exp_names is not None and len(self.exp_names) != self.n_exp:
            raise ModelError(f"'exp_names' must have {self.n_exp} entries")
        if self.id_names is not None and len(self.id_names) != self.n_id:
            raise ModelError(f"'id_names' must have {self.n_id} entries")
        if self.exp_lower is not None and (self.exp_lower.shape != (self.n_exp,)
                                           or np.any(np.isnan(self.exp_lower))):
            raise ModelError(f"'exp_lower' must have shape ({self.n_exp},) without NaN")

    # ----------------------------------------------------------------- sizes
    @property
    def n_vertices(self) -> int:
        return self.mean.shape[0]

    @property
    def n_triangles(self) -> int:
        return self.triangles.shape[0]

    @property
    def n_id(self) -> int:
        return self.id_basis.shape[2]

    @property
    def n_exp(self) -> int:
        return self.exp_basis.shape[2]

    @property
    def n_albedo(self) -> int:
        return 0 if self.albedo_basis is None else self.albedo_basis.shape[2]

    @property
    def has_albedo(self) -> bool:
        return self.albedo_mean is not None

    @property
    def region(self) -> np.ndarray:
        """(V,) bool face-region mask (all True when the model has none)."""
        return (np.ones(self.n_vertices, bool) if self.face_region is None
                else self.face_region)

    @property
    def landmark_valid(self) -> np.ndarray:
        """(68,) bool: which iBUG points have a vertex."""
        return self.landmarks68 >= 0

    # -------------------------------------------------------------- geometry
    def _coef(self, alpha: np.ndarray | None, k: int, name: str) -> np.ndarray:
        if alpha is None:
            return np.zeros(k)
        a = np.asarray(alpha, dtype=np.float64).reshape(-1)
        if a.size > k:
            raise ModelError(f"{name} has {a.size} coefficients; the model has {k}")
        if a.size < k:
            a = np.concatenate([a, np.zeros(k - a.size)])
        return a

    def geometry(self, alpha_id: np.ndarray | None = None, alpha_exp: np.ndarray | None = None
                 ) -> np.ndarray:
        """Vertex positions (V, 3) float64 mm in the model frame.

        Shorter coefficient vectors are zero-padded (leading components only).
        """
        a = self._coef(alpha_id, self.n_id, "alpha_id") * self.id_std
        e = self._coef(alpha_exp, self.n_exp, "alpha_exp") * self.exp_std
        # float32 products (no float64 copy of the bases), summed into float64. einsum, not
        # BLAS: a threaded BLAS matrix-vector product rounds differently with the number of
        # threads, and datasets must be the same bytes however their work is spread.
        G = self.mean.astype(np.float64)
        if a.any():
            G += np.einsum("ik,k->i", self.id_basis.reshape(-1, self.n_id),
                           a.astype(np.float32)).reshape(-1, 3)
        if e.any():
            G += np.einsum("ik,k->i", self.exp_basis.reshape(-1, self.n_exp),
                           e.astype(np.float32)).reshape(-1, 3)
        return G

    def albedo(self, alpha_albedo: np.ndarray | None = None) -> np.ndarray:
        """Per-vertex linear RGB albedo (V, 3) float64, clipped to [0, 1].

        A model without albedo gives a uniform mid skin tone.
        """
        if not self.has_albedo:
            return np.tile(np.array([0.55, 0.40, 0.33]), (self.n_vertices, 1))
        A = self.albedo_mean.astype(np.float64)
        if self.n_albedo:
            b = self._coef(alpha_albedo, self.n_albedo, "alpha_albedo") * self.albedo_std
            if b.any():
                A += (self.albedo_basis.reshape(-1, self.n_albedo) @ b.astype(np.float32)
                      ).reshape(-1, 3)
        return np.clip(A, 0.0, 1.0)

    def landmark_points(self, geometry: np.ndarray) -> np.ndarray:
        """(68, 3) positions of the landmark vertices of ``geometry``; NaN where id is -1."""
        G = np.asarray(geometry)
        out = np.full((68, 3), np.nan)
        ok = self.landmark_valid
        out[ok] = G[self.landmarks68[ok]]
        return out

    def vertex_normals(self, geometry: np.ndarray) -> np.ndarray:
        """Area-weighted unit vertex normals (V, 3) of ``geometry``."""
        return vertex_normals(geometry, self.triangles)

    def face_normals(self, geometry: np.ndarray) -> np.ndarray:
        """Unit face normals (F, 3) of ``geometry``."""
        return face_normals(geometry, self.triangles)

    def sample(self, rng: np.random.Generator, *, id_scale: float = 1.0, exp_scale: float = 1.0,
               albedo_scale: float = 1.0, truncate: float = 3.0) -> Coefficients:
        """Random coefficients ~ N(0, scale^2) truncated at ``truncate`` std devs;
        expression components with a lower bound (``exp_lower``) are folded onto their
        allowed side."""
        def draw(k: int, s: float) -> np.ndarray:
            return np.clip(rng.standard_normal(k), -truncate, truncate) * s

        exp = draw(self.n_exp, exp_scale)
        if self.exp_lower is not None:
            # one-sided components: fold the draw onto the allowed side
            lo = self.exp_lower.astype(np.float64)
            exp = np.where(np.isfinite(lo) & (exp < lo), 2 * lo - exp, exp)
        return Coefficients(draw(self.n_id, id_scale), exp, draw(self.n_albedo, albedo_scale))

    # ----------------------------------------------------------------- torch
    def torch_tensors(self, device=None, dtype=None) -> dict:
        """Cached torch copies of mean and scaled bases (modes times std) per device/dtype."""
        import torch

        dtype = dtype or torch.float32
        key = (str(device), str(dtype))
        cache = self._torch_cache  # type: ignore[attr-defined]
        if key not in cache:
            t = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=dtype, device=device)  # noqa: E731
            entry = {
                "mean": t(self.mean),
                "id": t((self.id_basis * self.id_std).reshape(-1, self.n_id)),
                "exp": t((self.exp_basis * self.exp_std).reshape(-1, self.n_exp)),
                "triangles": torch.as_tensor(self.triangles.astype(np.int64), device=device),
                "landmarks68": torch.as_tensor(self.landmarks68.astype(np.int64), device=device),
            }
            if self.has_albedo:
                entry["albedo_mean"] = t(self.albedo_mean)
                if self.n_albedo:
                    entry["albedo"] = t((self.albedo_basis * self.albedo_std)
                                        .reshape(-1, self.n_albedo))
            cache[key] = entry
        return cache[key]

    def geometry_torch(self, alpha_id, alpha_exp):
        """Batched differentiable geometry.

        Args:
            alpha_id: (B, Ki') tensor, Ki' <= Ki (leading components); alpha_exp: (B, Ke').

        Returns:
            (B, V, 3) tensor (mm, model frame).
        """
        T = self.torch_tensors(alpha_id.device, alpha_id.dtype)
        B = alpha_id.shape[0]
        ki, ke = alpha_id.shape[1], alpha_exp.shape[1]
        if ki > self.n_id or ke > self.n_exp:
            raise ModelError(f"got {ki} identity / {ke} expression coefficients; the model "
                             f"has {self.n_id} / {self.n_exp}")
        off = alpha_id @ T["id"][:, :ki].T + alpha_exp @ T["exp"][:, :ke].T
        return T["mean"].unsqueeze(0) + off.reshape(B, -1, 3)

    def albedo_torch(self, alpha_albedo):
        """Batched albedo (B, V, 3) for (B, Ka') coefficients (not clipped)."""
        import torch

        T = self.torch_tensors(alpha_albedo.device, alpha_albedo.dtype)
        B = alpha_albedo.shape[0]
        if not self.has_albedo:
            base = torch.tensor([0.55, 0.40, 0.33], dtype=alpha_albedo.dtype,
                                device=alpha_albedo.device)
            return base.expand(B, self.n_vertices, 3).clone()
        out = T["albedo_mean"].unsqueeze(0).expand(B, -1, -1)
        ka = alpha_albedo.shape[1]
        if ka and self.n_albedo:
            out = out + (alpha_albedo @ T["albedo"][:, :ka].T).reshape(B, -1, 3)
        return out

    # ------------------------------------------------------------ sub-meshes
    def crop(self, vertex_ids: Sequence[int] | np.ndarray) -> MorphableModel:
        """The model restricted to ``vertex_ids`` (in that order).

        Triangles with all three corners kept survive (re-indexed); landmarks on removed
        vertices become -1. Accepts a boolean mask too.
        """
        ids = np.asarray(vertex_ids)
        if ids.dtype == bool:
            if ids.shape != (self.n_vertices,):
                raise ModelError(f"crop mask must have shape ({self.n_vertices},)")
            ids = np.nonzero(ids)[0]
        ids = ids.astype(np.int64)
        if ids.size == 0 or ids.min() < 0 or ids.max() >= self.n_vertices:
            raise ModelError("crop vertex ids out of range or empty")
        if np.unique(ids).size != ids.size:
            raise ModelError("crop vertex ids must be unique")
        remap = -np.ones(self.n_vertices, np.int64)
        remap[ids] = np.arange(ids.size)
        F = remap[self.triangles]
        F = F[np.all(F >= 0, axis=1)]
        if F.shape[0] == 0:
            raise ModelError("crop keeps no triangle")
        lm = np.where(self.landmarks68 >= 0, remap[np.maximum(self.landmarks68, 0)], -1)
        pick = lambda a: None if a is None else a[ids]  # noqa: E731
        return replace(self, mean=self.mean[ids], id_basis=self.id_basis[ids],
                       exp_basis=self.exp_basis[ids], triangles=F, landmarks68=lm,
                       albedo_mean=pick(self.albedo_mean), albedo_basis=pick(self.albedo_basis),
                       face_region=pick(self.face_region))

    def truncated(self, n_id: int | None = None, n_exp: int | None = None,
                  n_albedo: int | None = None) -> MorphableModel:
        """The model with only the leading components kept."""
        ni = self.n_id if n_id is None else min(n_id, self.n_id)
        ne = self.n_exp if n_exp is None else min(n_exp, self.n_exp)
        kw = {}
        if self.n_albedo:
            na = self.n_albedo if n_albedo is None else min(n_albedo, self.n_albedo)
            kw = {"albedo_basis": self.albedo_basis[:, :, :na], "albedo_std": self.albedo_std[:na]}
        return replace(self, id_basis=self.id_basis[:, :, :ni], id_std=self.id_std[:ni],
                       exp_basis=self.exp_basis[:, :, :ne], exp_std=self.exp_std[:ne],
                       exp_lower=None if self.exp_lower is None else self.exp_lower[:ne],
                       exp_names=None if self.exp_names is None else self.exp_names[:ne],
                       id_names=None if self.id_names is None else self.id_names[:ni], **kw)

    def to_trimesh(self, geometry: np.ndarray | None = None, albedo: np.ndarray | None = None):
        """A ``trimesh.Trimesh`` of ``geometry`` (default: the mean) with vertex colours."""
        import trimesh

        G = self.mean if geometry is None else geometry
        mesh = trimesh.Trimesh(np.asarray(G, np.float64), self.triangles, process=False)
        if albedo is not None:
            rgb = np.clip(np.asarray(albedo) * 255, 0, 255).astype(np.uint8)
            mesh.visual.vertex_colors = np.concatenate([rgb, np.full((len(rgb), 1), 255,
                                                                     np.uint8)], 1)
        return mesh

    # -------------------------------------------------------------------- io
    def to_arrays(self) -> dict[str, np.ndarray]:
        """The contract-5 arrays (plus faceps extension keys when present)."""
        out = {"format": np.array(FORMAT), "mean": self.mean, "id_basis": self.id_basis,
               "id_std": self.id_std, "exp_basis": self.exp_basis, "exp_std": self.exp_std,
               "triangles": self.triangles, "landmarks68": self.landmarks68,
               "name": np.array(self.name), "license": np.array(self.license),
               "source": np.array(self.source)}
        if self.albedo_mean is not None:
            out["albedo_mean"] = self.albedo_mean
        if self.albedo_basis is not None:
            out["albedo_basis"] = self.albedo_basis
            out["albedo_std"] = self.albedo_std
        if self.face_region is not None:
            out["face_region"] = self.face_region.astype(np.uint8)
        if self.exp_names is not None:
            out["exp_names"] = np.array(self.exp_names, dtype=str)
        if self.id_names is not None:
            out["id_names"] = np.array(self.id_names, dtype=str)
        if self.exp_lower is not None:
            out["exp_lower"] = self.exp_lower
        return out

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model as a contract-5 ``.npz`` (atomically, no pickles)."""
        return save_npz(path, **self.to_arrays())

    @classmethod
    def load(cls, path: str | os.PathLike) -> MorphableModel:
        """Read a contract-5 ``.npz``; never unpickles.

        Raises:
            ModelError: naming the file and what is wrong with it.
        """
        p = Path(path)
        if not p.is_file():
            raise ModelError(f"{p}: model file not found")
        try:
            with np.load(p, allow_pickle=False) as z:
                keys = set(z.files)
                missing = [k for k in _REQUIRED if k not in keys]
                if missing:
                    raise ModelError(f"{p}: missing required array(s) {', '.join(missing)}")
                data = {}
                for k in keys:
                    try:
                        data[k] = z[k]
                    except ValueError as exc:
                        raise ModelError(f"{p}: array '{k}' holds pickled objects, which faceps "
                                         f"never loads ({exc})") from None
        except ModelError:
            raise
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            if isinstance(exc, ValueError) and "pickle" in str(exc):
                # numpy's hint (load it with allow_pickle) would run code from the file
                raise ModelError(f"{p}: not a .npz model but a pickle, which faceps never "
                                 f"loads (it can run code)") from None
            raise ModelError(f"{p}: not a readable .npz model ({exc})") from None
        fmt = str(data["format"]) if "format" in data else FORMAT
        if fmt != FORMAT:
            raise ModelError(f"{p}: unsupported format '{fmt}' (expected {FORMAT})")
        for k in ("mean", "id_basis", "id_std", "exp_basis", "exp_std", "albedo_mean",
                  "albedo_basis", "albedo_std", "exp_lower"):
            if k in data and data[k].dtype.kind not in "fiu":
                raise ModelError(f"{p}: array '{k}' must be numeric; got {data[k].dtype}")
        for k in ("triangles", "landmarks68"):
            if data[k].dtype.kind not in "iu":
                raise ModelError(f"{p}: array '{k}' must be integer; got {data[k].dtype}")
        text = {k: str(data[k]) if k in data else "unknown" for k in _STRINGS}
        names = {k: tuple(str(s) for s in data[k]) for k in ("exp_names", "id_names")
                 if k in data}
        try:
            return cls(
                mean=data["mean"], id_basis=data["id_basis"], id_std=data["id_std"],
                exp_basis=data["exp_basis"], exp_std=data["exp_std"],
                triangles=data["triangles"], landmarks68=data["landmarks68"],
                albedo_mean=data.get("albedo_mean"), albedo_basis=data.get("albedo_basis"),
                albedo_std=data.get("albedo_std"),
                face_region=None if "face_region" not in data else data["face_region"] > 0,
                exp_lower=data.get("exp_lower"),
                **text, **names,
            )
        except ModelError as exc:
            raise ModelError(f"{p}: {exc}") from None

    def describe(self) -> str:
        """A human-readable summary (``faceps model info``)."""
        G = self.mean
        ext = G.max(0) - G.min(0)
        lines = [
            f"model       {self.name}",
            f"vertices    {self.n_vertices}",
            f"triangles   {self.n_triangles}",
            f"extent      {ext[0]:.1f} x {ext[1]:.1f} x {ext[2]:.1f} mm (x, y, z)",
            f"identity    {self.n_id} components"
            + (f" (std {self.id_std[0]:.3g} .. {self.id_std[-1]:.3g})" if self.n_id else ""),
            f"expression  {self.n_exp} components"
            + (f": {', '.join(self.exp_names[:8])}{' ...' if self.n_exp > 8 else ''}"
               if self.exp_names else ""),
            f"albedo      {'none' if not self.has_albedo else f'{self.n_albedo} components'}",
            f"landmarks   {int(self.landmark_valid.sum())} of 68 iBUG points",
            f"face region {int(self.region.sum())} vertices",
            f"license     {self.license}",
            f"source      {self.source}",
        ]
        return "\n".join(lines)
