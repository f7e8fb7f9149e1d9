"""Objects in the store stay small: statistics partitions fixed by bytes, one Gram per shared input, in-place
float32 sums that match a float64 reference, solves that reduce partials as they read them, qweights as
packed codes; and jobs of an older store format refused."""

import json
import os

import pytest
import torch
from click.testing import CliRunner

from coordinator.cli import main
from tlq_farm import block as B
from tlq_farm import plan, steps
from tlq_farm.quant import finalize_hessian, fold_cross_terms, hessian_partial, reduce_partials
from tlq_farm.quant.hessian import upper_length
from tlq_farm.spec import QuantSpec
from tlq_farm.staging import stage_job
from tlq_farm.store import LocalStore, keys
from tlq_farm.store.tensors import get_json, get_tensors_and_metadata, put_json, put_tensors

from test_farm_support import job_spec, make_job_files

torch.set_num_threads(1)
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_job_files(tmp_path_factory.mktemp("stats-store"))


@pytest.fixture(scope="module", params=[0, 43], ids=["auto-partitions", "2-partitions"])
def done_job(files, tmp_path_factory, request):
    """A finished gptq job on a folder store: one partition per block (chosen by bytes), or two (shards
    [0, 2) and [2, 3) with --partition-tokens 43)."""
    store = LocalStore(tmp_path_factory.mktemp("stats-store-job") / "store")
    job, _ = stage_job(store, job_spec(*files, partition_tokens=request.param))
    assert steps.run_embedded(store, job)
    manifest = get_json(store, keys.manifest(job))
    groups = get_json(store, keys.plan_groups(job))
    assert plan.stat_partitions(manifest, groups, 0) == ([0] if request.param == 0 else [0, 2])
    return store, job


def _nbytes(store, key):
    return sum(t.numel() * t.element_size() for t in get_tensors_and_metadata(store, key)[0].values())


def test_stored_statistics_follow_the_plan_and_never_outweigh_their_activations(done_job):
    store, job = done_job
    manifest = get_json(store, keys.manifest(job))
    groups = get_json(store, keys.plan_groups(job))
    committed = steps.committed_keys(store, job)
    n_shards = len(manifest["shards"])
    for b in range(manifest["n_blocks"]):
        acts = sum(_nbytes(store, keys.acts(job, "q", b, k)) for k in range(n_shards))
        starts = plan.stat_partitions(manifest, groups, b)
        total = 0
        for g, members in enumerate(groups["blocks"][b]["groups"]):
            found = sorted(k for k in range(n_shards) if keys.stats(job, b, g, k) in committed)
            if plan.solves_in_place(manifest, groups, b):  # one partition: its sums never reach the store
                assert starts == [0] and found == [], (b, g)
                continue
            assert found == starts, (b, g)
            one = plan.partial_bytes(manifest["spec"]["quant"], members, groups["blocks"][b]["inputs"],
                                     groups["blocks"][b]["in_features"])
            stored = [_nbytes(store, keys.stats(job, b, g, k)) for k in starts]
            # Each partial is the planned size (plus two scalars per owner), and the partials together
            # weigh no more than the activations they sum, unless a single partial already does.
            owners = plan.group_owners(members, groups["blocks"][b]["inputs"], False)
            assert all(s == one + 16 * len(owners) for s in stored), (b, g, stored, one)
            total += sum(stored)
        # Chosen by bytes, the block's partials together weigh no more than the activations they sum,
        # unless a single partition's already do (then there is one partition).
        if not manifest["spec"]["partition_tokens"]:
            assert total <= acts or len(starts) == 1, (b, total, acts)


def test_linears_fed_one_input_store_one_gram(done_job):
    store, job = done_job
    groups = get_json(store, keys.plan_groups(job))
    qkv = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    assert qkv in groups["blocks"][0]["inputs"] and qkv in groups["blocks"][0]["groups"]
    g = groups["blocks"][0]["groups"].index(qkv)
    manifest = get_json(store, keys.manifest(job))
    if plan.solves_in_place(manifest, groups, 0):  # nothing stored: the sums as the quantize task holds them
        tensors, owners = steps.group_sums(steps.job_context(store, job), plan.Task("quantize", block=0, group=g))
        meta = {"tlq": json.dumps({"owners": owners})}
    else:
        tensors, meta = get_tensors_and_metadata(store, keys.stats(job, 0, g, 0))
    owners = json.loads(meta["tlq"])["owners"]
    assert owners == {n: "self_attn.q_proj" for n in qkv}
    assert sorted(tensors) == ["self_attn.q_proj|H_upper", "self_attn.q_proj|tokens", "self_attn.q_proj|w_sum"]
    H = tensors["self_attn.q_proj|H_upper"]
    assert H.dtype == torch.float32 and H.numel() == upper_length(groups["blocks"][0]["in_features"]["self_attn.q_proj"])
    # Every solve of the group saw the same tokens: the sum over all shards.
    for n in qkv:
        _, qmeta = steps.qresult_from_store(store, keys.qweights(job, 0, n))
        assert qmeta["tokens"] == manifest["calibration"]["tokens"]


def _block_inputs(files, n):
    from tlq_farm.calib.data import load_calibration, model_inputs
    from tlq_farm.models.adapter import find_layout, load_model

    model, calib_path = files
    m, processor = load_model(str(model))
    layout = find_layout(m)
    blocks = layout.decoder_blocks(m)
    samples = load_calibration(str(calib_path), processor, samples=n, seq_len=512, seed=0).samples
    caps = [B.capture(m, blocks, model_inputs(s)) for s in samples]
    return blocks[0], [(c.hidden, c.kwargs(0)) for c in caps]


def test_in_place_float32_sums_match_a_float64_reference_and_stream(files):
    blk, inputs = _block_inputs(files, 4)
    names = ["self_attn.q_proj", "mlp.gate_proj"]
    weights = [torch.rand(h.shape[:-1].numel(), generator=torch.Generator().manual_seed(i)) for i, (h, _) in
               enumerate(inputs)]
    stats = B.accumulate_stats(blk, inputs, weights, names)
    # float64 reference: each sample's own Gram of the captured linear input, summed afterwards.
    seen: dict[str, list] = {n: [] for n in names}
    hooks = [blk.get_submodule(n).register_forward_pre_hook(lambda _m, a, n=n: seen[n].append(a[0])) for n in names]
    with torch.no_grad():
        for h, kw in inputs:
            B.run_block(blk, h, kw)
    for hd in hooks:
        hd.remove()
    for n in names:
        ref = reduce_partials(hessian_partial(x, w.reshape(x.shape[:-1])) for x, w in zip(seen[n], weights))
        assert stats[n]["H"].dtype == torch.float32
        got, want = finalize_hessian(reduce_partials([stats[n]]))[0], finalize_hessian(ref)[0]
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
        assert torch.equal(stats[n]["H"], stats[n]["H"].T)
        assert int(stats[n]["tokens"]) == int(ref["tokens"])
    # A generator of inputs (shards streamed as read) gives the same bytes as a list.
    streamed = B.accumulate_stats(blk, (x for x in inputs), weights, names)
    assert all(torch.equal(streamed[n]["H"], stats[n]["H"]) for n in names)


def test_reduce_partials_takes_a_generator_and_keeps_one_at_a_time():
    parts = [{"H": torch.full((2, 2), float(i), dtype=torch.float32), "w_sum": torch.tensor(1.0, dtype=torch.float64),
              "tokens": torch.tensor(3)} for i in range(4)]
    made = []

    def gen():
        for p in parts:
            made.append(p)
            yield p

    total = reduce_partials(gen())
    assert total["H"].dtype == torch.float64 and float(total["H"][0, 0]) == 6.0
    assert int(total["tokens"]) == 12 and len(made) == 4
    assert parts[0]["H"][0, 0] == 0.0  # the first partial is copied, not summed into
    with pytest.raises(ValueError, match="no partial statistics"):
        reduce_partials(iter([]))


def test_a_job_of_an_older_store_format_is_refused_with_what_to_do(files, tmp_path):
    store = LocalStore(tmp_path / "store")
    job, _ = stage_job(store, job_spec(*files))
    manifest = get_json(store, keys.manifest(job))
    del manifest["format"]
    store.delete(keys.manifest(job))
    put_json(store, keys.manifest(job), manifest)
    url = str(tmp_path / "store")
    res = CliRunner().invoke(main, ["resume", job, "--store", url])
    assert res.exit_code != 0
    assert "store format 1" in res.output and "Stage it again" in res.output and "prune --old-format" in res.output
    with pytest.raises(ValueError, match="Stage it again"):
        steps.run_embedded(store, job)
    assert not any("/stats/" in k or "/acts/" in k for k in steps.committed_keys(store, job))
    listed = CliRunner().invoke(main, ["jobs", "--store", url])
    assert listed.exit_code == 0 and f"{job}  old-format" in listed.output
    kept = CliRunner().invoke(main, ["prune", "--store", url])
    assert f"removed {job}" not in kept.output
    pruned = CliRunner().invoke(main, ["prune", "--old-format", "--store", url])
    assert pruned.exit_code == 0 and f"removed {job}: staged in an older store format" in pruned.output
    assert not store.is_committed(keys.manifest(job))


@pytest.mark.parametrize("bits,cols", [(2, 64), (2, 6), (3, 64), (4, 64), (4, 7), (8, 64)])
def test_packed_codes_round_trip(bits, cols):
    from tlq_farm.quant.grid import codes_per_byte, pack_codes, unpack_codes

    codes = torch.randint(0, 2**bits, (5, cols), generator=torch.Generator().manual_seed(bits), dtype=torch.int32)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, cols // codes_per_byte(bits, cols))
    assert torch.equal(unpack_codes(packed, bits, cols), codes)
    assert codes_per_byte(4, 64) == 2 and codes_per_byte(2, 64) == 4 and codes_per_byte(2, 6) == 1 and codes_per_byte(4, 7) == 1


def test_qweights_are_packed_codes_and_rebuild_the_solvers_weight(done_job):
    """A 4-bit linear costs half a byte per weight plus its grid, not a float32 copy and int32 codes; the
    weight rebuilt on read is what the export holds (the embedded export tests compare it bit for bit)."""
    store, job = done_job
    groups = get_json(store, keys.plan_groups(job))
    for m, (out_f, in_f) in groups["blocks"][0]["shapes"].items():
        key = keys.qweights(job, 0, m)
        tensors, _ = get_tensors_and_metadata(store, key)
        assert "weight" not in tensors and tensors["codes"].dtype == torch.uint8
        grid = tensors["scale"].numel() * 4 + tensors["zero"].numel() * 4 + in_f * 4
        assert _nbytes(store, key) == out_f * in_f // 2 + grid, m
        res, _ = steps.qresult_from_store(store, key)
        assert res.weight.shape == (out_f, in_f) and res.weight.dtype == torch.float32
        assert int(res.codes.min()) >= 0 and int(res.codes.max()) <= 15


def test_a_bf16_checkpoint_stays_bf16_and_the_compute_dtype_is_the_jobs(files, tmp_path):
    """Staged pieces keep the checkpoint's dtype (half the bytes of float32). --dtype auto computes in float32
    on a CPU and in the checkpoint's dtype on a GPU or a farm; activations are stored in the compute dtype
    (bf16: half the bytes), statistics are float32 sums either way, and the export keeps the checkpoint's
    dtype for what it does not quantize."""
    import dataclasses
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from tlq_farm.jobs import download_export
    from tlq_farm.spec import resolve_dtype
    from tlq_farm.staging import checkpoint_dtype

    model, calib = files
    bf16 = tmp_path / "model-bf16"
    shutil.copytree(model, bf16)
    state = load_file(str(bf16 / "model.safetensors"))
    save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()},
              str(bf16 / "model.safetensors"), metadata={"format": "pt"})
    assert checkpoint_dtype(bf16) == "bfloat16" and checkpoint_dtype(model) == "float32"
    assert resolve_dtype("auto", "bfloat16", "cpu", farm=False) == "float32"
    assert resolve_dtype("auto", "bfloat16", "cuda", farm=False) == "bfloat16"
    assert resolve_dtype("auto", "bfloat16", "cpu", farm=True) == "bfloat16"
    assert resolve_dtype("float16", "bfloat16", "cpu", farm=False) == "float16"
    # A farm of CPU workers computing a half dtype by --dtype auto is told how to get float32, not switched.
    from tlq_farm.spec import farm_dtype_note

    note = farm_dtype_note("auto", "bfloat16", ["cpu", "cpu"])
    assert "every live worker (2) is a CPU" in note and "--dtype float32" in note
    assert farm_dtype_note("auto", "bfloat16", ["cpu", "cuda:0"]) is None  # a GPU among them
    assert farm_dtype_note("bfloat16", "bfloat16", ["cpu"]) is None  # asked for
    assert farm_dtype_note("auto", "float32", ["cpu"]) is None and farm_dtype_note("auto", "bfloat16", []) is None

    acts = {}
    for dtype in ("float32", "bfloat16"):
        spec = dataclasses.replace(job_spec(bf16, calib, partition_tokens=43), dtype=dtype)  # partials stored
        store = LocalStore(tmp_path / f"store-{dtype}")
        job, _ = stage_job(store, spec)
        staged = get_tensors_and_metadata(store, keys.staged_block(job, 0))[0]
        assert {t.dtype for t in staged.values()} == {torch.bfloat16}
        manifest = get_json(store, keys.manifest(job))
        element = 2 if dtype == "bfloat16" else 4  # a block in memory, in the compute dtype
        assert manifest["sizes"]["blocks"][0] == element // 2 * _nbytes(store, keys.staged_block(job, 0))
        assert steps.run_embedded(store, job)
        acts[dtype] = get_tensors_and_metadata(store, keys.acts(job, "q", 1, 0))[0]
        assert {t.dtype for t in acts[dtype].values()} == {getattr(torch, dtype)}
        partial = get_tensors_and_metadata(store, keys.stats(job, 1, 0, 0))[0]
        assert {t.dtype for n, t in partial.items() if n.endswith("|H_upper")} == {torch.float32}
        download_export(store, job, tmp_path / f"out-{dtype}")
        with safe_open(str(tmp_path / f"out-{dtype}" / "model.safetensors"), "pt") as f:
            assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    # The two chains agree to bf16 rounding (the second block's input went through one block in each).
    for name, t in acts["float32"].items():
        torch.testing.assert_close(acts["bfloat16"][name].float(), t, rtol=0.05, atol=0.05)


def test_task_records_count_the_store_bytes_each_task_moved(done_job):
    """A task's record carries the bytes it read and wrote; on a folder store without a cache a stats task
    writes exactly its partial (a quantize task its group's qweights) and reads at least its partition's
    activations; status shows the totals."""
    from tlq_farm.jobs import format_status, job_status

    store, job = done_job
    manifest = get_json(store, keys.manifest(job))
    groups = get_json(store, keys.plan_groups(job))
    records = [r for r in steps.task_records(store, job) if r["kind"] in ("stats", "quantize")]
    assert records
    for r in records:
        task = plan.Task(r["kind"], block=r["block"], group=int(r["task"].split("-g")[1][:2]),
                         shard=int(r["task"].split("-s")[1]) if r["kind"] == "stats" else None)
        outs = plan.outputs(task, manifest, groups)  # a partial, or the group's qweights
        assert r["store_written_bytes"] == sum(store.commit_info(k).size for k in outs)
        shards = plan.task_shards(task, manifest, groups)
        acts = sum(store.commit_info(keys.acts(job, "q", task.block, k)).size for k in shards)
        assert r["store_read_bytes"] >= acts and r["cache_hits"] == 0
    s = job_status(store, job, io=True)
    assert s["store_io"]["written_bytes"] == sum(r["store_written_bytes"] for r in steps.task_records(store, job))
    assert [b["index"] for b in s["store_io"]["blocks"]] == list(range(manifest["n_blocks"]))
    text = format_status(s)
    assert "store: " in text and "no cached reads" in text and "block 0: " in text


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="reads Linux's /proc")
@pytest.mark.parametrize("method", ["gptq", "gptaq"])
def test_a_solve_task_peaks_within_its_estimate(tmp_path, method):
    # A solve task's own steps (bench/solve_peak.py, which measures them at 7B width) on a 64 x 4096 layer with
    # two stored partials, read as large objects are (through a file, one mapping per tensor): its peak RSS
    # stays within plan.estimate_memory + 30 %. One float64 [in, in] more (134 MB here, e.g. a float32 partial
    # converted whole while it is added to the float64 total) breaks it. Measured in a fresh process: what
    # earlier tests left in this one's heap would change what a new allocation costs. Even a fresh process's
    # heap varies (GPTAQ: 1.03 to 1.31 x over runs, one freed float32 partial kept or not), so the smaller of
    # two fresh processes counts; an extra float64 [in, in] shows in both.
    import multiprocessing

    found = []
    for attempt in range(2):
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            found.append(pool.apply(_solve_peak, (str(tmp_path / f"run-{attempt}"), method)))
        if found[-1][0] <= 1.3 * found[-1][1]:
            break
    own, estimate = min(found)
    assert own <= 1.3 * estimate, found


def _solve_peak(tmp: str, method: str) -> tuple[int, int]:
    """(peak bytes above the start, plan.estimate_memory) of a solve task's steps, in this process."""
    from pathlib import Path

    from tlq_farm.store import tensors

    torch.set_num_threads(1)
    tmp_path = Path(tmp)
    tensors.LARGE_BYTES = 2**20
    out_f, in_f, module = 64, 4096, "mlp.down_proj"
    store = LocalStore(tmp_path / "store")
    g = torch.Generator().manual_seed(3)
    gptaq = method == "gptaq"
    weight = torch.randn(out_f, in_f, generator=g)
    for p in range(2):
        A = torch.randn(in_f, 32, generator=g)
        part = {"H": A @ A.T + 10 * torch.eye(in_f), "w_sum": torch.tensor(100.0, dtype=torch.float64),
                "tokens": torch.tensor(100)}
        if gptaq:  # as a stats task stores it: the linear's W D and tr(W Hfp W^T), not D and Hfp
            D = 0.1 * torch.randn(in_f, 32, generator=g) @ A.T
            part.update(fold_cross_terms(weight, {"D": D, "Hfp": part["H"] + D + D.T}))
            del D
        put_tensors(store, keys.stats("peak", 0, 0, p), {f"{module}{steps.SEP}{k}": t for k, t in part.items()},
                    metadata={"tlq": json.dumps({"owners": {module: module}})})
        del part, A
    spec = QuantSpec(method=method, group_size=128)
    manifest = {"sizes": {"blocks": [0], "embed": 0, "head": 0, "hidden": out_f}, "shard_tokens": [100],
                "spec": {"quant": {"method": method, "importance": "uniform"}}}
    groups = {"blocks": [{"groups": [[module]], "shapes": {module: [out_f, in_f]}, "in_features": {module: in_f}}]}
    estimate = plan.estimate_memory(plan.Task("solve", block=0, group=0, module=module), manifest, groups)

    # First use pages in library code and workspaces (tens of MB): not the task's data.
    small = {"H": torch.eye(256) * 2, "w_sum": torch.tensor(1.0, dtype=torch.float64), "tokens": torch.tensor(1)}
    if gptaq:
        small.update(WD=torch.zeros(8, 256), WHfpW=torch.tensor(1.0, dtype=torch.float64))
    B.solve_partials(torch.randn(8, 256, generator=g), [small], spec)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_bytes("VmRSS")
    parts = (steps.stored_partial(*get_tensors_and_metadata(store, keys.stats("peak", 0, 0, p)), module)
             for p in range(2))
    res, counts = B.solve_partials(weight, parts, spec)
    own = _status_bytes("VmHWM") - before
    assert counts["tokens"] == 200 and torch.isfinite(res.weight).all()
    return own, estimate


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act_order", [False, True])
def test_a_stored_qweight_is_rebuilt_slab_by_slab_to_the_same_weight(tmp_path, monkeypatch, dtype, act_order):
    """apply_stored_qweight (rows rebuilt a few at a time) gives the layer exactly the weight that the whole
    QuantResult gives it: every slab boundary, an act-order g_idx, a bf16 layer."""
    from tlq_farm.quant import gptq_quantize

    g = torch.Generator().manual_seed(3)
    W = torch.randn(13, 64, generator=g) * 0.05
    X = torch.randn(256, 64, generator=g)
    res = gptq_quantize(W, (X.T @ X).double(), bits=4, group_size=16, sym=False, act_order=act_order)
    store = LocalStore(tmp_path / "store", create=True)
    key = keys.qweights("job", 0, "lin")
    put_tensors(store, key, steps.qresult_to_tensors(res), metadata={"tlq": json.dumps({"bits": 4})})
    expected = torch.nn.Linear(64, 13, bias=False).to(dtype)
    B.apply_qweight(torch.nn.ModuleDict({"lin": expected}), "lin", res)
    monkeypatch.setattr(plan, "REBUILD_WEIGHTS", 3 * 64)  # slabs of 3 rows: 13 = 3 + 3 + 3 + 3 + 1
    layer = torch.nn.Linear(64, 13, bias=False).to(dtype)
    steps.apply_stored_qweight(store, key, torch.nn.ModuleDict({"lin": layer}), "lin")
    assert torch.equal(layer.weight, expected.weight)
    assert not torch.equal(layer.weight, W.to(dtype))  # it was quantized


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_rtn_proxy_rounded_slab_by_slab_is_the_whole_linear_rounded(monkeypatch, dtype):
    from tlq_farm.quant import rtn_quantize

    g = torch.Generator().manual_seed(5)
    blk = torch.nn.ModuleDict({"a": torch.nn.Linear(48, 11), "b": torch.nn.Linear(32, 48)}).to(dtype)
    with torch.no_grad():
        for p in blk.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    spec = QuantSpec(bits=3, group_size=16, sym=False)
    monkeypatch.setattr(plan, "REBUILD_WEIGHTS", 2 * 48)  # two rows of "a" at a time (11 = 5 x 2 + 1), three of "b"
    proxy = B.rtn_proxy(blk, ["a", "b"], spec)
    for n in ("a", "b"):
        w = blk[n].weight
        whole = rtn_quantize(w.float(), bits=3, group_size=16, sym=False).weight
        assert torch.equal(proxy[n].weight, whole.to(dtype)), n
    assert torch.equal(proxy["a"].bias, blk["a"].bias)


def test_a_workers_cache_size_holds_what_a_blocks_tasks_read_again(done_job):
    """plan.cache_bytes covers every object that the embed tasks, or the tasks of any block, read or write,
    with the next block's weights read ahead (the objects' real sizes in the store), and not by much more."""
    store, job = done_job
    manifest = get_json(store, keys.manifest(job))
    groups = get_json(store, keys.plan_groups(job))
    tasks = plan.all_tasks(manifest, groups)
    need = plan.cache_bytes(manifest, groups)
    phases = [[t for t in tasks if t.kind == "embed"]]
    phases += [[t for t in tasks if t.block == b and t.tower is None and t.kind in plan.BLOCK_KINDS]
               for b in range(manifest["n_blocks"])]
    sets = []
    for phase in phases:
        assert phase
        touched = {k for t in phase for k in plan.inputs(t, manifest, groups) + plan.outputs(t, manifest, groups)
                   + plan.read_ahead(t, manifest)}
        sets.append(sum(store.commit_info(k).size for k in touched))
    assert max(sets) <= need <= 1.5 * max(sets), (sets, need)
