"""Tensors and JSON in a store, as deterministic bytes.

The same tensors (and metadata) always give the same bytes, in any process: this is what lets a job
check that two workers computed the same thing, and keeps results bit-identical across reruns.
safetensors orders tensors deterministically but writes its metadata map in an arbitrary order, so the
header is re-serialized with sorted keys.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import torch
from safetensors.torch import load, save

from tlq_farm.store.base import Store, StoreError

_HEADER_LENGTH = struct.Struct("<Q")

SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint64: "U64", torch.uint32: "U32", torch.uint16: "U16", torch.uint8: "U8",
                      torch.bool: "BOOL"}
# safetensors' Dtype enum order: its writer puts larger enum values first, then sorts by name.
_SAFETENSORS_RANK = {n: i for i, n in enumerate(
    ("BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16", "U16", "F16", "BF16",
     "I32", "U32", "F32", "F64", "I64", "U64"))}


def _nbytes(entry) -> int:
    n = 1
    for d in entry.shape:
        n *= int(d)
    return n * torch.empty((), dtype=entry.dtype).element_size()


def safetensors_layout(entries: dict, metadata: dict[str, str] | None) -> tuple[bytes, list[str]]:
    """(header bytes with their length prefix, names in data order) of the file safetensors writes for these
    tensors: data ordered by dtype (safetensors' enum, last first), then by name; the JSON header compact,
    padded with spaces to 8 bytes. entries: name -> anything with .dtype and .shape (a tensor, an export's
    TensorEntry)."""
    for name, e in entries.items():
        if e.dtype not in SAFETENSORS_DTYPES:
            raise TypeError(f"{name}: dtype {e.dtype} cannot be written to safetensors here")
    order = sorted(entries, key=lambda n: (-_SAFETENSORS_RANK[SAFETENSORS_DTYPES[entries[n].dtype]], n))
    header: dict = {}
    if metadata is not None:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name in order:
        e = entries[name]
        header[name] = {"dtype": SAFETENSORS_DTYPES[e.dtype], "shape": list(e.shape),
                        "data_offsets": [offset, offset + _nbytes(e)]}
        offset += _nbytes(e)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, order


def write_tensors_file(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> None:
    """The bytes tensors_to_bytes gives, written to a file one tensor at a time from the tensors' own
    memory (no copy of the data is made, as safetensors' own writer makes one per tensor)."""
    header, order = safetensors_layout(tensors, metadata)
    text = _sorted_header(header[_HEADER_LENGTH.size:])
    with open(path, "wb") as f:
        f.write(header if text is None else header[:_HEADER_LENGTH.size] + text)
        for name in order:
            flat = tensors[name].reshape(-1)
            if flat.numel():
                f.write(flat.view(torch.uint8).numpy().data)


def _sorted_header(raw: bytes) -> bytes | None:
    """A safetensors JSON header (without its length prefix) re-serialized with sorted keys, padded to the
    same length; None when it would not fit (cannot happen for a header safetensors wrote compactly)."""
    text = json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":")).encode()
    # safetensors pads its header with spaces (8-byte alignment of the data); keep the same length.
    return text.ljust(len(raw), b" ") if len(text) <= len(raw) else None


def canonical_header(data: bytes) -> bytes:
    """safetensors bytes with the JSON header rewritten with sorted keys (same length, same tensors)."""
    (length,) = _HEADER_LENGTH.unpack_from(data)
    header_end = _HEADER_LENGTH.size + length
    text = _sorted_header(data[_HEADER_LENGTH.size : header_end])
    if text is None:
        return data
    # One copy of the tensor data, not two (a slice and then the concatenation).
    return b"".join([data[: _HEADER_LENGTH.size], text, memoryview(data)[header_end:]])


def tensors_to_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """Deterministic safetensors bytes of `tensors` (moved to CPU, made contiguous)."""
    return canonical_header(save(_prepared(tensors), metadata=_checked_metadata(metadata)))


def _checked_metadata(metadata: dict[str, str] | None) -> dict[str, str] | None:
    if metadata is None:
        return None
    bad = {k: v for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)}
    if bad:
        raise TypeError(f"safetensors metadata must map str to str; convert these entries: {bad!r}")
    return dict(sorted(metadata.items()))


def _prepared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors checked, on the CPU, contiguous, in name order, a copy of each that shares memory."""
    if not isinstance(tensors, dict):
        raise TypeError(f"tensors must be a dict of name -> torch.Tensor, got {type(tensors).__name__}")
    prepared: dict[str, torch.Tensor] = {}
    storages: set[tuple[int, int]] = set()
    for name in sorted(tensors):
        tensor = tensors[name]
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tensors must map str names to torch.Tensor; entry {name!r} is {type(tensor).__name__}")
        tensor = tensor.detach().to("cpu").contiguous()
        # safetensors refuses tensors that share memory; a copy of each later one gives the same bytes.
        place = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        if tensor.numel() and place in storages:
            tensor = tensor.clone()
        storages.add(place)
        prepared[name] = tensor
    return prepared


def data_ranges(path) -> dict[str, tuple[int, int]]:
    """name -> (start, end) byte offsets of each tensor's data in a safetensors file, from its header."""
    with open(path, "rb") as f:
        (length,) = _HEADER_LENGTH.unpack(f.read(_HEADER_LENGTH.size))
        header = json.loads(f.read(length))
    base = _HEADER_LENGTH.size + length
    return {n: (base + e["data_offsets"][0], base + e["data_offsets"][1])
            for n, e in header.items() if n != "__metadata__"}


def read_metadata(data: bytes) -> dict[str, str]:
    """The metadata map of safetensors bytes ({} when there is none)."""
    (length,) = _HEADER_LENGTH.unpack_from(data)
    header = json.loads(data[_HEADER_LENGTH.size : _HEADER_LENGTH.size + length])
    return dict(header.get("__metadata__") or {})


# Objects larger than this go through a temporary file, written and read one tensor at a time: bytes in
# memory beside the tensors would double a multi-gigabyte partial Hessian.
LARGE_BYTES = 256 * 2**20


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values() if isinstance(t, torch.Tensor))


def put_tensors(
    store: Store, key: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> str:
    """Commit `tensors` under `key` as safetensors; return the sha256 of the bytes (the same bytes either
    way: a large object is written to a file tensor by tensor, write_tensors_file)."""
    if tensor_bytes(tensors) < LARGE_BYTES:
        return store.put_bytes(key, tensors_to_bytes(tensors, metadata))
    import tempfile

    prepared, metadata = _prepared(tensors), _checked_metadata(metadata)
    with tempfile.TemporaryDirectory(prefix="tlq-put-") as tmp:
        path = f"{tmp}/object.safetensors"
        write_tensors_file(path, prepared, metadata)
        del prepared
        return store.put_file(key, path)


def get_tensors(store: Store, key: str) -> dict[str, torch.Tensor]:
    """The committed tensors under `key` (on CPU); a large object is read through a temporary file, one
    tensor at a time."""
    info = store.commit_info(key)
    if info is None or info.size < LARGE_BYTES:
        data = store.get_bytes(key, commit=info)
        try:
            return load(data)
        except Exception as error:  # the checksum matched: the writer stored something that is not safetensors
            raise StoreError(f"{key!r} in {store.url} is not a safetensors object: {error}") from error
    return get_tensors_and_metadata(store, key)[0]


def get_tensors_metadata(store: Store, key: str) -> dict[str, str]:
    """The metadata map stored with put_tensors(..., metadata=...)."""
    return read_metadata(store.get_bytes(key))


def get_tensors_and_metadata(store: Store, key: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata map) of one committed object, in one read (through a file when it is large)."""
    info = store.commit_info(key)
    try:
        if info is None or info.size < LARGE_BYTES:
            data = store.get_bytes(key, commit=info)
            return load(data), read_metadata(data)
        import tempfile

        from safetensors import safe_open

        with tempfile.TemporaryDirectory(prefix="tlq-get-") as tmp:
            path = store.get_file(key, f"{tmp}/object.safetensors", commit=info)
            with safe_open(str(path), "pt") as f:
                names, metadata = list(f.keys()), dict(f.metadata() or {})
            # One mapping of the file per tensor: a tensor's pages leave memory when that tensor is dropped,
            # not when the last of the object's tensors is (a solve adds a partial's H, D and Hfp one by one).
            tensors = {}
            for n in names:
                with safe_open(str(path), "pt") as f:
                    tensors[n] = f.get_tensor(n)
            return tensors, metadata
    except StoreError:
        raise
    except Exception as error:  # the checksum matched, so the writer stored something that is not safetensors
        raise StoreError(f"{key!r} in {store.url} is not a safetensors object: {error}") from error


def json_to_bytes(value: Any) -> bytes:
    """Deterministic JSON bytes: sorted keys, fixed indentation, no NaN, a final newline."""
    try:
        text = json.dumps(value, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False)
    except ValueError as error:
        raise ValueError(
            f"cannot store as JSON: {error} (NaN and infinity are not JSON; use null or a string)"
        ) from None
    return (text + "\n").encode()


def put_json(store: Store, key: str, value: Any) -> str:
    """Commit `value` as JSON under `key`; return the sha256 of the bytes."""
    return store.put_bytes(key, json_to_bytes(value))


def get_json(store: Store, key: str) -> Any:
    """The committed JSON value under `key`."""
    data = store.get_bytes(key)
    try:
        return json.loads(data)
    except ValueError as error:
        raise StoreError(f"{key!r} in {store.url} is not JSON: {error}") from error
