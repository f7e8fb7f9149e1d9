"""The per-block steps of a job, as functions over tensors: capture, accumulate stats, solve, propagate.

Every step takes and returns plain tensors (hidden states, kwargs flattened to name -> tensor, statistics,
quantized weights), so that the same step runs in-process or as a farm task that reads and writes a store.

Vocabulary: a *sample input* of a block is (hidden, kwargs) where hidden is [1, T, d] (or [T, d] in a vision
tower) and kwargs are the tensors the model passes to every block (rotary position embeddings, masks, ...).
The *q_chain* carries inputs through already-quantized blocks, the *fp_chain* through full-precision ones.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from . import plan
from .models.adapter import block_output
from .quant import (HessianFactor, QuantResult, add_tokens, fake_quant_per_token, finalize_hessian, finalize_stats,
                    finish_sums, gptq_quantize, reduce_partials, rtn_quantize, start_sums)
from .spec import QuantSpec

SampleInput = tuple[torch.Tensor, dict]


class _StopForward(Exception):
    pass


# ----------------------------------------------------------------------------------------------- kwargs

def clean_kwargs(kwargs: dict) -> dict:
    """Keep what a block needs and a store can hold: tensors, tuples of tensors, and None (an argument some
    blocks require by position, CLIP's attention masks); drop caches and flags."""
    out = {}
    for k, v in kwargs.items():
        if v is None or isinstance(v, torch.Tensor):
            out[k] = None if v is None else v.detach()
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

    def same(x, y):
        if x is None or y is None:
            return x is y
        return x.shape == y.shape and torch.equal(x, y)

    return fa.keys() == fb.keys() and all(same(fa[k], fb[k]) for k in fa)


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
        def hook(mod, args, kwargs):
            kw = dict(kwargs)
            if args:
                hidden = args[0]
                # Further positional arguments (CLIP's attention_mask) by their names, so they replay as kwargs.
                # (The class's forward: the instance's may be replaced by a pass-through here.)
                params = [p for p in inspect.signature(type(mod).forward).parameters.values()
                          if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
                kw.update({p.name: a for p, a in zip(params[2:], args[1:])})  # after self and the hidden states
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


def _sample_signature(inputs: dict) -> tuple:
    return tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(inputs.items()) if isinstance(v, torch.Tensor))


def _slice_kwargs(kwargs: dict, j: int, size: int, tokens: int) -> dict:
    """Sample j of kwargs captured for a batch of `size`: a tensor [size, ..., tokens, ...] is the batch's, any
    other tensor is shared by every sample."""
    def one(v):
        if isinstance(v, tuple):
            return tuple(one(x) for x in v)
        if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[0] == size and tokens in v.shape[1:]:
            return v[j:j + 1]
        if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == size:
            raise ValueError(f"a kwarg of shape {tuple(v.shape)} cannot be split by sample")
        return v
    return {k: one(v) for k, v in kwargs.items()}


@torch.no_grad()
def capture_many(model: nn.Module, blocks: nn.ModuleList, inputs: list[dict],
                 batch_tokens: int | None = None) -> list[Captured]:
    """capture(run_blocks=False) of every sample; samples whose inputs have the very same shapes (one length,
    one image grid) share a forward of the prefix, joined along their first dimension as a processor joins
    a batch, up to batch_tokens tokens. A model whose kwargs cannot be split by sample runs one at a time."""
    batch_tokens = batch_tokens or BATCH_TOKENS
    out: list[Captured | None] = [None] * len(inputs)
    by_shape: dict[tuple, list[int]] = {}
    for i, x in enumerate(inputs):
        by_shape.setdefault(_sample_signature(x), []).append(i)
    for idx in by_shape.values():
        tokens = inputs[idx[0]]["input_ids"].shape[-1] if "input_ids" in inputs[idx[0]] else 1
        per = max(1, batch_tokens // max(1, tokens))
        for chunk in [idx[a:a + per] for a in range(0, len(idx), per)]:
            if len(chunk) > 1:
                batched = {k: torch.cat([inputs[i][k] for i in chunk]) for k in inputs[chunk[0]]}
                c = capture(model, blocks, batched, run_blocks=False)
                try:
                    for j, i in enumerate(chunk):
                        out[i] = Captured(c.hidden[j:j + 1].clone(),
                                          [_slice_kwargs(kw, j, len(chunk), c.hidden.shape[1]) for kw in c.kwargs_sets],
                                          c.kw_index)
                    continue
                except ValueError:
                    pass
            for i in chunk:
                out[i] = capture(model, blocks, inputs[i], run_blocks=False)
    return out


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


# ----------------------------------------------------------------------------------------------- batches

# Padded tokens per block forward (a longer sample still runs, alone). Fixed, like the shards, so that a
# job's batches, and with them the summation order of its statistics, never depend on who runs them (a
# change is a new store format). 2048 tokens already make the matrix products efficient (a [2048, 1024] by
# [1024, 2816] product runs at the speed of an [8192, 1024] one on a CPU), and a forward's intermediates stay
# a quarter of 8192's: at hidden 1024 a job's peak was 1.62 GB against 1.70-1.83 GB with 8192.
BATCH_TOKENS = 2048
# Samples at least this long are never packed with others: their own compute outweighs a forward's fixed
# cost, and a padded or block-diagonal row would cost more (padding, a mask without the causal shortcut).
# Equal lengths still share a forward, one sample per row, with no padding and no mask.
PACK_BELOW = 256


@dataclass
class Batch:
    """Samples that go through a block in one forward. Packed: rows of samples laid end to end and padded to
    the batch's longest sample, each sample attending only to itself (a block-diagonal causal mask) with its
    own position embeddings. Unpacked (places None): one sample exactly as captured, for inputs without the
    [1, tokens, ...] layout or blocks that attend both ways (a vision tower's)."""

    hidden: torch.Tensor
    kwargs: dict
    places: list[tuple[int, int, int]] | None  # per sample: (row, first token, tokens)
    weights: torch.Tensor | dict | None = None  # token weights in the batch's layout (0 on padding)
    index: list[int] = field(default_factory=lambda: [0])  # each sample's position in the inputs
    key: tuple | None = None  # names the batch across a block's forwards (tlq_farm.reuse); None: not kept

    @property
    def size(self) -> int:
        """Samples in the batch."""
        return len(self.index)

    def spread(self, values: list[torch.Tensor], features: int = 0) -> torch.Tensor:
        """Per-sample values of every input (indexed like the inputs), one per token ([tokens] or [1, tokens],
        with `features` trailing dims) -> one tensor of this batch's token layout, zero on padding."""
        first = values[self.index[0]]
        tail = tuple(first.shape[first.dim() - features:]) if features else ()
        if self.places is None:
            return first.reshape(tuple(self.hidden.shape[:-1]) + tail)
        out = first.new_zeros(tuple(self.hidden.shape[:-1]) + tail)
        for (r, s, n), i in zip(self.places, self.index):
            out[r, s:s + n] = values[i].reshape((n,) + tail)
        return out

    def split(self, out: torch.Tensor) -> list[torch.Tensor]:
        """A block output of the batch -> each sample's own [1, tokens, d] (copies, no padding), in the
        batch's order (Batch.index)."""
        if self.places is None:
            return [out]
        return [out[r:r + 1, s:s + n].clone() for r, s, n in self.places]


def _is_mask(name: str, t: torch.Tensor, tokens: int) -> bool:
    return name == "attention_mask" and t.dim() == 4 and t.shape[0] == 1 and tuple(t.shape[-2:]) == (tokens, tokens)


def _packable(sample: SampleInput) -> bool:
    hidden, kwargs = sample
    if hidden.dim() != 3 or hidden.shape[0] != 1:
        return False
    tokens = hidden.shape[1]
    return all(t is None or _is_mask(n, t, tokens) or (t.dim() >= 2 and t.shape[0] == 1 and t.shape[1] == tokens)
               for n, t in flatten_kwargs(kwargs).items())


def plan_batches(lengths: list[int], batch_tokens: int = BATCH_TOKENS) -> list[list[list[int]]]:
    """Samples (by their token counts) -> batches of rows of sample indices, with little padding: longest
    first, each batch as wide as its first (longest) sample, a sample placed in the first row of the batch
    with room for it (first-fit decreasing). A sample opens a new row while rows x width stays within
    `batch_tokens` and the row is at least 3/4 full, or it is at most half the width (shorter samples, all
    that follow, will join it); else it starts a new, narrower batch. A sample of PACK_BELOW tokens or more
    shares a batch only with samples of its own length, one per row: no padding, no mask."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[list[int]]] = []
    used: list[int] = []
    width = 0
    for i in order:
        n = lengths[i]
        long = n >= PACK_BELOW
        joins = batches and not long and width < PACK_BELOW  # short samples never join a long one's batch
        row = next((r for r, u in enumerate(used) if u + n <= width), None) if joins else None
        fills = n == width if long else (joins and (4 * n >= 3 * width or 2 * n <= width))
        if row is None and batches and fills and (len(used) + 1) * width <= max(batch_tokens, width):
            batches[-1].append([])
            used.append(0)
            row = len(used) - 1
        if row is None:  # a new batch, as wide as this (the longest left) sample
            batches.append([[]])
            used, width, row = [0], n, 0
        batches[-1][row].append(i)
        used[row] += n
    return batches


def _sample_mask(kwargs: dict, tokens: int, device) -> torch.Tensor:
    """[tokens, tokens] bool: where each token may attend (the captured mask, else causal)."""
    m = kwargs.get("attention_mask")
    if m is None:
        return torch.ones(tokens, tokens, dtype=torch.bool, device=device).tril()
    m = m.reshape(tokens, tokens)
    return m if m.dtype == torch.bool else m == 0  # an additive float mask: 0 where allowed


def _pack(inputs: list[SampleInput], rows: list[list[int]]) -> Batch:
    first_h, first_kw = inputs[rows[0][0]]
    width = first_h.shape[1]  # the batch's first sample is its longest
    index = [i for row in rows for i in row]
    if len(index) == 1:  # nothing to pad or to keep apart: the sample as captured (the model's own causal path)
        return Batch(first_h, first_kw, [(0, 0, width)], index=index)
    # One full-length sample per row, each with the plain causal mask: the model's own causal path serves
    # them all (no mask tensor: attention skips the masked half).
    plain = all(len(row) == 1 and inputs[row[0]][0].shape[1] == width
                and inputs[row[0]][1].get("attention_mask") is None for row in rows)
    device = first_h.device
    names = [n for n, t in flatten_kwargs(first_kw).items() if n != "attention_mask" and t is not None]
    flat = {n: None for n, t in flatten_kwargs(first_kw).items() if n != "attention_mask" and t is None}
    # The batch is its rows end to end, a row its samples end to end and then zeros: each tensor is one
    # concatenation of views (a copy per sample or row would cost more than the forward on short samples).
    pieces: dict[str, list[torch.Tensor]] = {"": [], **{n: [] for n in names}}
    zeros: dict[str, torch.Tensor] = {}
    places, segments, own_masks = [], [], []  # own_masks: (row, first token, tokens, mask) of a sample's own mask
    for r, row in enumerate(rows):
        s = 0
        for j, i in enumerate(row):
            h, kw = inputs[i]
            n = h.shape[1]
            places.append((r, s, n))
            flat_i = flatten_kwargs(kw)
            pieces[""].append(h[0])
            for name in names:
                pieces[name].append(flat_i[name][0])
            if kw.get("attention_mask") is not None:
                own_masks.append((r, s, n, _sample_mask(kw, n, device)))
            # Which sample each token belongs to (for the mask).
            segments += [j] * n
            s += n
        fill = width - s
        if fill:
            for name, parts in pieces.items():
                if name not in zeros:
                    zeros[name] = parts[0].new_zeros((width,) + tuple(parts[0].shape[1:]))
                parts.append(zeros[name][:fill])
            segments += range(-1, -fill - 1, -1)  # a padding token is alone: it attends to itself only
    hidden = torch.cat(pieces.pop("")).reshape(len(rows), width, first_h.shape[-1])
    flat.update({n: torch.cat(p).reshape((len(rows), width) + tuple(p[0].shape[1:])) for n, p in pieces.items()})
    mask = None
    if not plain:  # no row of the mask is empty (that gives NaN): padding attends to itself
        seg = torch.tensor(segments, device=device).reshape(len(rows), width)
        causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
        mask = ((seg[:, :, None] == seg[:, None, :]) & causal).unsqueeze(1)
        for r, s, n, m in own_masks:
            mask[r, 0, s:s + n, s:s + n] = m
    kwargs = unflatten_kwargs(flat)
    kwargs["attention_mask"] = mask
    return Batch(hidden, kwargs, places, index=index)


def make_batches(inputs: list[SampleInput], token_weights=None, batch_tokens: int = BATCH_TOKENS,
                 pack: bool = True) -> list[Batch]:
    """Sample inputs -> the batches a block runs them in (plan_batches). token_weights: per-sample [tokens]
    tensors, or a dict name -> per-sample list ('*' for the rest), laid out like each batch (Batch.weights).
    Samples whose inputs cannot be packed go one per batch, unchanged; so do all with pack=False (blocks that
    are not causal decoder blocks: a vision tower's attend both ways, which the packed mask would not say)."""
    inputs = list(inputs)
    if not inputs:
        return []
    if not pack or not all(_packable(x) for x in inputs) or len({tuple(sorted(flatten_kwargs(kw))) for _, kw in inputs}) > 1:
        batches = [Batch(h, kw, None, index=[i]) for i, (h, kw) in enumerate(inputs)]
    else:
        batches = [_pack(inputs, rows) for rows in plan_batches([h.shape[1] for h, _ in inputs], batch_tokens)]
    if token_weights is not None:
        for batch in batches:
            if isinstance(token_weights, dict):
                batch.weights = {n: batch.spread(w) for n, w in token_weights.items()}
            else:
                batch.weights = batch.spread(token_weights)
    return batches


def handed_out(batches: list[Batch]):
    """The batches one by one, each slot of the list emptied as it is handed out: a batch's packed copy is freed
    once its forward is done, not when the last batch of the shard is."""
    def take(j: int) -> Batch:
        batch, batches[j] = batches[j], None
        return batch

    for j in range(len(batches)):
        yield take(j)  # not held in this frame while the consumer runs


def _as_batches(inputs, token_weights=None, pack: bool = True):
    """Batches as given, or sample inputs (a list, or any iterable, which is read whole) packed into batches
    (make_batches)."""
    it = iter(inputs)
    first = next(it, None)
    if first is None:
        return []
    if isinstance(first, Batch):
        return itertools.chain([first], it)
    return handed_out(make_batches([first, *it], token_weights, pack=pack))


def run_batches(block: nn.Module, batches, reuse=None) -> list[torch.Tensor]:
    """Each sample's block output, batch by batch, in the order of the inputs the batches were made from
    (reuse: an open ForwardReuse stage of `block`, told each batch's key)."""
    out: dict[int, torch.Tensor] = {}
    for batch in batches:
        if reuse is not None:
            reuse.key = batch.key
        out.update(zip(batch.index, batch.split(run_block(block, batch.hidden, batch.kwargs))))
    return [out[i] for i in range(len(out))]


@torch.no_grad()
def propagate(block: nn.Module, inputs, *, act_bits: int | None = None,
              act_names: list[str] | None = None, pack: bool = True, reuse=None) -> list[torch.Tensor]:
    """Outputs of a block for each sample input (the next block's hidden states); inputs: sample inputs
    (packed here, make_batches) or Batches."""
    with act_fake_quant(block, act_names or [], act_bits):
        return run_batches(block, _as_batches(inputs, pack=pack), reuse)


# ----------------------------------------------------------------------------------------------- groups

def linear_calls(block: nn.Module, sample: SampleInput, names: list[str]) -> list[tuple[str, torch.Tensor]]:
    """(name, input tensor) of every call of the named linears in one forward of `sample`, in call order."""
    calls: list[tuple[str, torch.Tensor]] = []
    handles = [block.get_submodule(n).register_forward_pre_hook(
        lambda _m, args, n=n: calls.append((n, args[0]))) for n in names]
    try:
        with torch.no_grad():
            run_block(block, *sample)
    finally:
        for h in handles:
            h.remove()
    return calls


def classes_of(calls: list[tuple[str, torch.Tensor]]) -> list[list[str]]:
    """Linears fed the very same input tensor (q/k/v, gate/up), in the order the forward first reaches
    them (qkv -> o -> gate/up -> down); linears the forward never uses are left out."""
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


def called_once(calls: list[tuple[str, torch.Tensor]]) -> bool:
    """Whether no linear is called twice in one forward: then a group's statistics are complete as soon as
    each of its linears has been reached, and the rest of the block need not run."""
    names = [n for n, _ in calls]
    return len(names) == len(set(names))


def input_classes(block: nn.Module, sample: SampleInput, names: list[str]) -> list[list[str]]:
    """classes_of the linears' calls in one forward of `sample`."""
    return classes_of(linear_calls(block, sample, names))


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

def _weights_for(batch: Batch, name: str) -> torch.Tensor:
    w = batch.weights
    return w.get(name, w.get("*")) if isinstance(w, dict) else w


def stat_owners(stats: dict[str, dict]) -> dict[str, str]:
    """name -> the first name whose statistics are the very same object (linears that share a Gram)."""
    first: dict[int, str] = {}
    return {n: first.setdefault(id(s), n) for n, s in stats.items()}


@torch.no_grad()
def accumulate_stats(block: nn.Module, q_inputs, token_weights, names: list[str], *,
                     act_bits: int | None = None, act_names: list[str] | None = None,
                     fp_block: nn.Module | None = None, fp_inputs=None, need_fp_gram: bool = False,
                     dtype: torch.dtype = torch.float32, stop_early: bool = True,
                     q_reuse=None, fp_reuse=None, products=()) -> dict[str, dict]:
    """Statistics of the named linears over the given samples, summed in place batch by batch.

    q_inputs (and fp_inputs): sample inputs (packed here into batches, make_batches) with token_weights one
    [T] tensor per sample or a dict module name ('*' for the rest) -> per-sample tensors; or Batches that
    carry their weights (any iterable: shards streamed as they are read), token_weights then None.
    With fp_block / fp_inputs the GPTAQ cross term D is accumulated from the full-precision block's inputs.
    Linears fed the same input with the same token weights (q/k/v, gate/up) share one set of running sums,
    returned as the same dict under each name (stat_owners tells them apart). Linears no sample reached
    are absent. Only the running sums stay alive: no per-batch partial is kept.
    stop_early: each forward stops once every named linear has had its input (the rest of the block does not
    change it); only valid where no linear is called twice in a forward (called_once).
    q_reuse / fp_reuse: open ForwardReuse stages of the two blocks; each forward names its batch to them.
    products: GPTAQ linears, each fed an input of its own (plan.product_cross_terms), whose sums hold W D and
    tr(W Hfp W^T) summed token by token from products with their weight instead of D and Hfp (add_tokens).
    """
    current_w: dict[str, torch.Tensor] = {}
    fp_x: dict[str, torch.Tensor] = {}
    sums: dict[str, dict] = {}      # owner -> running sums
    owner: dict[str, str] = {}      # name -> owner, fixed by the first batch that reaches the name
    seen: dict[tuple, str] = {}     # within one batch: input identity -> the owner that added it
    batch_no = [0]
    pending: set[str] = set()       # linears of the group not yet reached in this forward
    raw_x: dict[str, torch.Tensor] = {}
    weights: dict[str, torch.Tensor] = {}  # products: each such linear's weight in the sums' dtype
    if products and fp_block is None:
        raise ValueError("products are GPTAQ's terms: they need the full-precision block and its inputs")

    def raw_hook(name):
        # Runs before activation fake-quantization: linears fed the same tensor are recognised by it even
        # when each gets its own (equal) quantized copy. Kept until the batch ends, so no id is reused.
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
                weight = None
                if name in products:
                    weight = weights.get(name)
                    if weight is None:  # the group's own linears are not quantized while their sums run
                        weight = weights[name] = _m.weight.detach().to(dtype)
                if o not in sums:
                    sums[o] = start_sums(x.shape[-1], cross=fp_block is not None and weight is None,
                                         need_fp_gram=need_fp_gram and weight is None, dtype=dtype, device=x.device,
                                         product_rows=None if weight is None else weight.shape[0])
                add_tokens(sums[o], x, current_w[name], xf, weight)
                seen[key] = name
            elif o in products or name in products:
                raise RuntimeError(f"{name} and {o} are fed the same input, but {o if o in products else name}'s "
                                   f"GPTAQ terms were planned as its own (plan.product_cross_terms)")
            elif seen.get(key) != o:
                raise RuntimeError(f"{name} shared its input with {o} on an earlier batch but not on batch "
                                   f"{batch_no[0]}: the block's data flow changed between batches")
            _reached(name)
        return hook

    def fp_hook(name):
        def hook(_m, args):
            fp_x[name] = args[0]
            _reached(name)
        return hook

    def _reached(name):
        pending.discard(name)
        if stop_early and not pending:
            raise _StopForward

    def forward(blk, batch):
        pending.update(names)
        try:
            run_block(blk, batch.hidden, batch.kwargs)
        except _StopForward:
            pass

    all_act = act_names or []
    q_batches = _as_batches(q_inputs, token_weights)
    fp_iter = iter(_as_batches(fp_inputs)) if fp_inputs is not None else None
    with act_fake_quant(block, all_act, act_bits):
        handles = [block.get_submodule(n).register_forward_pre_hook(raw_hook(n), prepend=True) for n in names]
        handles += [block.get_submodule(n).register_forward_pre_hook(q_hook(n)) for n in names]
        if fp_block is not None:
            handles += [fp_block.get_submodule(n).register_forward_pre_hook(fp_hook(n)) for n in names]
        try:
            for i, batch in enumerate(q_batches):
                batch_no[0] = i
                views: dict[int, torch.Tensor] = {}
                for n in names:
                    w = _weights_for(batch, n)
                    current_w[n] = views.setdefault(id(w), w.reshape(batch.hidden.shape[:-1]))
                if fp_block is not None:
                    fp_batch = next(fp_iter)
                    if fp_reuse is not None:
                        fp_reuse.key = fp_batch.key
                    forward(fp_block, fp_batch)
                if q_reuse is not None:
                    q_reuse.key = batch.key
                forward(block, batch)
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

def solve(weight: torch.Tensor, stats: dict | None, spec: QuantSpec, consume: bool = False,
          keep_factor: list | None = None) -> QuantResult:
    """Quantize one linear's weight from its reduced statistics (None: no data reached it -> RTN).

    GPTAQ's statistics may hold D and Hfp, or W D and tr(W Hfp W^T) (reduce_partials with W=weight, what the
    farm's solve task reduces to). consume=True: the statistics are normalised in place and must not be used
    after (see finalize_stats). keep_factor: gptq_quantize's (plain GPTQ: the factor of H is appended)."""
    if spec.method == "rtn" or stats is None or float(stats["w_sum"]) == 0.0:
        H = finalize_hessian(stats, consume)[0] if stats is not None and float(stats["w_sum"]) > 0 else None
        return rtn_quantize(weight, bits=spec.bits, group_size=spec.group_size, sym=spec.sym, H=H)
    gptaq = spec.method == "gptaq"
    S = finalize_stats({k: v for k, v in stats.items() if gptaq or k not in ("D", "Hfp")}, consume)
    # S["H"] is the caller's consumed sum or a fresh normalised copy: the solver may factor it in place.
    return gptq_quantize(weight, S.pop("H"), bits=spec.bits, group_size=spec.group_size, sym=spec.sym,
                         damp=spec.damp, blocksize=spec.blocksize, act_order=spec.act_order,
                         static_groups=spec.static_groups, D=S.get("D"), Hfp=S.get("Hfp"), WD=S.get("WD"),
                         WHfpW=S.get("WHfpW"), overwrite_H=True, keep_factor=keep_factor)


def solve_with_factor(weight: torch.Tensor, factor: HessianFactor, spec: QuantSpec) -> QuantResult:
    """solve() for a linear whose inputs' Hessian another linear of its group has factored already (plain GPTQ):
    the same result as from the statistics."""
    return gptq_quantize(weight, None, bits=spec.bits, group_size=spec.group_size, sym=spec.sym, damp=spec.damp,
                         blocksize=spec.blocksize, act_order=spec.act_order, static_groups=spec.static_groups,
                         factor=factor)


def solve_partials(weight: torch.Tensor, partials: Iterable[dict], spec: QuantSpec,
                   keep_factor: list | None = None) -> tuple[QuantResult, dict]:
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
    return solve(weight, stats, spec, consume=True, keep_factor=keep_factor), counts


@torch.no_grad()
def apply_qweight(block: nn.Module, name: str, result: QuantResult) -> None:
    lin = block.get_submodule(name)
    lin.weight.copy_(result.weight.to(lin.weight.dtype).reshape(lin.weight.shape))


def rtn_proxy(block: nn.Module, names: list[str], spec: QuantSpec) -> nn.Module:
    """A copy of the block with RTN weights: the cheap stand-in for 'this block, quantized' that gradient
    importance strategies need before the real solve."""
    from .models.adapter import copy_module

    proxy = copy_module(block)
    with torch.no_grad():
        for n in names:
            w = proxy.get_submodule(n).weight
            flat = w.view(-1, w.shape[-1])
            # A few rows at a time (RTN grids are per row): not the whole linear's codes and float32 copies.
            rows = max(1, plan.REBUILD_WEIGHTS // flat.shape[1])
            for r0 in range(0, flat.shape[0], rows):
                part = flat[r0:r0 + rows]
                part.copy_(rtn_quantize(part.float(), bits=spec.bits, group_size=spec.group_size, sym=spec.sym).weight)
    return proxy


# ----------------------------------------------------------------------------------------------- gradients

def head_loss(norm: nn.Module | None, head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the next-token prediction on labelled (answer) tokens. Logits are computed on
    those positions only: a full [tokens, vocab] would be 1.2 GB for 2048 tokens of a 152k vocabulary."""
    h = norm(hidden) if norm is not None else hidden
    h = h.reshape(-1, h.shape[-1])[:-1]
    target = labels.reshape(-1)[1:].to(h.device)
    picked = target != -100
    if not bool(picked.any()):
        return (h * 0).sum()  # a sample without an answer: no loss, no gradient
    logits = head(h[picked]).float()
    return torch.nn.functional.cross_entropy(logits, target[picked], reduction="mean")


def head_grad(norm, head, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, float]:
    h = hidden.detach().requires_grad_(True)
    loss = head_loss(norm, head, h, labels)
    (g,) = torch.autograd.grad(loss, h)
    return g.detach(), float(loss.detach())


def block_vjp_batched(block: nn.Module, inputs: list[SampleInput], grads_out: list[torch.Tensor]) -> list[torch.Tensor]:
    """dL/d(block input) of each sample from dL/d(block output), in the batches of make_batches: samples packed
    in a row attend only to themselves, so each one's gradient is its own; padding gets none."""
    out: dict[int, torch.Tensor] = {}
    for batch in make_batches(inputs):
        g = batch.spread(grads_out, features=1)
        out.update(zip(batch.index, batch.split(block_vjp(block, batch.hidden, batch.kwargs, g))))
    return [out[i] for i in range(len(inputs))]


def block_vjp(block: nn.Module, hidden: torch.Tensor, kwargs: dict, grad_out: torch.Tensor) -> torch.Tensor:
    """dL/d(block input) from dL/d(block output), recomputing the block forward with autograd."""
    h = hidden.detach().requires_grad_(True)
    with torch.enable_grad():
        out = run_block(block, h, kwargs)
        (g,) = torch.autograd.grad(out, h, grad_outputs=grad_out)
    return g.detach()
