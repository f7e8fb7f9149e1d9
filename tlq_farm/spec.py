"""QuantSpec / JobSpec: what a job computes, validated once, with a fingerprint for resume and attach."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field

METHODS = ("rtn", "gptq", "gptaq")
IMPORTANCE = ("uniform", "modality", "vlmq", "qig", "tlq")
FORMATS = ("compressed", "fake")
# The dtype blocks compute in and activations are stored in (statistics are float32 sums whatever it is).
DTYPES = ("bfloat16", "float16", "float32")


_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_size(text: str | int | None) -> int | None:
    """'512m', '4GiB', '2g', '1048576' -> bytes (None stays None)."""
    if text is None or text == "":
        return None
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgtb]?)(i?b)?\s*", str(text).lower())
    if not m:
        raise ValueError(f"memory size {text!r} is not understood: write a number with an optional unit, "
                         "e.g. 512m, 4g, 24GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def format_size(n: int) -> str:
    """12_345_678 -> '12.3 MB': bytes in the largest decimal unit that keeps a leading digit."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


class SpecError(ValueError):
    """A spec value that cannot work; the message names the option and what to choose instead."""


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    act_bits: int | None = None
    method: str = "gptq"
    importance: str = "uniform"
    act_order: bool = False
    static_groups: bool = False
    damp: float = 0.01
    blocksize: int = 128
    true_sequential: bool = True
    quantize_vision: bool = False
    # TLQ token-level calibration set: the fraction of vision tokens kept (every text token is kept).
    tlq_keep: float = 0.5
    qig_steps: int = 32

    def validate(self) -> "QuantSpec":
        if self.bits not in (2, 3, 4, 8):
            raise SpecError(f"--bits {self.bits} is not supported: choose 2, 3, 4 or 8")
        if self.group_size != -1 and self.group_size <= 0:
            raise SpecError(f"--group-size {self.group_size} is invalid: use a positive number of columns (32, 64, 128, ...), or -1 for per-channel")
        if self.act_bits not in (None, 8):
            raise SpecError(f"--act-bits {self.act_bits} is not supported: use 8 (dynamic per-token int8) or leave it unset")
        if self.method not in METHODS:
            raise SpecError(f"--method {self.method!r} is unknown: choose one of {', '.join(METHODS)}")
        if self.importance not in IMPORTANCE:
            raise SpecError(f"--importance {self.importance!r} is unknown: choose one of {', '.join(IMPORTANCE)}")
        if self.method == "rtn" and self.importance != "uniform":
            raise SpecError("--method rtn uses no calibration statistics, so --importance must be uniform")
        if not 0 < self.damp < 1:
            raise SpecError(f"--damp {self.damp:g} is out of range: use a value in (0, 1), a fraction of mean(diag H) such as 0.01")
        if self.blocksize <= 0:
            raise SpecError(f"--blocksize {self.blocksize} is invalid: use a positive number of columns such as 128")
        if not 0 < self.tlq_keep <= 1:
            raise SpecError(f"--tlq-keep {self.tlq_keep:g} is out of range: use a fraction of vision tokens in (0, 1], such as 0.5")
        if self.qig_steps < 1:
            raise SpecError(f"--qig-steps {self.qig_steps} is invalid: use at least 1 integration step (32 by default)")
        return self


@dataclass(frozen=True)
class JobSpec:
    model: str
    calib: str
    quant: QuantSpec = field(default_factory=QuantSpec)
    samples: int = 128
    seq_len: int = 2048
    seed: int = 0
    fmt: str = "compressed"
    # Shards are fixed by token count, never by the number of workers: same shards, same bytes.
    shard_tokens: int = 8192
    # Calibration tokens per statistics partition; 0: chosen from the job's shapes (plan.block_partitions).
    # More partitions spread a block's statistics over more workers where links are fast.
    partition_tokens: int = 0
    # Compute dtype (resolve_dtype turns --dtype auto into one of DTYPES before the job is staged).
    dtype: str = "float32"

    def validate(self) -> "JobSpec":
        self.quant.validate()
        if self.samples < 1:
            raise SpecError(f"--samples {self.samples} is invalid: use at least 1 calibration sample (128 by default)")
        if self.seq_len < 8:
            raise SpecError(f"--seq-len {self.seq_len} is too short: use at least 8 tokens (2048 by default)")
        if self.fmt not in FORMATS:
            raise SpecError(f"--format {self.fmt!r} is unknown: choose one of {', '.join(FORMATS)}")
        q = self.quant
        if self.fmt == "compressed" and q.act_order and q.group_size != -1 and not q.static_groups and q.method != "rtn":
            raise SpecError("--act-order regroups columns, and compressed-tensors stores no g_idx: add --static-groups "
                            "(groups stay contiguous) or export with --format fake")
        if self.shard_tokens < 1:
            raise SpecError(f"--shard-tokens {self.shard_tokens} is invalid: use at least 1 token per shard (8192 by default)")
        if self.dtype not in DTYPES:
            raise SpecError(f"--dtype {self.dtype!r} is unknown: choose auto or one of {', '.join(DTYPES)}")
        if self.partition_tokens < 0:
            raise SpecError(f"--partition-tokens {self.partition_tokens} is invalid: use 0 (chosen from the model's "
                            "shapes) or a number of tokens per statistics partition")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "JobSpec":
        d = dict(d)
        d["quant"] = QuantSpec(**d.get("quant", {}))
        return cls(**d)


# Where the model and the data lie is not part of a job: their content is, through the digests.
PATH_FIELDS = ("model", "calib")


def fingerprint(spec: JobSpec, model_digest: str, data_digest: str) -> str:
    """A short stable id for (model bytes, encoded data, options): the same job gets the same id, whichever
    path (relative, absolute, a copy elsewhere) reaches its model and data."""
    from .store.keys import STORE_FORMAT

    options = {k: v for k, v in spec.to_dict().items() if k not in PATH_FIELDS}
    # The store format is part of the id: a new format stages a new job instead of reading an old one's objects.
    payload = json.dumps({"spec": options, "model": model_digest, "data": data_digest, "format": STORE_FORMAT},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def farm_dtype_note(option: str, dtype: str, devices: list[str]) -> str | None:
    """What to tell a user whose farm job computes in a half dtype (--dtype auto takes a farm's workers for
    GPUs) while every live worker is a CPU, which has no fast half-precision matmul; None otherwise. The
    dtype stays as resolved: a job's numbers must not depend on which workers happen to be up."""
    if option != "auto" or dtype == "float32" or not devices or any(str(d).startswith("cuda") for d in devices):
        return None
    return (f"note: --dtype auto computes this {dtype} checkpoint in {dtype} on a farm, and every live worker "
            f"({len(devices)}) is a CPU, where {dtype} matmuls are several times slower than float32 ones; for "
            "a CPU farm pass --dtype float32 (the numbers an embedded run on a CPU computes)")


def resolve_dtype(option: str, checkpoint_dtype: str, device: str, farm: bool) -> str:
    """--dtype auto -> the checkpoint's dtype where a GPU computes (a farm's workers, --device cuda), float32 on
    a CPU (which has no fast bfloat16 matmul); an explicit dtype as it is."""
    if option != "auto":
        return option
    gpu = farm or str(device).startswith("cuda")
    return checkpoint_dtype if gpu and checkpoint_dtype in DTYPES else "float32"
