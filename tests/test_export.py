"""Export: compressed-tensors checkpoints load in transformers and reproduce the fake-quantized model.

Tolerances. Weight-only exports decompress to exactly QuantResult.weight (asserted with torch.equal), so their
logits match the in-memory reference bit for bit; the logit check allows 1e-5 relative error (float32) so it
does not depend on matmul kernels picking the same summation order. The activation-quantized exports (W8A8,
W4A8) are compared with a reference that fake-quantizes every quantized Linear input per token, with the
same 1e-5 relative tolerance.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen2Config

from tlq_farm.quant.export import export_checkpoint, is_natural_g_idx, loading_kwargs, signed_values
from tlq_farm.quant.grid import QuantResult, dequantize_grouped, natural_g_idx
from tlq_farm.quant.rtn import rtn_quantize

torch.set_num_threads(1)

LOGIT_RTOL = 1e-5
VOCAB = 160


def tiny_text_config(kind: str):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if kind == "llama":
        return LlamaConfig(**common, tie_word_embeddings=False)
    return Qwen2Config(**common, tie_word_embeddings=True)


def save_source(folder: Path, kind: str) -> Path:
    """A tiny random text model with a tokenizer, saved as a model folder."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_text_config(kind), dtype=torch.float32)
    model.save_pretrained(folder)
    try:
        from tlq_farm.models.tiny import build_tokenizer

        build_tokenizer(arch="llama" if kind == "llama" else "qwen2").save_pretrained(folder)
    except ImportError:
        pass
    return folder


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    return {kind: save_source(root / kind, kind) for kind in ("llama", "qwen2")}


def load_float(folder: Path) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in name}


def rtn_all(model: nn.Module, bits: int, group_size: int, sym: bool) -> dict[str, QuantResult]:
    return {name: rtn_quantize(m.weight.data, bits=bits, group_size=group_size, sym=sym)
            for name, m in decoder_linears(model).items()}


def fake_quant_reference(folder: Path, qresults: dict[str, QuantResult]) -> nn.Module:
    model = load_float(folder)
    for name, q in qresults.items():
        model.get_submodule(name).weight.data.copy_(q.weight)
    return model


def per_token_int8(x: torch.Tensor) -> torch.Tensor:
    """Symmetric per-token int8 fake quant as compressed-tensors computes it for dynamic token activations:
    scale = max|x| / 127.5 over the hidden dimension (the signed range [-128, 127] spans 255 steps), values
    rounded half-to-even and clamped to [-128, 127]."""
    amax = torch.maximum(x.amin(dim=-1, keepdim=True).abs(), x.amax(dim=-1, keepdim=True).abs())
    scale = amax / 127.5
    scale = torch.where(scale == 0, torch.full_like(scale, torch.finfo(x.dtype).eps), scale)
    return torch.clamp(torch.round(x / scale), -128, 127) * scale


def add_input_fake_quant(model: nn.Module, names) -> None:
    for name in names:
        model.get_submodule(name).register_forward_pre_hook(lambda _m, args: (per_token_int8(args[0]),))


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def input_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


def act_order_result(W: torch.Tensor, perm: torch.Tensor, bits: int, group_size: int) -> QuantResult:
    """A QuantResult whose groups are taken in the column order `perm` (as act-order with g_idx does): group
    k holds columns perm[k*gs:(k+1)*gs], so g_idx is not natural."""
    q = rtn_quantize(W[:, perm], bits=bits, group_size=group_size, sym=True)
    codes = torch.empty_like(q.codes)
    codes[:, perm] = q.codes
    g_idx = torch.empty_like(q.g_idx)
    g_idx[perm] = natural_g_idx(W.shape[1], group_size)
    weight = dequantize_grouped(codes, q.scale, q.zero, g_idx)
    return QuantResult(weight=weight, codes=codes, scale=q.scale, zero=q.zero, g_idx=g_idx, loss=0.0,
                       bits=bits, group_size=group_size, sym=True, perm=perm)


# ----------------------------------------------------------------------------------------------------------


def test_signed_values_match_our_grid():
    codes = torch.tensor([[0, 7, 8, 15]], dtype=torch.int32)
    assert signed_values(codes, 4).tolist() == [[-8, -1, 0, 7]]
    assert is_natural_g_idx(natural_g_idx(64, 32), 32)
    assert not is_natural_g_idx(natural_g_idx(64, 32).flip(0), 32)


@pytest.mark.parametrize(
    "kind,bits,group_size,sym",
    [("qwen2", 4, 32, True), ("llama", 4, -1, False), ("llama", 8, -1, True), ("llama", 3, 32, False)],
)
def test_weight_only_compressed_reproduces_fake_quant(sources, tmp_path, kind, bits, group_size, sym):
    model = load_float(sources[kind])
    qresults = rtn_all(model, bits, group_size, sym)
    out = export_checkpoint(model, sources[kind], tmp_path / "out", qresults)

    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qconfig["format"] == "pack-quantized"
    weights = qconfig["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["symmetric"]) == (bits, sym)
    assert weights["strategy"] == ("channel" if group_size <= 0 else "group")
    assert qconfig["ignore"] == ["lm_head"]

    loaded = AutoModelForCausalLM.from_pretrained(out, **loading_kwargs(out)).eval()
    ids = input_ids()
    assert rel_err(logits(loaded, ids), logits(fake_quant_reference(sources[kind], qresults), ids)) <= LOGIT_RTOL
    # The first forward pass decompresses the layers; the weights are then exactly ours.
    for name, q in qresults.items():
        assert torch.equal(loaded.get_submodule(name).weight.data, q.weight), name


@pytest.mark.parametrize("bits,group_size,sym", [(8, -1, True), (4, 32, True), (4, 32, False)])
def test_activation_quantized_compressed_applies_int8_tokens(sources, tmp_path, bits, group_size, sym):
    model = load_float(sources["llama"])
    qresults = rtn_all(model, bits, group_size, sym)
    out = export_checkpoint(model, sources["llama"], tmp_path / "out", qresults, act_bits=8)

    group = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert group["format"] == "int-quantized"
    acts = group["input_activations"]
    assert (acts["num_bits"], acts["strategy"], acts["dynamic"], acts["symmetric"]) == (8, "token", True, True)

    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    reference = fake_quant_reference(sources["llama"], qresults)
    ids = input_ids()
    weight_only = logits(reference, ids)
    add_input_fake_quant(reference, qresults)
    got, want = logits(loaded, ids), logits(reference, ids)
    assert rel_err(got, want) <= LOGIT_RTOL
    # The loaded model really quantizes its activations: it is far from the weight-only reference.
    assert rel_err(got, weight_only) > 100 * LOGIT_RTOL


def test_act_order_groups(sources, tmp_path):
    model = load_float(sources["llama"])
    qresults = rtn_all(model, 4, 32, sym=True)
    name = "model.layers.0.mlp.down_proj"
    W = model.get_submodule(name).weight.data
    perm = torch.randperm(W.shape[1], generator=torch.Generator().manual_seed(2))
    regrouped = dict(qresults, **{name: act_order_result(W, perm, 4, 32)})
    assert not is_natural_g_idx(regrouped[name].g_idx, 32)

    # compressed-tensors 0.20 no longer stores g_idx (actorder="group" was removed): refused, clearly.
    with pytest.raises(ValueError, match="g_idx is not in natural order.*fmt='fake'"):
        export_checkpoint(model, sources["llama"], tmp_path / "c", regrouped)
    assert not (tmp_path / "c").exists()

    # The fake export carries any grouping.
    fake = export_checkpoint(model, sources["llama"], tmp_path / "f", regrouped, fmt="fake")
    ids = input_ids()
    assert torch.equal(logits(load_float(fake), ids), logits(fake_quant_reference(sources["llama"], regrouped), ids))

    # Act-order with static (natural) groups exports, marked actorder="weight", and is exact.
    static = dict(qresults)
    static[name] = QuantResult(**{**qresults[name].__dict__, "perm": perm})
    out = export_checkpoint(model, sources["llama"], tmp_path / "s", static)
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    by_actorder = {g["weights"].get("actorder"): g["targets"] for g in qconfig["config_groups"].values()}
    assert by_actorder["weight"] == [name] and name not in by_actorder[None]
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert rel_err(logits(loaded, ids), logits(fake_quant_reference(sources["llama"], static), ids)) <= LOGIT_RTOL


def test_fake_export_is_plain_and_exact(sources, tmp_path):
    model = load_float(sources["qwen2"])
    qresults = rtn_all(model, 4, 32, sym=False)
    out = export_checkpoint(model, sources["qwen2"], tmp_path / "out", qresults, fmt="fake", act_bits=8,
                            extra_config={"importance": "tlq"})
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    summary = json.loads((out / "tlq_quant.json").read_text())
    assert summary["format"] == "fake" and summary["act_bits"] == 8
    assert summary["activations_fake_quantized_by_consumer"] is True
    assert summary["weight_schemes"][0]["bits"] == 4 and summary["weight_schemes"][0]["sym"] is False
    assert sorted(summary["weight_schemes"][0]["modules"]) == sorted(qresults)
    assert summary["extra"] == {"importance": "tlq"}
    ids = input_ids()
    assert torch.equal(logits(load_float(out), ids), logits(fake_quant_reference(sources["qwen2"], qresults), ids))
    # The in-memory model is left as it was.
    assert torch.equal(logits(model, ids), logits(load_float(sources["qwen2"]), ids))


def test_tokenizer_files_are_copied(sources, tmp_path):
    pytest.importorskip("tlq_farm.models.tiny")
    model = load_float(sources["llama"])
    out = export_checkpoint(model, sources["llama"], tmp_path / "out", rtn_all(model, 4, 32, True))
    text = "what is in the image"
    assert AutoTokenizer.from_pretrained(out)(text).input_ids == AutoTokenizer.from_pretrained(sources["llama"])(text).input_ids


def safetensors_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def test_export_is_deterministic_atomic_and_refuses_to_overwrite(sources, tmp_path):
    model = load_float(sources["llama"])
    qresults = rtn_all(model, 4, -1, sym=False)
    first = export_checkpoint(model, sources["llama"], tmp_path / "a", qresults)
    second = export_checkpoint(model, sources["llama"], tmp_path / "b", qresults)
    assert safetensors_bytes(first) and safetensors_bytes(first) == safetensors_bytes(second)

    with pytest.raises(FileExistsError, match="not empty.*overwrite=True"):
        export_checkpoint(model, sources["llama"], first, qresults, fmt="fake")
    again = export_checkpoint(model, sources["llama"], first, qresults, fmt="fake", overwrite=True)
    assert "quantization_config" not in json.loads((again / "config.json").read_text())

    # A failed export leaves neither the output folder nor its temp folder behind.
    bad = dict(qresults)
    bad["model.layers.0.mlp.up_proj"] = qresults["model.layers.0.mlp.down_proj"]
    with pytest.raises(ValueError, match="shape"):
        export_checkpoint(model, sources["llama"], tmp_path / "c", bad)
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]


def test_input_errors_say_what_to_do(sources, tmp_path):
    model = load_float(sources["llama"])
    qresults = rtn_all(model, 4, 32, sym=True)
    with pytest.raises(ValueError, match="act_bits=4 is not supported"):
        export_checkpoint(model, sources["llama"], tmp_path / "o", qresults, act_bits=4)
    with pytest.raises(ValueError, match="choose one of compressed, fake"):
        export_checkpoint(model, sources["llama"], tmp_path / "o", qresults, fmt="gguf")
    with pytest.raises(KeyError, match="named_modules"):
        export_checkpoint(model, sources["llama"], tmp_path / "o", {"model.nope": qresults["model.layers.0.mlp.up_proj"]})
    with pytest.raises(ValueError, match="not an nn.Linear"):
        export_checkpoint(model, sources["llama"], tmp_path / "o", {"model.embed_tokens": qresults["model.layers.0.mlp.up_proj"]})
    name = "model.layers.0.self_attn.q_proj"
    mislabelled = dict(qresults, **{name: QuantResult(**{**qresults[name].__dict__, "zero": qresults[name].zero - 1})})
    with pytest.raises(ValueError, match="symmetric grid must have zero = 8"):
        export_checkpoint(model, sources["llama"], tmp_path / "o", mislabelled)


def test_vlm_compressed_export_with_processor(tmp_path):
    tiny = pytest.importorskip("tlq_farm.models.tiny")
    from transformers import AutoModelForImageTextToText, AutoProcessor

    source = tiny.make_tiny("qwen2_vl", tmp_path / "src")
    model = AutoModelForImageTextToText.from_pretrained(source, dtype=torch.float32).eval()
    qresults = {name: rtn_quantize(m.weight.data, bits=4, group_size=-1, sym=True)
                for name, m in model.named_modules()
                if isinstance(m, nn.Linear) and name.startswith("model.language_model.layers.")}
    out = export_checkpoint(model, source, tmp_path / "out", qresults, act_bits=8)

    # Only the decoder is quantized: the vision tower's Linears and lm_head are ignored.
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    vision = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("model.visual.")]
    assert vision and set(vision) <= set(ignore) and "lm_head" in ignore
    assert not set(qresults) & set(ignore)

    processor = AutoProcessor.from_pretrained(out)
    assert processor.tokenizer.get_vocab() == AutoProcessor.from_pretrained(source).tokenizer.get_vocab()
    sample = tiny.example_inputs(out, n=1)[0]

    reference = AutoModelForImageTextToText.from_pretrained(source, dtype=torch.float32).eval()
    for name, q in qresults.items():
        reference.get_submodule(name).weight.data.copy_(q.weight)
    add_input_fake_quant(reference, qresults)
    loaded = AutoModelForImageTextToText.from_pretrained(out).eval()
    with torch.no_grad():
        got, want = loaded(**sample).logits, reference(**sample).logits
    assert rel_err(got, want) <= LOGIT_RTOL


# ----------------------------------------------------------------------------------------------------------
# Streamed writing: parts, shards, the file format


@pytest.mark.parametrize("chunk", [5, 64 * 2**20])  # 5 bytes: every tensor copied in many reads
def test_streamed_safetensors_are_the_librarys_bytes(tmp_path, monkeypatch, chunk):
    """Our writer lays out a file exactly as safetensors does: every dtype, scalars, empty tensors, names
    that sort differently from their insertion order."""
    from safetensors.torch import save, save_file

    from tlq_farm.quant import export
    from tlq_farm.quant.export import TensorEntry, write_safetensors

    monkeypatch.setattr(export, "COPY_CHUNK", chunk)

    g = torch.Generator().manual_seed(0)
    tensors = {"z.w": torch.randn(3, 5, generator=g), "a.bias": torch.randn(7, generator=g).to(torch.bfloat16),
               "m.codes": torch.randint(0, 9, (4, 4), generator=g, dtype=torch.int32), "b.half": torch.randn(2, 2).half(),
               "c.flag": torch.tensor([True, False]), "d.shape": torch.tensor([64, 32]), "e.empty": torch.zeros(0, 3),
               "f.scalar": torch.tensor(1.5, dtype=torch.float64), "g.u8": torch.arange(5, dtype=torch.uint8),
               "h.i8": torch.arange(-3, 3, dtype=torch.int8), "i.i16": torch.arange(4, dtype=torch.int16)}
    spill = tmp_path / "spill.safetensors"
    save_file(tensors, str(spill))
    entries = {n: TensorEntry(t.dtype, tuple(t.shape), spill, n) for n, t in tensors.items()}
    write_safetensors(tmp_path / "ours.safetensors", entries, {"format": "pt"})
    assert (tmp_path / "ours.safetensors").read_bytes() == save(tensors, metadata={"format": "pt"})


@pytest.mark.parametrize("kind", ["llama", "qwen2"])  # qwen2: tied embeddings
def test_an_export_from_parts_is_the_bytes_save_pretrained_writes(sources, tmp_path, kind):
    from tlq_farm.quant.export import export_parts, quantization_config, quantized_state_dict, weight_scheme_of

    model = load_float(sources[kind])
    qresults = rtn_all(model, 4, 32, sym=False)
    state = model.state_dict()
    parts = [({k: v for k, v in state.items() if ".layers." not in k}, {})] + [
        ({k: v for k, v in state.items() if f".layers.{b}." in k},
         {n: q for n, q in qresults.items() if f".layers.{b}." in n}) for b in range(2)]
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    export_parts(meta, sources[kind], tmp_path / "parts", iter(parts))
    _, qschemes = quantization_config(model, {n: weight_scheme_of(q) for n, q in qresults.items()}, None)
    model.save_pretrained(tmp_path / "reference", state_dict=quantized_state_dict(state, qresults, "compressed", qschemes))
    ours, ref = safetensors_bytes(tmp_path / "parts"), safetensors_bytes(tmp_path / "reference")
    assert list(ours) == ["model.safetensors"] and ours == ref


def test_a_large_export_is_sharded_with_an_index_and_loads_the_same(sources, tmp_path):
    from tlq_farm.quant.export import export_parts

    model = load_float(sources["llama"])
    qresults = rtn_all(model, 4, 32, sym=True)
    one = export_checkpoint(model, sources["llama"], tmp_path / "one", qresults)
    limit = 40_000
    sharded = export_parts(model, sources["llama"], tmp_path / "sharded", [(model.state_dict(), qresults)],
                           max_shard_bytes=limit)
    files = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    from safetensors import safe_open

    held = {}
    for f in files:
        with safe_open(str(sharded / f), "pt") as h:
            names = list(h.keys())
            size = sum(h.get_tensor(n).numel() * h.get_tensor(n).element_size() for n in names)
            assert size <= limit or len(names) == 1, (f, size)
            held.update({n: f for n in names})
    assert index["weight_map"] == held
    with safe_open(str(one / "model.safetensors"), "pt") as h:
        assert set(h.keys()) == set(held)
    single = (one / "model.safetensors").read_bytes()
    assert index["metadata"]["total_size"] == len(single) - 8 - int.from_bytes(single[:8], "little")
    ids = input_ids()
    a = AutoModelForCausalLM.from_pretrained(one, dtype=torch.float32, **loading_kwargs(one)).eval()
    b = AutoModelForCausalLM.from_pretrained(sharded, dtype=torch.float32, **loading_kwargs(sharded)).eval()
    assert torch.equal(logits(a, ids), logits(b, ids))
