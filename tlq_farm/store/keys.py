"""Every object key of a job, in one place.

Keys are relative POSIX paths inside a store. Numbers are zero-padded so that a plain sorted listing is
also the numeric order (block-003 < block-010). Layout of one job:

    jobs/<job>/spec.json
    jobs/<job>/manifest.json
    jobs/<job>/report.json
    jobs/<job>/cancel                                     flag (no commit protocol)
    jobs/<job>/calib/sample-000042.safetensors
    jobs/<job>/staged/embed.safetensors                   vision tower, embeddings, all that is not a block
    jobs/<job>/staged/block-003.safetensors
    jobs/<job>/staged/vision-block-003.safetensors        a vision tower's block (its inputs: acts/q/vision-block-...)
    jobs/<job>/staged/head.safetensors
    jobs/<job>/acts/q/block-003/shard-0001.safetensors    activations entering block 3, quantized chain
    jobs/<job>/acts/fp/block-003/shard-0001.safetensors   same, full-precision chain
    jobs/<job>/acts/rtn/block-003/shard-0001.safetensors  same, through round-to-nearest copies of blocks 0-2
    jobs/<job>/kwargs/shard-0001.safetensors              what every block receives (kwargs/vision/...: the tower's)
    jobs/<job>/tokens/shard-0001.safetensors              per sample: real tokens, vision tokens, labels
    jobs/<job>/grads/block-003/shard-0001.safetensors     dL/d(input of block 3), full-precision chain
    jobs/<job>/importance/scores/block-003/shard-0001.safetensors   what block 3's gradients say of tokens
    jobs/<job>/token_weights/block-003/shard-0001.safetensors
    jobs/<job>/stats/block-003/group-01/shard-0001.safetensors   partial Hessians
    jobs/<job>/qweights/block-003/<module>.safetensors
    jobs/<job>/done/block-003.json
    jobs/<job>/export/<name>
    jobs/<job>/tasks/<task_id>.json

Next to each committed object the store keeps its commit marker, named by `marker_key`. Stores written by
earlier versions also hold a checksum file (`checksum_key`), which nothing reads any more and deletes remove;
both suffixes are reserved and no object key may end with them.
"""

from __future__ import annotations

import operator
import re

JOBS = "jobs"
# The layout and meaning of a job's objects. 6: calibration samples staged one object per shard (calib_shard).
# 5: symmetric grids scale by max(-min / 2^(b-1), max / (2^(b-1) - 1/2))
# (qweights of format 4 used max / (2^(b-1) - 1)). 4: batches of at most 2048 tokens (block.BATCH_TOKENS; the
# summation order of statistics follows the batches). 3: samples go through blocks in packed batches; the gradient
# importance passes are per block and shard (forward / backward chains, scores), the full-precision chain comes
# from forward tasks only, per-shard token masks, no token-weights objects where weights need no block.
# 2: statistics per partition of shards, in float32, one Gram per shared input; qweights as packed codes
# without a dequantized copy. 1: statistics per shard, float64, one per linear; qweights with a float32
# weight and int32 codes. A job of another format is refused, never reused.
STORE_FORMAT = 6
CHAINS = ("q", "fp", "rtn")

COMMIT_SUFFIX = ".commit"
CHECKSUM_SUFFIX = ".sha256"
RESERVED_SUFFIXES = (COMMIT_SUFFIX, CHECKSUM_SUFFIX)

# Widths fix the sort order; a number that does not fit would sort out of place, so it is refused.
BLOCK_WIDTH = 3
SHARD_WIDTH = 4
GROUP_WIDTH = 2

_JOB_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._=-]*")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


# ----------------------------------------------------------------------------------------------- validation


def check_key(key: str) -> str:
    """Return `key` if it is a valid object key, else raise ValueError saying what is wrong.

    A key is a relative path of segments made of letters, digits and `._=-`, no segment starting with a
    dot (the local store hides its temporary files behind dots), and not ending in a reserved suffix.
    """
    if not isinstance(key, str) or not key:
        raise ValueError(f"store key must be a non-empty string, got {key!r}")
    if key.startswith("/") or key.endswith("/"):
        raise ValueError(f"store key {key!r} must be a relative path without leading or trailing '/'")
    for segment in key.split("/"):
        if not _SEGMENT.fullmatch(segment):
            raise ValueError(
                f"store key {key!r} has an invalid segment {segment!r}: use letters, digits and '._=-', "
                "not starting with '.' or '-', no empty segments"
            )
    if key.endswith(RESERVED_SUFFIXES):
        raise ValueError(
            f"store key {key!r} ends with a reserved suffix {RESERVED_SUFFIXES}: the store uses those names "
            "for checksums and commit markers; choose another name"
        )
    return key


def check_prefix(prefix: str) -> str:
    """Return `prefix` if it is a valid listing prefix ('' for everything), else raise ValueError."""
    if not isinstance(prefix, str):
        raise ValueError(f"store prefix must be a string, got {prefix!r}")
    if prefix == "":
        return prefix
    if prefix.startswith("/"):
        raise ValueError(f"store prefix {prefix!r} must be relative (no leading '/')")
    segments = prefix.split("/")
    # The last segment may be empty (a folder prefix 'a/b/') or partial ('a/shard-').
    for segment in segments[:-1]:
        if not _SEGMENT.fullmatch(segment):
            raise ValueError(f"store prefix {prefix!r} has an invalid segment {segment!r}")
    if segments[-1] and not _SEGMENT.fullmatch(segments[-1]):
        raise ValueError(f"store prefix {prefix!r} has an invalid last segment {segments[-1]!r}")
    return prefix


def marker_key(key: str) -> str:
    """Key of the commit marker of `key` (JSON: sha256, size, time); written last."""
    return key + COMMIT_SUFFIX


def checksum_key(key: str) -> str:
    """Key of the checksum file earlier versions wrote beside `key` (the marker holds the sha256 now)."""
    return key + CHECKSUM_SUFFIX


def is_reserved(raw_key: str) -> bool:
    """Whether a raw key is one of the store's companions (marker or checksum), not an object."""
    return raw_key.endswith(RESERVED_SUFFIXES)


def is_job_id(job) -> bool:
    return isinstance(job, str) and _JOB_ID.fullmatch(job) is not None


def _job(job: str) -> str:
    if not is_job_id(job):
        raise ValueError(
            f"job id {job!r} is invalid: use 1-64 characters of lowercase letters, digits and '-', "
            "starting with a letter or digit"
        )
    return job


def _number(what: str, value: int, width: int) -> str:
    if isinstance(value, bool):
        raise ValueError(f"{what} must be an integer, got the boolean {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be an integer, got {value!r} ({type(value).__name__})") from None
    if number < 0:
        raise ValueError(f"{what} must be non-negative, got {number}")
    if number >= 10**width:
        raise ValueError(f"{what} {number} does not fit the key layout (at most {10**width - 1})")
    return f"{number:0{width}d}"


def _name(what: str, value: str) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value) or value.endswith(RESERVED_SUFFIXES):
        raise ValueError(
            f"{what} {value!r} is invalid: use letters, digits and '._-', not starting with '.' or '-'"
        )
    return value


# A model's block lists: the decoder's (tower None) and, when it is quantized too, the vision tower's.
TOWERS = (None, "vision")


def _block(block: int, tower: str | None = None) -> str:
    if tower not in TOWERS:
        raise ValueError(f"tower must be one of {TOWERS} (the decoder or the vision tower), got {tower!r}")
    return (f"{tower}-" if tower else "") + "block-" + _number("block", block, BLOCK_WIDTH)


def _shard(shard: int) -> str:
    return "shard-" + _number("shard", shard, SHARD_WIDTH)


# ---------------------------------------------------------------------------------------------------- keys


def jobs_prefix() -> str:
    """Prefix of every job in a store."""
    return JOBS + "/"


def job_prefix(job: str) -> str:
    """Prefix of everything that belongs to `job` (ends with '/', so job 'a' never lists job 'a-1')."""
    return f"{JOBS}/{_job(job)}/"


def spec(job: str) -> str:
    return job_prefix(job) + "spec.json"


def manifest(job: str) -> str:
    return job_prefix(job) + "manifest.json"


def report(job: str) -> str:
    return job_prefix(job) + "report.json"


def cancel_flag(job: str) -> str:
    """Raw flag (put_flag / exists_raw): present means the job is cancelled."""
    return job_prefix(job) + "cancel"


def job_of(key: str) -> str | None:
    """The job whose prefix holds object `key` (a key strictly below `jobs/<job>/`), else None."""
    parts = key.split("/", 2)
    if len(parts) < 3 or parts[0] != JOBS or not is_job_id(parts[1]) or not parts[2]:
        return None
    return parts[1]


def is_task_output(key: str) -> bool:
    """Whether `key` is an object of a job that a task writes, and so could write again: anything under the
    job's prefix but what staging writes (the spec and manifest, the checkpoint's pieces, the calibration
    samples), which no task can compute."""
    job = job_of(key)
    if job is None:
        return False
    return key not in (spec(job), manifest(job)) and not key.startswith((staged_prefix(job), calib_prefix(job)))


def calib_shard(job: str, k: int) -> str:
    """The encoded calibration samples of shard k, one object (tensors 's<index>|<name>'): one write and one
    read per shard, where an object per sample cost a store round trip (and on S3 a request) per sample."""
    return job_prefix(job) + "calib/shard-" + _number("shard", k, SHARD_WIDTH) + ".safetensors"


def calib_prefix(job: str) -> str:
    return job_prefix(job) + "calib/"


def staged_prefix(job: str) -> str:
    return job_prefix(job) + "staged/"


def staged_embed(job: str) -> str:
    """Vision tower, embeddings and every weight that is not a decoder block or the head."""
    return staged_prefix(job) + "embed.safetensors"


def staged_block(job: str, block: int, tower: str | None = None) -> str:
    return staged_prefix(job) + _block(block, tower) + ".safetensors"


def staged_head(job: str) -> str:
    return staged_prefix(job) + "head.safetensors"


def acts_prefix(job: str, chain: str, block: int, tower: str | None = None) -> str:
    if chain not in CHAINS:
        raise ValueError(f"activation chain must be one of {CHAINS} (quantized or full precision), got {chain!r}")
    return f"{job_prefix(job)}acts/{chain}/{_block(block, tower)}/"


def acts(job: str, chain: str, block: int, shard: int, tower: str | None = None) -> str:
    """Activations entering block `block` (of the decoder, or of the vision tower) on chain 'q' (quantized
    path), 'fp' (full precision) or 'rtn' (through round-to-nearest copies of the blocks before)."""
    return acts_prefix(job, chain, block, tower) + _shard(shard) + ".safetensors"


def grads(job: str, block: int, shard: int) -> str:
    """Importance gradients at the input of block `block`."""
    return f"{job_prefix(job)}grads/{_block(block)}/{_shard(shard)}.safetensors"


def token_masks(job: str, shard: int) -> str:
    """Per sample of one shard: its real tokens, vision tokens and answer labels (small; what token weights
    and the loss need, without the samples' pixels)."""
    return f"{job_prefix(job)}tokens/{_shard(shard)}.safetensors"


def importance_scores(job: str, block: int, shard: int) -> str:
    """What the gradient at the input of block `block` says of the tokens of one shard (a global importance
    pass: per-token scores for tlq, vision and text sums for modality)."""
    return f"{job_prefix(job)}importance/scores/{_block(block)}/{_shard(shard)}.safetensors"


def token_weights(job: str, block: int, shard: int) -> str:
    return f"{job_prefix(job)}token_weights/{_block(block)}/{_shard(shard)}.safetensors"


def stats_prefix(job: str, block: int, group: int, tower: str | None = None) -> str:
    return f"{job_prefix(job)}stats/{_block(block, tower)}/group-{_number('group', group, GROUP_WIDTH)}/"


def stats(job: str, block: int, group: int, shard: int, tower: str | None = None) -> str:
    """Partial Hessian statistics of one true-sequential group of a block, over the partition of shards
    that starts at `shard` (tlq_farm.plan.stat_partitions)."""
    return stats_prefix(job, block, group, tower) + _shard(shard) + ".safetensors"


def qweights_prefix(job: str, block: int, tower: str | None = None) -> str:
    return f"{job_prefix(job)}qweights/{_block(block, tower)}/"


def qweights(job: str, block: int, module: str, tower: str | None = None) -> str:
    """Quantized weights of one linear module of a block (module: e.g. 'self_attn.q_proj')."""
    return qweights_prefix(job, block, tower) + _name("module name", module) + ".safetensors"


def block_done(job: str, block: int) -> str:
    return f"{job_prefix(job)}done/{_block(block)}.json"


def export_prefix(job: str) -> str:
    return job_prefix(job) + "export/"


def export_file(job: str, name: str) -> str:
    """A file of the exported checkpoint; `name` may contain folders ('a/b.json')."""
    if not isinstance(name, str):
        raise ValueError(f"export file name must be a string, got {name!r}")
    try:
        return check_key(export_prefix(job) + name)
    except ValueError as error:
        raise ValueError(f"export file name {name!r} is invalid: {error}") from None


def tasks_prefix(job: str) -> str:
    return job_prefix(job) + "tasks/"


def task_log(job: str, task_id: str) -> str:
    """Record of one computed task (who, when, how long); counting these counts recomputation."""
    return tasks_prefix(job) + _name("task id", task_id) + ".json"


# ---------------------------------------------------------------------------------------------------- farm


def staged_file(job: str, name: str) -> str:
    """A top-level file of the model folder that is not weights (config.json, tokenizer, processor...)."""
    return staged_prefix(job) + "files/" + _name("model file name", name)


def block_kwargs(job: str, shard: int, tower: str | None = None) -> str:
    """The kwargs every block (of the decoder, or of the vision tower) receives (rotary embeddings, masks),
    for the samples of one shard."""
    _block(0, tower)
    return f"{job_prefix(job)}kwargs/{tower + '/' if tower else ''}{_shard(shard)}.safetensors"


def plan_groups(job: str) -> str:
    """Linear modules of every block and their true-sequential groups (found from the data flow)."""
    return job_prefix(job) + "plan/groups.json"


def importance_state(job: str) -> str:
    """What a global importance pass (modality, tlq) leaves for the per-block token weights."""
    return job_prefix(job) + "importance/state.safetensors"


def export_index(job: str) -> str:
    """List of the export's files with their sha256; written last, so it commits the whole export."""
    return job_prefix(job) + "export-index.json"
