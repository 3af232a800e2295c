"""Registered face scans as a source of training samples ("Light Stage" augmentation).

Paper section 3.3: a neutral model template is registered to each scan by non-rigid ICP
(:mod:`faceps.synth.register`); closest points give the correspondence through which
albedos reach the scan, and the fitted coefficients give the proxy. A :class:`ScanFace`
holds a scan moved into the model frame with everything rendering needs; rendered with a
random pose and lights it yields a sample whose ground truth is the scan surface and whose
proxy is the fitted model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

from faceps.core.atomic import save_npz
from faceps.core.camera import Camera
from faceps.core.errors import ModelError
from faceps.model.morphable import MorphableModel
from faceps.synth.faces import (
    FaceSample,
    RenderedFace,
    landmark_pixels,
    rasterize_proxy,
    render_meshes,
    wild_scene_for,
)
from faceps.synth.render import SensorConfig, ShadingConfig
from faceps.synth.wild import WildConfig

__all__ = ["ScanFace", "scan_face_from_registration", "render_scan", "FORMAT"]

FORMAT = "faceps.scanface/1"

#: scan vertices farther than this from the registered template (mm) are not face
REGION_DISTANCE = 5.0


@dataclass(frozen=True, eq=False)
class ScanFace:
    """A registered scan in the model frame.

    Attributes:
        name: label (the subject of the samples rendered from it).
        vertices: (N, 3) float64 scan vertices, model frame, mm.
        triangles: (M, 3) int64.
        colors: (N, 3) linear RGB in [0, 1] from the scan, or None.
        model_vertex: (N,) int64 model vertex closest to each scan vertex (through the
            registered template); albedo of the model reaches the scan through it.
        model_distance: (N,) float64 distance to that template vertex, mm.
        alpha_id, alpha_exp: fitted model coefficients (std units): the proxy.
        model_name: name of the model the scan was registered with.
        n_model_vertices: its vertex count (checked when rendering).
    """

    name: str
    vertices: np.ndarray
    triangles: np.ndarray
    colors: np.ndarray | None
    model_vertex: np.ndarray
    model_distance: np.ndarray
    alpha_id: np.ndarray
    alpha_exp: np.ndarray
    model_name: str
    n_model_vertices: int

    def save(self, path: str | os.PathLike) -> Path:
        arrays = {"format": np.array(FORMAT), "name": np.array(self.name),
                  "vertices": self.vertices, "triangles": self.triangles,
                  "model_vertex": self.model_vertex, "model_distance": self.model_distance,
                  "alpha_id": self.alpha_id, "alpha_exp": self.alpha_exp,
                  "model_name": np.array(self.model_name),
                  "n_model_vertices": np.array(self.n_model_vertices)}
        if self.colors is not None:
            arrays["colors"] = self.colors.astype(np.float32)
        return save_npz(path, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ScanFace:
        p = Path(path)
        if p.is_dir():
            p = p / "scan_face.npz"
        try:
            with np.load(p, allow_pickle=False) as z:
                if str(z["format"]) != FORMAT:
                    raise ModelError(f"{p}: not a {FORMAT} file")
                d = {k: z[k] for k in z.files}
        except ModelError:
            raise
        except (OSError, ValueError, KeyError, EOFError) as exc:
            raise ModelError(f"{p}: not a readable registered scan ({exc})") from None
        return cls(name=str(d["name"]), vertices=d["vertices"].astype(np.float64),
                   triangles=d["triangles"].astype(np.int64),
                   colors=d.get("colors"), model_vertex=d["model_vertex"].astype(np.int64),
                   model_distance=d["model_distance"].astype(np.float64),
                   alpha_id=d["alpha_id"].astype(np.float64),
                   alpha_exp=d["alpha_exp"].astype(np.float64),
                   model_name=str(d["model_name"]),
                   n_model_vertices=int(d["n_model_vertices"]))

    def check_model(self, model: MorphableModel) -> None:
        if model.n_vertices != self.n_model_vertices or model.name != self.model_name:
            raise ModelError(f"scan '{self.name}' was registered with model "
                             f"'{self.model_name}' ({self.n_model_vertices} vertices), not "
                             f"'{model.name}' ({model.n_vertices} vertices)")


def scan_face_from_registration(scan, registration, model: MorphableModel, name: str
                                ) -> ScanFace:
    """Move a registered scan into the model frame and link it to the model's vertices.

    Args:
        scan: the :class:`faceps.synth.register.Scan` that was registered.
        registration: the :class:`faceps.synth.register.Registration`.
        model: the model used for the registration.
        name: a label for the samples.
    """
    to_model = registration.similarity.inverse()
    verts = to_model.apply(np.asarray(scan.vertices, np.float64) * registration.scan_scale)
    template = to_model.apply(registration.vertices)
    dist, nearest = cKDTree(template).query(verts)
    return ScanFace(
        name=name, vertices=verts, triangles=np.asarray(scan.triangles, np.int64),
        colors=None if scan.colors is None else np.asarray(scan.colors, np.float32),
        model_vertex=np.asarray(registration.vertex_ids, np.int64)[nearest],
        model_distance=dist, alpha_id=np.asarray(registration.alpha_id, np.float64),
        alpha_exp=np.asarray(registration.alpha_exp, np.float64), model_name=model.name,
        n_model_vertices=model.n_vertices)


def render_scan(model: MorphableModel, scan: ScanFace, sample: FaceSample, camera: Camera, *,
                shading: ShadingConfig | None = None, sensor: SensorConfig | None = None,
                rng: np.random.Generator | None = None, with_proxy: bool = True,
                wild: WildConfig | None = None, n_wild: int = 1) -> RenderedFace:
    """Render a registered scan with the pose and lights of ``sample`` (or, with
    ``wild``, in the wild: ``n_wild`` images, as :func:`faceps.synth.faces.render_face`).

    The ground truth is the scan surface; the proxy is the model with the scan's fitted
    coefficients (``sample.coefficients`` only contributes the albedo when the scan has no
    colours, transferred through :attr:`ScanFace.model_vertex`).
    """
    scan.check_model(model)
    R, t = sample.rotation, np.asarray(sample.translation, np.float64)
    V = scan.vertices @ R.T + t
    if scan.colors is not None:
        albedo = np.asarray(scan.colors, np.float64)
    else:
        albedo_model = (model.albedo(sample.coefficients.albedo) if sample.albedo is None
                        else np.asarray(sample.albedo, np.float64))
        albedo = albedo_model[scan.model_vertex]
    region = (model.region[scan.model_vertex] & (scan.model_distance < REGION_DISTANCE)
              ).astype(np.float64)
    proxy = model.geometry(scan.alpha_id, scan.alpha_exp)
    proxy_cam = proxy @ R.T + t
    landmarks = landmark_pixels(model, proxy, R, t, camera)
    raster = scene = None
    if wild is not None:
        raster = rasterize_proxy(proxy_cam, model.triangles, camera)
        scene = wild_scene_for(rng, wild, n_wild, raster, camera, landmarks)
    return render_meshes(V, scan.triangles, albedo, region, proxy_cam, model.triangles,
                         landmarks, sample.lights, camera,
                         shading=shading, sensor=sensor, rng=rng, with_proxy=with_proxy,
                         timings={"detail": 0.0}, proxy=raster if with_proxy else None,
                         wild=scene)
