"""Tests for show1_jax.checkpoint_io: safetensors and torch ``.bin`` reading, folder layouts, hostile files.

Fixtures are written here: safetensors with the safetensors package, ``.bin`` files with tests/torch_format.py
(no torch). That writer's output was checked against torch.load(weights_only=True), and this reader against files
written by real torch.save, once by hand (torch 2.13); torch is not needed here.
"""

from __future__ import annotations

import json
import pickle
import struct
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from torch_format import (
    StorageView,
    inst_pickle,
    reduce_pickle,
    save_torch_legacy,
    save_torch_zip,
    save_zip_pickle,
    stack_global_pickle,
)

from show1_jax.checkpoint_io import (
    CheckpointError,
    MissingKeyError,
    StateDictReader,
    list_weight_files,
    open_state_dict,
)

BF16 = np.dtype(ml_dtypes.bfloat16)


def _tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "conv_in.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "conv_in.bias": rng.standard_normal(4).astype(np.float16),
        "time_embedding.linear_1.weight": rng.standard_normal((8, 4)).astype(BF16),
        "norm.weight": rng.standard_normal(5),  # float64
        "position_ids": np.arange(7, dtype=np.int64)[None],
        "mask": np.array([True, False, True]),
        "counts": np.arange(3, dtype=np.int32),
        "bytes": np.arange(6, dtype=np.uint8).reshape(2, 3),
        "scalar": np.array(0.25, np.float32),
        "empty": np.zeros((0, 3), np.float32),
    }


def _assert_same(reader: StateDictReader, expected: dict[str, np.ndarray]) -> None:
    assert sorted(reader.keys()) == sorted(expected)
    for key, want in expected.items():
        assert reader.shape(key) == want.shape, key
        assert reader.dtype(key) == want.dtype, key
        got = reader.get(key)
        assert got.dtype == want.dtype and got.shape == want.shape, key
        assert got.flags.c_contiguous and got.flags.writeable, key
        # bitwise equality, also for bfloat16
        assert got.tobytes() == np.ascontiguousarray(want).tobytes(), key


# ----------------------------------------------------------------------------------------------------------------
# single files


def test_safetensors_round_trip_all_dtypes(tmp_path: Path) -> None:
    tensors = _tensors()
    save_file(tensors, tmp_path / "model.safetensors")
    with open_state_dict(tmp_path / "model.safetensors") as sd:
        _assert_same(sd, tensors)
        assert sd.files == [tmp_path / "model.safetensors"] and sd.variant is None
        # agrees with the safetensors package itself
        for key, want in load_file(tmp_path / "model.safetensors").items():
            assert sd.get(key).tobytes() == want.tobytes()


def test_safetensors_keys_in_file_order(tmp_path: Path) -> None:
    tensors = _tensors()
    save_file(tensors, tmp_path / "model.safetensors")
    header_len = struct.unpack("<Q", (tmp_path / "model.safetensors").read_bytes()[:8])[0]
    header = json.loads((tmp_path / "model.safetensors").read_bytes()[8 : 8 + header_len])
    header.pop("__metadata__", None)
    by_offset = sorted(header, key=lambda k: header[k]["data_offsets"][0])
    with open_state_dict(tmp_path / "model.safetensors") as sd:
        assert sd.keys() == by_offset
        assert list(sd) == by_offset and len(sd) == len(tensors)


@pytest.mark.parametrize("parameters", [False, True], ids=["tensor", "parameter"])
@pytest.mark.parametrize("byteorder", ["little", "big"])
def test_torch_zip_round_trip(tmp_path: Path, parameters: bool, byteorder: str) -> None:
    tensors = _tensors() | {
        "f8": np.array([1.0, -2.0, 0.5], ml_dtypes.float8_e4m3fn),  # torch saves these via _rebuild_tensor_v3
        "u16": np.array([1, 65535], np.uint16),
    }
    path = save_torch_zip(tmp_path / "w.bin", tensors, parameters=parameters, byteorder=byteorder)
    with open_state_dict(path) as sd:
        assert sd.keys() == list(tensors)  # pickle (insertion) order
        _assert_same(sd, tensors)


def test_torch_zip_archive_name_does_not_matter(tmp_path: Path) -> None:
    tensors = _tensors()
    path = save_torch_zip(tmp_path / "w.bin", tensors, archive_name="pytorch_model")
    with open_state_dict(path) as sd:
        _assert_same(sd, tensors)


def test_torch_zip_strided_views_of_one_storage(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for dtype in (np.float32, np.float16, BF16):
        storage = rng.standard_normal(60).astype(dtype)

        def view(offset: int, shape: tuple[int, ...], stride: tuple[int, ...], storage=storage) -> np.ndarray:
            itemsize = storage.dtype.itemsize
            return np.lib.stride_tricks.as_strided(storage[offset:], shape, tuple(s * itemsize for s in stride)).copy()

        views = {
            "offset": ((10, (3, 4), (4, 1))),  # contiguous, at an offset
            "transposed": ((5, (5, 4), (1, 5))),  # a .t() of a (4, 5) block
            "stepped": ((1, (2, 3), (9, 3))),  # every third element
            "expanded": ((7, (3, 4), (1, 0))),  # stride 0 (expand)
            "last": ((59, (1, 1), (1, 1))),  # the final element, exactly at the storage's end
        }
        path = save_torch_zip(
            tmp_path / f"views_{np.dtype(dtype).name}.bin",
            {k: StorageView(storage, *spec) for k, spec in views.items()},
        )
        with zipfile.ZipFile(path) as zf:  # one shared storage record, as torch writes views
            assert [n for n in zf.namelist() if "/data/" in n] == ["archive/data/0"]
        with open_state_dict(path) as sd:
            _assert_same(sd, {k: view(*spec) for k, spec in views.items()})


def test_torch_zip_view_past_its_storage_is_refused(tmp_path: Path) -> None:
    storage = np.arange(10, dtype=np.float32)
    path = save_torch_zip(tmp_path / "w.bin", {"bad": StorageView(storage, 8, (2, 2), (2, 1))})
    with open_state_dict(path) as sd, pytest.raises(CheckpointError, match="runs past its storage"):
        sd.get("bad")


def test_torch_legacy_round_trip(tmp_path: Path) -> None:
    tensors = _tensors()
    storage = np.arange(20, dtype=np.float16)
    path = save_torch_legacy(tmp_path / "old.bin", tensors | {"view": StorageView(storage, 2, (3, 2), (1, 3))})
    with open_state_dict(path) as sd:
        assert sd.keys() == [*tensors, "view"]
        _assert_same(sd, tensors | {"view": storage[2:8].reshape(2, 3).T.copy()})


def test_state_dict_nested_under_a_key(tmp_path: Path) -> None:
    tensors = _tensors()
    path = save_torch_zip(tmp_path / "w.bin", {"state_dict": tensors, "epoch": 3, "optimizer": "adam"})
    with open_state_dict(path) as sd:
        _assert_same(sd, tensors)


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ([np.zeros(2, np.float32)], "holds a list"),
        ({}, "holds an empty dict"),
        ({"a": np.zeros(2, np.float32), "b": 3}, r"'b' \(int\) are not tensors"),
        ({"unet": {"w": np.zeros(2, np.float32)}, "vae": {"w": np.zeros(2, np.float32)}}, "'unet' \\(dict\\)"),
    ],
    ids=["list", "empty", "mixed", "two_models"],
)
def test_not_a_state_dict(tmp_path: Path, obj: object, message: str) -> None:
    path = save_torch_zip(tmp_path / "w.bin", obj)
    with pytest.raises(CheckpointError, match=message) as err:
        open_state_dict(path)
    assert "w.bin" in str(err.value) and "state_dict()" in str(err.value)


# ----------------------------------------------------------------------------------------------------------------
# hostile files: the refusal must come before any call


@pytest.mark.parametrize(
    ("make_pickle", "forbidden"),
    [
        (lambda p: reduce_pickle("os", "system", (f"touch {p}",)), "os.system"),
        (lambda p: reduce_pickle("posix", "system", (f"touch {p}",), wrap_in_state_dict=False), "posix.system"),
        (lambda p: reduce_pickle("builtins", "eval", (f"open({str(p)!r}, 'w')",)), "builtins.eval"),
        (lambda p: reduce_pickle("builtins", "exec", (f"open({str(p)!r}, 'w')",)), "builtins.exec"),
        (lambda p: reduce_pickle("builtins", "open", (str(p), "w")), "builtins.open"),
        (lambda p: reduce_pickle("subprocess", "Popen", (["touch", str(p)],)), "subprocess.Popen"),
        (lambda p: reduce_pickle("pathlib", "Path", (str(p),)), "pathlib.Path"),  # an arbitrary class
        (lambda p: stack_global_pickle("os", "system", f"touch {p}"), "os.system"),  # protocol 4
        (lambda p: inst_pickle("os", "system", f"touch {p}"), "os.system"),  # protocol 0 INST, no GLOBAL
    ],
    ids=["os.system", "posix.system", "eval", "exec", "open", "Popen", "class", "STACK_GLOBAL", "INST"],
)
def test_malicious_bin_is_refused_without_side_effect(tmp_path: Path, make_pickle, forbidden: str) -> None:
    victim = tmp_path / "pwned"
    path = save_zip_pickle(tmp_path / "diffusion_pytorch_model.bin", make_pickle(victim))
    with pytest.raises(CheckpointError, match="refusing to unpickle") as err:
        open_state_dict(tmp_path)
    assert f"`{forbidden}`" in str(err.value) and str(path) in str(err.value)
    assert not victim.exists()


def test_malicious_storage_type_in_persistent_id_is_refused(tmp_path: Path) -> None:
    # A hostile global where torch writes the storage class: ('storage', os.system, ...).
    victim = tmp_path / "pwned"

    def text(s: str) -> bytes:
        return pickle.BINUNICODE + struct.pack("<I", len(s.encode())) + s.encode()

    data_pkl = (
        b"\x80\x02}" + text("w") + pickle.MARK + text("storage") + b"cos\nsystem\n" + text(f"touch {victim}")
    ) + (text("cpu") + b"K\x01" + pickle.TUPLE + pickle.BINPERSID + pickle.SETITEM + pickle.STOP)
    path = save_zip_pickle(tmp_path / "w.bin", data_pkl)
    with pytest.raises(CheckpointError, match="`os.system`"):
        open_state_dict(path)
    assert not victim.exists()


def test_malicious_legacy_file_is_refused(tmp_path: Path) -> None:
    victim = tmp_path / "pwned"
    path = tmp_path / "old.bin"
    header = b"".join(pickle.dumps(x, protocol=2) for x in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}))
    path.write_bytes(header + reduce_pickle("os", "system", (f"touch {victim}",)))
    with pytest.raises(CheckpointError, match="`os.system`"):
        open_state_dict(path)
    assert not victim.exists()


def test_plain_pickle_is_not_unpickled(tmp_path: Path) -> None:
    # Not a torch.save file at all: refused on its first bytes, before any unpickling.
    victim = tmp_path / "pwned"
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(reduce_pickle("os", "system", (f"touch {victim}",)))
    with pytest.raises(CheckpointError, match="not one written by torch.save"):
        open_state_dict(path)
    assert not victim.exists()


def test_rebuild_function_with_wrong_arguments_is_refused(tmp_path: Path) -> None:
    data_pkl = reduce_pickle("torch._utils", "_rebuild_tensor_v2", ("not a storage", 0, (2,), (1,), False, None))
    path = save_zip_pickle(tmp_path / "w.bin", data_pkl)
    with pytest.raises(CheckpointError, match="tensor storage is str"):
        open_state_dict(path)


# ----------------------------------------------------------------------------------------------------------------
# damaged files


def _safetensors_bytes(tmp_path: Path) -> bytes:
    save_file(_tensors(), tmp_path / "src.safetensors")
    return (tmp_path / "src.safetensors").read_bytes()


def test_truncated_safetensors(tmp_path: Path) -> None:
    raw = _safetensors_bytes(tmp_path)
    path = tmp_path / "model.safetensors"
    path.write_bytes(raw[:-10])
    with pytest.raises(CheckpointError, match=rf"truncated \(expected {len(raw)} bytes, found {len(raw) - 10}\)"):
        open_state_dict(tmp_path)


def test_safetensors_cut_inside_header(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(_safetensors_bytes(tmp_path)[:40])
    with pytest.raises(CheckpointError, match="corrupt or truncated safetensors header"):
        open_state_dict(path)


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]', "corrupt safetensors header"),
        (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}', "do not hold shape"),
        (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": 1}', "appears twice"),
        (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
         b'"b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}', "overlaps"),
        (b'{"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 1]}}', "dtype Q4"),
    ],
    ids=["bad_json", "bad_offsets", "duplicate", "overlap", "unknown_dtype"],
)  # fmt: skip
def test_corrupt_safetensors_header(tmp_path: Path, header: bytes, message: str) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    with pytest.raises(CheckpointError, match=message) as err:
        open_state_dict(path)
    assert str(path) in str(err.value)


def test_truncated_torch_zip(tmp_path: Path) -> None:
    path = save_torch_zip(tmp_path / "w.bin", _tensors())
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        open_state_dict(path)


def test_truncated_torch_legacy(tmp_path: Path) -> None:
    path = save_torch_legacy(tmp_path / "w.bin", _tensors())
    raw = path.read_bytes()
    path.write_bytes(raw[:-5])
    with pytest.raises(CheckpointError, match="truncated"):
        open_state_dict(path)


def test_git_lfs_pointer(tmp_path: Path) -> None:
    (tmp_path / "diffusion_pytorch_model.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n"
    )
    with pytest.raises(CheckpointError, match="git lfs pull"):
        open_state_dict(tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# folders: names, variants, shards


def _split(tensors: dict[str, np.ndarray], n: int) -> list[dict[str, np.ndarray]]:
    keys = list(tensors)
    return [{k: tensors[k] for k in keys[i::n]} for i in range(n)]


def _write_sharded(folder: Path, fmt: str, stem: str, index_name: str, tensors: dict, n: int = 2) -> list[str]:
    """Shards named as diffusers/transformers name them, plus the index."""
    weight_map, names = {}, []
    for i, shard in enumerate(_split(tensors, n)):
        name = f"{stem}-{i + 1:05d}-of-{n:05d}.{fmt}"
        if fmt == "safetensors":
            save_file(shard, folder / name)
        else:
            save_torch_zip(folder / name, shard)
        weight_map |= {k: name for k in shard}
        names.append(name)
    (folder / index_name).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return names


@pytest.mark.parametrize(
    ("fmt", "stem", "index_name"),
    [
        ("safetensors", "diffusion_pytorch_model", "diffusion_pytorch_model.safetensors.index.json"),
        ("bin", "diffusion_pytorch_model", "diffusion_pytorch_model.bin.index.json"),
        ("safetensors", "model", "model.safetensors.index.json"),
        ("bin", "pytorch_model", "pytorch_model.bin.index.json"),
    ],
    ids=["diffusers_safetensors", "diffusers_bin", "transformers_safetensors", "transformers_bin"],
)
def test_sharded_layouts(tmp_path: Path, fmt: str, stem: str, index_name: str) -> None:
    tensors = _tensors()
    shards = _write_sharded(tmp_path, fmt, stem, index_name, tensors, n=3)
    for path in (tmp_path, tmp_path / index_name):  # the folder, or the index file itself
        with open_state_dict(path) as sd:
            _assert_same(sd, tensors)
            assert sd.files == [tmp_path / s for s in shards] and sd.index_file == tmp_path / index_name


def test_sharded_missing_shard_is_named(tmp_path: Path) -> None:
    shards = _write_sharded(tmp_path, "safetensors", "model", "model.safetensors.index.json", _tensors(), n=3)
    (tmp_path / shards[1]).unlink()
    with pytest.raises(CheckpointError, match=f"1 of 3 shards are missing: {shards[1]}"):
        open_state_dict(tmp_path)


def test_sharded_key_not_in_its_shard(tmp_path: Path) -> None:
    tensors = _tensors()
    _write_sharded(tmp_path, "safetensors", "model", "model.safetensors.index.json", tensors)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    index["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"`ghost.weight` \(listed in model-00001-of-00002.safetensors, absent"):
        open_state_dict(tmp_path)


def test_sharded_duplicate_key_across_shards(tmp_path: Path) -> None:
    tensors = _tensors()
    shards = _write_sharded(tmp_path, "safetensors", "model", "model.safetensors.index.json", tensors)
    first = load_file(tmp_path / shards[0])
    save_file(load_file(tmp_path / shards[1]) | {"conv_in.weight": first["conv_in.weight"]}, tmp_path / shards[1])
    with pytest.raises(CheckpointError, match=f"`conv_in.weight` is in two files, {shards[0]} and {shards[1]}"):
        open_state_dict(tmp_path)


def test_variant_fp16_only(tmp_path: Path) -> None:
    tensors = {k: v.astype(np.float16) for k, v in _tensors().items() if v.dtype.kind == "f"}
    save_file(tensors, tmp_path / "diffusion_pytorch_model.fp16.safetensors")
    with open_state_dict(tmp_path) as sd:  # no plain files: falls back to fp16
        assert sd.variant == "fp16" and sd.files == [tmp_path / "diffusion_pytorch_model.fp16.safetensors"]
        _assert_same(sd, tensors)
    with open_state_dict(tmp_path, variant="fp16") as sd:
        assert sd.files == [tmp_path / "diffusion_pytorch_model.fp16.safetensors"]


def test_variant_both_present(tmp_path: Path) -> None:
    save_file(_tensors(0), tmp_path / "diffusion_pytorch_model.safetensors")
    save_torch_zip(tmp_path / "diffusion_pytorch_model.fp16.bin", _tensors(1))
    with open_state_dict(tmp_path) as sd:
        assert sd.variant is None and sd.files == [tmp_path / "diffusion_pytorch_model.safetensors"]
        _assert_same(sd, _tensors(0))
    with open_state_dict(tmp_path, variant="fp16") as sd:
        assert sd.variant == "fp16" and sd.files == [tmp_path / "diffusion_pytorch_model.fp16.bin"]
        _assert_same(sd, _tensors(1))


def test_variant_sharded_fp16(tmp_path: Path) -> None:
    # diffusers/transformers put the variant before ".json": model.safetensors.index.fp16.json
    save_file(_tensors(0), tmp_path / "model.safetensors")
    _write_sharded(tmp_path, "safetensors", "model.fp16", "model.safetensors.index.fp16.json", _tensors(1))
    with open_state_dict(tmp_path, variant="fp16") as sd:
        assert sd.index_file == tmp_path / "model.safetensors.index.fp16.json"
        _assert_same(sd, _tensors(1))


def test_variant_requested_but_missing(tmp_path: Path) -> None:
    save_file(_tensors(), tmp_path / "diffusion_pytorch_model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError) as err:
        open_state_dict(tmp_path, variant="fp16")
    message = str(err.value)
    assert "variant='fp16'" in message and "diffusion_pytorch_model.fp16.safetensors" in message  # looked for
    assert "it holds: diffusion_pytorch_model.safetensors, config.json" in message  # what is there
    assert "Drop variant=" in message


def test_single_file_and_variant(tmp_path: Path) -> None:
    save_file(_tensors(), tmp_path / "unet.fp16.safetensors")
    save_file(_tensors(), tmp_path / "unet.safetensors")
    with open_state_dict(tmp_path / "unet.fp16.safetensors", variant="fp16") as sd:
        assert sd.variant == "fp16"
    with pytest.raises(CheckpointError, match="this file name does not carry it"):
        open_state_dict(tmp_path / "unet.safetensors", variant="fp16")


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="the file is empty: re-download it"):
        open_state_dict(tmp_path)


def test_safetensors_preferred_over_bin(tmp_path: Path) -> None:
    save_torch_zip(tmp_path / "pytorch_model.bin", _tensors(1))
    save_file(_tensors(0), tmp_path / "model.safetensors")
    with open_state_dict(tmp_path) as sd:
        assert sd.files == [tmp_path / "model.safetensors"]
        _assert_same(sd, _tensors(0))


def test_bin_folder_diffusers_name(tmp_path: Path) -> None:
    save_torch_zip(tmp_path / "diffusion_pytorch_model.bin", _tensors())
    with open_state_dict(tmp_path) as sd:
        assert sd.files == [tmp_path / "diffusion_pytorch_model.bin"]
        _assert_same(sd, _tensors())


def test_folder_without_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "unet_weights.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError) as err:
        open_state_dict(tmp_path)
    message = str(err.value)
    assert "no weight files found" in message
    assert "diffusion_pytorch_model.safetensors" in message and "pytorch_model.bin" in message  # expected names
    assert "unet_weights.safetensors, config.json" in message  # what it holds
    assert "Pass the weight file itself" in message


def test_pipeline_folder_points_to_components(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text("{}")
    for component in ("unet", "text_encoder"):
        (tmp_path / component).mkdir()
    save_file(_tensors(), tmp_path / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    save_file(_tensors(), tmp_path / "text_encoder" / "model.safetensors")
    with pytest.raises(
        CheckpointError, match=r"pipeline folder: pass one of its component folders \(text_encoder, unet"
    ):
        open_state_dict(tmp_path)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file or folder"):
        open_state_dict(tmp_path / "nope")


def test_list_weight_files(tmp_path: Path) -> None:
    for name in ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "config.json"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    assert list_weight_files(tmp_path) == {
        "safetensors": ["model.safetensors"],
        "bin": ["pytorch_model.bin"],
        "index": ["model.safetensors.index.json"],
        "other": ["config.json", "sub/"],
    }


# ----------------------------------------------------------------------------------------------------------------
# the reader object


def test_missing_key_and_closed_reader(tmp_path: Path) -> None:
    save_file(_tensors(), tmp_path / "model.safetensors")
    sd = open_state_dict(tmp_path)
    assert "conv_in.weight" in sd and "nope" not in sd
    with pytest.raises(MissingKeyError, match="key `nope` is not in model.safetensors") as err:
        sd.get("nope")
    assert isinstance(err.value, KeyError) and isinstance(err.value, CheckpointError)
    np.testing.assert_array_equal(sd["conv_in.weight"], _tensors()["conv_in.weight"])
    sd.close()
    assert sd.shape("conv_in.weight") == (4, 3, 3, 3)  # headers stay known
    with pytest.raises(CheckpointError, match="closed"):
        sd.get("conv_in.weight")


def test_safetensors_whose_header_length_looks_like_a_pickle(tmp_path):
    """A header of 128 bytes makes the file start with 0x80, the pickle protocol opcode: still safetensors."""
    path = tmp_path / "model.safetensors"
    for pad in range(200):
        save_file({"w": np.arange(2, dtype=np.float32)}, str(path), metadata={"p": "x" * pad})
        if path.read_bytes()[:1] == b"\x80":
            break
    assert path.read_bytes()[:1] == b"\x80"
    with open_state_dict(path) as reader:
        np.testing.assert_array_equal(reader.get("w"), np.arange(2, dtype=np.float32))
