"""Device probe and memory class of a worker: CUDA total memory and name, or RAM capped by --max-memory."""

from __future__ import annotations

import os
import re

from tlq_farm import plan

_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
# Part of a device's memory a worker plans to fill with task tensors; the rest is the runtime's.
USABLE_FRACTION = 0.9


def parse_size(text: str | int | None) -> int | None:
    """'512m', '4GiB', '2g', '1048576' -> bytes (None stays None)."""
    if text is None or text == "":
        return None
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgtb]?)(i?b)?\s*", str(text).lower())
    if not m:
        raise ValueError(f"memory size {text!r} is not understood: write a number with an optional unit, "
                         "e.g. 512m, 4g, 24GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):  # pragma: no cover - non-POSIX
        return 8 * 2**30


def probe(device: str | None = None, max_memory: str | int | None = None) -> dict:
    """{'device', 'name', 'total_bytes', 'capacity_bytes', 'class_bytes', 'class', 'queues'} of this worker."""
    device = device or os.environ.get("TLQ_DEVICE") or "cpu"
    cap = parse_size(max_memory if max_memory is not None else os.environ.get("TLQ_MAX_MEMORY"))
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {device}: no CUDA device is visible (check CUDA_VISIBLE_DEVICES and the "
                               "driver), or run the worker with --device cpu")
        index = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(index)
        name, total = props.name, int(props.total_memory)
    else:
        import platform

        name, total = platform.processor() or platform.machine() or "cpu", ram_bytes()
    usable = int(total * USABLE_FRACTION)
    capacity = min(usable, cap) if cap else usable
    cls = plan.worker_class(capacity)
    return {"device": device, "name": name, "total_bytes": total, "capacity_bytes": capacity, "class_bytes": cls,
            "class": plan.class_name(cls), "queues": [plan.queue_name(c) for c in plan.classes_up_to(cls)]}
