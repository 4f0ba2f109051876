import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from common.geometry import box_corners, global_to_local, local_to_global, rotate_vectors, wrap_angle

coord = st.floats(-1e4, 1e4, allow_nan=False)
angle = st.floats(-10, 10, allow_nan=False)


@settings(max_examples=50, deadline=None)
@given(coord, coord, angle, coord, coord, angle)
def test_local_global_round_trip(x0, y0, h0, x, y, h):
    origin = np.array([x0, y0, h0])
    pose = np.array([[x, y, h]])
    back = local_to_global(global_to_local(pose, origin), origin)
    np.testing.assert_allclose(back[:, :2], pose[:, :2], atol=1e-6)
    assert abs(wrap_angle(back[0, 2] - h)) < 1e-9
    # distances are preserved
    np.testing.assert_allclose(np.hypot(*global_to_local(pose, origin)[0, :2]), math.hypot(x - x0, y - y0), rtol=1e-9, atol=1e-6)


def test_known_transform_and_rotation():
    np.testing.assert_allclose(global_to_local(np.array([[0.0, 5.0]]), np.array([0.0, 0.0, math.pi / 2])), [[5.0, 0.0]], atol=1e-12)
    np.testing.assert_allclose(rotate_vectors(np.array([1.0, 0.0]), math.pi / 2), [0.0, 1.0], atol=1e-12)
    assert wrap_angle(3 * math.pi) == -math.pi


def test_box_corners_order_and_values():
    c = box_corners(1.0, 2.0, math.pi / 2, 4.0, 2.0)
    # heading north: front is +y, left is -x
    np.testing.assert_allclose(c, [[0.0, 4.0], [2.0, 4.0], [2.0, 0.0], [0.0, 0.0]], atol=1e-12)
    assert box_corners(np.zeros(3), np.zeros(3), np.zeros(3), 1.0, 1.0).shape == (3, 4, 2)
