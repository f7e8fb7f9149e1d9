"""The tiny-model factory: every arch saves, loads back through the Auto classes and runs."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
)

from tlq_farm.models import tiny
from tlq_farm.models.tiny import (
    ARCHS,
    VLM_ARCHS,
    build_processor,
    build_tokenizer,
    example_inputs,
    make_tiny,
    tiny_config,
    tiny_image,
)

torch.set_num_threads(1)


def file_digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each arch saved once at seed 0 (built lazily, shared by the tests of this module)."""
    paths = {}

    def get(arch):
        if arch not in paths:
            paths[arch] = make_tiny(arch, tmp_path_factory.mktemp(arch) / "model", seed=0)
        return paths[arch]

    return get


def load_model(arch, path):
    cls = AutoModelForImageTextToText if arch in VLM_ARCHS else AutoModelForCausalLM
    return cls.from_pretrained(path).eval()


def vision_token_count(model, sample) -> int:
    """How many language-model positions the vision tower's features fill for this sample."""
    extra = {k: sample[k] for k in ("image_grid_thw", "image_sizes") if k in sample}
    with torch.no_grad():
        features = model.model.get_image_features(sample["pixel_values"], **extra).pooler_output
    return sum(f.shape[0] for f in features)


@pytest.mark.parametrize("arch", ARCHS)
def test_loads_through_auto_classes_and_runs(arch, saved):
    path = saved(arch)
    model = load_model(arch, path)
    assert model.dtype == torch.float32
    assert model.config.get_text_config().num_hidden_layers == 2
    assert not model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    loader = AutoProcessor if arch in VLM_ARCHS else AutoTokenizer
    tokenizer = getattr(loader.from_pretrained(path), "tokenizer", None) or loader.from_pretrained(path)
    vocab_size = model.config.get_text_config().vocab_size
    assert vocab_size == len(tokenizer)

    samples = example_inputs(path, n=2, seed=0)
    assert len(samples) == 2
    for sample in samples:
        with torch.no_grad():
            logits = model(**sample).logits
        assert logits.shape == (1, sample["input_ids"].shape[1], vocab_size)
        assert torch.isfinite(logits).all()
        if arch in VLM_ARCHS:
            n_image_tokens = int((sample["input_ids"] == model.config.image_token_id).sum())
            assert n_image_tokens > 1
            assert n_image_tokens == vision_token_count(model, sample)

    generated = model.generate(**samples[0], max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert generated.shape[1] == samples[0]["input_ids"].shape[1] + 3


@pytest.mark.parametrize("arch", ARCHS)
def test_same_seed_same_bytes(arch, saved, tmp_path):
    again = make_tiny(arch, tmp_path / "again", seed=0)
    other = make_tiny(arch, tmp_path / "other", seed=1)
    reference = file_digest(saved(arch) / "model.safetensors")
    assert file_digest(again / "model.safetensors") == reference
    assert file_digest(other / "model.safetensors") != reference


@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_of_given_words_tokenizes_into_those_words(arch):
    tokenizer = build_tokenizer(["zebra", "stripes", "grazing"], arch=arch)
    ids = tokenizer("zebra stripes grazing zebra", add_special_tokens=False)["input_ids"]
    pieces = [tokenizer.convert_ids_to_tokens(i).lstrip("Ġ") for i in ids]
    assert pieces == ["zebra", "stripes", "grazing", "zebra"]
    # A word outside the list still tokenizes, into characters, never into <unk>.
    unknown = tokenizer("qwxz", add_special_tokens=False)["input_ids"]
    assert len(unknown) == 4 and tokenizer.unk_token_id not in unknown
    for token in tiny.special_tokens_for(arch):
        assert tokenizer(token, add_special_tokens=False)["input_ids"] == [tokenizer.convert_tokens_to_ids(token)]


@pytest.mark.parametrize("arch", ["qwen2_vl", "llava", "llava_onevision", "qwen3"])
def test_chat_template_renders_image_question_answer_and_generation_prompt(arch):
    tokenizer = build_tokenizer(arch=arch)
    chat = tiny.example_messages(0)
    full = tokenizer.apply_chat_template(chat, tokenize=False)
    prompt = tokenizer.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True)
    question = chat[0]["content"][1]["text"]
    answer = chat[1]["content"][0]["text"]
    image_placeholder = "<|vision_start|><|image_pad|><|vision_end|>" if arch.startswith("qwen") else "<image>"
    assert full.count(image_placeholder) == 1
    assert question in full and answer in full and answer not in prompt
    assert full.index(question) < full.index(answer)
    # The generation prompt ends where the answer would start.
    assistant_prefix = full[: full.index(answer)].rstrip()
    assert prompt.rstrip() == assistant_prefix


def test_qwen_vl_mrope_sections_fit_head_dim():
    for arch in ("qwen2_vl", "qwen2_5_vl"):
        text = tiny_config(arch, 300).text_config
        head_dim = text.hidden_size // text.num_attention_heads
        assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2


@pytest.mark.parametrize("arch", VLM_ARCHS)
def test_config_token_ids_agree_with_tokenizer(arch):
    tokenizer = build_tokenizer(arch=arch)
    config = tiny_config(arch, len(tokenizer), tokenizer=tokenizer)
    image_token = tokenizer.image_token
    assert config.image_token_id == tokenizer.convert_tokens_to_ids(image_token)
    processor = build_processor(arch, tokenizer)
    assert processor.image_token_id == config.image_token_id
    assert processor.chat_template == tokenizer.chat_template


def test_overrides_reach_text_and_vision_configs():
    config = tiny_config("llava", 300, num_hidden_layers=3, vision_num_hidden_layers=1)
    assert config.text_config.num_hidden_layers == 3
    assert config.vision_config.num_hidden_layers == 1
    qwen = tiny_config("qwen2_vl", 300, vision_depth=1)
    assert qwen.vision_config.depth == 1


@pytest.mark.parametrize(
    "arch, image_size, expected_tokens",
    [
        ("qwen2_vl", 84, (84 // 28) ** 2),  # 2x2 patches merged into one token
        # anyres on a square image: base tile + one 56-px tile, 4x4 patches each, + 4 row newlines
        ("llava_next", 56, 16 + 16 + 4),
    ],
)
def test_image_size_sets_the_number_of_image_tokens(arch, image_size, expected_tokens, tmp_path):
    path = make_tiny(arch, tmp_path / "model", image_size=image_size)
    model = load_model(arch, path)
    sample = example_inputs(path, n=1)[0]
    n_image_tokens = int((sample["input_ids"] == model.config.image_token_id).sum())
    assert n_image_tokens == expected_tokens == vision_token_count(model, sample)
    with torch.no_grad():
        assert torch.isfinite(model(**sample).logits).all()


def test_tiny_image_is_deterministic():
    first, again, other = tiny_image(3, 32), tiny_image(3, 32), tiny_image(4, 32)
    assert first.size == (32, 32) and first.mode == "RGB"
    assert np.array_equal(np.asarray(first), np.asarray(again))
    assert not np.array_equal(np.asarray(first), np.asarray(other))
    assert tiny_image(0, (40, 24)).size == (40, 24)


def test_errors_say_what_to_do():
    with pytest.raises(ValueError, match="unknown tiny-model arch 'gpt9'.*choose one of"):
        make_tiny("gpt9", "/nonexistent")
    with pytest.raises(ValueError, match="text-only arch"):
        build_processor("llama", build_tokenizer(arch="llama"))
    with pytest.raises(ValueError, match="multiple of 28"):
        build_processor("qwen2_vl", build_tokenizer(arch="qwen2_vl"), image_size=30)
    with pytest.raises(ValueError, match="free of whitespace and punctuation"):
        build_tokenizer(["two words"], arch="llama")
    with pytest.raises(ValueError, match="vocab_size >= len"):
        tiny_config("qwen3", 10)
