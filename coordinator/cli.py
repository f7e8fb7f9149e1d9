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
    from tlq_farm.evaluate import EvalInputError
    from tlq_farm.models.adapter import UnsupportedModel

    from tlq_farm.staging import StagingError
    from tlq_farm.steps import JobStuck
    from tlq_farm.store import StoreError

    from tlq_farm.jobs import ExportWriteError

    return (SpecError, CalibError, SampleTooLong, UnsupportedModel, FileExistsError, FileNotFoundError, StagingError,
            JobStuck, StoreError, ExportWriteError, EvalInputError)


DEFAULT_STORE = "tlq-runs"
INTERRUPTED = 130  # the shell's code for a process stopped by Ctrl-C (128 + SIGINT)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _safe_url(url: str | None) -> str:
    """`url` with its password masked, fit to print."""
    from urllib.parse import urlsplit, urlunsplit

    if not url:
        return "(none)"
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.hostname or ""
        netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return "(unparsable URL)"


def _broker_message(error: Exception) -> str | None:
    """A one-line message for a broker (Redis / kombu) error, None for other errors."""
    import os

    broker = _safe_url(os.environ.get("TLQ_BROKER_URL"))
    text = _one_line(error) or type(error).__name__
    refused_login = ("the broker {0} refused the login ({1}): check the password in --broker / TLQ_BROKER_URL "
                     "(redis://:PASSWORD@HOST:6379/0)")
    unreachable = ("cannot reach the broker {0} ({1}): check --broker / TLQ_BROKER_URL, and that Redis runs "
                   "there and this machine may connect to it")
    login_words = ("NOAUTH", "WRONGPASS", "invalid password", "invalid username-password", "Authentication")
    try:
        import redis.exceptions as rx
    except ImportError:  # pragma: no cover - redis comes with the farm's dependencies
        rx = None
    if rx is not None:
        if isinstance(error, rx.AuthenticationError) or (isinstance(error, rx.ResponseError)
                                                          and any(w in text for w in login_words)):
            return refused_login.format(broker, text)
        if isinstance(error, (rx.ConnectionError, rx.TimeoutError)):
            return unreachable.format(broker, text)
        if isinstance(error, rx.RedisError):
            return f"the broker {broker} answered an error ({text}): check that --broker / TLQ_BROKER_URL is the farm's Redis"
    try:
        from kombu.exceptions import OperationalError
    except ImportError:  # pragma: no cover
        return None
    if isinstance(error, OperationalError):
        return (refused_login if any(w in text for w in login_words) else unreachable).format(broker, text)
    return None


def _known_error(error: Exception) -> str | None:
    """The one-line message for an error a user can fix, None for a bug (which keeps its traceback)."""
    import errno

    if isinstance(error, _user_errors()):
        return _one_line(error)
    fixes = {errno.ENOSPC: "free space there or write elsewhere", errno.EACCES: "fix its permissions or write elsewhere",
             errno.EROFS: "write elsewhere"}
    if isinstance(error, OSError) and error.errno in fixes:
        where = f" ({error.filename})" if error.filename else ""
        return f"{error.strerror or _one_line(error)}{where}: {fixes[error.errno]}"
    return _broker_message(error)


class _Commands(click.Group):
    """The `tlq-farm` group: a known failure of any command ends in a one-line error, not a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as error:
            message = _known_error(error)
            if message is None:
                raise
            raise click.ClickException(message) from error


def _check_job_id(job: str) -> str:
    """`job` if it is a valid job id, else a one-line error (ids become store paths: no '../')."""
    from tlq_farm.store import keys

    try:
        keys.job_prefix(job)
    except ValueError as e:
        raise click.ClickException(f"{e}; list the jobs of a store with `tlq-farm jobs --store URL`") from None
    return job


def _check_device(device: str) -> None:
    """Refuse a device this machine does not have, before anything is staged or loaded."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise click.ClickException(f"--device {device!r} is not a device: use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return
    if dev.type != "cuda":
        raise click.ClickException(f"--device {device}: only cpu and cuda devices are supported; use cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise click.ClickException(f"--device {device}: no CUDA GPU is usable here (torch.cuda.is_available() is "
                                   "False); use --device cpu, or run where a GPU and its driver are present")
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise click.ClickException(f"--device {device}: this machine has {count} visible GPU(s), numbered "
                                   f"0..{count - 1}; pass one of them (CUDA_VISIBLE_DEVICES limits what is visible)")


def _relation(path: Path, other: Path) -> str | None:
    """How `path` overlaps `other` ("is", "contains", "lies inside"), None when they are apart."""
    if path == other:
        return "is"
    if other.is_relative_to(path):
        return "contains"
    if path.is_relative_to(other):
        return "lies inside"
    return None


def _check_out_apart(out_dir: Path, *, model: str | None = None, calib: str | None = None,
                     store_folder: Path | None = None) -> None:
    """Refuse an --out that overlaps an input or the store: writing an export there (and, with --overwrite,
    first deleting the folder) would destroy what the job reads from or keeps its state in."""
    out = out_dir.expanduser().resolve()
    inputs = []
    if model is not None:
        inputs.append(("the model folder", Path(model).expanduser().resolve()))
    if calib is not None:
        calib_path = Path(calib).expanduser().resolve()
        inputs.append(("the calibration data" if calib_path.is_file() else "the calibration folder", calib_path))
    for label, path in inputs:
        rel = _relation(out, path)
        if rel:
            raise click.ClickException(f"--out {out_dir} {rel} {label} {path}: the export would overwrite it; "
                                       "choose an --out outside it")
    if store_folder is not None:
        # The store owns its jobs/ and .locks/ folders; other names beside them (the default
        # ./tlq-runs/<model>-<scheme> exports) are free.
        from tlq_farm.store import keys
        from tlq_farm.store.local import LOCK_FOLDER

        rel = _relation(out, store_folder)
        owned = [store_folder / keys.JOBS, store_folder / LOCK_FOLDER]
        if rel in ("is", "contains") or any(_relation(out, o) for o in owned):
            raise click.ClickException(f"--out {out_dir} {rel} the store folder {store_folder}: the export would "
                                       "overwrite the jobs kept there; choose an --out outside it (or beside its "
                                       "jobs/ folder)")


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
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
@click.option("--method", type=click.Choice(METHODS), default="gptq", show_default=True,
              help="rtn: round to nearest; gptq: GPTQ on the quantized chain; gptaq: GPTQ pulled towards the full-precision chain.")
@click.option("--importance", type=click.Choice(IMPORTANCE), default="uniform", show_default=True, help="Token-importance strategy for the Hessian.")
@click.option("--samples", default=128, show_default=True, type=int, help="Calibration samples: the first N rows after a seeded shuffle.")
@click.option("--seq-len", default=2048, show_default=True, type=int, help="Longest sample in tokens; longer ones are skipped and counted.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the calibration shuffle.")
@click.option("--act-order/--no-act-order", default=False, show_default=True,
              help="GPTQ: quantize columns in order of decreasing Hessian diagonal.")
@click.option("--static-groups/--no-static-groups", default=False, show_default=True,
              help="With --act-order: fix the scale groups before reordering (the compressed format needs it).")
@click.option("--damp", default=0.01, show_default=True, type=float, help="Damping as a fraction of mean(diag H).")
@click.option("--blocksize", default=128, show_default=True, type=int, help="GPTQ lazy-update block size.")
@click.option("--true-sequential/--no-true-sequential", default=True, show_default=True,
              help="Solve a block's groups (qkv, o, gate/up, down) in order, each on the outputs of those before it.")
@click.option("--quantize-vision", is_flag=True, help="Quantize the vision tower's blocks too (kept full precision by default).")
@click.option("--tlq-keep", default=0.5, show_default=True, type=float, help="tlq: fraction of vision tokens kept in the token-level calibration set.")
@click.option("--qig-steps", default=32, show_default=True, type=int, help="qig: integration steps.")
@click.option("--format", "fmt", type=click.Choice(["compressed", "fake"]), default="compressed", show_default=True,
              help="compressed: a compressed-tensors checkpoint; fake: plain dequantized weights.")
@click.option("--shard-tokens", default=8192, show_default=True, type=int, help="Calibration tokens per shard (shards are fixed by the job, not by the workers).")
@click.option("--partition-tokens", default=0, show_default=True, type=int,
              help="Calibration tokens per statistics partition; 0 chooses from the model's shapes (a partition's "
                   "statistics never outweigh its activations, nor its work a task's cost). Larger partitions move fewer "
                   "bytes.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N (embedded and in-memory runs).")
@click.option("--dtype", "dtype", type=click.Choice(["auto", "bfloat16", "float16", "float32"]), default="auto",
              show_default=True, help="What blocks compute in and activations are stored in; auto: the checkpoint's "
              "dtype on GPUs (the farm, --device cuda), float32 on a CPU. Statistics are float32 sums either way.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option("--broker", envvar="TLQ_BROKER_URL", help="Redis URL of the farm [env TLQ_BROKER_URL]; without one the job runs embedded, in this process.")
@click.option("--store", "store_url", envvar="TLQ_STORE_URL", help="Job store: s3://BUCKET/PREFIX or a folder [env TLQ_STORE_URL; default ./tlq-runs].")
@click.option("--create-store", is_flag=True,
              help="Create the --store folder or bucket if it does not exist (otherwise a missing one is an error).")
@click.option("--detach", is_flag=True, help="Farm: stage and enqueue, print the job id and return at once.")
@click.option("--threads", default="auto", show_default=True,
              help="torch threads of an embedded or in-memory run on the CPU; auto: about one per 1024 of the model's "
                   "hidden width (narrow blocks keep no more busy), or $OMP_NUM_THREADS when set.")
@click.option("--in-memory", is_flag=True, help="Keep nothing: run the job's tasks here on a temporary store that is "
              "deleted at the end (no resume).")
@click.option("--workers", "n_workers", default=1, show_default=True, type=click.IntRange(1, 64),
              help="No broker: run the job's tasks in N local processes (one torch thread each when N > 1).")
def run(model_dir, calib, out, bits, group_size, sym, act_bits, method, importance, samples, seq_len, seed, act_order,
        static_groups, damp, blocksize, true_sequential, quantize_vision, tlq_keep, qig_steps, fmt, shard_tokens, partition_tokens,
        device, dtype, overwrite, quiet, broker, store_url, create_store, detach, threads, in_memory, n_workers):
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
    from tlq_farm.models.adapter import import_model_code

    import_model_code()  # staging reads the config and runs the processor; the tasks run the model's code
    q = QuantSpec(bits=bits, group_size=group_size, sym=sym, act_bits=int(act_bits) if act_bits else None, method=method,
                  importance=importance, act_order=act_order, static_groups=static_groups, damp=damp, blocksize=blocksize,
                  true_sequential=true_sequential, quantize_vision=quantize_vision, tlq_keep=tlq_keep, qig_steps=qig_steps)
    spec = JobSpec(model=str(model_dir), calib=str(calib), quant=q, samples=samples, seq_len=seq_len, seed=seed, fmt=fmt,
                   shard_tokens=shard_tokens, partition_tokens=partition_tokens,
                   dtype=_job_dtype(dtype, model_dir, device, farm=bool(broker) and not in_memory))
    out_dir = Path(out) if out else _default_out(model_dir, q)
    log = (lambda m: None) if quiet else (lambda m: click.echo(m, err=True))
    if not broker or in_memory:  # the device is used only where this process computes
        _check_device(device)
    n_threads = _thread_count(threads)
    try:
        spec.validate()
        _check_out_apart(out_dir, model=str(model_dir), calib=str(calib), store_folder=_store_folder(store_url))
        if out_dir.exists() and any(out_dir.iterdir()) and not overwrite and not detach:
            # An earlier export there may be this very job's (a rerun after the coordinator died between the
            # download and its exit): checked file by file once the job id is known.
            if in_memory or not (out_dir / "tlq_report.json").is_file():
                raise FileExistsError(f"output folder {out_dir} is not empty: choose another --out or pass "
                                      f"--overwrite")
        if in_memory or not broker:  # staging, encoding and the tasks all compute here
            _set_threads(n_threads, _hidden_size(spec.model), device)
        if in_memory:
            try:
                _run_in_memory(spec, out_dir, device, quiet, overwrite)
            except KeyboardInterrupt:
                click.echo("interrupted: an in-memory run keeps nothing; run the same command again to start over",
                           err=True)
                raise click.exceptions.Exit(INTERRUPTED) from None
            return
        if broker:
            _set_broker(broker)  # before staging: a broker that cannot be reached leaves nothing staged
            from tlq_farm.spec import farm_dtype_note

            note = farm_dtype_note(dtype, spec.dtype, [w.get("device", "cpu") for w in _live_workers()])
            if note:
                click.echo(note, err=True)
        # The default folder may be made (the first `tlq-farm run` on a fresh machine); a named store must exist.
        store = _open_store(store_url, create=create_store or not store_url, run=True)
        from tlq_farm.staging import stage_job

        job = None
        try:
            # What the data did not give is said even with --quiet, which hides only progress.
            job, attached = stage_job(store, spec, log=log, warn=lambda m: click.echo(m, err=True))
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
        except KeyboardInterrupt:
            _interrupted(store, job, "run the same command again")
        from worker import dispatch

        dispatch.advance(store.url, job, store)
        if detach:
            click.echo(job)
            return
        _follow(store, job, out_dir, overwrite, quiet)
    except _user_errors() as e:
        raise click.ClickException(str(e)) from e


def _thread_count(option: str) -> int | None:
    """--threads as a count (None: auto), refused in one line when it is neither."""
    if option == "auto":
        return None
    try:
        n = int(option)
    except ValueError:
        n = 0
    if n < 1:
        raise click.BadParameter(f"{option!r} is not a number of threads: give auto or a count such as 4",
                                 param_hint="--threads")
    return n


def _hidden_size(model_dir: str) -> int:
    from tlq_farm.staging import model_config

    config = model_config(model_dir)
    return int((config.get_text_config() if hasattr(config, "get_text_config") else config).hidden_size)


def _set_threads(count: int | None, hidden: int, device: str) -> None:
    """torch threads for computing a job here: the --threads count, or plan.cpu_threads for the model's
    width on a CPU (unless OMP_NUM_THREADS says how many)."""
    import os

    import torch

    from tlq_farm.plan import cpu_threads

    if count is not None:
        torch.set_num_threads(count)
    elif not os.environ.get("OMP_NUM_THREADS") and str(device).startswith("cpu"):
        torch.set_num_threads(cpu_threads({"sizes": {"hidden": hidden}}, os.cpu_count() or 1))


def _job_dtype(option: str, model_dir: str, device: str, farm: bool) -> str:
    """--dtype as the job computes it (auto resolved from the checkpoint and where the job runs)."""
    from tlq_farm.spec import resolve_dtype
    from tlq_farm.staging import checkpoint_dtype

    try:
        found = checkpoint_dtype(model_dir)
    except Exception:  # not a readable model folder: staging refuses it, with its own message
        found = "float32"
    return resolve_dtype(option, found, device, farm)


def _interrupted(store, job, again: str):
    """Ctrl-C in a run that computes here: say how to go on, and exit with the shell's Ctrl-C code."""
    if job is None:
        click.echo(f"interrupted while staging: {again} to stage the job (`tlq-farm prune --store {store.url}` "
                   "removes the incomplete one)", err=True)
    else:
        click.echo(f"interrupted: job {job} keeps every task it finished; {again}, or "
                   f"`tlq-farm resume {job} --store {store.url}`, to go on where it stopped", err=True)
    raise click.exceptions.Exit(INTERRUPTED)


def _run_in_memory(spec, out_dir, device, quiet, overwrite):
    from tlq_farm.pipeline import run_local

    report = run_local(spec, out_dir, device=device, progress=not quiet, log=lambda m: click.echo(m, err=True),
                       overwrite=overwrite)
    t = report["totals"]
    click.echo(f"quantized {t['modules']} linears ({t['quantized_params']:,} weights), total loss "
               f"{'n/a' if t['loss'] is None else format(t['loss'], '.4g')}, "
               f"{report['time']['total_s']:.1f}s -> {out_dir}")


def _open_store(store_url, *, create: bool = False, run: bool = False):
    """The job store of a command. Nothing is created unless `create`: only `run` creates a store (with
    --create-store, or its default folder), so a mistyped folder or bucket is an error, not a new store."""
    from tlq_farm.store import StoreMissing, open_store

    try:
        return open_store(store_url or DEFAULT_STORE, create=create)
    except StoreMissing as e:
        if not store_url:
            fix = "it is made by the first `tlq-farm run`; or pass --store / set TLQ_STORE_URL"
        elif run:
            fix = "check the name (--store / TLQ_STORE_URL), or pass --create-store to create it"
        else:
            fix = "check the name (--store / TLQ_STORE_URL); `tlq-farm run --create-store` creates a new store"
        raise click.ClickException(f"{e.what}: {fix}") from None
    except ValueError as e:
        raise click.ClickException(str(e)) from None


def _store_folder(store_url) -> Path | None:
    """The folder of a folder store (None for S3), without creating or opening anything."""
    from tlq_farm.store import local_folder

    try:
        return local_folder(store_url or DEFAULT_STORE)
    except ValueError as e:
        raise click.ClickException(str(e)) from None


def _set_broker(broker):
    """Point the Celery app at `broker` (flags override the environment)."""
    import os

    if not broker:
        raise click.UsageError("no broker: pass --broker redis://HOST:6379/0 or set TLQ_BROKER_URL")
    os.environ["TLQ_BROKER_URL"] = broker
    from worker import app as worker_app

    worker_app.use_broker(broker)
    _ping_broker(broker)


def _ping_broker(broker: str, timeout_s: float = 5.0) -> None:
    """Fail now, in one line, when the broker cannot be reached or refuses the login (not later, half way)."""
    if not broker.startswith(("redis://", "rediss://", "unix://")):
        return
    import redis

    try:
        client = redis.Redis.from_url(broker, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    except ValueError as e:
        raise click.ClickException(f"broker URL {_safe_url(broker)} is invalid ({e}): write redis://[:PASSWORD@]HOST:6379/0") from None
    try:
        client.ping()
    except redis.RedisError as e:
        raise click.ClickException(_broker_message(e)) from None
    finally:
        client.close()


def _finish(store, job, out_dir, overwrite):
    from tlq_farm.jobs import download_export

    download_export(store, job, out_dir, overwrite=overwrite)
    rep = json.loads((out_dir / "tlq_report.json").read_text()) if (out_dir / "tlq_report.json").exists() else None
    if rep:
        t = rep["totals"]
        click.echo(f"job {job}: quantized {t['modules']} linears ({t['quantized_params']:,} weights), "
                   f"total loss {'n/a' if t.get('loss') is None else format(t['loss'], '.4g')} -> {out_dir}")
    else:
        click.echo(f"job {job} -> {out_dir}")


def _live_workers(max_age_s: float = 60.0) -> list[dict]:
    import time

    from worker import dispatch

    try:
        return [w for w in dispatch.workers() if time.time() - w.get("last_seen", 0) < max_age_s]
    except Exception:
        return []


def _status(store, job, io: bool = False) -> dict:
    from tlq_farm.jobs import job_status

    from worker import dispatch

    live = _live_workers()
    s = job_status(store, job, [w.get("class_bytes", 0) for w in live],
                   stall=lambda ready: dispatch.stall_reason(store.url, job, ready, dispatch.workers()), io=io)
    s["workers_live"] = len(live)
    s["workers_busy"] = sum(1 for w in live if w.get("task"))
    return s


def _follow(store, job, out_dir, overwrite, quiet, every_s: float = 2.0, advance_every_s: float = 15.0):
    """Print progress until the export is committed, then download it; Ctrl-C detaches."""
    import time

    from tlq_farm.jobs import format_status
    from worker import dispatch

    from tlq_farm.steps import is_cancelled
    from tlq_farm.store import keys

    last_advance = time.time()
    events = dispatch.JobEvents(store.url, job)
    try:
        while True:
            # A full status lists the whole job: every poll when it is printed, else only as often as the
            # advance that looks for stalls; in between two marker lookups say whether the job ended.
            full = not quiet or time.time() - last_advance > advance_every_s
            if store.is_committed(keys.export_index(job)):
                break
            if is_cancelled(store, job):
                raise click.ClickException(f"job {job} was cancelled")
            if full:
                s = _status(store, job)
                if not quiet:
                    click.echo(format_status(s), err=True)
                if s["state"] == "done":
                    break
                if s["state"] == "stalled" or time.time() - last_advance > advance_every_s:
                    dispatch.advance(store.url, job, store)
                    last_advance = time.time()
            events.wait(every_s)  # ends early when a worker announces the job's end
    except KeyboardInterrupt:
        click.echo(f"\ndetached from job {job}; it goes on. Follow it with `tlq-farm status {job}`.", err=True)
        return
    finally:
        events.close()
    _finish(store, job, out_dir, overwrite)


@main.command()
@click.argument("job", required=False)
@click.option("--store", "store_url", envvar="TLQ_STORE_URL", help="Job store [env TLQ_STORE_URL; default ./tlq-runs].")
@click.option("--broker", envvar="TLQ_BROKER_URL", help="Redis URL, for worker counts [env TLQ_BROKER_URL].")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(job, store_url, broker, as_json):
    """Progress of JOB (default: every job in the store)."""
    from tlq_farm.jobs import format_status, job_status
    from tlq_farm.staging import list_jobs

    if job:
        _check_job_id(job)
    if broker:
        _set_broker(broker)
    store = _open_store(store_url)
    jobs = [job] if job else list_jobs(store)
    try:
        if broker:
            out = [_status(store, j, io=True) for j in jobs]
        else:
            out = [job_status(store, j, io=True) for j in jobs]
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

    _check_job_id(job)
    if broker:
        _set_broker(broker)
    else:
        _check_device(device)
    store = _open_store(store_url)
    try:
        load_manifest(store, job)
        if not broker:
            from tlq_farm.steps import run_embedded

            try:
                run_embedded(store, job, device=device, log=lambda m: click.echo(m, err=True))
            except KeyboardInterrupt:
                _interrupted(store, job, "run the same command again")
            click.echo(f"job {job}: done; fetch it with `tlq-farm export {job} --out DIR`")
            return
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
    from tlq_farm.jobs import cancel_job

    _check_job_id(job)
    store = _open_store(store_url)
    try:
        cancel_job(store, job)
    except _user_errors() as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"job {job}: cancelled")


@main.command()
@click.option("--store", "store_url", envvar="TLQ_STORE_URL", help="Job store [env TLQ_STORE_URL].")
def jobs(store_url):
    """Every job in the store, with its state; "incomplete" marks a staging that never finished."""
    from tlq_farm.jobs import is_incomplete, is_old_format, job_folders, job_status
    from tlq_farm.staging import describe, load_manifest

    store = _open_store(store_url)
    folders = job_folders(store)
    for j, raw_keys in sorted(folders.items()):
        if is_incomplete(raw_keys, j):
            click.echo(f"{j}  incomplete  staging never finished; `tlq-farm prune --store {store.url}` removes it")
            continue
        if is_old_format(store, j):
            click.echo(f"{j}  old-format  staged by an earlier version; run it again to stage it anew, "
                       f"`tlq-farm prune --old-format --store {store.url}` removes it")
            continue
        s = job_status(store, j)
        p = s["progress"]
        click.echo(f"{j}  {s['state']:<9} {p['done']}/{p['total']}  {describe(load_manifest(store, j))}")
    if not folders:
        click.echo(f"no jobs in {store.url}")


@main.command()
@click.option("--store", "store_url", envvar="TLQ_STORE_URL", help="Job store [env TLQ_STORE_URL; default ./tlq-runs].")
@click.option("--cancelled", is_flag=True, help="Remove cancelled jobs too (their finished tasks are lost).")
@click.option("--old-format", "old_format", is_flag=True,
              help="Remove jobs staged by an earlier version in another store format (this version cannot run them).")
@click.option("--older-than", "older_than", default=900, show_default=True, type=click.IntRange(min=0),
              help="Seconds since an incomplete job's last write before it is removed: a younger one may still be staging.")
def prune(store_url, cancelled, old_format, older_than):
    """Remove incomplete jobs (a staging that never finished), with --cancelled cancelled ones, with
    --old-format those staged in another store format."""
    from tlq_farm.jobs import prune_jobs

    store = _open_store(store_url)
    removed, kept = prune_jobs(store, cancelled=cancelled, old_format=old_format, older_than_s=older_than)
    for j, why in removed:
        click.echo(f"removed {j}: {why}")
    for j, why in kept:
        click.echo(f"kept {j}: {why}")
    if not removed and not kept:
        click.echo(f"nothing to prune in {store.url}")


@main.command()
@click.option("--broker", envvar="TLQ_BROKER_URL", help="Redis URL of the farm [env TLQ_BROKER_URL].")
@click.option("--json", "as_json", is_flag=True, help="Print the workers' records as JSON.")
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
    _check_job_id(job)
    _check_out_apart(Path(out), store_folder=_store_folder(store_url))
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
@click.option("--loglevel", default="INFO", show_default=True, help="Celery log level: DEBUG, INFO, WARNING or ERROR.")
@click.option("--store", "stores", multiple=True,
              help="A store this worker serves, with everything below it (repeatable) [env TLQ_STORE_URL, "
                   "TLQ_ALLOWED_STORES]; tasks naming any other store are refused.")
def worker(broker, device, gpus, max_memory, threads, loglevel, stores):
    """Start a farm worker: probe the device, listen on the queues of its memory class and below."""
    import os
    import subprocess
    import sys

    if not broker:
        raise click.UsageError("no broker: pass --broker redis://HOST:6379/0 or set TLQ_BROKER_URL")
    env = dict(os.environ, TLQ_BROKER_URL=broker)
    if stores:
        env["TLQ_ALLOWED_STORES"] = ",".join(filter(None, [env.get("TLQ_ALLOWED_STORES", ""), *stores]))
    if not (env.get("TLQ_STORE_URL") or env.get("TLQ_ALLOWED_STORES")):
        raise click.UsageError("this worker has no store: pass --store s3://BUCKET/PREFIX (or a shared folder), "
                               "or set TLQ_STORE_URL; it serves only the stores it is given")
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


from tlq_farm.heap import long_lived  # noqa: E402

with long_lived():  # eval imports torch, which every command but --help goes on to use
    from coordinator.eval_cmd import eval_command  # noqa: E402
    from coordinator.report_cmd import report_command  # noqa: E402
    from coordinator.verify_cmd import verify_command  # noqa: E402

main.add_command(eval_command)
main.add_command(report_command)
main.add_command(verify_command)

if __name__ == "__main__":  # pragma: no cover
    main()
