"""Staging a job: the checkpoint split per block, the encoded calibration samples and the manifest.

The checkpoint is read tensor by tensor with safetensors.safe_open, so the whole model is never in memory.
Checkpoint keys may be written in an older layout than the model's module names (transformers 5 saves
Qwen2-VL as 'model.layers.*' while the module is 'model.language_model.layers.*'); `match_checkpoint_keys`
pairs each module key with its checkpoint key through transformers' own renamings. The manifest is committed last: a job exists once its
manifest does, and everything it names is in the store.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from . import plan
from .spec import JobSpec, SpecError, fingerprint
from .store import Store, keys
from .store.base import sha256_file
from .store.tensors import get_json, put_json, put_tensors, tensor_bytes, tensors_to_bytes

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")


class StagingError(ValueError):
    """A model folder that cannot be staged; the message says what is missing and what to do."""


# ----------------------------------------------------------------------------------------------- model files

def model_config(model_dir: str | Path):
    """The folder's config; a missing folder or an unsupported model_type is refused in one line."""
    from .models.adapter import read_config

    return read_config(model_dir)


def model_class_for(config):
    """The Auto class a config loads with (the same choice as tlq_farm.models.adapter.load_model)."""
    import transformers

    return transformers.AutoModelForImageTextToText if hasattr(config, "vision_config") else transformers.AutoModelForCausalLM


def meta_model(config, dtype: torch.dtype = torch.float32):
    """The model's module tree on the meta device: names and shapes, no memory."""
    with torch.device("meta"):
        model = model_class_for(config).from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def checkpoint_dtype(model_dir: str | Path) -> str:
    """The floating dtype most of the checkpoint's weights are stored in ('bfloat16', 'float32', ...), from the
    safetensors headers (no tensor is read)."""
    from safetensors import safe_open

    names = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}
    counts: dict[str, int] = {}
    for f in checkpoint_files(model_dir):
        with safe_open(str(f), "pt") as handle:
            for name in handle.keys():
                piece = handle.get_slice(name)
                dtype = names.get(piece.get_dtype())
                if dtype is not None:
                    n = 1
                    for d in piece.get_shape():
                        n *= int(d)
                    counts[dtype] = counts.get(dtype, 0) + n
    return max(counts, key=counts.get) if counts else "float32"


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    p = Path(model_dir)
    files = sorted(p.glob("*.safetensors"))
    if not files:
        raise StagingError(f"{model_dir} holds no .safetensors weights: save the model with "
                           "save_pretrained(..., safe_serialization=True)")
    return files


def side_files(model_dir: str | Path) -> list[str]:
    """Top-level files that are not weights: config.json, tokenizer, processor, chat template..."""
    return sorted(f.name for f in Path(model_dir).iterdir()
                  if f.is_file() and not f.name.startswith(".") and not f.name.endswith(WEIGHT_SUFFIXES)
                  and not f.name.endswith(".index.json"))


def checkpoint_key_map(files: list[Path]) -> dict[str, Path]:
    from safetensors import safe_open

    where: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), "pt") as handle:
            for k in handle.keys():
                where[k] = f
    return where


def checkpoint_to_module_keys(model, checkpoint_keys: set[str]) -> dict[str, str]:
    """checkpoint key -> module key, with the renamings transformers itself applies when it loads `model`.

    A checkpoint that needs a tensor conversion (fused or split weights) is refused: its pieces would not
    be the tensors the modules hold.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    module_state = model.state_dict()
    out = {}
    for ck in sorted(checkpoint_keys):
        mk, converter = rename_source_key(ck, renamings, converters, model.base_model_prefix, module_state)
        if converter is not None:
            raise StagingError(f"checkpoint tensor {ck!r} must be converted (not only renamed) to load: tlq-farm "
                               "cannot stage this layout; re-save the model with save_pretrained from the installed "
                               "transformers, or run it with `tlq-farm run --in-memory`")
        out[ck] = mk
    return out


def match_checkpoint_keys(model, checkpoint_keys: set[str], tied: dict[str, str] | None = None) -> dict[str, str]:
    """module key -> checkpoint key for every tensor of the model's state dict.

    tied[module key] names the module key whose tensor it shares (a tied lm_head is not in the checkpoint).
    """
    tied = tied or {}
    found = {mk: ck for ck, mk in checkpoint_to_module_keys(model, checkpoint_keys).items()}
    out = {}
    for k in model.state_dict():
        if k in found:
            out[k] = found[k]
        elif k in tied and tied[k] in found:
            out[k] = found[tied[k]]
        else:
            raise StagingError(f"the checkpoint has no tensor for {k!r}: it does not match the model's config; "
                               "check that config.json and the .safetensors files belong together")
    return out


def tied_keys(model) -> dict[str, str]:
    """Output-head weight -> input-embedding weight when the two are tied (one tensor in the checkpoint)."""
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    in_emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if out_emb is None or in_emb is None or out_emb.weight is not in_emb.weight:
        return {}
    names = {id(m): n for n, m in model.named_modules()}
    return {f"{names[id(out_emb)]}.weight": f"{names[id(in_emb)]}.weight"}


def split_keys(module_keys: list[str], layout, n_blocks: int, n_vision_blocks: int = 0) -> dict[str, list[str]]:
    """Module keys per piece: 'embed' (the prefix without the vision tower's blocks), 'head' (final norm +
    lm_head), 'block-<b>' and 'vision-block-<b>'."""
    pieces: dict[str, list[str]] = {"embed": [], "head": []}
    pieces.update({f"block-{b}": [] for b in range(n_blocks)})
    pieces.update({f"vision-block-{b}": [] for b in range(n_vision_blocks)})
    head_prefixes = [p + "." for p in (layout.head, layout.norm) if p]
    for k in module_keys:
        if k.startswith(layout.blocks + "."):
            b = int(k[len(layout.blocks) + 1:].split(".", 1)[0])
            pieces[f"block-{b}"].append(k)
        elif n_vision_blocks and k.startswith(layout.vision_blocks + "."):
            b = int(k[len(layout.vision_blocks) + 1:].split(".", 1)[0])
            pieces[f"vision-block-{b}"].append(k)
        elif any(k.startswith(p) for p in head_prefixes):
            pieces["head"].append(k)
        else:
            pieces["embed"].append(k)
    return pieces


def file_digest(paths: list[Path]) -> str:
    """sha256 over each file's name and the sha256 of its bytes: content only, not the folder it lies in.

    Every byte is read on every run, files side by side (hashlib releases the GIL): no (size, mtime) cache,
    since a file edited in place with both kept would then attach to the job of its old content."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, min(4, len(paths), os.cpu_count() or 1))) as pool:
        digests = [bytes.fromhex(hex_digest) for hex_digest, _size in pool.map(sha256_file, paths)]
    h = hashlib.sha256()
    for p, d in zip(paths, digests):
        h.update(p.name.encode() + b"\0" + d)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------- staging

def encode_calibration(spec: JobSpec):
    """(calibration set, processor) exactly as the in-memory run loads them."""
    import transformers

    from .calib.data import load_calibration

    config = model_config(spec.model)
    processor = (transformers.AutoProcessor if hasattr(config, "vision_config") else transformers.AutoTokenizer
                 ).from_pretrained(spec.model)
    return load_calibration(spec.calib, processor, samples=spec.samples, seq_len=spec.seq_len, seed=spec.seed)


def job_id_for(spec: JobSpec, model_dir: Path, samples: list[dict]) -> tuple[str, str, str]:
    """(job id, model digest, data digest): the spec's options over the model's file bytes and the
    calibration samples as encoded (token ids, pixel tensors), so paths do not change the id."""
    from .steps import sample_tensors

    files = [model_dir / n for n in side_files(model_dir)] + checkpoint_files(model_dir)
    model_digest = file_digest(files)
    h = hashlib.sha256()
    for s in samples:
        h.update(hashlib.sha256(tensors_to_bytes(sample_tensors(s))).digest())
    data_digest = h.hexdigest()
    return fingerprint(spec, model_digest, data_digest), model_digest, data_digest


def stage_job(store: Store, spec: JobSpec, *, log=lambda m: None, warn=None) -> tuple[str, bool]:
    """Stage `spec` into `store` -> (job id, attached). An already staged job (same model, data and spec)
    is attached to, not staged again. `warn` gets what the data did not give (default: `log`)."""
    from .models.adapter import check_weights, find_layout
    from .steps import sample_tensors, samples_to_tensors

    spec.validate()
    model_dir = Path(spec.model)
    config = model_config(model_dir)
    check_weights(model_dir)
    calib = encode_calibration(spec)
    for line in calib.notes(spec.samples):
        (warn or log)(line)
    job, model_digest, data_digest = job_id_for(spec, model_dir, calib.samples)
    if store.is_committed(keys.manifest(job)):
        return job, True

    meta = meta_model(config)
    layout = find_layout(meta)
    check_grid_fits(meta, layout, spec)
    n_blocks = len(layout.decoder_blocks(meta))
    vision_list = layout.vision_block_list(meta)
    n_vision = len(vision_list) if vision_list is not None else 0
    log(f"staging job {job}: {n_blocks} blocks, {len(calib.samples)} samples -> {store.url}")

    # Every check that can refuse the checkpoint runs before the first write: a refused model leaves no
    # job folder behind.
    where = checkpoint_key_map(checkpoint_files(model_dir))
    module_keys = list(meta.state_dict().keys())
    mapping = match_checkpoint_keys(meta, set(where), tied_keys(meta))

    files = side_files(model_dir)
    for name in files:
        store.put_file(keys.staged_file(job, name), model_dir / name)
    compute_bytes = torch.empty((), dtype=getattr(torch, spec.dtype)).element_size()
    pieces = split_keys(module_keys, layout, n_blocks, n_vision)
    sizes = {"embed": 0, "head": 0, "blocks": [0] * n_blocks, "vision_blocks": [0] * n_vision}
    for piece, names in pieces.items():
        tensors = read_tensors(where, mapping, names)
        strip, tower = "", "vision" if piece.startswith("vision-") else None
        if piece.startswith(("block-", "vision-block-")):
            b = int(piece.rsplit("-", 1)[1])
            strip = f"{layout.vision_blocks if tower else layout.blocks}.{b}."
            key = keys.staged_block(job, b, tower)
        else:
            key = keys.staged_embed(job) if piece == "embed" else keys.staged_head(job)
        named = {k[len(strip):]: v for k, v in tensors.items()}
        put_tensors(store, key, named)
        # What a task holds in memory once the piece is loaded into modules of the compute dtype.
        nbytes = sum(v.numel() * (compute_bytes if v.is_floating_point() else v.element_size()) for v in named.values())
        if strip:
            sizes["vision_blocks" if tower else "blocks"][int(piece.rsplit("-", 1)[1])] = nbytes
        else:
            sizes[piece] = nbytes
        del tensors, named

    token_counts = [int(s["attention_mask"].sum()) for s in calib.samples]
    vision_counts = [int(s["vision_mask"].sum()) if "vision_mask" in s else 0 for s in calib.samples]
    shards = plan.shard_ranges(token_counts, spec.shard_tokens)
    for k, (a, b) in enumerate(shards):
        put_tensors(store, keys.calib_shard(job, k), samples_to_tensors(a, calib.samples[a:b]))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    sizes["hidden"] = int(text.hidden_size)
    if n_vision:
        vision_config = getattr(config, "vision_config", None)
        sizes["vision_hidden"] = int(getattr(vision_config, "embed_dim", None) or vision_config.hidden_size)
    vision_tokens = int(sum(int(s["vision_mask"].sum()) for s in calib.samples if "vision_mask" in s))
    manifest = {
        "job": job,
        "spec": spec.to_dict(),
        "format": keys.STORE_FORMAT,
        "model_digest": model_digest,
        "data_digest": data_digest,
        "checkpoint_dtype": checkpoint_dtype(model_dir),
        "n_blocks": n_blocks,
        "n_vision_blocks": n_vision,
        "n_samples": len(calib.samples),
        "shards": [list(r) for r in shards],
        "shard_tokens": [sum(token_counts[a:b]) for a, b in shards],
        "shard_vision_tokens": [sum(vision_counts[a:b]) for a, b in shards],
        "shard_input_bytes": [sum(tensor_bytes(sample_tensors(s)) for s in calib.samples[a:b]) for a, b in shards],
        "partition_macs": plan.MIN_PARTITION_MACS,
        "sizes": sizes,
        "files": files,
        "layout": {"blocks": layout.blocks, "norm": layout.norm, "head": layout.head,
                   "vision_blocks": layout.vision_blocks, "model_class": layout.model_class},
        "calibration": {"samples": len(calib.samples), "tokens": calib.tokens, "vision_tokens": vision_tokens,
                        "text_tokens": calib.tokens - vision_tokens, "skipped": calib.skipped},
    }
    put_json(store, keys.manifest(job), manifest)
    return job, False


def check_grid_fits(model, layout, spec: JobSpec) -> None:
    """Refuse a group size that does not divide every quantized layer before any work is done."""
    from .models.adapter import linear_names
    from .quant.grid import check_grid_args

    lists = [layout.decoder_blocks(model)]
    if spec.quant.quantize_vision and layout.vision_blocks:
        lists.append(layout.vision_block_list(model))
    for blocks in lists:
        for n in linear_names(blocks[0]):
            cols = blocks[0].get_submodule(n).in_features
            try:
                check_grid_args(cols, spec.quant.bits, spec.quant.group_size)
            except ValueError as e:
                raise SpecError(f"{n}: {e}") from e


def read_tensors(where: dict[str, Path], mapping: dict[str, str], names: list[str]) -> dict[str, torch.Tensor]:
    """The tensors of module keys `names`, each read on its own from its checkpoint file."""
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for n in names:
        by_file.setdefault(where[mapping[n]], []).append(n)
    out = {}
    for f, ns in sorted(by_file.items()):
        with safe_open(str(f), "pt") as handle:
            for n in ns:
                # Staged in the checkpoint's dtype (a bf16 model stays bf16 in the store); tasks compute in
                # the job's dtype (JobSpec.dtype).
                out[n] = handle.get_tensor(mapping[n])
    return out


def store_format(manifest: dict) -> int:
    """The store format a manifest was staged in (1: before formats were recorded)."""
    return int(manifest.get("format", 1))


def check_format(manifest: dict) -> dict:
    """The manifest, if this version can run its job; else StagingError saying to stage it again."""
    found = store_format(manifest)
    if found != keys.STORE_FORMAT:
        job = manifest.get("job", "?")
        raise StagingError(
            f"job {job} was staged in store format {found}, and this version of tlq-farm reads format "
            f"{keys.STORE_FORMAT}: its objects cannot be reused. Stage it again: run `tlq-farm run` with the same "
            f"model, data and options (a new job id), then remove the old one with `tlq-farm prune --old-format`")
    return manifest


def load_manifest(store: Store, job: str, *, any_format: bool = False) -> dict:
    """The committed manifest of `job`, refused (check_format) when staged in another store format."""
    from .store import NotCommitted

    try:
        manifest = get_json(store, keys.manifest(job))
    except NotCommitted:
        raise StagingError(f"job {job} has no manifest in {store.url}: it was never staged there (check "
                           "--store / TLQ_STORE_URL, or list jobs with `tlq-farm jobs`)") from None
    return manifest if any_format else check_format(manifest)


def list_jobs(store: Store) -> list[str]:
    """Job ids with a committed manifest."""
    prefix = keys.jobs_prefix()
    return sorted({k[len(prefix):].split("/", 1)[0] for k in store.list_committed(prefix)
                   if k.endswith("/manifest.json")})


def describe(manifest: dict) -> str:
    s = manifest["spec"]
    q = s["quant"]
    return (f"{Path(s['model']).name} w{q['bits']} g{q['group_size']} {q['method']}/{q['importance']}, "
            f"{manifest['n_blocks']} blocks, {len(manifest['shards'])} shards")
