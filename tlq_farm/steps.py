"""The farm's task bodies: each reads its inputs from the store, calls tlq_farm.block, writes its outputs.

Protocol of every task (`execute`): cancelled job -> nothing; outputs committed -> skip; compute; write the
outputs (checksummed, committed by the store); write a task-log record. The caller then advances the job.
`run_embedded` runs the same tasks through the same reconciler in this process.

Fault injection for tests (environment): TLQ_FAULT_SLEEP="kind:seconds[,kind:seconds]" sleeps before a
kind computes ('*' for every kind); TLQ_FAULT_CRASH="<task name>" exits the process (as a kill would)
when that task starts computing, once per TLQ_FAULT_CRASH_FLAG file (the flag is created on the crash).
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import time
import uuid
from pathlib import Path

import torch

from . import block as B
from . import plan
from .models.adapter import Layout, copy_module, linear_names
from .plan import Task
from .quant import QuantResult, fold_cross_terms
from .quant.grid import dequantize_grouped, pack_codes, unpack_codes
from .quant.hessian import pack_upper_
from .reuse import ForwardReuse, final_modules, tail_linears
from .spec import JobSpec
from .store import CorruptObject, NotCommitted, Store, keys
from .store.tensors import get_json, get_tensors, get_tensors_and_metadata, put_json, put_tensors, tensor_bytes

SEP = "|"


# ----------------------------------------------------------------------------------------------- serialization

# A kwarg passed as None is stored as an empty tensor under this prefix of its name.
NONE = "none:"


def captured_to_tensors(index: int, c: B.Captured) -> dict[str, torch.Tensor]:
    out = {f"s{index:06d}{SEP}index": torch.tensor(c.kw_index, dtype=torch.int64)}
    for j, kw in enumerate(c.kwargs_sets):
        for name, t in B.flatten_kwargs(kw).items():
            if t is None:
                out[f"s{index:06d}{SEP}{j}{SEP}{NONE}{name}"] = torch.empty(0)
            else:
                out[f"s{index:06d}{SEP}{j}{SEP}{name}"] = t
    return out


def kwargs_from_tensors(tensors: dict[str, torch.Tensor]) -> dict[int, tuple[list[dict], list[int]]]:
    """sample index -> (kwargs sets, kw_index) from a stored kwargs object."""
    flat: dict[int, dict[int, dict[str, torch.Tensor]]] = {}
    index: dict[int, list[int]] = {}
    for name, t in tensors.items():
        parts = name.split(SEP, 2)
        i = int(parts[0][1:])
        if parts[1] == "index":
            index[i] = [int(x) for x in t.tolist()]
        elif parts[2].startswith(NONE):
            flat.setdefault(i, {}).setdefault(int(parts[1]), {})[parts[2][len(NONE):]] = None
        else:
            flat.setdefault(i, {}).setdefault(int(parts[1]), {})[parts[2]] = t
    # A set with no tensors (a block that takes none) stores nothing: it is the empty set.
    return {i: ([B.unflatten_kwargs(flat.get(i, {}).get(j, {})) for j in range(max(index[i]) + 1)], index[i])
            for i in index}


def sample_tensors(sample: dict) -> dict[str, torch.Tensor]:
    """The tensors of an encoded calibration sample (what is staged and hashed of it)."""
    return {k: v for k, v in sample.items() if isinstance(v, torch.Tensor)}


def samples_to_tensors(start: int, samples: list[dict]) -> dict[str, torch.Tensor]:
    """Encoded calibration samples start, start + 1, ... as one object's tensors ('s<index>|<name>')."""
    return {f"s{start + i:06d}{SEP}{n}": t for i, s in enumerate(samples) for n, t in sample_tensors(s).items()}


def samples_from_tensors(tensors: dict[str, torch.Tensor]) -> list[dict]:
    """samples_to_tensors reversed: the samples in index order."""
    out: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        i, _, n = name.partition(SEP)
        out.setdefault(int(i[1:]), {})[n] = t
    return [out[i] for i in sorted(out)]


def per_sample_to_tensors(prefix: str, values) -> dict[str, torch.Tensor]:
    """A list of per-sample tensors (or a dict name -> list) as 'name|i' tensors; '*' names a plain list."""
    if isinstance(values, dict):
        return {f"{n}{SEP}{i}": t for n, ts in values.items() for i, t in enumerate(ts)}
    return {f"{prefix}{SEP}{i}": t for i, t in enumerate(values)}


def per_sample_from_tensors(tensors: dict[str, torch.Tensor]):
    groups: dict[str, dict[int, torch.Tensor]] = {}
    for name, t in tensors.items():
        n, _, i = name.rpartition(SEP)
        groups.setdefault(n, {})[int(i)] = t
    lists = {n: [d[i] for i in sorted(d)] for n, d in groups.items()}
    return lists["*"] if set(lists) == {"*"} else lists


def qresult_to_tensors(res: QuantResult) -> dict[str, torch.Tensor]:
    """A quantized linear as stored: packed codes, scales, zeros, g_idx (+ perm), no dequantized copy; the
    weight is scale * (code - zero), recomputed on read bit for bit (the solvers compute it so)."""
    out = {"codes": pack_codes(res.codes, res.bits), "scale": res.scale, "zero": res.zero, "g_idx": res.g_idx}
    if res.perm is not None:
        out["perm"] = res.perm
    return out


@torch.no_grad()
def apply_stored_qweight(store: Store, key: str, block: torch.nn.Module, name: str) -> None:
    """Set the linear `name` of `block` to its quantized weight stored under `key`, rebuilt a slab of rows at a
    time: the same values as apply_qweight(block, name, qresult_from_store(...)[0]), without the whole
    linear's int32 codes and float32 weight beside their temporaries (16 bytes a weight: 1.1 GB for a 7B
    MLP projection)."""
    import json

    t, metadata = get_tensors_and_metadata(store, key)
    bits = json.loads(metadata["tlq"])["bits"]
    weight = block.get_submodule(name).weight
    in_f = t["g_idx"].numel()
    flat = weight.view(-1, in_f)
    rows = max(1, plan.REBUILD_WEIGHTS // in_f)
    for r0 in range(0, flat.shape[0], rows):
        r1 = min(r0 + rows, flat.shape[0])
        codes = unpack_codes(t["codes"][r0:r1], bits, in_f)
        flat[r0:r1].copy_(dequantize_grouped(codes, t["scale"][r0:r1], t["zero"][r0:r1], t["g_idx"]))


def qresult_from_store(store: Store, key: str) -> tuple[QuantResult, dict]:
    import json

    t, metadata = get_tensors_and_metadata(store, key)
    meta = json.loads(metadata["tlq"])
    codes = unpack_codes(t["codes"], meta["bits"], t["g_idx"].numel())
    res = QuantResult(weight=dequantize_grouped(codes, t["scale"], t["zero"], t["g_idx"]), codes=codes,
                      scale=t["scale"], zero=t["zero"], g_idx=t["g_idx"], loss=meta["loss"], bits=meta["bits"],
                      group_size=meta["group_size"], sym=meta["sym"], perm=t.get("perm"), damp_used=meta["damp_used"])
    return res, meta


# ----------------------------------------------------------------------------------------------- model pieces

@contextlib.contextmanager
def _construct_on_meta(cls: type):
    """Modules of class `cls` built inside this context get their parameters on the meta device."""
    original = cls.__init__

    def init(self, *args, **kwargs):
        with torch.device("meta"):
            original(self, *args, **kwargs)

    cls.__init__ = init
    try:
        yield
    finally:
        cls.__init__ = original


# Staged objects up to this size are read through one mapping of their file (load_staged).
SMALL_STAGED_BYTES = 64 * 2**20


class JobContext:
    """What every task of one job shares: manifest, spec, config and the meta-device module tree."""

    def __init__(self, store: Store, job: str, device: str = "cpu"):
        from .staging import check_format

        self.store, self.job, self.device = store, job, device
        self.manifest = check_format(get_json(store, keys.manifest(job)))
        self.spec = JobSpec.from_dict(self.manifest["spec"])
        self.layout = Layout(**self.manifest["layout"])
        self.dtype = getattr(torch, self.spec.dtype)  # what blocks compute in and activations are stored in
        self._files_dir = tempfile.TemporaryDirectory(prefix=f"tlq-{job}-")
        self.files_dir = Path(self._files_dir.name)
        self._config = None
        self._meta = None
        self._groups = None
        self._state = None
        self._staged_copy: tuple[str, Path] | None = None  # (key, local file) of the last staged object read
        self._prefix_cache: dict[str, tuple[dict, int]] = {}  # key -> (tensors, bytes), least recently used first
        # Set by execute while a task runs: its task-log record as of now (the export reports itself).
        self.current_record = None

    def staged_files(self) -> Path:
        """A folder holding the model's side files (config, tokenizer, processor), fetched once."""
        for name in self.manifest["files"]:
            if not (self.files_dir / name).exists():
                self.store.get_file(keys.staged_file(self.job, name), self.files_dir / name)
        return self.files_dir

    @property
    def config(self):
        if self._config is None:
            from .staging import model_config

            self.store.get_file(keys.staged_file(self.job, "config.json"), self.files_dir / "config.json")
            self._config = model_config(self.files_dir)
        return self._config

    @property
    def meta(self):
        """The module tree on the meta device, in the checkpoint's dtype (what the export writes)."""
        if self._meta is None:
            from .staging import meta_model

            self._meta = meta_model(self.config, getattr(torch, self.manifest.get("checkpoint_dtype", "float32")))
        return self._meta

    @property
    def groups(self) -> dict:
        if self._groups is None:
            self._groups = get_json(self.store, keys.plan_groups(self.job))
        return self._groups

    def names(self, b: int, tower: str | None = None) -> list[str]:
        return plan.block_plan(self.groups, b, tower)["names"]

    def outputs(self, task: Task) -> list[str]:
        """Keys `task` writes (plan.outputs); only a quantize task's need the plan's groups."""
        return plan.outputs(task, self.manifest, self.groups if task.kind == "quantize" else None)

    def module_from_meta(self, path: str, key: str, strip: str = "") -> torch.nn.Module:
        """A copy of the meta module at `path`, materialized and filled from the staged object `key` (its
        tensors whose names start with `strip`, less that prefix): every tensor of the module, no other."""
        module = copy_module(self.meta.get_submodule(path)).to(dtype=self.dtype).to_empty(device=self.device)
        persistent = set(module.state_dict())
        buffers = {n for n, _ in module.named_buffers()}
        if buffers - persistent:
            raise RuntimeError(f"{path} holds buffers that no checkpoint stores ({sorted(buffers - persistent)[:3]}): "
                               "it cannot be rebuilt from its staged weights")
        self.load_staged(module, key, strip=strip, complete=True)
        return module.eval().requires_grad_(False)

    def blocks_path(self, tower: str | None = None) -> str:
        return self.layout.vision_blocks if tower else self.layout.blocks

    def block(self, b: int, qweights: list[str] = (), tower: str | None = None, reads: list[str] = ()
              ) -> torch.nn.Module:
        """Block b of a tower from its staged weights, with the named modules' quantized weights applied.
        reads: other objects the task reads next, looked up with the block's (Store.prefetch)."""
        staged = keys.staged_block(self.job, b, tower)
        held = self._staged_copy is not None and self._staged_copy[0] == staged  # no read of it then
        self.store.prefetch([*([] if held else [staged]), *(keys.qweights(self.job, b, m, tower) for m in qweights), *reads])
        blk = self.module_from_meta(f"{self.blocks_path(tower)}.{b}", staged)
        for m in qweights:
            apply_stored_qweight(self.store, keys.qweights(self.job, b, m, tower), blk, m)
        return blk

    def prefix_model(self) -> torch.nn.Module:
        """The model with its decoder blocks and its (untied) head on the meta device (embed): the prefix
        (vision tower, projector, embeddings, rotary) is real, built as the full model builds it; the
        blocks and the head hold no memory. Falls back to the full model where the vision tower's blocks
        are of the decoder's class."""
        from .staging import model_class_for

        block_cls = type(self.meta.get_submodule(self.layout.blocks)[0])
        vision = self.meta.get_submodule(self.layout.vision_blocks) if self.layout.vision_blocks else None
        if vision is not None and len(vision) and isinstance(vision[0], block_cls):
            return self.full_model()
        torch.manual_seed(self.spec.seed)
        with _construct_on_meta(block_cls), torch.device(self.device):
            model = model_class_for(self.config).from_config(self.config, dtype=self.dtype,
                                                             attn_implementation="sdpa")
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        inputs = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if head is not None and inputs is not None and head.weight is not inputs.weight:
            head.to("meta")  # the capture never reaches the head; an untied one is dropped
        return model.eval().requires_grad_(False)

    def full_model(self) -> torch.nn.Module:
        """The whole float model built from the config (prefix_model's fallback; the caller fills it)."""
        from .staging import model_class_for

        torch.manual_seed(self.spec.seed)
        model = model_class_for(self.config).from_config(self.config, dtype=self.dtype, attn_implementation="sdpa")
        model.eval().requires_grad_(False).to(self.device)
        return model

    def staged_file(self, key: str) -> Path:
        """A verified local copy of the staged object `key`, kept for the next call (one object at a time):
        a block's solves each read one weight of the same block (0.47 GB at 7B, read and hashed 14 times a
        block otherwise), and staged objects never change within a job."""
        if self._staged_copy is None or self._staged_copy[0] != key:
            if self._staged_copy is not None:
                self._staged_copy[1].unlink(missing_ok=True)
            self._staged_copy = None
            path = self.files_dir / f".staged-{uuid.uuid4().hex}.safetensors"
            self.store.get_file(key, path)
            self._staged_copy = (key, path)
        return self._staged_copy[1]

    def staged_tensor(self, key: str, name: str) -> torch.Tensor:
        """One tensor of the staged object `key` (from staged_file)."""
        from safetensors import safe_open

        with safe_open(str(self.staged_file(key)), "pt") as f:
            return f.get_tensor(name)

    def load_staged(self, model: torch.nn.Module, key: str, prefix: str = "", strip: str = "",
                    complete: bool = False) -> None:
        """Fill `model`'s tensors from the staged object `key`: a staged tensor named `strip` + n goes to the
        model's tensor `prefix` + n (staged names without `strip` are not the model's); with `complete`, every
        tensor of the model must be among them. Read one tensor at a time from the object's local copy
        (staged_file), a large object with one mapping of the file per tensor: never the object's bytes and
        its tensors in memory at once, as a plain read would hold (a 7B block: 0.47 GB more), and no download
        or hash of an object this context already holds (a block's stats, propagate and solves all read the
        same one)."""
        from safetensors import safe_open

        path = str(self.staged_file(key))
        with safe_open(path, "pt") as f:
            names = {prefix + n[len(strip):]: n for n in f.keys() if n.startswith(strip)}
        targets = model.state_dict()
        unexpected = sorted(set(names) - set(targets))
        missing = sorted(set(targets) - set(names)) if complete else []
        if unexpected or missing:
            raise RuntimeError(f"staged weights {key!r} do not match the model: unexpected {unexpected[:3]}, "
                               f"missing {missing[:3]}; stage the job again")

        def read():
            # A small object through one mapping (its pages are few); a large one through one mapping per
            # tensor, so that only the tensor being copied is resident.
            if os.path.getsize(path) <= SMALL_STAGED_BYTES:
                with safe_open(path, "pt") as f:
                    yield from ((target, f.get_tensor(name)) for target, name in names.items())
                return
            for target, name in names.items():
                with safe_open(path, "pt") as f:
                    tensor = f.get_tensor(name)
                yield target, tensor

        with torch.no_grad():
            for target, tensor in read():
                name = names[target]
                if tensor.shape != targets[target].shape:
                    raise RuntimeError(f"staged tensor {name!r} of {key!r} has shape {list(tensor.shape)}, the model's "
                                       f"{target!r} {list(targets[target].shape)}; stage the job again")
                targets[target].copy_(tensor)
                del tensor

    def load_prefix(self, model: torch.nn.Module, quantized_vision: bool = False) -> None:
        """Fill the prefix of `model` (prefix_model): the staged embed piece and the vision tower's blocks,
        with their quantized weights where the tower was quantized."""
        self.load_staged(model, keys.staged_embed(self.job))
        for vb in range(self.manifest.get("n_vision_blocks", 0)):
            self.load_staged(model, keys.staged_block(self.job, vb, "vision"), f"{self.layout.vision_blocks}.{vb}.")
            if quantized_vision:
                blk = model.get_submodule(f"{self.layout.vision_blocks}.{vb}")
                for m in self.names(vb, "vision"):
                    apply_stored_qweight(self.store, keys.qweights(self.job, vb, m, "vision"), blk, m)

    def to_device(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in tensors.items()}

    def samples(self, k: int) -> list[dict]:
        """The encoded calibration samples of shard k, in order."""
        return samples_from_tensors(self.to_device(get_tensors(self.store, keys.calib_shard(self.job, k))))

    def prefix_tensors(self, key: str) -> dict[str, torch.Tensor]:
        """The tensors of a per-shard object of the prefix (kwargs, token masks: the same for every block, and
        read by each of a block's tasks), on the device. Kept in host memory for later tasks, within
        plan.PREFIX_CACHE_BYTES: a GPU worker holds none of it between tasks. Its readers build their own
        containers around the tensors and never write into them."""
        entry = self._prefix_cache.pop(key, None)
        if entry is None:
            tensors = get_tensors(self.store, key)
            entry = (tensors, tensor_bytes(tensors))
        self._prefix_cache[key] = entry
        total = 0
        for k in reversed(list(self._prefix_cache)):
            total += self._prefix_cache[k][1]
            if total > plan.PREFIX_CACHE_BYTES and k != key:
                del self._prefix_cache[k]
        return self.to_device(entry[0])

    def captured(self, chain: str, b: int, k: int, tower: str | None = None) -> list[B.Captured]:
        """Samples of shard k at the entry of block b of a tower on a chain (plan.acts_key)."""
        start, end = self.manifest["shards"][k]
        kw = kwargs_from_tensors(self.prefix_tensors(keys.block_kwargs(self.job, k, tower)))
        acts = self.acts(chain, b, k, tower)
        return [B.Captured(h, *kw[i]) for i, h in zip(range(start, end), acts)]

    def acts(self, chain: str, b: int, k: int, tower: str | None = None) -> list[torch.Tensor]:
        """Per sample of shard k: its hidden states entering block b on a chain (or its gradient, chain
        "grads": dL/d(input of block b))."""
        start, end = self.manifest["shards"][k]
        key = keys.grads(self.job, b, k) if chain == "grads" else plan.acts_key(self.manifest, chain, b, k, tower)
        acts = get_tensors(self.store, key)
        return [acts[f"s{i:06d}"].to(self.device) for i in range(start, end)]

    def token_masks(self, k: int) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """(valid [T] float, vision [T] bool, labels [1, T]) of each sample of shard k."""
        masks = per_sample_from_tensors(self.prefix_tensors(keys.token_masks(self.job, k)))
        return masks["valid"], masks["vision"], masks["labels"]

    def importance_state(self, k: int | None = None) -> dict:
        """The global importance pass's state (read once: immutable once committed), per-sample lists restricted
        to shard k's samples."""
        if self._state is None:
            self._state = self.to_device(get_tensors(self.store, keys.importance_state(self.job)))
        if k is None:
            return shard_state(self._state, 0, self.manifest["n_samples"])
        return shard_state(self._state, *self.manifest["shards"][k])

    def token_weights(self, b: int, k: int) -> list | dict:
        """Token weights of block b on shard k: the weights task's, or the strategy's from the token masks
        (and the global pass's state)."""
        from .importance import get_strategy

        if plan.needs_weight_tasks(self.manifest):
            return per_sample_from_tensors(self.to_device(get_tensors(self.store, keys.token_weights(self.job, b, k))))
        valid, vision, _ = self.token_masks(k)
        state = self.importance_state(k) if plan.needs_global_importance(self.manifest) else {}
        return get_strategy(self.spec.quant.importance).token_weights(b, valid, vision, state)


def _inputs(captured: list[B.Captured], b: int) -> list[B.SampleInput]:
    return [(c.hidden, c.kwargs(b)) for c in captured]


def _acts_tensors(start: int, hidden: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"s{start + i:06d}": h for i, h in enumerate(hidden)}


# ----------------------------------------------------------------------------------------------- task bodies

@torch.no_grad()
def do_embed(ctx: JobContext, task: Task) -> None:
    """The full-precision prefix on shard k: what enters the decoder's first block (and, for
    --quantize-vision, the vision tower's), the kwargs of every block, the samples' token masks."""
    from .calib.data import model_inputs

    k = task.shard
    start, end = ctx.manifest["shards"][k]
    vision = plan.quantize_vision(ctx.manifest)
    model = ctx.prefix_model()
    # The forward stops before the final norm and the head: only the prefix's weights are needed.
    ctx.load_prefix(model)
    blocks = ctx.layout.decoder_blocks(model)
    kwargs, hidden, masks, v_kwargs, v_hidden = {}, [], {}, {}, []
    samples = ctx.samples(k)
    for i, c in enumerate(B.capture_many(model, blocks, [model_inputs(s) for s in samples])):
        kwargs.update(captured_to_tensors(start + i, c))
        hidden.append(c.hidden)
    for i, s in enumerate(samples):
        if vision:  # one sample at a time: a batch's patches would share one vision sequence
            c = B.capture(model, ctx.layout.vision_block_list(model), model_inputs(s), run_blocks=False)
            v_kwargs.update(captured_to_tensors(start + i, c))
            v_hidden.append(c.hidden)
        valid = s["attention_mask"].reshape(-1).float()
        vis = s["vision_mask"].reshape(-1).bool() if "vision_mask" in s else torch.zeros_like(valid, dtype=torch.bool)
        masks.update({f"valid{SEP}{start + i}": valid, f"vision{SEP}{start + i}": vis,
                      f"labels{SEP}{start + i}": s["labels"]})
    put_tensors(ctx.store, keys.block_kwargs(ctx.job, k), kwargs)
    put_tensors(ctx.store, keys.token_masks(ctx.job, k), masks)
    if vision:
        put_tensors(ctx.store, keys.block_kwargs(ctx.job, k, "vision"), v_kwargs)
        put_tensors(ctx.store, keys.acts(ctx.job, "q", 0, k, "vision"), _acts_tensors(start, v_hidden))
    # Without a quantized vision tower the prefix is the same on both chains: the q chain's block-0 input.
    put_tensors(ctx.store, keys.acts(ctx.job, "fp" if vision else "q", 0, k), _acts_tensors(start, hidden))


@torch.no_grad()
def do_reembed(ctx: JobContext, task: Task) -> None:
    """The prefix with its quantized vision tower on shard k -> the decoder's q chain at block 0."""
    from .calib.data import model_inputs

    start, end = ctx.manifest["shards"][task.shard]
    model = ctx.prefix_model()
    ctx.load_prefix(model, quantized_vision=True)
    blocks = ctx.layout.decoder_blocks(model)
    captured = B.capture_many(model, blocks, [model_inputs(s) for s in ctx.samples(task.shard)])
    put_tensors(ctx.store, keys.acts(ctx.job, "q", 0, task.shard), _acts_tensors(start, [c.hidden for c in captured]))


def _traced_plan(blk: torch.nn.Module, hidden: torch.Tensor, kwargs: dict, true_sequential: bool) -> dict:
    """One block's linears, their true-sequential groups and shapes, traced by one forward."""
    names = linear_names(blk)
    calls = B.linear_calls(blk, (hidden, kwargs), names)
    classes = B.classes_of(calls)
    groups = B.sequential_groups(blk, None, names, classes) if true_sequential else [names]
    mods = {n: blk.get_submodule(n) for n in names}
    # inputs: linears fed the same tensor, which share one Gram (plan.stat_owners).
    # once: no linear is called twice per forward, so a group's statistics may stop the forward early.
    return {"names": names, "groups": groups, "inputs": classes, "once": B.called_once(calls),
            "in_features": {n: int(m.in_features) for n, m in mods.items()},
            "shapes": {n: [int(m.out_features), int(m.in_features)] for n, m in mods.items()}}


def _on_meta(value):
    """`value` with every tensor in it (through tuples, lists and dicts) as a meta tensor of its shape."""
    if isinstance(value, torch.Tensor):
        return value.to("meta")
    if isinstance(value, (tuple, list)):
        return type(value)(_on_meta(v) for v in value)
    if isinstance(value, dict):
        return {k: _on_meta(v) for k, v in value.items()}
    return value


def _meta_plan(ctx: JobContext, tower: str | None, b: int, sample: B.Captured, true_sequential: bool) -> dict | None:
    """_traced_plan of block b run on the meta device (shapes only: no weights read, nothing computed); None
    where its forward needs values (data-dependent code has no meta kernels)."""
    blk = copy_module(ctx.meta.get_submodule(f"{ctx.blocks_path(tower)}.{b}")).to(dtype=ctx.dtype)
    try:
        return _traced_plan(blk.eval().requires_grad_(False), _on_meta(sample.hidden), _on_meta(sample.kwargs(b)),
                            true_sequential)
    except Exception:  # noqa: BLE001 - any failure only means: trace the real block
        return None


def _block_plans(ctx: JobContext, tower: str | None, sample: B.Captured) -> list[dict]:
    """Every block's plan (_traced_plan) from one sample. Block 0 is traced with its weights; the others on
    the meta device, which reads no block (at 7B a block is 0.47 GB: 13 GB for 28 blocks) and computes
    nothing, wherever the meta trace of block 0 gives block 0's plan; otherwise each block is traced with
    its weights, one at a time."""
    q = ctx.spec.quant
    true_sequential = q.true_sequential and q.method != "rtn"
    first = _traced_plan(ctx.block(0, tower=tower), sample.hidden, sample.kwargs(0), true_sequential)
    on_meta = _meta_plan(ctx, tower, 0, sample, true_sequential) == first
    out = [first]
    for b in range(1, plan.tower_blocks(ctx.manifest, tower)):
        traced = _meta_plan(ctx, tower, b, sample, true_sequential) if on_meta else None
        out.append(traced if traced is not None else
                   _traced_plan(ctx.block(b, tower=tower), sample.hidden, sample.kwargs(b), true_sequential))
    return out


@torch.no_grad()
def do_groups(ctx: JobContext, task: Task) -> None:
    # The decoder's plan from a full-precision input: it does not depend on the vision tower's quantization.
    out = {"blocks": _block_plans(ctx, None, ctx.captured("fp", 0, 0)[0])}
    if plan.quantize_vision(ctx.manifest):
        out["vision"] = _block_plans(ctx, "vision", ctx.captured("q", 0, 0, "vision")[0])
    put_json(ctx.store, keys.plan_groups(ctx.job), out)


@torch.no_grad()
def do_forward(ctx: JobContext, task: Task) -> None:
    """The full-precision chain one block on (and tlq's RTN chain beside it)."""
    b, k, t = task.block, task.shard, task.tower
    start, _ = ctx.manifest["shards"][k]
    blk = ctx.block(b, tower=t)
    out = B.propagate(blk, _inputs(ctx.captured("fp", b, k, t), b), pack=t is None)
    put_tensors(ctx.store, keys.acts(ctx.job, "fp", b + 1, k, t), _acts_tensors(start, out))
    if keys.acts(ctx.job, "rtn", b + 1, k) in plan.outputs(task, ctx.manifest):
        q = ctx.spec.quant
        proxy = B.rtn_proxy(blk, ctx.names(b), q)
        out = B.propagate(proxy, _inputs(ctx.captured("rtn", b, k), b), act_bits=q.act_bits, act_names=ctx.names(b))
        put_tensors(ctx.store, keys.acts(ctx.job, "rtn", b + 1, k), _acts_tensors(start, out))


def do_backward(ctx: JobContext, task: Task) -> None:
    """One step of the backward chain on one shard: dL/d(input of block b) from the gradient at its output
    (b = n_blocks: from the LM loss of the head on answer tokens), and what it says of the tokens."""
    from .importance import get_strategy

    b, k = task.block, task.shard
    start, _ = ctx.manifest["shards"][k]
    valid, vision, labels = ctx.token_masks(k)
    if b == ctx.manifest["n_blocks"]:
        norm = ctx.module_from_meta(ctx.layout.norm, keys.staged_head(ctx.job), ctx.layout.norm + ".") \
            if ctx.layout.norm else None
        head = ctx.module_from_meta(ctx.layout.head, keys.staged_head(ctx.job), ctx.layout.head + ".")
        xf = ctx.acts("fp", b, k)
        grads = [B.head_grad(norm, head, h, lab)[0] for h, lab in zip(xf, labels)]
    else:
        cap = ctx.captured("fp", b, k)
        xf = [c.hidden for c in cap]
        grads = B.block_vjp_batched(ctx.block(b), _inputs(cap, b), ctx.acts("grads", b + 1, k))
    outs = plan.outputs(task, ctx.manifest)
    if keys.importance_scores(ctx.job, b, k) in outs:
        xq = ctx.acts("rtn", b, k) if plan.needs_rtn_chain(ctx.manifest) and b > 0 else None
        scores = get_strategy(ctx.spec.quant.importance).shard_scores(b, grads, xf, xq, vision, valid)
        put_tensors(ctx.store, keys.importance_scores(ctx.job, b, k), per_sample_to_tensors("*", scores))
    if keys.grads(ctx.job, b, k) in outs:
        put_tensors(ctx.store, keys.grads(ctx.job, b, k), _acts_tensors(start, grads))


def do_importance(ctx: JobContext, task: Task) -> None:
    """Every shard's scores (small: per token, or per block) -> the strategy's global state."""
    from .importance import get_strategy

    n_shards = len(ctx.manifest["shards"])
    masks = [ctx.token_masks(k) for k in range(n_shards)]
    valid = [v for m in masks for v in m[0]]
    vision = [v for m in masks for v in m[1]]
    per_block = [[x for k in range(n_shards) for x in per_sample_from_tensors(
        get_tensors(ctx.store, keys.importance_scores(ctx.job, b, k)))] for b in plan.score_blocks(ctx.manifest)]
    state = get_strategy(ctx.spec.quant.importance).reduce_scores(per_block, vision, valid, ctx.spec.quant)
    out = {}
    for name, v in state.items():
        if isinstance(v, torch.Tensor):
            out[name] = v
        else:
            out.update({f"{name}{SEP}{i}": t for i, t in enumerate(v)})
    put_tensors(ctx.store, keys.importance_state(ctx.job), out)


def shard_state(tensors: dict[str, torch.Tensor], start: int, end: int) -> dict:
    """The importance state restricted to samples [start, end): per-sample lists are sliced, re-indexed."""
    state: dict = {}
    lists: dict[str, dict[int, torch.Tensor]] = {}
    for name, t in tensors.items():
        if SEP in name:
            n, _, i = name.rpartition(SEP)
            lists.setdefault(n, {})[int(i)] = t
        else:
            state[name] = t
    for n, d in lists.items():
        state[n] = [d[i] for i in range(start, end)]
    return state


# Submodule outputs kept between a block's forwards in this process (tlq_farm.reuse), all jobs together.
REUSE = ForwardReuse(plan.REUSE_BYTES)


def reuse_scope(ctx: JobContext, tower: str | None, block: int, chain: str | None = None) -> tuple:
    """The scope of a block's kept outputs (ForwardReuse); without chain, the prefix of both chains'."""
    scope = (ctx.store.url, ctx.job, tower or "", block)
    return scope if chain is None else scope + (chain,)


def do_weights(ctx: JobContext, task: Task) -> None:
    """Token weights of a block-local strategy (vlmq, qig) on one shard."""
    from .importance import ImportanceContext, get_strategy

    b, k = task.block, task.shard
    q_cap = ctx.captured("q", b, k)
    fp_cap = ctx.captured("fp", b, k) if plan.needs_fp_chain(ctx.manifest) else None
    valid, vision, _ = ctx.token_masks(k)
    weights = get_strategy(ctx.spec.quant.importance).block_weights(
        ImportanceContext(ctx.spec.quant, valid, vision), b, ctx.block(b), ctx.names(b), _inputs(q_cap, b),
        _inputs(fp_cap, b) if fp_cap else None)
    put_tensors(ctx.store, keys.token_weights(ctx.job, b, k), per_sample_to_tensors("*", weights))


def group_sums(ctx: JobContext, task: Task) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Statistics of one group over one partition (a stats or quantize task's): its shards streamed through the
    block one at a time, each in its batches (block.make_batches), summed in place -> (the partial's tensors as
    stored, owners: linear -> the linear holding its sums; linears sharing a Gram hold it once)."""
    q = ctx.spec.quant
    b, g, t = task.block, task.group, task.tower
    block_plan = plan.block_plan(ctx.groups, b, t)
    groups = block_plan["groups"]
    shards = plan.partition_shards(plan.stat_partitions(ctx.manifest, ctx.groups, b, t),
                                   len(ctx.manifest["shards"]), task.shard or 0)
    gptaq = q.method == "gptaq"
    blk = ctx.block(b, [m for gg in range(g) for m in groups[gg]], t,
                    reads=[plan.acts_key(ctx.manifest, name, b, k, t) for name in ("q", "fp")[:1 + gptaq] for k in shards])
    fp_blk = ctx.block(b, tower=t) if gptaq else None
    once = block_plan.get("once", False)

    def chain(name: str):
        for k in shards:  # one shard's activations alive at a time
            inputs = _inputs(ctx.captured(name, b, k, t), b)
            weights = None
            if name == "q":  # a vision tower's tokens all weigh the same
                weights = [torch.ones(h.shape[:-1]) for h, _ in inputs] if t else ctx.token_weights(b, k)
            batches = B.make_batches(inputs, weights, pack=t is None)
            del inputs, weights  # packed batches are copies: the shard's own tensors need not stay alive
            for j, batch in enumerate(batches):
                batch.key = (k, j)
            yield from B.handed_out(batches)

    with contextlib.ExitStack() as stack:
        # Where no linear runs twice in a forward, what the earlier groups alone compute is kept and served
        # (tlq_farm.reuse): the same numbers, computed once per batch instead of once per group.
        # The full-precision chain's last forward through the block is its last group's; the quantized chain's
        # is the propagate, where there is one.
        last = g == len(groups) - 1
        keep = {"q": not (last and b == plan.tower_blocks(ctx.manifest, t) - 1), "fp": not last}
        reuse = {name: stack.enter_context(REUSE.stage(block, reuse_scope(ctx, t, b, name),
                                                       final_modules(block, groups, g), keep=keep[name],
                                                       tails=tail_linears(block, groups, g)))
                 for name, block in (("q", blk), ("fp", fp_blk)) if once and block is not None}
        products = plan.product_cross_terms(ctx.manifest["spec"]["quant"], groups[g], block_plan.get("inputs"),
                                            block_plan.get("shapes"))
        stats = B.accumulate_stats(blk, chain("q"), None, groups[g], act_bits=q.act_bits, act_names=ctx.names(b, t),
                                   fp_block=fp_blk, fp_inputs=chain("fp") if gptaq else None, need_fp_gram=gptaq,
                                   stop_early=once, q_reuse=reuse.get("q"), fp_reuse=reuse.get("fp"),
                                   products=products)
    for name in [n for n in keep if not keep[n]]:
        for k in shards:
            REUSE.forget(reuse_scope(ctx, t, b, name), (k,))
    owners = B.stat_owners(stats)
    out = {}
    if gptaq:  # each linear's W D and tr(W Hfp W^T) instead of the owner's [in, in] D and Hfp
        for m in owners:
            folded = {n: stats[m][n] for n in ("WD", "WHfpW")} if m in products else \
                fold_cross_terms(blk.get_submodule(m).weight.detach(), stats[m])
            out.update({f"{m}{SEP}{name}": x for name, x in folded.items()})
    for m in sorted(set(owners.values())):
        sums = stats[m]
        # H as its upper block triangle, packed in its own storage: half the bytes of a symmetric sum.
        out.update({f"{m}{SEP}{'H_upper' if name == 'H' else name}": pack_upper_(x) if name == "H" else x
                    for name, x in sums.items() if name not in ("D", "Hfp", "WD", "WHfpW")})
    return out, owners


def do_stats(ctx: JobContext, task: Task) -> None:
    """One partition's partial statistics of a group, stored for the group's solve tasks."""
    import json

    out, owners = group_sums(ctx, task)
    put_tensors(ctx.store, keys.stats(ctx.job, task.block, task.group, task.shard, task.tower), out,
                metadata={"tlq": json.dumps({"owners": owners}, sort_keys=True)})


def do_quantize(ctx: JobContext, task: Task) -> None:
    """A group's statistics over the block's one partition and its linears' solves (plan.solves_in_place): the
    same numbers as stats and solve tasks (the same packed partial, reduced alone), without its round trip
    through the store. Linears sharing a Gram share its factor (plain GPTQ), as in one process's solves."""
    import json

    b, g, t = task.block, task.group, task.tower
    out, owners = group_sums(ctx, task)
    metadata = {"tlq": json.dumps({"owners": owners}, sort_keys=True)}
    members = plan.block_plan(ctx.groups, b, t)["groups"][g]
    last_reader = {owners.get(m): m for m in members}
    factors: dict[str, tuple] = {}
    for m in members:
        weight = ctx.staged_tensor(keys.staged_block(ctx.job, b, t), f"{m}.weight").float().to(ctx.device)
        part = stored_partial(out, metadata, m)
        # What no later linear reads leaves `out`, so that the reduction frees it as it adds it: the float32
        # Gram is gone before the factorisation (1.43 GB at 18944 columns).
        owner = owners.get(m)
        for name in [n for n in out if n in (f"{m}{SEP}WD", f"{m}{SEP}WHfpW")
                     or (last_reader[owner] == m and n.startswith(f"{owner}{SEP}"))]:
            del out[name]
        res, counts = solve_module(weight, [] if part is None else [part], ctx.spec.quant, factors, owner)
        del weight, part
        _put_qweight(ctx, task, m, res, counts)


def stored_partial(tensors: dict[str, torch.Tensor], metadata: dict[str, str], module: str) -> dict | None:
    """One module's statistics in a stored partial: the sums of the linear that holds its Gram (H, w_sum,
    tokens), and for GPTAQ its own W D and tr(W Hfp W^T). None: no sample reached it."""
    import json

    owner = json.loads(metadata["tlq"])["owners"].get(module)
    if owner is None:
        return None
    out = {name[len(owner) + 1:]: t for name, t in tensors.items() if name.startswith(owner + SEP)
           and name[len(owner) + 1:] not in ("WD", "WHfpW")}
    out.update({name[len(module) + 1:]: t for name, t in tensors.items()
                if name in (f"{module}{SEP}WD", f"{module}{SEP}WHfpW")})
    return out


def solve_module(weight: torch.Tensor, partials, q, factors: dict, owner: str | None) -> tuple:
    """One linear's solve from its partials (read one at a time) -> (QuantResult, counts). factors: owner ->
    (HessianFactor, counts) of the linears solved before in this process from the same sums; plain GPTQ
    reuses the factor of the owner of this linear's sums (the same numbers as factoring the same H again)
    and keeps it for the next."""
    if q.method == "gptq" and owner in factors:
        factor, counts = factors[owner]
        return B.solve_with_factor(weight, factor, q), counts
    kept: list = []
    res, counts = B.solve_partials(weight, partials if q.method != "rtn" else iter(()), q,
                                   keep_factor=kept if q.method == "gptq" else None)
    if kept and owner is not None:
        factors[owner] = (kept[0], counts)
    return res, counts


def _put_qweight(ctx: JobContext, task: Task, module: str, res, counts: dict) -> None:
    import json

    # loss None: not measured (RTN has no statistics to measure it on).
    meta = {"loss": None if res.loss is None else float(res.loss), "bits": res.bits, "group_size": res.group_size,
            "sym": res.sym, "damp_used": float(res.damp_used), "group": task.group, **counts}
    put_tensors(ctx.store, keys.qweights(ctx.job, task.block, module, task.tower), qresult_to_tensors(res),
                metadata={"tlq": json.dumps(meta, sort_keys=True)})


# Factored Hessians of shared sums kept by do_solve: (store, job, tower, block, group) -> {"owners": linear ->
# the linear holding its sums, "factors": owner -> (HessianFactor, counts)}; one group at a time.
_FACTORS: dict[tuple, dict] = {}


def do_solve(ctx: JobContext, task: Task) -> None:
    import json

    q = ctx.spec.quant
    b, g, m, t = task.block, task.group, task.module, task.tower
    weight = ctx.staged_tensor(keys.staged_block(ctx.job, b, t), f"{m}.weight").float().to(ctx.device)

    maps: list[dict] = []  # each partition's owners (which linear holds whose sums), as its stats task wrote them

    def partials():
        # One partition's partial read at a time, added in partition order (float64): the same sum for any
        # number of workers.
        for p in plan.stat_partitions(ctx.manifest, ctx.groups, b, t):
            tensors, metadata = get_tensors_and_metadata(ctx.store, keys.stats(ctx.job, b, g, p, t))
            maps.append(json.loads(metadata["tlq"])["owners"])
            part = stored_partial(tensors, metadata, m)
            del tensors
            if part is not None:
                part = ctx.to_device(part)  # the dict the reduction empties: nothing else keeps its tensors
                yield part

    # Linears that share their sums (q/k/v, gate/up: one Gram, say the stored partials) share one Hessian: the
    # first of them solved in this process keeps its factor for the others (solve_module).
    scope = (ctx.store.url, ctx.job, t, b, g)
    entry = _FACTORS.get(scope)
    owner = entry["owners"].get(m) if entry else None
    if owner is not None:
        res, counts = solve_module(weight, partials(), q, entry["factors"], owner)
    else:
        first: dict = {}
        res, counts = solve_module(weight, partials(), q, first, m)
        owners = maps[0] if maps and all(mp == maps[0] for mp in maps) else {}
        if first and sum(o == owners.get(m) for o in owners.values()) > 1:
            # One group's factors at a time: a worker moves on group by group.
            _FACTORS.clear()
            _FACTORS[scope] = {"owners": owners, "factors": {owners[m]: first[m]}}
    _put_qweight(ctx, task, m, res, counts)


@torch.no_grad()
def do_propagate(ctx: JobContext, task: Task) -> None:
    q = ctx.spec.quant
    b, k, t = task.block, task.shard, task.tower
    start, _ = ctx.manifest["shards"][k]
    names = ctx.names(b, t)
    blk = ctx.block(b, names, t, reads=[plan.acts_key(ctx.manifest, "q", b, k, t)])
    block_plan = plan.block_plan(ctx.groups, b, t) if ctx.groups else {}
    batches = B.make_batches(_inputs(ctx.captured("q", b, k, t), b), pack=t is None)
    for j, batch in enumerate(batches):
        batch.key = (k, j)
    with contextlib.ExitStack() as stack:
        reuse = None
        if block_plan.get("once") and q.method != "rtn":
            groups = block_plan["groups"]
            reuse = stack.enter_context(REUSE.stage(blk, reuse_scope(ctx, t, b, "q"),
                                                    final_modules(blk, groups, len(groups)), keep=False))
        q_out = B.propagate(blk, B.handed_out(batches), act_bits=q.act_bits, act_names=names, reuse=reuse)
    REUSE.forget(reuse_scope(ctx, t, b), (k,))  # the shard's last forward through this block
    put_tensors(ctx.store, keys.acts(ctx.job, "q", b + 1, k, t), _acts_tensors(start, q_out))


def farm_report(ctx: JobContext, results_meta: dict[str, dict], quantized_params: int,
                records: list[dict] | None = None) -> dict:
    """tlq_report.json of a farm job: what was computed, and from the task records `records` its time,
    timeline and peak memory (tlq_farm.report.RUN_FIELDS, the only fields that differ between runs)."""
    from .report import loss_sum, summarize_task_records

    modules = {}
    per_block: dict[str, dict[int, list]] = {}
    for name in sorted(results_meta):
        meta = results_meta[name]
        tower = ctx.layout.blocks if name.startswith(ctx.layout.blocks + ".") else ctx.layout.vision_blocks
        b = int(name[len(tower) + 1:].split(".", 1)[0])
        entry = {"loss": meta["loss"], "group": meta["group"], "block": b}
        if "tokens" in meta:
            entry.update(tokens=meta["tokens"], weight_sum=meta["weight_sum"], damp=meta["damp_used"])
        modules[name] = entry
        per_block.setdefault(tower, {}).setdefault(b, []).append(entry["loss"])
    rep = {
        "spec": ctx.manifest["spec"],
        "model_class": ctx.layout.model_class,
        "layout": {k: v for k, v in ctx.manifest["layout"].items() if k != "model_class"},
        "calibration": ctx.manifest["calibration"],
        "shards": ctx.manifest["shards"],
        "modules": modules,
        "blocks": {tower: [{"index": b, "loss": loss_sum(losses[b])} for b in sorted(losses)]
                   for tower, losses in per_block.items()},
        "totals": {"modules": len(results_meta), "loss": loss_sum(e["loss"] for e in modules.values()),
                   "quantized_params": int(quantized_params)},
    }
    if plan.needs_global_importance(ctx.manifest):
        state = get_tensors(ctx.store, keys.importance_state(ctx.job))
        imp = {}
        if "modality_ratio" in state:
            imp["modality_ratio"] = [float(x) for x in state["modality_ratio"]]
            imp["modality_ratio_raw"] = [float(x) for x in state.get("modality_ratio_raw", state["modality_ratio"])]
        kept = [t for n, t in sorted(state.items()) if n.startswith("tlq_kept" + SEP)]
        if kept:
            imp["tlq_kept_tokens"] = int(sum(int(t.sum()) for t in kept))
        rep["importance"] = imp
    rep.update(summarize_task_records(records or []))
    return rep


def do_export(ctx: JobContext, task: Task) -> None:
    """The checkpoint, streamed: the prefix, each block with its qweights, the head, one part in memory at a
    time (tlq_farm.quant.export.export_parts), then every file into the store."""
    from .quant.export import export_parts
    from .store.tensors import json_to_bytes

    metas: dict[str, dict] = {}
    counted = [0]

    def computed(state: dict) -> dict:
        # What is not quantized is exported as the checkpoint has it (its dtype: a bf16 model stays bf16).
        return state

    def chunks(key: str):
        # The prefix (vision tower, embeddings) can outweigh a block: handed on a few tensors at a time.
        state = get_tensors(ctx.store, key)
        limit = max(max(ctx.manifest["sizes"]["blocks"] or [0]), plan.EXPORT_CHUNK_BYTES)
        part, used = {}, 0
        for name in list(state):
            t = state.pop(name)
            part[name] = t
            used += t.numel() * 4
            if used >= limit:
                yield computed(part), {}
                part, used = {}, 0
        if part:
            yield computed(part), {}

    def block_parts(b: int, tower: str | None, quantized: bool):
        # A block's tensors that stay as they are, then each quantized linear with its result, one at a time:
        # a linear's codes and dequantized weight take 8 bytes per weight (1.9 GB for a 7B block at once).
        prefix = f"{ctx.blocks_path(tower)}.{b}."
        names = ctx.names(b, tower) if quantized else []
        staged = keys.staged_block(ctx.job, b, tower)
        ctx.store.prefetch([staged, *(keys.qweights(ctx.job, b, m, tower) for m in names)])
        state = computed({prefix + k: v for k, v in get_tensors(ctx.store, staged).items()})
        linears = [prefix + m for m in names]
        weights = {name: state.pop(name + ".weight") for name in linears}
        yield state, {}
        del state
        for name in linears:
            res, metas[name] = qresult_from_store(ctx.store, keys.qweights(ctx.job, b, name[len(prefix):], tower))
            counted[0] += res.codes.numel()
            yield {name + ".weight": weights.pop(name)}, {name: res}
            del res

    def parts():
        yield from chunks(keys.staged_embed(ctx.job))
        for vb in range(ctx.manifest.get("n_vision_blocks", 0)):
            yield from block_parts(vb, "vision", plan.quantize_vision(ctx.manifest))
        for b in range(ctx.manifest["n_blocks"]):
            yield from block_parts(b, None, True)
        yield from chunks(keys.staged_head(ctx.job))

    source = ctx.staged_files()
    with tempfile.TemporaryDirectory(prefix="tlq-export-") as tmp:
        out = Path(tmp) / "export"
        export_parts(ctx.meta, source, out, parts(), act_bits=ctx.spec.quant.act_bits, fmt=ctx.spec.fmt,
                     extra_config={"spec": ctx.spec.to_dict()})
        # The job's task records so far, and this export's own (up to now: its record is written after).
        records = task_records(ctx.store, ctx.job)
        if ctx.current_record is not None:
            records.append(ctx.current_record())
        (out / "tlq_report.json").write_bytes(json_to_bytes(farm_report(ctx, metas, counted[0], records)))
        index = {}
        for path in sorted(p for p in out.rglob("*") if p.is_file()):
            name = path.relative_to(out).as_posix()
            index[name] = ctx.store.put_file(keys.export_file(ctx.job, name), path)
    put_json(ctx.store, keys.export_index(ctx.job), {"files": index})


BODIES = {"embed": do_embed, "reembed": do_reembed, "groups": do_groups, "forward": do_forward, "backward": do_backward,
          "importance": do_importance, "weights": do_weights,
          "stats": do_stats, "solve": do_solve, "quantize": do_quantize, "propagate": do_propagate,
          "export": do_export}


# ----------------------------------------------------------------------------------------------- protocol

def is_cancelled(store: Store, job: str) -> bool:
    return store.exists_raw(keys.cancel_flag(job))


def _fault_sleep(kind: str) -> None:
    spec = os.environ.get("TLQ_FAULT_SLEEP", "")
    for part in filter(None, spec.split(",")):
        k, _, s = part.partition(":")
        if k in (kind, "*"):
            time.sleep(float(s))


def fault_crash(name: str, variable: str = "TLQ_FAULT_CRASH") -> None:
    """Tests' crash hook: exit as a kill would when $variable names this task, once per TLQ_FAULT_CRASH_FLAG."""
    target = os.environ.get(variable)
    if target and target == name:
        flag = os.environ.get("TLQ_FAULT_CRASH_FLAG")
        if flag and Path(flag).exists():
            return
        if flag:
            Path(flag).write_text(name)
        os._exit(137)


_CONTEXTS: dict[tuple[int, str, str], JobContext] = {}


def job_context(store: Store, job: str, device: str = "cpu") -> JobContext:
    """A cached JobContext per (store, job, device); the groups are re-read once committed."""
    key = (id(store), job, device)
    ctx = _CONTEXTS.get(key)
    if ctx is None:
        if len(_CONTEXTS) > 8:
            _CONTEXTS.clear()
        ctx = _CONTEXTS[key] = JobContext(store, job, device)
    return ctx


# Free heap the allocator may keep between tasks. Handing back less costs page faults (system time) for
# nothing: the next task takes the same memory again (on a 1024-wide model, 1.7 s of 36 s CPU were the
# faults after trimming 256 MiB each task). More than this is handed back: a worker should not hold its
# largest task's peak, and a task's own memory is measured from what it takes. Free heap kept adds to the
# process's peak where the next task cannot reuse it: on a 1024-wide model with 64 x 256 tokens, keeping
# 1 GiB peaked at 1608 MiB, 512 MiB at 1482 MiB (docs/benchmarks.md, "Peer").
KEEP_FREE_BYTES = 2**29


def _mallinfo(libc=None):
    """glibc's mallinfo2() (arena, hblkhd: mapped bytes, fordblks: free heap bytes, ...), None where it cannot
    tell (no glibc, or one before 2.33)."""
    import ctypes

    if libc is None:
        try:
            libc = ctypes.CDLL("libc.so.6")
        except OSError:
            return None

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]

    try:
        libc.mallinfo2.restype = MallInfo2
        return libc.mallinfo2()
    except AttributeError:
        return None


def _free_heap_bytes(libc=None) -> int | None:
    """Bytes glibc's heap holds free (mallinfo2's fordblks), None where it cannot tell."""
    info = _mallinfo(libc)
    return None if info is None else int(info.fordblks)


def drop_contexts(store: Store, job: str) -> None:
    """Forget the cached contexts of a job in this process, and their local files (a finished local run)."""
    for key in [k for k in _CONTEXTS if k[0] == id(store) and k[1] == job]:
        _CONTEXTS.pop(key)._files_dir.cleanup()
    REUSE.forget((store.url, job))
    _FACTORS.clear()


_ALLOCATOR = {"set": False}
# Allocations from this size up are mapped and unmapped on free; smaller ones come from the heap.
MAP_FROM_BYTES = 64 * 2**20


def set_allocator_policy() -> None:
    """glibc's policy for tasks, set once per process: every allocation below MAP_FROM_BYTES comes from the
    heap, and what is freed is kept. Under glibc's own policy a tensor above its mmap threshold (32 MB at most)
    is mapped fresh and unmapped on free, and every forward pays page faults and zeroing for it again: 15 s of
    system time in a 94 s job on a 1024-wide model; from the heap, freed blocks serve the next forward, and
    what stays free past KEEP_FREE_BYTES is handed back between tasks (_release_free_memory). Larger arrays
    (a 7B solve's Hessians, an export's codes and weights: 0.3 to 3 GB, each allocated once and used for many
    seconds) are mapped: from the heap, their freed space stayed resident between arrays of other sizes that
    it could not serve (a 7B export peaked at 3.95 GB that way, at 2.62 GB with these mapped; docs/benchmarks.md
    "Scale")."""
    if _ALLOCATOR["set"]:
        return
    _ALLOCATOR["set"] = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, MAP_FROM_BYTES)  # M_MMAP_THRESHOLD, fixed (no longer raised by each freed mapping)
        # M_TRIM_THRESHOLD: free() would otherwise hand the heap's top back at once (128 KiB), and the next
        # allocation take it again; _release_free_memory decides when memory goes back.
        libc.mallopt(-1, 2**30)
    except (OSError, AttributeError):  # not glibc: its allocator keeps its own policy
        pass


def _release_free_memory() -> bool:
    """Hand memory the allocator keeps after an earlier task back to the system (glibc's malloc_trim) once it
    is more than KEEP_FREE_BYTES, so that a task's measured memory is its own and a worker does not hold its
    largest task's peak forever. Returns whether it did: the free heap left is then not resident."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        free = _free_heap_bytes(libc)
        if free is None or free > KEEP_FREE_BYTES:
            libc.malloc_trim(0)
            return True
    except (OSError, AttributeError):
        pass
    return False


def _reset_peak_rss() -> bool:
    """Reset this process's peak-RSS mark to its current RSS (Linux >= 4.0, /proc/self/clear_refs "5")."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _proc_status_kib(field: str) -> int | None:
    """A KiB field of /proc/self/status (VmRSS, VmHWM), None where /proc cannot tell."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _peak_rss_kib() -> tuple[int, str]:
    """(peak RSS in KiB, scope): VmHWM since the last reset ("task"), else the process's lifetime peak."""
    hwm = _proc_status_kib("VmHWM")
    if hwm is not None:
        return hwm, "task"
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (peak // 1024 if sys.platform == "darwin" else peak), "process"  # macOS counts bytes




def io_counters(store) -> dict[str, int]:
    """Bytes this process read from and wrote to `store` so far, the requests it sent (S3), and the reads its
    local cache served (a worker's CachedStore; 0 without one)."""
    if store is None:
        return {}
    return {"store_read_bytes": int(getattr(store, "bytes_read", 0)),
            "store_written_bytes": int(getattr(store, "bytes_written", 0)),
            "store_requests": int(getattr(store, "requests", 0) or 0),
            "cache_hits": int(getattr(store, "hits", 0) or 0), "cache_misses": int(getattr(store, "misses", 0) or 0),
            "cache_hit_bytes": int(getattr(store, "hit_bytes", 0) or 0)}


class TaskMeter:
    """Wall and CPU seconds and peak memory of one task. A worker process runs one task at a time, so the
    process's CPU time and memory marks are the task's; where the peak-RSS mark cannot be reset, the
    record's peak_rss_scope says "process" (the peak since the process started, an upper bound)."""

    def __init__(self, device: str = "cpu", store: Store | None = None):
        self.device = device
        self.store = store
        self.io0 = io_counters(store)
        self.reused0 = REUSE.hits
        set_allocator_policy()
        trimmed = _release_free_memory()
        start = _proc_status_kib("VmRSS")
        # What the process held when the task began (libraries, cached job context), and of it the heap
        # the allocator keeps free for reuse (KEEP_FREE_BYTES): the task's own memory is its peak above what
        # was in use, rss_start_mib - held_free_mib. After a trim the free heap is no longer resident (0);
        # otherwise its size bounds the resident part from above (pages trimmed earlier stay counted).
        self.rss_start_mib = None if start is None else start / 1024.0
        free = 0 if trimmed else _free_heap_bytes()
        self.held_free_mib = None if free is None else free / 2**20
        self.cuda = str(device).startswith("cuda") and torch.cuda.is_available()
        self.reset = _reset_peak_rss()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)
        self.started = time.time()
        self._wall0 = time.perf_counter()
        self._cpu0 = time.process_time()

    def sample(self) -> dict:
        rss_kib, scope = _peak_rss_kib()
        return {"started": self.started, "finished": time.time(), "seconds": time.perf_counter() - self._wall0,
                "cpu_s": time.process_time() - self._cpu0, "peak_rss_mib": rss_kib / 1024.0,
                "peak_rss_scope": scope if self.reset else "process", "rss_start_mib": self.rss_start_mib,
                "held_free_mib": self.held_free_mib,
                "cuda_peak_mib": torch.cuda.max_memory_allocated(self.device) / 2**20 if self.cuda else None,
                # Submodule outputs served from an earlier forward, and what this process keeps for later ones.
                "reused_outputs": REUSE.hits - self.reused0, "kept_outputs_mib": REUSE.nbytes / 2**20,
                # The size of the worker's cache (0 without one): `status` names those below the job's need.
                "cache_bytes": int(getattr(self.store, "max_bytes", 0) or 0),
                **{k: v - self.io0[k] for k, v in io_counters(self.store).items()}}


def task_records(store: Store, job: str) -> list[dict]:
    """The job's committed task-log records; one unreadable (being deleted, damaged) is left out."""
    from concurrent.futures import ThreadPoolExecutor

    def read(key: str) -> dict | None:
        try:
            return get_json(store, key)
        except (NotCommitted, CorruptObject, ValueError):
            return None

    # Small objects, many of them on a big job: read side by side (a store round trip each).
    with ThreadPoolExecutor(max_workers=8) as pool:
        return [r for r in pool.map(read, store.list_committed(keys.tasks_prefix(job))) if r is not None]


def execute(store: Store, job: str, task: Task, *, device: str = "cpu", worker: dict | None = None) -> str:
    """Run one task under the protocol -> 'cancelled', 'skipped', 'computed' or 'input-missing'."""
    if is_cancelled(store, job):
        return "cancelled"
    ctx = job_context(store, job, device)
    if all(store.is_committed(k) for k in ctx.outputs(task)):
        return "skipped"
    meter = TaskMeter(device, store)
    attempt = uuid.uuid4().hex
    groups = ctx.groups if task.kind not in ("embed", "groups") else None  # committed before any other task

    def record() -> dict:
        r = {"task": task.name, "kind": task.kind, "block": task.block, "tower": task.tower, "attempt": attempt,
             **meter.sample(),
             "host": socket.gethostname(), "pid": os.getpid(),
             "estimate_bytes": plan.estimate_memory(task, ctx.manifest, groups)}
        r.update(worker or {})
        return r

    torch.manual_seed(ctx.spec.seed)
    _fault_sleep(task.kind)
    fault_crash(task.name)
    ctx.current_record = record
    # A worker's cache holds what the job's blocks read again (at 7B several GB, above its 2 GiB floor).
    store.size_cache(job, plan.cache_bytes(ctx.manifest, groups))
    # The next block's weights come down while this task computes (a worker's cache; Store.read_ahead), and
    # the record counts their bytes: the wait at the end is for what the task did not already cover.
    read_ahead_done = store.read_ahead(plan.read_ahead(task, ctx.manifest))
    try:
        BODIES[task.kind](ctx, task)
    except (NotCommitted, CorruptObject):
        # An input vanished or was found corrupt (and deleted): the reconciler reschedules its producer.
        return "input-missing"
    finally:
        ctx.current_record = None
        read_ahead_done()
        store.forget_prefetched()
    put_json(store, keys.task_log(job, f"{task.name}--{attempt}"), record())
    return "computed"


# ----------------------------------------------------------------------------------------------- job state

def committed_keys(store: Store, job: str) -> set[str]:
    return set(store.list_committed(keys.job_prefix(job)))


def job_groups(store: Store, job: str, committed: set[str]) -> dict | None:
    key = keys.plan_groups(job)
    if key not in committed:
        return None
    try:
        return get_json(store, key)
    except (NotCommitted, CorruptObject):
        return None


def reconcile_job(store: Store, job: str, cache: dict | None = None, targets=None
                  ) -> tuple[dict, set[str], dict | None, plan.Reconciliation]:
    """(manifest, committed keys, groups, reconciliation) of a job as the store has it now.

    cache: a dict kept by the caller; the manifest and groups (immutable once committed) are read once.
    targets(manifest, groups) -> keys: reconcile towards those keys instead of the export."""
    cache = {} if cache is None else cache
    committed = committed_keys(store, job)
    from .staging import check_format

    manifest = cache.get(("manifest", store.url, job)) or check_format(get_json(store, keys.manifest(job)))
    cache[("manifest", store.url, job)] = manifest
    groups = cache.get(("groups", store.url, job))
    if groups is None:
        groups = job_groups(store, job, committed)
        if groups is not None:
            cache[("groups", store.url, job)] = groups
    elif keys.plan_groups(job) not in committed:
        groups = None  # lost (corrupt and deleted): recomputed by its task
    cache[("committed", store.url, job)] = set(committed)  # what ready_after trusts until the next listing
    wanted = targets(manifest, groups) if targets is not None and groups is not None else None
    return manifest, committed, groups, plan.reconcile(manifest, committed, groups, wanted)


def ready_after(store: Store, job: str, task: Task, cache: dict, index=None) -> list[Task] | None:
    """The tasks that `task`, just committed, may have made ready: those that read one of its outputs, whose
    inputs are now all committed and whose outputs are not, checked marker by marker (a few lookups, where a
    full reconcile lists every object of the job). None where only a full reconcile can tell: the plan was
    not known before (`task` is the groups task) or is not cached here.

    cache: a dict kept by the caller (the manifest, the plan's reverse index, and keys seen committed, which
    stay committed; an input found missing later makes its reader report input-missing, and a full
    reconcile follows).
    index(keys) -> the subset of `keys` committed, or None when it cannot tell: answers all the lookups in
    one call where the caller keeps such an index (the farm's, in Redis: worker/dispatch.py); the keys it
    does not settle are looked up in the store."""
    manifest = cache.get(("manifest", store.url, job))
    groups = cache.get(("groups", store.url, job))
    if manifest is None or groups is None or task.kind == "groups":
        return None
    index_key = ("consumers", store.url, job)
    if index_key not in cache:
        consumers: dict[str, list[Task]] = {}
        for t in plan.all_tasks(manifest, groups):
            for k in plan.inputs(t, manifest, groups):
                consumers.setdefault(k, []).append(t)
        cache[index_key] = consumers
    known = cache.setdefault(("committed", store.url, job), set())
    done = plan.outputs(task, manifest, groups)
    known.update(done)  # the caller has just committed them (or found them so)
    # Each candidate's (inputs, outputs).
    candidates = {c: (plan.inputs(c, manifest, groups), plan.outputs(c, manifest, groups))
                  for k in done for c in cache[index_key].get(k, [])}
    absent: set[str] = set()
    if index is not None:
        asked = list(dict.fromkeys(k for ins, outs in candidates.values() for k in (*ins, *outs) if k not in known))
        found = index(asked)
        if found is not None:
            known.update(found)
            absent = set(asked) - found

    def committed(key: str) -> bool:
        if key not in known and key not in absent and store.is_committed(key):
            known.add(key)
        return key in known

    # Inputs first: a candidate that is not ready costs one lookup (its first missing input), not two.
    return [c for c, (ins, outs) in candidates.items() if all(committed(k) for k in ins)
            and not all(committed(k) for k in outs)]


class JobStuck(RuntimeError):
    """Nothing is ready and the export is not committed: staged inputs are missing."""


def _claim(claims: Path, task: Task) -> bool:
    """Take a task for this process among local processes sharing `claims` (a folder); False if taken."""
    try:
        os.close(os.open(claims / task.name.replace("/", "_"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def _release(claims: Path, task: Task) -> None:
    # Released after the task, so a task that becomes ready again (its output found corrupt) can rerun.
    (claims / task.name.replace("/", "_")).unlink(missing_ok=True)


def _plan_order(cache: dict, store: Store, job: str) -> dict:
    """Task -> its position in the job's plan (plan.all_tasks), kept in the reconcile cache."""
    key = ("order", store.url, job)
    if key not in cache:
        tasks = plan.all_tasks(cache[("manifest", store.url, job)], cache[("groups", store.url, job)])
        cache[key] = {t: i for i, t in enumerate(tasks)}
    return cache[key]


def run_embedded(store: Store, job: str, *, device: str = "cpu", log=lambda m: None, max_tasks: int | None = None,
                 worker: dict | None = None, claims: str | Path | None = None, progress: bool = False,
                 targets=None) -> bool:
    """Run a job's tasks in this process through the reconciler until the export is committed (or the keys
    targets(manifest, groups) names).

    claims: a folder shared by several local processes running the same job (`tlq-farm run --workers N`):
    each task is taken by one of them; a process with nothing to take waits for the others.
    Returns True when the job is done (False when max_tasks computed tasks were run first, or cancelled)."""
    from tqdm.auto import tqdm

    claims = Path(claims) if claims is not None else None
    computed = 0
    cache: dict = {}
    bar = None
    queue: list[Task] = []  # ready tasks in plan order, found by a full reconcile or by ready_after
    try:
        while True:
            if not queue:
                if is_cancelled(store, job):  # (execute checks it before each task)
                    return False
                rec = reconcile_job(store, job, cache, targets)[3]
                if progress and (bar is not None or rec.needed):  # a finished job shows no empty bar
                    if bar is None:
                        bar = tqdm(total=rec.needed, desc=f"job {job}", unit="task", dynamic_ncols=True, leave=False)
                    bar.total = bar.n + rec.needed
                    bar.refresh()
                if rec.done:
                    return True
                if not rec.ready:
                    raise JobStuck(f"job {job} cannot go on: these staged inputs are missing from {store.url}: "
                                   f"{rec.missing[:3]}; run `tlq-farm run` with the same model, data and options "
                                   "to stage them again")
                queue = list(rec.ready)
                ran = False
            task = queue.pop(0)
            if max_tasks is not None and computed >= max_tasks:
                return False
            if claims is not None and not _claim(claims, task):
                if not queue and not ran:
                    time.sleep(0.05)  # every ready task is being computed by another local process
                continue
            try:
                status = execute(store, job, task, device=device, worker=worker or {"worker": "embedded"})
            finally:
                if claims is not None:
                    _release(claims, task)
            ran = True
            computed += status == "computed"
            log(f"{task.name}: {status}")
            if bar is not None:
                bar.set_postfix_str(task.name, refresh=False)
                bar.update(1)
            if status == "input-missing":
                queue = []  # an input was found corrupt and deleted: reconcile again so its producer reruns
                continue
            if status == "cancelled":
                return False
            # What this task made ready, from its consumers' markers: a full reconcile lists and walks the whole
            # job (most of the scheduling time on a 28-block job). Before the plan is known (ready_after: None),
            # what is queued is run first, and the reconcile that follows finds the rest.
            more = ready_after(store, job, task, cache) if task.kind != "export" else []
            if more is None:
                continue
            order = _plan_order(cache, store, job)
            queue = sorted(dict.fromkeys(queue + [t for t in more if t in rec.needed_tasks]), key=order.__getitem__)
    finally:
        if bar is not None:
            bar.close()
