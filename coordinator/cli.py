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

    return (SpecError, CalibError, SampleTooLong, UnsupportedModel, FileExistsError, FileNotFoundError)


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
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def run(model_dir, calib, out, bits, group_size, sym, act_bits, method, importance, samples, seq_len, seed, act_order,
        static_groups, damp, blocksize, true_sequential, quantize_vision, tlq_keep, qig_steps, fmt, device, overwrite, quiet):
    """Quantize MODEL_DIR (default: the bundled demo VLM) and export it."""
    from tlq_farm.pipeline import run_local

    if model_dir is None:
        model_dir, demo_calib = _demo_paths()
        calib = calib or demo_calib
    if calib is None:
        raise click.UsageError("--calib is required when MODEL_DIR is given")
    q = QuantSpec(bits=bits, group_size=group_size, sym=sym, act_bits=int(act_bits) if act_bits else None, method=method,
                  importance=importance, act_order=act_order, static_groups=static_groups, damp=damp, blocksize=blocksize,
                  true_sequential=true_sequential, quantize_vision=quantize_vision, tlq_keep=tlq_keep, qig_steps=qig_steps)
    spec = JobSpec(model=str(model_dir), calib=str(calib), quant=q, samples=samples, seq_len=seq_len, seed=seed, fmt=fmt)
    out_dir = Path(out) if out else _default_out(model_dir, q)
    try:
        spec.validate()
        report = run_local(spec, out_dir, device=device, progress=not quiet, log=lambda m: click.echo(m, err=True),
                           overwrite=overwrite)
    except _user_errors() as e:
        raise click.ClickException(str(e)) from e
    t = report["totals"]
    click.echo(f"quantized {t['modules']} linears ({t['quantized_params']:,} weights), total loss {t['loss']:.4g}, "
               f"{report['time']['total_s']:.1f}s -> {out_dir}")


if __name__ == "__main__":  # pragma: no cover
    main()
