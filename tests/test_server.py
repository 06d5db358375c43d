"""Server-side reply checks: what is left out of aggregation, and why."""

import numpy as np
import pytest
from flwr.app import Array

from fedimb.server import _float_view


@pytest.mark.parametrize(
    "array",
    [
        np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32),
        np.full((), 3.0),
        np.array([1.0, np.nan, 2.0], dtype=np.float16),
        np.asfortranarray(np.random.default_rng(1).normal(size=(5, 2))),
        np.array([np.inf], dtype=np.float64),
    ],
)
def test_float_view_reads_the_serialised_values_in_place(array):
    view = _float_view(Array(array))
    assert view.size == array.size
    assert np.isfinite(view).all() == np.isfinite(array).all()
    np.testing.assert_array_equal(np.sort(view.ravel()), np.sort(array.ravel()))


def test_float_view_skips_integer_arrays():
    assert _float_view(Array(np.arange(4))) is None
