"""A job's id follows its content: the model's file bytes, the encoded calibration samples and the options,
not the paths that reach them. The same job by another path attaches and computes nothing."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from coordinator.cli import main
from tlq_farm.jobs import job_status
from tlq_farm.spec import QuantSpec
from tlq_farm.staging import encode_calibration, file_digest, job_id_for
from tlq_farm.store import LocalStore, keys

from test_farm_support import export_bytes, job_spec, make_job_files

torch.set_num_threads(1)
pytestmark = pytest.mark.timeout(300)

COMMON = ["--group-size", "32", "--samples", "6", "--seq-len", "512", "--shard-tokens", "45", "--method", "rtn",
          "--quiet"]


def job_of(model, calib, **quant) -> str:
    spec = job_spec(model, calib, **{"method": "rtn", **quant})
    return job_id_for(spec, Path(spec.model), encode_calibration(spec).samples)[0]


def run(model, calib, store, out):
    res = CliRunner().invoke(main, ["run", str(model), "--calib", str(calib), "--store", str(store), "--out", str(out)]
                             + COMMON, env={"TLQ_BROKER_URL": ""})
    assert res.exit_code == 0, res.output
    return res.output.split("job ")[1].split()[0], res.output


@pytest.fixture
def job_files(tmp_path, monkeypatch):
    """The tiny job's model and data under tmp_path/src, a copy of both under tmp_path/copy, cwd tmp_path."""
    model, calib = make_job_files(tmp_path / "src")
    shutil.copytree(tmp_path / "src", tmp_path / "copy")
    monkeypatch.chdir(tmp_path)
    return model, calib


def test_relative_absolute_and_copied_paths_are_one_job_computed_once(job_files, tmp_path):
    model, calib = job_files
    store = tmp_path / "store"
    store.mkdir()
    job, first = run("./src/model", "src/calib/data.jsonl", store, tmp_path / "o1")
    assert "(staged)" in first
    logs = LocalStore(store).list_committed(keys.tasks_prefix(job))
    assert logs
    computed = job_status(LocalStore(store), job)["computed_tasks"]

    for i, (m, c) in enumerate([(model.resolve(), calib.resolve()),
                                (tmp_path / "copy" / "model", tmp_path / "copy" / "calib" / "data.jsonl")]):
        again, output = run(m, c, store, tmp_path / f"o{i + 2}")
        assert again == job and "(attached to the existing job)" in output
        # Nothing was computed again: no new task records.
        assert LocalStore(store).list_committed(keys.tasks_prefix(job)) == logs
        assert job_status(LocalStore(store), job)["computed_tasks"] == computed
        assert export_bytes(tmp_path / f"o{i + 2}") == export_bytes(tmp_path / "o1")
    # The manifest still shows the paths the job was staged from.
    manifest = json.loads(LocalStore(store).get_bytes(keys.manifest(job)))
    assert manifest["spec"]["model"] == "./src/model"


def test_one_weight_byte_one_calib_row_one_pixel_or_one_option_is_another_job(job_files, tmp_path):
    model, calib = job_files
    copy_model, copy_calib = tmp_path / "copy" / "model", tmp_path / "copy" / "calib" / "data.jsonl"
    job = job_of(model, calib)
    assert job_of(copy_model, copy_calib) == job

    weights = copy_model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # the last byte of the last tensor's data
    weights.write_bytes(bytes(data))
    assert job_of(copy_model, calib) != job
    weights.write_bytes((model / "model.safetensors").read_bytes())
    assert job_of(copy_model, calib) == job

    rows = copy_calib.read_text().splitlines()
    row = json.loads(rows[0])
    row["answer"] += " really"
    copy_calib.write_text("\n".join([json.dumps(row)] + rows[1:]) + "\n")
    assert job_of(model, copy_calib) != job
    shutil.copyfile(calib, copy_calib)

    image = copy_calib.parent / "images" / "0.png"
    with Image.open(image) as im:
        pixels = im.convert("RGB")
    r, g, b = pixels.getpixel((0, 0))
    pixels.putpixel((0, 0), ((r + 128) % 256, g, b))
    pixels.save(image)
    assert job_of(model, copy_calib) != job

    assert job_of(model, calib, bits=3) != job
    assert job_of(model, calib, group_size=16) != job


def test_model_digest_is_the_file_content_under_any_folder(tmp_path):
    for folder, payload in [("a", b"x" * 3_000_000), ("b", b"x" * 3_000_000), ("c", b"x" * 2_999_999 + b"y")]:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "config.json").write_text("{}")
        (tmp_path / folder / "model.safetensors").write_bytes(payload)
    digest = {f: file_digest([tmp_path / f / "config.json", tmp_path / f / "model.safetensors"]) for f in "abc"}
    assert digest["a"] == digest["b"] != digest["c"]
    # File names are content too: the same bytes under another name are another model.
    (tmp_path / "b" / "model.safetensors").rename(tmp_path / "b" / "other.safetensors")
    assert file_digest([tmp_path / "b" / "config.json", tmp_path / "b" / "other.safetensors"]) != digest["a"]


def test_fingerprint_ignores_only_the_paths():
    from tlq_farm.spec import JobSpec, fingerprint

    base = JobSpec(model="/a/model", calib="/a/data.jsonl")
    moved = JobSpec(model="model", calib="../b/data.jsonl")
    assert fingerprint(base, "m", "d") == fingerprint(moved, "m", "d")
    assert fingerprint(base, "m", "d") != fingerprint(base, "m2", "d")
    assert fingerprint(base, "m", "d") != fingerprint(base, "m", "d2")
    for changed in (JobSpec(model="m", calib="d", seed=1), JobSpec(model="m", calib="d", fmt="fake"),
                    JobSpec(model="m", calib="d", shard_tokens=4096), JobSpec(model="m", calib="d", quant=QuantSpec(damp=0.02))):
        assert fingerprint(changed, "m", "d") != fingerprint(base, "m", "d")
