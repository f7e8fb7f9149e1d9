"""`tlq-farm verify JOB`: check every committed object of a job against its marker; delete what fails."""

from __future__ import annotations

import json
import sys

import click

DEFAULT_STORE = "tlq-runs"


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            break
    return f"{n:.1f} {unit}"


class _Bar:
    """A byte progress bar on stderr, made on the first call (when the total is known)."""

    def __init__(self, job: str, quiet: bool):
        self.job, self.quiet, self.bar = job, quiet, None

    def __call__(self, nbytes: int, total: int) -> None:
        if self.quiet:
            return
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=f"verify {self.job}", unit="B", unit_scale=True, unit_divisor=1024,
                            dynamic_ncols=True, leave=False, file=sys.stderr)
        self.bar.update(nbytes)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@click.command("verify")
@click.argument("job")
@click.option("--store", "store_url", envvar="TLQ_STORE_URL", default=DEFAULT_STORE,
              help="Job store: s3://BUCKET/PREFIX or a folder [env TLQ_STORE_URL; default ./tlq-runs].")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def verify_command(job, store_url, as_json, quiet):
    """Read back every committed object of JOB and check its sha256 and size against its commit marker.

    Objects that fail are deleted with their markers, so that `tlq-farm resume JOB` recomputes them.
    Exits with 1 when anything was corrupt."""
    from tlq_farm.store import StoreError, keys, open_store
    from tlq_farm.verify import verify_job

    try:
        keys.job_prefix(job)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="JOB") from None
    bar = _Bar(job, quiet)
    try:
        store = open_store(store_url, create=False)
        summary = verify_job(store, job, progress=bar)
    except (StoreError, ValueError) as e:  # ValueError: a malformed store URL
        raise click.ClickException(str(e)) from e
    finally:
        bar.close()
    if not summary["total"]:
        raise click.ClickException(f"job {job} has no committed objects in {store.url}: check the job id "
                                   "(`tlq-farm jobs`) and --store")
    if as_json:
        click.echo(json.dumps(summary, indent=2, sort_keys=True))
    else:
        for key in summary["corrupt"]:
            click.echo(f"corrupt, deleted: {key}")
        for key in summary["withdrawn"]:
            click.echo(f"withdrawn: {key}")
        for key in summary["changed"]:
            click.echo(f"rewritten while being checked, not judged: {key}")
        checked = f"{summary['objects']} objects, {_size(summary['bytes'])}"
        if not summary["corrupt"]:
            click.echo(f"job {job}: checked {checked}; every object matches its commit marker")
    if summary["corrupt"]:
        n = len(summary["corrupt"])
        # With --json the summary goes to stderr, so that stdout stays one JSON document.
        click.echo(f"job {job}: {n} of {summary['objects']} objects were corrupt and are deleted; {summary['next']}",
                   err=as_json)
        raise click.exceptions.Exit(1)
