"""Coordinator helpers over the store: job status, export download, cancel. No Celery here."""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path

from tlq_farm import plan, steps
from tlq_farm.staging import load_manifest
from tlq_farm.store import Store, keys
from tlq_farm.store.tensors import get_json


def job_status(store: Store, job: str, live_classes: list[int] | None = None) -> dict:
    """State, progress counts, ETA and the ready tasks no live worker can take."""
    manifest = load_manifest(store, job)
    committed = steps.committed_keys(store, job)
    groups = steps.job_groups(store, job, committed)
    rec = plan.reconcile(manifest, committed, groups)
    progress = plan.progress_summary(manifest, committed, groups)
    started = store.commit_info(keys.manifest(job))
    elapsed = time.time() - started.time if started else 0.0
    state = "done" if rec.done else "cancelled" if steps.is_cancelled(store, job) else \
        "stuck" if not rec.ready else "running"
    computed = sum(1 for k in committed if k.startswith(keys.tasks_prefix(job)))
    out = {"job": job, "state": state, "model": manifest["spec"]["model"], "progress": progress,
           "ready": [t.name for t in rec.ready], "missing": rec.missing, "computed_tasks": computed,
           "elapsed_s": round(elapsed, 1)}
    if state == "running" and progress["plan_complete"]:
        out["eta_s"] = plan.eta_seconds(progress["done"], progress["total"], elapsed)
    if live_classes is not None:
        top = max(live_classes, default=0)
        unfit = []
        for t in rec.ready:
            need = plan.memory_class(plan.estimate_memory(t, manifest, groups))
            if need > top:
                unfit.append({"task": t.name, "class": plan.class_name(need)})
        out["no_worker_fits"] = unfit
    return out


def format_status(s: dict) -> str:
    p = s["progress"]
    lines = [f"job {s['job']}: {s['state']}  ({s['model']})"]
    kinds = ", ".join(f"{k} {d}/{n}" for k, (d, n) in p["tasks"].items())
    total = f"{p['done']}/{p['total']}" + ("" if p["plan_complete"] else "+")
    lines.append(f"  tasks {total}: {kinds}")
    lines.append(f"  block {p['block'] + 1}/{p['blocks']}, {p['shards']} shards, "
                 f"{p['modules_quantized']} modules quantized, {s['computed_tasks']} task runs")
    if s.get("eta_s") is not None:
        lines.append(f"  elapsed {s['elapsed_s']:.0f}s, ETA {s['eta_s']:.0f}s")
    if s.get("workers_busy") is not None:
        lines.append(f"  workers busy {s['workers_busy']}/{s['workers_live']}")
    for u in s.get("no_worker_fits", []):
        lines.append(f"  waiting: {u['task']} needs a worker of class {u['class']} or larger; none is live")
    if s["missing"]:
        lines.append(f"  missing staged inputs (run `tlq-farm run` again with the same options): {s['missing'][:3]}")
    return "\n".join(lines)


def download_export(store: Store, job: str, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Fetch the committed export into out_dir (verified files, written beside it, then renamed)."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"output folder {out} is not empty: choose another --out or pass --overwrite")
    if not store.is_committed(keys.export_index(job)):
        raise FileNotFoundError(f"job {job} has no export yet: follow it with `tlq-farm status {job}` "
                                f"(or `tlq-farm resume {job}` if it stopped)")
    index = get_json(store, keys.export_index(job))["files"]
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        for name in sorted(index):
            store.get_file(keys.export_file(job, name), tmp / name)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def cancel_job(store: Store, job: str) -> None:
    load_manifest(store, job)
    store.put_flag(keys.cancel_flag(job), {"cancelled": time.time()})
