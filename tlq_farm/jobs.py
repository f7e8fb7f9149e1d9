"""Job state over the store: status, export download, cancel, prune. No Celery here."""

from __future__ import annotations

import errno
import os
import shutil
import time
import uuid
from pathlib import Path

from tlq_farm import plan, steps
from tlq_farm.spec import format_size
from tlq_farm.staging import load_manifest
from tlq_farm.store import Store, keys
from tlq_farm.store.tensors import get_json


def job_status(store: Store, job: str, live_classes: list[int] | None = None, stall=None, io: bool = False) -> dict:
    """State, progress counts, ETA and the ready tasks no live worker can take.

    stall(ready tasks) -> why they sit idle, or None: a running job with a reason is reported "stalled".
    io: also the store traffic so far, from every task record (tlq_farm.report.store_io; one read per task)."""
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
    reason = stall(rec.ready) if stall is not None and state == "running" else None
    if reason:
        out["state"], out["stalled"] = state, reason = "stalled", reason
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
    if io:
        from tlq_farm.report import store_io

        records = steps.task_records(store, job)
        out["store_io"] = store_io(records)
        out["store_io"]["small_caches"] = small_caches(records, plan.cache_bytes(manifest, groups))
    return out


def small_caches(records: list[dict], need: int) -> list[dict]:
    """The worker processes whose cache held less than `need` (plan.cache_bytes) at their last task: their
    tasks download again what they read a moment before."""
    last: dict[str, dict] = {}
    for r in sorted(records, key=lambda r: r.get("finished") or 0):
        if r.get("cache_bytes"):
            last[f"{r.get('host')}:{r.get('pid')}"] = r
    return [{"worker": w, "cache_bytes": r["cache_bytes"], "need_bytes": need}
            for w, r in sorted(last.items()) if r["cache_bytes"] < need]


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
    if s.get("stalled"):
        lines.append(f"  stalled: {s['stalled']}")
    for u in s.get("no_worker_fits", []):
        lines.append(f"  waiting: {u['task']} needs a worker of class {u['class']} or larger; none is live")
    io = s.get("store_io")
    if io:
        rate = "no cached reads" if io["cache_hit_rate"] is None else f"cache hit rate {io['cache_hit_rate']:.0%}"
        sent = f", {io['requests']:,} requests" if io.get("requests") else ""
        read, written = format_size(io["read_bytes"]), format_size(io["written_bytes"])
        lines.append(f"  store: {read} read, {written} written{sent}, {rate}")
        for blk in io["blocks"]:
            sent = f", {blk['requests']:,} requests" if blk.get("requests") else ""
            read, written = format_size(blk["read_bytes"]), format_size(blk["written_bytes"])
            lines.append(f"    block {blk['index']}: {read} read, {written} written{sent}")
        if small := io.get("small_caches"):
            shown = ", ".join(f"{c['worker']} ({format_size(c['cache_bytes'])})" for c in small[:3])
            lines.append(f"  caches below the {format_size(small[0]['need_bytes'])} a block reads again, so their tasks "
                         f"download some objects twice: {shown}{', ...' if len(small) > 3 else ''}; unset "
                         "TLQ_CACHE_BYTES on those workers (the cache grows to the job) or give their cache "
                         "folder more free disk")
    if s["missing"]:
        lines.append(f"  missing staged inputs (run `tlq-farm run` again with the same options): {s['missing'][:3]}")
    return "\n".join(lines)


class ExportWriteError(Exception):
    """The export cannot be written to its output folder (no space there); the folder is left as it was."""


def _is_disk_full(error: BaseException) -> bool:
    """Whether `error`, or the error it was raised from (a store wraps OS errors), is ENOSPC."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def _free_bytes(folder: Path) -> int:
    """Free space on the disk that holds `folder` (or its nearest existing parent)."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def holds_export(store: Store, job: str, out: Path, index=None) -> bool:
    """Whether folder `out` holds exactly the committed export of `job`: the same files, each with the
    sha256 of its commit marker."""
    from tlq_farm.store.base import sha256_file

    index = index if index is not None else get_json(store, keys.export_index(job))["files"]
    present = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    if present != sorted(index):
        return False
    for name in index:
        info = store.commit_info(keys.export_file(job, name))
        if info is None or sha256_file(out / name) != (info.sha256, info.size):
            return False
    return True


def download_export(store: Store, job: str, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Fetch the committed export into out_dir (verified files, written beside it, then renamed)."""
    out = Path(out_dir)
    if not store.is_committed(keys.export_index(job)):
        raise FileNotFoundError(f"job {job} has no export yet: follow it with `tlq-farm status {job}` "
                                f"(or `tlq-farm resume {job}` if it stopped)")
    index = get_json(store, keys.export_index(job))["files"]
    if out.exists() and any(out.iterdir()) and not overwrite:
        # A rerun after the coordinator died between the download and its exit finds its own export there.
        if holds_export(store, job, out, index):
            return out
        raise FileExistsError(f"output folder {out} is not empty: choose another --out or pass --overwrite")
    target = out.resolve()  # "." and "x/.." have no name to put the temporary folder beside
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    infos = [store.commit_info(keys.export_file(job, name)) for name in index]
    needed = sum(info.size for info in infos if info is not None)
    free = _free_bytes(target.parent)
    if needed > free:
        raise ExportWriteError(f"no space for the export in --out {out}: it needs {needed / 2**20:.1f} MiB and "
                               f"that disk has {free / 2**20:.1f} MiB free; free space there or choose another --out")
    try:
        for name in sorted(index):
            store.get_file(keys.export_file(job, name), tmp / name)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except Exception as error:
        # A store reports a failed copy as its own error; the write that failed was ours, into --out.
        if _is_disk_full(error):
            raise ExportWriteError(f"the disk of --out {out} filled up while writing the export; free space "
                                   "there or choose another --out (nothing in it was changed)") from error
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def cancel_job(store: Store, job: str) -> None:
    load_manifest(store, job)
    store.put_flag(keys.cancel_flag(job), {"cancelled": time.time()})


def job_folders(store: Store) -> dict[str, list[str]]:
    """Every job id with anything in the store -> its raw keys (committed or not), from one listing."""
    prefix = keys.jobs_prefix()
    found: dict[str, list[str]] = {}
    for raw in store.list_raw(prefix):
        found.setdefault(raw[len(prefix):].split("/", 1)[0], []).append(raw)
    # A folder no job wrote (named by hand) is not ours to show or remove.
    return {job: raw_keys for job, raw_keys in found.items() if keys.is_job_id(job)}


def is_incomplete(raw_keys: list[str], job: str) -> bool:
    """A job folder without a committed manifest: its staging stopped before the end."""
    return keys.marker_key(keys.manifest(job)) not in raw_keys


def last_write(store: Store, job: str, raw_keys: list[str]) -> float | None:
    """Time of the newest commit among `raw_keys` of `job`, None when nothing of it was committed."""
    times = [info.time for raw in raw_keys if raw.endswith(keys.COMMIT_SUFFIX)
             if (info := store.commit_info(raw[: -len(keys.COMMIT_SUFFIX)])) is not None]
    return max(times, default=None)


def is_old_format(store: Store, job: str) -> bool:
    """A job staged in a store format this version does not read."""
    from tlq_farm.staging import store_format

    return store_format(load_manifest(store, job, any_format=True)) != keys.STORE_FORMAT


def prune_jobs(store: Store, *, cancelled: bool = False, old_format: bool = False, older_than_s: float = 900.0,
               now: float | None = None) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Remove incomplete jobs (and, with cancelled=True, cancelled ones; with old_format=True, jobs staged in
    another store format) -> (removed, kept), each a list of (job, why). An incomplete job written to less
    than older_than_s ago is kept: its staging may still run."""
    now = time.time() if now is None else now
    removed, kept = [], []
    for job, raw_keys in sorted(job_folders(store).items()):
        if is_incomplete(raw_keys, job):
            newest = last_write(store, job, raw_keys)
            if newest is not None and now - newest < older_than_s:
                kept.append((job, f"incomplete, last written {now - newest:.0f}s ago: its staging may still be "
                                  "running (pass --older-than 0 to remove it anyway)"))
                continue
            why = "incomplete (staging never finished)"
        elif old_format and is_old_format(store, job):
            why = "staged in an older store format"
        elif cancelled and steps.is_cancelled(store, job):
            why = "cancelled"
        else:
            continue
        store.delete_prefix(keys.job_prefix(job))
        removed.append((job, why))
    return removed, kept
