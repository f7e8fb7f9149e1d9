"""encode_example on the tiny models of every supported architecture."""

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from tlq_farm.calib.encode import IGNORE_INDEX, SampleTooLong, common_prefix_length, encode_example
from tlq_farm.models.tiny import TEXT_ARCHS, VLM_ARCHS, make_tiny, tiny_image

torch.set_num_threads(1)

PROMPT = "how many colors are there?"
ANSWER = "three colors: red, green and blue."


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny(arch, root / arch, seed=0) for arch in VLM_ARCHS + TEXT_ARCHS}


def _load(tiny_dirs, arch):
    path = tiny_dirs[arch]
    return AutoProcessor.from_pretrained(path) if arch in VLM_ARCHS else AutoTokenizer.from_pretrained(path)


def _tokenizer(processor):
    return getattr(processor, "tokenizer", None) or processor


def _images(arch):
    return [tiny_image(3, 56 if arch.startswith("qwen") else 28)] if arch in VLM_ARCHS else []


@pytest.mark.parametrize("arch", VLM_ARCHS + TEXT_ARCHS)
def test_labels_are_exactly_the_answer_and_end_of_turn(tiny_dirs, arch):
    processor = _load(tiny_dirs, arch)
    tokenizer = _tokenizer(processor)
    encoded = encode_example(processor, _images(arch), PROMPT, ANSWER)
    labels = encoded["labels"][0]
    labelled = (labels != IGNORE_INDEX).nonzero(as_tuple=True)[0]
    # One contiguous span, equal to the input ids there.
    assert torch.equal(labelled, torch.arange(labelled[0], labelled[-1] + 1))
    assert torch.equal(labels[labelled], encoded["input_ids"][0, labelled])
    # The span decodes back to the answer and ends with the end-of-turn token.
    # (Word-level decoders may put a space before punctuation, so spaces are not compared.)
    decoded = tokenizer.decode(labels[labelled], skip_special_tokens=True)
    assert decoded.replace(" ", "") == ANSWER.replace(" ", "")
    assert labels[labelled[-1]].item() == tokenizer.eos_token_id
    answer_ids = tokenizer(ANSWER, add_special_tokens=False)["input_ids"]
    assert labels[labelled].tolist() in (answer_ids + [tokenizer.eos_token_id],
                                         tokenizer(" " + ANSWER, add_special_tokens=False)["input_ids"]
                                         + [tokenizer.eos_token_id])
    # Everything before the span is the prompt as rendered for generation.
    prompt_only = encode_example(processor, _images(arch), PROMPT, None)
    assert torch.equal(encoded["input_ids"][0, : labelled[0]], prompt_only["input_ids"][0])
    assert (prompt_only["labels"] == IGNORE_INDEX).all()


@pytest.mark.parametrize("arch", VLM_ARCHS)
def test_the_images_go_through_the_image_processor_once(tiny_dirs, arch, monkeypatch):
    processor = _load(tiny_dirs, arch)
    calls = []
    cls = type(processor.image_processor)
    original = cls.__call__
    monkeypatch.setattr(cls, "__call__", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    encoded = encode_example(processor, _images(arch) * 2, PROMPT, ANSWER)
    assert len(calls) == 1
    labelled = (encoded["labels"][0] != IGNORE_INDEX).nonzero(as_tuple=True)[0]
    prompt_only = encode_example(processor, _images(arch) * 2, PROMPT, None)
    assert torch.equal(encoded["input_ids"][0, : labelled[0]], prompt_only["input_ids"][0])


@pytest.mark.parametrize("arch", VLM_ARCHS)
def test_vision_mask_counts_the_tokens_the_model_consumes(tiny_dirs, arch):
    processor = _load(tiny_dirs, arch)
    encoded = encode_example(processor, _images(arch) * 2, PROMPT, ANSWER)
    vision_mask = encoded["vision_mask"]
    assert vision_mask.dtype == torch.bool and vision_mask.shape == encoded["input_ids"].shape
    model = AutoModelForImageTextToText.from_pretrained(tiny_dirs[arch]).eval()
    inputs = {k: v for k, v in encoded.items() if k not in ("labels", "vision_mask")}
    with torch.no_grad():
        features = model.model.get_image_features(
            **{k: v for k, v in inputs.items() if k in ("pixel_values", "image_grid_thw", "image_sizes")}
        )
        pooled = getattr(features, "pooler_output", features)
        pooled = pooled if isinstance(pooled, torch.Tensor) else torch.cat([f.reshape(-1, f.shape[-1]) for f in pooled])
        n_features = pooled.reshape(-1, pooled.shape[-1]).shape[0]
        # The model itself also checks that placeholders and features agree while it runs.
        model(**inputs)
    assert int(vision_mask.sum()) == n_features
    assert not vision_mask[encoded["labels"] != IGNORE_INDEX].any()


@pytest.mark.parametrize("arch", VLM_ARCHS)
def test_extra_processor_outputs_are_kept(tiny_dirs, arch):
    processor = _load(tiny_dirs, arch)
    images = _images(arch)
    encoded = encode_example(processor, images, PROMPT, ANSWER)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]},
         {"role": "assistant", "content": [{"type": "text", "text": ANSWER}]}], tokenize=False)
    direct = processor(text=[text], images=images, return_tensors="pt",
                       **({"add_special_tokens": False} if _tokenizer(processor).bos_token else {}))
    for key, value in direct.items():
        assert torch.equal(encoded[key], value), key


@pytest.mark.parametrize("arch", TEXT_ARCHS)
def test_text_only_tokenizer(tiny_dirs, arch):
    tokenizer = _load(tiny_dirs, arch)
    encoded = encode_example(tokenizer, [], PROMPT, ANSWER)
    assert not encoded["vision_mask"].any()
    assert set(encoded) >= {"input_ids", "attention_mask", "labels", "vision_mask"}
    with pytest.raises(ValueError, match="text-only tokenizer"):
        encode_example(tokenizer, [tiny_image(0, 28)], PROMPT, ANSWER)


@pytest.mark.parametrize("arch", ["qwen2_vl", "llama"])
def test_sample_too_long(tiny_dirs, arch):
    processor = _load(tiny_dirs, arch)
    n_tokens = encode_example(processor, _images(arch), PROMPT, ANSWER)["input_ids"].shape[1]
    encode_example(processor, _images(arch), PROMPT, ANSWER, max_len=n_tokens)  # exactly fits
    with pytest.raises(SampleTooLong, match="--seq-len") as info:
        encode_example(processor, _images(arch), PROMPT, ANSWER, max_len=n_tokens - 1)
    assert (info.value.n_tokens, info.value.max_len) == (n_tokens, n_tokens - 1)
    assert str(n_tokens) in str(info.value)


def test_common_prefix_length():
    assert common_prefix_length([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix_length([1, 2], [1, 2, 3]) == 2
    assert common_prefix_length([], [1]) == 0
