"""`tlq-farm report`: an HTML page (index.html + PNGs) about one job, from an export folder or a job in the store."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

REPORT_FILE = "tlq_report.json"
DEFAULT_STORE = "tlq-runs"


def read_export_report(export_dir: Path) -> dict:
    """tlq_report.json of an export folder (a click error when it is missing or unreadable)."""
    path = export_dir / REPORT_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise click.ClickException(f"{export_dir} has no {REPORT_FILE}: pass an export written by `tlq-farm run` "
                                   "or a job id in the store") from None
    except ValueError as e:
        raise click.ClickException(f"{path} is not valid JSON ({e}); re-export the job") from e


def read_job(store_url: str, job: str) -> tuple[dict, list[dict]]:
    """(tlq_report.json of the job's committed export, its task records) from the store."""
    from tlq_farm.store import StoreError, open_store
    from tlq_farm.store import keys
    from tlq_farm.store.tensors import get_json

    try:
        store = open_store(store_url)
        if not store.is_committed(keys.export_index(job)):
            raise click.ClickException(f"{job} is neither an export folder nor a job with a finished export in "
                                       f"{store.url}: follow it with `tlq-farm status {job}`, or pass --store")
        report = get_json(store, keys.export_file(job, REPORT_FILE))
        records = [get_json(store, k) for k in sorted(store.list_committed(keys.tasks_prefix(job)))]
    except (StoreError, ValueError) as e:
        raise click.ClickException(f"cannot read job {job} from {store_url}: {e}") from e
    return report, records


def recompute_importance(report: dict, samples: int, device: str):
    """importance_maps() for the job's spec, or (None, why not) when its model or data are not here."""
    from tlq_farm.report import importance_maps

    spec = report.get("spec") or {}
    for what in ("model", "calib"):
        if not spec.get(what) or not Path(spec[what]).exists():
            return None, (f"The job's {'model' if what == 'model' else 'calibration data'} {spec.get(what)} is not "
                          "on this machine, so the importance maps were not recomputed.")
    method = (spec.get("quant") or {}).get("method")
    note = f"{samples} samples, the job's seed {spec.get('seed', 0)}."
    if method == "rtn":
        note += " RTN uses no calibration data: every token weighs the same."
    return importance_maps(spec, n_samples=samples, device=device), note


@click.command("report")
@click.argument("job_or_export_dir")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Folder for index.html and its PNGs.")
@click.option("--store", "store_url", envvar="TLQ_STORE_URL", default=None,
              help=f"Job store for a job id: s3://BUCKET/PREFIX or a folder [env TLQ_STORE_URL; default ./{DEFAULT_STORE}].")
@click.option("--samples", default=4, show_default=True, type=int, help="Calibration samples for the importance maps.")
@click.option("--no-importance", is_flag=True, help="Skip recomputing the token importance (no model needed).")
@click.option("--device", default="cpu", show_default=True, help="Device for the importance recompute.")
def report_command(job_or_export_dir, out, store_url, samples, no_importance, device):
    """Write an HTML report of JOB_OR_EXPORT_DIR (an export folder with tlq_report.json, or a job id in the
    store): per-module losses, token-importance maps over the image patches, and a timeline."""
    from tlq_farm.report import build_report

    if samples < 1:
        raise click.UsageError("--samples must be at least 1")
    path = Path(job_or_export_dir)
    records: list[dict] = []
    if path.is_dir():
        report = read_export_report(path)
    elif os.sep in job_or_export_dir or job_or_export_dir.startswith("."):
        raise click.ClickException(f"{job_or_export_dir} does not exist: pass an export folder or a job id")
    else:
        report, records = read_job(store_url or DEFAULT_STORE, job_or_export_dir)
    if no_importance:
        maps, note = None, "Skipped (--no-importance)."
    else:
        try:
            maps, note = recompute_importance(report, samples, device)
        except (ValueError, FileNotFoundError) as e:
            maps, note = None, f"The importance maps could not be recomputed: {e}"
    index = build_report(report, out, task_records=records, importance=maps, importance_note=note)
    click.echo(str(index))
