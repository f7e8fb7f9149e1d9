"""evaluate() on tiny models: self-agreement, perturbation, exact match and NLL against direct computations."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from tlq_farm.calib.encode import IGNORE_INDEX, encode_example
from tlq_farm.evaluate import evaluate, kl_divergence, normalize_answer
from tlq_farm.models.tiny import make_tiny, tiny_image

torch.set_num_threads(1)

PROMPTS = ["what is in the image?", "describe this picture.", "how many colors are there?"]


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return make_tiny("qwen2_vl", tmp_path_factory.mktemp("qwen") / "model", seed=0)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_tiny("llama", tmp_path_factory.mktemp("llama") / "model", seed=0)


def _greedy(model, processor, images, prompt, max_new_tokens=4):
    """Greedy continuation computed here, independently of evaluate()."""
    encoded = encode_example(processor, images, prompt, None)
    inputs = {k: v for k, v in encoded.items() if k not in ("labels", "vision_mask")}
    tokenizer = getattr(processor, "tokenizer", None) or processor
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def _write_set(folder, rows, images=None):
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, row in enumerate(rows):
        row = dict(row)
        if images is not None:
            (folder / "images").mkdir(exist_ok=True)
            images[i].save(folder / "images" / f"{i:05d}.png")
            row["image"] = f"images/{i:05d}.png"
        lines.append(json.dumps(row))
    path = folder / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def qwen_set(qwen_dir, tmp_path_factory):
    """Rows whose answers are the model's own greedy outputs, plus the same rows with wrong answers."""
    model = AutoModelForImageTextToText.from_pretrained(qwen_dir).eval()
    processor = AutoProcessor.from_pretrained(qwen_dir)
    images = [tiny_image(10 + i, 56) for i in range(len(PROMPTS))]
    answers = [_greedy(model, processor, [img], p) for img, p in zip(images, PROMPTS)]
    assert all(a.strip() for a in answers), "the tiny model should generate some text for these prompts"
    own = [{"prompt": p, "answer": a} for p, a in zip(PROMPTS, answers)]
    wrong = [{"prompt": p, "answer": "zzz " + a} for p, a in zip(PROMPTS, answers)]
    folder = tmp_path_factory.mktemp("data")
    return {
        "own": _write_set(folder / "own", own, images),
        "mixed": _write_set(folder / "mixed", own + wrong, images + images),
        "images": images,
        "answers": answers,
    }


def test_model_against_itself_agrees_fully(qwen_dir, qwen_set):
    result = evaluate(qwen_dir, qwen_set["own"], reference=qwen_dir, max_new_tokens=4)
    assert result["top1_agreement"] == 1.0
    assert abs(result["kl"]) < 1e-12
    assert result["n"] == len(PROMPTS)


def test_perturbed_copy_has_positive_kl(qwen_dir, qwen_set, tmp_path):
    model = AutoModelForImageTextToText.from_pretrained(qwen_dir)
    processor = AutoProcessor.from_pretrained(qwen_dir)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "language_model.layers" in name and p.ndim == 2:
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
    result = evaluate((model, processor), qwen_set["own"], reference=qwen_dir, max_new_tokens=4)
    assert result["kl"] > 1e-6
    assert 0.0 <= result["top1_agreement"] <= 1.0


def test_accuracy_on_own_greedy_answers(qwen_dir, qwen_set):
    assert evaluate(qwen_dir, qwen_set["own"], max_new_tokens=4)["accuracy"] == 1.0
    # The same rows plus as many with altered answers: exactly half right.
    assert evaluate(qwen_dir, qwen_set["mixed"], max_new_tokens=4)["accuracy"] == 0.5
    assert evaluate(qwen_dir, qwen_set["mixed"], max_new_tokens=4, limit=2)["n"] == 2


def _direct_nll(model, processor, rows_with_images):
    """Mean NLL per answer token, computed position by position in float64."""
    total, count = 0.0, 0
    for images, prompt, answer in rows_with_images:
        encoded = encode_example(processor, images, prompt, answer)
        inputs = {k: v for k, v in encoded.items() if k not in ("labels", "vision_mask")}
        with torch.no_grad():
            logits = model(**inputs).logits[0].double()
        labels = encoded["labels"][0]
        for t in range(1, labels.shape[0]):
            if labels[t] != IGNORE_INDEX:
                total -= torch.log_softmax(logits[t - 1], dim=-1)[labels[t]].item()
                count += 1
    return total / count, count


def test_nll_matches_direct_computation(qwen_dir, qwen_set):
    model = AutoModelForImageTextToText.from_pretrained(qwen_dir).eval()
    processor = AutoProcessor.from_pretrained(qwen_dir)
    rows = [([img], p, a) for img, p, a in zip(qwen_set["images"], PROMPTS, qwen_set["answers"])]
    expected, count = _direct_nll(model, processor, rows)
    result = evaluate(qwen_dir, qwen_set["own"], max_new_tokens=4)
    assert result["n_answer_tokens"] == count
    assert result["nll"] == pytest.approx(expected, rel=1e-5)


def test_text_only_model(llama_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    answers = [_greedy(model, tokenizer, [], p) for p in PROMPTS]
    path = _write_set(tmp_path, [{"prompt": p, "answer": a} for p, a in zip(PROMPTS, answers)])
    result = evaluate(llama_dir, path, reference=llama_dir, max_new_tokens=4)
    assert result["accuracy"] == 1.0
    assert result["top1_agreement"] == 1.0 and abs(result["kl"]) < 1e-12
    expected, _ = _direct_nll(model, tokenizer, [([], p, a) for p, a in zip(PROMPTS, answers)])
    assert result["nll"] == pytest.approx(expected, rel=1e-5)


def test_kl_divergence_against_float64_formula():
    generator = torch.Generator().manual_seed(1)
    ref, other = torch.randn(3, 7, generator=generator), torch.randn(3, 7, generator=generator)
    p, q = torch.softmax(ref.double(), -1), torch.softmax(other.double(), -1)
    expected = (p * (p.log() - q.log())).sum(-1)
    assert torch.allclose(kl_divergence(ref, other), expected, atol=1e-12)
    assert torch.equal(kl_divergence(ref, ref), torch.zeros(3, dtype=torch.float64))


def test_normalize_answer_and_bad_input(tmp_path):
    assert normalize_answer("  Red   Circle \n") == "red circle"
    with pytest.raises(FileNotFoundError, match="JSONL"):
        evaluate(tmp_path / "model", tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "x"}) + "\n")
    with pytest.raises(ValueError, match="'prompt' and 'answer'"):
        evaluate(tmp_path / "model", bad)
