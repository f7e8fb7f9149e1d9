"""The job DAG and the reconciler: which tasks are ready and not yet committed.

A job is a fixed set of tasks, each with input keys and output keys in the store:

    embed(k)            calib samples of shard k + staged prefix -> kwargs(k), token masks(k),
                        acts/q/block-000/shard-k
    groups              acts of shard 0 + staged blocks -> the linears of every block and their
                        true-sequential groups (the rest of the DAG is known once this is committed)
    forward(b, k)       the full-precision block b on shard k -> acts/fp/block-(b+1)/shard-k (and, for tlq,
                        an RTN copy of it on the RTN chain): the fp chain, ahead of the quantized one
    backward(b, k)      (modality, tlq) dL/d(input of block b) on shard k from the gradient at its output
                        (b = n_blocks: the head's) -> grads, and the tokens' scores of the strategy
    importance          (modality, tlq) every shard's scores -> the token weights' global state
    weights(b, k)       (vlmq, qig) token weights of block b on shard k, from the block itself
    stats(b, g, k)      partial statistics of group g of block b over the partition of shards that starts
                        at shard k (stat_partitions: fixed by shapes and token counts, not by workers)
    solve(b, g, m)      quantized weights of module m (group g of block b), from every partition's stats
    quantize(b, g)      where block b's statistics take one partition: group g's statistics over every shard
                        and its linears' solves in one task -> their quantized weights (the sums never go
                        to the store: no partial to write, read back and reduce)
    propagate(b, k)     quantized block b on shard k -> acts/q/block-(b+1)/shard-k
    export              every qweight -> the checkpoint

A task is committed when every output key has a commit marker. `reconcile` is pure: from the manifest, the
committed keys and the groups it returns the tasks that are needed for the export, not committed, and
whose inputs are all committed. Shards are fixed by token count (`shard_ranges`), never by the workers.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from .spec import parse_size
from .store import keys

# Strategies whose token weights come from a global gradient pass (forward / backward / importance tasks),
# and those that need each block itself (a weights task per block and shard).
GLOBAL_IMPORTANCE = ("modality", "tlq")
LOCAL_IMPORTANCE = ("vlmq", "qig")
FP_CHAIN_IMPORTANCE = ("vlmq",)
# tlq scores tokens against a chain through round-to-nearest copies of the blocks.
RTN_CHAIN_IMPORTANCE = ("tlq",)
# Strategies whose token weights differ per linear: linears sharing an input do not share a Gram then.
PER_MODULE_IMPORTANCE = ("vlmq",)
# Bytes per element of partial statistics (float32 running sums, whatever the compute dtype).
SUM_BYTES = 4
# What the prefix wrote per shard and every block reads (its kwargs, token masks), kept decoded in a process's
# host memory between tasks, at most. Qwen2-VL-7B: 8 MiB of float32 position embeddings per shard of 8192
# tokens, so all 32 shards of 128 x 2048 tokens.
PREFIX_CACHE_BYTES = parse_size(os.environ.get("TLQ_PREFIX_CACHE_BYTES", "256m"))
# Submodule outputs a process keeps from one forward of a block to the next (tlq_farm.reuse), at most.
REUSE_BYTES = parse_size(os.environ.get("TLQ_REUSE_BYTES", "1g"))
# Weights of one linear rounded or rebuilt at a time (steps.apply_stored_qweight, block.rtn_proxy), and what
# each costs then with its codes and temporaries (int8 and int32 codes, float32 weight, products).
REBUILD_WEIGHTS = 2**24
REBUILD_BYTES_PER_WEIGHT = 17
# Multiply-adds of the Grams that one statistics partition computes, at least: a partition with less work (a
# fraction of a second of one CPU core) does not pay for its own tasks, its partial's round trip through the
# store and a separate solve, so a small model takes one partition per block (a 7B model does by its bytes).
# Staging writes it into the manifest (`partition_macs`): a job keeps the partitions it was staged with.
MIN_PARTITION_MACS = 2**33
# The export hands the staged prefix and head on in parts of at least this many float32 bytes.
EXPORT_CHUNK_BYTES = 2**28
KINDS = ("embed", "groups", "reembed", "forward", "backward", "importance", "weights", "stats", "solve", "quantize",
         "propagate", "export")

# The per-block kinds of either tower (_block_tasks_io).
BLOCK_KINDS = ("forward", "stats", "solve", "quantize", "propagate")

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


def product_cross_terms(quant: dict, members: list[str], classes: list[list[str]] | None,
                        shapes: dict[str, list[int]] | None) -> list[str]:
    """GPTAQ linears of a group whose W D and tr(W Hfp W^T) are summed token by token from products with their
    own weight (3 out in multiply-adds a token) rather than folded from the [in, in] sums D and Hfp (1.5 in^2):
    those fed an input of their own with out <= in / 2 (at equality the same flops, and an [out, in] sum held
    instead of two [in, in] ones), such as down_proj (at Qwen2-VL-7B 204 M against 548 M a
    token, and two float32 [in, in] sums of 1.4 GB each not held). Fixed by the shapes, never by the workers."""
    if quant["method"] != "gptaq" or not shapes:
        return []
    per_module = quant["importance"] in PER_MODULE_IMPORTANCE
    shared = set() if per_module else {n for c in classes or [] if len([m for m in c if m in members]) > 1
                                       for n in c}
    return [m for m in members if m not in shared and m in shapes and 2 * shapes[m][0] <= shapes[m][1]]


_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}


def act_bytes(manifest: dict) -> int:
    """Bytes per element of stored activations: the job's compute dtype."""
    return _DTYPE_BYTES.get(manifest["spec"].get("dtype", "float32"), 4)


def block_partitions(shard_tokens: list[int], hidden: int, quant: dict, block_groups: list[list[str]],
                     classes: list[list[str]] | None, in_features: dict[str, int],
                     partition_tokens: int = 0, element_bytes: int = 4,
                     shapes: dict[str, list[int]] | None = None, min_macs: int = 0) -> list[int]:
    """First shard of each statistics partition of one block, shared by all its true-sequential groups (see
    partition_starts): a partition holds at least the bytes of the block's partials (every group's, per
    owner H and for GPTAQ also D and Hfp, float32 [in, in]) in the activations a stats task reads (the q
    chain's, and the fp chain's for GPTAQ), and at least `min_macs` multiply-adds of its Grams (in^2 a token
    per owner). partition_tokens > 0: at least that many tokens instead."""
    if partition_tokens > 0:
        return partition_starts(shard_tokens, partition_tokens)
    per_token = hidden * element_bytes * (2 if quant["method"] == "gptaq" else 1)
    # Counted with whole Grams: the partitions chosen before Grams were stored packed, so the same numbers, and
    # a partial (about half of that when packed) takes at most half its partition's activation bytes. Packed
    # sizes would cut twice as many partitions at 7B: more stats tasks to spread, but more bytes in all
    # (GPTAQ's W D terms do not shrink), and the store's bytes are what a 1 GbE farm waits on.
    partials = sum(partial_bytes(quant, members, classes, in_features, shapes=shapes, stored=False)
                   for members in block_groups)
    owners = [o for members in block_groups
              for o in group_owners(members, classes, quant["importance"] in PER_MODULE_IMPORTANCE)]
    macs_per_token = sum(in_features[o] ** 2 for o in owners)
    # Both floors in tokens (a whole token reaches a floor of bytes or multiply-adds as its ceiling in tokens).
    tokens = max(-(-partials // per_token), -(-min_macs // macs_per_token) if macs_per_token else 0)
    return partition_starts(shard_tokens, tokens)


def stat_partitions(manifest: dict, groups: dict, b: int, tower: str | None = None) -> list[int]:
    """First shard of each statistics partition of block b: fixed by the job's shapes and token counts,
    never by the workers. A vision tower's blocks (narrow: their Grams are small) take one partition."""
    if tower is not None:
        return [0]
    block = groups["blocks"][b]
    return block_partitions(manifest["shard_tokens"], manifest["sizes"]["hidden"], manifest["spec"]["quant"],
                            block["groups"], block.get("inputs"), block["in_features"],
                            manifest["spec"].get("partition_tokens", 0), act_bytes(manifest), block.get("shapes"),
                            manifest.get("partition_macs", 0))


def partial_bytes(quant: dict, members: list[str], classes: list[list[str]] | None,
                  in_features: dict[str, int], element_bytes: int = SUM_BYTES,
                  shapes: dict[str, list[int]] | None = None, stored: bool = True) -> int:
    """Bytes of one partial of a group: per owner, H's upper block triangle (about half an [in, in]; the whole
    [in, in] with stored=False); for GPTAQ also per linear its W D [out, in]
    and tr(W Hfp W^T) (a float64 scalar; hessian.fold_cross_terms). shapes: name -> [out, in] (GPTAQ)."""
    from .quant.hessian import upper_length

    owners = group_owners(members, classes, quant["importance"] in PER_MODULE_IMPORTANCE)
    # Each H stored as its upper block triangle (hessian.pack_upper_).
    grams = sum(element_bytes * (upper_length(in_features[o]) if stored else in_features[o] ** 2) for o in owners)
    if quant["method"] != "gptaq":
        return grams
    return grams + sum(element_bytes * shapes[m][0] * shapes[m][1] + 8 for m in members)


def solves_in_place(manifest: dict, groups: dict, b: int, tower: str | None = None) -> bool:
    """Block b's groups are quantized by one task each (statistics and solves together) when its statistics
    take one partition: that partition's sums are the whole sums, so storing them for separate solve tasks
    would only move them through the store (at Qwen2-VL-7B 0.85 GB a block, more than its activations).
    RTN has no statistics."""
    return manifest["spec"]["quant"]["method"] != "rtn" and len(stat_partitions(manifest, groups, b, tower)) == 1


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
    tower: str | None = None  # None: the decoder's blocks; "vision": the vision tower's (--quantize-vision)

    @property
    def name(self) -> str:
        """Deterministic name, unique within a job (also the store's task-log name)."""
        parts = [self.kind]
        if self.block is not None:
            parts.append(f"{'v' if self.tower else ''}b{self.block:03d}")
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


def needs_global_importance(manifest: dict) -> bool:
    """A gradient pass over the whole model (modality, tlq); modality only where there are vision tokens (with
    none its weights are uniform)."""
    q = manifest["spec"]["quant"]
    if q["method"] == "rtn" or q["importance"] not in GLOBAL_IMPORTANCE:
        return False
    return q["importance"] != "modality" or manifest["calibration"]["vision_tokens"] > 0


def needs_weight_tasks(manifest: dict) -> bool:
    q = manifest["spec"]["quant"]
    return q["method"] != "rtn" and q["importance"] in LOCAL_IMPORTANCE


def needs_fp_chain(manifest: dict) -> bool:
    q = manifest["spec"]["quant"]
    return q["method"] != "rtn" and (q["method"] == "gptaq" or q["importance"] in FP_CHAIN_IMPORTANCE
                                     or needs_global_importance(manifest))


def fp_chain_end(manifest: dict) -> int:
    """The last block whose input the fp chain must reach: the head's (n_blocks) for a gradient pass, else the
    last block's; 0 when no fp chain is needed (block 0's fp input is the q chain's)."""
    if not needs_fp_chain(manifest):
        return 0
    return manifest["n_blocks"] if needs_global_importance(manifest) else manifest["n_blocks"] - 1


def needs_rtn_chain(manifest: dict) -> bool:
    return needs_global_importance(manifest) and manifest["spec"]["quant"]["importance"] in RTN_CHAIN_IMPORTANCE


def score_blocks(manifest: dict) -> list[int]:
    """Blocks whose backward task scores tokens (the gradient at that block's input): tlq 1..n-1 (block 0
    carries no quantization error; a one-block model scores saliency at 0), modality 1..n (the gradient at
    block b's input is the one at block b-1's output; n: the head's)."""
    n = manifest["n_blocks"]
    if manifest["spec"]["quant"]["importance"] == "tlq":
        return list(range(1, n)) if n > 1 else [0]
    return list(range(1, n + 1))


def quantize_vision(manifest: dict) -> bool:
    return bool(manifest["spec"]["quant"].get("quantize_vision")) and manifest.get("n_vision_blocks", 0) > 0


def tower_blocks(manifest: dict, tower: str | None) -> int:
    return manifest["n_vision_blocks"] if tower else manifest["n_blocks"]


def block_plan(groups: dict, b: int, tower: str | None = None) -> dict:
    """The linears and groups of block b of a tower (tlq_farm.steps.do_groups)."""
    return groups["vision" if tower else "blocks"][b]


def acts_key(manifest: dict, chain: str, b: int, k: int, tower: str | None = None) -> str:
    """Where the input of block b on a chain is. At block 0 every chain is the q chain (nothing quantized
    before it), except the decoder's fp chain when the vision tower is quantized: the full-precision tower's
    output then differs from the quantized one's."""
    job = manifest["job"]
    if b == 0 and chain != "q" and not (chain == "fp" and tower is None and quantize_vision(manifest)):
        chain = "q"
    return keys.acts(job, chain, b, k, tower)


def _block_tasks_io(task: Task, manifest: dict, groups: dict) -> tuple[list[str], list[str]]:
    """(inputs, outputs) of the per-block kinds of either tower (BLOCK_KINDS)."""
    job, n_shards = manifest["job"], len(manifest["shards"])
    k, b, t = task.shard, task.block, task.tower
    n = tower_blocks(manifest, t)
    staged = [keys.staged_file(job, "config.json"), keys.plan_groups(job), keys.staged_block(job, b, t)]
    if task.kind == "forward":
        rtn = t is None and needs_rtn_chain(manifest) and b + 1 < n
        ins = staged + [keys.block_kwargs(job, k, t), acts_key(manifest, "fp", b, k, t)]
        outs = [keys.acts(job, "fp", b + 1, k, t)]
        if rtn:
            ins.append(acts_key(manifest, "rtn", b, k))
            outs.append(keys.acts(job, "rtn", b + 1, k))
        return ins, outs
    if task.kind in ("stats", "quantize"):
        plan_b = block_plan(groups, b, t)
        earlier = [keys.qweights(job, b, m, t) for g in range(task.group) for m in plan_b["groups"][g]]
        gptaq = manifest["spec"]["quant"]["method"] == "gptaq"
        global_state = t is None and needs_global_importance(manifest)
        local = t is None and needs_weight_tasks(manifest)
        shards = partition_shards(stat_partitions(manifest, groups, b, t), n_shards, k or 0)
        per_shard = []
        for s in shards:
            per_shard += [keys.block_kwargs(job, s, t), acts_key(manifest, "q", b, s, t)]
            if t is None:  # a vision tower's tokens all weigh the same
                per_shard.append(keys.token_weights(job, b, s) if local else keys.token_masks(job, s))
            if gptaq:
                per_shard.append(acts_key(manifest, "fp", b, s, t))
        state = [keys.importance_state(job)] if global_state else []
        if task.kind == "quantize":
            return staged + state + per_shard + earlier, [keys.qweights(job, b, m, t) for m in plan_b["groups"][task.group]]
        return staged + state + per_shard + earlier, [keys.stats(job, b, task.group, k, t)]
    if task.kind == "solve":
        outs = [keys.qweights(job, b, task.module, t)]
        if manifest["spec"]["quant"]["method"] == "rtn":
            return staged[1:], outs
        return staged[1:] + [keys.stats(job, b, task.group, s, t) for s in stat_partitions(manifest, groups, b, t)], outs
    if task.kind == "propagate":
        names = block_plan(groups, b, t)["names"]
        return staged + [keys.block_kwargs(job, k, t), acts_key(manifest, "q", b, k, t)] + [
            keys.qweights(job, b, m, t) for m in names], [keys.acts(job, "q", b + 1, k, t)]
    raise ValueError(f"unknown task kind {task.kind!r}")


def inputs(task: Task, manifest: dict, groups: dict | None) -> list[str]:
    """Keys a task reads (all must be committed before it runs)."""
    job, n_shards, n = manifest["job"], len(manifest["shards"]), manifest["n_blocks"]
    k, b = task.shard, task.block
    staged = [keys.staged_file(job, "config.json")]
    vision_pieces = [keys.staged_block(job, i, "vision") for i in range(manifest.get("n_vision_blocks", 0))]
    if task.kind == "embed":
        return staged + [keys.staged_embed(job)] + vision_pieces + [keys.calib_shard(job, k)]
    if task.kind == "reembed":
        qweights = [keys.qweights(job, vb, m, "vision") for vb in range(manifest["n_vision_blocks"])
                    for m in groups["vision"][vb]["names"]]
        return staged + [keys.staged_embed(job)] + vision_pieces + qweights + [keys.calib_shard(job, k)]
    if task.kind == "groups":
        vision = [keys.acts(job, "q", 0, 0, "vision"), keys.block_kwargs(job, 0, "vision")] + [
            keys.staged_block(job, i, "vision") for i in range(manifest["n_vision_blocks"])] \
            if quantize_vision(manifest) else []
        return staged + [acts_key(manifest, "fp", 0, 0), keys.block_kwargs(job, 0)] + [
            keys.staged_block(job, i) for i in range(manifest["n_blocks"])] + vision
    if task.kind in BLOCK_KINDS:
        return _block_tasks_io(task, manifest, groups)[0]
    if task.kind == "backward":
        masks = [keys.token_masks(job, k)]
        if b == n:
            return staged + [keys.staged_head(job), keys.acts(job, "fp", n, k)] + masks
        rtn = [acts_key(manifest, "rtn", b, k)] if needs_rtn_chain(manifest) and b > 0 and b in score_blocks(manifest) else []
        return staged + [keys.staged_block(job, b), keys.block_kwargs(job, k), acts_key(manifest, "fp", b, k),
                         keys.grads(job, b + 1, k)] + masks + rtn
    if task.kind == "importance":
        return [keys.importance_scores(job, sb, s) for sb in score_blocks(manifest) for s in range(n_shards)] + [
            keys.token_masks(job, s) for s in range(n_shards)]
    if task.kind == "weights":
        fp = [acts_key(manifest, "fp", b, k)] if needs_fp_chain(manifest) else []
        return staged + [keys.plan_groups(job), keys.staged_block(job, b), keys.block_kwargs(job, k),
                         acts_key(manifest, "q", b, k), keys.token_masks(job, k)] + fp
    if task.kind == "export":
        vq = [keys.qweights(job, vb, m, "vision") for vb in range(manifest["n_vision_blocks"])
              for m in groups["vision"][vb]["names"]] if quantize_vision(manifest) else []
        return staged + [keys.staged_embed(job), keys.staged_head(job), keys.plan_groups(job)] + vision_pieces + [
            keys.staged_block(job, i) for i in range(manifest["n_blocks"])] + [
            keys.qweights(job, i, m) for i in range(manifest["n_blocks"]) for m in groups["blocks"][i]["names"]] + vq + [
            keys.staged_file(job, f) for f in manifest["files"]]
    raise ValueError(f"unknown task kind {task.kind!r}")


def outputs(task: Task, manifest: dict, groups: dict | None = None) -> list[str]:
    """Keys a task writes; its commit is the commit of all of them. A quantize task's are its group's
    linears', which only the groups tell."""
    job = manifest["job"]
    k, b = task.shard, task.block
    if task.kind == "embed":
        if quantize_vision(manifest):  # the full-precision prefix: the vision tower's inputs, the decoder's fp chain
            return [keys.block_kwargs(job, k), keys.token_masks(job, k), keys.acts(job, "fp", 0, k),
                    keys.block_kwargs(job, k, "vision"), keys.acts(job, "q", 0, k, "vision")]
        return [keys.block_kwargs(job, k), keys.token_masks(job, k), keys.acts(job, "q", 0, k)]
    if task.kind == "reembed":
        return [keys.acts(job, "q", 0, k)]
    if task.kind == "groups":
        return [keys.plan_groups(job)]
    if task.kind == "forward":
        rtn = [keys.acts(job, "rtn", b + 1, k)] if task.tower is None and needs_rtn_chain(manifest) \
            and b + 1 < manifest["n_blocks"] else []
        return [keys.acts(job, "fp", b + 1, k, task.tower)] + rtn
    if task.kind == "backward":
        scored = score_blocks(manifest)
        grads = [keys.grads(job, b, k)] if b > min(scored) else []
        return grads + ([keys.importance_scores(job, b, k)] if b in scored else [])
    if task.kind == "importance":
        return [keys.importance_state(job)]
    if task.kind == "weights":
        return [keys.token_weights(job, b, k)]
    if task.kind == "stats":
        return [keys.stats(job, b, task.group, k, task.tower)]
    if task.kind == "solve":
        return [keys.qweights(job, b, task.module, task.tower)]
    if task.kind == "quantize":
        if groups is None:
            raise ValueError(f"{task.name}: a quantize task's outputs are its group's linears; give the groups")
        return _block_tasks_io(task, manifest, groups)[1]
    if task.kind == "propagate":
        return [keys.acts(job, "q", b + 1, k, task.tower)]
    if task.kind == "export":
        return [keys.export_index(job)]
    raise ValueError(f"unknown task kind {task.kind!r}")


def task_shards(task: Task, manifest: dict, groups: dict | None) -> list[int]:
    """The shards whose activations a task reads or writes (a stats task: its partition's): whoever ran it
    holds them in its cache, so the tasks that read them next are best sent there."""
    if task.kind in ("stats", "quantize") and groups is not None:
        return list(partition_shards(stat_partitions(manifest, groups, task.block, task.tower),
                                     len(manifest["shards"]), task.shard or 0))
    return [] if task.shard is None else [task.shard]


def read_ahead(task: Task, manifest: dict) -> list[str]:
    """The staged block that whoever runs `task` most likely reads next: the next block of its chain (the one
    before, on the gradient chain; block 0 after embedding). A worker's cache downloads it while the task
    computes (worker/cache.py): every chain walks the blocks in order, and the tasks of a block go to the
    workers that hold its shards, which then run the next block's."""
    job, b, t = manifest["job"], task.block, task.tower
    if task.kind in ("embed", "reembed"):
        nxt, t = 0, None
    elif task.kind == "backward":
        nxt = b - 1
    elif task.kind in BLOCK_KINDS or task.kind == "weights":
        nxt = b + 1
    else:  # groups, importance, export: no next block
        return []
    return [keys.staged_block(job, nxt, t)] if 0 <= nxt < tower_blocks(manifest, t) else []


def cache_bytes(manifest: dict, groups: dict | None = None) -> int:
    """Bytes of store objects that a worker's tasks read again after they were read or written: what its cache
    must hold for none to be downloaded twice (worker/cache.py); below that, least-recently-used eviction
    drops each object just before its next read. The larger of what the embed tasks hold and what the tasks
    of any block hold (_block_set), a tenth more for records and headers. Qwen2-VL-7B, 128 x 2048 tokens in
    bf16: 5.8 GB (GPTAQ 7.9), where the worker's cache was 2 GiB. Not the whole job: the export reads every
    block's quantized weights once more, and the gradient chain (tlq, modality), block by block backwards, the
    activations the forward chains wrote (fp; for tlq also RTN): 1.9 GB a chain and block at 7B, more than a
    cache holds; what it no longer holds then is downloaded once."""
    sizes, element = manifest["sizes"], act_bytes(manifest)
    staged_per_byte = _DTYPE_BYTES.get(manifest.get("checkpoint_dtype", "float32"), 4) / element
    # The embed tasks: the prefix (embeddings, vision tower) and block 0 read ahead, each shard's samples, and
    # what they write for block 0's tasks (its activations, the per-shard arguments).
    prefix = (sizes["embed"] + sum(sizes.get("vision_blocks", [])) + sizes["blocks"][0]) * staged_per_byte
    first_inputs = 1.25 * sum(manifest["shard_tokens"]) * sizes["hidden"] * element
    sets = [prefix + sum(manifest["shard_input_bytes"]) + first_inputs]
    towers = [None, "vision"] if quantize_vision(manifest) else [None]
    sets += [_block_set(manifest, groups, b, tower, staged_per_byte) for tower in towers
             for b in range(tower_blocks(manifest, tower))]
    return int(1.1 * max(sets))


def _block_set(manifest: dict, groups: dict | None, b: int, tower: str | None, staged_per_byte: float) -> float:
    """Bytes the tasks of block b read again: the activations entering it on every chain its quantize tasks
    read (the q chain; GPTAQ also the fp chain) and those leaving it (propagate); a quarter of a chain's more
    for the per-shard arguments (position embeddings: 1 KiB a token at 7B, where a chain is 7 KiB); the
    partial statistics where it takes several partitions (known with `groups`); its packed quantized
    weights; its staged weights and the next block's (read ahead)."""
    quant, sizes, element = manifest["spec"]["quant"], manifest["sizes"], act_bytes(manifest)
    if tower:  # up to 4 patches per vision token of the decoder (2 x 2 merged, Qwen-VL)
        acts = 4 * sum(manifest["shard_vision_tokens"]) * sizes["vision_hidden"] * element
    else:
        acts = sum(manifest["shard_tokens"]) * sizes["hidden"] * element
    chains = 2 if quant["method"] == "gptaq" else 1
    stats = 0
    if groups is not None and not solves_in_place(manifest, groups, b, tower):
        blk = block_plan(groups, b, tower)
        stats = len(stat_partitions(manifest, groups, b, tower)) * sum(
            partial_bytes(quant, members, blk.get("inputs"), blk["in_features"], shapes=blk.get("shapes"))
            for members in blk["groups"])
    nbytes = (sizes["vision_blocks"] if tower else sizes["blocks"])[b]
    weights, per_scale = nbytes / element, quant.get("group_size", 128)
    packed = weights * quant.get("bits", 4) / 8 + weights / (per_scale if per_scale > 0 else 128) * 8
    return acts * (chains + 1.25) + stats + packed + 2 * nbytes * staged_per_byte


def _tower_tasks(manifest: dict, groups: dict, tower: str | None, local: bool) -> list[Task]:
    """A tower's per-block tasks in order: weights, then each group's stats and solves (or its quantize task),
    then propagate."""
    n_shards, n = len(manifest["shards"]), tower_blocks(manifest, tower)
    rtn = manifest["spec"]["quant"]["method"] == "rtn"
    tasks: list[Task] = []
    for b in range(n):
        plan_b = block_plan(groups, b, tower)
        if rtn:
            tasks += [Task("solve", block=b, group=0, module=m, tower=tower) for m in plan_b["names"]]
            continue
        if local:
            tasks += [Task("weights", block=b, shard=k) for k in range(n_shards)]
        in_place = solves_in_place(manifest, groups, b, tower)
        for g, members in enumerate(plan_b["groups"]):
            if in_place:
                tasks.append(Task("quantize", block=b, group=g, tower=tower))
                continue
            tasks += [Task("stats", block=b, group=g, shard=k, tower=tower)
                      for k in stat_partitions(manifest, groups, b, tower)]
            tasks += [Task("solve", block=b, group=g, module=m, tower=tower) for m in members]
        if b < n - 1:
            tasks += [Task("propagate", block=b, shard=k, tower=tower) for k in range(n_shards)]
    return tasks


def all_tasks(manifest: dict, groups: dict | None) -> list[Task]:
    """Every task of the job in a topological order; before `groups` is known, only embed and groups."""
    n_shards, n_blocks = len(manifest["shards"]), manifest["n_blocks"]
    tasks = [Task("embed", shard=k) for k in range(n_shards)] + [Task("groups")]
    if groups is None:
        return tasks
    if quantize_vision(manifest):
        if manifest["spec"]["quant"]["method"] == "gptaq":
            tasks += [Task("forward", block=b, shard=k, tower="vision")
                      for b in range(manifest["n_vision_blocks"] - 1) for k in range(n_shards)]
        tasks += _tower_tasks(manifest, groups, "vision", False)
        tasks += [Task("reembed", shard=k) for k in range(n_shards)]
    tasks += [Task("forward", block=b, shard=k) for b in range(fp_chain_end(manifest)) for k in range(n_shards)]
    if needs_global_importance(manifest):
        tasks += [Task("backward", block=b, shard=k) for b in range(n_blocks, min(score_blocks(manifest)) - 1, -1)
                  for k in range(n_shards)]
        tasks.append(Task("importance"))
    tasks += _tower_tasks(manifest, groups, None, needs_weight_tasks(manifest))
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
    needed_tasks: frozenset = frozenset()


def reconcile(manifest: dict, committed: set[str], groups: dict | None = None,
              targets: list[str] | None = None) -> Reconciliation:
    """The tasks that are needed for the export (or for the keys `targets`), not committed, and whose inputs
    are all committed. Pure."""
    tasks = all_tasks(manifest, groups)
    producer: dict[str, Task] = {}
    for t in tasks:
        for key in outputs(t, manifest, groups):
            producer[key] = t

    def is_done(t: Task) -> bool:
        return all(key in committed for key in outputs(t, manifest, groups))

    # Walk back from the export (or from the groups task while the plan is still partial): a task is needed
    # when it is not committed and a needed task reads one of its outputs. Done work upstream is not redone.
    if groups is None:
        roots = [t for t in tasks if not is_done(t)]
    elif targets is not None:
        if all(k in committed for k in targets):
            return Reconciliation([], True, [], 0)
        roots = list(dict.fromkeys(producer[k] for k in targets if k not in committed))
    else:
        if is_done(tasks[-1]):
            return Reconciliation([], True, [], 0)
        roots = [tasks[-1]]
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
    return Reconciliation(ready, False, sorted(missing), len(needed), frozenset(needed))


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
    vision = task.tower is not None
    hidden = sizes["vision_hidden"] if vision else sizes["hidden"]
    block_sizes = sizes.get("vision_blocks", []) if vision else sizes["blocks"]
    block = max(block_sizes) if block_sizes else 0
    # A vision tower sees up to 4 patches per vision token of the decoder (2 x 2 merged, Qwen-VL).
    tokens = [4 * n for n in manifest["shard_vision_tokens"]] if vision else manifest["shard_tokens"]
    shard_acts = [n * hidden * act_bytes(manifest) for n in tokens]
    acts = shard_acts[task.shard] if task.shard is not None else max(shard_acts)

    quant = manifest["spec"]["quant"]
    if vision:
        quant = {**quant, "importance": "uniform"}

    def partial(members: list[str], element_bytes: int = SUM_BYTES) -> int:
        blk = block_plan(groups, task.block, task.tower) if groups else {}
        cols = {m: blk.get("in_features", {}).get(m, hidden) for m in members}
        shapes = {m: blk.get("shapes", {}).get(m, [hidden, hidden]) for m in members}
        return partial_bytes(quant, members, blk.get("inputs"), cols, element_bytes, shapes)

    def largest_linear(towers: tuple[str, ...]) -> int:
        # Weights of the largest linear in the towers' block plans (0 before the groups are known).
        plans = [blk for tower in towers for blk in ((groups or {}).get(tower) or [])]
        return max((s[0] * s[1] for blk in plans for s in blk.get("shapes", {}).values()), default=0)

    def staged_read() -> int:
        # A block's staged object as JobContext.load_staged reads it into the built block: one tensor at a time,
        # the tensor and its file's mapped pages, in the checkpoint's dtype; before the linears' shapes are
        # known, the block itself.
        largest = largest_linear(("vision",) if vision else ("blocks",))
        if not largest:
            return block
        return 2 * largest * _DTYPE_BYTES.get(manifest.get("checkpoint_dtype", "float32"), 4)

    if task.kind in ("embed", "reembed"):
        # The prefix only (decoder blocks and head on the meta device), filled one tensor at a time; the
        # head's weights while the model is built.
        # The prefix's modules, and the staged file's pages while they are copied into them (mapped, one tensor
        # at a time): 1.5 to 1.9 prefixes measured at Qwen2-VL-7B (docs/benchmarks.md "Scale").
        prefix = sizes["embed"] + sum(sizes.get("vision_blocks", []))
        return int(1.5 * prefix + sizes["head"] + manifest["shard_input_bytes"][task.shard] + 4 * acts)
    if task.kind == "groups":
        # Block 0 built and traced on one sample, its staged tensors read one at a time (the largest unknown
        # until this task has run: 1.18 blocks in all measured at Qwen2-VL-7B, docs/benchmarks.md "Scale");
        # the other blocks on the meta device (none held).
        return int(1.25 * block + 4 * acts)
    if task.kind == "forward":
        # The block as built and as read, one shard of each chain in and out; for tlq its RTN copy, rounded a
        # few rows at a time (block.rtn_proxy).
        rtn = block + REBUILD_BYTES_PER_WEIGHT * REBUILD_WEIGHTS if needs_rtn_chain(manifest) else 0
        return int(block + staged_read() + rtn + 8 * acts)
    if task.kind == "backward":
        if task.block == manifest["n_blocks"]:
            # The head (final norm + lm_head) and its gradient w.r.t. the shard's hidden states; logits only on
            # the answer tokens.
            return int(2 * sizes["head"] + 6 * acts)
        # The block as built and as read, and what autograd keeps of one batch's forward through it.
        return int(2 * block + staged_read() + 24 * acts)
    if task.kind == "importance":
        # Every sample's per-token scores of every scored block (float64), and the token masks.
        tokens = sum(manifest["shard_tokens"])
        return int(tokens * 8 * (manifest["n_blocks"] + 4))
    if task.kind == "weights":
        return int(1.5 * block + 12 * acts)
    from .store.tensors import LARGE_BYTES

    def held(nbytes: int) -> int:
        # A stored object in memory: a large one is read and written through a file (its tensors only),
        # a small one beside its bytes.
        return nbytes if nbytes >= LARGE_BYTES else 3 * nbytes

    gptaq = quant["method"] == "gptaq"

    def solve_peak(module: str, read: int) -> int:
        # The weight in float32 beside the larger of two moments (bench/solve_peak.py measures them):
        # - the reduction: the float64 total of H while a partial's float32 Gram (`read`) is added to it, and
        #   for GPTAQ the running float64 W D [out, in] beside the partial's float32 one;
        # - the solve: the factorisation in H's own storage, the float64 factor then its float32 half, and
        #   [out, in] terms: plain GPTQ its work copy, codes and dequantized weight (16 bytes a weight); GPTAQ W
        #   and W D in float64 and the target's two triangular products (32 bytes a weight).
        out_in = block_plan(groups, task.block, task.tower)["shapes"][module] if groups else [hidden] * 2
        cols, params = out_in[1], out_in[0] * out_in[1]
        reduce_peak = 8 * cols ** 2 + read + (12 * params if gptaq else 0)
        return 4 * params + max(reduce_peak, 8 * cols ** 2 + (32 if gptaq else 16) * params)

    if task.kind in ("stats", "quantize"):
        # The block (with the earlier groups' qweights; for GPTAQ the float block too) as built and as read,
        # one shard of each chain alive at a time, the running sums while they are written.
        # For GPTAQ the running sums are H, D and Hfp per owner until each linear's W D and W Hfp (for its
        # trace) are taken from them; where those are summed as products (product_cross_terms) only H.
        members = block_plan(groups, task.block, task.tower)["groups"][task.group] if groups else []
        sums, fold = 0, 0
        if groups:
            shards = partition_shards(stat_partitions(manifest, groups, task.block, task.tower),
                                      len(manifest["shards"]), task.shard or 0)
            acts = max(shard_acts[k] for k in shards)
            blk = block_plan(groups, task.block, task.tower)
            owners = group_owners(members, blk.get("inputs"), quant["importance"] in PER_MODULE_IMPORTANCE)
            products = product_cross_terms(quant, members, blk.get("inputs"), blk.get("shapes"))
            # A product linear's: H, its running W D and its weight in the sums' dtype (a copy where the block
            # computes in bf16).
            sums = sum(SUM_BYTES * (blk["in_features"][o] ** 2 + 2 * blk["shapes"][o][0] * blk["in_features"][o]
                                    if o in products else (3 if gptaq else 1) * blk["in_features"][o] ** 2)
                       for o in owners)
            folded = [m for m in members if m not in products]
            fold = 2 * SUM_BYTES * max(blk["shapes"][m][0] * blk["shapes"][m][1] for m in folded) \
                if gptaq and folded else 0
        # Kept for the block's later forwards (tlq_farm.reuse): outputs of the linears before the group, and of
        # the submodules they make up, for each shard of each chain, within REUSE_BYTES.
        kept = 0
        if groups and task.group > 0 and blk.get("once"):
            before = [m for gg in blk["groups"][:task.group] for m in gg]
            kept = sum(shard_acts[k] for k in shards) // hidden * sum(blk["shapes"][m][0] for m in before)
            kept = min(REUSE_BYTES, 2 * kept * (2 if gptaq else 1))
        stored = partial(members)
        accumulate = (2 if gptaq else 1) * block + staged_read() + 4 * acts * (2 if gptaq else 1) + sums + fold + kept
        if task.kind == "quantize":
            # Then the blocks are let go and each linear solved from the group's sums as a solve task would from
            # a large partial (its whole float32 Gram added to the float64 total, then freed); for GPTAQ every
            # linear's W D is held until its own solve.
            cols = blk["in_features"] if groups else {}
            wd = sum(SUM_BYTES * blk["shapes"][m][0] * blk["shapes"][m][1] for m in members) if gptaq and groups else 0
            solves = max((solve_peak(m, SUM_BYTES * cols.get(m, hidden) ** 2) for m in members), default=0)
            return int(max(accumulate, kept + wd + solves))
        # Written as it is: a large partial straight from the sums (store.tensors.write_tensors_file), a small
        # one through its bytes (two copies of it).
        return int(accumulate + (0 if stored >= LARGE_BYTES else 2 * stored))
    if task.kind == "solve":
        members = block_plan(groups, task.block, task.tower)["groups"][task.group] if groups else [task.module]
        stored = partial(members)
        # A large partial is read one tensor at a time, each freed once added (measured at 4096 columns,
        # tests/test_stats_store.py: about one float32 [in, in] above the total, though its packed H is 0.63
        # of one); a small one is held whole.
        out_in = block_plan(groups, task.block, task.tower)["shapes"][task.module] if groups else [hidden] * 2
        read = held(stored) if stored < LARGE_BYTES else SUM_BYTES * out_in[1] ** 2
        return int(max(block, solve_peak(task.module, read)))
    if task.kind == "propagate":
        # The block as built, its quantized weights rebuilt a few rows at a time (steps.apply_stored_qweight),
        # a batch's intermediates; and about a block more, measured at Qwen2-VL-7B (1.1 to 1.4 GB over runs,
        # docs/benchmarks.md "Scale"): the staged tensors as read and the qweights objects beside the rebuild.
        return int(2 * block + REBUILD_BYTES_PER_WEIGHT * REBUILD_WEIGHTS + 6 * acts)
    if task.kind == "export":
        # One part at a time (steps.do_export): a chunk of the staged prefix or head beside its spill write, or
        # one quantized linear beside the block's staged weights: its codes and dequantized weight as read (8
        # bytes a weight, their unpacking's temporaries 17 more) and their compressed form and its check;
        # 26 to 31 bytes a weight in all, measured at Qwen2-VL-7B's MLP with its large arrays mapped
        # (steps.set_allocator_policy; 32 to 47 from the heap; docs/benchmarks.md "Scale").
        outer = max(sizes["embed"], sizes["head"])
        chunk = min(max(block, EXPORT_CHUNK_BYTES), outer)
        largest = largest_linear(("blocks", "vision")) or block // 2
        return int(max(2 * chunk, block + 32 * largest))
    raise ValueError(f"unknown task kind {task.kind!r}")


def cpu_threads(manifest: dict, cores: int) -> int:
    """Torch threads for a job computed on a CPU: about one per 1024 of hidden width, up to the cores. A
    narrower block's matrix products are too small to keep more threads busy, and the idle ones spin: the
    128-wide demo takes 25 % more CPU on 2 threads than on 1, for no gain in wall time."""
    return max(1, min(cores, manifest["sizes"]["hidden"] // 1024))


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
        c[0] += all(k in committed for k in outputs(t, manifest, groups))
    job = manifest["job"]
    reached = 0
    for b in range(manifest["n_blocks"]):
        if all(keys.acts(job, "q", b, k) in committed for k in range(len(manifest["shards"]))):
            reached = b
    qweights_done = sum(1 for t in tasks if t.kind in ("solve", "quantize")
                        for k in outputs(t, manifest, groups) if k in committed)
    return {"tasks": per_kind, "done": sum(c[0] for c in per_kind.values()),
            "total": sum(c[1] for c in per_kind.values()), "plan_complete": groups is not None,
            "block": reached, "blocks": manifest["n_blocks"], "shards": len(manifest["shards"]),
            "modules_quantized": qweights_done}
