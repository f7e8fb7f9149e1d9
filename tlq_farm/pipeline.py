"""A job that keeps nothing: its tasks run in this process on a temporary folder store (the embedded path,
the farm's tasks and reconciler), and only the export is kept.

This is what `tlq-farm run --in-memory` and the benchmarks call; there is no second calibration loop.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from .spec import JobSpec


def run_local(spec: JobSpec, out_dir: str | Path, *, device: str = "cpu", progress: bool = True, log=print,
              overwrite: bool = False) -> dict:
    """Quantize spec.model on spec.calib through a temporary store, write the export and tlq_report.json to
    out_dir, and return the report."""
    from .jobs import download_export
    from .staging import stage_job
    from .steps import drop_contexts, run_embedded
    from .store import LocalStore

    spec.validate()
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"output folder {out_dir} is not empty: choose another --out or pass --overwrite")
    with tempfile.TemporaryDirectory(prefix="tlq-local-") as tmp:
        store = LocalStore(tmp)
        job, _ = stage_job(store, spec, log=log)
        try:
            run_embedded(store, job, device=device, progress=progress)
            download_export(store, job, out_dir, overwrite=overwrite)
        finally:
            drop_contexts(store, job)
    return json.loads((out_dir / "tlq_report.json").read_text())
