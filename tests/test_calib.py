"""Calibration data: JSONL and saved datasets through the model's processor; bad data errors or is counted."""

import json

import pytest
import torch

from tlq_farm.calib.data import CalibError, load_calibration, load_rows
from tlq_farm.models.adapter import load_model
from tlq_farm.models.tiny import tiny_image


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_missing_and_unreadable_images_are_skipped_and_counted(tmp_path, tiny_models):
    tiny_image(0, 56).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    path = write_jsonl(tmp_path / "c.jsonl", [
        {"image": "ok.png", "prompt": "what is in the picture", "answer": "a red circle"},
        {"image": "gone.png", "prompt": "what is in the picture", "answer": "a red circle"},
        {"image": "bad.png", "prompt": "what is in the picture", "answer": "a red circle"},
    ])
    _, proc = load_model(str(tiny_models("qwen2_vl")))
    cs = load_calibration(path, proc, samples=10, seq_len=512, seed=0)
    assert len(cs.samples) == 1
    assert cs.skipped == {"missing image": 1, "unreadable image": 1}


def test_malformed_line_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "a", "answer": "b"}, "{not json"])
    with pytest.raises(CalibError, match=r"c\.jsonl:2: not valid JSON"):
        load_rows(path)


def test_row_without_prompt_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"answer": "b"}])
    with pytest.raises(CalibError, match='needs a "prompt"'):
        load_rows(path)


def test_empty_set_after_skips_is_an_error(tmp_path, tiny_models):
    path = write_jsonl(tmp_path / "c.jsonl", [{"image": "gone.png", "prompt": "a", "answer": "b"}])
    _, proc = load_model(str(tiny_models("qwen2_vl")))
    with pytest.raises(CalibError, match="empty after loading .*1 missing image"):
        load_calibration(path, proc, samples=4, seq_len=512, seed=0)


def test_samples_longer_than_seq_len_are_skipped(tmp_path, tiny_models):
    tiny_image(0, 56).save(tmp_path / "a.png")
    long_prompt = " ".join(["what is in the picture"] * 30)
    path = write_jsonl(tmp_path / "c.jsonl", [
        {"image": "a.png", "prompt": "what", "answer": "red"},
        {"image": "a.png", "prompt": long_prompt, "answer": "red"},
    ])
    _, proc = load_model(str(tiny_models("qwen2_vl")))
    cs = load_calibration(path, proc, samples=4, seq_len=48, seed=0)
    assert len(cs.samples) == 1 and cs.skipped == {"longer than --seq-len": 1}
    assert cs.samples[0]["input_ids"].shape[1] <= 48


def test_labels_only_on_answer_tokens_and_vision_mask(calib_jsonl, tiny_models):
    _, proc = load_model(str(tiny_models("qwen2_vl")))
    cs = load_calibration(calib_jsonl, proc, samples=3, seq_len=512, seed=0)
    tok = proc.tokenizer
    for s in cs.samples:
        lab = s["labels"][0]
        ids = s["input_ids"][0]
        answer_ids = ids[lab != -100]
        text = tok.decode(answer_ids, skip_special_tokens=True).strip()
        assert text in {"a red circle", "two blue squares", "green", "three"}
        assert int(s["vision_mask"].sum()) == int((ids == proc.image_token_id).sum()) > 0


def test_seed_selects_and_orders_samples(calib_jsonl, tiny_models):
    _, proc = load_model(str(tiny_models("qwen2_vl")))
    a = load_calibration(calib_jsonl, proc, samples=4, seq_len=512, seed=1)
    b = load_calibration(calib_jsonl, proc, samples=4, seq_len=512, seed=1)
    c = load_calibration(calib_jsonl, proc, samples=4, seq_len=512, seed=2)
    assert a.sources == b.sources and a.sources != c.sources
    for x, y in zip(a.samples, b.samples):
        assert torch.equal(x["input_ids"], y["input_ids"])


def test_saved_dataset_folder(tmp_path, tiny_models):
    datasets = pytest.importorskip("datasets")
    imgs = [tiny_image(i, 56) for i in range(3)]
    ds = datasets.Dataset.from_dict({"image": imgs, "prompt": ["what is in the picture"] * 3, "answer": ["green"] * 3},
                                    features=datasets.Features({"image": datasets.Image(), "prompt": datasets.Value("string"),
                                                                "answer": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "ds"))
    _, proc = load_model(str(tiny_models("qwen2_vl")))
    cs = load_calibration(tmp_path / "ds", proc, samples=3, seq_len=512, seed=0)
    assert len(cs.samples) == 3 and all(int(s["vision_mask"].sum()) > 0 for s in cs.samples)


def test_text_only_model_drops_images_and_counts_them(calib_jsonl, tiny_models):
    _, tok = load_model(str(tiny_models("llama")))
    cs = load_calibration(calib_jsonl, tok, samples=2, seq_len=512, seed=0)
    assert len(cs.samples) == 2
    assert cs.skipped == {"images dropped (text-only model)": 2}


def test_missing_path_is_an_error(tmp_path):
    with pytest.raises(CalibError, match="not found"):
        load_rows(tmp_path / "nope.jsonl")
