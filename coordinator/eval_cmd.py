"""`tlq-farm eval`: score a model folder or an export (fake or compressed-tensors) on a JSONL set.

A fake export stores dequantized weights only; when its tlq_quant.json says the activations were quantized
during calibration (W4A8 / W8A8), the same per-token int8 fake quantization is put back on the inputs of the
quantized linears here, so the scores describe the model that was calibrated. A compressed-tensors export
quantizes its activations itself in the library's forward wrappers.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import click
import torch

QUANT_SUMMARY_FILE = "tlq_quant.json"
REPORT_FILE = "tlq_report.json"
# The demo's answers are one or two words; a few spare tokens show a model that does not stop.
DEFAULT_MAX_NEW_TOKENS = 8
DEFAULT_HELDOUT_SAMPLES = 200


class EvalInputError(ValueError):
    """A model folder or data file that cannot be evaluated; the message says what to pass instead."""


# ------------------------------------------------------------------------------------------- export facts


def read_json_file(path: Path) -> dict | None:
    """The JSON object in `path`, or None when the file does not exist."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise EvalInputError(f"{path} is not valid JSON ({e}); re-export the model or delete the file") from e


def quant_summary_of(model_dir: str | Path) -> dict | None:
    """The export's tlq_quant.json (None for a plain model folder)."""
    return read_json_file(Path(model_dir) / QUANT_SUMMARY_FILE)


def recorded_source_model(model_dir: str | Path) -> str | None:
    """The full-precision model an export was made from, as its tlq_quant.json or tlq_report.json spec
    records it; None for a plain model folder or when the recorded folder no longer exists here."""
    model_dir = Path(model_dir)
    candidates = []
    summary = quant_summary_of(model_dir) or {}
    candidates.append(((summary.get("extra") or {}).get("spec") or {}).get("model"))
    report = read_json_file(model_dir / REPORT_FILE) or {}
    candidates.append((report.get("spec") or {}).get("model"))
    for source in candidates:
        if source and (Path(source) / "config.json").is_file() and Path(source).resolve() != model_dir.resolve():
            return str(source)
    return None


def activation_bits_to_fake(summary: dict | None) -> int | None:
    """Bits of the per-token activation fake-quant the consumer must apply (fake exports with act_bits)."""
    if not summary or not summary.get("activations_fake_quantized_by_consumer"):
        return None
    return int(summary["act_bits"])


def quantized_module_names(summary: dict) -> list[str]:
    """Names (model.named_modules()) of every linear the export quantized."""
    return [name for scheme in summary.get("weight_schemes", []) for name in scheme["modules"]]


def attach_activation_fake_quant(model: torch.nn.Module, module_names: list[str], bits: int) -> list:
    """Per-token fake quantization of the inputs of the named linears, as the calibration's inference path
    computed it. Returns the hook handles (call .remove() to detach)."""
    from tlq_farm.quant.actquant import fake_quant_per_token

    modules = dict(model.named_modules())
    missing = [n for n in module_names if n not in modules]
    if missing:
        raise EvalInputError(f"tlq_quant.json names modules the loaded model does not have ({missing[:3]}); "
                             "the export's config and tlq_quant.json disagree: re-export the model")

    def hook(_module, args):
        return (fake_quant_per_token(args[0], bits),) + tuple(args[1:])

    return [modules[n].register_forward_pre_hook(hook) for n in module_names]


# ------------------------------------------------------------------------------------------- loading


def check_model_dir(path: str | Path, what: str = "MODEL_OR_EXPORT") -> Path:
    """The folder, or an EvalInputError saying why it is not a model folder."""
    p = Path(path)
    if not p.exists():
        raise EvalInputError(f"{what} {p} does not exist: pass a model folder saved with save_pretrained "
                             "or an export written by `tlq-farm run`")
    if not (p / "config.json").is_file():
        raise EvalInputError(f"{what} {p} is not a model folder (no config.json): pass a folder saved with "
                             "save_pretrained or an export written by `tlq-farm run`")
    return p


def load_for_eval(model_dir: str | Path, *, device: str = "cpu"):
    """(model, processor-or-tokenizer, tlq_quant summary or None) for a model folder or an export.

    Exports load with tlq_farm.quant.export.loading_kwargs; a fake export with act_bits gets per-token
    activation fake-quant hooks on its quantized linears."""
    import transformers

    from tlq_farm.quant.export import loading_kwargs

    model_dir = check_model_dir(model_dir)
    config = transformers.AutoConfig.from_pretrained(str(model_dir))
    is_vlm = hasattr(config, "vision_config")
    cls = transformers.AutoModelForImageTextToText if is_vlm else transformers.AutoModelForCausalLM
    model = cls.from_pretrained(str(model_dir), dtype=torch.float32, **loading_kwargs(model_dir))
    if is_vlm:
        processor = transformers.AutoProcessor.from_pretrained(str(model_dir))
    else:
        processor = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    model.eval().to(device)
    summary = quant_summary_of(model_dir)
    bits = activation_bits_to_fake(summary)
    if bits is not None:
        attach_activation_fake_quant(model, quantized_module_names(summary), bits)
    return model, processor, summary


# ------------------------------------------------------------------------------------------- data


def check_eval_jsonl(path: str | Path) -> int:
    """Number of rows of an evaluation JSONL file; an EvalInputError naming the file and line otherwise."""
    path = Path(path)
    if not path.is_file():
        raise EvalInputError(f"--data {path} does not exist: pass a JSONL file of "
                             '{"image": ..., "prompt": ..., "answer": ...} rows')
    n = 0
    with open(path) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise EvalInputError(f"{path}:{line_no}: not valid JSON ({e}); each line must be one JSON object "
                                     '{"image": ..., "prompt": ..., "answer": ...}') from e
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or "answer" not in row:
                raise EvalInputError(f'{path}:{line_no}: a row needs a "prompt" string and an "answer"')
            images = row.get("images", [row["image"]] if row.get("image") else [])
            for image in [images] if isinstance(images, str) else images:
                if not (path.parent / image).is_file():
                    raise EvalInputError(f"{path}:{line_no}: image {image} not found next to the JSONL file "
                                         f"(looked for {path.parent / image})")
            n += 1
    if n == 0:
        raise EvalInputError(f"--data {path} has no rows to evaluate")
    return n


def is_demo_model(model_dir: str | Path | None) -> bool:
    """True when the folder is the bundled demo VLM."""
    if model_dir is None:
        return False
    from tlq_farm.demo import DEMO_MODEL_DIR

    return Path(model_dir).resolve() == Path(DEMO_MODEL_DIR).resolve()


def write_heldout_set(out_dir: str | Path, n: int) -> Path:
    """The demo's held-out scenes (never used in training or calibration) written to out_dir; the JSONL path."""
    from tlq_farm.demo import scenes
    from tlq_farm.demo.train import HELD_OUT_SEED

    return scenes.write_set(out_dir, n, HELD_OUT_SEED)


# ------------------------------------------------------------------------------------------- scoring


def evaluate_folder(model_dir: str | Path, data_jsonl: str | Path, *, reference: str | Path | None = None,
                    limit: int | None = None, device: str = "cpu",
                    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, reference_pair=None) -> dict:
    """tlq_farm.evaluate.evaluate on a folder loaded with load_for_eval (activation fake-quant included).

    reference: a full-precision model folder (or reference_pair, an already loaded (model, processor)).
    The result has evaluate's keys plus "model", "reference", "data" and "act_fake_quant_bits"."""
    from tlq_farm.evaluate import evaluate

    check_eval_jsonl(data_jsonl)
    model, processor, summary = load_for_eval(model_dir, device=device)
    if reference_pair is None and reference is not None:
        ref_model, ref_processor, _ = load_for_eval(check_model_dir(reference, "--reference"), device=device)
        reference_pair = (ref_model, ref_processor)
    result = evaluate((model, processor), data_jsonl, reference=reference_pair, max_new_tokens=max_new_tokens,
                      limit=limit)
    result.update(model=str(model_dir), reference=None if reference is None else str(reference),
                  data=str(data_jsonl), act_fake_quant_bits=activation_bits_to_fake(summary))
    return result


def prepare_eval_set(processor, data_jsonl: str | Path, limit: int | None = None) -> list[dict]:
    """Encode every row once (the prompt for generation, the whole exchange for scoring), so that many
    models sharing one processor can be scored without re-running it: rows of {"answer", "prompt_inputs",
    "full_inputs", "positions", "targets"}."""
    from PIL import Image

    from tlq_farm.calib.encode import encode_example
    from tlq_farm.evaluate import answer_positions, read_jsonl_rows

    check_eval_jsonl(data_jsonl)
    prepared = []
    for row in read_jsonl_rows(data_jsonl, limit):
        images = [Image.open(p).convert("RGB") for p in row["image_paths"]]
        full = encode_example(processor, images, row["prompt"], row["answer"])
        positions, targets = answer_positions(full["labels"])
        prepared.append({"answer": row["answer"], "prompt_inputs": encode_example(processor, images, row["prompt"], None),
                         "full_inputs": full, "positions": positions, "targets": targets})
    return prepared


@torch.no_grad()
def answer_logits(model, prepared: list[dict]) -> list[torch.Tensor]:
    """Logits at each row's answer positions (teacher forcing), float32 on the CPU."""
    from tlq_farm.evaluate import model_inputs

    model.eval()
    return [model(**model_inputs(model, r["full_inputs"])).logits[0, r["positions"]].float().cpu() for r in prepared]


@torch.no_grad()
def score_prepared(model, processor, prepared: list[dict], *, reference_logits: list[torch.Tensor] | None = None,
                   max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> dict:
    """tlq_farm.evaluate.evaluate's metrics on a prepared set, with the reference's answer logits given
    (computed once with answer_logits and shared by every model scored against it)."""
    from tlq_farm.evaluate import kl_divergence, model_inputs, normalize_answer, token_nll

    tokenizer = getattr(processor, "tokenizer", None) or processor
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.eval()
    n_correct = n_tokens = n_agree = 0
    nll_sum = kl_sum = 0.0
    logits_all = answer_logits(model, prepared)
    for i, (r, logits) in enumerate(zip(prepared, logits_all)):
        inputs = model_inputs(model, r["prompt_inputs"])
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        prediction = tokenizer.decode(generated[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        n_correct += normalize_answer(prediction) == normalize_answer(r["answer"])
        nll_sum += token_nll(logits, r["targets"]).sum().item()
        n_tokens += len(r["targets"])
        if reference_logits is not None:
            kl_sum += kl_divergence(reference_logits[i], logits).sum().item()
            n_agree += (reference_logits[i].argmax(-1) == logits.argmax(-1)).sum().item()
    result = {"n": len(prepared), "accuracy": n_correct / len(prepared), "nll": nll_sum / max(1, n_tokens),
              "n_answer_tokens": n_tokens}
    if reference_logits is not None:
        result["top1_agreement"] = n_agree / max(1, n_tokens)
        result["kl"] = kl_sum / max(1, n_tokens)
    return result


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
