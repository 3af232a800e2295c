"""Pinhole camera in the OpenCV frame (x right, y down, z forward), millimetres.

Pixels are (u, v) = (column, row) with pixel centres at integer coordinates, so the
centre of the top-left pixel is (0, 0). Distortion coefficients follow OpenCV's
(k1, k2, p1, p2, k3); the pipeline undistorts images at ingest and works with
``distortion = 0`` afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from faceps.core.errors import ShapeError, check_finite, check_shape

__all__ = ["Camera", "project_torch"]


@dataclass(frozen=True)
class Camera:
    """Intrinsics of a pinhole camera.

    Attributes:
        K: (3, 3) float64 intrinsic matrix [[fx, 0, cx], [0, fy, cy], [0, 0, 1]] in pixels.
        image_size: (W, H) in pixels, the image size K belongs to.
        distortion: (D,) float64 OpenCV coefficients (k1, k2, p1, p2[, k3[, k4, k5, k6
            [, s1..s4[, tx, ty]]]]), D in {4, 5, 8, 12, 14}; zeros: none.
    """

    K: np.ndarray
    image_size: tuple[int, int]
    distortion: np.ndarray = field(default_factory=lambda: np.zeros(5))

    def __post_init__(self) -> None:
        K = np.asarray(self.K, dtype=np.float64)
        check_shape(K, "K", (3, 3))
        check_finite(K, "K")
        if K[0, 0] <= 0 or K[1, 1] <= 0:
            raise ShapeError(f"K must have positive focal lengths; got fx={K[0, 0]}, fy={K[1, 1]}")
        if not np.allclose(K[2], [0, 0, 1]):
            raise ShapeError(f"K's last row must be [0, 0, 1]; got {K[2].tolist()}")
        d = np.zeros(5) if self.distortion is None else np.asarray(self.distortion, np.float64)
        if d.ndim != 1 or d.size not in (4, 5, 8, 12, 14):
            raise ShapeError(f"expected distortion to have 4, 5, 8, 12 or 14 coefficients; "
                             f"got shape {d.shape}")
        check_finite(d, "distortion")
        if np.shape(self.image_size) != (2,):
            raise ShapeError(f"expected image_size to be (W, H); got {self.image_size!r}")
        W, H = (int(s) for s in self.image_size)
        if W <= 0 or H <= 0:
            raise ShapeError(f"image_size must be positive; got {self.image_size}")
        object.__setattr__(self, "K", K)
        object.__setattr__(self, "distortion", d)
        object.__setattr__(self, "image_size", (W, H))

    # ----------------------------------------------------------------- basics
    @property
    def width(self) -> int:
        return self.image_size[0]

    @property
    def height(self) -> int:
        return self.image_size[1]

    @property
    def has_distortion(self) -> bool:
        return bool(np.any(self.distortion != 0))

    @classmethod
    def from_fov(cls, image_size: tuple[int, int], fov_x_deg: float) -> Camera:
        """A centred camera with square pixels and the given horizontal field of view."""
        W, H = image_size
        f = 0.5 * W / np.tan(np.radians(fov_x_deg) / 2)
        K = np.array([[f, 0, (W - 1) / 2], [0, f, (H - 1) / 2], [0, 0, 1]])
        return cls(K, (W, H))

    def to_dict(self) -> dict:
        """The session's ``camera`` JSON object."""
        return {"K": self.K.tolist(), "image_size": list(self.image_size),
                "distortion": self.distortion.tolist()}

    # ------------------------------------------------------------- geometry
    def project(self, points: np.ndarray) -> np.ndarray:
        """Project camera-frame points to pixels (no distortion applied).

        Args:
            points: (..., 3) mm, camera frame, z > 0 in front of the camera.

        Returns:
            (..., 2) pixel coordinates (u, v), float64; NaN where z <= 0.
        """
        P = np.asarray(points, dtype=np.float64)
        check_shape(P, "points", (3,), leading=True)
        z = P[..., 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            u = self.K[0, 0] * P[..., 0] / z + self.K[0, 1] * P[..., 1] / z + self.K[0, 2]
            v = self.K[1, 1] * P[..., 1] / z + self.K[1, 2]
        uv = np.stack([u, v], axis=-1)
        uv[z <= 0] = np.nan
        return uv

    def pixel_grid(self) -> np.ndarray:
        """(H, W, 2) float64 pixel coordinates (u, v) of all pixel centres."""
        u, v = np.meshgrid(np.arange(self.width, dtype=np.float64),
                           np.arange(self.height, dtype=np.float64))
        return np.stack([u, v], axis=-1)

    def rays(self, uv: np.ndarray | None = None) -> np.ndarray:
        """Viewing rays through pixels with z = 1 (not unit length).

        Args:
            uv: (..., 2) pixel coordinates; default: all pixel centres, (H, W, 2).

        Returns:
            (..., 3) float64 directions (x/z, y/z, 1): a point at depth z is ``z * ray``.
        """
        if uv is None:
            uv = self.pixel_grid()
        uv = np.asarray(uv, dtype=np.float64)
        check_shape(uv, "uv", (2,), leading=True)
        Kinv = np.linalg.inv(self.K)
        homo = np.concatenate([uv, np.ones(uv.shape[:-1] + (1,))], axis=-1)
        return homo @ Kinv.T

    def unit_rays(self, uv: np.ndarray | None = None) -> np.ndarray:
        """Like :meth:`rays` but normalised to unit length."""
        r = self.rays(uv)
        return r / np.linalg.norm(r, axis=-1, keepdims=True)

    def backproject(self, depth: np.ndarray) -> np.ndarray:
        """Back-project a depth map (z in mm) to camera-frame points.

        Args:
            depth: (H, W) z values in mm; NaN marks no value.

        Returns:
            (H, W, 3) float64 points; NaN where depth is NaN.
        """
        D = np.asarray(depth, dtype=np.float64)
        check_shape(D, "depth", (self.height, self.width))
        return self.rays() * D[..., None]

    # ----------------------------------------------------------- resampling
    def scaled(self, image_size: tuple[int, int]) -> Camera:
        """The same camera for images resized to ``image_size`` (W, H).

        Pixel centres at integer coordinates: a pixel-centre position u maps to
        ``(u + 0.5) * s - 0.5``.
        """
        W, H = (int(s) for s in image_size)
        sx, sy = W / self.width, H / self.height
        K = self.K.copy()
        K[0, 0] *= sx
        K[0, 1] *= sx
        K[0, 2] = (K[0, 2] + 0.5) * sx - 0.5
        K[1, 1] *= sy
        K[1, 2] = (K[1, 2] + 0.5) * sy - 0.5
        return Camera(K, (W, H), self.distortion.copy())

    def strided(self, k: int) -> Camera:
        """The camera of ``image[::k, ::k]``: its pixel (u, v) is the pixel (k u, k v) of
        this one (pixel centres at integer coordinates), so maps rendered with it line up
        with the strided images exactly, without interpolation."""
        k = int(k)
        if k < 1:
            raise ShapeError(f"stride must be >= 1; got {k}")
        if k == 1:
            return self
        K = self.K.copy()
        K[:2] /= k
        size = (len(range(0, self.width, k)), len(range(0, self.height, k)))
        return Camera(K, size, self.distortion.copy())

    def cropped(self, x0: int, y0: int, width: int, height: int) -> Camera:
        """The camera of the crop ``[y0:y0+height, x0:x0+width]`` (K shifted)."""
        K = self.K.copy()
        K[0, 2] -= x0
        K[1, 2] -= y0
        return Camera(K, (int(width), int(height)), self.distortion.copy())

    def undistort_image(self, image: np.ndarray, interpolation: str = "linear") -> np.ndarray:
        """Remove lens distortion; the result belongs to this K with zero distortion.

        Args:
            image: (H, W) or (H, W, C) array of this camera's size.
            interpolation: ``linear`` or ``nearest`` (use nearest for masks).
        """
        import cv2

        img = np.asarray(image)
        check_shape(img, "image", (self.height, self.width) + ((img.shape[2],) if img.ndim == 3
                                                                 else ()))
        if not self.has_distortion:
            return img.copy()
        map1, map2 = cv2.initUndistortRectifyMap(self.K, self.distortion, None, self.K,
                                                 self.image_size, cv2.CV_32FC1)
        flag = cv2.INTER_LINEAR if interpolation == "linear" else cv2.INTER_NEAREST
        src = img.astype(np.float32) if img.dtype == np.float16 else img
        out = cv2.remap(src, map1, map2, flag, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        return out.astype(img.dtype, copy=False)

    def undistorted(self) -> Camera:
        """This camera with zero distortion (what :meth:`undistort_image` produces)."""
        return Camera(self.K.copy(), self.image_size)


def project_torch(points, K):
    """Torch perspective projection (differentiable).

    Args:
        points: (..., N, 3) camera-frame points in mm.
        K: (3, 3) or (..., 3, 3) intrinsics tensor broadcastable to the points' batch.

    Returns:
        (..., N, 2) pixel coordinates (u, v).
    """
    check_shape(points, "points", (None, 3), leading=True)
    proj = points @ K.transpose(-1, -2)
    return proj[..., :2] / proj[..., 2:3]
