"""Shared math and types: camera, lights and the imaging model, rotations, colour,
mesh helpers, errors, image reading and atomic writes.

Every convention of ``docs/conventions.md`` has its one implementation here.
"""

from faceps.core.atomic import atomic_path, save_json, save_npy, save_npz, save_ply, save_png
from faceps.core.camera import Camera, project_torch
from faceps.core.color import decode, encode, linear_to_srgb, parse_encoding, srgb_to_linear
from faceps.core.errors import (
    ConfigError,
    DatasetError,
    FacepsError,
    FitError,
    ModelError,
    SessionError,
    ShapeError,
    check_finite,
    check_shape,
)
from faceps.core.imageio import ImageReadError, normals_to_rgb, read_image, to_uint8
from faceps.core.lights import (
    DirectionalLights,
    PointLights,
    point_irradiance,
    point_irradiance_torch,
    shade_directional,
    shade_point,
    shade_point_torch,
)
from faceps.core.mesh import (
    face_normals,
    face_normals_torch,
    triangle_neighbors,
    triangle_one_ring,
    vertex_adjacency,
    vertex_normals,
    vertex_normals_torch,
)
from faceps.core.rotation import (
    MODEL_TO_CAMERA,
    euler_to_matrix,
    euler_to_matrix_torch,
    matrix_to_euler,
    pose_rotation,
    pose_rotation_torch,
    pose_to_euler,
)

__all__ = [
    "Camera", "project_torch",
    "PointLights", "DirectionalLights", "point_irradiance", "shade_point", "shade_directional",
    "point_irradiance_torch", "shade_point_torch",
    "euler_to_matrix", "matrix_to_euler", "pose_rotation", "pose_to_euler",
    "euler_to_matrix_torch", "pose_rotation_torch", "MODEL_TO_CAMERA",
    "srgb_to_linear", "linear_to_srgb", "decode", "encode", "parse_encoding",
    "face_normals", "vertex_normals", "triangle_neighbors", "triangle_one_ring",
    "vertex_adjacency", "face_normals_torch", "vertex_normals_torch",
    "FacepsError", "SessionError", "ModelError", "ShapeError", "DatasetError", "ConfigError",
    "FitError", "check_shape", "check_finite",
    "atomic_path", "save_npy", "save_npz", "save_json", "save_png", "save_ply",
    "read_image", "ImageReadError", "to_uint8", "normals_to_rgb",
]
