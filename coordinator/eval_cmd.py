"""`tlq-farm eval`: score a model folder or an export (fake or compressed-tensors) on a JSONL set.

The command chooses the defaults (the demo's held-out scenes as data, the export's recorded source model as
reference) and prints; loading, activation fake-quant and scoring are tlq_farm.evaluate's.
"""

from __future__ import annotations

import json
import tempfile

import click

from tlq_farm.evaluate import (DEFAULT_MAX_NEW_TOKENS, EvalInputError, check_model_dir, evaluate_folder,
                               is_demo_model, recorded_source_model, write_heldout_set)

DEFAULT_HELDOUT_SAMPLES = 200


def format_result(result: dict) -> str:
    """The human-readable summary printed by `tlq-farm eval`."""
    lines = [f"model:     {result['model']}",
             f"data:      {result['data']} ({result['n']} samples, {result['n_answer_tokens']} answer tokens)"]
    if result.get("act_fake_quant_bits"):
        lines.append(f"activations: per-token int{result['act_fake_quant_bits']} fake quantization")
    lines += [f"accuracy:  {result['accuracy']:.4f}  (greedy exact match)",
              f"nll:       {result['nll']:.4f}  (per answer token)"]
    if "kl" in result:
        lines += [f"reference: {result['reference']}",
                  f"top-1 agreement: {result['top1_agreement']:.4f}",
                  f"kl:        {result['kl']:.6f}  (KL(reference || model) per answer token)"]
    return "\n".join(lines)


@click.command("eval")
@click.argument("model_or_export", required=False)
@click.option("--data", "data", type=click.Path(dir_okay=False),
              help="JSONL of {image, prompt, answer} rows. Default for the demo model (or an export of it): "
                   f"{DEFAULT_HELDOUT_SAMPLES} held-out scenes drawn on the fly.")
@click.option("--reference", type=click.Path(file_okay=False),
              help="Full-precision model folder for top-1 agreement and KL. Default for an export: the source "
                   "model recorded in its tlq_quant.json / tlq_report.json, when that folder exists.")
@click.option("--no-reference", is_flag=True, help="Skip agreement and KL even when a source model is recorded.")
@click.option("--limit", type=int, default=None, help="Score only the first N rows.")
@click.option("--max-new-tokens", default=DEFAULT_MAX_NEW_TOKENS, show_default=True, type=int,
              help="Greedy generation length for exact match.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as one JSON object.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
def eval_command(model_or_export, data, reference, no_reference, limit, max_new_tokens, as_json, device):
    """Score MODEL_OR_EXPORT (default: the bundled demo VLM): exact-match accuracy, answer NLL and, against
    a full-precision reference, top-1 agreement and KL of next-token distributions."""
    from tlq_farm.demo import DEMO_MODEL_DIR

    if model_or_export is None:
        model_or_export = str(DEMO_MODEL_DIR)
    if limit is not None and limit < 1:
        raise click.UsageError("--limit must be at least 1")
    try:
        check_model_dir(model_or_export)
        if reference is None and not no_reference:
            reference = recorded_source_model(model_or_export)
        elif reference is not None:
            check_model_dir(reference, "--reference")
        source = reference or recorded_source_model(model_or_export)
        drawn = False
        with tempfile.TemporaryDirectory(prefix="tlq-eval-") as tmp:
            if data is None:
                if not (is_demo_model(model_or_export) or is_demo_model(source)):
                    raise EvalInputError(f"{model_or_export} is not the demo model or an export of it: pass --data "
                                         "JSONL with {image, prompt, answer} rows")
                data = write_heldout_set(tmp, limit or DEFAULT_HELDOUT_SAMPLES)
                drawn = True
            result = evaluate_folder(model_or_export, data, reference=None if no_reference else reference,
                                     limit=limit, device=device, max_new_tokens=max_new_tokens)
            if drawn:  # the scenes live in a temporary folder, gone once this command ends: print no path to it
                result["data"] = "held-out demo scenes, drawn for this run and not kept"
    except (EvalInputError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(json.dumps(result, indent=2, sort_keys=True) if as_json else format_result(result))
