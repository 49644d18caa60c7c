"""Write PyTorch-format checkpoint files without torch, for test fixtures only.

``save_torch_zip`` writes the layout ``torch.save`` uses since torch 1.6 (a zip holding ``<name>/data.pkl``, pickled
with protocol 2, plus one ``<name>/data/<key>`` record of raw little-endian bytes per storage);
``save_torch_legacy`` writes the older stream format (``_use_new_zipfile_serialization=False``). Tensors are
reduced exactly as torch reduces them, to ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
requires_grad, OrderedDict())`` with the storage as a persistent id ``('storage', torch.FloatStorage, key, 'cpu',
numel)``. The torch globals are written as GLOBAL opcodes by name, so nothing is imported. Files from both writers
were checked once against ``torch.load(..., weights_only=True)`` of torch 2.13.

``reduce_pickle`` and ``save_zip_pickle`` build hostile files for the reader's refusal tests.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

_STORAGE_NAMES = {
    np.dtype(np.float64): "DoubleStorage",
    np.dtype(np.float32): "FloatStorage",
    np.dtype(np.float16): "HalfStorage",
    np.dtype(ml_dtypes.bfloat16): "BFloat16Storage",
    np.dtype(np.int64): "LongStorage",
    np.dtype(np.int32): "IntStorage",
    np.dtype(np.int16): "ShortStorage",
    np.dtype(np.int8): "CharStorage",
    np.dtype(np.uint8): "ByteStorage",
    np.dtype(np.bool_): "BoolStorage",
}
# dtypes torch >= 2.1 saves as an UntypedStorage of bytes plus a dtype argument (_rebuild_tensor_v3).
_V3_DTYPE_NAMES = {
    np.dtype(ml_dtypes.float8_e4m3fn): "float8_e4m3fn",
    np.dtype(ml_dtypes.float8_e5m2): "float8_e5m2",
    np.dtype(np.uint16): "uint16",
    np.dtype(np.uint32): "uint32",
    np.dtype(np.uint64): "uint64",
}
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


@dataclass(frozen=True)
class Global:
    """A pickle global written by name (``GLOBAL module name``), without importing it."""

    module: str
    name: str

    def __call__(self, *args: Any) -> Any:  # pickle's save_reduce insists the function be callable
        raise TypeError("a stand-in for a pickle global; never called")


@dataclass(frozen=True, eq=False)
class StorageView:
    """A tensor viewing a 1-D ``storage`` array at element ``offset`` with ``shape`` and ``stride`` (elements).

    Views that share one storage array are saved with one storage record, as torch does for views.
    """

    storage: np.ndarray
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


@dataclass(eq=False)
class _Storage:
    key: str
    data: np.ndarray  # 1-D, little-endian


@dataclass(eq=False)
class _Tensor:
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    parameter: bool

    def __reduce_ex__(self, protocol: int) -> tuple:
        dtype = self.storage.data.dtype
        args: tuple = (self.storage, self.offset, self.shape, self.stride, False, collections.OrderedDict())
        if dtype in _V3_DTYPE_NAMES:
            tensor = (Global("torch._utils", "_rebuild_tensor_v3"), args + (Global("torch", _V3_DTYPE_NAMES[dtype]),))
        else:
            tensor = (Global("torch._utils", "_rebuild_tensor_v2"), args)
        if not self.parameter:
            return tensor
        requires_grad = dtype.kind in "fcV"  # torch allows gradients on floating dtypes only (ml_dtypes are "V")
        return Global("torch._utils", "_rebuild_parameter"), (
            _Reduced(tensor),
            requires_grad,
            collections.OrderedDict(),
        )


@dataclass(eq=False)
class _Reduced:
    """Any object pickled as ``func(*args)``."""

    reduced: tuple

    def __reduce_ex__(self, protocol: int) -> tuple:
        return self.reduced


class _Pickler(pickle._Pickler):  # the pure-Python pickler, so a dispatch entry can write GLOBAL by hand
    dispatch = dict(pickle._Pickler.dispatch)

    def __init__(self, file: io.BytesIO, *, legacy: bool) -> None:
        super().__init__(file, protocol=2)
        self.legacy = legacy

    def save_stand_in(self, obj: Global) -> None:
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)

    dispatch[Global] = save_stand_in

    def persistent_id(self, obj: Any) -> tuple | None:
        if not isinstance(obj, _Storage):
            return None
        dtype = obj.data.dtype
        if dtype in _V3_DTYPE_NAMES:
            storage_type, numel = Global("torch.storage", "UntypedStorage"), obj.data.nbytes
        else:
            storage_type, numel = Global("torch", _STORAGE_NAMES[dtype]), obj.data.size
        pid = ("storage", storage_type, obj.key, "cpu", numel)
        return pid + (None,) if self.legacy else pid


def _to_tensors(obj: Any, storages: dict[int, _Storage], parameters: bool) -> Any:
    """Replace arrays and StorageViews in a tree of dicts/lists/tuples by tensors on numbered storages."""

    def storage_of(array: np.ndarray) -> _Storage:
        if id(array) not in storages:
            data = np.ascontiguousarray(array).reshape(-1)
            if data.dtype.byteorder == ">":
                data = data.astype(data.dtype.newbyteorder("<"))
            storages[id(array)] = _Storage(str(len(storages)), data)
        return storages[id(array)]

    if isinstance(obj, StorageView):
        return _Tensor(storage_of(obj.storage), obj.offset, tuple(obj.shape), tuple(obj.stride), parameters)
    if isinstance(obj, np.ndarray):
        shape = obj.shape
        strides, acc = [], 1
        for d in reversed(shape):
            strides.append(acc)
            acc *= max(d, 1)
        return _Tensor(storage_of(obj), 0, shape, tuple(reversed(strides)), parameters)
    if isinstance(obj, Mapping):
        return type(obj)((k, _to_tensors(v, storages, parameters)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_tensors(v, storages, parameters) for v in obj)
    return obj


def _pickle(obj: Any, *, legacy: bool) -> bytes:
    buf = io.BytesIO()
    _Pickler(buf, legacy=legacy).dump(obj)
    return buf.getvalue()


def save_torch_zip(
    path: str | Path, obj: Any, *, archive_name: str = "archive", parameters: bool = False, byteorder: str = "little"
) -> Path:
    """Write ``obj`` (e.g. ``{name: np.ndarray | StorageView}``) as ``torch.save`` does; arrays become tensors.

    ``parameters=True`` wraps every tensor as ``torch.nn.Parameter`` (``_rebuild_parameter``). ``byteorder='big'``
    writes the storages big-endian and says so, as torch does on a big-endian machine.
    """
    storages: dict[int, _Storage] = {}
    data_pkl = _pickle(_to_tensors(obj, storages, parameters), legacy=False)
    records = {}
    for storage in storages.values():
        data = storage.data
        if byteorder == "big" and data.dtype.itemsize > 1:
            data = data.view(f"u{data.dtype.itemsize}").byteswap()
        records[f"data/{storage.key}"] = data.tobytes()
    return save_zip_pickle(path, data_pkl, records, archive_name=archive_name, byteorder=byteorder)


def save_zip_pickle(
    path: str | Path,
    data_pkl: bytes,
    records: Mapping[str, bytes] | None = None,
    *,
    archive_name: str = "archive",
    byteorder: str = "little",
) -> Path:
    """A torch zip archive around an arbitrary ``data.pkl`` (and extra records, named relative to the archive)."""
    path = Path(path)
    entries = {
        "data.pkl": data_pkl,
        ".format_version": b"1",
        ".storage_alignment": b"64",
        "byteorder": byteorder.encode(),
        **(records or {}),
        "version": b"3\n",
        ".data/serialization_id": b"0" * 40,
    }
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in entries.items():
            zf.writestr(f"{archive_name}/{name}", data)
    return path


def save_torch_legacy(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` in the pre-1.6 ``torch.save`` stream format (``_use_new_zipfile_serialization=False``)."""
    path = Path(path)
    storages: dict[int, _Storage] = {}
    main = _pickle(_to_tensors(obj, storages, parameters=False), legacy=True)
    if any(s.data.dtype in _V3_DTYPE_NAMES for s in storages.values()):
        raise ValueError("the legacy format has no float8/uint16/uint32/uint64 storages")
    keys = sorted(s.key for s in storages.values())
    by_key = {s.key: s for s in storages.values()}
    sys_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}
    with open(path, "wb") as f:
        for header in (LEGACY_MAGIC, 1001, sys_info):
            f.write(pickle.dumps(header, protocol=2))
        f.write(main)
        f.write(pickle.dumps(keys, protocol=2))
        for key in keys:
            data = by_key[key].data
            f.write(struct.pack("<q", data.size))
            f.write(data.tobytes())
    return path


def reduce_pickle(module: str, name: str, args: tuple, *, wrap_in_state_dict: bool = True) -> bytes:
    """A protocol-2 pickle that calls ``module.name(*args)`` on load (GLOBAL + REDUCE): a hostile payload.

    With ``wrap_in_state_dict`` the call sits inside ``{"weight": ...}``, where a state dict would hold a tensor.
    """
    call = _Reduced((Global(module, name), args))
    return _pickle({"weight": call} if wrap_in_state_dict else call, legacy=False)


def stack_global_pickle(module: str, name: str, arg: str) -> bytes:
    """A protocol-4 pickle calling ``module.name(arg)`` through STACK_GLOBAL (the opcode protocol >= 4 uses)."""

    def unicode(s: str) -> bytes:
        raw = s.encode()
        return pickle.SHORT_BINUNICODE + bytes([len(raw)]) + raw

    return (
        pickle.PROTO
        + b"\x04"
        + unicode(module)
        + unicode(name)
        + pickle.STACK_GLOBAL
        + unicode(arg)
        + pickle.TUPLE1
        + pickle.REDUCE
        + pickle.STOP
    )


def inst_pickle(module: str, name: str, arg: str) -> bytes:
    """A protocol-0 pickle calling ``module.name(arg)`` through the INST opcode (no GLOBAL at all)."""
    return (
        pickle.MARK + pickle.UNICODE + arg.encode("raw-unicode-escape") + b"\n" + f"i{module}\n{name}\n".encode() + b"."
    )
