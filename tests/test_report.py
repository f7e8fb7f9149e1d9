"""`tlq-farm report` on tiny-model exports and a hand-built store job; the report's pure pieces exactly."""

import json
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from coordinator.report_cmd import report_command
from tlq_farm.calib.data import load_calibration
from tlq_farm.models.adapter import load_model
from tlq_farm.pipeline import run_local
from tlq_farm.report import (importance_maps, merged_patch_grid, module_loss_tables, timeline_from_report,
                             timeline_from_task_records, token_map, vision_runs, weight_split)
from tlq_farm.spec import JobSpec, QuantSpec

torch.set_num_threads(1)


def export_of(src, calib, out, importance="tlq", method="gptq"):
    spec = JobSpec(model=str(src), calib=str(calib), samples=4, seq_len=512, fmt="fake",
                   quant=QuantSpec(bits=4, group_size=32, method=method, importance=importance))
    run_local(spec, out, progress=False, log=lambda m: None)
    return out


def linked_pngs(index):
    html = index.read_text()
    links = re.findall(r"<img src='([^']+)'", html)
    assert links and all("/" not in link for link in links)  # relative, next to index.html
    for link in links:
        with Image.open(index.parent / link) as im:
            im.verify()
            assert im.format == "PNG"
    return links, html


@pytest.fixture(scope="module")
def qwen_export(tiny_models, calib_jsonl, tmp_path_factory):
    return export_of(tiny_models("qwen2_vl"), calib_jsonl, tmp_path_factory.mktemp("rep") / "qwen-tlq")


def test_report_on_an_export_links_valid_pngs(qwen_export, tmp_path):
    res = CliRunner().invoke(report_command, [str(qwen_export), "--out", str(tmp_path / "r"), "--samples", 2])
    assert res.exit_code == 0, res.output
    links, html = linked_pngs(tmp_path / "r" / "index.html")
    assert "losses-0.png" in links and "timeline.png" in links
    assert sum(link.startswith("importance-") for link in links) == 2
    assert "the task records when the export was written" in html  # every run reports its tasks


def test_qwen_heatmap_has_the_merged_patch_grid(qwen_export, tiny_models, calib_jsonl):
    spec = json.loads((qwen_export / "tlq_report.json").read_text())["spec"]
    maps = importance_maps(spec, n_samples=2)
    _, processor = load_model(str(tiny_models("qwen2_vl")))
    samples = load_calibration(calib_jsonl, processor, samples=2, seq_len=512, seed=spec["seed"]).samples
    merge = processor.image_processor.merge_size
    for m, s in zip(maps, samples):
        _, h, w = s["image_grid_thw"][0].tolist()
        assert m.map_first_block.shape == (h // merge, w // merge)
        assert m.map_first_block.size == int(s["vision_mask"].sum())
        # The map holds exactly the vision tokens' weights, in token order.
        np.testing.assert_array_equal(m.map_first_block.reshape(-1), m.weights_first_block[m.vision_mask])
        # tlq gives text tokens weight >= 1/2 and drops a share of the vision tokens.
        assert m.weights_first_block[~m.vision_mask & (m.valid > 0)].min() >= 0.5


def test_llava_heatmap_is_the_square_root_of_the_image_tokens(tiny_models, calib_jsonl, tmp_path):
    out = export_of(tiny_models("llava"), calib_jsonl, tmp_path / "llava", importance="vlmq", method="gptaq")
    res = CliRunner().invoke(report_command, [str(out), "--out", str(tmp_path / "r"), "--samples", 1])
    assert res.exit_code == 0, res.output
    linked_pngs(tmp_path / "r" / "index.html")
    spec = json.loads((out / "tlq_report.json").read_text())["spec"]
    (m,) = importance_maps(spec, n_samples=1)
    n = int(m.vision_mask.sum())
    side = int(round(n ** 0.5))
    assert side * side == n and m.map_mean.shape == (side, side)


def test_report_of_a_store_job_draws_its_task_records(qwen_export, tmp_path):
    from tlq_farm.store import LocalStore, keys
    from tlq_farm.store.tensors import put_json

    store = LocalStore(tmp_path / "store")
    job = "abc123"
    report = json.loads((qwen_export / "tlq_report.json").read_text())
    put_json(store, keys.export_file(job, "tlq_report.json"), report)
    put_json(store, keys.export_index(job), {"files": {"tlq_report.json": "x"}})
    for i, (task, worker) in enumerate([("embed", "w1"), ("stats-b000-g00-s0000", "w1"),
                                        ("stats-b000-g00-s0001", "w2")]):
        put_json(store, keys.task_log(job, f"{task}--{i}"), {"task": task, "started": 100.0 + i, "finished": 101.5 + i,
                                                             "seconds": 1.5, "host": "h", "pid": i, "worker": worker})
    res = CliRunner().invoke(report_command, [job, "--store", str(tmp_path / "store"), "--out", str(tmp_path / "r"),
                                              "--no-importance"])
    assert res.exit_code == 0, res.output
    _, html = linked_pngs(tmp_path / "r" / "index.html")
    assert "3 task records, 3 worker processes" in html
    res = CliRunner().invoke(report_command, ["nojob", "--store", str(tmp_path / "store"), "--out", str(tmp_path / "r2")])
    assert res.exit_code != 0 and "neither an export folder nor a job" in res.output


def test_missing_report_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    res = CliRunner().invoke(report_command, [str(tmp_path / "empty"), "--out", str(tmp_path / "r")])
    assert res.exit_code != 0 and "has no tlq_report.json" in res.output


def test_timeline_from_task_records_is_relative_and_per_worker():
    records = [{"task": "solve-b001-self_attn.q_proj", "started": 12.0, "finished": 14.0, "seconds": 2.0,
                "host": "a", "pid": 1, "worker": "gpu0"},
               {"task": "embed-s0000", "started": 10.0, "finished": 11.0, "seconds": 1.0, "host": "b", "pid": 7}]
    bars = timeline_from_task_records(records)
    assert [(b.start, b.seconds, b.kind) for b in bars] == [(0.0, 1.0, "embed"), (2.0, 2.0, "solve")]
    assert bars[0].lane == "b (b:7)" and bars[1].lane == "gpu0 (a:1)"


def test_timeline_from_report_orders_stages_and_nests_blocks():
    report = {"layout": {"blocks": "m.layers"},
              "time": {"stages": {"export": 1.0, "load": 2.0, "decoder blocks": 3.0, "capture": 0.5}},
              "blocks": {"m.layers": [{"index": 0, "seconds": 1.0, "loss": 0}, {"index": 1, "seconds": 2.0, "loss": 0}]}}
    bars = timeline_from_report(report)
    assert [(b.label, b.start) for b in bars if b.lane == "stages"] == [
        ("load", 0.0), ("capture", 2.0), ("decoder blocks", 2.5), ("export", 5.5)]
    assert [(b.label, b.start) for b in bars if b.lane == "blocks"] == [("block 0", 2.5), ("block 1", 3.5)]


def test_module_loss_table_and_pure_grid_helpers():
    report = {"layout": {"blocks": "m.layers"}, "blocks": {"m.layers": []},
              "modules": {"m.layers.1.mlp.down_proj": {"loss": 4.0}, "m.layers.0.self_attn.q_proj": {"loss": 1.0},
                          "m.layers.0.mlp.down_proj": {"loss": 2.0}}}
    (t,) = module_loss_tables(report)
    assert t.blocks == [0, 1] and t.modules == ["self_attn.q_proj", "mlp.down_proj"]
    np.testing.assert_array_equal(t.losses, [[1.0, 2.0], [np.nan, 4.0]])

    assert merged_patch_grid(64, image_grid_thw=[1, 16, 16], spatial_merge_size=2) == (8, 8, 0)
    assert merged_patch_grid(16) == (4, 4, 0)
    assert merged_patch_grid(17, base_side=4) == (4, 4, 1)      # a kept CLS token first
    assert merged_patch_grid(16 + 40, base_side=4) == (4, 4, 0)  # LLaVA-NeXT: base view first, then tiles
    with pytest.raises(ValueError, match="square patch grid"):
        merged_patch_grid(17)
    assert vision_runs([0, 1, 1, 0, 1]) == [(1, 3), (4, 5)]
    np.testing.assert_array_equal(token_map(np.arange(10), 2, 2, 3), [[2, 3, 4], [5, 6, 7]])

    w = np.array([1.0, 3.0, 0.0, 2.0, 2.0])
    vis = np.array([False, True, True, False, False])
    s = weight_split(w, vis, np.ones(5))
    assert s["vision_mean"] == 1.5 and s["text_mean"] == pytest.approx(5 / 3)
    assert s["vision_share"] == pytest.approx(3 / 8) and s["vision_dropped"] == 0.5


# ----------------------------------------------------------------------------------------------- farm runs

FARM_ARGS = ["--group-size", "32", "--samples", "6", "--seq-len", "512", "--shard-tokens", "45", "--quiet"]


def farm_run(model, calib, root, *extra):
    """`tlq-farm run` embedded (no broker) into root/out; -> (job, CLI output, store)."""
    from coordinator.cli import main
    from tlq_farm.store import LocalStore

    (root / "store").mkdir(parents=True)
    res = CliRunner().invoke(main, ["run", str(model), "--calib", str(calib), "--store", str(root / "store"),
                                    "--out", str(root / "out"), *FARM_ARGS, *extra], env={"TLQ_BROKER_URL": ""})
    assert res.exit_code == 0, res.output
    return res.output.split("job ")[1].split()[0], res.output, LocalStore(root / "store")


@pytest.fixture(scope="module")
def farm_files(tmp_path_factory):
    from test_farm_support import make_job_files

    return make_job_files(tmp_path_factory.mktemp("farm-files"))


@pytest.fixture(scope="module")
def default_farm_run(farm_files, tmp_path_factory):
    root = tmp_path_factory.mktemp("farm-default")
    job, _, store = farm_run(*farm_files, root)
    return root / "out", job, store


def test_default_run_reports_times_and_peak_memory_from_its_task_records(default_farm_run):
    from tlq_farm.steps import task_records

    out, job, store = default_farm_run
    report = json.loads((out / "tlq_report.json").read_text())
    records = task_records(store, job)
    for r in records:
        assert r["cpu_s"] >= 0 and r["peak_rss_mib"] > 0 and r["peak_rss_scope"] in ("task", "process")
        assert r["cuda_peak_mib"] is None and r["kind"] == r["task"].split("-", 1)[0]
        assert r["block"] == (int(r["task"].split("-b")[1][:3]) if "-b" in r["task"] else None)
    by_kind = {}
    for r in records:
        by_kind.setdefault(r["kind"], []).append(r)

    t = report["time"]
    # The export's own entry was taken while it ran, before its task record was written.
    assert t["tasks"] == len(records)
    assert sorted(e["task"] for e in report["timeline"]) == sorted(r["task"] for r in records)
    assert set(t["stages"]) == {"embed", "groups", "quantize", "propagate", "export"} == set(by_kind)
    for kind, rs in by_kind.items():
        if kind != "export":
            assert t["stages"][kind] == pytest.approx(sum(r["seconds"] for r in rs))
            assert t["stages_cpu"][kind] == pytest.approx(sum(r["cpu_s"] for r in rs))
            assert report["peak_memory"]["kinds"][kind]["rss_mib"] == max(r["peak_rss_mib"] for r in rs)
    assert [b["index"] for b in t["blocks"]] == [0, 1]
    assert t["blocks"][1]["seconds"] == pytest.approx(sum(r["seconds"] for r in records if r["block"] == 1))
    assert t["blocks"][1]["peak_rss_mib"] == max(r["peak_rss_mib"] for r in records if r["block"] == 1)
    assert report["peak_memory"]["rss_mib"] == max(k["rss_mib"] for k in report["peak_memory"]["kinds"].values())
    assert report["peak_memory"]["cuda_mib"] is None
    starts = [e["start"] for e in report["timeline"]]
    assert starts == sorted(starts) and starts[0] == 0.0
    assert all(e["end"] >= e["start"] and e["worker"].startswith("embedded (") for e in report["timeline"])
    assert t["total_s"] == pytest.approx(max(e["end"] for e in report["timeline"]), abs=1e-6)  # ends: 6 decimals


def test_report_of_a_default_run_export_draws_its_timeline(default_farm_run, tmp_path):
    out, _, _ = default_farm_run
    from tlq_farm.report import block_time_rows

    rows = block_time_rows(json.loads((out / "tlq_report.json").read_text()))
    assert rows[0] == ["block", "wall s", "CPU s", "peak RSS MiB"] and [r[0] for r in rows[1:]] == ["0", "1"]
    res = CliRunner().invoke(report_command, [str(out), "--out", str(tmp_path / "r"), "--no-importance"])
    assert res.exit_code == 0, res.output
    links, html = linked_pngs(tmp_path / "r" / "index.html")
    assert "timeline.png" in links and "losses-0.png" in links
    n = len(json.loads((out / "tlq_report.json").read_text())["timeline"])
    assert f"{n} tasks from the export&#x27;s report, 1 worker processes" in html
    assert "Time and peak memory per stage" in html and "<td>propagate</td>" in html
    assert "No task records" not in html


def test_run_fields_are_all_that_differ_between_worker_counts(farm_files, default_farm_run, tmp_path):
    from tlq_farm.report import RUN_FIELDS, without_run_fields

    out, _, _ = default_farm_run
    farm_run(*farm_files, tmp_path, "--workers", "2")
    one = json.loads((out / "tlq_report.json").read_text())
    two = json.loads((tmp_path / "out" / "tlq_report.json").read_text())
    assert without_run_fields(one) == without_run_fields(two)
    assert set(RUN_FIELDS) <= set(one)
    assert len({e["worker"] for e in two["timeline"]}) == 2


def test_rtn_losses_are_null_in_the_farm_and_in_memory_reports(farm_files, tmp_path):
    _, output, _ = farm_run(*farm_files, tmp_path / "farm", "--method", "rtn")
    assert "total loss n/a" in output
    from coordinator.cli import main

    model, calib = farm_files
    res = CliRunner().invoke(main, ["run", str(model), "--calib", str(calib), "--in-memory", "--method", "rtn",
                                    "--out", str(tmp_path / "memory" / "out"), *FARM_ARGS])
    assert res.exit_code == 0, res.output
    assert "total loss n/a" in res.output
    for where in ("farm", "memory"):
        report = json.loads((tmp_path / where / "out" / "tlq_report.json").read_text())
        assert report["modules"] and all(m["loss"] is None for m in report["modules"].values())
        assert all(b["loss"] is None for b in report["blocks"][report["layout"]["blocks"]])
        assert report["totals"]["loss"] is None
        res = CliRunner().invoke(report_command, [str(tmp_path / where / "out"), "--out", str(tmp_path / where / "r"),
                                                  "--no-importance"])
        assert res.exit_code == 0, res.output
        links, html = linked_pngs(tmp_path / where / "r" / "index.html")
        assert not any(link.startswith("losses-") for link in links)
        assert "No loss was measured" in html and "n/a (not measured)" in html


def test_loss_sum_counts_only_measured_losses_and_tables_skip_unmeasured_ones():
    from tlq_farm.report import format_loss, loss_sum

    assert loss_sum([None, None]) is None and loss_sum([]) is None
    assert loss_sum([1.5, None, 2.0]) == 3.5
    assert format_loss(None) == "n/a" and format_loss(0.123456) == "0.1235"
    report = {"layout": {"blocks": "m.layers"}, "blocks": {"m.layers": []},
              "modules": {"m.layers.0.mlp.down_proj": {"loss": None}, "m.layers.1.mlp.down_proj": {"loss": 2.0}}}
    (t,) = module_loss_tables(report)
    np.testing.assert_array_equal(t.losses, [[np.nan], [2.0]])
    report["modules"]["m.layers.1.mlp.down_proj"]["loss"] = None
    assert module_loss_tables(report) == []


def test_summarize_task_records_exactly():
    from tlq_farm.report import summarize_task_records

    records = [
        {"task": "embed-s0000", "kind": "embed", "block": None, "started": 100.0, "finished": 101.0, "seconds": 1.0,
         "cpu_s": 0.5, "peak_rss_mib": 300.0, "cuda_peak_mib": None, "host": "h", "pid": 1, "worker": "w"},
        {"task": "stats-b000-g00-s0000", "kind": "stats", "block": 0, "started": 101.0, "finished": 103.0,
         "seconds": 2.0, "cpu_s": 1.5, "peak_rss_mib": 500.0, "cuda_peak_mib": None, "host": "h", "pid": 2,
         "worker": "v", "store_read_bytes": 700, "store_written_bytes": 50, "store_requests": 9, "cache_hits": 3,
         "cache_misses": 1, "cache_hit_bytes": 2100},
        {"task": "stats-b001-g00-s0000", "started": 102.0, "finished": 106.0, "seconds": 4.0, "cpu_s": 3.0,
         "peak_rss_mib": 400.0, "host": "h", "pid": 1, "worker": "w"},   # an older record: kind and block from its name
        {"task": "solve-b001-mlp.down_proj", "started": 90.0, "finished": 91.0, "status": "skipped"},
    ]
    s = summarize_task_records(records)
    assert s["time"] == {"total_s": 6.0, "task_s": 7.0, "cpu_s": 5.0, "tasks": 3,
                         "stages": {"embed": 1.0, "stats": 6.0}, "stages_cpu": {"embed": 0.5, "stats": 4.5},
                         "blocks": [{"index": 0, "seconds": 2.0, "cpu_s": 1.5, "peak_rss_mib": 500.0},
                                    {"index": 1, "seconds": 4.0, "cpu_s": 3.0, "peak_rss_mib": 400.0}]}
    assert s["timeline"] == [
        {"task": "embed-s0000", "kind": "embed", "start": 0.0, "end": 1.0, "worker": "w (h:1)"},
        {"task": "stats-b000-g00-s0000", "kind": "stats", "start": 1.0, "end": 3.0, "worker": "v (h:2)"},
        {"task": "stats-b001-g00-s0000", "kind": "stats", "start": 2.0, "end": 6.0, "worker": "w (h:1)"}]
    assert s["peak_memory"] == {"rss_mib": 500.0, "cuda_mib": None,
                                "kinds": {"embed": {"rss_mib": 300.0, "cuda_mib": None},
                                          "stats": {"rss_mib": 500.0, "cuda_mib": None}}}
    bars = timeline_from_report({"timeline": s["timeline"]})
    assert [(b.lane, b.start, b.seconds, b.kind) for b in bars] == [
        ("w (h:1)", 0.0, 1.0, "embed"), ("v (h:2)", 1.0, 2.0, "stats"), ("w (h:1)", 2.0, 4.0, "stats")]
    # Store traffic: the record without the fields counts as none.
    assert s["store_io"] == {"read_bytes": 700, "written_bytes": 50, "requests": 9, "cache_hits": 3, "cache_misses": 1,
                             "cache_hit_bytes": 2100, "cache_hit_rate": 0.75,
                             "blocks": [{"index": 0, "read_bytes": 700, "written_bytes": 50, "requests": 9},
                                        {"index": 1, "read_bytes": 0, "written_bytes": 0, "requests": 0}]}
    empty = summarize_task_records([])
    assert {k: empty[k] for k in ("time", "timeline", "peak_memory")} == {"time": {}, "timeline": [], "peak_memory": {}}
    assert empty["store_io"]["read_bytes"] == 0 and empty["store_io"]["cache_hit_rate"] is None


def test_task_meter_peak_is_per_task_where_the_mark_can_be_reset(monkeypatch):
    from tlq_farm import steps
    from tlq_farm.steps import TaskMeter

    monkeypatch.setattr(steps, "KEEP_FREE_BYTES", 0)  # the first task's freed block is handed back, not kept

    big = TaskMeter()
    block = bytearray(256 << 20)
    block[::4096] = b"\1" * len(block[::4096])  # touch every page, so it is resident
    first = big.sample()
    del block
    small = TaskMeter().sample()
    if first["peak_rss_scope"] != "task":
        pytest.skip("this system does not let a process reset its peak-RSS mark")
    assert first["peak_rss_mib"] - small["peak_rss_mib"] > 200


def test_tasks_take_forward_sized_arrays_from_the_heap_and_map_the_largest():
    """The allocator policy every task runs under (steps.set_allocator_policy), in a fresh process: an array
    below MAP_FROM_BYTES is served from the heap and its space kept for the next forward; one above it is
    mapped and goes back to the system when freed."""
    import subprocess
    import sys

    code = """
import ctypes, torch
from tlq_farm import steps
libc = ctypes.CDLL("libc.so.6")
steps.set_allocator_policy()
def mapped():
    return steps._mallinfo(libc).hblkhd
for size in (steps.MAP_FROM_BYTES // 2, 2 * steps.MAP_FROM_BYTES):
    before = mapped()
    t = torch.ones(size, dtype=torch.uint8)
    print(size, mapped() - before)
    del t
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    from tlq_farm.steps import MAP_FROM_BYTES

    below, above = (int(v) for v in out[1::2])
    assert below < 2**20 and above >= 2 * MAP_FROM_BYTES
