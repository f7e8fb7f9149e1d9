"""Tiny, randomly initialised models of every supported architecture, for tests, benchmarks and the demo.

Nothing is downloaded: each model is built from its transformers config class with seeded random weights,
a small word-level tokenizer is made with the `tokenizers` package, and everything is saved with
save_pretrained so that the ordinary Auto classes load it back:

    AutoProcessor / AutoModelForImageTextToText   for the vision-language archs
    AutoTokenizer / AutoModelForCausalLM          for the text-only archs
"""

from __future__ import annotations

import json

import string
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

VLM_ARCHS = ("qwen2_vl", "qwen2_5_vl", "llava", "llava_next", "llava_onevision")
TEXT_ARCHS = ("llama", "qwen2", "qwen3")
ARCHS = VLM_ARCHS + TEXT_ARCHS

QWEN_VL_FAMILY = ("qwen2_vl", "qwen2_5_vl")
LLAVA_FAMILY = ("llava", "llava_next", "llava_onevision")
# Archs whose chat format is ChatML (<|im_start|>role ... <|im_end|>); the others use the LLaVA/Llama style.
CHATML_ARCHS = QWEN_VL_FAMILY + ("llava_onevision", "qwen2", "qwen3")

# The words every prompt of the demo set and of example_inputs is made of.
DEFAULT_WORDS = (
    "what is in the image describe this picture a an of and there are colors color red green blue "
    "yellow black white cat dog car tree house sky shows small large one two three left right top bottom "
    "it answer question yes no how many where which"
).split()

# Words the chat templates themselves emit, so that they tokenize as whole words.
TEMPLATE_WORDS = ("system", "user", "assistant", "USER", "ASSISTANT", "You", "are", "a", "helpful")

# AutoTokenizer always rebuilds a qwen2 checkpoint's tokenizer as a byte-level BPE (Qwen2Tokenizer, with its
# own pre-tokenizer), so for that arch the tokenizer is a byte-level BPE from the start.
BYTE_LEVEL_ARCHS = ("qwen2",)

UNK = "<unk>"
PAD = "<pad>"
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
LLAVA_SPECIAL_TOKENS = ("<s>", "</s>", "<image>", "<video>")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{IMAGE}"
    "{% elif part['type'] == 'video' %}{VIDEO}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

LLAVA_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% elif message['role'] == 'assistant' %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %} "
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"unknown tiny-model arch {arch!r}; choose one of {', '.join(ARCHS)}")


def chat_template_for(arch: str) -> str:
    """The Jinja chat template of `arch`: renders user turns with images and text, assistant turns, and
    the generation prompt."""
    _check_arch(arch)
    if arch.startswith("qwen"):
        return CHATML_TEMPLATE.replace("{IMAGE}", "<|vision_start|><|image_pad|><|vision_end|>").replace(
            "{VIDEO}", "<|vision_start|><|video_pad|><|vision_end|>"
        )
    if arch in CHATML_ARCHS:
        # LLaVA-OneVision keeps the <image> placeholder of the LLaVA family inside a ChatML frame.
        return CHATML_TEMPLATE.replace("{IMAGE}", "<image>\n").replace("{VIDEO}", "<video>\n")
    return LLAVA_TEMPLATE


def special_tokens_for(arch: str) -> tuple[str, ...]:
    """The special tokens the arch's processor and chat template need (pad and unk included)."""
    _check_arch(arch)
    if arch in QWEN_VL_FAMILY or arch in ("qwen2", "qwen3"):
        return (PAD, UNK) + QWEN_SPECIAL_TOKENS
    if arch == "llava_onevision":
        return (PAD, UNK) + LLAVA_SPECIAL_TOKENS + ("<|im_start|>", "<|im_end|>")
    return (PAD, UNK) + LLAVA_SPECIAL_TOKENS


def tokenizer_vocab(words, special_tokens) -> dict[str, int]:
    """Token -> id: special tokens first, then the words, then single characters and their
    word-continuation forms ("##x"), so that any ASCII word still tokenizes (into characters)."""
    characters = list(string.ascii_letters + string.digits + string.punctuation)
    continuation = ["##" + c for c in string.ascii_letters + string.digits]
    vocab: dict[str, int] = {}
    for token in [*special_tokens, *words, *TEMPLATE_WORDS, *characters, *continuation]:
        if token not in vocab:
            vocab[token] = len(vocab)
    return vocab


def wordpiece_backend(vocab: dict[str, int]) -> Tokenizer:
    """A WordPiece tokenizer over `vocab` that splits on whitespace and on each punctuation character."""
    backend = Tokenizer(models.WordPiece(vocab=vocab, unk_token=UNK, continuing_subword_prefix="##"))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return backend


def byte_level_bpe_backend(words: list[str]) -> Tokenizer:
    """A byte-level BPE tokenizer trained on `words` alone and with a leading space, so that every word
    (and ' word') is one token and any other text falls back to single bytes."""
    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1_000_000,  # no cap: merge until every word is whole
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[PAD, UNK],
    )
    backend.train_from_iterator([*words, *(" " + w for w in words)], trainer)
    return backend


def build_tokenizer(words: list[str] | None = None, *, arch: str) -> PreTrainedTokenizerFast:
    """A transformers fast tokenizer for `arch` over `words` (whole-word tokens), with single characters as
    fallback for other words, the arch's special tokens and its chat template.

    Pre-tokenization splits on whitespace and on every punctuation character, so a prompt made of the
    given words tokenizes into exactly those words; whitespace itself is not a token. The exception is
    qwen2 (BYTE_LEVEL_ARCHS): a byte-level BPE in which each word, with or without a leading space, is
    one token.
    """
    _check_arch(arch)
    words = list(DEFAULT_WORDS if words is None else words)
    bad = [w for w in words if not w or any(c.isspace() or c in string.punctuation for c in w)]
    if bad:
        raise ValueError(
            f"tokenizer words must be non-empty and free of whitespace and punctuation, got {bad[:5]}; "
            "split them into plain words first"
        )
    specials = special_tokens_for(arch)
    if arch in BYTE_LEVEL_ARCHS:
        backend = byte_level_bpe_backend([*words, *TEMPLATE_WORDS])
    else:
        backend = wordpiece_backend(tokenizer_vocab(words, specials))
    # Registered on the backend so that they are matched before pre-tokenization and never split.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])

    chatml = arch in CHATML_ARCHS
    extra: dict[str, str] = {}
    if arch in QWEN_VL_FAMILY:
        extra = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"}
    elif arch in LLAVA_FAMILY:
        extra = {"image_token": "<image>"}
        if arch == "llava_onevision":
            extra["video_token"] = "<video>"
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=UNK,
        pad_token=PAD,
        bos_token=None if chatml else "<s>",
        eos_token="<|im_end|>" if chatml else "</s>",
        extra_special_tokens=extra,
        model_max_length=4096,
        padding_side="left",
        chat_template=chat_template_for(arch),
    )
    return tokenizer


# ---------------------------------------------------------------------------------------------------------
# Processors

DEFAULT_IMAGE_SIZE = {"qwen2_vl": 56, "qwen2_5_vl": 56, "llava": 28, "llava_next": 28, "llava_onevision": 28}
VISION_PATCH_SIZE = 14
# Qwen2-VL merges 2x2 patches into one language-model token.
QWEN_MERGE_SIZE = 2


def anyres_pinpoints(tile: int) -> list[list[int]]:
    """The (height, width) grids of tiles that the LLaVA-NeXT/OneVision 'anyres' processing may choose:
    1x1, 1x2, 2x1 and 2x2 tiles of `tile` pixels, so that a tiny image gives at most five tiles."""
    return [[tile, tile], [tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile]]


def build_processor(arch: str, tokenizer, *, image_size: int | None = None):
    """The arch's real transformers processor, configured for tiny images of `image_size` pixels (a
    multiple of the patch grid), with the tokenizer's chat template set on it."""
    from transformers import (
        CLIPImageProcessor,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        LlavaProcessor,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    _check_arch(arch)
    if arch not in VLM_ARCHS:
        raise ValueError(f"{arch!r} is a text-only arch and has no processor; use its tokenizer instead")
    size = DEFAULT_IMAGE_SIZE[arch] if image_size is None else int(image_size)
    template = chat_template_for(arch)
    if arch in QWEN_VL_FAMILY:
        factor = VISION_PATCH_SIZE * QWEN_MERGE_SIZE
        if size < factor or size % factor:
            raise ValueError(f"image_size for {arch} must be a positive multiple of {factor}, got {size}")
        grid = dict(patch_size=VISION_PATCH_SIZE, temporal_patch_size=2, merge_size=QWEN_MERGE_SIZE)
        # Every image is resized to at most size x size pixels: (size / 28)^2 language-model tokens.
        pixels = dict(min_pixels=factor * factor, max_pixels=size * size)
        image_processor = Qwen2VLImageProcessor(**grid, **pixels)
        video_processor = Qwen2VLVideoProcessor(**grid, **pixels)
        cls = Qwen2VLProcessor if arch == "qwen2_vl" else Qwen2_5_VLProcessor
        return cls(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
                   chat_template=template)
    if size < VISION_PATCH_SIZE or size % VISION_PATCH_SIZE:
        raise ValueError(f"image_size for {arch} must be a positive multiple of {VISION_PATCH_SIZE}, got {size}")
    if arch == "llava":
        image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        # CLIP adds a CLS token that the 'default' feature strategy drops again.
        return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=VISION_PATCH_SIZE,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=template)
    if arch == "llava_next":
        image_processor = LlavaNextImageProcessor(size={"shortest_edge": size},
                                                  crop_size={"height": size, "width": size},
                                                  image_grid_pinpoints=anyres_pinpoints(size))
        return LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                  patch_size=VISION_PATCH_SIZE, vision_feature_select_strategy="default",
                                  num_additional_image_tokens=1, chat_template=template)
    image_processor = LlavaOnevisionImageProcessor(size={"height": size, "width": size},
                                                   image_grid_pinpoints=anyres_pinpoints(size))
    video_processor = LlavaOnevisionVideoProcessor(size={"height": size, "width": size})
    return LlavaOnevisionProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                   video_processor=video_processor,
                                   num_image_tokens=(size // VISION_PATCH_SIZE) ** 2,
                                   vision_feature_select_strategy="full", chat_template=template)


# ---------------------------------------------------------------------------------------------------------
# Configs

TEXT_DIMS = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)
HEAD_DIM = 16
# Qwen2-VL's multimodal rope splits the head_dim/2 rotary frequencies into (temporal, height, width).
MROPE_SECTION = [2, 3, 3]
VISION_DIMS = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def token_ids(tokenizer) -> dict[str, int | None]:
    """Ids of the tokenizer's special tokens that the model config must agree with."""
    def tid(token):
        return tokenizer.convert_tokens_to_ids(token) if token in tokenizer.get_vocab() else None

    return {
        "pad": tokenizer.pad_token_id,
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "image": tid(getattr(tokenizer, "image_token", None) or "<image>"),
        "video": tid(getattr(tokenizer, "video_token", None) or "<video>"),
        "vision_start": tid("<|vision_start|>"),
        "vision_end": tid("<|vision_end|>"),
    }


# Outer-config fields whose names start with "vision_" (they are not vision-tower overrides).
OUTER_VISION_FIELDS = ("vision_feature_layer", "vision_feature_select_strategy", "vision_start_token_id",
                       "vision_end_token_id", "vision_aspect_ratio")


def _split_overrides(overrides: dict) -> tuple[dict, dict, dict]:
    """Overrides go to the text config unless prefixed 'vision_' (vision config) or 'top_' (outer config);
    outer fields that happen to start with 'vision_' go to the outer config as they are."""
    text, vision, top = {}, {}, {}
    for key, value in overrides.items():
        if key in OUTER_VISION_FIELDS:
            top[key] = value
        elif key.startswith("vision_"):
            vision[key[len("vision_"):]] = value
        elif key.startswith("top_"):
            top[key[len("top_"):]] = value
        else:
            text[key] = value
    return text, vision, top


def tiny_config(arch: str, vocab_size: int, *, tokenizer=None, image_size: int | None = None, **overrides):
    """The transformers config of a tiny `arch` model: 2 decoder layers, hidden 64, 4 heads, 2 KV heads,
    intermediate 128, head_dim 16; for VLMs a 2-block vision tower of width 32 with 14-pixel patches.

    Overrides apply to the text config (num_hidden_layers=3), to the vision config with a 'vision_' prefix
    (vision_num_hidden_layers=1 or, for Qwen-VL, vision_depth=1) and to the outer config with 'top_'.
    Special token ids come from `tokenizer` (default: the one build_tokenizer makes for the arch);
    `image_size` must match the processor's (LLaVA family: the vision tower's input and anyres tiles).
    """
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaNextConfig,
        LlavaOnevisionConfig,
        Qwen2_5_VLConfig,
        Qwen2Config,
        Qwen2VLConfig,
        Qwen3Config,
        SiglipVisionConfig,
    )

    _check_arch(arch)
    tokenizer = build_tokenizer(arch=arch) if tokenizer is None else tokenizer
    if vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens; "
                         "pass vocab_size >= len(tokenizer)")
    ids = token_ids(tokenizer)
    text_over, vision_over, top_over = _split_overrides(overrides)
    text = dict(TEXT_DIMS, vocab_size=vocab_size, pad_token_id=ids["pad"], bos_token_id=ids["bos"],
                eos_token_id=ids["eos"], tie_word_embeddings=False, rms_norm_eps=1e-6)
    if arch in QWEN_VL_FAMILY:
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": MROPE_SECTION}
    elif arch in ("llama", "qwen3"):
        text["head_dim"] = HEAD_DIM
    text.update(text_over)

    if arch == "llama":
        return LlamaConfig(**text)
    if arch == "qwen2":
        return Qwen2Config(**text)
    if arch == "qwen3":
        return Qwen3Config(**text)

    outer = {"tie_word_embeddings": False}
    if arch in QWEN_VL_FAMILY:
        vision = dict(depth=2, num_heads=2, patch_size=VISION_PATCH_SIZE, spatial_merge_size=QWEN_MERGE_SIZE,
                      temporal_patch_size=2)
        if arch == "qwen2_vl":
            vision.update(embed_dim=32, mlp_ratio=2, hidden_size=text["hidden_size"])
        else:
            # Window attention on blocks not listed as full attention; the last block attends fully.
            vision.update(hidden_size=32, intermediate_size=64, out_hidden_size=text["hidden_size"],
                          window_size=56, fullatt_block_indexes=[1])
        vision.update(vision_over)
        outer.update(image_token_id=ids["image"], video_token_id=ids["video"],
                     vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"])
        outer.update(top_over)
        cls = Qwen2VLConfig if arch == "qwen2_vl" else Qwen2_5_VLConfig
        return cls(text_config=text, vision_config=vision, **outer)

    size = DEFAULT_IMAGE_SIZE[arch] if image_size is None else int(image_size)
    vision = dict(VISION_DIMS, image_size=size, patch_size=VISION_PATCH_SIZE)
    vision.update(vision_over)
    # The feature strategy must match the processor's: CLIP towers drop their CLS token, SigLIP has none.
    outer.update(image_token_index=ids["image"], vision_feature_layer=-1)
    if arch == "llava_onevision":
        outer.update(video_token_index=ids["video"], image_grid_pinpoints=anyres_pinpoints(size),
                     vision_feature_select_strategy="full")
        outer.update(top_over)
        return LlavaOnevisionConfig(text_config=Qwen2Config(**text), vision_config=SiglipVisionConfig(**vision),
                                    **outer)
    outer.update(image_seq_length=(size // VISION_PATCH_SIZE) ** 2, vision_feature_select_strategy="default")
    if arch == "llava_next":
        outer["image_grid_pinpoints"] = anyres_pinpoints(size)
    outer.update(top_over)
    cls = LlavaConfig if arch == "llava" else LlavaNextConfig
    return cls(text_config=LlamaConfig(**text), vision_config=CLIPVisionConfig(**vision), **outer)


# ---------------------------------------------------------------------------------------------------------
# Models, images and example inputs


def tiny_image(seed: int, size: int | tuple[int, int] = 56) -> Image.Image:
    """A small random RGB image, the same for the same seed: smooth colour blocks plus noise, so that
    patches differ from each other. `size` is an int (square) or (width, height)."""
    width, height = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(4, 4, 3)).astype(np.float32)
    base = np.kron(blocks, np.ones((-(-height // 4), -(-width // 4), 1), dtype=np.float32))[:height, :width]
    noise = rng.normal(0.0, 20.0, size=(height, width, 3))
    pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def _model_class(arch: str):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if arch in VLM_ARCHS else AutoModelForCausalLM


def make_tiny(arch: str, path, *, seed: int = 0, words: list[str] | None = None, image_size: int | None = None,
              **config_overrides) -> Path:
    """Build the tokenizer, processor (VLMs) and a float32 model with weights drawn after
    torch.manual_seed(seed); save them all to `path` and return it. The same seed gives the same
    model.safetensors bytes."""
    _check_arch(arch)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(words, arch=arch)
    config = tiny_config(arch, len(tokenizer), tokenizer=tokenizer, image_size=image_size, **config_overrides)
    torch.manual_seed(seed)
    model = _model_class(arch).from_config(config, dtype=torch.float32)
    model.eval()
    model.save_pretrained(path)
    if arch in VLM_ARCHS:
        build_processor(arch, tokenizer, image_size=image_size).save_pretrained(path)
    else:
        tokenizer.save_pretrained(path)
    return path


EXAMPLE_QUESTIONS = ("what is in the image?", "describe this picture.", "how many colors are there?")
EXAMPLE_ANSWERS = ("a red cat and a tree.", "there are two blue cars.", "three colors: red, green and blue.")


def write_image_calib(folder, n: int, *, size: int = 56, prompts=EXAMPLE_QUESTIONS, answers=EXAMPLE_ANSWERS) -> Path:
    """A JSONL calibration set of n image rows (tiny_image(i) under folder/images, prompts and answers
    taken in turn) -> the path of folder/data.jsonl."""
    folder = Path(folder)
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        tiny_image(i, size).save(images / f"{i}.png")
        rows.append(json.dumps({"image": f"images/{i}.png", "prompt": prompts[i % len(prompts)],
                                "answer": answers[i % len(answers)]}))
    path = folder / "data.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


def example_messages(index: int, *, with_answer: bool = True) -> list[dict]:
    """One chat: a user turn with an image and a question, and (optionally) the assistant's answer."""
    question = EXAMPLE_QUESTIONS[index % len(EXAMPLE_QUESTIONS)]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    if with_answer:
        answer = EXAMPLE_ANSWERS[index % len(EXAMPLE_ANSWERS)]
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def example_inputs(path, n: int = 2, seed: int = 0, *, with_answer: bool = True) -> list[dict]:
    """n processed samples (batch of one each) for the tiny model saved at `path`: for VLMs the processor
    outputs (input_ids, attention_mask, pixel_values, image_grid_thw or image_sizes ...) of a chat with an
    image, a question and an answer; for text-only models the tokenizer outputs of the same chat without
    the image. This is how calibration samples are processed."""
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer

    config = AutoConfig.from_pretrained(path)
    is_vlm = config.model_type in VLM_ARCHS
    samples = []
    if is_vlm:
        processor = AutoProcessor.from_pretrained(path)
        size = _processor_image_size(processor)
        for i in range(n):
            text = processor.apply_chat_template(example_messages(i, with_answer=with_answer), tokenize=False,
                                                 add_generation_prompt=not with_answer)
            image = tiny_image(seed * 1000 + i, size)
            samples.append(dict(processor(text=[text], images=[image], return_tensors="pt")))
        return samples
    tokenizer = AutoTokenizer.from_pretrained(path)
    for i in range(n):
        messages = example_messages(i, with_answer=with_answer)
        messages[0]["content"] = [part for part in messages[0]["content"] if part["type"] == "text"]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=not with_answer)
        samples.append(dict(tokenizer([text], return_tensors="pt", add_special_tokens=False)))
    return samples


def _processor_image_size(processor) -> int:
    """The side of the images the saved processor was configured for."""
    image_processor = processor.image_processor
    size = image_processor.size
    if hasattr(image_processor, "merge_size"):
        return int(round(size["longest_edge"] ** 0.5))  # Qwen-VL: size holds pixel counts
    for key in ("height", "shortest_edge"):
        if key in size:
            return int(size[key])
    raise ValueError(f"cannot tell the image size from the processor's size {dict(size)}")
