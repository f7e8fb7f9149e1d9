"""Turn one (images, prompt, answer) example into model inputs with the processor's own chat template.

The answer span is found by comparing token prefixes of two renderings of the same conversation: the
prompt alone with the generation prompt, and the whole exchange. This needs no knowledge of a particular
template, so it works for Qwen2-VL, LLaVA-style processors and text-only tokenizers alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .data import CalibError

IGNORE_INDEX = -100


class NoChatTemplate(CalibError):
    """The model's processor or tokenizer has no chat template, so no prompt can be rendered."""


class SampleTooLong(ValueError):
    """A sample's token count exceeds the sequence length the job allows."""

    def __init__(self, n_tokens: int, max_len: int):
        self.n_tokens = n_tokens
        self.max_len = max_len
        super().__init__(
            f"sample has {n_tokens} tokens, more than the maximum sequence length {max_len}; "
            f"raise --seq-len to at least {n_tokens} or shorten the prompt/answer (or use smaller images)"
        )


def _tokenizer_of(processor):
    """The text tokenizer inside a processor, or the object itself when it is a tokenizer."""
    return getattr(processor, "tokenizer", None) or processor


def require_chat_template(processor) -> None:
    """Raise NoChatTemplate unless `processor` (a VLM processor, or a tokenizer) has a chat template."""
    if getattr(processor, "chat_template", None):
        return
    name = getattr(_tokenizer_of(processor), "name_or_path", None) or type(processor).__name__
    raise NoChatTemplate(
        f"the model {name} has no chat template, and calibration prompts are rendered with it: add a "
        "chat_template.jinja to the model folder (or save its processor / tokenizer with chat_template set)"
    )


def is_multimodal_processor(processor) -> bool:
    """True when `processor` handles images (has an image processor), False for a plain tokenizer."""
    return getattr(processor, "image_processor", None) is not None


def image_token_id_of(processor) -> int | None:
    """Id of the image placeholder token: `processor.image_token_id`, else the id of `processor.image_token`."""
    token_id = getattr(processor, "image_token_id", None)
    if token_id is not None:
        return int(token_id)
    token = getattr(processor, "image_token", None)
    if token is None:
        return None
    return int(_tokenizer_of(processor).convert_tokens_to_ids(token))


def build_messages(n_images: int, prompt: str, answer: str | None, *, multimodal: bool) -> list[dict]:
    """The conversation in the structured form chat templates expect.

    Multimodal templates take content lists with {"type": "image"} entries; text-only templates
    mostly expect plain strings, so a tokenizer gets string contents.
    """
    if multimodal:
        user_content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": prompt}]
        messages = [{"role": "user", "content": user_content}]
        if answer is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    else:
        messages = [{"role": "user", "content": prompt}]
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})
    return messages


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Number of leading positions where sequences `a` and `b` agree."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def answer_label_span(
    prompt_ids: Sequence[int], full_ids: Sequence[int], closing_ids: Sequence[int], tokenizer
) -> tuple[int, int]:
    """[start, end) of the positions of `full_ids` that are trained on: the answer and its end-of-turn token.

    `prompt_ids` is the prompt rendered with the generation prompt; the answer starts where it stops
    agreeing with `full_ids`. `closing_ids` is what the template writes after the answer (end-of-turn
    token, newline, ...): the first of those tokens is kept in the span (the model must learn to stop),
    layout-only whitespace after it is not. When the closing text does not tokenize the same in context
    (a merge across the boundary), everything after the prompt is labelled.
    """
    start = common_prefix_length(prompt_ids, full_ids)
    end = len(full_ids)
    n_closing = len(closing_ids)
    if n_closing and list(full_ids[end - n_closing:]) == list(closing_ids) and end - n_closing >= start:
        end = end - n_closing
        first_closing = closing_ids[0]
        # Keep the end-of-turn token; a bare newline the template adds for layout is not worth learning.
        if tokenizer.decode([first_closing]).strip():
            end += 1
    return start, end


def _render(processor, messages: list[dict], *, add_generation_prompt: bool) -> str:
    """Chat-template text of `messages` (processor template, or the tokenizer's for text-only)."""
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _call_kwargs(tokenizer, text: str) -> dict:
    # A template that already writes the BOS token must not get a second one from the tokenizer.
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos):
        return {"add_special_tokens": False}
    return {}


def _tokenize(processor, text: str, images: list) -> dict:
    """Processor outputs for `text` (+ `images`), tensors with batch dim 1."""
    tokenizer = _tokenizer_of(processor)
    kwargs = _call_kwargs(tokenizer, text)
    if is_multimodal_processor(processor):
        out = processor(text=[text], images=list(images) if images else None, return_tensors="pt", **kwargs)
    else:
        out = tokenizer([text], return_tensors="pt", **kwargs)
    return dict(out)


def _prompt_ids(processor, prompt_text: str, full_text: str, full_ids: list[int], images: list) -> list[int]:
    """The ids of the prompt rendered for generation, as far as they agree with `full_ids` (what
    answer_label_span compares), without running the images through the processor a second time where the
    text alone tells: the placeholders expand inside the prompt only, so the full text's tokens after them
    are `full_ids`' last tokens. Checked; else the prompt goes through the processor with its images."""
    tokenizer = _tokenizer_of(processor)
    image_id = image_token_id_of(processor) if images else None
    if image_id is not None:
        p = tokenizer([prompt_text], **_call_kwargs(tokenizer, prompt_text))["input_ids"][0]
        f = tokenizer([full_text], **_call_kwargs(tokenizer, full_text))["input_ids"][0]
        start = common_prefix_length(p, f)
        shift = len(full_ids) - len(f)
        tail = list(f[start:])
        if shift >= 0 and image_id not in tail and full_ids[start + shift:] == tail:
            return full_ids[:start + shift]
    return _tokenize(processor, prompt_text, images)["input_ids"][0].tolist()


def encode_example(processor, images: list, prompt: str, answer: str | None, *, max_len: int | None = None) -> dict:
    """Encode one example into model inputs (every tensor has batch dim 1).

    Returns input_ids, attention_mask, labels (IGNORE_INDEX except on the answer tokens and the
    end-of-turn token after them), vision_mask (bool, True on image placeholder tokens) and every
    other processor output (pixel_values, image_grid_thw, mm_token_type_ids, image_sizes, ...).
    `answer=None` encodes the prompt with the generation prompt, for generation; labels are then all
    IGNORE_INDEX. `processor` may be a VLM processor or a text-only tokenizer (then `images` must be
    empty). Raises SampleTooLong when `max_len` is given and the sample is longer.
    """
    images = list(images or [])
    multimodal = is_multimodal_processor(processor)
    if images and not multimodal:
        raise ValueError(
            f"got {len(images)} image(s) but {type(processor).__name__} is a text-only tokenizer; "
            "load the model's processor (AutoProcessor) or drop the images from the sample"
        )
    require_chat_template(processor)
    tokenizer = _tokenizer_of(processor)

    prompt_messages = build_messages(len(images), prompt, None, multimodal=multimodal)
    prompt_text = _render(processor, prompt_messages, add_generation_prompt=True)

    if answer is None:
        out = _tokenize(processor, prompt_text, images)
        labels = torch.full_like(out["input_ids"], IGNORE_INDEX)
    else:
        full_messages = build_messages(len(images), prompt, answer, multimodal=multimodal)
        full_text = _render(processor, full_messages, add_generation_prompt=False)
        out = _tokenize(processor, full_text, images)
        # What the template writes after the answer: found in the text, tokenized on its own.
        tail = full_text[len(prompt_text):] if full_text.startswith(prompt_text) else full_text
        answer_at = tail.rfind(answer)
        closing_text = tail[answer_at + len(answer):] if answer_at >= 0 else ""
        closing_ids = tokenizer(closing_text, add_special_tokens=False)["input_ids"] if closing_text else []
        full_ids = out["input_ids"][0].tolist()
        start, end = answer_label_span(_prompt_ids(processor, prompt_text, full_text, full_ids, images),
                                       full_ids, closing_ids, tokenizer)
        if end <= start:
            raise ValueError(
                f"could not find the answer {answer!r} in the rendered conversation; "
                "check that the chat template writes the assistant turn"
            )
        labels = torch.full_like(out["input_ids"], IGNORE_INDEX)
        labels[0, start:end] = out["input_ids"][0, start:end]

    n_tokens = int(out["input_ids"].shape[1])
    if max_len is not None and n_tokens > max_len:
        raise SampleTooLong(n_tokens, max_len)

    image_token_id = image_token_id_of(processor) if multimodal else None
    if image_token_id is None:
        vision_mask = torch.zeros_like(out["input_ids"], dtype=torch.bool)
    else:
        vision_mask = out["input_ids"] == image_token_id

    encoded = dict(out)
    encoded["labels"] = labels
    encoded["vision_mask"] = vision_mask
    if "attention_mask" not in encoded:
        encoded["attention_mask"] = torch.ones_like(encoded["input_ids"])
    return encoded
