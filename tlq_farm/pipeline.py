"""The local job: calibrate a model block by block on the quantized inference path, then export.

This is the embedded default. It calls the same per-block steps (tlq_farm.block) that farm tasks call;
here the activations stay in memory instead of going through a store.
"""

from __future__ import annotations

import copy
import json
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import block as B
from .calib.data import load_calibration, model_inputs
from .importance import ImportanceContext, get_strategy
from .models.adapter import Layout, find_layout, linear_names, load_model
from .report import format_loss, loss_sum
from .spec import JobSpec


@dataclass
class BlockReport:
    index: int
    seconds: float
    modules: dict = field(default_factory=dict)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _progress(enabled: bool):
    def bar(iterable=None, **kw):
        return tqdm(iterable, disable=not enabled, dynamic_ncols=True, leave=False, **kw)
    return bar


def calibrate_blocks(blocks, captured: list[B.Captured], spec, *, prefix: str, strategy=None, ctx=None,
                     fp_captured: list[B.Captured] | None = None, bar=None, log=None,
                     shards: list[tuple[int, int]] | None = None, shard_tokens: list[int] | None = None
                     ) -> tuple[dict, list[BlockReport]]:
    """Quantize every block of a block list in order, each on the outputs of the quantized blocks before it.

    shards, shard_tokens: the job's shards (sample ranges) and their token counts: statistics are summed over
    the farm's partitions of them (plan.block_partitions), then in partition order (float64), as the farm
    does; None: one shard of every sample.
    Returns (QuantResult per full module name, per-block reports). The blocks' weights are replaced in place
    by their dequantized values (the model becomes the fake-quantized model).
    """
    if shards is None:
        shards, shard_tokens = [(0, len(captured))], [0]
    q = spec.quant
    need_fp = q.method == "gptaq" or bool(strategy is not None and strategy.NEEDS_FP_CHAIN)
    q_chain = [c.hidden for c in captured]
    fp_src = fp_captured or captured
    fp_chain = [c.hidden for c in fp_src] if need_fp else None
    results: dict = {}
    reports: list[BlockReport] = []
    bar = bar or _progress(False)
    for b in bar(range(len(blocks)), desc=f"{prefix} blocks", unit="block"):
        t0 = time.perf_counter()
        block = blocks[b]
        names = linear_names(block)
        q_inputs = [(h, c.kwargs(b)) for h, c in zip(q_chain, captured)]
        fp_inputs = [(h, c.kwargs(b)) for h, c in zip(fp_chain, fp_src)] if need_fp else None
        fp_block = copy.deepcopy(block) if need_fp else None
        rep = BlockReport(b, 0.0)
        if q.method == "rtn":
            for n in names:
                res = B.solve(block.get_submodule(n).weight.detach().float(), None, q)
                B.apply_qweight(block, n, res)
                results[f"{prefix}.{b}.{n}"] = res
                rep.modules[n] = {"loss": res.loss, "group": 0}
        else:
            weights = strategy.block_weights(ctx, b, block, names, q_inputs, fp_inputs) if strategy else [
                torch.ones(h.shape[:-1]).reshape(-1) for h in q_chain]
            classes = B.input_classes(block, q_inputs[0], names)
            groups = B.sequential_groups(block, None, names, classes) if q.true_sequential else [names]
            parts = block_partitions(shards, shard_tokens, q_chain[0].shape[-1], q, groups, classes,
                                     {n: block.get_submodule(n).in_features for n in names}, spec.partition_tokens)
            for gi, group in enumerate(groups):
                stats = sharded_stats(block, q_inputs, weights, group, parts, act_bits=q.act_bits, act_names=names,
                                      fp_block=fp_block if q.method == "gptaq" else None,
                                      fp_inputs=fp_inputs if q.method == "gptaq" else None,
                                      need_fp_gram=q.method == "gptaq",
                                      linear_weights={n: block.get_submodule(n).weight.detach().float()
                                                      for n in group} if q.method == "gptaq" else None)
                for n in group:
                    res = B.solve(block.get_submodule(n).weight.detach().float(), stats.get(n), q)
                    B.apply_qweight(block, n, res)
                    results[f"{prefix}.{b}.{n}"] = res
                    rep.modules[n] = {"loss": res.loss, "group": gi}
                    if n in stats:
                        rep.modules[n].update(tokens=int(stats[n]["tokens"]), weight_sum=float(stats[n]["w_sum"]),
                                              damp=getattr(res, "damp_used", None))
        q_chain = B.propagate(block, q_inputs, act_bits=q.act_bits, act_names=names)
        if need_fp:
            fp_chain = B.propagate(fp_block, fp_inputs)
        rep.seconds = time.perf_counter() - t0
        reports.append(rep)
        if log:
            total = loss_sum(m["loss"] for m in rep.modules.values())
            log(f"{prefix} block {b}: {len(names)} linears, loss {format_loss(total)}, {rep.seconds:.1f}s")
    return results, reports


def _shard_weights(weights, start: int, end: int):
    if isinstance(weights, dict):
        return {n: w[start:end] for n, w in weights.items()}
    return weights[start:end]


def block_partitions(shards: list[tuple[int, int]], shard_tokens: list[int], hidden: int, q,
                     groups: list[list[str]], classes, in_features, partition_tokens: int = 0
                     ) -> list[tuple[int, int]]:
    """The farm's statistics partitions of one block (tlq_farm.plan.block_partitions) as sample ranges."""
    from .plan import block_partitions as starts_of

    starts = starts_of(shard_tokens, hidden, {"method": q.method, "importance": q.importance}, groups, classes,
                       in_features, partition_tokens)
    ends = starts[1:] + [len(shards)]
    return [(shards[a][0], shards[e - 1][1]) for a, e in zip(starts, ends)]


def sharded_stats(block, q_inputs, weights, names, partitions, *, fp_inputs=None, linear_weights=None,
                  **kw) -> dict[str, dict]:
    """accumulate_stats over each partition (in place, float32), then the partitions' partials summed in
    partition order (float64): the farm's arithmetic, step for step. linear_weights (GPTAQ): each linear's
    weight, which its reduction folds D and Hfp into, as the farm's solve task does."""
    from .quant import reduce_partials

    per_part = [B.accumulate_stats(block, q_inputs[a:b], _shard_weights(weights, a, b), names,
                                   fp_inputs=fp_inputs[a:b] if fp_inputs is not None else None, **kw)
                for a, b in partitions]
    reduced: dict[tuple, dict] = {}
    out: dict[str, dict] = {}
    for n in names:
        parts = [p[n] for p in per_part if n in p]
        if not parts:
            continue  # no sample reached this linear
        if linear_weights is not None:
            out[n] = reduce_partials(parts, W=linear_weights[n])
            continue
        key = tuple(id(x) for x in parts)  # linears sharing a Gram share its reduction too
        if key not in reduced:
            reduced[key] = reduce_partials(parts)
        out[n] = reduced[key]
    return out


def shards_of(samples: list[dict], shard_tokens: int) -> list[tuple[int, int]]:
    """The job's shards: consecutive samples up to shard_tokens tokens (tlq_farm.plan.shard_ranges)."""
    from .plan import shard_ranges

    return shard_ranges([int(s["attention_mask"].sum()) for s in samples], shard_tokens)


def check_grid_fits(model, layout: Layout, spec: JobSpec) -> None:
    """Refuse a group size that does not divide every quantized layer before any work is done."""
    from .quant.grid import check_grid_args
    from .spec import SpecError

    lists = [layout.decoder_blocks(model)]
    if spec.quant.quantize_vision and layout.vision_blocks:
        lists.append(layout.vision_block_list(model))
    for blocks in lists:
        for n in linear_names(blocks[0]):
            cols = blocks[0].get_submodule(n).in_features
            try:
                check_grid_args(cols, spec.quant.bits, spec.quant.group_size)
            except ValueError as e:
                raise SpecError(f"{n}: {e}") from e


def run_local(spec: JobSpec, out_dir: str | Path, *, device: str = "cpu", progress: bool = True, log=print,
              overwrite: bool = False) -> dict:
    """Quantize spec.model on spec.calib and write the export and tlq_report.json to out_dir."""
    from .quant.export import export_checkpoint

    spec.validate()
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"output folder {out_dir} is not empty: choose another --out or pass --overwrite")
    bar = _progress(progress)
    t_start = time.perf_counter()
    torch.manual_seed(spec.seed)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    model, processor = load_model(spec.model, device=device)
    for p in model.parameters():
        p.requires_grad_(False)
    layout = find_layout(model)
    check_grid_fits(model, layout, spec)
    timings["load"] = time.perf_counter() - t

    t = time.perf_counter()
    calib = load_calibration(spec.calib, processor, samples=spec.samples, seq_len=spec.seq_len, seed=spec.seed)
    samples = [{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in s.items()} for s in calib.samples]
    timings["calibration data"] = time.perf_counter() - t
    log(f"calibration: {len(samples)} samples, {calib.tokens} tokens")
    for line in calib.notes(spec.samples):
        log(line)

    results: dict = {}
    block_reports: dict[str, list] = {}
    blocks = layout.decoder_blocks(model)

    fp_captured = None
    vision_blocks = layout.vision_block_list(model)
    if spec.quant.quantize_vision and vision_blocks is not None:
        t = time.perf_counter()
        fp_captured = [B.capture(model, blocks, model_inputs(s)) for s in bar(samples, desc="capture (fp)")]
        v_captured = [B.capture(model, vision_blocks, model_inputs(s)) for s in bar(samples, desc="capture vision")]
        res, reps = calibrate_blocks(vision_blocks, v_captured, spec, prefix=layout.vision_blocks, bar=bar, log=log)
        results.update(res)
        block_reports[layout.vision_blocks] = reps
        timings["vision blocks"] = time.perf_counter() - t

    t = time.perf_counter()
    captured = [B.capture(model, blocks, model_inputs(s)) for s in bar(samples, desc="capture")]
    timings["capture"] = time.perf_counter() - t

    strategy, ctx = None, None
    if spec.quant.method != "rtn":
        t = time.perf_counter()
        valid = [s["attention_mask"].reshape(-1).float() for s in samples]
        vision = [s["vision_mask"].reshape(-1).bool() if "vision_mask" in s else torch.zeros_like(v, dtype=torch.bool)
                  for s, v in zip(samples, valid)]
        ctx = ImportanceContext(spec=spec.quant, blocks=blocks, norm=layout.get(model, layout.norm),
                                head=layout.get(model, layout.head), captured=captured, valid=valid, vision=vision,
                                labels=[s["labels"] for s in samples], names=[linear_names(b) for b in blocks])
        strategy = get_strategy(spec.quant.importance)
        strategy.prepare(ctx)
        timings["importance pass"] = time.perf_counter() - t

    t = time.perf_counter()
    tokens = [int(s["attention_mask"].sum()) for s in samples]
    shards = shards_of(samples, spec.shard_tokens)
    res, reps = calibrate_blocks(blocks, captured, spec, prefix=layout.blocks, strategy=strategy, ctx=ctx,
                                 fp_captured=fp_captured, bar=bar, log=log, shards=shards,
                                 shard_tokens=[sum(tokens[a:b]) for a, b in shards])
    results.update(res)
    block_reports[layout.blocks] = reps
    timings["decoder blocks"] = time.perf_counter() - t

    t = time.perf_counter()
    report = build_report(spec, layout, calib, results, block_reports, ctx, timings, t_start)
    export_checkpoint(model, spec.model, out_dir, results, act_bits=spec.quant.act_bits, fmt=spec.fmt,
                      extra_config={"spec": spec.to_dict()}, overwrite=overwrite)
    timings["export"] = time.perf_counter() - t
    report["time"]["stages"] = timings
    report["time"]["total_s"] = time.perf_counter() - t_start
    report["peak_memory"] = {"rss_mib": peak_rss_mib(),
                             "cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None}
    write_json_atomic(out_dir / "tlq_report.json", report)
    return report


def build_report(spec, layout: Layout, calib, results, block_reports, ctx, timings, t_start) -> dict:
    modules = {}
    for prefix, reps in block_reports.items():
        for rep in reps:
            for n, m in rep.modules.items():
                modules[f"{prefix}.{rep.index}.{n}"] = {**m, "block": rep.index}
    vision_tokens = int(sum(s["vision_mask"].sum() for s in calib.samples if "vision_mask" in s))
    rep = {
        "spec": spec.to_dict(),
        "model_class": layout.model_class,
        "layout": {"blocks": layout.blocks, "norm": layout.norm, "head": layout.head, "vision_blocks": layout.vision_blocks},
        "calibration": {"samples": len(calib.samples), "tokens": calib.tokens, "vision_tokens": vision_tokens,
                        "text_tokens": calib.tokens - vision_tokens, "skipped": calib.skipped},
        "modules": modules,
        "blocks": {prefix: [{"index": r.index, "seconds": r.seconds,
                             "loss": loss_sum(m["loss"] for m in r.modules.values())} for r in reps]
                   for prefix, reps in block_reports.items()},
        "totals": {"modules": len(results), "loss": loss_sum(m["loss"] for m in modules.values()),
                   "quantized_params": int(sum(r.codes.numel() for r in results.values()))},
        "time": {},
    }
    if ctx is not None:
        imp = {}
        if "modality_ratio" in ctx.state:
            imp["modality_ratio"] = [float(x) for x in ctx.state["modality_ratio"]]
            imp["modality_ratio_raw"] = [float(x) for x in ctx.state.get("modality_ratio_raw", ctx.state["modality_ratio"])]
        if "tlq_kept" in ctx.state:
            kept = ctx.state["tlq_kept"]
            imp["tlq_kept_tokens"] = int(sum(int(k.sum()) for k in kept))
            imp["tlq_token_scores"] = [[round(float(x), 5) for x in s] for s in ctx.state["tlq_scores"][:8]]
        rep["importance"] = imp
    return rep


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)
