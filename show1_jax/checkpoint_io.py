"""Read released checkpoint files (safetensors and PyTorch ``.bin``) into numpy, lazily and safely.

Checkpoints come from strangers, and a ``.bin`` file is a pickle: loading one with ``pickle.load`` or
``torch.load(weights_only=False)`` runs whatever code it names. This module never does. It parses safetensors
headers itself and rebuilds PyTorch tensors with a restricted unpickler that knows only the handful of globals
``torch.save`` writes for a state dict; any other global is refused before it is called. PyTorch is never imported.

Layouts handled (SPEC §5.6): a component folder as diffusers or transformers release it, with plain or variant
(``.fp16``) files, single or sharded (``*.index.json``), or one weight file given directly.

    with open_state_dict("show-1-base/unet", variant="fp16") as sd:
        for key in sd:
            array = sd.get(key)  # reads just this tensor
"""

from __future__ import annotations

import abc
import collections
import json
import math
import pickle
import struct
import threading
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

__all__ = [
    "CheckpointError",
    "MissingKeyError",
    "StateDictReader",
    "list_weight_files",
    "open_state_dict",
]


class CheckpointError(ValueError):
    """A checkpoint file or folder cannot be read; the message names the file and the fix."""


class MissingKeyError(CheckpointError, KeyError):
    """A key asked of a :class:`StateDictReader` is not in its files."""

    __str__ = BaseException.__str__  # KeyError would quote the whole message


# ----------------------------------------------------------------------------------------------------------------
# dtypes

_SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16),
    "I16": np.dtype(np.int16),
    "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32),
    "U64": np.dtype(np.uint64),
    "I64": np.dtype(np.int64),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "C64": np.dtype(np.complex64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}

# torch.<Name>Storage classes as torch.save names them in a pickle; each marks the dtype of its storage.
_TORCH_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
    "UntypedStorage": np.dtype(np.uint8),  # bytes; the tensor's dtype comes from _rebuild_tensor_v3
}

# torch.<dtype> globals (the dtype argument of _rebuild_tensor_v3, used for float8 and uint16/32/64).
_TORCH_DTYPES: dict[str, np.dtype] = {
    "float64": np.dtype(np.float64),
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int16": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "uint16": np.dtype(np.uint16),
    "uint32": np.dtype(np.uint32),
    "uint64": np.dtype(np.uint64),
    "bool": np.dtype(np.bool_),
    "complex64": np.dtype(np.complex64),
    "complex128": np.dtype(np.complex128),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
    "float8_e4m3fnuz": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "float8_e5m2fnuz": np.dtype(ml_dtypes.float8_e5m2fnuz),
}


def _byteswapped(buf: np.ndarray) -> np.ndarray:
    """A big-endian buffer converted to native (little-endian) order, same dtype."""
    dtype = buf.dtype
    if dtype.itemsize == 1:
        return buf
    if dtype.kind in "biufc":
        return buf.view(dtype.newbyteorder(">")).astype(dtype)
    # ml_dtypes floats (bfloat16) have no byte-order variants: swap the raw 16-bit words.
    return buf.view(f"u{dtype.itemsize}").byteswap().view(dtype)


# ----------------------------------------------------------------------------------------------------------------
# file sources: one open weight file each


@dataclass(frozen=True)
class _Entry:
    shape: tuple[int, ...]
    dtype: np.dtype


class _Source(abc.ABC):
    """One open weight file: its tensors' shapes and dtypes, and a way to read one tensor."""

    path: Path
    entries: dict[str, _Entry]  # in file order

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries = {}
        self._file: BinaryIO | None = open(path, "rb")  # noqa: SIM115 (closed by close())
        self._size = path.stat().st_size
        self._lock = threading.Lock()

    @abc.abstractmethod
    def read(self, key: str) -> np.ndarray:
        """One tensor, read from the file."""

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _read_bytes(self, start: int, nbytes: int) -> np.ndarray:
        """``nbytes`` raw bytes at ``start`` as a fresh uint8 array (one copy, no whole-file read)."""
        if self._file is None:
            raise CheckpointError(f"{self.path}: the reader was closed; reopen it with open_state_dict()")
        if start + nbytes > self._size:
            raise CheckpointError(
                f"{self.path}: file is truncated (expected at least {start + nbytes} bytes, found {self._size}): "
                "re-download it"
            )
        buf = np.empty(nbytes, np.uint8)
        with self._lock:
            self._file.seek(start)
            got = self._file.readinto(memoryview(buf))
        if got != nbytes:
            raise CheckpointError(
                f"{self.path}: file is truncated (read {got} of {nbytes} bytes at offset {start}): re-download it"
            )
        return buf


class _SafetensorsSource(_Source):
    """A ``.safetensors`` file: 8-byte little-endian header length, JSON header, then the tensor bytes.

    The header is parsed here rather than through ``safetensors.safe_open``: that gives the same bytes for every
    dtype (``safe_open(framework="numpy")`` cannot return bfloat16 in older safetensors releases) and lets a
    truncated download be named as such.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        try:
            self._parse_header()
        except BaseException:
            self.close()
            raise

    def _parse_header(self) -> None:
        assert self._file is not None
        head = self._file.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{self.path}: file is truncated ({self._size} bytes, no header): re-download it")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > self._size - 8:
            raise CheckpointError(
                f"{self.path}: corrupt or truncated safetensors header (it declares {header_len} header bytes, "
                f"the file has {self._size}): re-download it"
            )
        raw = self._file.read(header_len)
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_pairs)
        except (UnicodeDecodeError, json.JSONDecodeError, _DuplicateKeyError) as e:
            raise CheckpointError(f"{self.path}: corrupt safetensors header ({e}): re-download it") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (not a JSON object): re-download it")
        self.metadata = header.pop("__metadata__", None)
        self._data_start = 8 + header_len
        self._offsets: dict[str, int] = {}
        spans = []
        for key, info in header.items():
            entry, begin, end = self._check_entry(key, info)
            spans.append((begin, end, key, entry))
        data_len = max((end for _, end, _, _ in spans), default=0)
        if self._data_start + data_len > self._size:
            raise CheckpointError(
                f"{self.path}: file is truncated (expected {self._data_start + data_len} bytes, found {self._size}): "
                "re-download it"
            )
        spans.sort(key=lambda s: s[0])  # file order; sort is stable for empty tensors sharing an offset
        last_end = 0
        for begin, end, key, entry in spans:
            if begin < last_end:
                raise CheckpointError(f"{self.path}: corrupt safetensors header (tensor `{key}` overlaps another)")
            last_end = max(last_end, end)
            self.entries[key] = entry
            self._offsets[key] = self._data_start + begin

    def _check_entry(self, key: str, info: Any) -> tuple[_Entry, int, int]:
        bad = f"{self.path}: corrupt safetensors header entry `{key}`"
        if not isinstance(info, dict) or {"dtype", "shape", "data_offsets"} - info.keys():
            raise CheckpointError(f"{bad} ({info!r}): re-download it")
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(
                f"{self.path}: tensor `{key}` has dtype {info['dtype']}, which this reader does not support "
                f"(supported: {', '.join(_SAFETENSORS_DTYPES)}); convert it to float32/float16/bfloat16"
            )
        shape, offsets = info["shape"], info["data_offsets"]
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise CheckpointError(f"{bad} (shape {shape!r}): re-download it")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise CheckpointError(f"{bad} (data_offsets {offsets!r}): re-download it")
        begin, end = offsets
        if not 0 <= begin <= end or end - begin != math.prod(shape) * dtype.itemsize:
            raise CheckpointError(
                f"{bad} (data_offsets {offsets} do not hold shape {tuple(shape)} of {info['dtype']}): re-download it"
            )
        return _Entry(tuple(shape), dtype), begin, end

    def read(self, key: str) -> np.ndarray:
        entry = self.entries[key]
        nbytes = math.prod(entry.shape) * entry.dtype.itemsize
        return self._read_bytes(self._offsets[key], nbytes).view(entry.dtype).reshape(entry.shape)


class _DuplicateKeyError(ValueError):
    pass


def _no_duplicate_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKeyError(f"key `{k}` appears twice")
        out[k] = v
    return out


# ----------------------------------------------------------------------------------------------------------------
# PyTorch pickles: a restricted unpickler that builds references to tensor bytes, never the tensors themselves


@dataclass(frozen=True)
class _StorageType:
    """Stand-in for a ``torch.*Storage`` class global: only marks a dtype."""

    name: str
    dtype: np.dtype


@dataclass(frozen=True)
class _TorchDtype:
    """Stand-in for a ``torch.<dtype>`` global."""

    name: str
    dtype: np.dtype


@dataclass(frozen=True)
class _Storage:
    """A storage record: ``numel`` elements of ``dtype`` in record ``key``."""

    key: str
    dtype: np.dtype
    numel: int


@dataclass(frozen=True)
class _TensorRef:
    """Where a tensor's elements are: a (possibly strided) view of a storage."""

    storage: _Storage
    dtype: np.dtype
    offset: int  # in elements of dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]


class _UnsafePickle(Exception):
    """Raised inside the unpickler; turned into a CheckpointError that names the file."""


def _int_tuple(x: Any, what: str) -> tuple[int, ...]:
    if not (isinstance(x, tuple) and all(isinstance(i, int) and not isinstance(i, bool) for i in x)):
        raise _UnsafePickle(f"tensor {what} is {x!r}, not a tuple of ints")
    return x


def _tensor_ref(storage: Any, offset: Any, size: Any, stride: Any, dtype: np.dtype) -> _TensorRef:
    if not isinstance(storage, _Storage):
        raise _UnsafePickle(f"tensor storage is {type(storage).__name__}, not a storage record")
    if not isinstance(offset, int) or offset < 0:
        raise _UnsafePickle(f"tensor storage offset is {offset!r}")
    size, stride = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    if len(size) != len(stride) or any(d < 0 for d in size) or any(s < 0 for s in stride):
        raise _UnsafePickle(f"tensor has size {size} and stride {stride}")
    return _TensorRef(storage, dtype, offset, size, stride)


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any) -> _TensorRef:
    dtype = storage.dtype if isinstance(storage, _Storage) else None
    return _tensor_ref(storage, storage_offset, size, stride, dtype)


def _rebuild_tensor_v2(
    storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any, backward_hooks: Any, metadata=None
) -> _TensorRef:
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any,
    backward_hooks: Any,
    dtype: Any,
    metadata=None,
) -> _TensorRef:
    if not isinstance(dtype, _TorchDtype):
        raise _UnsafePickle(f"_rebuild_tensor_v3 dtype is {dtype!r}")
    return _tensor_ref(storage, storage_offset, size, stride, dtype.dtype)


def _rebuild_parameter(data: Any, requires_grad: Any, backward_hooks: Any, state: Any = None) -> _TensorRef:
    if not isinstance(data, _TensorRef):
        raise _UnsafePickle(f"Parameter data is {type(data).__name__}, not a tensor")
    return data


class _TensorClass:
    """Stand-in for ``torch.Tensor`` / ``torch.nn.Parameter`` when they appear as a global."""


_TENSOR_CLASS = _TensorClass()
_REBUILD_FUNCTIONS = (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_parameter)


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> _TensorRef:
    # torch pickles a tensor that carries Python attributes this way; the attributes are dropped.
    if func not in _REBUILD_FUNCTIONS or new_type is not _TENSOR_CLASS or not isinstance(args, tuple):
        raise _UnsafePickle("_rebuild_from_type_v2 with arguments other than a tensor rebuild")
    return func(*args)


def _torch_size(dims: Any = ()) -> tuple[int, ...]:
    return _int_tuple(tuple(dims), "size")


def _torch_device(*args: Any) -> str:
    return ":".join(str(a) for a in args)


def _codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    # Protocol-2 pickles spell bytes objects as _codecs.encode(str, "latin1").
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _UnsafePickle(f"_codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode("latin1")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
        ("torch", "Tensor"): _TENSOR_CLASS,
        ("torch._tensor", "Tensor"): _TENSOR_CLASS,
        ("torch.nn.parameter", "Parameter"): _TENSOR_CLASS,
        ("torch", "Size"): _torch_size,
        ("torch", "device"): _torch_device,
        ("_codecs", "encode"): _codecs_encode,
    }
    for name, dtype in _TORCH_STORAGE_DTYPES.items():
        for module in ("torch", "torch.cuda", "torch.storage"):
            allowed[(module, name)] = _StorageType(name, dtype)
    for name, dtype in _TORCH_DTYPES.items():
        allowed[("torch", name)] = _TorchDtype(name, dtype)
    return allowed


_ALLOWED_GLOBALS = _allowed_globals()


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles a ``torch.save`` pickle into :class:`_TensorRef` leaves; refuses every other global."""

    def __init__(self, file: BinaryIO, persistent_load: Callable[[tuple], Any]) -> None:
        super().__init__(file, encoding="utf-8")
        self._persistent_load = persistent_load

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise _UnsafePickle(f"the pickle references the global `{module}.{name}`") from None

    def persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or not pid:
            raise _UnsafePickle(f"unexpected persistent id {pid!r}")
        typename = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if typename != "storage":
            raise _UnsafePickle(f"persistent id of kind {typename!r} (only 'storage' is known)")
        return self._persistent_load(pid[1:])


def _storage_args(args: tuple) -> tuple[_StorageType, str, int]:
    storage_type, key, _location, numel = args[:4]
    if not isinstance(storage_type, _StorageType):
        raise _UnsafePickle(f"storage type is {storage_type!r}")
    key = key.decode("ascii") if isinstance(key, bytes) else key
    if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
        raise _UnsafePickle(f"storage id {args!r}")
    return storage_type, key, numel


def _unpickle(file: BinaryIO, path: Path, persistent_load: Callable[[tuple], Any]) -> Any:
    try:
        return _RestrictedUnpickler(file, persistent_load).load()
    except _UnsafePickle as e:
        raise CheckpointError(
            f"{path}: refusing to unpickle: {e}, which is not needed to rebuild tensors. The file may be malicious "
            "or may hold more than a state dict; if you trust it, convert it to safetensors in a sandbox "
            "(torch.load(..., weights_only=True) then safetensors.torch.save_file)"
        ) from None
    except CheckpointError:
        raise
    except Exception as e:  # anything the pickle machine raises on a damaged stream
        raise CheckpointError(
            f"{path}: corrupt pickle ({type(e).__name__}: {e}): re-download it or convert it to safetensors"
        ) from None


def _find_state_dict(obj: Any, path: Path) -> dict[str, _TensorRef]:
    """The ``{name: tensor}`` dict in an unpickled ``.bin``: the top object, or one nested under a usual key."""
    if isinstance(obj, Mapping):
        if obj and all(isinstance(k, str) and isinstance(v, _TensorRef) for k, v in obj.items()):
            return dict(obj)
        for name in ("state_dict", "model_state_dict", "model", "module"):
            inner = obj.get(name)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, _TensorRef) for v in inner.values()):
                return {str(k): v for k, v in inner.items()}
        not_tensors = [f"{k!r} ({type(v).__name__})" for k, v in obj.items() if not isinstance(v, _TensorRef)]
        what = f"a dict whose entries {', '.join(not_tensors[:5])} are not tensors" if obj else "an empty dict"
    else:
        what = f"a {type(obj).__name__}"
    raise CheckpointError(
        f"{path}: holds {what}, not a state dict of tensors (nor one under 'state_dict'/'model'): "
        "save `model.state_dict()` instead"
    )


def _read_view(ref: _TensorRef, read_bytes: Callable[[int, int], np.ndarray], big_endian: bool) -> np.ndarray:
    """Materialise a tensor view (offset, strides) of a storage, reading only the bytes it spans."""
    dtype, itemsize = ref.dtype, ref.dtype.itemsize
    if math.prod(ref.shape) == 0:
        return np.empty(ref.shape, dtype)
    span = 1 + sum((d - 1) * s for d, s in zip(ref.shape, ref.stride))  # elements from the first to the last
    storage_nbytes = ref.storage.numel * ref.storage.dtype.itemsize
    start = ref.offset * itemsize
    if start + span * itemsize > storage_nbytes:
        raise _UnsafePickle(
            f"tensor view (offset {ref.offset}, size {ref.shape}, stride {ref.stride}) runs past its storage "
            f"of {ref.storage.numel} elements"
        )
    buf = read_bytes(start, span * itemsize).view(dtype)
    if big_endian:
        buf = _byteswapped(buf)
    contiguous = _contiguous_strides(ref.shape)
    if all(s == c for d, s, c in zip(ref.shape, ref.stride, contiguous) if d > 1):
        return buf[: math.prod(ref.shape)].reshape(ref.shape)
    strided = np.lib.stride_tricks.as_strided(buf, ref.shape, tuple(s * itemsize for s in ref.stride))
    return np.ascontiguousarray(strided)


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for d in reversed(shape):
        strides.append(acc)
        acc *= max(d, 1)
    return tuple(reversed(strides))


class _TorchZipSource(_Source):
    """A ``torch.save`` file in the zip format (torch >= 1.6): ``<name>/data.pkl`` plus ``<name>/data/<key>``."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        assert self._file is not None
        try:
            self._zip = zipfile.ZipFile(self._file)
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise CheckpointError(
                f"{self.path}: not a readable zip archive ({e}); is it truncated? re-download it"
            ) from None
        names = self._zip.namelist()
        pickles = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pickles) != 1:
            if any(n.endswith("/constants.pkl") for n in names):
                hint = "this is a TorchScript archive (torch.jit.save); save `model.state_dict()` with torch.save"
            else:
                hint = "expected exactly one `<name>/data.pkl` record as torch.save writes"
            raise CheckpointError(f"{self.path}: zip archive is not a torch.save checkpoint: {hint}")
        self._prefix = pickles[0][: -len("data.pkl")]
        byteorder = self._zip.read(self._prefix + "byteorder").decode() if self._prefix + "byteorder" in names else ""
        if byteorder not in ("", "little", "big"):
            raise CheckpointError(f"{self.path}: unknown byteorder record {byteorder!r}: re-save it with torch.save")
        self._big_endian = byteorder == "big"
        self._storages: dict[str, _Storage] = {}
        with self._zip.open(pickles[0]) as f:
            obj = _unpickle(f, self.path, self._persistent_load)
        self._refs = _find_state_dict(obj, self.path)
        self._records: dict[str, tuple[zipfile.ZipInfo, int]] = {}
        for key, ref in self._refs.items():
            self.entries[key] = _Entry(ref.shape, ref.dtype)
            self._record(ref.storage)

    def _persistent_load(self, args: tuple) -> _Storage:
        storage_type, key, numel = _storage_args(args)
        storage = self._storages.setdefault(key, _Storage(key, storage_type.dtype, numel))
        if storage.dtype != storage_type.dtype:
            raise _UnsafePickle(f"storage {key} is used with two dtypes")
        return storage

    def close(self) -> None:
        if getattr(self, "_zip", None) is not None:
            self._zip.close()
        super().close()

    def _record(self, storage: _Storage) -> tuple[zipfile.ZipInfo, int]:
        """The zip entry of a storage and the file offset of its bytes (-1 when it is compressed)."""
        if storage.key in self._records:
            return self._records[storage.key]
        name = f"{self._prefix}data/{storage.key}"
        try:
            info = self._zip.getinfo(name)
        except KeyError:
            raise CheckpointError(
                f"{self.path}: record `{name}` is missing from the archive: the file is damaged, re-download it"
            ) from None
        nbytes = storage.numel * storage.dtype.itemsize
        if info.file_size < nbytes:
            raise CheckpointError(
                f"{self.path}: record `{name}` holds {info.file_size} bytes, its storage needs {nbytes}: "
                "the file is damaged, re-download it"
            )
        data_start = -1
        if info.compress_type == zipfile.ZIP_STORED:
            # Bytes follow the local header (30 bytes + name + extra); torch pads the extra to align the data.
            local = self._read_bytes(info.header_offset, 30).tobytes()
            if local[:4] != b"PK\x03\x04":
                raise CheckpointError(f"{self.path}: corrupt zip local header for `{name}`: re-download it")
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            data_start = info.header_offset + 30 + name_len + extra_len
        self._records[storage.key] = (info, data_start)
        return info, data_start

    def read(self, key: str) -> np.ndarray:
        ref = self._refs[key]
        info, data_start = self._record(ref.storage)

        def read_bytes(start: int, nbytes: int) -> np.ndarray:
            if data_start >= 0:
                return self._read_bytes(data_start + start, nbytes)
            with self._lock, self._zip.open(info) as f:  # compressed record: decompress it whole
                return np.frombuffer(f.read(), np.uint8)[start : start + nbytes].copy()

        try:
            return _read_view(ref, read_bytes, self._big_endian)
        except _UnsafePickle as e:
            raise CheckpointError(f"{self.path}: tensor `{key}`: {e}: the file is damaged, re-download it") from None


# Legacy (non-zip) torch.save: pickled magic number, protocol, sys info, the object, the storage key list,
# then each storage as an int64 element count followed by its little-endian bytes.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_LEGACY_PREFIX = b"\x80\x02\x8a\x0a" + _LEGACY_MAGIC.to_bytes(10, "little")


class _TorchLegacySource(_Source):
    """A ``torch.save(..., _use_new_zipfile_serialization=False)`` file (the format before torch 1.6)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        f = self._file
        assert f is not None
        magic = _unpickle_plain(f, self.path), _unpickle_plain(f, self.path)
        if magic != (_LEGACY_MAGIC, _LEGACY_PROTOCOL):
            raise CheckpointError(
                f"{self.path}: not a torch.save file (header {magic!r}): re-save it with torch>=1.6 or "
                "convert it to safetensors"
            )
        sys_info = _unpickle_plain(f, self.path)
        if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
            raise CheckpointError(f"{self.path}: big-endian legacy torch.save file: re-save it with torch>=1.6")
        self._storages: dict[str, _Storage] = {}
        self._refs = _find_state_dict(_unpickle(f, self.path, self._persistent_load), self.path)
        keys = _unpickle_plain(f, self.path)
        if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
            raise CheckpointError(f"{self.path}: corrupt legacy torch.save file (storage key list): re-download it")
        # Index where each storage's bytes are, seeking past them.
        self._starts: dict[str, int] = {}
        pos = f.tell()
        for key in keys:
            numel = int.from_bytes(self._read_bytes(pos, 8).tobytes(), "little")
            storage = self._storages.get(key)
            if storage is None or numel != storage.numel:
                raise CheckpointError(f"{self.path}: corrupt legacy torch.save file (storage {key}): re-download it")
            self._starts[key] = pos + 8
            pos += 8 + numel * storage.dtype.itemsize
        if pos > self._size:
            raise CheckpointError(
                f"{self.path}: file is truncated (expected {pos} bytes, found {self._size}): re-download it"
            )
        for key, ref in self._refs.items():
            if ref.storage.key not in self._starts:
                raise CheckpointError(f"{self.path}: storage of `{key}` is missing from the file: re-download it")
            self.entries[key] = _Entry(ref.shape, ref.dtype)

    def _persistent_load(self, args: tuple) -> _Storage:
        if len(args) != 5:
            raise _UnsafePickle(f"legacy storage id {args!r}")
        storage_type, key, numel = _storage_args(args)
        storage = self._storages.setdefault(key, _Storage(key, storage_type.dtype, numel))
        if storage.dtype != storage_type.dtype:
            raise _UnsafePickle(f"storage {key} is used with two dtypes")
        if args[4] is not None:
            # (view_key, offset, size): storage slices, which torch stopped writing around 1.0.
            raise CheckpointError(
                f"{self.path}: uses storage views, which this reader does not rebuild: re-save it with torch>=1.6 "
                "(torch.save(torch.load(f), g)) or convert it to safetensors"
            )
        return storage

    def read(self, key: str) -> np.ndarray:
        ref = self._refs[key]
        base = self._starts[ref.storage.key]
        try:
            return _read_view(ref, lambda start, n: self._read_bytes(base + start, n), big_endian=False)
        except _UnsafePickle as e:
            raise CheckpointError(f"{self.path}: tensor `{key}`: {e}: the file is damaged, re-download it") from None


def _unpickle_plain(f: BinaryIO, path: Path) -> Any:
    """One pickle of plain data (no globals, no persistent ids allowed)."""

    def no_storages(args: tuple) -> Any:
        raise _UnsafePickle("a storage outside the state dict")

    return _unpickle(f, path, no_storages)


# ----------------------------------------------------------------------------------------------------------------
# opening one file by its content


def _open_source(path: Path) -> _Source:
    """Open one weight file, choosing the format from its first bytes (the extension may lie)."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e})") from None
    if not head:
        raise CheckpointError(f"{path}: the file is empty: re-download it")
    if head.startswith(b"version https://git-lfs"):
        raise CheckpointError(
            f"{path}: is a Git LFS pointer, not the weights: run `git lfs pull` in the clone, or download the file"
        )
    if head.startswith(b"PK\x03\x04"):
        return _TorchZipSource(path)
    # Before the pickle checks: a safetensors file starts with its 8-byte header length, whose low byte may be 0x80.
    if head[8:9] == b"{":
        return _SafetensorsSource(path)
    if head.startswith(_LEGACY_PREFIX):
        return _TorchLegacySource(path)
    if len(head) >= 262 and head[257:262] == b"ustar":
        raise CheckpointError(
            f"{path}: is a tar-format torch.save file (torch < 0.4): re-save it with torch>=1.6 or convert it "
            "to safetensors"
        )
    if head[:1] == b"\x80":
        raise CheckpointError(
            f"{path}: is a pickle, but not one written by torch.save: only torch.save state dicts and "
            "safetensors files are read; convert it to safetensors"
        )
    if path.suffix == ".safetensors":
        return _SafetensorsSource(path)
    raise CheckpointError(
        f"{path}: unrecognised weight file (neither safetensors nor torch.save): re-download it or convert it "
        "to safetensors"
    )


# ----------------------------------------------------------------------------------------------------------------
# the reader


class StateDictReader:
    """Lazy, read-only mapping view of one component's weights, possibly spread over several files.

    ``keys()`` come in file order; ``get(key)`` reads just that tensor into a fresh native-endian numpy array of
    the stored dtype. Not safe to share between processes; ``get`` may be called from several threads.
    """

    files: list[Path]  # the weight files read, in order (shards sorted by name)
    index_file: Path | None  # the *.index.json of a sharded checkpoint
    variant: str | None  # the variant picked ("fp16") or None for the plain files

    def __init__(
        self,
        sources: list[_Source],
        *,
        index_file: Path | None = None,
        variant: str | None = None,
        weight_map: Mapping[str, str] | None = None,
    ) -> None:
        self._sources = sources
        self.files = [s.path for s in sources]
        self.index_file = index_file
        self.variant = variant
        self._where: dict[str, _Source] = {}
        try:
            for source in sources:
                for key in source.entries:
                    if key in self._where:
                        raise CheckpointError(
                            f"key `{key}` is in two files, {self._where[key].path.name} and {source.path.name}"
                            f"{f' (listed by {index_file})' if index_file else ''}: the checkpoint is inconsistent; "
                            "re-download it or remove the stale shard"
                        )
                    self._where[key] = source
            if weight_map is not None:
                self._check_weight_map(weight_map)
        except BaseException:
            self.close()
            raise

    def _check_weight_map(self, weight_map: Mapping[str, str]) -> None:
        wrong = [
            f"`{k}` (listed in {shard}, {'found in ' + self._where[k].path.name if k in self._where else 'absent'})"
            for k, shard in weight_map.items()
            if k not in self._where or self._where[k].path.name != Path(shard).name
        ]
        if wrong:
            raise CheckpointError(
                f"{self.index_file}: {len(wrong)} keys of its weight_map are not in the shard it names: "
                f"{', '.join(wrong[:5])}{' ...' if len(wrong) > 5 else ''}; the shards do not match the index, "
                "re-download them"
            )

    def keys(self) -> list[str]:
        """All tensor names, in file order."""
        return list(self._where)

    def _source(self, key: str) -> _Source:
        try:
            return self._where[key]
        except KeyError:
            files = ", ".join(p.name for p in self.files)
            raise MissingKeyError(
                f"key `{key}` is not in {files} ({len(self._where)} tensors): is this the right component?"
            ) from None

    def shape(self, key: str) -> tuple[int, ...]:
        """The tensor's shape, from the file header (nothing is read)."""
        return self._source(key).entries[key].shape

    def dtype(self, key: str) -> np.dtype:
        """The tensor's dtype as stored (bfloat16 is ``ml_dtypes.bfloat16``)."""
        return self._source(key).entries[key].dtype

    def get(self, key: str) -> np.ndarray:
        """Read one tensor: a fresh, writable, C-contiguous array of the stored dtype and shape."""
        return self._source(key).read(key)

    def __getitem__(self, key: str) -> np.ndarray:
        return self.get(key)

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def __len__(self) -> int:
        return len(self._where)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def close(self) -> None:
        """Close the files; later reads raise CheckpointError."""
        for source in self._sources:
            source.close()

    def __enter__(self) -> StateDictReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"StateDictReader({len(self)} tensors from {', '.join(str(p) for p in self.files)})"


# ----------------------------------------------------------------------------------------------------------------
# choosing files in a folder

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
# (format, stems) in order of preference: diffusers names first, then transformers names.
_STEMS = (("safetensors", ("diffusion_pytorch_model", "model")), ("bin", ("diffusion_pytorch_model", "pytorch_model")))


def _candidate_names(variant: str | None) -> list[tuple[str, bool]]:
    """File names to look for, in order of preference, each with whether it is a shard index."""
    v = f".{variant}" if variant else ""
    names: list[tuple[str, bool]] = []
    for fmt, stems in _STEMS:
        names += [(f"{stem}{v}.{fmt}", False) for stem in stems]
        names += [(f"{stem}.{fmt}.index{v}.json", True) for stem in stems]  # diffusers/transformers _add_variant
        if variant:
            names += [(f"{stem}{v}.{fmt}.index.json", True) for stem in stems]  # a spelling seen on the hub
    return names


def list_weight_files(folder: str | Path) -> dict[str, list[str]]:
    """What a folder holds, by kind: ``safetensors``, ``bin`` (pickles), ``index`` (shard maps), ``other``."""
    out: dict[str, list[str]] = {"safetensors": [], "bin": [], "index": [], "other": []}
    for p in sorted(Path(folder).iterdir()):
        name = p.name + ("/" if p.is_dir() else "")
        if p.is_file() and ".index" in p.name and p.name.endswith(".json"):
            out["index"].append(name)
        elif p.is_file() and p.suffix == ".safetensors":
            out["safetensors"].append(name)
        elif p.is_file() and p.suffix in _WEIGHT_SUFFIXES:
            out["bin"].append(name)
        else:
            out["other"].append(name)
    return out


def _describe(folder: Path) -> str:
    listing = list_weight_files(folder)
    names = [n for kind in ("safetensors", "bin", "index", "other") for n in listing[kind]]
    if not names:
        return "it is empty"
    return f"it holds: {', '.join(names[:30])}{' ...' if len(names) > 30 else ''}"


def _find_in_folder(folder: Path, variant: str | None) -> tuple[Path, bool] | None:
    for name, is_index in _candidate_names(variant):
        if (folder / name).is_file():
            return folder / name, is_index
    return None


def open_state_dict(path: str | Path, *, variant: str | None = None) -> StateDictReader:
    """Open a component's weights without reading them.

    Args:
      path: a component folder as released (``unet/``, ``text_encoder/``...), a single weight file
        (``.safetensors``, ``.bin``/``.pt``), or a shard index (``*.index.json``).
      variant: ``None`` prefers the plain files and falls back to the ``fp16`` variant only when that is all the
        folder holds; ``"fp16"`` requires the fp16 files.

    In a folder, safetensors win over ``.bin``, and a single file over a shard index. ``reader.files`` and
    ``reader.variant`` say what was picked.
    """
    path = Path(path)
    if path.is_dir():
        found = _find_in_folder(path, variant)
        picked = variant
        if found is None and variant is None:
            found, picked = _find_in_folder(path, "fp16"), "fp16"
        if found is None:
            raise CheckpointError(_no_weights_message(path, variant))
        file, is_index = found
        return _open_index(file, picked) if is_index else _open_files([file], variant=picked)
    if path.is_file():
        if variant is not None and f".{variant}" not in path.name:
            raise CheckpointError(
                f"{path}: variant={variant!r} was requested, but this file name does not carry it: pass the folder "
                "to pick the variant, or drop variant= to read this file"
            )
        if path.name.endswith(".json"):
            return _open_index(path, variant)
        return _open_files([path], variant=variant)
    raise CheckpointError(f"{path}: no such file or folder: pass a component folder (e.g. show-1-base/unet)")


def _no_weights_message(folder: Path, variant: str | None) -> str:
    looked_for = ", ".join(name for name, _ in _candidate_names(variant))
    listing = list_weight_files(folder)
    if variant is not None and (listing["safetensors"] or listing["bin"]):
        return (
            f"{folder}: variant={variant!r} was requested, but no {variant} weight files are there "
            f"(looked for {looked_for}); {_describe(folder)}. Drop variant= to read the plain files."
        )
    sub = [p.name for p in sorted(folder.iterdir()) if p.is_dir() and _find_in_folder(p, None) is not None]
    sub += [p.name for p in sorted(folder.iterdir()) if p.is_dir() and _find_in_folder(p, "fp16") is not None]
    hint = (
        f" This looks like a pipeline folder: pass one of its component folders ({', '.join(dict.fromkeys(sub))})."
        if sub
        else " Pass the weight file itself if it has another name."
    )
    plain = ", ".join(name for name, _ in _candidate_names(None))
    return (
        f"{folder}: no weight files found (expected one of {plain}, or their .fp16 variants); "
        f"{_describe(folder)}.{hint}"
    )


def _open_files(files: list[Path], *, variant: str | None, **kwargs: Any) -> StateDictReader:
    sources: list[_Source] = []
    try:
        for file in files:
            sources.append(_open_source(file))
    except BaseException:
        for source in sources:
            source.close()
        raise
    return StateDictReader(sources, variant=variant, **kwargs)


def _open_index(index_file: Path, variant: str | None) -> StateDictReader:
    """A sharded checkpoint: ``{"weight_map": {key: shard file name}}`` next to the shards."""
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{index_file}: unreadable shard index ({e}): re-download it") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_file}: shard index without a `weight_map` of key -> file: re-download it")
    if not weight_map:
        raise CheckpointError(f"{index_file}: shard index lists no tensors: re-download it")
    shards = sorted(set(weight_map.values()))
    paths = [index_file.parent / shard for shard in shards]
    if any(Path(shard).name != shard for shard in shards):
        raise CheckpointError(f"{index_file}: shard names must be plain file names next to the index: {shards}")
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise CheckpointError(
            f"{index_file}: {len(missing)} of {len(paths)} shards are missing: {', '.join(missing)}; download them "
            f"into {index_file.parent} ({_describe(index_file.parent)})"
        )
    return _open_files(paths, variant=variant, index_file=index_file, weight_map=weight_map)
