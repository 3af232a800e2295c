import numpy as np
import pytest

from faceps.core import FacepsError, SessionError, ShapeError, check_shape


def test_check_shape_binds_and_names():
    a = np.zeros((4, 5, 3))
    assert check_shape(a, "a", ("H", "W", 3)) == {"H": 4, "W": 5}
    msg = r"expected normals to have shape \(H, W, 3\); got \(4, 5, 2\)"
    with pytest.raises(ShapeError, match=msg):
        check_shape(np.zeros((4, 5, 2)), "normals", ("H", "W", 3))
    with pytest.raises(ShapeError, match="consistent 'N'"):
        check_shape(np.zeros((3, 4)), "m", ("N", "N"))
    check_shape(np.zeros((2, 7, 3)), "pts", (3,), leading=True)
    with pytest.raises(ShapeError):
        check_shape([1, 2, 3], "lst", (3,))


def test_session_error_names_file_and_field():
    e = SessionError("must be 3x3", path="/x/session.json", field="camera.K")
    assert str(e) == "/x/session.json: field 'camera.K': must be 3x3"
    assert isinstance(e, FacepsError)
