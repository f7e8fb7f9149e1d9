"""Submodule outputs kept from one forward of a batch through a block to serve the block's later forwards.

A true-sequential block is run once per group (each group's statistics need the inputs that the groups
quantized before it produce) and once more to propagate. The part of the block that only earlier groups
feed is the same in every one of those forwards: once q/k/v are quantized, their outputs are fixed, and
once o_proj is too, so is the whole attention's. Keeping those outputs per batch (one batch = the same
samples, packed the same way, in every forward of the block) turns the 3-4 forwards of a Llama block into
about one forward's worth of linears:

    stage (group)          computed                            kept for later stages
    stats q/k/v            (up to q_proj's input)              -
    stats o_proj           q/k/v, attention                    q_proj, k_proj, v_proj
    stats gate/up          attention core, o_proj              self_attn (q/k/v dropped)
    stats down_proj        gate_proj, up_proj, act * up        mlp, as down_proj's input (gate/up dropped)
    propagate              down_proj                           -

A tail input: where a group's linear is the last of its parent module's linears to be quantized (down_proj
in the MLP), its input is kept under the parent instead of the parent's other outputs (gate and up: twice
the bytes), and the parent is served later as that linear applied to it. This holds only where the parent
returns the linear's output as it is; a one-token probe of the parent checks that before the first input
is kept (self_attn, which returns a tuple, is not served this way).

A module is *final* at a stage when every quantized linear inside it belongs to an earlier group: its input
is final too (groups follow the forward's order and, where a stage uses this, no linear runs twice in a
forward), so its output is the very tensor a full recomputation would give, bit for bit. A served output
whose tensors were changed in place since they were kept (a model that edits a module's output) is not
served: the module runs again. Nothing here changes a number, only what is computed twice; a process
without the entries (another worker, a restart, a full budget) computes them and gets the same bytes.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from dataclasses import dataclass, field

import torch
from torch import nn


def module_linears(block: nn.Module, linears: list[str]) -> dict[str, list[str]]:
    """Submodule name -> the given linears inside it (itself included), for every submodule holding one;
    the block itself ('') is left out."""
    out: dict[str, list[str]] = {}
    for name, _ in block.named_modules():
        if name:
            inside = [n for n in linears if n == name or n.startswith(name + ".")]
            if inside:
                out[name] = inside
    return out


def final_modules(block: nn.Module, groups: list[list[str]], stage: int) -> list[str]:
    """Submodules whose every quantized linear is in a group before `stage` (stage = len(groups): all of them,
    the propagate; a full-precision block: pass stage = len(groups) as well)."""
    done = {n for g in groups[:stage] for n in g}
    every = [n for g in groups for n in g]
    return [m for m, inside in module_linears(block, every).items() if all(n in done for n in inside)]


def tail_linears(block: nn.Module, groups: list[list[str]], stage: int) -> dict[str, str]:
    """Linears of group `stage` whose parent module (not the block) holds no other quantized linear outside
    the earlier groups -> that parent: once the linear is quantized the parent is final, and it is the
    linear applied to the input it gets at this stage, where the parent returns the linear's output."""
    done = {n for g in groups[:stage] for n in g}
    inside = module_linears(block, [n for g in groups for n in g])
    out = {}
    for name in groups[stage] if stage < len(groups) else []:
        parent = name.rpartition(".")[0]
        if parent and all(n in done for n in inside.get(parent, []) if n != name):
            out[name] = parent
    return out


@dataclass
class _TailInput:
    """A parent module's output kept as the input of its last linear (tail_linears)."""
    linear: str
    x: torch.Tensor


def _tensors(output) -> list[torch.Tensor] | None:
    """The tensors of a module output that can be served again as it is: a tensor, or a tuple / list of
    tensors and None; None for anything else (a dict, a dataclass: not kept)."""
    if isinstance(output, _TailInput):
        return [output.x]
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)) and all(x is None or isinstance(x, torch.Tensor) for x in output):
        return [x for x in output if x is not None]
    return None


def _storage_bytes(tensors: list[torch.Tensor]) -> int:
    # A kept view holds its whole storage alive.
    seen: dict[int, int] = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


# CPU tensors of a kept output from this size up are kept in local files (_spilled).
SPILL_FROM = 2**20


def _spilled(t: torch.Tensor) -> torch.Tensor:
    """A copy of a contiguous CPU tensor in a temporary file, mapped copy-on-write and unlinked at once (it
    goes when the copy is freed, or the process ends). A kept output then costs page cache, which the
    system can write back and reclaim, instead of the process's own memory; and it does not sit in the heap
    among the forward's temporaries, where each batch's kept tensor left holes the next batch's could not
    reuse (at hidden 1024, 64 x 256 tokens, the heap grew 1.6 bytes per byte kept). Where no file can be
    written, the tensor stays as it is."""
    if t.device.type != "cpu" or not t.is_contiguous() or t.numel() == 0:
        return t
    try:
        fd, path = tempfile.mkstemp(prefix="tlq-kept-")
    except OSError:
        return t
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(memoryview(t.detach().reshape(-1).view(torch.uint8).numpy()))
        mapped = torch.from_file(path, shared=False, size=t.numel(), dtype=t.dtype).view(t.shape)
        mapped._tlq_spilled = True  # its storage is a whole private file mapping (_release_pages)
        return mapped
    except (OSError, RuntimeError):  # disk full, a mapping refused
        return t
    finally:
        os.unlink(path)


_MADV_DONTNEED = 4


@functools.cache
def _libc():
    """The C library's functions (madvise), loaded once; None where it cannot be loaded."""
    import ctypes

    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def _release_pages(tensors: list[torch.Tensor]) -> None:
    """Take the pages of spilled tensors (_spilled) out of this process's memory (madvise MADV_DONTNEED on
    their private file mapping): their next use reads them back from the page cache, the same bytes, since
    a served entry is unchanged (its versions are checked before each serve and here). Without this, every
    kept output a stage has served stays resident until its entry is dropped: at hidden 1024, 64 x 256
    tokens, the attention outputs of all 8 batches (64 MB) while the last group and the propagate ran."""
    import ctypes

    libc = _libc()
    if libc is None:
        return
    for t in tensors:
        storage = t.untyped_storage()
        if getattr(t, "_tlq_spilled", False) and storage.nbytes():
            libc.madvise(ctypes.c_void_p(storage.data_ptr()), ctypes.c_size_t(storage.nbytes()), _MADV_DONTNEED)


def _spill_output(output, spill_from: int):
    """`output` with its CPU tensors of spill_from bytes or more spilled (_spilled), the same structure."""
    def one(t):
        return t if t is None or t.numel() * t.element_size() < spill_from else _spilled(t)

    if isinstance(output, _TailInput):
        return _TailInput(output.linear, one(output.x))
    if isinstance(output, torch.Tensor):
        return one(output)
    items = [one(x) for x in output]
    return type(output)(*items) if hasattr(output, "_fields") else type(output)(items)  # a namedtuple too


@dataclass
class _Entry:
    output: object
    versions: tuple[int, ...]
    nbytes: int

    def unchanged(self) -> bool:
        """Whether no tensor of the kept output was changed in place since it was kept."""
        return tuple(t._version for t in _tensors(self.output)) == self.versions


@dataclass
class ForwardReuse:
    """Kept submodule outputs of this process, within max_bytes (0: nothing kept). Entries are keyed by
    (scope, batch, module); scope names the job, tower, block and chain. Counts: hits (outputs served),
    kept (outputs stored, tail inputs among them: tails), refused (not kept: over the budget, or not a
    tensor / tuple output). CPU tensors of spill_from bytes or more are kept in local files (_spilled);
    they still count against max_bytes."""

    max_bytes: int
    spill_from: int = SPILL_FROM
    entries: dict[tuple, _Entry] = field(default_factory=dict)
    nbytes: int = 0
    hits: int = 0
    kept: int = 0
    tails: int = 0
    refused: int = 0

    def _drop(self, key: tuple) -> None:
        entry = self.entries.pop(key, None)
        if entry is not None:
            self.nbytes -= entry.nbytes

    def forget(self, scope_prefix: tuple, batch_prefix: tuple = ()) -> None:
        """Drop the entries whose scope starts with scope_prefix and batch with batch_prefix."""
        n, m = len(scope_prefix), len(batch_prefix)
        for key in [k for k in self.entries if k[0][:n] == scope_prefix and k[1][:m] == batch_prefix]:
            self._drop(key)

    def _make_room(self, nbytes: int, scope: tuple) -> bool:
        if self.nbytes + nbytes <= self.max_bytes:
            return True
        # Other blocks' entries first: a worker moves on block by block, and what another process finished
        # (its propagate) is never asked for here again.
        for key in [k for k in self.entries if k[0] != scope]:
            self._drop(key)
        return self.nbytes + nbytes <= self.max_bytes

    def serve(self, scope: tuple, key, module: str):
        entry = self.entries.get((scope, key, module))
        if entry is None:
            return None
        if not entry.unchanged():
            self._drop((scope, key, module))  # changed in place after it was kept: run the module again
            return None
        self.hits += 1
        return entry.output

    def keep(self, scope: tuple, key, module: str, output) -> None:
        tensors = _tensors(output)
        if tensors is None or any(t.requires_grad for t in tensors):
            self.refused += 1
            return
        nbytes = _storage_bytes(tensors)
        self._drop((scope, key, module))  # a tail input replaced by the output computed from it
        for k in list(self.entries):
            # What a kept module's output subsumes: its submodules' entries are never asked for again. And a
            # process that moved on to another block of the tower will not come back to the one it left
            # (the scope's last element is the chain, the one before it the block).
            if ((k[0] == scope and k[1] == key and k[2].startswith(module + "."))
                    or (k[0][:-2] == scope[:-2] and k[0][-2] != scope[-2])):
                self._drop(k)
        if not self._make_room(nbytes, scope):
            self.refused += 1
            return
        output = _spill_output(output, self.spill_from)
        tensors = _tensors(output)
        self.entries[(scope, key, module)] = _Entry(output, tuple(t._version for t in tensors), nbytes)
        self.nbytes += nbytes
        self.kept += 1
        self.tails += isinstance(output, _TailInput)

    @contextlib.contextmanager
    def stage(self, block: nn.Module, scope: tuple, final: list[str], keep: bool = True,
              tails: dict[str, str] | None = None):
        """While open, the final modules of `block` are served from this process's entries for the batch
        named by the returned handle's `key` (set before each forward; None: neither served nor kept), and,
        with keep, their outputs are kept when they run; without keep (the block's last forward on these
        batches) an entry is dropped as it is served. tails (tail_linears of this stage): with keep, the
        input of each such linear is kept under its parent, where a probe shows that the parent returns the
        linear's output. The block's modules are restored on exit."""
        served: list[tuple] = []

        def release_served():
            # The batch's forward is over: what it was served leaves memory until the next stage asks for it.
            for entry_key in served:
                entry = self.entries.get(entry_key)
                if entry is not None and entry.unchanged():
                    _release_pages(_tensors(entry.output))
            served.clear()

        handle = _Stage(release_served)

        def wrap(name: str, module: nn.Module, run):
            def forward(*args, **kwargs):
                if handle.key is None or self.max_bytes <= 0:
                    return run(*args, **kwargs)
                out = self.serve(scope, handle.key, name)
                if out is not None and not keep:
                    # A stage that keeps nothing is the entry's last use: its bytes go with this forward.
                    self._drop((scope, handle.key, name))
                elif out is not None:
                    served.append((scope, handle.key, name))
                if isinstance(out, _TailInput):
                    out = block.get_submodule(out.linear)(out.x)
                    if keep:
                        self.keep(scope, handle.key, name, out)
                    return out
                if out is not None:
                    return out
                out = run(*args, **kwargs)
                if keep:
                    self.keep(scope, handle.key, name, out)
                return out
            return forward

        parent_call: dict[str, tuple] = {}
        tail_ok: dict[str, bool] = {}

        def record_parent(parent: str):
            def hook(_m, args, kwargs):
                parent_call[parent] = (args, kwargs)
            return hook

        def keep_tail(name: str, parent: str):
            def hook(_m, args):
                if handle.key is None or self.max_bytes <= 0 or parent not in parent_call:
                    return None
                if parent not in tail_ok:
                    key, handle._key = handle.key, None  # the probe neither serves nor keeps (nor ends a batch)
                    try:
                        tail_ok[parent] = _returns_its_linear(block, parent, name, *parent_call[parent])
                    finally:
                        handle._key = key
                if tail_ok[parent] and isinstance(args[0], torch.Tensor):
                    self.keep(scope, handle.key, parent, _TailInput(name, args[0]))
                return None
            return hook

        with contextlib.ExitStack() as patches:
            patches.callback(parent_call.clear)
            patches.callback(release_served)
            for name in final:
                module = block.get_submodule(name)
                patches.enter_context(_forward_replaced(module, wrap(name, module, module.forward)))
            for name, parent in (tails or {}).items() if keep else ():
                patches.enter_context(block.get_submodule(parent).register_forward_pre_hook(
                    record_parent(parent), with_kwargs=True))
                patches.enter_context(block.get_submodule(name).register_forward_pre_hook(keep_tail(name, parent)))
            yield handle


class _Stage:
    """An open stage's handle: `key` names the batch of the next forward; setting it ends the last one's."""

    def __init__(self, on_batch_end=lambda: None):
        self._key = None
        self._on_batch_end = on_batch_end

    @property
    def key(self):
        return self._key

    @key.setter
    def key(self, value) -> None:
        self._on_batch_end()
        self._key = value


@contextlib.contextmanager
def _forward_replaced(module: nn.Module, forward):
    """`module.forward` is `forward` while open; then the module's own again (an instance attribute it had is
    put back, a class method is uncovered)."""
    own = "forward" in module.__dict__
    previous = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if own:
            module.forward = previous
        else:
            del module.forward


def _returns_its_linear(block: nn.Module, parent: str, linear: str, args: tuple, kwargs: dict) -> bool:
    """Whether `parent`, run on the first token of the input it got, returns its `linear`'s output object
    unchanged: then its output is that linear applied to the linear's input. The linear runs without its
    hooks during the probe (no statistics, no early stop), and nothing is served or kept."""
    if not args or not isinstance(args[0], torch.Tensor) or args[0].dim() < 2 or args[0].shape[-2] < 1:
        return False
    module, lin = block.get_submodule(parent), block.get_submodule(linear)
    produced = []

    def recording(*a, **k):
        out = run(*a, **k)
        produced.append((out, out._version if isinstance(out, torch.Tensor) else None))
        return out

    run = lin.forward
    hooks = lin._forward_pre_hooks, lin._forward_hooks
    lin._forward_pre_hooks, lin._forward_hooks = type(hooks[0])(), type(hooks[1])()
    try:
        with torch.no_grad(), _forward_replaced(lin, recording):
            result = module.forward(args[0].narrow(-2, 0, 1), *args[1:], **kwargs)
    except Exception:  # a parent that cannot run on one token is not served this way
        return False
    finally:
        lin._forward_pre_hooks, lin._forward_hooks = hooks
    return (len(produced) == 1 and result is produced[0][0] and isinstance(result, torch.Tensor)
            and result._version == produced[0][1])
