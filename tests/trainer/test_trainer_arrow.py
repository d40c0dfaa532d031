"""Arrow values to and from numpy without pyarrow's pandas-importing conversions: the same
values as ``pa.array``, ``pa.scalar`` and ``to_numpy`` give, sliced arrays included."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from kontrast.trainer.data import arrow


@pytest.mark.parametrize("values", [np.arange(10, dtype=np.int64), np.arange(10, dtype=np.int32),
                                    np.linspace(0, 1, 10), np.arange(10) % 3 == 0])
def test_arrays_round_trip_as_pyarrow_converts_them(values):
    assert arrow.array(values).equals(pa.array(values))
    assert arrow.array(values[::2]).equals(pa.array(values[::2]))         # strided: made contiguous
    for sliced in (pa.array(values), pa.array(values).slice(3, 5)):       # an offset into the buffers
        got = arrow.to_numpy(sliced)
        assert got.dtype == sliced.to_numpy(zero_copy_only=False).dtype
        assert np.array_equal(got, sliced.to_numpy(zero_copy_only=False))
    assert np.array_equal(arrow.to_numpy(pa.chunked_array([values[:4], values[4:]])), values)
    empty = arrow.to_numpy(pa.chunked_array([], pa.from_numpy_dtype(values.dtype)))
    assert empty.dtype == values.dtype and len(empty) == 0


def test_strings_and_scalars_are_what_pyarrow_makes():
    words = ["", "a", "ünïcode", "pvc://claim/x.png"]
    assert arrow.strings(words).equals(pa.array(words, pa.large_string()))
    assert arrow.strings([]).equals(pa.array([], pa.large_string()))
    assert arrow.scalar("x").equals(pa.scalar("x", pa.large_string()))
    assert arrow.scalar(True).equals(pa.scalar(True))
    assert arrow.scalar(2.5).equals(pa.scalar(2.5))


def test_an_array_with_nulls_converts_as_to_numpy_does():
    values = pa.array([1.0, None, 3.0])
    assert np.array_equal(arrow.to_numpy(values), values.to_numpy(zero_copy_only=False), equal_nan=True)
