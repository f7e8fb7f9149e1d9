"""The embedded farm: the same tasks and reconciler in one process, on a folder store.

Its export must be the same bytes across runs (and for --in-memory, which runs it on a temporary store), and
survive corruption of any intermediate object. tests/test_oracle.py checks its arithmetic.
"""

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from coordinator.cli import main
from tlq_farm import plan, steps
from tlq_farm.pipeline import run_local
from tlq_farm.staging import stage_job
from tlq_farm.store import LocalStore, keys
from tlq_farm.store.tensors import get_json, get_tensors

from test_farm_support import CountingStore, export_bytes, job_spec, make_job_files

torch.set_num_threads(1)
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_job_files(tmp_path_factory.mktemp("farm-embedded"))


def embedded_export(store, spec, out):
    job, _ = stage_job(store, spec)
    assert steps.run_embedded(store, job)
    from tlq_farm.jobs import download_export

    download_export(store, job, out)
    return job, export_bytes(out)


def test_in_memory_runs_the_same_tasks_and_keeps_nothing(files, tmp_path, monkeypatch):
    """`--in-memory` is the embedded run on a temporary store: the same export bytes, and no store left."""
    import tempfile

    spec = job_spec(*files, importance="tlq", partition_tokens=43)
    _, farm = embedded_export(LocalStore(tmp_path / "store"), spec, tmp_path / "farm")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    run_local(spec, tmp_path / "local", progress=False, log=lambda m: None)
    assert export_bytes(tmp_path / "local") == farm
    assert list(scratch.iterdir()) == []


@pytest.mark.parametrize("method", ["gptq", "gptaq"])
def test_a_block_of_one_partition_solves_in_place_with_the_bytes_of_stats_and_solve_tasks(files, tmp_path, method,
                                                                                         monkeypatch):
    """Where a block's statistics take one partition, a quantize task per group computes its sums and solves its
    linears: the export is the same bytes as from stats and solve tasks (the same partial, reduced alone), and
    no statistics reach the store."""
    from tlq_farm import plan

    spec = job_spec(*files, method=method, importance="tlq")
    job, in_place = embedded_export(LocalStore(tmp_path / "a"), spec, tmp_path / "a-out")
    manifest = get_json(LocalStore(tmp_path / "a"), keys.manifest(job))
    groups = get_json(LocalStore(tmp_path / "a"), keys.plan_groups(job))
    assert all(plan.stat_partitions(manifest, groups, b) == [0] for b in range(manifest["n_blocks"]))
    kinds = {r["kind"] for r in steps.task_records(LocalStore(tmp_path / "a"), job)}
    assert "quantize" in kinds and not kinds & {"stats", "solve"}
    assert not [k for k in LocalStore(tmp_path / "a").list_committed(keys.job_prefix(job)) if "/stats/" in k]

    monkeypatch.setattr(plan, "solves_in_place", lambda *a, **k: False)
    store = LocalStore(tmp_path / "b")
    _, separate = embedded_export(store, spec, tmp_path / "b-out")
    kinds = {r["kind"] for r in steps.task_records(store, job)}
    assert {"stats", "solve"} <= kinds and "quantize" not in kinds
    assert separate == in_place


def test_three_shards_change_the_reduction_order_but_not_the_plan(files, tmp_path):
    spec = job_spec(*files)
    store = LocalStore(tmp_path / "store")
    job, _ = stage_job(store, spec)
    manifest = get_json(store, keys.manifest(job))
    assert manifest["shards"] == [[0, 2], [2, 4], [4, 6]]
    assert sum(manifest["shard_tokens"]) == manifest["calibration"]["tokens"]
    # A job keeps the floor of Gram work per statistics partition it was staged with (plan.MIN_PARTITION_MACS).
    assert manifest["partition_macs"] == plan.MIN_PARTITION_MACS


def test_embedded_runs_are_byte_identical_and_rerunning_attaches(files, tmp_path):
    spec = job_spec(*files, method="rtn")
    store_a, store_b = LocalStore(tmp_path / "a"), LocalStore(tmp_path / "b")
    job_a, first = embedded_export(store_a, spec, tmp_path / "out-a")
    job_b, second = embedded_export(store_b, spec, tmp_path / "out-b")
    assert job_a == job_b and first == second
    assert stage_job(store_a, spec) == (job_a, True)
    other, _ = stage_job(store_a, job_spec(*files, method="rtn", seed=1))
    assert other != job_a


def test_staging_splits_the_checkpoint_per_block_without_changing_a_tensor(files, tmp_path):
    model_dir, _ = files
    store = LocalStore(tmp_path / "store")
    job, _ = stage_job(store, job_spec(*files))
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        original = {k: f.get_tensor(k) for k in f.keys()}
    pieces = [get_tensors(store, keys.staged_embed(job)), get_tensors(store, keys.staged_head(job))]
    for b in range(2):
        pieces.append({f"layers.{b}.{k}": v for k, v in get_tensors(store, keys.staged_block(job, b)).items()})
        # The vision tower's blocks are pieces of their own, as the decoder's are.
        pieces.append({f"visual.{b}.{k}": v for k, v in get_tensors(store, keys.staged_block(job, b, "vision")).items()})
    staged = [t for p in pieces for t in p.values()]
    assert len(staged) == len(original)
    assert not any(".blocks." in k for k in get_tensors(store, keys.staged_embed(job)))
    block0 = get_tensors(store, keys.staged_block(job, 0))
    assert torch.equal(block0["self_attn.q_proj.weight"], original["model.layers.0.self_attn.q_proj.weight"])
    assert set(get_json(store, keys.manifest(job))["files"]) >= {"config.json", "tokenizer.json"}


def test_a_block_is_built_from_one_local_copy_of_its_staged_weights(files, tmp_path):
    """ctx.block fills the block tensor by tensor from one verified local copy of its staged object: the
    staged values exactly, one read of the object for every build of the block, and a staged object that
    does not match the model's block is refused with a way out."""
    from tlq_farm.store.tensors import put_tensors

    store = CountingStore(tmp_path / "store")
    job, _ = stage_job(store, job_spec(*files))
    staged = get_tensors(store, keys.staged_block(job, 0))
    ctx = steps.JobContext(store, job)
    store.reads.clear()
    for _ in range(3):
        state = ctx.block(0).state_dict()
        assert set(state) == set(staged)
        assert all(torch.equal(state[n], staged[n].to(state[n].dtype)) for n in staged)
    assert [k for k in store.reads if "staged/block" in k] == [keys.staged_block(job, 0)]

    short = {n: t for n, t in staged.items() if n != "mlp.down_proj.weight"}
    put_tensors(store, keys.staged_block(job, 1), short)
    with pytest.raises(RuntimeError, match=r"missing \['mlp.down_proj.weight'\]; stage the job again"):
        ctx.block(1)
    narrow = {**staged, "mlp.down_proj.weight": staged["mlp.down_proj.weight"][:, 1:].contiguous()}
    put_tensors(store, keys.staged_block(job, 1), narrow)
    ctx = steps.JobContext(store, job)
    with pytest.raises(RuntimeError, match="'mlp.down_proj.weight' of .* has shape"):
        ctx.block(1)


def test_an_embedded_run_lists_the_job_a_few_times_and_reads_what_every_block_shares_once(files, tmp_path):
    """The embedded run finds what a finished task made ready from its consumers' markers: it lists the whole
    job only to begin, once the embeds are done, once the plan is known and to end, however many tasks there
    are. Each shard's kwargs and token masks, the same for every block, are read once."""
    store = CountingStore(tmp_path / "store")
    job, _ = stage_job(store, job_spec(*files, importance="modality"))
    store.reads.clear()
    store.listings.clear()
    assert steps.run_embedded(store, job)
    tasks = len(store.list_committed(keys.tasks_prefix(job)))
    assert store.listings.count(keys.job_prefix(job)) == 4 and tasks > 20
    shared = [k for k in store.reads if "/kwargs/" in k or "/tokens/" in k]
    assert len(shared) == len(set(shared)) == 2 * len(get_json(store, keys.manifest(job))["shards"])


def test_what_a_task_made_ready_is_found_from_a_complete_index_without_a_store_lookup(files, tmp_path):
    """ready_after with an index of the committed keys (the farm keeps one in Redis) gives the same tasks as
    marker lookups, and looks nothing up in the store; an index that cannot tell (None) falls back to them."""
    store = CountingStore(tmp_path / "store")
    job, _ = stage_job(store, job_spec(*files))
    assert not steps.run_embedded(store, job, max_tasks=12)  # the embeds, the plan, block 0 part way
    manifest, committed, groups, _ = steps.reconcile_job(store, job, {})
    done = [t for t in plan.all_tasks(manifest, groups)
            if t.kind != "groups" and all(k in committed for k in plan.outputs(t, manifest, groups))]
    assert len(done) > 5
    known_plan = {("manifest", store.url, job): manifest, ("groups", store.url, job): groups}
    found, lookups = [], 0
    for task in done:
        store.lookups.clear()
        by_markers = steps.ready_after(store, job, task, dict(known_plan))
        lookups += len(store.lookups)
        store.lookups.clear()
        by_index = steps.ready_after(store, job, task, dict(known_plan),
                                     index=lambda wanted: {k for k in wanted if k in committed})
        assert by_index == by_markers and store.lookups == []
        assert steps.ready_after(store, job, task, dict(known_plan), index=lambda wanted: None) == by_markers
        found += by_markers
    assert lookups > len(done) and found  # the markers were needed, and some tasks were ready


def test_the_prefix_cache_keeps_what_its_budget_holds(files, tmp_path, monkeypatch):
    """Each shard's kwargs are read once while the budget holds them all; with room for one shard's only, the
    least recently used goes first and is read again (and the one just read is kept whatever its size)."""
    from tlq_farm import plan

    store = CountingStore(tmp_path / "store")
    job, _ = stage_job(store, job_spec(*files))
    n = len(get_json(store, keys.manifest(job))["shards"])
    assert not steps.run_embedded(store, job, max_tasks=n)  # the embeds
    wanted = [keys.block_kwargs(job, k) for k in range(n)] * 2
    for budget, reads in ((2**30, n), (1, 2 * n)):
        monkeypatch.setattr(plan, "PREFIX_CACHE_BYTES", budget)
        ctx = steps.JobContext(store, job)
        store.reads.clear()
        got = [ctx.prefix_tensors(key) for key in wanted]
        assert len(store.reads) == reads
        for key, tensors in zip(wanted, got):
            assert tensors.keys() == get_tensors(store, key).keys()
        assert len(ctx._prefix_cache) == (n if budget > 1 else 1)


def test_a_corrupted_object_is_detected_and_recomputed(files, tmp_path):
    spec = job_spec(*files)
    reference = LocalStore(tmp_path / "ref")
    _, expected = embedded_export(reference, spec, tmp_path / "ref-out")

    store = LocalStore(tmp_path / "store")
    job, _ = stage_job(store, spec)
    assert not steps.run_embedded(store, job, max_tasks=6)  # block 0 part way
    victim = keys.acts(job, "q", 0, 1)
    assert store.is_committed(victim)
    path = store.path(victim)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    assert steps.run_embedded(store, job)
    logs = store.list_committed(keys.tasks_prefix(job))
    assert sum(1 for k in logs if "/embed-s0001--" in k) == 2  # the corrupt shard's embed ran again
    assert sum(1 for k in logs if "/embed-s0000--" in k) == 1
    from tlq_farm.jobs import download_export

    download_export(store, job, tmp_path / "out")
    assert export_bytes(tmp_path / "out") == expected


def test_a_lost_staged_input_stops_the_job_with_a_way_out(files, tmp_path):
    store = LocalStore(tmp_path / "store")
    job, _ = stage_job(store, job_spec(*files))
    store.delete(keys.calib_shard(job, 0))
    with pytest.raises(steps.JobStuck, match="run `tlq-farm run` with the same model"):
        steps.run_embedded(store, job)


def test_cancel_stops_an_embedded_job(files, tmp_path):
    store = LocalStore(tmp_path / "store")
    job, _ = stage_job(store, job_spec(*files))
    store.put_flag(keys.cancel_flag(job), b"")
    assert steps.run_embedded(store, job) is False
    assert store.list_committed(keys.tasks_prefix(job)) == []


def test_cli_run_embedded_then_status_and_export(files, tmp_path):
    model, calib = files
    args = ["run", str(model), "--calib", str(calib), "--group-size", "32", "--samples", "6", "--seq-len", "512",
            "--shard-tokens", "45", "--method", "rtn", "--store", str(tmp_path / "store"), "--create-store", "--quiet"]
    runner = CliRunner()
    res = runner.invoke(main, args + ["--out", str(tmp_path / "out")], env={"TLQ_BROKER_URL": ""})
    assert res.exit_code == 0, res.output
    job = res.output.split("job ")[1].split()[0]
    res = runner.invoke(main, ["status", job, "--store", str(tmp_path / "store"), "--json"])
    assert res.exit_code == 0 and '"state": "done"' in res.output
    res = runner.invoke(main, ["export", job, "--store", str(tmp_path / "store"), "--out", str(tmp_path / "again")])
    assert res.exit_code == 0, res.output
    assert export_bytes(tmp_path / "again") == export_bytes(tmp_path / "out")
    # The same command again (as after a coordinator killed once the export was downloaded) finds this job's
    # export in --out and succeeds without touching it; a folder that differs in one byte is refused.
    before = export_bytes(tmp_path / "out")
    res = runner.invoke(main, args + ["--out", str(tmp_path / "out")], env={"TLQ_BROKER_URL": ""})
    assert res.exit_code == 0, res.output
    assert export_bytes(tmp_path / "out") == before
    cfg = tmp_path / "out" / "config.json"
    cfg.write_text(cfg.read_text() + " ")
    res = runner.invoke(main, args + ["--out", str(tmp_path / "out")], env={"TLQ_BROKER_URL": ""})
    assert res.exit_code != 0 and "is not empty" in res.output
    res = runner.invoke(main, ["status", "nojob", "--store", str(tmp_path / "store")])
    assert res.exit_code != 0 and "was never staged there" in res.output


def test_status_reports_ready_tasks_that_no_live_worker_fits(files, tmp_path):
    from tlq_farm.jobs import format_status, job_status

    store = LocalStore(tmp_path / "store")
    job, _ = stage_job(store, job_spec(*files))
    s = job_status(store, job, live_classes=[])
    assert s["state"] == "running" and s["ready"] == ["embed-s0000", "embed-s0001", "embed-s0002"]
    assert [u["task"] for u in s["no_worker_fits"]] == s["ready"]
    from tlq_farm import plan

    need = plan.class_name(plan.memory_class(plan.estimate_memory(plan.Task("embed", shard=0),
                                                                  get_json(store, keys.manifest(job)), None)))
    assert f"needs a worker of class {need} or larger; none is live" in format_status(s)
    assert job_status(store, job, live_classes=[2**30])["no_worker_fits"] == []


def test_local_workers_share_a_job_and_give_the_same_bytes(files, tmp_path):
    """`run --workers 3` (no broker): three local processes take the tasks of one job between them; the
    export equals the one-process run's, and every task was computed exactly once."""
    model, calib = files
    common = ["run", str(model), "--calib", str(calib), "--group-size", "32", "--samples", "6", "--seq-len", "512",
              "--shard-tokens", "45", "--quiet", "--create-store"]
    runner = CliRunner()
    one = runner.invoke(main, common + ["--store", str(tmp_path / "s1"), "--out", str(tmp_path / "o1")], env={"TLQ_BROKER_URL": ""})
    assert one.exit_code == 0, one.output
    three = runner.invoke(main, common + ["--store", str(tmp_path / "s3"), "--out", str(tmp_path / "o3"), "--workers", "3"],
                          env={"TLQ_BROKER_URL": ""})
    assert three.exit_code == 0, three.output
    assert export_bytes(tmp_path / "o3") == export_bytes(tmp_path / "o1")
    store = LocalStore(tmp_path / "s3")
    job = three.output.split("job ")[1].split()[0]
    records = [get_json(store, k) for k in store.list_committed(keys.tasks_prefix(job))]
    computed = [r for r in records if r.get("status", "computed") == "computed"]
    names = [r["task"] for r in computed]
    assert len(names) == len(set(names)), "a task was computed twice"
    assert len({r["worker"] for r in computed}) > 1, "the work was not shared"
