"""Optimisation: proxy fitting and light calibration, the normal/albedo update of the
method (eq. 5-6), height-field recovery (eq. 7) and integration baselines, the
reconstruction pipeline, and the classic per-pixel photometric-stereo baselines."""

from faceps.optimize.nearlight import (
    NearLightResult,
    angular_error_deg,
    distant_light_least_squares,
    nearlight_least_squares,
    normal_stats,
)

__all__ = ["NearLightResult", "nearlight_least_squares", "distant_light_least_squares",
           "angular_error_deg", "normal_stats"]
