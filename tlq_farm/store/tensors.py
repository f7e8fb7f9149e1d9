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


def canonical_header(data: bytes) -> bytes:
    """safetensors bytes with the JSON header rewritten with sorted keys (same length, same tensors)."""
    (length,) = _HEADER_LENGTH.unpack_from(data)
    header_end = _HEADER_LENGTH.size + length
    header = json.loads(data[_HEADER_LENGTH.size : header_end])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    if len(text) > length:  # cannot happen for a header safetensors wrote compactly; keep its bytes then
        return data
    # safetensors pads its header with spaces (8-byte alignment of the data); keep the same length.
    return data[: _HEADER_LENGTH.size] + text.ljust(length, b" ") + data[header_end:]


def tensors_to_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """Deterministic safetensors bytes of `tensors` (moved to CPU, made contiguous)."""
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
    if metadata is not None:
        bad = {k: v for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)}
        if bad:
            raise TypeError(f"safetensors metadata must map str to str; convert these entries: {bad!r}")
        metadata = dict(sorted(metadata.items()))
    return canonical_header(save(prepared, metadata=metadata))


def read_metadata(data: bytes) -> dict[str, str]:
    """The metadata map of safetensors bytes ({} when there is none)."""
    (length,) = _HEADER_LENGTH.unpack_from(data)
    header = json.loads(data[_HEADER_LENGTH.size : _HEADER_LENGTH.size + length])
    return dict(header.get("__metadata__") or {})


def put_tensors(
    store: Store, key: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> str:
    """Commit `tensors` under `key` as safetensors; return the sha256 of the bytes."""
    return store.put_bytes(key, tensors_to_bytes(tensors, metadata))


def get_tensors(store: Store, key: str) -> dict[str, torch.Tensor]:
    """The committed tensors under `key` (on CPU)."""
    data = store.get_bytes(key)
    try:
        return load(data)
    except Exception as error:  # the checksum matched, so the writer stored something that is not safetensors
        raise StoreError(f"{key!r} in {store.url} is not a safetensors object: {error}") from error


def get_tensors_metadata(store: Store, key: str) -> dict[str, str]:
    """The metadata map stored with put_tensors(..., metadata=...)."""
    return read_metadata(store.get_bytes(key))


def get_tensors_and_metadata(store: Store, key: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata map) of one committed object, in one read."""
    data = store.get_bytes(key)
    try:
        return load(data), read_metadata(data)
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
