"""Device probe and memory class of a worker: CUDA total memory and name, or RAM capped by --max-memory."""

from __future__ import annotations

import os

from tlq_farm import plan
from tlq_farm.spec import parse_size

# Part of a device's memory a worker plans to fill with task tensors; the rest is the runtime's.
USABLE_FRACTION = 0.9


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
