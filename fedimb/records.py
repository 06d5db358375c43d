"""Flower records of client weights that skip serialisation until something needs it.

A Flower :class:`~flwr.app.Array` holds its values as ``.npy`` bytes. In the in-process
engine nothing ever leaves the process, yet building each reply's bytes (``np.save``)
and reading them back in the strategy (``np.load``) copies every client's weights
several times per round, which costs more than training a small CNN on a GPU. A
:class:`TensorArray` is an ``Array`` that keeps a host ndarray instead: ``numpy()``
copies it once, and the ``.npy`` bytes are built only when ``data`` is first read (the
Ray engine's transport, ``object_id``, equality, pickling), so every consumer still sees
a standard ``Array``.
"""

from __future__ import annotations

import math
from io import BytesIO
from typing import Any, TypeVar

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict

R = TypeVar("R")

_FIELDS = ("dtype", "shape", "stype", "data")
_NUMPY = "numpy.ndarray"


_DTYPE_NAMES: dict[np.dtype, str] = {}


def _dtype_name(dtype: np.dtype) -> str:
    """``str(dtype)``, remembered: numpy builds the name anew each time (tens of us)."""
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = str(dtype)
    return name


class TensorArray(Array):
    """An ``Array`` whose ``.npy`` bytes are made from a host ndarray on first use.

    Parameters
    ----------
    values : numpy.ndarray or torch.Tensor
        The values; a CPU tensor is shared, not copied. They must not change afterwards.
    finite : bool or None
        Whether every value is finite, if the producer already knows (e.g. checked on
        the GPU before the copy to the host); None: unknown.
    """

    def __init__(self, values: np.ndarray | torch.Tensor, finite: bool | None = None) -> None:
        if isinstance(values, torch.Tensor):
            values = values.detach()
            ndarray = (values if values.device.type == "cpu" else values.cpu()).numpy()
        else:
            ndarray = values
        # Base fields written directly: Array.__setattr__ would mark the object dirty and
        # its __init__ insists on bytes.
        self.__dict__.update(
            dtype=_dtype_name(ndarray.dtype),
            shape=tuple(ndarray.shape),
            stype=_NUMPY,
            _values=ndarray,
            _finite=finite,
        )

    def __getattr__(self, name: str) -> Any:
        # Only called for attributes not set yet: ``data`` until first read.
        if name == "data":
            buffer = BytesIO()
            np.save(buffer, self.__dict__["_values"], allow_pickle=False)
            self.__dict__["data"] = buffer.getvalue()
            return self.__dict__["data"]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _FIELDS and "_values" in self.__dict__:
            # New bytes or metadata from outside: the ndarray no longer describes them.
            if name != "data":
                self.__getattr__("data")  # keep the bytes the ndarray stood for
            del self.__dict__["_values"]
        super().__setattr__(name, value)

    @property
    def known_finite(self) -> bool:
        """True when the values are known to be finite (and were not replaced since)."""
        return self.__dict__.get("_finite") is True and "_values" in self.__dict__

    def values(self) -> np.ndarray | None:
        """The backing ndarray, read-only (None once the bytes were replaced)."""
        ndarray = self.__dict__.get("_values")
        if ndarray is None:
            return None
        view = ndarray.view()
        view.flags.writeable = False
        return view

    def numpy(self) -> np.ndarray:
        """A fresh, writable copy of the values, as ``Array.numpy()`` returns."""
        ndarray = self.__dict__.get("_values")
        return super().numpy() if ndarray is None else ndarray.copy()

    def __eq__(self, other: object) -> bool:
        # The dataclass's own __eq__ only compares objects of the very same class.
        if not isinstance(other, Array):
            return NotImplemented
        return all(getattr(self, f) == getattr(other, f) for f in _FIELDS)

    __hash__ = None  # type: ignore[assignment]  # mutable, like Array

    def deflate(self) -> bytes:
        """Flower's wire form, byte for byte that of the equal plain ``Array``."""
        return self.as_array().deflate()

    def as_array(self) -> Array:
        """This array as a plain Flower ``Array`` (builds the bytes)."""
        return Array(self.dtype, self.shape, self.stype, self.data)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Pickle (Ray, checkpoints, deepcopy) as a plain Array: no fedimb class needed
        # on the other side.
        return self.as_array().__reduce__()


def array_nbytes(array: Array) -> int:
    """Bytes of an ``Array``'s values, from its dtype and shape (no bytes read)."""
    return math.prod(array.shape) * np.dtype(array.dtype).itemsize


_NPY_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


def values_view(array: Array) -> np.ndarray:
    """The values of ``array``, read-only, without copying them where possible.

    A :class:`TensorArray`'s own host array; a numpy-serialised ``Array``'s values read
    in place from its ``.npy`` bytes (``Array.numpy()`` parses the same header, then
    copies); anything else through ``Array.numpy()``.
    """
    if isinstance(array, TensorArray) and (values := array.values()) is not None:
        return values
    if array.stype != _NUMPY:
        return array.numpy()
    data = array.data
    stream = BytesIO(data)
    version = np.lib.format.read_magic(stream)
    read_header = _NPY_HEADER_READERS.get(version)
    if read_header is None:  # a newer .npy version: let numpy read it
        return array.numpy()
    shape, fortran_order, dtype = read_header(stream)
    values = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=stream.tell())
    return values.reshape(shape, order="F" if fortran_order else "C")


def record_of(content: RecordDict, key: str, kind: type[R]) -> R | None:
    """``content[key]`` if it is a record of type ``kind``, else None.

    What ``content.array_records.get(key)`` (or ``metric_records``) returns, without
    the view: Flower rebuilds such a view from every record at each access, and it is in
    a reference cycle, so it keeps the message alive until the cyclic collector runs.
    """
    value = content.get(key)
    return value if isinstance(value, kind) else None


def state_record(state: dict[str, torch.Tensor], finite: bool | None = None) -> ArrayRecord:
    """An ``ArrayRecord`` of ``state`` (tensors, any device) backed by host memory.

    ``finite``: whether all of ``state`` is known to be finite (None: unknown).
    """
    record = ArrayRecord()  # ArrayRecord(dict) would copy every Array into a plain one
    arrays = {name: TensorArray(tensor, finite=finite) for name, tensor in state.items()}
    data = record.__dict__.get("_data")
    if isinstance(data, dict) and all(isinstance(name, str) for name in arrays):
        # What ``record[name] = array`` stores, without its per-item type checks (both
        # hold by construction): a fifth of a small model's reply time.
        data.update(arrays)
    else:
        for name, array in arrays.items():
            record[name] = array
    return record
