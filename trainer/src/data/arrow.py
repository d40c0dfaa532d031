"""Arrow arrays and scalars to and from numpy and Python values without ``pa.array``,
``pa.scalar`` or ``Array.to_numpy``.

Those import pandas wherever it is installed (the first two ask whether the value is a pandas
object, and every ``pyarrow.compute`` call given a numpy array or a Python value converts it
with them; ``to_numpy`` goes through Arrow's pandas conversion): 0.13 s, a fifth of
``kontrast train --check`` on a small file, for nothing the trainer uses. These work on the
buffers instead.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pyarrow as pa


def array(values: np.ndarray) -> pa.Array:
    """A 1-D numpy array of numbers (no copy) or booleans (bit-packed, as Arrow holds them)."""
    values = np.ascontiguousarray(values)
    if values.dtype == np.bool_:
        bits = np.packbits(values, bitorder="little")
        return pa.Array.from_buffers(pa.bool_(), len(values), [None, pa.py_buffer(bits)])
    return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), len(values), [None, pa.py_buffer(values)])


def strings(values: Sequence[str]) -> pa.Array:
    """Python strings as a large string array."""
    encoded = [v.encode("utf-8") for v in values]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    return pa.Array.from_buffers(pa.large_string(), len(encoded),
                                 [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(encoded))])


def scalar(value: str | bool | float) -> pa.Scalar:
    """A large string, boolean or float64 scalar (the types the data checks compare with)."""
    if isinstance(value, str):
        return strings([value])[0]
    return array(np.array([value]))[0]


def to_numpy(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Numbers as a read-only numpy view, booleans unpacked (a copy); ``to_numpy`` for the rare
    array with nulls."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if values.null_count:
        return values.to_numpy(zero_copy_only=False)
    if not len(values):       # an empty array may have no data buffer
        return np.zeros(0, dtype=values.type.to_pandas_dtype())
    data = values.buffers()[1]
    if pa.types.is_boolean(values.type):
        bits = np.unpackbits(np.frombuffer(data, np.uint8), count=values.offset + len(values), bitorder="little")
        return bits[values.offset:].astype(bool)
    return np.frombuffer(data, values.type.to_pandas_dtype(), count=len(values), offset=values.offset * values.type.bit_width // 8)
