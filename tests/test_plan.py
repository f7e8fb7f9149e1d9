"""plan.reconcile and the DAG on their own: manifests and committed-key sets in, ready tasks out."""

import pytest

from tlq_farm import plan
from tlq_farm.plan import Task
from tlq_farm.spec import JobSpec, QuantSpec
from tlq_farm.store import keys

JOB = "job-1"


def manifest(n_blocks=2, n_shards=3, method="gptq", importance="uniform"):
    spec = JobSpec(model="m", calib="c", quant=QuantSpec(method=method, importance=importance), samples=2 * n_shards)
    return {"job": JOB, "spec": spec.to_dict(), "n_blocks": n_blocks, "n_samples": 2 * n_shards,
            "shards": [[2 * k, 2 * k + 2] for k in range(n_shards)], "shard_tokens": [100] * n_shards,
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
    out |= {keys.calib_sample(JOB, i) for i in range(m["n_samples"])}
    return out


def commit(committed, m, tasks):
    for t in tasks:
        committed |= set(plan.outputs(t, m))
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
        commit(committed, m, rec.ready)


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


def test_after_all_embeds_the_groups_then_block0_weights_then_group0_stats():
    m, g = manifest(), groups()
    committed = commit(staged(m), m, [Task("embed", shard=k) for k in range(3)])
    assert [t.name for t in plan.reconcile(m, committed).ready] == ["groups"]
    commit(committed, m, [Task("groups")])
    ready = plan.reconcile(m, committed, g).ready
    assert [t.name for t in ready] == ["weights-b000-s0000", "weights-b000-s0001", "weights-b000-s0002"]
    commit(committed, m, ready)
    ready = plan.reconcile(m, committed, g).ready
    assert [t.name for t in ready] == ["stats-b000-g00-s0000", "stats-b000-g00-s0001", "stats-b000-g00-s0002"]


def test_a_missing_shard_blocks_the_solve():
    m, g = manifest(), groups()
    committed = commit(staged(m), m, [Task("embed", shard=k) for k in range(3)] + [Task("groups")])
    commit(committed, m, [Task("weights", block=0, shard=k) for k in range(3)])
    commit(committed, m, [Task("stats", block=0, group=0, shard=k) for k in (0, 2)])
    ready = plan.reconcile(m, committed, g).ready
    assert [t.name for t in ready] == ["stats-b000-g00-s0001"]
    commit(committed, m, ready)
    ready = plan.reconcile(m, committed, g).ready
    assert {t.name for t in ready} == {"solve-b000-g00-self_attn.q_proj", "solve-b000-g00-self_attn.k_proj"}


def test_later_groups_wait_for_the_earlier_groups_qweights():
    m, g = manifest(n_shards=1), groups()
    committed = commit(staged(m), m, [Task("embed", shard=0), Task("groups"), Task("weights", block=0, shard=0),
                                      Task("stats", block=0, group=0, shard=0),
                                      Task("solve", block=0, group=0, module="self_attn.q_proj")])
    ready = plan.reconcile(m, committed, g).ready
    assert [t.name for t in ready] == ["solve-b000-g00-self_attn.k_proj"]


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
    committed = staged(m) - {keys.calib_sample(JOB, 3)}
    rec = plan.reconcile(m, committed)
    assert [t.name for t in rec.ready] == ["embed-s0000", "embed-s0002"]
    assert rec.missing == [keys.calib_sample(JOB, 3)]


@pytest.mark.parametrize("method,importance,extra", [("gptaq", "uniform", set()), ("gptq", "vlmq", set()),
                                                     ("gptq", "tlq", {"importance"}), ("rtn", "uniform", set())])
def test_plans_of_every_method_run_to_the_end(method, importance, extra):
    m, g = manifest(method=method, importance=importance), groups()
    committed = staged(m)
    waves = run_to_end(m, g, committed)
    kinds = {t.kind for w in waves for t in w}
    if method == "rtn":
        assert kinds == {"embed", "groups", "solve", "export"}
    else:
        assert extra <= kinds and {"weights", "stats", "solve", "propagate"} <= kinds
    fp = method == "gptaq" or importance == "vlmq"
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
    assert export == 3 * (10_000 + 5_000 + 40_000)
    assert solve == 4 * 8 * 64 * 64 + 16 * 64 * 64
