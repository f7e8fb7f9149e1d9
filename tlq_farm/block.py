"""The per-block steps of a job, as functions over tensors: capture, accumulate stats, solve, propagate.

Every step takes and returns plain tensors (hidden states, kwargs flattened to name -> tensor, statistics,
quantized weights), so that the same step runs in-process or as a farm task that reads and writes a store.

Vocabulary: a *sample input* of a block is (hidden, kwargs) where hidden is [1, T, d] (or [T, d] in a vision
tower) and kwargs are the tensors the model passes to every block (rotary position embeddings, masks, ...).
The *q_chain* carries inputs through already-quantized blocks, the *fp_chain* through full-precision ones.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .models.adapter import block_output
from .quant import (QuantResult, add_tokens, fake_quant_per_token, finalize_hessian, finalize_stats, finish_sums,
                    gptq_quantize, reduce_partials, rtn_quantize, start_sums)
from .spec import QuantSpec

SampleInput = tuple[torch.Tensor, dict]


class _StopForward(Exception):
    pass


# ----------------------------------------------------------------------------------------------- kwargs

def clean_kwargs(kwargs: dict) -> dict:
    """Keep what a block needs and a store can hold: tensors and tuples of tensors; drop caches and flags."""
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.detach()
        elif isinstance(v, (tuple, list)) and v and all(isinstance(x, torch.Tensor) for x in v):
            out[k] = tuple(x.detach() for x in v)
    return out


def flatten_kwargs(kwargs: dict) -> dict[str, torch.Tensor]:
    flat = {}
    for k, v in kwargs.items():
        if isinstance(v, tuple):
            for i, x in enumerate(v):
                flat[f"{k}.{i}"] = x
        else:
            flat[k] = v
    return flat


def unflatten_kwargs(flat: dict[str, torch.Tensor]) -> dict:
    out: dict = {}
    tuples: dict[str, dict[int, torch.Tensor]] = {}
    for k, v in flat.items():
        head, _, tail = k.rpartition(".")
        if head and tail.isdigit():
            tuples.setdefault(head, {})[int(tail)] = v
        else:
            out[k] = v
    for k, parts in tuples.items():
        out[k] = tuple(parts[i] for i in range(len(parts)))
    return out


def _same_kwargs(a: dict, b: dict) -> bool:
    fa, fb = flatten_kwargs(a), flatten_kwargs(b)
    return fa.keys() == fb.keys() and all(fa[k].shape == fb[k].shape and torch.equal(fa[k], fb[k]) for k in fa)


# ----------------------------------------------------------------------------------------------- capture

@dataclass
class Captured:
    """One sample at the entry of a block list: hidden states and the kwargs each block receives.

    kwargs_sets holds the distinct kwargs seen across blocks (models with sliding-window layers pass different
    masks to different blocks); kw_index[b] says which set block b receives.
    """

    hidden: torch.Tensor
    kwargs_sets: list[dict]
    kw_index: list[int]

    def kwargs(self, b: int) -> dict:
        return self.kwargs_sets[self.kw_index[b]]


def _pass_through(*args, **kwargs):
    return args[0] if args else kwargs["hidden_states"]


@torch.no_grad()
def capture(model: nn.Module, blocks: nn.ModuleList, model_inputs: dict, run_blocks: bool = True) -> Captured:
    """Run the model's own prefix (vision tower, projector, embeddings, rotary/mrope) and record what enters
    the block list. The forward stops after the last block's inputs are seen, so the head never runs.

    run_blocks=False: each block passes its input through untouched (its weights may be on the meta device).
    What block b > 0 receives besides its hidden states (masks, position embeddings) is built by the model
    before the first block and does not depend on the hidden states, so it is recorded the same."""
    seen: dict[int, dict] = {}
    first_hidden: list[torch.Tensor] = []

    def make_hook(i):
        def hook(_mod, args, kwargs):
            kw = dict(kwargs)
            if args:
                hidden = args[0]
            else:
                hidden = kw.pop("hidden_states")
            kw.pop("hidden_states", None)
            if i == 0:
                first_hidden.append(hidden.detach().clone())
            seen[i] = clean_kwargs(kw)
            if i == len(blocks) - 1:
                raise _StopForward
        return hook

    handles = [blk.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, blk in enumerate(blocks)]
    if not run_blocks:
        for blk in blocks:
            blk.forward = _pass_through
    try:
        model(**model_inputs)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
        if not run_blocks:
            for blk in blocks:
                del blk.forward
    if len(seen) != len(blocks):
        raise RuntimeError(f"the forward reached {len(seen)} of {len(blocks)} blocks: the model skipped blocks")
    sets: list[dict] = []
    index: list[int] = []
    for i in range(len(blocks)):
        for j, s in enumerate(sets):
            if _same_kwargs(s, seen[i]):
                index.append(j)
                break
        else:
            sets.append(seen[i])
            index.append(len(sets) - 1)
    return Captured(first_hidden[0], sets, index)


# ----------------------------------------------------------------------------------------------- run

def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    return block_output(block(hidden, **kwargs))


@contextlib.contextmanager
def act_fake_quant(block: nn.Module, names: list[str], bits: int | None):
    """Dynamic per-token fake quantization of the inputs of the named linears, as inference will compute."""
    if bits is None:
        yield
        return
    def hook(_m, args):
        x = args[0]
        q = fake_quant_per_token(x, bits)
        # Rounding has no gradient: gradient-based importance passes see a straight-through estimator.
        if torch.is_grad_enabled() and x.requires_grad:
            q = x + (q - x).detach()
        return (q,) + args[1:]

    handles = [block.get_submodule(n).register_forward_pre_hook(hook) for n in names]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def propagate(block: nn.Module, inputs: list[SampleInput], *, act_bits: int | None = None,
              act_names: list[str] | None = None) -> list[torch.Tensor]:
    """Outputs of a block for each sample input (the next block's hidden states)."""
    with act_fake_quant(block, act_names or [], act_bits):
        return [run_block(block, h, kw) for h, kw in inputs]


# ----------------------------------------------------------------------------------------------- groups

@torch.no_grad()
def input_classes(block: nn.Module, sample: SampleInput, names: list[str]) -> list[list[str]]:
    """Linears fed the very same input tensor (q/k/v, gate/up), in the order the forward first reaches
    them (qkv -> o -> gate/up -> down); linears the forward never uses are left out."""
    calls: list[tuple[str, torch.Tensor]] = []
    handles = [block.get_submodule(n).register_forward_pre_hook(
        lambda _m, args, n=n: calls.append((n, args[0]))) for n in names]
    try:
        run_block(block, *sample)
    finally:
        for h in handles:
            h.remove()
    classes: list[list[str]] = []
    inputs: list[torch.Tensor] = []
    done: set[str] = set()
    for n, x in calls:
        if n in done:
            continue
        done.add(n)
        for c, cx in zip(classes, inputs):
            if cx is x:
                c.append(n)
                break
        else:
            classes.append([n])
            inputs.append(x)
    return classes


def sequential_groups(block: nn.Module, sample: SampleInput, names: list[str],
                      classes: list[list[str]] | None = None) -> list[list[str]]:
    """True-sequential groups found from the data flow: one group per shared input (input_classes)."""
    groups = [list(c) for c in (classes if classes is not None else input_classes(block, sample, names))]
    used = {n for g in groups for n in g}
    missing = [n for n in names if n not in used]
    if missing:
        groups.append(missing)  # linears the forward never used: quantize them last, on no data (RTN)
    return groups


# ----------------------------------------------------------------------------------------------- stats

def _weights_for(token_weights, name: str, i: int) -> torch.Tensor:
    w = token_weights.get(name, token_weights.get("*")) if isinstance(token_weights, dict) else token_weights
    return w[i]


def stat_owners(stats: dict[str, dict]) -> dict[str, str]:
    """name -> the first name whose statistics are the very same object (linears that share a Gram)."""
    first: dict[int, str] = {}
    return {n: first.setdefault(id(s), n) for n, s in stats.items()}


@torch.no_grad()
def accumulate_stats(block: nn.Module, q_inputs, token_weights, names: list[str], *,
                     act_bits: int | None = None, act_names: list[str] | None = None,
                     fp_block: nn.Module | None = None, fp_inputs=None, need_fp_gram: bool = False,
                     dtype: torch.dtype = torch.float32) -> dict[str, dict]:
    """Statistics of the named linears over the given samples, summed in place in sample order.

    q_inputs (and fp_inputs): sample inputs, a list or any iterable (shards streamed as they are read).
    token_weights: one [T] tensor per sample, or a dict module name ('*' for the rest) -> per-sample tensors.
    With fp_block / fp_inputs the GPTAQ cross term D is accumulated from the full-precision block's inputs.
    Linears fed the same input with the same token weights (q/k/v, gate/up) share one set of running sums,
    returned as the same dict under each name (stat_owners tells them apart). Linears no sample reached
    are absent. Only the running sums stay alive: no per-sample partial is kept.
    """
    current_w: dict[str, torch.Tensor] = {}
    fp_x: dict[str, torch.Tensor] = {}
    sums: dict[str, dict] = {}      # owner -> running sums
    owner: dict[str, str] = {}      # name -> owner, fixed by the first sample that reaches the name
    seen: dict[tuple, str] = {}     # within one sample: input identity -> the owner that added it
    sample_no = [0]

    raw_x: dict[str, torch.Tensor] = {}

    def raw_hook(name):
        # Runs before activation fake-quantization: linears fed the same tensor are recognised by it even
        # when each gets its own (equal) quantized copy. Kept until the sample ends, so no id is reused.
        def hook(_m, args):
            raw_x[name] = args[0]
        return hook

    def q_hook(name):
        def hook(_m, args):
            x = args[0]
            xf = fp_x.get(name)
            key = (id(raw_x[name]), id(current_w[name]), None if xf is None else id(xf))
            if name not in owner:
                owner[name] = seen.get(key, name)
            o = owner[name]
            if o == name:
                if o not in sums:
                    sums[o] = start_sums(x.shape[-1], cross=fp_block is not None, need_fp_gram=need_fp_gram,
                                         dtype=dtype, device=x.device)
                add_tokens(sums[o], x, current_w[name], xf)
                seen[key] = name
            elif seen.get(key) != o:
                raise RuntimeError(f"{name} shared its input with {o} on an earlier sample but not on sample "
                                   f"{sample_no[0]}: the block's data flow changed between samples")
        return hook

    def fp_hook(name):
        def hook(_m, args):
            fp_x[name] = args[0]
        return hook

    all_act = act_names or []
    fp_iter = iter(fp_inputs) if fp_inputs is not None else None
    with act_fake_quant(block, all_act, act_bits):
        handles = [block.get_submodule(n).register_forward_pre_hook(raw_hook(n), prepend=True) for n in names]
        handles += [block.get_submodule(n).register_forward_pre_hook(q_hook(n)) for n in names]
        if fp_block is not None:
            handles += [fp_block.get_submodule(n).register_forward_pre_hook(fp_hook(n)) for n in names]
        try:
            for i, (h, kw) in enumerate(q_inputs):
                sample_no[0] = i
                views: dict[int, torch.Tensor] = {}
                for n in names:
                    w = _weights_for(token_weights, n, i)
                    current_w[n] = views.setdefault(id(w), w.reshape(h.shape[:-1]))
                if fp_block is not None:
                    fh, fkw = next(fp_iter)
                    run_block(fp_block, fh, fkw)
                run_block(block, h, kw)
                fp_x.clear()
                raw_x.clear()
                seen.clear()
        finally:
            for hd in handles:
                hd.remove()
    for s in sums.values():
        finish_sums(s)
    return {n: sums[owner[n]] for n in names if n in owner}


# ----------------------------------------------------------------------------------------------- solve

def solve(weight: torch.Tensor, stats: dict | None, spec: QuantSpec, consume: bool = False) -> QuantResult:
    """Quantize one linear's weight from its reduced statistics (None: no data reached it -> RTN).

    GPTAQ's statistics may hold D and Hfp, or W D and tr(W Hfp W^T) (reduce_partials with W=weight, what the
    farm's solve task reduces to). consume=True: the statistics are normalised in place and must not be used
    after (see finalize_stats)."""
    if spec.method == "rtn" or stats is None or float(stats["w_sum"]) == 0.0:
        H = finalize_hessian(stats, consume)[0] if stats is not None and float(stats["w_sum"]) > 0 else None
        return rtn_quantize(weight, bits=spec.bits, group_size=spec.group_size, sym=spec.sym, H=H)
    gptaq = spec.method == "gptaq"
    S = finalize_stats({k: v for k, v in stats.items() if gptaq or k not in ("D", "Hfp")}, consume)
    # S["H"] is the caller's consumed sum or a fresh normalised copy: the solver may factor it in place.
    return gptq_quantize(weight, S.pop("H"), bits=spec.bits, group_size=spec.group_size, sym=spec.sym,
                         damp=spec.damp, blocksize=spec.blocksize, act_order=spec.act_order,
                         static_groups=spec.static_groups, D=S.get("D"), Hfp=S.get("Hfp"), WD=S.get("WD"),
                         WHfpW=S.get("WHfpW"), overwrite_H=True)


def solve_partials(weight: torch.Tensor, partials: Iterable[dict], spec: QuantSpec) -> tuple[QuantResult, dict]:
    """A solve task's math: the partials (a generator that reads them one at a time) reduced in their order and
    consumed as they are added, then solve(). GPTAQ folds each partial's D and Hfp into W D and tr(W Hfp W^T)
    (reduce_partials with W): no float64 [in, in] besides H. Returns (result, {"tokens", "weight_sum"}, or {}
    when no partial came: no calibration token reached this linear, RTN)."""
    parts = iter(partials)
    first = next(parts, None)
    if first is None:
        return solve(weight, None, spec), {}
    stats = reduce_partials(itertools.chain([first], parts), consume=True,
                            W=weight if spec.method == "gptaq" else None)
    counts = {"tokens": int(stats["tokens"]), "weight_sum": float(stats["w_sum"])}
    return solve(weight, stats, spec, consume=True), counts


@torch.no_grad()
def apply_qweight(block: nn.Module, name: str, result: QuantResult) -> None:
    lin = block.get_submodule(name)
    lin.weight.copy_(result.weight.to(lin.weight.dtype).reshape(lin.weight.shape))


def rtn_proxy(block: nn.Module, names: list[str], spec: QuantSpec) -> nn.Module:
    """A copy of the block with RTN weights: the cheap stand-in for 'this block, quantized' that gradient
    importance strategies need before the real solve."""
    import copy

    proxy = copy.deepcopy(block)
    for n in names:
        w = proxy.get_submodule(n).weight
        apply_qweight(proxy, n, rtn_quantize(w.detach().float(), bits=spec.bits, group_size=spec.group_size, sym=spec.sym))
    return proxy


# ----------------------------------------------------------------------------------------------- gradients

def head_loss(norm: nn.Module | None, head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the next-token prediction on labelled (answer) tokens."""
    h = norm(hidden) if norm is not None else hidden
    logits = head(h).float()
    shift_logits = logits[..., :-1, :].reshape(-1, logits.shape[-1])
    shift_labels = labels[..., 1:].reshape(-1).to(logits.device)
    return torch.nn.functional.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="mean")


def head_grad(norm, head, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, float]:
    h = hidden.detach().requires_grad_(True)
    loss = head_loss(norm, head, h, labels)
    (g,) = torch.autograd.grad(loss, h)
    return g.detach(), float(loss.detach())


def block_vjp(block: nn.Module, hidden: torch.Tensor, kwargs: dict, grad_out: torch.Tensor) -> torch.Tensor:
    """dL/d(block input) from dL/d(block output), recomputing the block forward with autograd."""
    h = hidden.detach().requires_grad_(True)
    with torch.enable_grad():
        out = run_block(block, h, kwargs)
        (g,) = torch.autograd.grad(out, h, grad_outputs=grad_out)
    return g.detach()
