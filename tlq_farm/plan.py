"""The job DAG and the reconciler: which tasks are ready and not yet committed.

A job is a fixed set of tasks, each with input keys and output keys in the store:

    embed(k)            calib samples of shard k + staged prefix -> kwargs(k), acts/q/block-000/shard-k
    groups              acts of shard 0 + staged blocks -> the linears of every block and their
                        true-sequential groups (the rest of the DAG is known once this is committed)
    importance          (modality, tlq) one global forward + backward pass over every block and shard
    weights(b, k)       token weights of block b on shard k
    stats(b, g, k)      partial statistics of group g of block b over the partition of shards that starts
                        at shard k (stat_partitions: fixed by shapes and token counts, not by workers)
    solve(b, g, m)      quantized weights of module m (group g of block b), from every partition's stats
    propagate(b, k)     quantized block b on shard k -> acts/q/block-(b+1)/shard-k (and the fp chain)
    export              every qweight -> the checkpoint

A task is committed when every output key has a commit marker. `reconcile` is pure: from the manifest, the
committed keys and the groups it returns the tasks that are needed for the export, not committed, and
whose inputs are all committed. Shards are fixed by token count (`shard_ranges`), never by the workers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .store import keys

GLOBAL_IMPORTANCE = ("modality", "tlq")
FP_CHAIN_IMPORTANCE = ("vlmq",)
# Strategies whose token weights differ per linear: linears sharing an input do not share a Gram then.
PER_MODULE_IMPORTANCE = ("vlmq",)
# Bytes per element of stored activations and of partial statistics (float32 running sums).
ACT_BYTES = 4
SUM_BYTES = 4
# The export hands the staged prefix and head on in parts of at least this many float32 bytes.
EXPORT_CHUNK_BYTES = 2**28
KINDS = ("embed", "groups", "importance", "weights", "stats", "solve", "propagate", "export")

# Memory classes: budgets of 4^k MiB, from 1 MiB to 1 TiB. A worker listens on every class up to its own.
MEMORY_CLASSES = tuple(4**k * 2**20 for k in range(11))


# ----------------------------------------------------------------------------------------------- shards

def shard_ranges(token_counts: list[int], shard_tokens: int) -> list[tuple[int, int]]:
    """Split samples (in order) into shards of at most `shard_tokens` tokens -> [(start, end), ...].

    A sample longer than shard_tokens gets a shard of its own; every shard holds at least one sample.
    """
    if shard_tokens < 1:
        raise ValueError("shard_tokens must be positive")
    if not token_counts:
        raise ValueError("no calibration samples to shard: the calibration set is empty")
    ranges: list[tuple[int, int]] = []
    start, used = 0, 0
    for i, n in enumerate(token_counts):
        if i > start and used + n > shard_tokens:
            ranges.append((start, i))
            start, used = i, 0
        used += n
    ranges.append((start, len(token_counts)))
    return ranges


# ----------------------------------------------------------------------------------------------- partitions

def partition_starts(shard_bytes: list[int], partial_bytes: int) -> list[int]:
    """First shard of each statistics partition: consecutive shards, each partition holding at least
    `partial_bytes` of activations (a partition's partial then never outweighs the activations it sums);
    a lighter tail joins the partition before it. One partition when the whole job is lighter."""
    if not shard_bytes:
        raise ValueError("no shards to partition")
    starts, acc = [0], 0
    for k, n in enumerate(shard_bytes):
        if acc >= partial_bytes:
            starts.append(k)
            acc = 0
        acc += n
    if len(starts) > 1 and acc < partial_bytes:
        starts.pop()
    return starts


def group_owners(members: list[str], classes: list[list[str]] | None, per_module: bool) -> list[str]:
    """The linears of a group that carry a partial of their own: one per shared input (q/k/v and gate/up
    share theirs; `classes` lists linears fed the same tensor), every linear when token weights differ per
    linear (`per_module`)."""
    if per_module or not classes:
        return list(members)
    first = {n: c[0] for c in classes for n in c}
    owners: list[str] = []
    for n in members:
        o = first.get(n, n)
        o = o if o in members else n
        if o not in owners:
            owners.append(o)
    return owners


def block_partitions(shard_tokens: list[int], hidden: int, quant: dict, block_groups: list[list[str]],
                     classes: list[list[str]] | None, in_features: dict[str, int],
                     partition_tokens: int = 0) -> list[int]:
    """First shard of each statistics partition of one block, shared by all its true-sequential groups (see
    partition_starts): a partition holds at least the bytes of the block's partials (every group's, per
    owner H and for GPTAQ also D and Hfp, float32 [in, in]) in the activations a stats task reads (the q
    chain's, and the fp chain's for GPTAQ). partition_tokens > 0: at least that many tokens instead."""
    if partition_tokens > 0:
        return partition_starts(shard_tokens, partition_tokens)
    per_token = hidden * ACT_BYTES * (2 if quant["method"] == "gptaq" else 1)
    partials = sum(partial_bytes(quant, members, classes, in_features) for members in block_groups)
    return partition_starts([n * per_token for n in shard_tokens], partials)


def stat_partitions(manifest: dict, groups: dict, b: int) -> list[int]:
    """First shard of each statistics partition of block b: fixed by the job's shapes and token counts,
    never by the workers."""
    block = groups["blocks"][b]
    return block_partitions(manifest["shard_tokens"], manifest["sizes"]["hidden"], manifest["spec"]["quant"],
                            block["groups"], block.get("inputs"), block["in_features"],
                            manifest["spec"].get("partition_tokens", 0))


def partial_bytes(quant: dict, members: list[str], classes: list[list[str]] | None,
                  in_features: dict[str, int], element_bytes: int = SUM_BYTES) -> int:
    """Bytes of one partial of a group: per owner, H (+ D and Hfp for GPTAQ) as [in, in]."""
    grams = 3 if quant["method"] == "gptaq" else 1
    owners = group_owners(members, classes, quant["importance"] in PER_MODULE_IMPORTANCE)
    return sum(grams * element_bytes * in_features[o] ** 2 for o in owners)


def partition_shards(starts: list[int], n_shards: int, start: int) -> range:
    """The shards of the partition that begins at shard `start`."""
    i = starts.index(start)
    return range(start, starts[i + 1] if i + 1 < len(starts) else n_shards)


# ----------------------------------------------------------------------------------------------- tasks

@dataclass(frozen=True, order=True)
class Task:
    """One unit of work; fields that do not apply to a kind are None."""

    kind: str
    block: int | None = None
    group: int | None = None
    shard: int | None = None
    module: str | None = None

    @property
    def name(self) -> str:
        """Deterministic name, unique within a job (also the store's task-log name)."""
        parts = [self.kind]
        if self.block is not None:
            parts.append(f"b{self.block:03d}")
        if self.group is not None:
            parts.append(f"g{self.group:02d}")
        if self.shard is not None:
            parts.append(f"s{self.shard:04d}")
        if self.module is not None:
            parts.append(self.module)
        return "-".join(parts)

    def task_id(self, job: str) -> str:
        """The id a queue sees: the same task of the same job always has the same id."""
        return f"{job}.{self.name}"

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict) -> "Task":
        if d.get("kind") not in KINDS:
            raise ValueError(f"unknown task kind {d.get('kind')!r}: expected one of {', '.join(KINDS)}")
        return cls(**d)


def needs_fp_chain(manifest: dict) -> bool:
    q = manifest["spec"]["quant"]
    return q["method"] == "gptaq" or q["importance"] in FP_CHAIN_IMPORTANCE


def needs_global_importance(manifest: dict) -> bool:
    q = manifest["spec"]["quant"]
    return q["method"] != "rtn" and q["importance"] in GLOBAL_IMPORTANCE


def _chain_in(job: str, chain: str, block: int, shard: int, fp: bool) -> list[str]:
    """Input activations of a block; block 0's fp chain is the q chain (nothing is quantized before it)."""
    if chain == "fp" and (block == 0 or not fp):
        return []
    return [keys.acts(job, chain, block, shard)]


def inputs(task: Task, manifest: dict, groups: dict | None) -> list[str]:
    """Keys a task reads (all must be committed before it runs)."""
    job, n_shards = manifest["job"], len(manifest["shards"])
    fp = needs_fp_chain(manifest)
    k, b = task.shard, task.block
    staged = [keys.staged_file(job, "config.json")]
    if task.kind == "embed":
        start, end = manifest["shards"][k]
        return staged + [keys.staged_embed(job)] + [keys.calib_sample(job, i) for i in range(start, end)]
    if task.kind == "groups":
        return staged + [keys.acts(job, "q", 0, 0), keys.block_kwargs(job, 0)] + [
            keys.staged_block(job, i) for i in range(manifest["n_blocks"])]
    if task.kind == "importance":
        return staged + [keys.staged_head(job), keys.plan_groups(job)] + [
            keys.staged_block(job, i) for i in range(manifest["n_blocks"])] + [
            x for s in range(n_shards) for x in (keys.acts(job, "q", 0, s), keys.block_kwargs(job, s))] + [
            keys.calib_sample(job, i) for i in range(manifest["n_samples"])]
    if task.kind == "weights":
        start, end = manifest["shards"][k]
        extra = [keys.importance_state(job)] if needs_global_importance(manifest) else []
        return staged + extra + [keys.plan_groups(job), keys.staged_block(job, b), keys.block_kwargs(job, k),
                                 keys.acts(job, "q", b, k)] + _chain_in(job, "fp", b, k, fp) + [
            keys.calib_sample(job, i) for i in range(start, end)]
    if task.kind == "stats":
        earlier = [keys.qweights(job, b, m) for g in range(task.group) for m in groups["blocks"][b]["groups"][g]]
        gptaq = manifest["spec"]["quant"]["method"] == "gptaq"
        shards = partition_shards(stat_partitions(manifest, groups, b), n_shards, k)
        return staged + [keys.plan_groups(job), keys.staged_block(job, b)] + [
            x for s in shards for x in [keys.block_kwargs(job, s), keys.token_weights(job, b, s),
                                        keys.acts(job, "q", b, s)] + (_chain_in(job, "fp", b, s, fp) if gptaq else [])
        ] + earlier
    if task.kind == "solve":
        if manifest["spec"]["quant"]["method"] == "rtn":
            return [keys.plan_groups(job), keys.staged_block(job, b)]
        return [keys.plan_groups(job), keys.staged_block(job, b)] + [
            keys.stats(job, b, task.group, s) for s in stat_partitions(manifest, groups, b)]
    if task.kind == "propagate":
        return staged + [keys.plan_groups(job), keys.staged_block(job, b), keys.block_kwargs(job, k),
                         keys.acts(job, "q", b, k)] + _chain_in(job, "fp", b, k, fp) + [
            keys.qweights(job, b, m) for m in groups["blocks"][b]["names"]]
    if task.kind == "export":
        return staged + [keys.staged_embed(job), keys.staged_head(job), keys.plan_groups(job)] + [
            keys.staged_block(job, i) for i in range(manifest["n_blocks"])] + [
            keys.qweights(job, i, m) for i in range(manifest["n_blocks"]) for m in groups["blocks"][i]["names"]] + [
            keys.staged_file(job, f) for f in manifest["files"]]
    raise ValueError(f"unknown task kind {task.kind!r}")


def outputs(task: Task, manifest: dict) -> list[str]:
    """Keys a task writes; its commit is the commit of all of them."""
    job = manifest["job"]
    k, b = task.shard, task.block
    if task.kind == "embed":
        return [keys.block_kwargs(job, k), keys.acts(job, "q", 0, k)]
    if task.kind == "groups":
        return [keys.plan_groups(job)]
    if task.kind == "importance":
        return [keys.importance_state(job)]
    if task.kind == "weights":
        return [keys.token_weights(job, b, k)]
    if task.kind == "stats":
        return [keys.stats(job, b, task.group, k)]
    if task.kind == "solve":
        return [keys.qweights(job, b, task.module)]
    if task.kind == "propagate":
        out = [keys.acts(job, "q", b + 1, k)]
        return out + ([keys.acts(job, "fp", b + 1, k)] if needs_fp_chain(manifest) else [])
    if task.kind == "export":
        return [keys.export_index(job)]
    raise ValueError(f"unknown task kind {task.kind!r}")


def all_tasks(manifest: dict, groups: dict | None) -> list[Task]:
    """Every task of the job in a topological order; before `groups` is known, only embed and groups."""
    n_shards, n_blocks = len(manifest["shards"]), manifest["n_blocks"]
    tasks = [Task("embed", shard=k) for k in range(n_shards)] + [Task("groups")]
    if groups is None:
        return tasks
    rtn = manifest["spec"]["quant"]["method"] == "rtn"
    if needs_global_importance(manifest):
        tasks.append(Task("importance"))
    for b in range(n_blocks):
        block_groups = groups["blocks"][b]["groups"]
        if rtn:
            tasks += [Task("solve", block=b, group=0, module=m) for m in groups["blocks"][b]["names"]]
            continue
        tasks += [Task("weights", block=b, shard=k) for k in range(n_shards)]
        for g, members in enumerate(block_groups):
            tasks += [Task("stats", block=b, group=g, shard=k) for k in stat_partitions(manifest, groups, b)]
            tasks += [Task("solve", block=b, group=g, module=m) for m in members]
        if b < n_blocks - 1:
            tasks += [Task("propagate", block=b, shard=k) for k in range(n_shards)]
    tasks.append(Task("export"))
    return tasks


@dataclass
class Reconciliation:
    """What a job needs next: ready tasks (in plan order), whether the export is committed, and inputs that
    are missing with no task to produce them (staged objects lost: the job must be staged again)."""

    ready: list[Task]
    done: bool
    missing: list[str]
    needed: int


def reconcile(manifest: dict, committed: set[str], groups: dict | None = None) -> Reconciliation:
    """The tasks that are needed for the export, not committed, and whose inputs are all committed. Pure."""
    tasks = all_tasks(manifest, groups)
    producer: dict[str, Task] = {}
    for t in tasks:
        for key in outputs(t, manifest):
            producer[key] = t

    def is_done(t: Task) -> bool:
        return all(key in committed for key in outputs(t, manifest))

    # Walk back from the export (or from the groups task while the plan is still partial): a task is needed
    # when it is not committed and a needed task reads one of its outputs. Done work upstream is not redone.
    final = tasks[-1] if groups is not None else None
    if final is not None and is_done(final):
        return Reconciliation([], True, [], 0)
    roots = [final] if final is not None else [t for t in tasks if not is_done(t)]
    needed: set[Task] = set()
    missing: set[str] = set()
    stack = [t for t in roots if not is_done(t)]
    while stack:
        t = stack.pop()
        if t in needed:
            continue
        needed.add(t)
        for key in inputs(t, manifest, groups):
            if key in committed:
                continue
            p = producer.get(key)
            if p is None:
                missing.add(key)
            elif p not in needed:
                stack.append(p)
    ready = [t for t in tasks if t in needed and all(k in committed for k in inputs(t, manifest, groups))]
    return Reconciliation(ready, False, sorted(missing), len(needed))


# ----------------------------------------------------------------------------------------------- memory

def memory_class(nbytes: float) -> int:
    """The smallest memory class (bytes) that holds `nbytes`; the largest class when nothing does."""
    for c in MEMORY_CLASSES:
        if nbytes <= c:
            return c
    return MEMORY_CLASSES[-1]


def worker_class(capacity_bytes: float) -> int:
    """The largest memory class a worker with `capacity_bytes` can serve (the smallest one at least)."""
    fitting = [c for c in MEMORY_CLASSES if c <= capacity_bytes]
    return fitting[-1] if fitting else MEMORY_CLASSES[0]


def class_name(nbytes: int) -> str:
    """'1m', '4m', ... '256g', '1t'."""
    for unit, size in (("t", 2**40), ("g", 2**30), ("m", 2**20)):
        if nbytes >= size:
            return f"{nbytes // size}{unit}"
    return f"{nbytes}b"


def queue_name(cls: int) -> str:
    return f"tlq.mem-{class_name(cls)}"


def classes_up_to(cls: int) -> list[int]:
    return [c for c in MEMORY_CLASSES if c <= cls]


def estimate_memory(task: Task, manifest: dict, groups: dict | None) -> int:
    """Peak bytes a task adds to its worker process (beyond what the process held when the task began:
    libraries, the job's cached context): block weights, statistics, shard activations, solver work."""
    sizes = manifest["sizes"]
    block = max(sizes["blocks"]) if sizes["blocks"] else 0
    model = sizes["embed"] + sizes["head"] + sum(sizes["blocks"])
    shard_acts = [n * sizes["hidden"] * 4 for n in manifest["shard_tokens"]]
    acts = shard_acts[task.shard] if task.shard is not None else max(shard_acts)
    all_acts = sum(shard_acts)

    quant = manifest["spec"]["quant"]

    def partial(members: list[str], element_bytes: int = SUM_BYTES) -> int:
        blk = groups["blocks"][task.block] if groups else {}
        cols = {m: blk.get("in_features", {}).get(m, sizes["hidden"]) for m in members}
        return partial_bytes(quant, members, blk.get("inputs"), cols, element_bytes)

    if task.kind == "embed":
        # The prefix only (blocks and head on the meta device), filled one tensor at a time; the head's
        # weights while the model is built.
        return int(sizes["embed"] + sizes["head"] + manifest["shard_input_bytes"][task.shard] + 4 * acts)
    if task.kind == "groups":
        return int(2.5 * block + 4 * acts)
    if task.kind == "importance":
        # The fp chain of every block stays alive for the backward chain, plus an RTN proxy chain.
        return int(model + 3 * manifest["n_blocks"] * all_acts)
    if task.kind == "weights":
        return int(1.5 * block + 12 * acts)
    from .store.tensors import LARGE_BYTES

    def held(nbytes: int) -> int:
        # A stored object in memory: a large one is read and written through a file (its tensors only),
        # a small one beside its bytes.
        return nbytes if nbytes >= LARGE_BYTES else 3 * nbytes

    gptaq = quant["method"] == "gptaq"
    if task.kind == "stats":
        # The block (with the earlier groups' qweights), one shard of each chain alive at a time, the
        # running sums while they are written.
        members = groups["blocks"][task.block]["groups"][task.group] if groups else []
        if groups:
            shards = partition_shards(stat_partitions(manifest, groups, task.block),
                                      len(manifest["shards"]), task.shard)
            acts = max(shard_acts[k] for k in shards)
        return int(2 * block + 4 * acts * (2 if gptaq else 1) + held(partial(members)))
    if task.kind == "solve":
        # The weight in float32 beside the larger of two moments (bench/solve_peak.py measures them):
        # - the reduction: the float64 total of H while a partial's float32 Gram is added to it (a large stored
        #   partial is read one tensor at a time, each freed once added; a small one is held whole), and for
        #   GPTAQ W in float64 and the running W D, [out, in] each, and a float64 [in, 1024] slab of D or Hfp;
        # - the solve: the factorisation in H's own storage, the float64 factor then its float32 half, and
        #   [out, in] terms: plain GPTQ its work copy, codes and dequantized weight (16 bytes a weight); GPTAQ W
        #   and W D in float64 and the target's two triangular products (32 bytes a weight).
        out_in = groups["blocks"][task.block]["shapes"][task.module] if groups else [sizes["hidden"]] * 2
        members = groups["blocks"][task.block]["groups"][task.group] if groups else [task.module]
        cols, params = out_in[1], out_in[0] * out_in[1]
        stored = partial(members)
        read = held(stored) if stored < LARGE_BYTES else SUM_BYTES * cols ** 2
        reduce_peak = 8 * cols ** 2 + read + ((16 * params + 8 * 1024 * (cols + out_in[0])) if gptaq else 0)
        solve_peak = 8 * cols ** 2 + (32 if gptaq else 16) * params
        return int(max(block, 4 * params + max(reduce_peak, solve_peak)))
    if task.kind == "propagate":
        # The staged block as read, the float32 block, one linear's rebuilt quantized weight at a time.
        return int(3 * block + 6 * acts)
    if task.kind == "export":
        # One part at a time: the staged prefix or head, handed on in chunks of up to 256 MiB, or a block
        # with its qweights: its float weights, the rebuilt quantized weights and codes, their compressed
        # form, and the spill write.
        outer = max(sizes["embed"], sizes["head"])
        return int(outer + 4 * max(block, min(EXPORT_CHUNK_BYTES, outer)))
    raise ValueError(f"unknown task kind {task.kind!r}")


def eta_seconds(done: int, total: int, elapsed_s: float) -> float | None:
    """Remaining time at the mean pace so far (None before anything is done)."""
    if done <= 0 or total <= done:
        return None if done <= 0 else 0.0
    return elapsed_s * (total - done) / done


def progress_summary(manifest: dict, committed: set[str], groups: dict | None) -> dict:
    """Counts for `status`: tasks done / total per kind and the block the quantized chain has reached."""
    tasks = all_tasks(manifest, groups)
    per_kind: dict[str, list[int]] = {}
    for t in tasks:
        c = per_kind.setdefault(t.kind, [0, 0])
        c[1] += 1
        c[0] += all(k in committed for k in outputs(t, manifest))
    job = manifest["job"]
    reached = 0
    for b in range(manifest["n_blocks"]):
        if all(keys.acts(job, "q", b, k) in committed for k in range(len(manifest["shards"]))):
            reached = b
    qweights_done = sum(1 for t in tasks if t.kind == "solve" and keys.qweights(job, t.block, t.module) in committed)
    return {"tasks": per_kind, "done": sum(c[0] for c in per_kind.values()),
            "total": sum(c[1] for c in per_kind.values()), "plan_complete": groups is not None,
            "block": reached, "blocks": manifest["n_blocks"], "shards": len(manifest["shards"]),
            "modules_quantized": qweights_done}
