"""Score a (quantized) model on a JSONL set: exact match, answer NLL, and agreement with a reference.

Rows are {"image": "images/00001.png" | "images": [...], "prompt": ..., "answer": ...}; image paths are
relative to the JSONL file, and rows without images are text-only. Every sample goes through
encode_example, so any supported VLM processor or a text-only tokenizer works.
"""

from __future__ import annotations

import inspect
import json
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image

from tlq_farm.calib.encode import IGNORE_INDEX, encode_example

# Keys of encode_example's output that are bookkeeping, not model inputs.
_NON_MODEL_KEYS = ("labels", "vision_mask")


def normalize_answer(text: str) -> str:
    """Lower-case and collapse whitespace, the comparison used for exact match."""
    return " ".join(text.lower().split())


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
            images = row.get("images", [row["image"]] if row.get("image") else [])
            row["image_paths"] = [str(data_jsonl.parent / p) for p in images]
            rows.append(row)
            if limit is not None and len(rows) >= limit:
                break
    return rows


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


def _greedy_answer(model, processor, images, prompt: str, max_new_tokens: int) -> str:
    encoded = encode_example(processor, images, prompt, None)
    inputs = model_inputs(model, encoded)
    tokenizer = getattr(processor, "tokenizer", None) or processor
    generated = model.generate(
        **inputs, max_new_tokens=max_new_tokens, do_sample=False,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    new_tokens = generated[0, inputs["input_ids"].shape[1]:]
    return tokenizer.decode(new_tokens, skip_special_tokens=True)


def evaluate(
    model_dir_or_model,
    data_jsonl: str | Path,
    *,
    reference=None,
    max_new_tokens: int = 8,
    limit: int | None = None,
    processor=None,
) -> dict:
    """Score a model on `data_jsonl`.

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

    n_correct = 0
    nll_sum = kl_sum = 0.0
    n_tokens = n_agree = 0
    models = (model,) if ref_model is None else (model, ref_model)
    with _eval_mode(*models):
        for row in rows:
            images = [Image.open(p).convert("RGB") for p in row["image_paths"]]
            prediction = _greedy_answer(model, processor, images, row["prompt"], max_new_tokens)
            n_correct += normalize_answer(prediction) == normalize_answer(row["answer"])

            encoded = encode_example(processor, images, row["prompt"], row["answer"])
            positions, targets = answer_positions(encoded["labels"])
            logits = model(**model_inputs(model, encoded)).logits[0, positions].float().cpu()
            nll_sum += token_nll(logits, targets).sum().item()
            n_tokens += len(targets)
            if ref_model is not None:
                ref_logits = ref_model(**model_inputs(ref_model, encoded)).logits[0, positions].float().cpu()
                kl_sum += kl_divergence(ref_logits, logits).sum().item()
                n_agree += (ref_logits.argmax(-1) == logits.argmax(-1)).sum().item()

    result = {
        "n": len(rows),
        "accuracy": n_correct / len(rows),
        "nll": nll_sum / max(1, n_tokens),
        "n_answer_tokens": n_tokens,
    }
    if ref_model is not None:
        result["top1_agreement"] = n_agree / max(1, n_tokens)
        result["kl"] = kl_sum / max(1, n_tokens)
    return result
