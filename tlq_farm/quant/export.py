"""Export of a quantized model: a compressed-tensors checkpoint, or a fake-quantized plain checkpoint.

Two conventions meet here. Ours (tlq_farm/quant/grid.py): unsigned codes c in [0, 2^b - 1] and
    w_hat = scale * (c - zero).
compressed-tensors': signed values q in [-2^(b-1), 2^(b-1) - 1] and
    w_hat = scale * (q - zp)        (zp absent for symmetric schemes)
so q = c - 2^(b-1) and zp = zero - 2^(b-1); for our symmetric grids zero = 2^(b-1), hence zp = 0 and it is
dropped. Both formulas are the same float32 operations on the same integers, so the checkpoint reproduces
QuantResult.weight bit for bit; export checks that by decompressing every layer with the library itself.

Formats (chosen by compressed-tensors' own inference, compressed_tensors.compressors.format):
    weight-only int2..int8       -> "pack-quantized" (values densely packed into int32 words)
    int weights + int8 activations (W4A8, W8A8) -> "int-quantized" (weights stored as int8 tensors)
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..store.tensors import data_ranges, safetensors_layout, write_tensors_file
from .grid import QuantResult, natural_g_idx

QUANT_SUMMARY_FILE = "tlq_quant.json"
FORMATS = ("compressed", "fake")
SUPPORTED_ACT_BITS = (None, 8)

# Files of a model folder that export writes itself (weights and config) and so never copies from the source.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
_NOT_COPIED = {"config.json", QUANT_SUMMARY_FILE}


@dataclass(frozen=True)
class WeightScheme:
    """The weight grid shared by a set of layers; group_size <= 0 means one group per output row."""

    bits: int
    group_size: int
    sym: bool
    act_order: bool

    @property
    def per_channel(self) -> bool:
        return self.group_size <= 0


# ----------------------------------------------------------------------------------------------------------
# Pure conversions between our grid and compressed-tensors'
# ----------------------------------------------------------------------------------------------------------


def is_natural_g_idx(g_idx: torch.Tensor, group_size: int) -> bool:
    """True when column j belongs to group j // group_size (all columns in group 0 for per-channel)."""
    return torch.equal(g_idx.to(torch.int64), natural_g_idx(g_idx.numel(), group_size).to(torch.int64))


def signed_values(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Our unsigned codes [0, 2^b - 1] -> compressed-tensors' signed int8 values [-2^(b-1), 2^(b-1) - 1]."""
    return (codes.to(torch.int32) - 2 ** (bits - 1)).to(torch.int8)


def signed_zero_point(zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Our zero point (in code units) -> compressed-tensors' zero point (in signed-value units), int8."""
    return (zero.to(torch.int32) - 2 ** (bits - 1)).to(torch.int8)


def weight_scheme_of(q: QuantResult) -> WeightScheme:
    return WeightScheme(bits=q.bits, group_size=q.group_size if q.group_size > 0 else -1, sym=q.sym,
                        act_order=q.perm is not None)


def weight_quant_args(scheme: WeightScheme):
    """compressed-tensors QuantizationArgs for a weight grid (static, int, per group or per channel)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy, QuantizationType

    kwargs = dict(num_bits=scheme.bits, type=QuantizationType.INT, symmetric=scheme.sym, dynamic=False)
    if scheme.per_channel:
        kwargs.update(strategy=QuantizationStrategy.CHANNEL)
    else:
        kwargs.update(strategy=QuantizationStrategy.GROUP, group_size=scheme.group_size)
    if scheme.act_order:
        # "weight": the columns were visited in activation order during calibration but the groups stay
        # contiguous, so no g_idx is stored and inference runs at normal speed.
        kwargs.update(actorder="weight")
    return QuantizationArgs(**kwargs)


def activation_quant_args(act_bits: int):
    """Dynamic per-token symmetric int activations (one scale per token, computed at run time)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy, QuantizationType

    return QuantizationArgs(num_bits=act_bits, type=QuantizationType.INT, symmetric=True, dynamic=True,
                            strategy=QuantizationStrategy.TOKEN)


def quantization_scheme(scheme: WeightScheme, act_bits: int | None, targets: list[str]):
    """A compressed-tensors QuantizationScheme with its storage format filled in by the library's rules."""
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import QuantizationScheme

    qscheme = QuantizationScheme(
        targets=targets,
        weights=weight_quant_args(scheme),
        input_activations=activation_quant_args(act_bits) if act_bits is not None else None,
    )
    qscheme.format = infer_module_format(nn.Linear, qscheme)
    return qscheme


def compress_linear(q: QuantResult, qscheme) -> dict[str, torch.Tensor]:
    """The compressed tensors of one Linear ("weight_packed"/"weight", "weight_scale", ...) made by the
    library's compressor for the scheme's format, checked to decompress to exactly q.weight."""
    from compressed_tensors.compressors import BaseCompressor

    compressor = BaseCompressor.get_value_from_registry(qscheme.format)
    dense = {"weight": q.weight.to(torch.float32), "weight_scale": q.scale.to(torch.float32).contiguous()}
    if not q.sym:
        dense["weight_zero_point"] = signed_zero_point(q.zero, q.bits).contiguous()
    compressed = compressor.compress(dense, qscheme)
    restored = compressor.decompress(dict(compressed), qscheme)["weight"]
    if not torch.equal(restored, q.weight.to(torch.float32)):
        worst = (restored - q.weight).abs().max().item()
        raise RuntimeError(
            f"the {qscheme.format} tensors do not reproduce the quantized weight (max error {worst:.3g}): "
            "the QuantResult's codes, scale and zero disagree with its weight; re-run the quantizer"
        )
    return {name: t.contiguous() for name, t in compressed.items()}


# ----------------------------------------------------------------------------------------------------------
# Checks on the inputs
# ----------------------------------------------------------------------------------------------------------


def check_quant_result(name: str, module: nn.Module, q: QuantResult, fmt: str) -> None:
    """Raise a ValueError saying what is wrong when q cannot be exported for `module`."""
    if not isinstance(module, nn.Linear):
        raise ValueError(f"{name} is a {type(module).__name__}, not an nn.Linear: only Linear layers can be "
                         "exported quantized; drop it from qresults")
    if tuple(q.weight.shape) != tuple(module.weight.shape):
        raise ValueError(f"{name}: quantized weight has shape {tuple(q.weight.shape)} but the layer's weight "
                         f"is {tuple(module.weight.shape)}; the QuantResult belongs to another layer or model")
    if fmt == "fake":
        return
    lo, hi = 0, 2**q.bits - 1
    if int(q.codes.min()) < lo or int(q.codes.max()) > hi:
        raise ValueError(f"{name}: codes leave [0, {hi}] for {q.bits}-bit weights; the quantizer clamps "
                         "codes, so this QuantResult was altered or mislabelled")
    if q.sym and not bool((q.zero == 2 ** (q.bits - 1)).all()):
        raise ValueError(f"{name}: a symmetric grid must have zero = {2 ** (q.bits - 1)} everywhere; "
                         "mark the QuantResult sym=False to export it with zero points")
    if not q.sym and (int(q.zero.min()) < lo or int(q.zero.max()) > hi):
        raise ValueError(f"{name}: zero points leave [0, {hi}], which compressed-tensors cannot store for "
                         f"{q.bits}-bit weights; clamp the zero points in the quantizer")
    if not is_natural_g_idx(q.g_idx, q.group_size):
        raise ValueError(
            f"{name}: g_idx is not in natural order (act-order regrouped the columns). compressed-tensors "
            "0.20 removed actorder='group' and no longer stores or applies g_idx, so this layer cannot be "
            "exported exactly. Quantize with act-order static groups (groups contiguous in the natural "
            "column order, exported as actorder='weight'), or export fmt='fake'"
        )


# ----------------------------------------------------------------------------------------------------------
# The checkpoint
# ----------------------------------------------------------------------------------------------------------


def quantized_state_dict(state: dict[str, torch.Tensor], qresults: dict[str, QuantResult], fmt: str,
                         qschemes: dict[str, object]) -> dict[str, torch.Tensor]:
    """A state dict (a whole model's or a part's) with each quantized Linear's weight replaced by its
    export form."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        module_name, _, leaf = key.rpartition(".")
        if module_name in qresults and leaf == "weight":
            q = qresults[module_name]
            if fmt == "fake":
                out[key] = q.weight.to(tensor.dtype).contiguous()
            else:
                for param, value in compress_linear(q, qschemes[module_name]).items():
                    out[f"{module_name}.{param}"] = value
        else:
            out[key] = tensor
    return out


def quantization_config(model: nn.Module, schemes: dict[str, WeightScheme], act_bits: int | None):
    """compressed-tensors QuantizationConfig: one config group per weight scheme; every other Linear ignored.

    schemes: the weight scheme of each quantized module (weight_scheme_of). Returns (config, compressed-tensors
    scheme of each quantized module)."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    by_scheme: dict[WeightScheme, list[str]] = {}
    for name in sorted(schemes):
        by_scheme.setdefault(schemes[name], []).append(name)
    # One scheme: target the class, as llm-compressor does; several: target each layer by its exact name.
    single = len(by_scheme) == 1
    groups, per_module = {}, {}
    for index, (scheme, names) in enumerate(sorted(by_scheme.items(), key=lambda kv: kv[1][0])):
        qscheme = quantization_scheme(scheme, act_bits, ["Linear"] if single else names)
        groups[f"group_{index}"] = qscheme
        per_module.update({name: qscheme for name in names})
    ignore = [name for name, module in model.named_modules()
              if isinstance(module, nn.Linear) and name not in schemes]
    formats = {qscheme.format for qscheme in groups.values()}
    config = QuantizationConfig(
        config_groups=groups,
        format=formats.pop() if len(formats) == 1 else "mixed-precision",
        quantization_status=QuantizationStatus.COMPRESSED,
        ignore=ignore,
    )
    return config, per_module


def quant_summary(schemes: dict[str, WeightScheme], act_bits: int | None, fmt: str,
                  extra_config: dict | None) -> dict:
    """The scheme summary written to tlq_quant.json (consumers read it to fake-quantize activations)."""
    by_scheme: dict[WeightScheme, list[str]] = {}
    for name in sorted(schemes):
        by_scheme.setdefault(schemes[name], []).append(name)
    schemes = [
        {"bits": s.bits, "group_size": s.group_size, "sym": s.sym, "act_order": s.act_order, "modules": names}
        for s, names in sorted(by_scheme.items(), key=lambda kv: kv[1][0])
    ]
    activations = None
    if act_bits is not None:
        activations = {"bits": act_bits, "type": "int", "strategy": "token", "symmetric": True, "dynamic": True}
    return {
        "format": fmt,
        "act_bits": act_bits,
        "input_activations": activations,
        # A fake export stores dequantized weights only: whoever runs it must quantize activations itself.
        "activations_fake_quantized_by_consumer": fmt == "fake" and act_bits is not None,
        "weight_schemes": schemes,
        "extra": dict(extra_config or {}),
    }


def copy_side_files(source_dir: Path, dest: Path) -> list[str]:
    """Copy the tokenizer, processor, chat template and generation files (every top-level file that is not
    weights or config.json) from source_dir into dest. Returns the names copied."""
    copied = []
    for path in sorted(Path(source_dir).iterdir()):
        if not path.is_file() or path.name in _NOT_COPIED or path.name.startswith("."):
            continue
        if path.name.endswith(_WEIGHT_SUFFIXES) or path.name.endswith(".index.json"):
            continue
        shutil.copyfile(path, dest / path.name)
        copied.append(path.name)
    return copied


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a folder; choose another output path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} is not empty; choose an empty or new folder, or pass overwrite=True "
                              "to replace its contents")


def _usual_modes(folder: Path) -> None:
    """Give folder and everything in it the modes a plain open / mkdir would (0666 / 0777 & ~umask):
    writers that go through a private temporary file (0600) would leave the export unreadable to others."""
    from ..store.base import current_umask

    mask = current_umask()
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _publish(tmp_dir: Path, out_dir: Path) -> None:
    """Move the finished tmp_dir to out_dir; an existing out_dir is moved aside first and deleted after."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(out_dir, old)
    try:
        os.replace(tmp_dir, out_dir)
    except BaseException:
        if old is not None:
            os.replace(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def loading_kwargs(export_dir: str | Path) -> dict:
    """Extra from_pretrained keyword arguments an export needs to load in transformers.

    transformers 5 with compressed-tensors 0.20 builds the layers of a pack-quantized checkpoint on the meta
    device, where the library leaves the asymmetric zero point unpacked ([out, groups]) while the checkpoint
    holds it packed along the rows, as vLLM expects ([out * bits / 32, groups]); the default load then fails
    with a size mismatch. Dequantizing at load time reads the checkpoint tensors as they are. It is only
    chosen for weight-only checkpoints: a dequantized load also skips compressed-tensors' forward wrappers,
    so it would silently drop the int8 activation quantization of W4A8 / W8A8 exports.
    """
    config = json.loads((Path(export_dir) / "config.json").read_text())
    qconfig = config.get("quantization_config")
    if not qconfig:
        return {}
    asym_packed = any(
        (group.get("format") or qconfig.get("format")) == "pack-quantized"
        and not (group.get("weights") or {}).get("symmetric", True)
        for group in qconfig.get("config_groups", {}).values()
    )
    if not asym_packed:
        return {}
    from transformers import CompressedTensorsConfig

    return {"quantization_config": CompressedTensorsConfig(dequantize=True)}


# ----------------------------------------------------------------------------------------------------------
# Writing: one part of the model in memory at a time
# ----------------------------------------------------------------------------------------------------------

# Shards of a streamed checkpoint; a smaller model is one model.safetensors, as save_pretrained writes it.
MAX_SHARD_BYTES = 5 * 2**30
COPY_CHUNK = 64 * 2**20  # what write_safetensors holds of a tensor at a time


@dataclass(frozen=True)
class TensorEntry:
    """Where a tensor of the checkpoint waits until its shard is written: its spill file and name there."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    name: str

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors on the CPU, contiguous, with a copy of each one that shares memory with an earlier one
    (tied weights): safetensors refuses aliases."""
    out, seen = {}, set()
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        place = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        out[name] = t.clone() if t.numel() and place in seen else t
        seen.add(place)
    return out


def write_safetensors(path: Path, entries: dict[str, TensorEntry], metadata: dict[str, str] | None) -> None:
    """Write a safetensors file tensor by tensor, each one's bytes copied from its spill file when its turn
    comes, COPY_CHUNK bytes at a time: the data is never a tensor here, and no spill file stays mapped (its
    pages would count in the process's memory until it was closed)."""
    header, order = safetensors_layout(entries, metadata)
    ranges: dict[Path, dict[str, tuple[int, int]]] = {}
    with open(path, "wb") as f:
        f.write(header)
        for name in order:
            e = entries[name]
            if e.file not in ranges:
                ranges[e.file] = data_ranges(e.file)
            start, end = ranges[e.file][e.name]
            if end - start != e.nbytes:
                raise RuntimeError(f"spill file {e.file} holds {end - start} bytes for {e.name}, not {e.nbytes}")
            with open(e.file, "rb") as src:
                src.seek(start)
                left = end - start
                while left:
                    chunk = src.read(min(COPY_CHUNK, left))
                    if not chunk:
                        raise RuntimeError(f"spill file {e.file} ends inside {e.name}")
                    f.write(chunk)
                    left -= len(chunk)


def shard_plan(names: list[str], entries: dict[str, TensorEntry], max_shard_bytes: int) -> dict[str, list[str]]:
    """file name -> tensor names: one model.safetensors when everything fits one shard, else consecutive
    tensors packed greedily into model-0000k-of-0000n.safetensors (a tensor larger than a shard gets its own)."""
    shards: list[list[str]] = [[]]
    used = 0
    for n in names:
        size = entries[n].nbytes
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(n)
        used += size
    if len(shards) == 1:
        return {"model.safetensors": shards[0]}
    total = len(shards)
    return {f"model-{i + 1:05d}-of-{total:05d}.safetensors": s for i, s in enumerate(shards)}


def _saved_names(model: nn.Module, entries: dict[str, TensorEntry]) -> dict[str, str]:
    """Checkpoint name -> state-dict name, as save_pretrained would save them: tied duplicates and keys to
    ignore dropped, the model class's renames reverted (transformers' own functions, on meta tensors)."""
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    shadow = {n: torch.empty(e.shape, dtype=e.dtype, device="meta") for n, e in entries.items()}
    for ignore in getattr(model, "_keys_to_ignore_on_save", None) or []:
        shadow.pop(ignore, None)
    # Tied weights are found by parameter identity in the model; compressed names are no parameters.
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)} | {n for n, _ in model.named_buffers()}
    plain = {n: t for n, t in shadow.items() if n in params}
    kept = remove_tied_weights_from_state_dict(dict(plain), model)
    shadow = {n: t for n, t in shadow.items() if n not in plain or n in kept}
    names = {id(t): n for n, t in shadow.items()}
    reverted = revert_weight_conversion(model, dict(shadow))
    if len(reverted) != len(shadow) or any(id(t) not in names for t in reverted.values()):
        raise RuntimeError(f"{type(model).__name__} changes tensors (not only their names) when it is saved: its "
                           "checkpoint cannot be written one part at a time; export it in memory")
    return {saved: names[id(t)] for saved, t in reverted.items()}


def export_parts(model: nn.Module, source_dir: str | Path, out_dir: str | Path, parts, *,
                 act_bits: int | None = None, fmt: str = "compressed", extra_config: dict | None = None,
                 overwrite: bool = False, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write a quantized checkpoint to out_dir from its parts, one in memory at a time; return out_dir.

    model:   the model's module tree (the meta device is enough): names, shapes, config, tied weights
    parts:   an iterable of (state, qresults): consecutive pieces of the model's float state dict (prefix,
             each block, head) with the QuantResults of the linears in them, keyed by module name
    The checkpoint is the bytes save_pretrained writes for the whole quantized state dict where it fits one
    shard (max_shard_bytes); a larger one is sharded with its model.safetensors.index.json. Each part is
    converted, checked and spilled to a temporary file beside out_dir, then the shards are written tensor by
    tensor. out_dir never holds a half-written checkpoint (see export_checkpoint).
    """
    import copy
    import tempfile

    if fmt not in FORMATS:
        raise ValueError(f"fmt={fmt!r} is not an export format; choose one of {', '.join(FORMATS)}")
    if act_bits not in SUPPORTED_ACT_BITS:
        raise ValueError(f"act_bits={act_bits!r} is not supported; choose None (weight-only) or 8")
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    if not source_dir.is_dir():
        raise FileNotFoundError(f"source folder {source_dir} does not exist; pass the folder the model was "
                                "loaded from")
    _check_out_dir(out_dir, overwrite)
    modules = dict(model.named_modules())
    schemes: dict[str, WeightScheme] = {}
    # A module's compressed form depends on its own scheme only; the config groups are built at the end.
    by_scheme: dict[WeightScheme, object] = {}

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp_dir.mkdir()
    try:
        with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.spill-", dir=out_dir.parent) as spill:
            entries: dict[str, TensorEntry] = {}

            def spill_part(i: int, state: dict, qresults: dict) -> None:
                # A function of its own, so that nothing of one part outlives it into the next.
                qschemes = {}
                for name, q in qresults.items():
                    if name not in modules:
                        raise KeyError(f"qresults names modules the model does not have: {[name]}; keys must be "
                                       "names from model.named_modules()")
                    check_quant_result(name, modules[name], q, fmt)
                    scheme = schemes[name] = weight_scheme_of(q)
                    if fmt == "compressed":
                        if scheme not in by_scheme:
                            by_scheme[scheme] = quantization_scheme(scheme, act_bits, ["Linear"])
                        qschemes[name] = by_scheme[scheme]
                out = quantized_state_dict(state, qresults, fmt, qschemes)
                if out:
                    path = Path(spill) / f"part-{i:05d}.safetensors"
                    write_tensors_file(path, _unshared(out), None)
                    for n, t in out.items():
                        entries[n] = TensorEntry(t.dtype, tuple(t.shape), path, n)

            for i, part in enumerate(parts):
                spill_part(i, *part)
                del part
            if not schemes:
                raise ValueError("qresults is empty: nothing was quantized, so there is nothing to export")
            saved = _saved_names(model, entries)
            layout = shard_plan(list(saved), {s: entries[n] for s, n in saved.items()}, max_shard_bytes)
            # save_pretrained owns config.json and generation_config.json (dtype, architectures): it writes
            # them from the module tree; no tensor is needed for that.
            meta = copy.deepcopy(model) if any(p.is_meta for p in model.parameters()) else model
            had_qconfig = hasattr(meta.config, "quantization_config")
            saved_qconfig = getattr(meta.config, "quantization_config", None)
            if had_qconfig:
                del meta.config.quantization_config
            from transformers.utils import logging as hf_logging

            bar = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()  # its bar over zero shards is noise on the run's terminal
            try:
                meta.save_pretrained(tmp_dir, state_dict={})
            finally:
                if bar:
                    hf_logging.enable_progress_bar()
                if had_qconfig:
                    meta.config.quantization_config = saved_qconfig
            for file, names in layout.items():
                write_safetensors(tmp_dir / file, {s: entries[saved[s]] for s in names}, {"format": "pt"})
            if len(layout) > 1:
                total = sum(entries[n].nbytes for n in saved.values())
                index = {"metadata": {"total_parameters": sum(p.numel() for p in model.parameters()),
                                      "total_size": total},
                         "weight_map": {s: f for f, names in layout.items() for s in names}}
                (tmp_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        copy_side_files(source_dir, tmp_dir)
        if fmt == "compressed":
            from compressed_tensors.compressors import ModelCompressor

            qconfig, _ = quantization_config(model, schemes, act_bits)
            ModelCompressor(quantization_config=qconfig).update_config(str(tmp_dir))
        summary = quant_summary(schemes, act_bits, fmt, extra_config)
        (tmp_dir / QUANT_SUMMARY_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        _usual_modes(tmp_dir)
        _publish(tmp_dir, out_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return out_dir


def export_checkpoint(model: nn.Module, source_dir: str | Path, out_dir: str | Path,
                      qresults: dict[str, QuantResult], *, act_bits: int | None = None, fmt: str = "compressed",
                      extra_config: dict | None = None, overwrite: bool = False) -> Path:
    """Write the quantized `model` to out_dir and return out_dir.

    model:        the float model the QuantResults were computed for (left unchanged)
    source_dir:   its folder; tokenizer / processor / chat template / generation files are copied from it
    qresults:     QuantResult per quantized nn.Linear, keyed by its name in model.named_modules()
    act_bits:     None (weight-only) or 8 (dynamic per-token symmetric int8 input activations)
    fmt:          "compressed": compressed-tensors checkpoint (quantization_config in config.json) that
                  transformers and vLLM load; "fake": plain checkpoint of the dequantized weights
    extra_config: stored under "extra" in tlq_quant.json
    overwrite:    replace a non-empty out_dir (otherwise refused)

    The export is written into a hidden folder beside out_dir and renamed at the end, so out_dir never
    holds a half-written checkpoint. The whole model is one part of export_parts.
    """
    modules = dict(model.named_modules())
    missing = sorted(set(qresults) - set(modules))
    if missing:
        raise KeyError(f"qresults names modules the model does not have: {missing[:3]}; keys must be names "
                       "from model.named_modules()")
    for name, q in qresults.items():
        check_quant_result(name, modules[name], q, fmt)
    if not qresults:
        raise ValueError("qresults is empty: nothing was quantized, so there is nothing to export")
    return export_parts(model, source_dir, out_dir, [(model.state_dict(), qresults)], act_bits=act_bits, fmt=fmt,
                        extra_config=extra_config, overwrite=overwrite)
