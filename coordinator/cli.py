"""`tlq-farm`: the command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from tlq_farm.spec import IMPORTANCE, METHODS, JobSpec, QuantSpec, SpecError


def _demo_paths() -> tuple[str, str]:
    try:
        from tlq_farm.demo import DEMO_CALIB_JSONL, DEMO_MODEL_DIR
    except ImportError as e:  # pragma: no cover - the demo ships with the package
        raise click.ClickException(f"the bundled demo model is missing from this install ({e}); pass MODEL_DIR and --calib") from e
    return str(DEMO_MODEL_DIR), str(DEMO_CALIB_JSONL)


def _default_out(model: str, q: QuantSpec) -> Path:
    gs = "pc" if q.group_size == -1 else f"g{q.group_size}"
    act = f"a{q.act_bits}" if q.act_bits else ""
    return Path("tlq-runs") / f"{Path(model).name}-w{q.bits}{act}{gs}-{q.method}-{q.importance}"


def _user_errors():
    from tlq_farm.calib.data import CalibError
    from tlq_farm.calib.encode import SampleTooLong
    from tlq_farm.models.adapter import UnsupportedModel

    from tlq_farm.staging import StagingError
    from tlq_farm.steps import JobStuck
    from tlq_farm.store import StoreError

    return (SpecError, CalibError, SampleTooLong, UnsupportedModel, FileExistsError, FileNotFoundError, StagingError,
            JobStuck, StoreError)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tlq-farm")
def main() -> None:
    """Token-importance-weighted, layer-wise post-training quantization of vision-language models."""


@main.command()
@click.argument("model_dir", required=False)
@click.option("--calib", "calib", help="Calibration data: JSONL file, folder of JSONL, or a datasets.save_to_disk folder. Default with no MODEL_DIR: the bundled demo set.")
@click.option("--out", "out", type=click.Path(file_okay=False), help="Output folder (default: ./tlq-runs/<model>-<scheme>).")
@click.option("--bits", default=4, show_default=True, type=int, help="Weight bits: 2, 3, 4 or 8.")
@click.option("--group-size", default=128, show_default=True, type=int, help="Columns per scale group; -1 for per-channel.")
@click.option("--sym/--asym", default=True, show_default=True, help="Symmetric grid (no zero point) or asymmetric.")
@click.option("--act-bits", type=click.Choice(["8"]), default=None, help="Dynamic per-token int8 activations (W4A8 / W8A8).")
@click.option("--method", type=click.Choice(METHODS), default="gptq", show_default=True)
@click.option("--importance", type=click.Choice(IMPORTANCE), default="uniform", show_default=True, help="Token-importance strategy for the Hessian.")
@click.option("--samples", default=128, show_default=True, type=int)
@click.option("--seq-len", default=2048, show_default=True, type=int, help="Longest sample in tokens; longer ones are skipped and counted.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--act-order/--no-act-order", default=False, show_default=True)
@click.option("--static-groups/--no-static-groups", default=False, show_default=True)
@click.option("--damp", default=0.01, show_default=True, type=float, help="Damping as a fraction of mean(diag H).")
@click.option("--blocksize", default=128, show_default=True, type=int, help="GPTQ lazy-update block size.")
@click.option("--true-sequential/--no-true-sequential", default=True, show_default=True)
@click.option("--quantize-vision", is_flag=True, help="Quantize the vision tower's blocks too (kept full precision by default).")
@click.option("--tlq-keep", default=0.5, show_default=True, type=float, help="tlq: fraction of vision tokens kept in the token-level calibration set.")
@click.option("--qig-steps", default=32, show_default=True, type=int, help="qig: integration steps.")
@click.option("--format", "fmt", type=click.Choice(["compressed", "fake"]), default="compressed", show_default=True)
@click.option("--shard-tokens", default=8192, show_default=True, type=int, help="Calibration tokens per shard (shards are fixed by the job, not by the workers).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N (embedded and in-memory runs).")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--broker", envvar="TLQ_BROKER_URL", help="Redis URL of the farm [env TLQ_BROKER_URL]; without one the job runs embedded, in this process.")
@click.option("--store", "store_url", envvar="TLQ_STORE_URL", help="Job store: s3://BUCKET/PREFIX or a folder [env TLQ_STORE_URL; default ./tlq-runs].")
@click.option("--detach", is_flag=True, help="Farm: stage and enqueue, print the job id and return at once.")
@click.option("--in-memory", is_flag=True, help="Run the in-memory reference pipeline (no store, no tasks).")
@click.option("--workers", "n_workers", default=1, show_default=True, type=click.IntRange(1, 64),
              help="No broker: run the job's tasks in N local processes (one torch thread each when N > 1).")
def run(model_dir, calib, out, bits, group_size, sym, act_bits, method, importance, samples, seq_len, seed, act_order,
        static_groups, damp, blocksize, true_sequential, quantize_vision, tlq_keep, qig_steps, fmt, shard_tokens, device,
        overwrite, quiet, broker, store_url, detach, in_memory, n_workers):
    """Quantize MODEL_DIR (default: the bundled demo VLM) and export it.

    With no broker the job's tasks run here, through the same store and reconciler as on a farm; with
    --broker they go to the farm's workers and this command follows the job (Ctrl-C detaches; the job goes
    on). Running the same model, data and options again attaches to the existing job.
    """
    if model_dir is None:
        model_dir, demo_calib = _demo_paths()
        calib = calib or demo_calib
    if calib is None:
        raise click.UsageError("--calib is required when MODEL_DIR is given")
    q = QuantSpec(bits=bits, group_size=group_size, sym=sym, act_bits=int(act_bits) if act_bits else None, method=method,
                  importance=importance, act_order=act_order, static_groups=static_groups, damp=damp, blocksize=blocksize,
                  true_sequential=true_sequential, quantize_vision=quantize_vision, tlq_keep=tlq_keep, qig_steps=qig_steps)
    spec = JobSpec(model=str(model_dir), calib=str(calib), quant=q, samples=samples, seq_len=seq_len, seed=seed, fmt=fmt,
                   shard_tokens=shard_tokens)
    out_dir = Path(out) if out else _default_out(model_dir, q)
    log = (lambda m: None) if quiet else (lambda m: click.echo(m, err=True))
    try:
        spec.validate()
        if out_dir.exists() and any(out_dir.iterdir()) and not overwrite and not detach:
            raise FileExistsError(f"output folder {out_dir} is not empty: choose another --out or pass --overwrite")
        if in_memory or quantize_vision:
            if quantize_vision and not in_memory:
                log("--quantize-vision runs in memory (the farm does not split the vision tower yet)")
            _run_in_memory(spec, out_dir, device, quiet, overwrite)
            return
        store = _open_store(store_url)
        from tlq_farm.staging import stage_job

        job, attached = stage_job(store, spec, log=log)
        click.echo(f"job {job} {'(attached to the existing job)' if attached else '(staged)'} in {store.url}", err=True)
        if not broker:
            from tlq_farm.steps import run_embedded

            if n_workers > 1:
                from coordinator.local_pool import run_pool

                try:
                    run_pool(store.url, job, workers=n_workers, device=device)
                except RuntimeError as e:
                    raise click.ClickException(str(e)) from e
            else:
                run_embedded(store, job, device=device, progress=not quiet)
            _finish(store, job, out_dir, overwrite)
            return
        _set_broker(broker)
        from worker import dispatch

        dispatch.advance(store.url, job, store)
        if detach:
            click.echo(job)
            return
        _follow(store, job, out_dir, overwrite, quiet)
    except _user_errors() as e:
        raise click.ClickException(str(e)) from e


def _run_in_memory(spec, out_dir, device, quiet, overwrite):
    from tlq_farm.pipeline import run_local

    report = run_local(spec, out_dir, device=device, progress=not quiet, log=lambda m: click.echo(m, err=True),
                       overwrite=overwrite)
    t = report["totals"]
    click.echo(f"quantized {t['modules']} linears ({t['quantized_params']:,} weights), total loss {t['loss']:.4g}, "
               f"{report['time']['total_s']:.1f}s -> {out_dir}")


def _open_store(store_url):
    from tlq_farm.store import open_store

    store = open_store(store_url or "tlq-runs")
    if hasattr(store, "ensure_bucket"):
        store.ensure_bucket()
    return store


def _set_broker(broker):
    """Point the Celery app at `broker` (flags override the environment)."""
    import os

    if not broker:
        raise click.UsageError("no broker: pass --broker redis://HOST:6379/0 or set TLQ_BROKER_URL")
    os.environ["TLQ_BROKER_URL"] = broker
    from worker import app as worker_app

    worker_app.app.conf.broker_url = broker
    worker_app._redis = None


def _finish(store, job, out_dir, overwrite):
    from coordinator.jobs import download_export

    download_export(store, job, out_dir, overwrite=overwrite)
    rep = json.loads((out_dir / "tlq_report.json").read_text()) if (out_dir / "tlq_report.json").exists() else None
    if rep:
        t = rep["totals"]
        click.echo(f"job {job}: quantized {t['modules']} linears ({t['quantized_params']:,} weights), "
                   f"total loss {t['loss']:.4g} -> {out_dir}")
    else:
        click.echo(f"job {job} -> {out_dir}")


def _live_workers(max_age_s: float = 60.0) -> list[dict]:
    import time

    from worker import dispatch

    try:
        return [w for w in dispatch.workers() if time.time() - w.get("last_seen", 0) < max_age_s]
    except Exception:
        return []


def _status(store, job) -> dict:
    from coordinator.jobs import job_status

    live = _live_workers()
    s = job_status(store, job, [w.get("class_bytes", 0) for w in live])
    s["workers_live"] = len(live)
    s["workers_busy"] = sum(1 for w in live if w.get("task"))
    return s


def _follow(store, job, out_dir, overwrite, quiet, every_s: float = 2.0, advance_every_s: float = 15.0):
    """Print progress until the export is committed, then download it; Ctrl-C detaches."""
    import time

    from coordinator.jobs import format_status
    from worker import dispatch

    last_advance = time.time()
    try:
        while True:
            s = _status(store, job)
            if not quiet:
                click.echo(format_status(s), err=True)
            if s["state"] == "done":
                break
            if s["state"] == "cancelled":
                raise click.ClickException(f"job {job} was cancelled")
            if time.time() - last_advance > advance_every_s:
                dispatch.advance(store.url, job, store)
                last_advance = time.time()
            time.sleep(every_s)
    except KeyboardInterrupt:
        click.echo(f"\ndetached from job {job}; it goes on. Follow it with `tlq-farm status {job}`.", err=True)
        return
    _finish(store, job, out_dir, overwrite)


@main.command()
@click.argument("job", required=False)
@click.option("--store", "store_url", envvar="TLQ_STORE_URL", help="Job store [env TLQ_STORE_URL; default ./tlq-runs].")
@click.option("--broker", envvar="TLQ_BROKER_URL", help="Redis URL, for worker counts [env TLQ_BROKER_URL].")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(job, store_url, broker, as_json):
    """Progress of JOB (default: every job in the store)."""
    from coordinator.jobs import format_status, job_status
    from tlq_farm.staging import list_jobs

    store = _open_store(store_url)
    jobs = [job] if job else list_jobs(store)
    try:
        if broker:
            _set_broker(broker)
            out = [_status(store, j) for j in jobs]
        else:
            out = [job_status(store, j) for j in jobs]
    except _user_errors() as e:
        raise click.ClickException(str(e)) from e
    if as_json:
        click.echo(json.dumps(out[0] if job else out, indent=2, sort_keys=True))
    else:
        click.echo("\n".join(format_status(s) for s in out) or f"no jobs in {store.url}")


@main.command()
@click.argument("job")
@click.option("--store", "store_url", envvar="TLQ_STORE_URL", help="Job store [env TLQ_STORE_URL].")
@click.option("--broker", envvar="TLQ_BROKER_URL", help="Redis URL of the farm [env TLQ_BROKER_URL]; without one the job finishes embedded, here.")
@click.option("--device", default="cpu", show_default=True, help="Embedded: cpu, cuda or cuda:N.")
def resume(job, store_url, broker, device):
    """Enqueue whatever JOB still needs (after a Redis flush, a lost worker or a stopped laptop)."""
    from tlq_farm.staging import load_manifest

    store = _open_store(store_url)
    try:
        load_manifest(store, job)
        if not broker:
            from tlq_farm.steps import run_embedded

            run_embedded(store, job, device=device, log=lambda m: click.echo(m, err=True))
            click.echo(f"job {job}: done; fetch it with `tlq-farm export {job} --out DIR`")
            return
        _set_broker(broker)
        from worker import dispatch

        out = dispatch.advance(store.url, job, store)
    except _user_errors() as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"job {job}: {out['state']}, {out['sent']} tasks sent")


@main.command()
@click.argument("job")
@click.option("--store", "store_url", envvar="TLQ_STORE_URL", help="Job store [env TLQ_STORE_URL].")
def cancel(job, store_url):
    """Stop JOB: its queued tasks skip and nothing new is sent; other jobs are untouched."""
    from coordinator.jobs import cancel_job

    store = _open_store(store_url)
    try:
        cancel_job(store, job)
    except _user_errors() as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"job {job}: cancelled")


@main.command()
@click.option("--store", "store_url", envvar="TLQ_STORE_URL", help="Job store [env TLQ_STORE_URL].")
def jobs(store_url):
    """Every job in the store, with its state."""
    from coordinator.jobs import job_status
    from tlq_farm.staging import describe, list_jobs, load_manifest

    store = _open_store(store_url)
    for j in list_jobs(store):
        s = job_status(store, j)
        p = s["progress"]
        click.echo(f"{j}  {s['state']:<9} {p['done']}/{p['total']}  {describe(load_manifest(store, j))}")


@main.command()
@click.option("--broker", envvar="TLQ_BROKER_URL", help="Redis URL of the farm [env TLQ_BROKER_URL].")
@click.option("--json", "as_json", is_flag=True)
def workers(broker, as_json):
    """Workers seen by the farm: host, device, memory class, current task, last seen."""
    import time

    from worker import dispatch

    _set_broker(broker)
    ws = dispatch.workers()
    if as_json:
        click.echo(json.dumps(ws, indent=2, sort_keys=True))
        return
    for w in ws:
        age = time.time() - w.get("last_seen", 0)
        click.echo(f"{w['id']:<28} {w.get('device', '?'):<7} {w.get('name', '')[:24]:<24} class {w.get('class', '?'):<5} "
                   f"{'busy ' + w['task'] if w.get('task') else 'idle'}  seen {age:.0f}s ago{' (gone?)' if age > 60 else ''}")
    if not ws:
        click.echo("no workers have reported to this broker")


@main.command()
@click.argument("job")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Folder to write the checkpoint to.")
@click.option("--store", "store_url", envvar="TLQ_STORE_URL", help="Job store [env TLQ_STORE_URL].")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out.")
def export(job, out, store_url, overwrite):
    """Download JOB's exported checkpoint to --out."""
    store = _open_store(store_url)
    try:
        _finish(store, job, Path(out), overwrite)
    except _user_errors() as e:
        raise click.ClickException(str(e)) from e


def _visible_gpus() -> str | None:
    """'0,1,...' for the GPUs this process sees (CUDA_VISIBLE_DEVICES entries when set), None without CUDA."""
    import os

    try:
        import torch

        count = torch.cuda.device_count()
    except Exception:  # no usable CUDA runtime: a CPU worker
        return None
    if count == 0:
        return None
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return ",".join(visible[:count] if visible else [str(i) for i in range(count)])


@main.command()
@click.option("--broker", envvar="TLQ_BROKER_URL", help="Redis URL of the farm [env TLQ_BROKER_URL].")
@click.option("--device", default=None, help="cpu or cuda (default: one process per visible GPU, else cpu).")
@click.option("--gpus", default=None, help="Comma-separated GPU indices: one worker process per GPU (CUDA_VISIBLE_DEVICES).")
@click.option("--max-memory", default=None, help="Cap on the memory this worker plans to use, e.g. 24g (CPU: default 90% of RAM).")
@click.option("--threads", default=None, type=int, help="torch threads per worker process.")
@click.option("--loglevel", default="INFO", show_default=True)
def worker(broker, device, gpus, max_memory, threads, loglevel):
    """Start a farm worker: probe the device, listen on the queues of its memory class and below."""
    import os
    import subprocess
    import sys

    if not broker:
        raise click.UsageError("no broker: pass --broker redis://HOST:6379/0 or set TLQ_BROKER_URL")
    env = dict(os.environ, TLQ_BROKER_URL=broker)
    if max_memory:
        from worker.probe import parse_size

        try:
            parse_size(max_memory)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--max-memory") from e
        env["TLQ_MAX_MEMORY"] = max_memory
    if threads:
        env["TLQ_TORCH_THREADS"] = str(threads)
    argv = [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "--pool", "solo", "-c", "1",
            "--without-gossip", "--without-mingle", "--loglevel", loglevel]
    if gpus is None and device is None:
        gpus = _visible_gpus()
        if gpus and len(gpus.split(",")) == 1:
            device, gpus = "cuda", None  # the one visible GPU: keep CUDA_VISIBLE_DEVICES as it is
    if gpus:
        procs = []
        for index in [g.strip() for g in gpus.split(",") if g.strip()]:
            genv = dict(env, CUDA_VISIBLE_DEVICES=index, TLQ_DEVICE="cuda")
            procs.append(subprocess.Popen(argv + ["--hostname", f"tlq-gpu{index}@%h"], env=genv))
        try:
            sys.exit(max(p.wait() for p in procs))
        except KeyboardInterrupt:
            for p in procs:
                p.terminate()
            sys.exit(130)
    env["TLQ_DEVICE"] = device or env.get("TLQ_DEVICE", "cpu")
    os.execve(sys.executable, argv, env)


from coordinator.eval_cmd import eval_command  # noqa: E402
from coordinator.report_cmd import report_command  # noqa: E402

main.add_command(eval_command)
main.add_command(report_command)

if __name__ == "__main__":  # pragma: no cover
    main()
