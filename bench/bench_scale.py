"""The farm at real width: every task's peak memory and every block's store bytes on a Qwen2-VL-7B-shaped model.

    .venv/bin/python bench/bench_scale.py [--blocks 2] [--samples 4] [--dtype bfloat16] [--root /tmp/tlq-scale]

Builds a checkpoint of Qwen2-VL-7B's shapes (hidden 3584, MLP 18944, 28 heads / 4 KV heads, vocab 152064,
a vision tower of 32 blocks of width 1280) with `--blocks` decoder blocks, in bfloat16, written part by part
(the vision tower, the embeddings, each block, the head) without ever holding the model whole; weights are
random (normal, std 0.02), which is all that memory and bytes depend on. Then runs two jobs through
`tlq-farm run` (embedded: the farm's tasks in one process on a folder store): gptq + tlq and gptaq + uniform,
computing in --dtype (bfloat16 by default: what `--dtype auto` gives a bf16 checkpoint on a GPU or a farm).

Prints, for each job, every task kind's measured peak RSS (from the task records) against
plan.estimate_memory and against 10 GB (what a 12 GB card leaves), and every block's bytes in the store
against the minimum a block must keep (its weights in the checkpoint's dtype, its input and output
activations per chain, its packed quantized weights); then the same arithmetic for 28 blocks and
128 x 2048 calibration tokens. Markdown tables, for docs/benchmarks.md ("Scale").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tlq_farm import plan, steps  # noqa: E402
from tlq_farm.store import LocalStore, keys  # noqa: E402
from tlq_farm.store.tensors import get_json  # noqa: E402

GB = 1e9
CARD_BYTES = 10 * GB
QWEN2_VL_7B = dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
                   vocab_size=152064, vision_depth=32, vision_embed_dim=1280, vision_num_heads=16, vision_mlp_ratio=4)


def build_checkpoint(out: Path, blocks: int) -> Path:
    """A Qwen2-VL-7B-shaped checkpoint with `blocks` decoder blocks, bf16, one safetensors file per part."""
    from safetensors.torch import save_file

    from tlq_farm.models.adapter import find_layout
    from tlq_farm.models.tiny import build_processor, build_tokenizer, tiny_config
    from tlq_farm.quant.export import TensorEntry, _saved_names
    from tlq_farm.staging import model_class_for, split_keys

    if (out / "model.safetensors.index.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(arch="qwen2_vl")
    d = QWEN2_VL_7B
    config = tiny_config("qwen2_vl", d["vocab_size"], tokenizer=tokenizer, hidden_size=d["hidden_size"],
                         intermediate_size=d["intermediate_size"], num_attention_heads=d["num_attention_heads"],
                         num_key_value_heads=d["num_key_value_heads"], num_hidden_layers=blocks, head_dim=128,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                          "mrope_section": [16, 24, 24]},
                         vision_depth=d["vision_depth"], vision_embed_dim=d["vision_embed_dim"],
                         vision_num_heads=d["vision_num_heads"], vision_mlp_ratio=d["vision_mlp_ratio"])
    with torch.device("meta"):
        meta = model_class_for(config).from_config(config, dtype=torch.bfloat16)
    state = meta.state_dict()
    saved = _saved_names(meta, {n: TensorEntry(t.dtype, tuple(t.shape), Path(), n) for n, t in state.items()})
    checkpoint_name = {n: s for s, n in saved.items()}
    pieces = split_keys(list(state), find_layout(meta), blocks)
    # Config files first: save_pretrained clears shard files it did not write itself.
    meta.save_pretrained(out, state_dict={})
    build_processor("qwen2_vl", tokenizer, image_size=56).save_pretrained(out)
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    files = [p for p in pieces if pieces[p]]
    for i, piece in enumerate(files):
        tensors = {}
        for n in pieces[piece]:
            if n not in checkpoint_name:
                continue  # a tied duplicate
            shape = tuple(state[n].shape)
            if n.endswith("bias"):
                t = torch.zeros(shape)
            elif len(shape) == 1:
                t = torch.ones(shape)
            else:
                t = torch.randn(shape, generator=gen) * 0.02
            tensors[checkpoint_name[n]] = t.to(torch.bfloat16)
        name = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        print(f"  wrote {name}: {piece}, {sum(t.numel() for t in tensors.values()) / 1e6:.0f}M parameters", flush=True)
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    return out


def make_calib(root: Path, samples: int) -> Path:
    from tlq_farm.models.tiny import write_image_calib

    return write_image_calib(root / "calib", samples, size=112)


def run_job(model: Path, calib: Path, store: Path, out: Path, samples: int, method: str, importance: str,
            dtype: str) -> dict:
    """`tlq-farm run` in its own process (one torch thread); returns its wall and CPU seconds and peak RSS."""
    cmd = [sys.executable, "-m", "coordinator.cli", "run", str(model), "--calib", str(calib), "--store", str(store),
           "--create-store", "--out", str(out), "--samples", str(samples), "--method", method,
           "--importance", importance, "--dtype", dtype, "--quiet", "--overwrite"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    # The peak is sampled from outside: a task resets the process's own high-water mark (steps.TaskMeter), and
    # ru_maxrss of children is the largest of every child this process has had.
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, next(int(line.split()[1]) for line in open(f"/proc/{proc.pid}/status")
                                  if line.startswith("VmRSS")))
        except (OSError, StopIteration):
            pass
        time.sleep(0.02)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"wall_s": time.perf_counter() - t0, "cpu_s": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
            "peak_rss_gb": peak * 1024 / GB}


def job_of(store: Path, method: str, importance: str) -> str:
    from tlq_farm.staging import list_jobs

    s = LocalStore(store)
    for job in list_jobs(s):
        q = get_json(s, keys.manifest(job))["spec"]["quant"]
        if q["method"] == method and q["importance"] == importance:
            return job
    raise SystemExit(f"no {method}/{importance} job in {store}")


def object_bytes(store: Path, job: str) -> dict[str, int]:
    """Committed object key -> its size in bytes."""
    s = LocalStore(store)
    return {k: (store / k).stat().st_size for k in s.list_committed(keys.job_prefix(job)) if (store / k).is_file()}


def block_of(key: str) -> int | None:
    for part in key.split("/"):
        if part.startswith("block-") and part[6:].split(".")[0].isdigit():
            return int(part[6:].split(".")[0])
    return None


def task_of(name: str, tower: str | None) -> plan.Task:
    """The task a record names (plan.Task.name: kind[-b003|-vb003][-g01][-s0002][-module])."""
    kind, *rest = name.split("-", 1)
    fields: dict = {"kind": kind, "tower": tower}
    rest = rest[0].split("-", 3) if rest else []
    while rest:
        part = rest[0]
        if part[:1] in "bv" and part.lstrip("vb").isdigit() and "block" not in fields:
            fields["block"] = int(part.lstrip("vb"))
        elif part[:1] == "g" and part[1:].isdigit() and "group" not in fields:
            fields["group"] = int(part[1:])
        elif part[:1] == "s" and part[1:].isdigit() and "shard" not in fields:
            fields["shard"] = int(part[1:])
        else:
            fields["module"] = "-".join(rest)
            break
        rest = rest[1:]
    return plan.Task(**fields)


def task_table(store: Path, job: str) -> list[str]:
    """Per task kind, the task with the largest peak: its peak RSS, the part of it above what the process
    held when the task began (its own memory, what plan.estimate_memory estimates), and the estimate."""
    s = LocalStore(store)
    records = steps.task_records(s, job)
    by_kind: dict[str, list[dict]] = {}
    for r in records:
        by_kind.setdefault(r["kind"], []).append(r)
    rows = ["| task kind | tasks | peak RSS (GB) | own (GB) | estimate (GB) | own / estimate | peak ≤ 10 GB |",
            "|---|---:|---:|---:|---:|---:|---|"]
    for kind in plan.KINDS:
        rs = by_kind.get(kind)
        if not rs:
            continue
        worst = max(rs, key=lambda r: r["peak_rss_mib"])
        # The estimate of this version of plan.estimate_memory (a pure function of the task, the manifest and
        # the groups), not the one the record kept from the run.
        manifest, groups = get_json(s, keys.manifest(job)), get_json(s, keys.plan_groups(job))
        task = task_of(worst["task"], worst.get("tower"))
        est = plan.estimate_memory(task, manifest, None if kind in ("embed", "groups") else groups) / GB
        peak = worst["peak_rss_mib"] * 2**20 / GB
        # Its own memory: the peak above what was in use at its start (the heap kept free counts as its own).
        start = None if worst.get("rss_start_mib") is None else worst["rss_start_mib"] - (worst.get("held_free_mib") or 0)
        own = "" if start is None else f"{(worst['peak_rss_mib'] - start) * 2**20 / GB:.2f}"
        # Below 50 MB both are noise against a process of gigabytes (the importance task's per-token scores).
        ratio = "" if start is None else ("-" if est < 0.05 else f"{(worst['peak_rss_mib'] - start) * 2**20 / GB / est:.2f}")
        rows.append(f"| {kind} | {len(rs)} | {peak:.2f} | {own} | {est:.2f} | {ratio} | "
                    f"{'yes' if peak * GB <= CARD_BYTES else 'no'} |")
    return rows


def chains_of(manifest: dict) -> int:
    """The chains a job carries through a block: q; fp for gptaq, vlmq and the gradient pass; tlq's RTN
    chain; the gradient chain of tlq and modality."""
    return (1 + plan.needs_fp_chain(manifest) + plan.needs_rtn_chain(manifest)
            + plan.needs_global_importance(manifest))


def minimum_block_bytes(manifest: dict, groups: dict, objects: dict[str, int], b: int, job: str) -> int:
    """A block's weights as staged (checkpoint dtype), its activations in and out per chain, its qweights
    packed at the job's bits."""
    chains = chains_of(manifest)
    acts_in = sum(objects.get(keys.acts(job, "q", b, k), 0) for k in range(len(manifest["shards"])))
    weights = objects[keys.staged_block(job, b)]
    params = sum(o * i for o, i in groups["blocks"][b]["shapes"].values())
    packed = params * manifest["spec"]["quant"]["bits"] // 8
    return weights + 2 * chains * acts_in + packed


def bytes_table(store: Path, job: str) -> list[str]:
    s = LocalStore(store)
    manifest = get_json(s, keys.manifest(job))
    groups = get_json(s, keys.plan_groups(job))
    objects = object_bytes(store, job)
    rows = ["| block | in the store (MB) | of which statistics (MB) | minimum (MB) | ratio |", "|---:|---:|---:|---:|---:|"]
    for b in range(manifest["n_blocks"]):
        mine = {k: v for k, v in objects.items() if block_of(k) == b}
        # The last block's outputs are never written (nothing reads them); count its inputs once.
        stats = sum(v for k, v in mine.items() if "/stats/" in k)
        mn = minimum_block_bytes(manifest, groups, objects, b, job)
        rows.append(f"| {b} | {sum(mine.values()) / 1e6:.0f} | {stats / 1e6:.0f} | {mn / 1e6:.0f} | "
                    f"{sum(mine.values()) / mn:.2f} |")
    return rows


def arithmetic_7b(method: str) -> list[str]:
    """The plan's own arithmetic for Qwen2-VL-7B, 28 blocks, 128 x 2048 tokens in 8192-token shards."""
    d = QWEN2_VL_7B
    h, f = d["hidden_size"], d["intermediate_size"]
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj"]
    kv = h // d["num_attention_heads"] * d["num_key_value_heads"]
    shapes = {"self_attn.q_proj": [h, h], "self_attn.k_proj": [kv, h], "self_attn.v_proj": [kv, h],
              "self_attn.o_proj": [h, h], "mlp.gate_proj": [f, h], "mlp.up_proj": [f, h], "mlp.down_proj": [h, f]}
    grp = [names[:3], [names[3]], names[4:6], [names[6]]]
    groups = {"blocks": [{"names": names, "groups": grp, "inputs": grp, "shapes": shapes,
                          "in_features": {n: s[1] for n, s in shapes.items()}}] * 28}
    shards = 32
    block_bytes = sum(o * i for o, i in shapes.values()) * 2 + 4 * h
    importance = "tlq" if method == "gptq" else "uniform"  # the two jobs the benchmark runs
    manifest = {"job": "x", "spec": {"quant": {"method": method, "importance": importance, "bits": 4},
                                     "partition_tokens": 0, "dtype": "bfloat16"},
                "calibration": {"vision_tokens": 262144 // 2}, "n_blocks": 28, "checkpoint_dtype": "bfloat16",
                "shards": [[4 * k, 4 * k + 4] for k in range(shards)], "shard_tokens": [8192] * shards,
                "shard_input_bytes": [8192 * 8] * shards, "files": [],
                "sizes": {"embed": 152064 * h * 2 + 675_000_000 * 2, "head": 152064 * h * 2, "blocks": [block_bytes] * 28,
                          "hidden": h}}
    starts = plan.stat_partitions(manifest, groups, 0)
    in_place = plan.solves_in_place(manifest, groups, 0)  # one partition: the sums never reach the store
    partial = 0 if in_place else sum(plan.partial_bytes(manifest["spec"]["quant"], g, grp,
                                                        groups["blocks"][0]["in_features"], shapes=shapes) for g in grp)
    acts = 262144 * h * plan.act_bytes(manifest)
    chains = chains_of(manifest)
    rows = [f"| {method} + {importance}, 28 blocks, 128 x 2048 tokens, bf16 | |", "|---|---:|",
            f"| statistics partitions per block | {len(starts)} |",
            f"| statistics in the store per block | {len(starts) * partial / GB:.2f} GB |",
            f"| one chain's activations entering a block (bf16) | {acts / GB:.2f} GB |",
            f"| chains through a block | {chains} |",
            f"| statistics for the job | {28 * len(starts) * partial / GB:.0f} GB (format 1: ~3100 GB for gptq) |"]
    # A block's bytes in the store: staged weights (bf16), activations in and out per chain, statistics,
    # packed 4-bit qweights; against the minimum without statistics.
    weights, packed = block_bytes, sum(o * i for o, i in shapes.values()) // 2
    stored = weights + 2 * chains * acts + len(starts) * partial + packed
    minimum = weights + 2 * chains * acts + packed
    rows.append(f"| store bytes per block | {stored / GB:.1f} GB = {stored / minimum:.2f} x the minimum "
                f"({minimum / GB:.1f} GB) |")
    rows.append(f"| a worker's cache, to read nothing twice (plan.cache_bytes) | {plan.cache_bytes(manifest, groups) / GB:.1f} GB |")
    tasks = [("embed", plan.Task("embed", shard=0)), ("forward", plan.Task("forward", block=0, shard=0)),
             ("backward (a block)", plan.Task("backward", block=0, shard=0)),
             ("backward (the head)", plan.Task("backward", block=28, shard=0)), ("importance", plan.Task("importance")),
             ("propagate", plan.Task("propagate", block=0, shard=0)), ("export", plan.Task("export"))]
    if in_place:
        tasks[5:5] = [("quantize (down_proj)", plan.Task("quantize", block=0, group=3)),
                      ("quantize (q/k/v)", plan.Task("quantize", block=0, group=0))]
    else:
        tasks[5:5] = [("stats (down_proj)", plan.Task("stats", block=0, group=3, shard=0)),
                      ("solve (down_proj)", plan.Task("solve", block=0, group=3, module="mlp.down_proj"))]
    for kind, task in tasks:
        rows.append(f"| estimate: {kind} | {plan.estimate_memory(task, manifest, groups) / GB:.1f} GB |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=Path("/tmp/tlq-scale"))
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--jobs", nargs="+", default=["gptq:tlq", "gptaq:uniform"])
    ap.add_argument("--dtype", default="bfloat16", help="the jobs' compute dtype (--dtype of tlq-farm run)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    model = build_checkpoint(args.root / "model", args.blocks)
    calib = make_calib(args.root, args.samples)
    store = args.root / "store"
    # A fresh store and exports: a job left by an earlier run (another version of the code) would be attached
    # to, and its task records read as this run's. The checkpoint is kept (it depends on --blocks only).
    import shutil

    for stale in [store, *args.root.glob("out-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    for spec in args.jobs:
        method, importance = spec.split(":")
        run = run_job(model, calib, store, args.root / f"out-{method}-{importance}", args.samples, method, importance,
                      args.dtype)
        job = job_of(store, method, importance)
        print(f"\n### {method} + {importance} (job {job}): whole command {run['wall_s']:.0f} s wall, "
              f"{run['cpu_s']:.0f} s CPU, peak RSS {run['peak_rss_gb']:.2f} GB\n")
        print("\n".join(task_table(store, job)))
        print()
        print("\n".join(bytes_table(store, job)))
    for method in ("gptq", "gptaq"):
        print()
        print("\n".join(arithmetic_7b(method)))


if __name__ == "__main__":
    main()
