"""Where a model keeps its prefix, decoder blocks, final norm and head, found by structure.

A VLM is read as: prefix (vision tower, projector, embeddings: everything that runs before the first decoder
block), a list of decoder blocks, and a head (final norm + lm_head). We look for the structure instead of
class names, so an architecture not listed in the docs mostly works; EXPLICIT holds overrides for the models
whose structure is ambiguous. What structure cannot tell is whether a model generates text left to right: an
encoder such as BERT has blocks and a head too. So a model_type must be one transformers builds as a causal
LM or an image-text-to-text model, and not an encoder or encoder-decoder (is_decoder_model_type).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

VISION_HINTS = ("visual", "vision", "image", "siglip", "clip")
NORM_NAMES = ("norm", "final_layernorm", "ln_f", "final_norm")

# model class name -> (blocks path, norm path, vision blocks path); only where structure is not enough.
EXPLICIT: dict[str, tuple[str, str, str | None]] = {}

# The config model_types that are tested end to end (tlq_farm.models.tiny builds one of each).
SUPPORTED_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "llava", "llava_next", "llava_onevision", "llama", "qwen2", "qwen3")


def is_decoder_model_type(model_type, is_encoder_decoder: bool = False) -> bool:
    """Whether transformers builds `model_type` as a decoder-only causal LM or image-text-to-text model.

    The masked-LM mapping holds the encoders (BERT, RoBERTa, ...) that the causal-LM mapping also lists
    as decoders; encoder-decoders say so in their config."""
    from transformers.models.auto import modeling_auto as auto

    if model_type in SUPPORTED_MODEL_TYPES:
        return True
    if is_encoder_decoder or model_type in auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return False
    return model_type in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or model_type in auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


def import_model_code() -> None:
    """Import transformers' model base classes, attention masks and auto mappings, which every architecture's
    code and processor import (about 2 CPU s: they pull in torch.distributed, torch._dynamo and torchvision),
    as long-lived objects (tlq_farm.heap)."""
    from tlq_farm.heap import long_lived

    with long_lived():
        import transformers.masking_utils  # noqa: F401
        import transformers.modeling_utils  # noqa: F401
        import transformers.models.auto.modeling_auto  # noqa: F401
        import transformers.models.auto.processing_auto  # noqa: F401


class UnsupportedModel(ValueError):
    """A model tlq-farm cannot quantize: its architecture, or its decoder blocks or head could not be located."""


class CorruptCheckpoint(UnsupportedModel):
    """A weights file of the model folder that cannot be read (truncated, or not a safetensors file)."""


@dataclass(frozen=True)
class Layout:
    blocks: str          # dotted path of the nn.ModuleList of decoder blocks
    norm: str | None     # final norm applied before the head (None: the head takes block outputs)
    head: str            # the output projection (lm_head)
    vision_blocks: str | None  # the vision tower's block list, when the model has one
    model_class: str

    def get(self, model: nn.Module, path: str | None) -> nn.Module | None:
        return None if path is None else model.get_submodule(path)

    def decoder_blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks)

    def vision_block_list(self, model: nn.Module) -> nn.ModuleList | None:
        return None if self.vision_blocks is None else model.get_submodule(self.vision_blocks)

    @property
    def is_vlm(self) -> bool:
        return self.vision_blocks is not None


def _is_block(m: nn.Module) -> bool:
    names = [n for n, _ in m.named_children()]
    has_attn = any("attn" in n or "attention" in n for n in names)
    has_linear = any(isinstance(x, nn.Linear) for x in m.modules())
    return has_attn and has_linear


def _block_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    found = []
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0 and all(_is_block(c) for c in m):
            found.append((name, m))
    return found


def _is_vision_path(path: str) -> bool:
    return any(h in path.lower() for h in VISION_HINTS)


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def find_layout(model: nn.Module) -> Layout:
    cls = type(model).__name__
    if cls in EXPLICIT:
        blocks, norm, vis = EXPLICIT[cls]
        return Layout(blocks, norm, _head_path(model), vis, cls)
    lists = _block_lists(model)
    text_lists = [(n, m) for n, m in lists if not _is_vision_path(n)]
    vision_lists = [(n, m) for n, m in lists if _is_vision_path(n)]
    if not text_lists:
        raise UnsupportedModel(
            f"tlq-farm cannot find the decoder blocks of {cls}: no list of attention blocks outside the vision "
            f"tower was found. Add an entry for {cls} to tlq_farm.models.adapter.EXPLICIT "
            f"(blocks path, final norm path, vision blocks path)."
        )
    blocks_path, _ = max(text_lists, key=lambda nm: _n_params(nm[1]))
    parent_path = blocks_path.rsplit(".", 1)[0] if "." in blocks_path else ""
    parent = model.get_submodule(parent_path) if parent_path else model
    norm = None
    for nn_name in NORM_NAMES:
        if hasattr(parent, nn_name) and isinstance(getattr(parent, nn_name), nn.Module):
            norm = f"{parent_path}.{nn_name}" if parent_path else nn_name
            break
    vis = max(vision_lists, key=lambda nm: _n_params(nm[1]))[0] if vision_lists else None
    return Layout(blocks_path, norm, _head_path(model), vis, cls)


def _head_path(model: nn.Module) -> str:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise UnsupportedModel(
            f"{type(model).__name__} has no output embeddings (lm_head): tlq-farm quantizes causal language "
            f"models and VLMs with a language-model head; load the model with AutoModelForCausalLM or "
            f"AutoModelForImageTextToText."
        )
    for name, m in model.named_modules():
        if m is head:
            return name
    raise UnsupportedModel(f"the lm_head of {type(model).__name__} is not a submodule of the model")


def copy_module(module: nn.Module) -> nn.Module:
    """A deep copy of `module` that shares its config objects with the original: modules only read their
    config, and copying it (a validated dataclass tree) for every block cost more than the block's own copy."""
    import copy

    memo = {id(m.config): m.config for m in module.modules() if getattr(m, "config", None) is not None}
    return copy.deepcopy(module, memo)


def linear_names(block: nn.Module) -> list[str]:
    return [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]


def block_output(out) -> torch.Tensor:
    """Decoder layers return a tensor in transformers 5 and a tuple in older code: take the hidden states."""
    return out[0] if isinstance(out, (tuple, list)) else out


def read_config(path):
    """The transformers config of model folder `path`, refused with one line when the folder is missing, its
    config.json unreadable, or its model_type not a decoder-only model (is_decoder_model_type)."""
    import json
    from pathlib import Path

    import transformers

    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"model folder {path} does not exist: pass a folder saved with save_pretrained")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model folder (no config.json): pass a folder saved with save_pretrained")
    try:
        raw = json.loads((p / "config.json").read_text())
        model_type, classes = raw.get("model_type"), raw.get("architectures") or []
        encoder_decoder = bool(raw.get("is_encoder_decoder"))
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as e:
        raise UnsupportedModel(f"{p / 'config.json'} is not a readable JSON config ({type(e).__name__}): "
                               "re-save the model with save_pretrained") from None
    if not is_decoder_model_type(model_type, encoder_decoder):
        arch = f" ({', '.join(map(str, classes))})" if classes else ""
        raise UnsupportedModel(f"{path}: model_type {model_type!r}{arch} is not supported; tlq-farm quantizes "
                               f"{', '.join(SUPPORTED_MODEL_TYPES)}: pass a checkpoint of one of these (or of "
                               "another decoder-only language or vision-language model; an encoder such as BERT "
                               "or an encoder-decoder such as T5 cannot be)")
    try:
        return transformers.AutoConfig.from_pretrained(str(p))
    except Exception as e:  # transformers' config validation raises several types; each means a bad config.json
        why = " ".join(str(e).split()) or type(e).__name__
        raise UnsupportedModel(f"{p / 'config.json'} is not a valid {model_type} config ({why}): re-save the model "
                               "with save_pretrained from the installed transformers") from None


def check_weights(path) -> None:
    """Open the header of every .safetensors file of `path`, so that a truncated or garbage file is refused
    with its name before anything is loaded or staged (safetensors also checks that the header's offsets
    cover the file exactly, which catches a cut-off download)."""
    from pathlib import Path

    from safetensors import SafetensorError, safe_open

    for f in sorted(Path(path).glob("*.safetensors")):
        try:
            with safe_open(str(f), "pt") as handle:
                handle.keys()
        except (SafetensorError, OSError) as e:
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CorruptCheckpoint(f"weights file {f} cannot be read ({why}): it is truncated or not a "
                                    "safetensors file; copy it again or re-save the model with save_pretrained") from None


def load_model(path: str, *, dtype=torch.float32, device: str = "cpu"):
    """Load (model, processor-or-tokenizer) from a local folder with transformers' Auto classes."""
    import transformers

    config = read_config(path)
    check_weights(path)
    is_vlm = hasattr(config, "vision_config")
    kw = dict(dtype=dtype, attn_implementation="sdpa", output_loading_info=True)
    if is_vlm:
        model, info = transformers.AutoModelForImageTextToText.from_pretrained(path, **kw)
        processor = transformers.AutoProcessor.from_pretrained(path)
    else:
        model, info = transformers.AutoModelForCausalLM.from_pretrained(path, **kw)
        processor = transformers.AutoTokenizer.from_pretrained(path)
    # transformers fills weights missing from the checkpoint with random values and only warns: a
    # quantized random model must not pass for the user's (staging refuses the same checkpoint too).
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise CorruptCheckpoint(f"the checkpoint in {path} has no tensor for {missing[0]!r} (and {len(missing) - 1} "
                                "more): it does not match the model's config; check that config.json and the "
                                ".safetensors files belong together")
    model.eval().to(device)
    return model, processor
