"""Score a (quantized) model on a JSONL set: exact match, answer NLL, and agreement with a reference.

Rows are {"image": "images/00001.png" | "images": [...], "prompt": ..., "answer": ...}; image paths are
relative to the JSONL file, and rows without images are text-only. Every sample goes through
encode_example, so any supported VLM processor or a text-only tokenizer works.

One scorer, score_prepared, computes every metric on a prepared set (prepare_eval_set: each row encoded
once). evaluate() prepares a set and scores it; the bench prepares a held-out set and the reference's
answer logits (answer_logits) once and scores many models against them.

Model folders and exports (fake or compressed-tensors) load with load_for_eval. A fake export stores
dequantized weights only; when its tlq_quant.json says the activations were quantized during calibration
(W4A8 / W8A8), the same per-token int8 fake quantization is put back on the inputs of the quantized
linears, so the scores describe the model that was calibrated. A compressed-tensors export quantizes its
activations itself in the library's forward wrappers. evaluate_folder scores a folder loaded that way.
"""

from __future__ import annotations

import inspect
import json
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image

from tlq_farm.calib.encode import IGNORE_INDEX, encode_example
from tlq_farm.quant.export import QUANT_SUMMARY_FILE

REPORT_FILE = "tlq_report.json"
# The demo's answers are one or two words; a few spare tokens show a model that does not stop.
DEFAULT_MAX_NEW_TOKENS = 8

# Keys of encode_example's output that are bookkeeping, not model inputs.
_NON_MODEL_KEYS = ("labels", "vision_mask")


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


def load_model_and_processor(model_dir: str | Path):
    """Float32 model in eval mode (AutoModelForImageTextToText, else AutoModelForCausalLM) and its processor."""
    from transformers import (AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor,
                              AutoTokenizer)

    model_dir = str(model_dir)
    try:
        model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    except (ValueError, KeyError):
        # Not an image-text-to-text architecture: a text-only causal LM.
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    try:
        processor = AutoProcessor.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError, TypeError):
        processor = AutoTokenizer.from_pretrained(model_dir)
    model.eval()
    return model, processor


def _resolve(model_or_dir, processor):
    """(model, processor) from a folder, a model, or a (model, processor) pair."""
    if isinstance(model_or_dir, (str, Path)):
        model, loaded = load_model_and_processor(model_or_dir)
        return model, processor or loaded
    if isinstance(model_or_dir, tuple):
        model, paired = model_or_dir
        return model, processor or paired
    if processor is None:
        source = getattr(model_or_dir, "name_or_path", None) or getattr(model_or_dir.config, "_name_or_path", "")
        if not source:
            raise ValueError("a model object was given without its processor; pass processor=... "
                             "or a (model, processor) pair, or the model's folder")
        _, processor = load_model_and_processor(source)
    return model_or_dir, processor


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


def _image_names(row: dict) -> list[str]:
    """The row's image paths as written in the JSONL file (relative to it)."""
    images = row.get("images", [row["image"]] if row.get("image") else [])
    return [images] if isinstance(images, str) else images


def read_jsonl_rows(data_jsonl: str | Path, limit: int | None = None) -> list[dict]:
    """Rows of the JSONL file with image paths resolved against its folder (key "image_paths")."""
    data_jsonl = Path(data_jsonl)
    if not data_jsonl.is_file():
        raise FileNotFoundError(f"evaluation data {data_jsonl} does not exist; pass a JSONL file of "
                                '{"image": ..., "prompt": ..., "answer": ...} rows')
    rows = []
    with open(data_jsonl) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "prompt" not in row or "answer" not in row:
                raise ValueError(f"{data_jsonl}:{line_no}: a row needs 'prompt' and 'answer' keys, got {sorted(row)}")
            row["image_paths"] = [str(data_jsonl.parent / p) for p in _image_names(row)]
            rows.append(row)
            if limit is not None and len(rows) >= limit:
                break
    return rows


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
            for image in _image_names(row):
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


# ------------------------------------------------------------------------------------------- metrics


def normalize_answer(text: str) -> str:
    """Lower-case and collapse whitespace, the comparison used for exact match."""
    return " ".join(text.lower().split())


def model_inputs(model, encoded: dict) -> dict:
    """The entries of `encoded` that `model.forward` takes by name, on the model's device."""
    accepted = inspect.signature(model.forward).parameters
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in encoded.items() if k not in _NON_MODEL_KEYS and k in accepted}


def answer_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logit positions, target ids) for next-token scoring: logits at t-1 predict the label at t."""
    targets_at = (labels[0, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)[0]
    return targets_at, labels[0, 1:][targets_at]


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position negative log-likelihood of `targets` [n] under `logits` [n, V] (float64)."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    return -logp.gather(-1, targets[:, None]).squeeze(-1)


def kl_divergence(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-position KL(ref || model) of next-token distributions, [n, V] logits -> [n] (float64)."""
    ref_logp = torch.log_softmax(ref_logits.double(), dim=-1)
    logp = torch.log_softmax(logits.double(), dim=-1)
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1)


# ------------------------------------------------------------------------------------------- scoring


@contextmanager
def _eval_mode(*models):
    """Eval mode and no_grad for the duration, restoring each model's training flag afterwards."""
    flags = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, flag in zip(models, flags):
            m.train(flag)


def prepare_sample(processor, images: list, prompt: str, answer: str) -> dict:
    """One sample encoded for scoring: the prompt alone for generation, the whole exchange for teacher
    forcing. {"answer", "prompt_inputs", "full_inputs", "positions", "targets"}."""
    full = encode_example(processor, images, prompt, answer)
    positions, targets = answer_positions(full["labels"])
    return {"answer": answer, "prompt_inputs": encode_example(processor, images, prompt, None),
            "full_inputs": full, "positions": positions, "targets": targets}


def _prepare_rows(processor, rows: list[dict]) -> list[dict]:
    """prepare_sample of each row of read_jsonl_rows."""
    return [prepare_sample(processor, [Image.open(p).convert("RGB") for p in row["image_paths"]], row["prompt"],
                           row["answer"]) for row in rows]


def prepare_eval_set(processor, data_jsonl: str | Path, limit: int | None = None) -> list[dict]:
    """Every row of a checked JSONL file encoded once (prepare_sample), so that many models sharing one
    processor can be scored without re-running it."""
    check_eval_jsonl(data_jsonl)
    return _prepare_rows(processor, read_jsonl_rows(data_jsonl, limit))


def _sample_answer_logits(model, sample: dict) -> torch.Tensor:
    return model(**model_inputs(model, sample["full_inputs"])).logits[0, sample["positions"]].float().cpu()


def answer_logits(model, prepared: list[dict]) -> list[torch.Tensor]:
    """Logits at each sample's answer positions (teacher forcing), float32 on the CPU."""
    with _eval_mode(model):
        return [_sample_answer_logits(model, s) for s in prepared]


def score_prepared(model, processor, prepared: list[dict], *, reference_logits: list[torch.Tensor] | None = None,
                   max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> dict:
    """evaluate()'s metrics on a prepared set, with the reference's answer logits given (computed once
    with answer_logits and shared by every model scored against it)."""
    tokenizer = getattr(processor, "tokenizer", None) or processor
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    n_correct = n_tokens = n_agree = 0
    nll_sum = kl_sum = 0.0
    with _eval_mode(model):
        for i, sample in enumerate(prepared):
            inputs = model_inputs(model, sample["prompt_inputs"])
            generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
            prediction = tokenizer.decode(generated[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            n_correct += normalize_answer(prediction) == normalize_answer(sample["answer"])
            # One sample's logits at a time: the model's answer logits of a whole set are never held at once.
            logits = _sample_answer_logits(model, sample)
            nll_sum += token_nll(logits, sample["targets"]).sum().item()
            n_tokens += len(sample["targets"])
            if reference_logits is not None:
                kl_sum += kl_divergence(reference_logits[i], logits).sum().item()
                n_agree += (reference_logits[i].argmax(-1) == logits.argmax(-1)).sum().item()
    result = {"n": len(prepared), "accuracy": n_correct / len(prepared), "nll": nll_sum / max(1, n_tokens),
              "n_answer_tokens": n_tokens}
    if reference_logits is not None:
        result["top1_agreement"] = n_agree / max(1, n_tokens)
        result["kl"] = kl_sum / max(1, n_tokens)
    return result


def evaluate(
    model_dir_or_model,
    data_jsonl: str | Path,
    *,
    reference=None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    limit: int | None = None,
    processor=None,
) -> dict:
    """Score a model on `data_jsonl`: score_prepared on the set prepared with the model's processor.

    `model_dir_or_model` (and `reference`): a model folder, a loaded model (its processor is loaded
    from its name_or_path unless `processor` is given) or a (model, processor) pair.
    Returns {"n", "accuracy" (greedy exact match after normalize_answer), "nll" (mean per answer
    token, end-of-turn token included), "n_answer_tokens"} and, with a reference (the full-precision
    model), "top1_agreement" and "kl" (mean KL(ref || model)) over the same answer positions.
    """
    rows = read_jsonl_rows(data_jsonl, limit)
    if not rows:
        raise ValueError(f"{data_jsonl} has no samples to evaluate")
    model, processor = _resolve(model_dir_or_model, processor)
    ref_model = _resolve(reference, processor)[0] if reference is not None else None
    prepared = _prepare_rows(processor, rows)
    reference_logits = answer_logits(ref_model, prepared) if ref_model is not None else None
    return score_prepared(model, processor, prepared, reference_logits=reference_logits,
                          max_new_tokens=max_new_tokens)


def evaluate_folder(model_dir: str | Path, data_jsonl: str | Path, *, reference: str | Path | None = None,
                    limit: int | None = None, device: str = "cpu",
                    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, reference_pair=None) -> dict:
    """evaluate() on a folder loaded with load_for_eval (activation fake-quant included).

    reference: a full-precision model folder (or reference_pair, an already loaded (model, processor)).
    The result has evaluate's keys plus "model", "reference", "data" and "act_fake_quant_bits"."""
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
