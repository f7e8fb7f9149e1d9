"""Bad models, bad calibration data and bad option values through `tlq-farm run`.

Each case writes one bad input into a fresh folder and runs the real CLI on a tiny model. The run must end
with one line that names the problem and the fix (no traceback), and leave nothing a later run would trust:
no --out folder and no job in the store. A last test runs good data with skippable rows and reads the log.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from click.testing import CliRunner

from coordinator.cli import main
from tlq_farm.models.adapter import SUPPORTED_MODEL_TYPES
from tlq_farm.models.tiny import ARCHS, tiny_image
from tlq_farm.staging import list_jobs
from tlq_farm.store import LocalStore

pytestmark = pytest.mark.timeout(120)

PROMPT, ANSWER = "what is in the picture", "a red circle"
# Far more tokens than any --seq-len these tests use.
LONG_PROMPT = " ".join(["what is in the picture"] * 40)


@dataclass
class Ctx:
    tmp: Path
    qwen: Path     # the tiny VLM, as saved
    llama: Path    # the tiny text-only model, as saved

    def model_copy(self, src: Path, name: str = "model") -> Path:
        return Path(shutil.copytree(src, self.tmp / name))

    def jsonl(self, rows: list, name: str = "c.jsonl") -> Path:
        """Rows (dicts, or raw lines as str) as a JSONL file beside images/0.png and images/1.png."""
        (self.tmp / "images").mkdir(exist_ok=True)
        for i in range(2):
            tiny_image(i, 56).save(self.tmp / "images" / f"{i}.png")
        path = self.tmp / name
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
        return path

    def good_jsonl(self) -> Path:
        return self.jsonl([{"image": f"images/{i}.png", "prompt": PROMPT, "answer": ANSWER} for i in range(2)])


@dataclass
class Case:
    id: str
    # ctx -> (model folder, calibration path, extra options)
    setup: Callable[[Ctx], tuple[Path, Path, list[str]]]
    message: str   # regex the one error line must match: the problem and the fix
    exit_code: int = 1


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def truncated(ctx):
    model = ctx.model_copy(ctx.qwen)
    _truncate(model / "model.safetensors")
    return model, ctx.good_jsonl(), []


def garbage(ctx):
    model = ctx.model_copy(ctx.qwen)
    (model / "model.safetensors").write_bytes(os.urandom(4096))
    return model, ctx.good_jsonl(), []


def bert(ctx):
    import transformers

    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=64)
    model = ctx.tmp / "bert"
    transformers.BertModel(config).save_pretrained(model)
    # A tokenizer with a chat template, so that only the architecture is wrong.
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(ctx.llama / name, model / name)
    return model, ctx.good_jsonl(), []


def without_chat_template(src_attr):
    def setup(ctx):
        model = ctx.model_copy(getattr(ctx, src_attr))
        (model / "chat_template.jinja").unlink()
        return model, ctx.good_jsonl(), []
    return setup


def without_config(ctx):
    model = ctx.model_copy(ctx.qwen)
    (model / "config.json").unlink()
    return model, ctx.good_jsonl(), []


def config_edit(edit):
    """The tiny VLM with its config.json changed by `edit(text config dict)`; the weights stay as saved."""
    def setup(ctx):
        model = ctx.model_copy(ctx.qwen)
        config = json.loads((model / "config.json").read_text())
        edit(config["text_config"])
        (model / "config.json").write_text(json.dumps(config))
        return model, ctx.good_jsonl(), []
    return setup


def one_more_layer(text):
    text["num_hidden_layers"] += 1
    text["layer_types"].append(text["layer_types"][-1])


def inconsistent(text):
    text["num_hidden_layers"] += 1  # layer_types still lists the saved number


def random_files_folder(ctx):
    folder = ctx.tmp / "notdata"
    folder.mkdir()
    (folder / "notes.txt").write_text("calibration rows are somewhere else\n")
    (folder / "blob.bin").write_bytes(os.urandom(256))
    return ctx.qwen, folder, []


def empty_folder(ctx):
    (ctx.tmp / "empty").mkdir()
    return ctx.qwen, ctx.tmp / "empty", []


def binary_file(ctx):
    path = ctx.tmp / "c.jsonl"
    path.write_bytes(b"\xff\xfe\x00\x80" + os.urandom(64))
    return ctx.qwen, path, []


def dataset_without_prompt(ctx):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"question": [PROMPT] * 2, "answer": [ANSWER] * 2})
    ds.save_to_disk(str(ctx.tmp / "ds"))
    return ctx.qwen, ctx.tmp / "ds", []


def unreadable_images(ctx):
    path = ctx.good_jsonl()
    for i in range(2):
        (ctx.tmp / "images" / f"{i}.png").write_bytes(b"not a png")
    return ctx.qwen, path, []


def options(*extra):
    return lambda ctx: (ctx.qwen, ctx.good_jsonl(), list(extra))


def in_memory(setup):
    def wrapped(ctx):
        model, calib, extra = setup(ctx)
        return model, calib, extra + ["--in-memory"]
    return wrapped


SOURCES = r"pass a JSONL file, a folder of \*\.jsonl files, or a folder saved with datasets\.save_to_disk"
BAD_WEIGHTS = r"weights file \S*model\.safetensors cannot be read \(.+\): it is truncated or not a safetensors file; copy it again"
NO_TEMPLATE = r"the model \S+ has no chat template.*: add a chat_template\.jinja to the model folder"
MISMATCH = (r"has no tensor for '\S*layers\.2\.\S+'.*: it does not match the model's config; check that "
            r"config\.json and the \.safetensors files belong together")
UNSUPPORTED = (r"model_type 'bert' \(BertModel\) is not supported; tlq-farm quantizes qwen2_vl, qwen2_5_vl, llava.*"
               r"qwen3: pass a checkpoint of one of these")

CASES = [
    # README, "Calibration data": what bad data does.
    Case("all-images-missing",
         lambda ctx: (ctx.qwen, ctx.jsonl([{"image": f"gone{i}.png", "prompt": PROMPT, "answer": ANSWER}
                                           for i in range(5)]), []),
         r"c\.jsonl is empty after loading \(nothing left after skipping 5 missing image "
         r"\(c\.jsonl:1, c\.jsonl:2, c\.jsonl:3, \.\.\.\)\): check the image paths"),
    Case("all-images-unreadable", unreadable_images,
         r"nothing left after skipping 2 unreadable image \(c\.jsonl:1, c\.jsonl:2\)\): check the image paths"),
    Case("all-longer-than-seq-len", options("--seq-len", "8"),
         r"nothing left after skipping 2 longer than --seq-len \(c\.jsonl:1, c\.jsonl:2\)\): "
         r"raise --seq-len to at least \d+ or shorten the samples"),
    Case("malformed-json-line",
         lambda ctx: (ctx.qwen, ctx.jsonl([{"prompt": PROMPT, "answer": ANSWER}, '{"prompt": "half']), []),
         r"c\.jsonl:2: not valid JSON \(.+\); each line must be one JSON object"),
    Case("row-without-prompt",
         lambda ctx: (ctx.qwen, ctx.jsonl([{"prompt": PROMPT}, {"image": "images/0.png", "answer": ANSWER}]), []),
         r'c\.jsonl:2: a row needs a "prompt" string'),
    Case("image-not-a-path", lambda ctx: (ctx.qwen, ctx.jsonl([{"image": 7, "prompt": PROMPT, "answer": ANSWER}]), []),
         r'c\.jsonl:1: "image" must be a path or a list of paths, relative to the JSONL file'),
    Case("empty-jsonl", lambda ctx: (ctx.qwen, ctx.jsonl(["", "  "]), []),
         r"c\.jsonl has no rows: it needs one JSON object per line, such as \{\"image\""),
    Case("calib-not-found", lambda ctx: (ctx.qwen, ctx.tmp / "nope.jsonl", []),
         r"calibration data \S*nope\.jsonl not found: " + SOURCES),
    Case("calib-folder-of-random-files", random_files_folder,
         r"calibration data \S*notdata is a folder but not a calibration set \(it holds 2 entries, none of them "
         r"\*\.jsonl, and no dataset_info\.json\): " + SOURCES),
    Case("calib-empty-folder", empty_folder,
         r"calibration data \S*empty is a folder but not a calibration set \(it is empty\): " + SOURCES),
    Case("calib-binary-file", binary_file, r"calibration file \S*c\.jsonl is not UTF-8 text: " + SOURCES),
    Case("saved-dataset-without-prompt", dataset_without_prompt,
         r"saved dataset \S*ds has columns \[.*'question'.*\]: it needs \"prompt\""),
    # The model folder.
    Case("model-not-found", lambda ctx: (ctx.tmp / "nomodel", ctx.good_jsonl(), []),
         r"model folder \S*nomodel does not exist: pass a folder saved with save_pretrained"),
    Case("model-without-config", without_config,
         r"\S*model is not a model folder \(no config\.json\): pass a folder saved with save_pretrained"),
    Case("bert-checkpoint", bert, UNSUPPORTED),
    Case("bert-checkpoint-in-memory", in_memory(bert), UNSUPPORTED),
    Case("config-inconsistent", config_edit(inconsistent),
         r"config\.json is not a valid qwen2_vl config \(.*num_hidden_layers.*\): re-save the model with save_pretrained"),
    Case("checkpoint-not-matching-config", config_edit(one_more_layer), MISMATCH),
    Case("checkpoint-not-matching-config-in-memory", in_memory(config_edit(one_more_layer)), MISMATCH),
    Case("truncated-safetensors", truncated, BAD_WEIGHTS),
    Case("truncated-safetensors-in-memory", in_memory(truncated), BAD_WEIGHTS),
    Case("garbage-safetensors", garbage, BAD_WEIGHTS),
    Case("garbage-safetensors-in-memory", in_memory(garbage), BAD_WEIGHTS),
    Case("tokenizer-without-chat-template", without_chat_template("llama"), NO_TEMPLATE),
    Case("tokenizer-without-chat-template-in-memory", in_memory(without_chat_template("llama")), NO_TEMPLATE),
    Case("processor-without-chat-template", without_chat_template("qwen"), NO_TEMPLATE),
    # Option values: the option, the value and what is allowed.
    Case("bits-5", options("--bits", "5"), r"--bits 5 is not supported: choose 2, 3, 4 or 8"),
    Case("group-size-0", options("--group-size", "0"),
         r"--group-size 0 is invalid: use a positive number of columns .*, or -1 for per-channel"),
    Case("group-size-not-a-divisor", options("--group-size", "48"),
         r"group size 48 does not divide the layer's 64 input columns: choose a divisor of 64 or -1 for per-channel"),
    Case("samples-0", options("--samples", "0"), r"--samples 0 is invalid: use at least 1 calibration sample"),
    Case("seq-len-0", options("--seq-len", "0"), r"--seq-len 0 is too short: use at least 8 tokens"),
    Case("tlq-keep-1.5", options("--tlq-keep", "1.5"),
         r"--tlq-keep 1\.5 is out of range: use a fraction of vision tokens in \(0, 1\]"),
    Case("damp-negative", options("--damp", "-1"),
         r"--damp -1 is out of range: use a value in \(0, 1\), a fraction of mean\(diag H\)"),
    Case("bits-not-a-number", options("--bits", "four"), r"Invalid value for '--bits': 'four' is not a valid integer",
         exit_code=2),
]


@pytest.fixture(scope="module")
def saved(tiny_models):
    return tiny_models("qwen2_vl"), tiny_models("llama")


def run_cli(model, calib, store, out, extra):
    argv = ["run", str(model), "--calib", str(calib), "--store", str(store), "--out", str(out),
            "--samples", "4", "--seq-len", "256", "--method", "rtn", "--group-size", "32", "--quiet", *extra]
    return CliRunner().invoke(main, argv, env={"TLQ_BROKER_URL": "", "TLQ_STORE_URL": ""})


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_ends_in_one_line_and_leaves_nothing(case, saved, tmp_path):
    qwen, llama = saved
    model, calib, extra = case.setup(Ctx(tmp_path, qwen, llama))
    store, out = tmp_path / "store", tmp_path / "out"
    store.mkdir()
    res = run_cli(model, calib, store, out, extra)
    assert res.exit_code == case.exit_code, res.output
    assert "Traceback" not in res.output
    errors = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, res.output
    assert re.search(case.message, errors[0]), errors[0]
    assert isinstance(res.exception, SystemExit), res.exception  # click's exit, not an escaped exception
    # Nothing a later run would trust: no export folder, no job (nor a half-staged one) in the store.
    assert not out.exists()
    assert list_jobs(LocalStore(store, create=False)) == []
    assert not (store / "jobs").exists() or not any((store / "jobs").iterdir())


def test_the_supported_list_is_what_the_tiny_models_cover():
    # The message of an unsupported model lists SUPPORTED_MODEL_TYPES: each of them is tested end to end.
    assert sorted(SUPPORTED_MODEL_TYPES) == sorted(ARCHS)


@pytest.mark.parametrize("arch,path", [("qwen2_vl", "farm"), ("llama", "in-memory")])
def test_skips_and_a_short_set_are_said_in_the_log(arch, path, tiny_models, tmp_path):
    """Good data with a missing image and one over-long row: the run succeeds, the log counts the skipped
    rows (naming them) as tlq_report.json does, and says that --samples asked for more than there is,
    with --quiet too."""
    ctx = Ctx(tmp_path, tiny_models("qwen2_vl"), tiny_models("llama"))
    calib = ctx.jsonl([
        {"image": "images/0.png", "prompt": PROMPT, "answer": ANSWER},
        {"image": "images/gone.png", "prompt": PROMPT, "answer": ANSWER},
        {"image": "images/1.png", "prompt": "describe the image", "answer": "two blue squares"},
        {"image": "images/0.png", "prompt": LONG_PROMPT, "answer": ANSWER},
        {"image": "images/1.png", "prompt": "which color is it", "answer": "green"},
    ])
    store, out = tmp_path / "store", tmp_path / "out"
    argv = ["run", str(tiny_models(arch)), "--calib", str(calib), "--store", str(store), "--create-store",
            "--out", str(out), "--samples", "100", "--seq-len", "96", "--method", "rtn", "--group-size", "32",
            "--quiet"]  # --quiet hides progress, never what the data did not give
    if path == "in-memory":
        argv.append("--in-memory")
    res = CliRunner().invoke(main, argv, env={"TLQ_BROKER_URL": "", "TLQ_STORE_URL": ""})
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    skips = [line for line in lines if line.endswith("(counted in tlq_report.json)")]
    assert len(skips) == 1, res.output
    assert skips[0].startswith("calibration: skipped 2 rows: ")
    assert "1 missing image (c.jsonl:2)" in skips[0]
    assert "1 longer than --seq-len (c.jsonl:4)" in skips[0]
    assert "--samples 100 asked, the data has 3 usable rows: using 3" in lines
    report = json.loads((out / "tlq_report.json").read_text())["calibration"]
    assert report["samples"] == 3
    expected = {"missing image": 1, "longer than --seq-len": 1}
    if arch == "llama":
        # The three used rows and the over-long one had their images dropped for the text-only model.
        expected["images dropped (text-only model)"] = 4
        assert "images dropped from 4 rows for the text-only model (c.jsonl:1, c.jsonl:3, c.jsonl:4, ...)" in skips[0]
    assert report["skipped"] == expected
