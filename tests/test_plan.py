"""plan.reconcile and the DAG on their own: manifests and committed-key sets in, ready tasks out."""

import pytest

from tlq_farm import plan
from tlq_farm.plan import Task
from tlq_farm.spec import JobSpec, QuantSpec
from tlq_farm.store import keys

JOB = "job-1"


def manifest(n_blocks=2, n_shards=3, method="gptq", importance="uniform", tokens=1000, vision_tokens=100):
    spec = JobSpec(model="m", calib="c", quant=QuantSpec(method=method, importance=importance), samples=2 * n_shards)
    return {"job": JOB, "spec": spec.to_dict(), "n_blocks": n_blocks, "n_samples": 2 * n_shards,
            "calibration": {"vision_tokens": vision_tokens},
            "shards": [[2 * k, 2 * k + 2] for k in range(n_shards)], "shard_tokens": [tokens] * n_shards,
            "shard_input_bytes": [1000] * n_shards, "files": ["config.json"],
            "sizes": {"embed": 10_000, "head": 5_000, "blocks": [20_000] * n_blocks, "hidden": 64}}


def groups(n_blocks=2):
    g = [["self_attn.q_proj", "self_attn.k_proj"], ["self_attn.o_proj"]]
    names = [n for grp in g for n in grp]
    return {"blocks": [{"names": names, "groups": g, "in_features": {n: 64 for n in names},
                        "shapes": {n: [64, 64] for n in names}} for _ in range(n_blocks)]}


def staged(m):
    out = {keys.staged_file(JOB, "config.json"), keys.staged_embed(JOB), keys.staged_head(JOB)}
    out |= {keys.staged_block(JOB, b) for b in range(m["n_blocks"])}
    out |= {keys.calib_shard(JOB, k) for k in range(len(m["shards"]))}
    return out


def commit(committed, m, tasks, g=None):
    for t in tasks:
        committed |= set(plan.outputs(t, m, g))
    return committed


def run_to_end(m, g, committed):
    """Commit ready tasks wave by wave; returns the waves (each a list of tasks)."""
    waves = []
    while True:
        rec = plan.reconcile(m, committed, g if keys.plan_groups(JOB) in committed else None)
        if rec.done:
            return waves
        assert rec.ready, f"stuck: missing {rec.missing}"
        waves.append(rec.ready)
        commit(committed, m, rec.ready, g)


def test_shard_ranges_pack_by_tokens_and_never_split_a_sample():
    assert plan.shard_ranges([10, 10, 10, 10], 20) == [(0, 2), (2, 4)]
    assert plan.shard_ranges([10, 30, 5], 20) == [(0, 1), (1, 2), (2, 3)]
    assert plan.shard_ranges([5, 5, 5], 100) == [(0, 3)]
    with pytest.raises(ValueError, match="empty"):
        plan.shard_ranges([], 10)


def test_fresh_job_gives_one_embed_task_per_shard():
    m = manifest()
    rec = plan.reconcile(m, staged(m))
    assert [t.name for t in rec.ready] == ["embed-s0000", "embed-s0001", "embed-s0002"]
    assert not rec.done and rec.missing == []


def test_after_all_embeds_the_groups_then_block0_group0_stats():
    m, g = manifest(), groups()
    committed = commit(staged(m), m, [Task("embed", shard=k) for k in range(3)])
    assert [t.name for t in plan.reconcile(m, committed).ready] == ["groups"]
    commit(committed, m, [Task("groups")])
    ready = plan.reconcile(m, committed, g).ready
    # Uniform weights need no task of their own: the stats tasks read the shards' token masks.
    assert [t.name for t in ready] == ["stats-b000-g00-s0000", "stats-b000-g00-s0001", "stats-b000-g00-s0002"]


def test_block_local_weights_come_first_from_their_own_tasks():
    m, g = manifest(importance="qig"), groups()
    committed = commit(staged(m), m, [Task("embed", shard=k) for k in range(3)] + [Task("groups")])
    ready = plan.reconcile(m, committed, g).ready
    assert [t.name for t in ready] == ["weights-b000-s0000", "weights-b000-s0001", "weights-b000-s0002"]
    commit(committed, m, ready)
    assert [t.name for t in plan.reconcile(m, committed, g).ready][:1] == ["stats-b000-g00-s0000"]


@pytest.mark.parametrize("importance", ["tlq", "modality"])
def test_a_gradient_pass_runs_forward_then_backward_per_block_and_shard(importance):
    m, g = manifest(n_blocks=3, n_shards=2, importance=importance), groups(3)
    committed = commit(staged(m), m, [Task("embed", shard=k) for k in range(2)] + [Task("groups")])
    waves = run_to_end(m, g, committed)
    ran = [t for w in waves for t in w]
    names = [t.name for t in ran]
    # The fp chain reaches the head's input; the backward chain walks back from the head.
    assert [t.name for t in ran if t.kind == "forward" and t.shard == 0] == [
        "forward-b000-s0000", "forward-b001-s0000", "forward-b002-s0000"]
    low = 1  # tlq scores blocks 1..n-1, modality the outputs of blocks 0..n-1 (inputs of 1..n)
    assert [t.name for t in ran if t.kind == "backward" and t.shard == 0] == [
        f"backward-b{b:03d}-s0000" for b in range(3, low - 1, -1)]
    assert names.index("importance") > max(i for i, t in enumerate(ran) if t.kind == "backward")
    assert names.index("importance") < names.index("stats-b000-g00-s0000")
    scored = {k for k in committed if "/importance/scores/" in k}
    blocks = [1, 2] if importance == "tlq" else [1, 2, 3]
    assert scored == {keys.importance_scores(JOB, b, k) for b in blocks for k in range(2)}
    # Only tlq carries the RTN chain, up to the last scored block; the lowest gradient is never stored.
    assert (keys.acts(JOB, "rtn", 2, 0) in committed) == (importance == "tlq")
    assert keys.acts(JOB, "rtn", 3, 0) not in committed and keys.grads(JOB, 1, 0) not in committed
    assert not any(t.kind == "weights" for t in ran)


def test_modality_without_vision_tokens_needs_no_gradient_pass():
    m, g = manifest(importance="modality", vision_tokens=0), groups()
    kinds = {t.kind for t in plan.all_tasks(m, g)}
    assert not kinds & {"forward", "backward", "importance", "weights"}


def test_partitions_hold_at_least_a_partial_of_activations_and_a_light_tail_joins():
    assert plan.partition_starts([10, 10, 10, 10], 10) == [0, 1, 2, 3]
    assert plan.partition_starts([10, 10, 10, 10, 10], 20) == [0, 2]   # the tail (10 < 20) joins [2, 4)
    assert plan.partition_starts([10, 10, 10, 10], 20) == [0, 2]
    assert plan.partition_starts([5, 5, 5], 1000) == [0]               # lighter than one partial: one
    assert plan.partition_starts([30, 1, 1, 30], 20) == [0, 1]
    with pytest.raises(ValueError, match="no shards"):
        plan.partition_starts([], 10)


def test_shared_inputs_share_a_partial_and_the_partition_follows_the_blocks_bytes():
    """q/k share an input: one Gram of 64^2 float32 (16 KiB) for both; o has its own: 32 KiB of partials
    per block, against 64 x 4 B of activations per token."""
    g = groups()
    g["blocks"][0]["inputs"] = [["self_attn.q_proj", "self_attn.k_proj"], ["self_attn.o_proj"]]
    q = manifest()["spec"]["quant"]
    grps, classes, cols = g["blocks"][0]["groups"], g["blocks"][0]["inputs"], g["blocks"][0]["in_features"]
    assert plan.group_owners(grps[0], classes, False) == ["self_attn.q_proj"]
    assert plan.group_owners(grps[0], classes, True) == grps[0]
    assert plan.partial_bytes(q, grps[0], classes, cols) == 4 * 64 * 64
    # 32 KiB / 256 B per token = 128 tokens per partition.
    assert plan.block_partitions([64, 64, 64, 64, 80], 64, q, grps, classes, cols) == [0, 2]
    assert plan.block_partitions([128] * 3, 64, q, grps, classes, cols) == [0, 1, 2]
    # Three owners (per-linear weights) need 1.5x the tokens. GPTAQ: the Grams and each linear's W D (q, k,
    # o: 48 KiB) and tr(W Hfp W^T) (8 B each) over two chains: 80 KiB + 24 B / 512 B = 160.05 tokens.
    shapes = g["blocks"][0]["shapes"]
    gptaq = {**q, "method": "gptaq"}
    assert plan.partial_bytes(gptaq, grps[0], classes, cols, shapes=shapes) == 4 * 64 * 64 * 3 + 16
    assert plan.block_partitions([64] * 6, 64, {**q, "importance": "vlmq"}, grps, classes, cols) == [0, 3]
    assert plan.block_partitions([160] * 6, 64, gptaq, grps, classes, cols, shapes=shapes) == [0, 2, 4]
    assert plan.block_partitions([161] * 6, 64, gptaq, grps, classes, cols, shapes=shapes) == [0, 1, 2, 3, 4, 5]


def test_a_partition_carries_at_least_the_floor_of_gram_work_the_manifest_names():
    """q/k share a 64-column Gram, o has its own: 2 x 64^2 multiply-adds a token. A floor of 200 tokens' worth
    joins the 128-token shards in twos (the bytes alone cut one partition a shard); a job staged before the
    floor (no partition_macs in its manifest) keeps the partitions it had."""
    g = groups()
    g["blocks"][0]["inputs"] = [["self_attn.q_proj", "self_attn.k_proj"], ["self_attn.o_proj"]]
    q = manifest()["spec"]["quant"]
    grps, classes, cols = g["blocks"][0]["groups"], g["blocks"][0]["inputs"], g["blocks"][0]["in_features"]
    per_token = 2 * 64 * 64
    assert plan.block_partitions([128] * 4, 64, q, grps, classes, cols) == [0, 1, 2, 3]
    assert plan.block_partitions([128] * 4, 64, q, grps, classes, cols, min_macs=200 * per_token) == [0, 2]
    assert plan.block_partitions([128] * 4, 64, q, grps, classes, cols, min_macs=200 * per_token + 1) == [0, 2]
    assert plan.block_partitions([128] * 4, 64, q, grps, classes, cols, min_macs=257 * per_token) == [0]
    m = manifest(n_shards=4, tokens=128)
    assert plan.stat_partitions(m, g, 0) == [0, 1, 2, 3] and not plan.solves_in_place(m, g, 0)
    m["partition_macs"] = 200 * per_token
    assert plan.stat_partitions(m, g, 0) == [0, 2] and not plan.solves_in_place(m, g, 0)
    m["partition_macs"] = plan.MIN_PARTITION_MACS  # what staging writes: far more than this job's 4 M
    assert plan.stat_partitions(m, g, 0) == [0] and plan.solves_in_place(m, g, 0)
    assert not any(t.kind in ("stats", "solve") for t in plan.all_tasks(m, g))


def test_a_block_of_one_partition_quantizes_each_group_in_one_task_reading_each_shard():
    m, g = manifest(tokens=100), groups()  # 25.6 KB of activations per shard, partials of 32 KB
    assert plan.stat_partitions(m, g, 0) == [0] and plan.solves_in_place(m, g, 0)
    tasks = plan.all_tasks(m, g)
    assert not any(t.kind in ("stats", "solve") for t in tasks)
    quantize = [t for t in tasks if t.kind == "quantize" and t.block == 0]
    assert [t.name for t in quantize] == ["quantize-b000-g00", "quantize-b000-g01"]
    ins = plan.inputs(quantize[0], m, g)
    assert all(keys.acts(JOB, "q", 0, k) in ins and keys.token_masks(JOB, k) in ins for k in range(3))
    assert not any("/stats/" in k for k in ins)
    assert plan.outputs(quantize[0], m, g) == [keys.qweights(JOB, 0, "self_attn.q_proj"),
                                               keys.qweights(JOB, 0, "self_attn.k_proj")]
    # The second group reads the first group's qweights; the groups are needed to know a quantize task's outputs.
    assert keys.qweights(JOB, 0, "self_attn.k_proj") in plan.inputs(quantize[1], m, g)
    with pytest.raises(ValueError, match="give the groups"):
        plan.outputs(quantize[0], m)
    assert plan.task_shards(quantize[0], m, g) == [0, 1, 2]
    committed = staged(m)
    run_to_end(m, g, committed)
    assert not any("/stats/" in k for k in committed)
    assert plan.progress_summary(m, committed, g)["modules_quantized"] == 2 * 3
    # RTN has no statistics: a solve task per linear, whatever the partitions.
    rtn = manifest(tokens=100, method="rtn")
    assert not plan.solves_in_place(rtn, g, 0)
    assert {t.kind for t in plan.all_tasks(rtn, g)} == {"embed", "groups", "solve", "export"}


def test_a_missing_shard_blocks_the_solve():
    m, g = manifest(), groups()
    committed = commit(staged(m), m, [Task("embed", shard=k) for k in range(3)] + [Task("groups")])
    commit(committed, m, [Task("stats", block=0, group=0, shard=k) for k in (0, 2)])
    ready = plan.reconcile(m, committed, g).ready
    assert [t.name for t in ready] == ["stats-b000-g00-s0001"]
    commit(committed, m, ready)
    ready = plan.reconcile(m, committed, g).ready
    assert {t.name for t in ready} == {"solve-b000-g00-self_attn.q_proj", "solve-b000-g00-self_attn.k_proj"}


def test_later_groups_wait_for_the_earlier_groups_qweights():
    m, g = manifest(), groups()
    committed = commit(staged(m), m, [Task("embed", shard=k) for k in range(3)] + [Task("groups")] + [
        Task("stats", block=0, group=0, shard=k) for k in range(3)] + [
        Task("solve", block=0, group=0, module="self_attn.q_proj")])
    ready = plan.reconcile(m, committed, g).ready
    assert [t.name for t in ready] == ["solve-b000-g00-self_attn.k_proj"]
    # In place (one partition), the next group waits for the quantize task that writes both.
    m = manifest(n_shards=1)
    committed = commit(staged(m), m, [Task("embed", shard=0), Task("groups")])
    assert [t.name for t in plan.reconcile(m, committed, g).ready] == ["quantize-b000-g00"]
    committed.add(keys.qweights(JOB, 0, "self_attn.q_proj"))
    assert [t.name for t in plan.reconcile(m, committed, g).ready] == ["quantize-b000-g00"]
    commit(committed, m, [Task("quantize", block=0, group=0)], g)
    assert [t.name for t in plan.reconcile(m, committed, g).ready] == ["quantize-b000-g01"]


def test_done_job_gives_nothing_and_the_last_step_is_export():
    m, g = manifest(), groups()
    committed = staged(m)
    waves = run_to_end(m, g, committed)
    assert [t.name for t in waves[-1]] == ["export"]
    rec = plan.reconcile(m, committed, g)
    assert rec.done and rec.ready == []
    # Every task of the plan ran exactly once, and the last block is not propagated (nothing reads it).
    ran = [t for w in waves for t in w]
    assert len(ran) == len(set(ran)) == len(plan.all_tasks(m, g))
    assert not any(t.kind == "propagate" and t.block == 1 for t in ran)


def test_lost_intermediate_is_recomputed_only_when_still_needed():
    m, g = manifest(), groups()
    committed = staged(m)
    run_to_end(m, g, committed)
    committed.discard(keys.export_index(JOB))
    committed.discard(keys.stats(JOB, 0, 0, 1))  # read by a committed solve: not needed again
    assert [t.name for t in plan.reconcile(m, committed, g).ready] == ["export"]
    committed.discard(keys.qweights(JOB, 1, "self_attn.o_proj"))
    committed.discard(keys.stats(JOB, 1, 1, 2))
    assert [t.name for t in plan.reconcile(m, committed, g).ready] == ["stats-b001-g01-s0002"]


def test_lost_staged_input_is_reported_missing():
    m = manifest()
    committed = staged(m) - {keys.calib_shard(JOB, 1)}
    rec = plan.reconcile(m, committed)
    assert [t.name for t in rec.ready] == ["embed-s0000", "embed-s0002"]
    assert rec.missing == [keys.calib_shard(JOB, 1)]


@pytest.mark.parametrize("method,importance,extra", [("gptaq", "uniform", {"forward"}), ("gptq", "vlmq", {"forward", "weights"}),
                                                     ("gptq", "tlq", {"forward", "backward", "importance"}),
                                                     ("gptq", "qig", {"weights"}), ("rtn", "uniform", set())])
def test_plans_of_every_method_run_to_the_end(method, importance, extra):
    m, g = manifest(method=method, importance=importance), groups()
    committed = staged(m)
    waves = run_to_end(m, g, committed)
    kinds = {t.kind for w in waves for t in w}
    if method == "rtn":
        assert kinds == {"embed", "groups", "solve", "export"}
    else:
        assert kinds == {"embed", "groups", "stats", "solve", "propagate", "export"} | extra
    fp = method == "gptaq" or importance in ("vlmq", "tlq")
    assert (keys.acts(JOB, "fp", 1, 0) in committed) == fp


def test_task_ids_are_deterministic_and_round_trip():
    t = Task("solve", block=3, group=1, module="mlp.down_proj")
    assert t.task_id(JOB) == "job-1.solve-b003-g01-mlp.down_proj"
    assert Task.from_dict(t.to_dict()) == t
    keys.task_log(JOB, t.name)  # a valid key name
    with pytest.raises(ValueError, match="unknown task kind"):
        Task.from_dict({"kind": "bake"})


def test_memory_classes_route_to_the_smallest_fitting_class():
    assert plan.memory_class(1) == 2**20
    assert plan.memory_class(2**20 + 1) == 4 * 2**20
    assert plan.worker_class(5 * 2**20) == 4 * 2**20
    assert plan.queue_name(plan.memory_class(3 * 2**30)) == "tlq.mem-4g"
    assert plan.classes_up_to(4 * 2**20) == [2**20, 4 * 2**20]
    m, g = manifest(), groups()
    export = plan.estimate_memory(Task("export"), m, g)
    solve = plan.estimate_memory(Task("solve", block=0, group=0, module="self_attn.q_proj"), m, g)
    # One part at a time: a chunk of the prefix beside its spill write, or a block's staged weights with one
    # linear's codes, dequantized weight, their temporaries and compressed form (40 bytes a weight).
    assert export == max(2 * 10_000, 20_000 + 32 * 64 * 64)
    # Adding a partial, the largest moment here: q's float64 H beside the small stored partial of its group
    # held whole (q and k: two float32 Grams, as bytes and tensors), beside the weight as read. The solve:
    # the factor in H's storage and 16 bytes per weight (work copy, codes, dequantized weight).
    assert solve == max(20_000, 4 * 64 * 64 + max(8 * 64 * 64 + 3 * (2 * 4 * 64 * 64),  # adding a partial
                                                  8 * 64 * 64 + 16 * 64 * 64))         # factor and loop


def test_read_ahead_names_the_staged_block_a_tasks_chain_reads_next():
    m = dict(manifest(n_blocks=3), n_vision_blocks=2)
    block = lambda b, t=None: [keys.staged_block(JOB, b, t)]  # noqa: E731
    expected = {
        Task("embed", shard=0): block(0), Task("reembed", shard=1): block(0),
        Task("forward", block=0, shard=0): block(1), Task("forward", block=2, shard=0): [],
        Task("backward", block=3, shard=0): block(2), Task("backward", block=1, shard=0): block(0),
        Task("backward", block=0, shard=0): [],
        Task("weights", block=1, shard=2): block(2),
        Task("quantize", block=0, group=1): block(1), Task("stats", block=1, group=0, shard=0): block(2),
        Task("solve", block=1, group=0, module="self_attn.q_proj"): block(2),
        Task("propagate", block=1, shard=0): block(2), Task("propagate", block=2, shard=0): [],
        Task("quantize", block=0, group=0, tower="vision"): block(1, "vision"),
        Task("propagate", block=1, shard=0, tower="vision"): [],
        Task("groups"): [], Task("importance"): [], Task("export"): [],
    }
    assert {t: plan.read_ahead(t, m) for t in expected} == expected
    # Each is a block some task of the job reads: nothing is downloaded that the job does not need.
    g = groups(3)
    read = {k for t in plan.all_tasks(m, g) for k in plan.inputs(t, m, g)}
    assert {k for t in plan.all_tasks(m, g) for k in plan.read_ahead(t, m)} <= read
