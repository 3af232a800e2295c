"""Optimisation: near-light photometric stereo (baseline), and later proxy fitting, the
normal/albedo update of the method and height-field recovery."""

from faceps.optimize.nearlight import (
    NearLightResult,
    angular_error_deg,
    nearlight_least_squares,
    normal_stats,
)

__all__ = ["NearLightResult", "nearlight_least_squares", "angular_error_deg", "normal_stats"]
