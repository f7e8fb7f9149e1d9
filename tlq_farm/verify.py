"""verify_job: read every committed object of a job back and check it against its commit marker.

A task reads only its own inputs, and a worker's cache may serve even those without touching the store,
so a damaged object can sit in the store unnoticed until somebody else reads it. This walks the job once:
each object goes through the store's verifying read (sha256 and size against the marker), which deletes
an object that fails together with its marker, so that the reconciler plans its producer again.

Objects that no task produces (the staged checkpoint, calibration samples, the manifest) cannot be
recomputed: when one of them is lost and still needed, the manifest is withdrawn as well, which makes
`tlq-farm run` with the same model, data and options stage the job again while every committed result of
the job is kept and reused.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from tlq_farm.store import CorruptObject, NotCommitted, Store, keys

# Objects up to this size are read into memory; larger ones stream through a temporary file.
IN_MEMORY_BYTES = 8 << 20


def _check(store: Store, key: str, size: int, scratch: Path) -> None:
    """One verifying read of `key`; raises CorruptObject / NotCommitted like the store's reads."""
    if size <= IN_MEMORY_BYTES:
        store.get_bytes(key)
        return
    target = scratch / "object"
    try:
        store.get_file(key, target)
    finally:
        target.unlink(missing_ok=True)


def _verify_one(store: Store, key: str, size: int, scratch: Path) -> tuple[str, str | None]:
    """('ok' | 'corrupt' | 'changed', the store's message for a corrupt object)."""
    # Two reads at most: a mismatch that a newer commit explains is a rewrite in flight, read that one.
    for _ in range(2):
        try:
            _check(store, key, size, scratch)
            return "ok", None
        except NotCommitted:
            return "changed", None  # withdrawn since the listing: being rewritten, or deleted meanwhile
        except CorruptObject as error:
            if not store.is_committed(key):
                return "corrupt", str(error)
            info = store.commit_info(key)
            size = info.size if info is not None else size
    return "changed", None


def _next_step(store: Store, job: str) -> tuple[str, list[str]]:
    """(state of the job after the deletions, extra keys withdrawn) -> see verify_job."""
    from tlq_farm import steps

    withdrawn: list[str] = []
    if not store.is_committed(keys.manifest(job)):
        return "unstaged", withdrawn
    try:
        _, _, _, rec = steps.reconcile_job(store, job)
    except NotCommitted:
        return "unstaged", withdrawn
    if rec.missing:
        # Lost staged inputs that the job still needs: without a manifest, staging runs again.
        store.delete(keys.manifest(job))
        withdrawn.append(keys.manifest(job))
        return "unstaged", withdrawn
    return ("done" if rec.done else "resumable"), withdrawn


def verify_job(store: Store, job: str, *, progress: Callable[[int, int], None] | None = None) -> dict:
    """Check every committed object of `job` in `store`; delete those that fail -> a summary dict.

    progress(nbytes, total_bytes) is called once with 0 before the first read, then after each object.

    Summary: job, store, objects and bytes checked, total (objects listed), corrupt (keys, deleted with
    their markers), problems (key -> the store's message), changed (keys rewritten or withdrawn while
    being checked: not judged), withdrawn (further keys deleted so that the job recomputes or restages
    what was lost), state ("ok": nothing was corrupt; "resumable": resume recomputes what was deleted;
    "done": the export is committed and nothing deleted is needed again; "unstaged": the job must be
    staged again) and next (one line: what to do).
    """
    prefix = keys.job_prefix(job)
    listed = []
    for key in store.list_committed(prefix):
        info = store.commit_info(key)
        if info is not None:
            listed.append((key, info.size))
        else:  # a damaged marker: the verifying read reports and deletes it
            listed.append((key, 0))
    total_bytes = sum(size for _, size in listed)
    if progress is not None:
        progress(0, total_bytes)

    corrupt, changed, problems = [], [], {}
    checked = checked_bytes = 0
    with tempfile.TemporaryDirectory(prefix="tlq-verify-") as tmp:
        for key, size in listed:
            outcome, problem = _verify_one(store, key, size, Path(tmp))
            if outcome == "changed":
                changed.append(key)
            else:
                checked += 1
                checked_bytes += size
                if outcome == "corrupt":
                    corrupt.append(key)
                    problems[key] = problem
            if progress is not None:
                progress(size, total_bytes)

    withdrawn: list[str] = []
    # The export index commits the whole export: with one of its files gone it must go too, so that the
    # export task runs again instead of the job passing for finished.
    index = keys.export_index(job)
    if any(k.startswith(keys.export_prefix(job)) for k in corrupt) and store.is_committed(index):
        store.delete(index)
        withdrawn.append(index)

    summary = {"job": job, "store": store.url, "objects": checked, "bytes": checked_bytes, "total": len(listed),
               "corrupt": corrupt, "problems": problems, "changed": changed}
    if not corrupt:
        return {**summary, "withdrawn": withdrawn, "state": "ok", "next": None}
    state, more = _next_step(store, job)
    withdrawn += more
    where = f" --store {store.url}"
    if state == "resumable":
        step = f"`tlq-farm resume {job}{where}` recomputes them"
    elif state == "done":
        step = "nothing to recompute: the job's export is committed and no longer needs them"
    else:
        step = ("they include staged inputs that no task recomputes: `tlq-farm run` with the same model, data and "
                f"options and `--store {store.url}` stages the job again and keeps its committed work")
    return {**summary, "withdrawn": withdrawn, "state": state, "next": step}
