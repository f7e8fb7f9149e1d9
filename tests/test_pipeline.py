"""End to end: every architecture built tiny, saved, loaded from disk and quantized through `tlq-farm run`;
the export loads in transformers and reproduces the fake-quantized model."""

import json

import pytest
from conftest import first_block_inputs
import torch
from click.testing import CliRunner

from coordinator.cli import main
from tlq_farm import block as B
from tlq_farm.calib.data import load_calibration, model_inputs
from tlq_farm.models.adapter import find_layout, linear_names, load_model
from tlq_farm.models.tiny import ARCHS
from tlq_farm.quant import finalize_hessian, gptq_quantize, rtn_quantize
from tlq_farm.quant.export import loading_kwargs

# Weight-only exports decompress to exactly the solver's dequantized weights; logits may differ only by
# float32 summation order.
LOGIT_TOL = 1e-4


def run_cli(*args) -> str:
    res = CliRunner().invoke(main, ["run", *map(str, args), "--quiet"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.output


def load_export(path, is_vlm):
    import transformers

    cls = transformers.AutoModelForImageTextToText if is_vlm else transformers.AutoModelForCausalLM
    return cls.from_pretrained(path, dtype=torch.float32, **loading_kwargs(path)).eval()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method,importance", [("gptq", "tlq"), ("gptaq", "uniform")])
def test_every_architecture_end_to_end(tmp_path, tiny_models, calib_jsonl, arch, method, importance, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = tiny_models(arch)
    out_c, out_f = tmp_path / "compressed", tmp_path / "fake"
    common = [src, "--calib", calib_jsonl, "--samples", 4, "--seq-len", 512, "--group-size", 32,
              "--method", method, "--importance", importance]
    run_cli(*common, "--out", out_c)
    run_cli(*common, "--out", out_f, "--format", "fake")
    report = json.loads((out_c / "tlq_report.json").read_text())
    lay = report["layout"]
    assert report["totals"]["modules"] == 7 * 2
    assert all(k.startswith(lay["blocks"]) for k in report["modules"])
    assert all(m["loss"] >= 0 and m["tokens"] > 0 for m in report["modules"].values())
    cfg = json.loads((out_c / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "compressed-tensors"
    is_vlm = lay["vision_blocks"] is not None
    loaded = load_export(out_c, is_vlm)
    ref = load_export(out_f, is_vlm)  # dequantized weights, no quantization_config
    assert "quantization_config" not in json.loads((out_f / "config.json").read_text())
    _, proc = load_model(str(out_c))  # the processor / tokenizer files travel with the export
    sample = load_calibration(calib_jsonl, proc, samples=1, seq_len=512, seed=3).samples[0]
    with torch.no_grad():
        a = loaded(**model_inputs(sample)).logits
        b = ref(**model_inputs(sample)).logits
    torch.testing.assert_close(a, b, rtol=LOGIT_TOL, atol=LOGIT_TOL)


def test_same_spec_gives_the_same_bytes(tmp_path, tiny_models, calib_jsonl, monkeypatch):
    monkeypatch.chdir(tmp_path)
    outs = []
    for i in range(2):
        out = tmp_path / f"o{i}"
        run_cli(tiny_models("qwen2_vl"), "--calib", calib_jsonl, "--samples", 4, "--group-size", 32, "--importance", "qig",
                "--qig-steps", 4, "--out", out)
        outs.append({f.name: f.read_bytes() for f in sorted(out.glob("*.safetensors"))})
    assert outs[0] == outs[1]


def test_w8a8_and_quantized_vision(tmp_path, tiny_models, calib_jsonl, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "o"
    run_cli(tiny_models("qwen2_vl"), "--calib", calib_jsonl, "--samples", 3, "--bits", 8, "--group-size", -1,
            "--act-bits", 8, "--quantize-vision", "--out", out)
    report = json.loads((out / "tlq_report.json").read_text())
    vis = [k for k in report["modules"] if k.startswith("model.visual.blocks")]
    assert len(vis) == 2 * 4
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    groups = list(cfg["config_groups"].values())
    assert groups[0]["input_activations"]["num_bits"] == 8 and groups[0]["input_activations"]["dynamic"] is True
    assert not any("visual.blocks" in i for i in cfg.get("ignore", []))


def test_bad_group_size_fails_before_writing(tmp_path, tiny_models, calib_jsonl, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(main, ["run", str(tiny_models("llama")), "--calib", str(calib_jsonl), "--group-size", "48",
                                    "--out", str(tmp_path / "o"), "--quiet"])
    assert res.exit_code != 0 and "group size 48 does not divide" in res.output
    assert not (tmp_path / "o").exists()


def test_calib_required_with_a_model(tmp_path, tiny_models):
    res = CliRunner().invoke(main, ["run", str(tiny_models("llama"))])
    assert res.exit_code != 0 and "--calib is required" in res.output


def test_gptq_objective_not_above_rtn_on_real_activations(tiny_models, calib_jsonl):
    """On the activations a real model feeds its first block, GPTQ's weighted objective <= RTN's, per layer."""
    blocks, samples, inputs = first_block_inputs(tiny_models("qwen2_vl"), calib_jsonl, 6)
    names = linear_names(blocks[0])
    weights = [s["attention_mask"].reshape(-1).float() for s in samples]
    stats = B.accumulate_stats(blocks[0], inputs, weights, names)
    for n in names:
        W = blocks[0].get_submodule(n).weight.detach().float()
        H = finalize_hessian(stats[n])[0]
        for bits in (2, 3, 4):
            g = gptq_quantize(W, H, bits=bits, group_size=32)
            r = rtn_quantize(W, bits=bits, group_size=32, H=H)
            assert g.loss <= r.loss * (1 + 1e-6), (n, bits, g.loss, r.loss)


def test_quantized_clip_vision_tower_exports_and_loads(tmp_path, tiny_models, calib_jsonl, monkeypatch):
    """A LLaVA vision tower (CLIP encoder layers attend both ways: never packed) through the farm's tasks."""
    monkeypatch.chdir(tmp_path)
    src = tiny_models("llava")
    common = [src, "--calib", calib_jsonl, "--samples", 3, "--group-size", 32, "--quantize-vision", "--method", "gptaq"]
    run_cli(*common, "--out", tmp_path / "c")
    run_cli(*common, "--out", tmp_path / "f", "--format", "fake")
    report = json.loads((tmp_path / "c" / "tlq_report.json").read_text())
    vision = report["layout"]["vision_blocks"]
    vis = [k for k in report["modules"] if k.startswith(vision + ".")]
    assert len(vis) == 2 * 6 and all(report["modules"][k]["tokens"] > 0 for k in vis)
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())["quantization_config"]
    assert not any(vision in i for i in cfg.get("ignore", []))
    loaded, ref = load_export(tmp_path / "c", True), load_export(tmp_path / "f", True)
    _, proc = load_model(str(tmp_path / "c"))
    sample = load_calibration(calib_jsonl, proc, samples=1, seq_len=512, seed=3).samples[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(**model_inputs(sample)).logits, ref(**model_inputs(sample)).logits,
                                   rtol=LOGIT_TOL, atol=LOGIT_TOL)
