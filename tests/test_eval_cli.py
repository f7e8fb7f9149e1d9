"""`tlq-farm eval` on tiny models: self-agreement, fake vs compressed exports, activation fake-quant, errors."""

import json

import pytest
import torch
from click.testing import CliRunner

from coordinator.eval_cmd import eval_command
from tlq_farm.evaluate import activation_bits_to_fake, evaluate_folder, load_for_eval, recorded_source_model
from tlq_farm.models.tiny import make_tiny, tiny_image
from tlq_farm.pipeline import run_local
from tlq_farm.spec import JobSpec, QuantSpec

torch.set_num_threads(1)

PROMPTS = ["what is in the picture", "describe the image", "which color is it"]
ANSWERS = ["a red circle", "two blue squares", "green"]


def write_rows(folder, with_images: bool, n: int = 3):
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        row = {"prompt": PROMPTS[i % 3], "answer": ANSWERS[i % 3]}
        if with_images:
            (folder / "images").mkdir(exist_ok=True)
            tiny_image(50 + i, 56).save(folder / "images" / f"{i}.png")
            row["image"] = f"images/{i}.png"
        rows.append(json.dumps(row))
    path = folder / "data.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def qwen_src(tmp_path_factory):
    return make_tiny("qwen2_vl", tmp_path_factory.mktemp("eval-qwen") / "model", seed=0)


@pytest.fixture(scope="module")
def image_data(tmp_path_factory):
    return write_rows(tmp_path_factory.mktemp("eval-data"), with_images=True)


@pytest.fixture(scope="module")
def exports(qwen_src, calib_jsonl, tmp_path_factory):
    """The same quantization (W4 g32 GPTQ + tlq importance, and its W4A8 variant) exported fake and compressed."""
    root = tmp_path_factory.mktemp("eval-exports")
    out = {}
    for act_bits in (None, 8):
        for fmt in ("fake", "compressed"):
            spec = JobSpec(model=str(qwen_src), calib=str(calib_jsonl), samples=4, seq_len=512, fmt=fmt,
                           quant=QuantSpec(bits=4, group_size=32, act_bits=act_bits, importance="tlq"))
            path = root / f"{fmt}-a{act_bits}"
            run_local(spec, path, progress=False, log=lambda m: None)
            out[(fmt, act_bits)] = path
    return out


def invoke(*args):
    return CliRunner().invoke(eval_command, [str(a) for a in args])


def parsed(res) -> dict:
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


@pytest.mark.parametrize("arch,with_images", [("qwen2_vl", True), ("llava", True), ("llama", False)])
def test_model_against_itself_agrees_exactly(tmp_path, arch, with_images):
    src = make_tiny(arch, tmp_path / "model", seed=1)
    data = write_rows(tmp_path / "data", with_images)
    result = parsed(invoke(src, "--data", data, "--reference", src, "--json", "--max-new-tokens", 3))
    assert result["n"] == 3 and result["n_answer_tokens"] > 0
    assert result["top1_agreement"] == 1.0
    assert result["kl"] == pytest.approx(0.0, abs=1e-12)
    assert 0.0 <= result["accuracy"] <= 1.0 and result["nll"] > 0


def test_plain_output_and_limit(qwen_src, image_data):
    res = invoke(qwen_src, "--data", image_data, "--limit", 2, "--max-new-tokens", 2)
    assert res.exit_code == 0, res.output
    assert "accuracy:" in res.output and "(2 samples" in res.output
    assert "kl:" not in res.output  # a plain model folder records no source: no reference by default


def test_fake_and_compressed_exports_score_the_same(exports, qwen_src, image_data):
    fake = parsed(invoke(exports[("fake", None)], "--data", image_data, "--json", "--max-new-tokens", 3))
    comp = parsed(invoke(exports[("compressed", None)], "--data", image_data, "--json", "--max-new-tokens", 3))
    # The default reference of an export is the source model its spec records.
    assert fake["reference"] == comp["reference"] == str(qwen_src)
    assert fake["accuracy"] == comp["accuracy"]
    assert fake["nll"] == pytest.approx(comp["nll"], rel=1e-5)
    assert fake["kl"] == pytest.approx(comp["kl"], rel=1e-3, abs=1e-9)
    assert fake["top1_agreement"] == comp["top1_agreement"]
    assert fake["kl"] > 0  # 4-bit weights do move the distribution


def test_w4a8_fake_export_quantizes_activations_like_the_compressed_one(exports, qwen_src, image_data):
    fake_dir, comp_dir = exports[("fake", 8)], exports[("compressed", 8)]
    assert recorded_source_model(fake_dir) == str(qwen_src)
    fake = evaluate_folder(fake_dir, image_data, reference=qwen_src, max_new_tokens=3)
    comp = evaluate_folder(comp_dir, image_data, reference=qwen_src, max_new_tokens=3)
    assert fake["act_fake_quant_bits"] == 8 and comp["act_fake_quant_bits"] is None
    # compressed-tensors quantizes activations in its own forward wrappers; rounding ties may differ.
    assert fake["nll"] == pytest.approx(comp["nll"], rel=1e-4)
    assert fake["kl"] == pytest.approx(comp["kl"], rel=0.05)

    # Without the activation hooks the same weights give other logits: the hooks are what makes it W4A8.
    model, processor, summary = load_for_eval(fake_dir)
    assert activation_bits_to_fake(summary) == 8
    from tlq_farm.calib.encode import encode_example
    from tlq_farm.evaluate import model_inputs

    enc = encode_example(processor, [tiny_image(3, 56)], "what is in the picture", "a red circle")
    with torch.no_grad():
        hooked = model(**model_inputs(model, enc)).logits
        for module in model.modules():
            module._forward_pre_hooks.clear()
        plain = model(**model_inputs(model, enc)).logits
    assert not torch.equal(hooked, plain)


def test_missing_folder_is_a_clear_error(tmp_path, image_data):
    res = invoke(tmp_path / "nope", "--data", image_data)
    assert res.exit_code != 0
    assert "does not exist" in res.output and "save_pretrained" in res.output


def test_bad_jsonl_names_file_and_line(tmp_path, qwen_src):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "b"}\n{not json\n')
    res = invoke(qwen_src, "--data", bad)
    assert res.exit_code != 0 and f"{bad}:2: not valid JSON" in res.output
    bad.write_text('{"prompt": "a"}\n')
    res = invoke(qwen_src, "--data", bad)
    assert res.exit_code != 0 and ":1: a row needs" in res.output
    bad.write_text('{"prompt": "a", "answer": "b", "image": "missing.png"}\n')
    res = invoke(qwen_src, "--data", bad)
    assert res.exit_code != 0 and "missing.png not found" in res.output


def test_non_demo_model_needs_data(qwen_src):
    res = invoke(qwen_src)
    assert res.exit_code != 0 and "pass --data" in res.output


def test_prepared_scoring_equals_evaluate(exports, qwen_src, image_data):
    """The bench's shared-reference scorer computes exactly what evaluate() computes."""
    from tlq_farm.evaluate import answer_logits, prepare_eval_set, score_prepared

    export = exports[("fake", 8)]
    direct = evaluate_folder(export, image_data, reference=qwen_src, max_new_tokens=3)
    model, processor, _ = load_for_eval(export)
    ref_model, _, _ = load_for_eval(qwen_src)
    prepared = prepare_eval_set(processor, image_data)
    scored = score_prepared(model, processor, prepared, reference_logits=answer_logits(ref_model, prepared),
                            max_new_tokens=3)
    for key in ("n", "accuracy", "n_answer_tokens", "top1_agreement"):
        assert scored[key] == direct[key]
    for key in ("nll", "kl"):
        assert scored[key] == pytest.approx(direct[key], rel=1e-12, abs=1e-15)
