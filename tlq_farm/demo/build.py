"""Build the demo VLM's tokenizer, processor and (untrained) Qwen2-VL model.

The tokenizer is word-level over the scene vocabulary plus the Qwen2-VL special tokens; the processor
is a real Qwen2VLProcessor, so the shipped folder loads with AutoProcessor and
AutoModelForImageTextToText like any Qwen2-VL checkpoint.
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration
from transformers.models.qwen2_vl import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

from tlq_farm.demo.scenes import IMAGE_SIZE, vocabulary

PAD, UNK = "<|endoftext|>", "<unk>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
SPECIAL_TOKENS = [PAD, UNK, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD]
ROLE_WORDS = ["system", "user", "assistant"]

PATCH_SIZE = 8
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
# The LM's rotary base and its split into (temporal, height, width) frequencies; see build_config.
ROPE_THETA = 100.0
MROPE_SECTION = (2, 4, 10)

# Qwen2-VL's layout, with the words separated by whitespace (the word-level tokenizer drops it).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(words: list[str] | None = None) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: special tokens first (ids 0..7), then role words, then `words`."""
    words = vocabulary() if words is None else list(words)
    vocab: dict[str, int] = {}
    for token in SPECIAL_TOKENS + ROLE_WORDS + words:
        vocab.setdefault(token, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # \w+ and punctuation runs: "square?" -> "square", "?"
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token=UNK,
        pad_token=PAD,
        eos_token=IM_END,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (PAD, UNK, IM_END)],
        model_max_length=512,
        padding_side="left",
    )
    return tokenizer


def build_processor(tokenizer: PreTrainedTokenizerFast | None = None) -> Qwen2VLProcessor:
    """Qwen2VLProcessor whose images are resized to IMAGE_SIZE x IMAGE_SIZE pixels.

    With patch 8 and merge 2 a 128 px image gives a 16 x 16 patch grid and 64 merged vision tokens.
    """
    tokenizer = tokenizer or build_tokenizer()
    pixels = IMAGE_SIZE * IMAGE_SIZE
    image_processor = Qwen2VLImageProcessor(
        patch_size=PATCH_SIZE,
        merge_size=MERGE_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        min_pixels=pixels,
        max_pixels=pixels,
    )
    # The processor class requires a video processor; the demo never sees videos, but keep it consistent.
    video_processor = Qwen2VLVideoProcessor(
        patch_size=PATCH_SIZE, merge_size=MERGE_SIZE, temporal_patch_size=TEMPORAL_PATCH_SIZE,
        min_pixels=pixels, max_pixels=pixels,
    )
    return Qwen2VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def build_config(tokenizer: PreTrainedTokenizerFast, *, hidden_size: int = 128, num_layers: int = 4) -> Qwen2VLConfig:
    """Config of the demo model: tiny vision tower (depth 2, width 64), 4-layer LM with grouped KV heads.

    All decoder linear in-features (128 and the MLP width 384) are multiples of 32 and 64.
    head_dim 32 -> 16 rotary frequencies theta^(-i/16), split as mrope_section [2, 4, 10] (temporal,
    height, width). M-RoPE gives the width the lowest frequencies; with Qwen2-VL's theta 1e4 and an 8-token
    wide image they turn by under 0.05 rad from the left column to the right one, so attention cannot
    tell the columns apart. theta 100 and ten width frequencies turn the rightmost column by up to 1.2 rad.
    """
    ids = tokenizer.convert_tokens_to_ids
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "intermediate_size": 3 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": hidden_size // 32,
        "num_key_value_heads": max(1, hidden_size // 64),
        "head_dim": 32,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA, "mrope_section": list(MROPE_SECTION)},
        "bos_token_id": None,
        "eos_token_id": ids(IM_END),
        "pad_token_id": ids(PAD),
        "tie_word_embeddings": False,
    }
    vision_config = {
        "depth": 2,
        "embed_dim": 64,
        "hidden_size": hidden_size,  # the merger projects into the LM width
        "num_heads": 4,
        "mlp_ratio": 2,
        "in_channels": 3,
        "patch_size": PATCH_SIZE,
        "spatial_merge_size": MERGE_SIZE,
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
    }
    return Qwen2VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids(IMAGE_PAD),
        video_token_id=ids(VIDEO_PAD),
        vision_start_token_id=ids(VISION_START),
        vision_end_token_id=ids(VISION_END),
        tie_word_embeddings=False,
    )


def build_model(config: Qwen2VLConfig) -> Qwen2VLForConditionalGeneration:
    """Randomly initialised model (seed torch before calling for a reproducible init)."""
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.generation_config.bos_token_id = None
    model.generation_config.do_sample = False
    return model
