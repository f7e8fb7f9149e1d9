"""The HTML report of a quantization job: per-module losses, token-importance maps, a timeline.

Pure building blocks (report dict -> tables -> PNG files -> one HTML page with relative links), plus
importance_maps(), which runs a job's own tasks on a few calibration samples as far as its token weights and
maps the vision tokens back onto the image's merged patch grid.
"""

from __future__ import annotations

import html
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# The order run_local times its stages in (tlq_report.json stores them sorted by name).
STAGE_ORDER = ("load", "calibration data", "vision blocks", "capture", "importance pass", "decoder blocks", "export")
# The order a farm job's task kinds run in (its report's stages are task kinds).
KIND_ORDER = ("embed", "groups", "importance", "weights", "stats", "solve", "quantize", "propagate", "export")
# Fields of tlq_report.json that differ from run to run (wall clock, memory); every other field, like the
# checkpoint files, is the same for any number of workers and after any crash.
RUN_FIELDS = ("time", "timeline", "peak_memory", "store_io")


# ----------------------------------------------------------------------------------------------- fields


def loss_sum(losses) -> float | None:
    """Sum of the measured losses; None when none was measured (RTN has no statistics to measure on)."""
    measured = [float(x) for x in losses if x is not None]
    return sum(measured) if measured else None


def format_loss(loss: float | None) -> str:
    return "n/a" if loss is None else f"{loss:.4g}"


def without_run_fields(report: dict) -> dict:
    """The report without its run-dependent fields: what two runs of the same job must agree on."""
    return {k: v for k, v in report.items() if k not in RUN_FIELDS}


def comparable_report_bytes(data: bytes) -> bytes:
    """tlq_report.json bytes -> canonical JSON of the report without its run-dependent fields."""
    return json.dumps(without_run_fields(json.loads(data)), sort_keys=True).encode()


def _task_kind(record: dict) -> str:
    return record.get("kind") or record["task"].split("-", 1)[0]


def _task_block(record: dict) -> int | None:
    if record.get("block") is not None:
        return int(record["block"])
    m = re.search(r"-b(\d+)(?:-|$)", record["task"])
    return int(m.group(1)) if m else None


def _lane(record: dict) -> str:
    """A worker process: its name, and host:pid when the record has them."""
    where = record.get("worker") or record.get("hostname") or record.get("host", "?")
    return f"{where} ({record.get('host', '?')}:{record.get('pid', '?')})" if "pid" in record else str(where)


def summarize_task_records(records: list[dict]) -> dict:
    """tlq_report.json's run fields of a farm job, from its computed task records (tlq_farm.steps.execute):

    time:        total_s (first start to last end), task_s and cpu_s (summed over tasks), stages and
                 stages_cpu (wall / CPU seconds per task kind), blocks (per block: wall and CPU seconds, the
                 largest task peak RSS; a vision tower's blocks with "tower"), tasks (count)
    timeline:    one entry per task, {task, kind, start, end, worker}, seconds since the first start
    peak_memory: rss_mib and cuda_mib (the largest task peak), and the same per kind under "kinds"
    store_io:    bytes read from and written to the store (read_bytes, written_bytes), reads served by the
                 workers' local caches (cache_hits, cache_misses, cache_hit_rate, cache_hit_bytes), and
                 read and written bytes per decoder block under "blocks"
    """
    done = [r for r in records if r.get("status", "computed") == "computed"]
    if not done:
        return {"time": {}, "timeline": [], "peak_memory": {}, "store_io": store_io([])}
    t0 = min(float(r["started"]) for r in done)
    t1 = max(float(r["finished"]) for r in done)
    wall: dict[str, float] = {}
    cpu: dict[str, float] = {}
    blocks: dict[tuple, list[float]] = {}
    rss: dict[str, float] = {}
    cuda: dict[str, float] = {}
    timeline = []
    for r in sorted(done, key=lambda r: (float(r["started"]), r["task"])):
        kind = _task_kind(r)
        seconds = float(r.get("seconds", float(r["finished"]) - float(r["started"])))
        cpu_s = float(r.get("cpu_s") or 0.0)
        wall[kind] = wall.get(kind, 0.0) + seconds
        cpu[kind] = cpu.get(kind, 0.0) + cpu_s
        b = _task_block(r)
        if b is not None:
            acc = blocks.setdefault((r.get("tower") or "", b), [0.0, 0.0, 0.0])
            acc[0] += seconds
            acc[1] += cpu_s
            acc[2] = max(acc[2], float(r.get("peak_rss_mib") or 0.0))
        if r.get("peak_rss_mib") is not None:
            rss[kind] = max(rss.get(kind, 0.0), float(r["peak_rss_mib"]))
        if r.get("cuda_peak_mib") is not None:
            cuda[kind] = max(cuda.get(kind, 0.0), float(r["cuda_peak_mib"]))
        timeline.append({"task": r["task"], "kind": kind, "start": round(float(r["started"]) - t0, 6),
                         "end": round(float(r["finished"]) - t0, 6), "worker": _lane(r)})
    kinds = sorted(wall, key=lambda k: (KIND_ORDER.index(k) if k in KIND_ORDER else len(KIND_ORDER), k))
    return {
        "store_io": store_io(done),
        "time": {"total_s": t1 - t0, "task_s": sum(wall.values()), "cpu_s": sum(cpu.values()), "tasks": len(done),
                 "stages": {k: wall[k] for k in kinds}, "stages_cpu": {k: cpu[k] for k in kinds},
                 "blocks": [{"index": b, "seconds": v[0], "cpu_s": v[1], "peak_rss_mib": v[2],
                             **({"tower": tower} if tower else {})} for (tower, b), v in sorted(blocks.items())]},
        "timeline": timeline,
        "peak_memory": {"rss_mib": max(rss.values()) if rss else None,
                        "cuda_mib": max(cuda.values()) if cuda else None,
                        "kinds": {k: {"rss_mib": rss.get(k), "cuda_mib": cuda.get(k)} for k in kinds}},
    }


def store_io(records: list[dict]) -> dict:
    """Store traffic of computed task records (see summarize_task_records); records without the fields
    count as zero."""
    def total(field: str, rs=records) -> int:
        return int(sum(int(r.get(field) or 0) for r in rs))

    per_block: dict[int, list[dict]] = {}
    for r in records:
        b = _task_block(r)
        if b is not None:
            per_block.setdefault(b, []).append(r)
    hits, misses = total("cache_hits"), total("cache_misses")
    return {"read_bytes": total("store_read_bytes"), "written_bytes": total("store_written_bytes"),
            "requests": total("store_requests"), "cache_hits": hits, "cache_misses": misses, "cache_hit_bytes": total("cache_hit_bytes"),
            "cache_hit_rate": hits / (hits + misses) if hits + misses else None,
            "blocks": [{"index": b, "read_bytes": total("store_read_bytes", rs), "written_bytes": total("store_written_bytes", rs),
                        "requests": total("store_requests", rs)} for b, rs in sorted(per_block.items())]}


# ----------------------------------------------------------------------------------------------- losses


@dataclass
class LossTable:
    """Per-module calibration losses of one block list: losses[i, j] is block blocks[i], module modules[j]."""

    prefix: str
    blocks: list[int]
    modules: list[str]
    losses: np.ndarray  # NaN where a block has no such module


def module_loss_tables(report: dict) -> list[LossTable]:
    """One LossTable per block list in tlq_report.json's "modules" (decoder blocks first, then vision).

    Module keys are "<blocks path>.<block index>.<module path>"."""
    prefixes = list((report.get("blocks") or {}).keys())
    layout = report.get("layout") or {}
    prefixes = sorted(prefixes, key=lambda p: (p != layout.get("blocks"), p))
    tables = []
    for prefix in prefixes:
        cells: dict[tuple[int, str], float] = {}
        for name, entry in report.get("modules", {}).items():
            if not name.startswith(prefix + "."):
                continue
            index, _, module = name[len(prefix) + 1:].partition(".")
            if index.isdigit():
                loss = entry.get("loss")
                cells[(int(index), module)] = np.nan if loss is None else float(loss)
        if not cells or all(np.isnan(v) for v in cells.values()):
            continue  # no loss measured in this block list (RTN): nothing to draw
        blocks = sorted({b for b, _ in cells})
        modules = list(dict.fromkeys(m for _, m in sorted(cells, key=lambda bm: (bm[0], bm[1]))))
        modules = sorted(modules, key=lambda m: min(_module_rank(m), 99))
        losses = np.full((len(blocks), len(modules)), np.nan)
        for (b, m), loss in cells.items():
            losses[blocks.index(b), modules.index(m)] = loss
        tables.append(LossTable(prefix, blocks, modules, losses))
    return tables


def _module_rank(module: str) -> int:
    """Forward order of the usual projections (q, k, v, o, gate, up, down), so the columns read like a block."""
    order = ("q_proj", "k_proj", "v_proj", "qkv", "o_proj", "proj", "gate", "up", "fc1", "down", "fc2")
    leaf = module.rsplit(".", 1)[-1]
    for i, key in enumerate(order):
        if leaf.startswith(key):
            return i
    return len(order)


# ----------------------------------------------------------------------------------------------- timeline


@dataclass(frozen=True)
class Bar:
    """One interval of the timeline: lane (worker or stage row), start and length in seconds, kind, label."""

    lane: str
    start: float
    seconds: float
    kind: str
    label: str


def timeline_from_task_records(records: list[dict]) -> list[Bar]:
    """Bars of a farm job's task records (tlq_farm.store.keys.task_log), one lane per worker process,
    times relative to the first task's start. A record: {"task", "started", "finished", "host", "pid", ...}."""
    if not records:
        return []
    t0 = min(float(r["started"]) for r in records)
    bars = []
    for r in sorted(records, key=lambda r: (float(r["started"]), r["task"])):
        seconds = float(r.get("seconds", float(r["finished"]) - float(r["started"])))
        bars.append(Bar(_lane(r), float(r["started"]) - t0, seconds, _task_kind(r), r["task"]))
    return bars


def timeline_from_report(report: dict) -> list[Bar]:
    """Bars of tlq_report.json. A farm job's report has a "timeline" (tasks per worker process, as
    summarize_task_records writes it). A local job's stages run one after another (lane "stages"), with its
    decoder blocks laid out inside the "decoder blocks" stage (lane "blocks"), from its time and blocks."""
    if report.get("timeline"):
        return [Bar(str(e.get("worker", "?")), float(e["start"]), float(e["end"]) - float(e["start"]),
                    str(e.get("kind") or e["task"].split("-", 1)[0]), str(e["task"])) for e in report["timeline"]]
    stages = (report.get("time") or {}).get("stages") or {}
    names = [s for s in STAGE_ORDER if s in stages] + sorted(s for s in stages if s not in STAGE_ORDER)
    bars, t = [], 0.0
    block_start = None
    for name in names:
        seconds = float(stages[name])
        if name == "decoder blocks":
            block_start = t
        bars.append(Bar("stages", t, seconds, name, name))
        t += seconds
    layout = report.get("layout") or {}
    blocks = (report.get("blocks") or {}).get(layout.get("blocks"), [])
    if block_start is not None:
        t = block_start
        for entry in blocks:
            if "seconds" not in entry:
                continue
            bars.append(Bar("blocks", t, float(entry["seconds"]), "block", f"block {entry['index']}"))
            t += float(entry["seconds"])
    return bars


# ----------------------------------------------------------------------------------------------- patch grids


def vision_runs(vision_mask) -> list[tuple[int, int]]:
    """(start, end) of each maximal run of vision tokens in a [T] mask: one run per image placeholder."""
    mask = np.asarray(vision_mask, dtype=bool).reshape(-1)
    runs, start = [], None
    for i, v in enumerate(mask):
        if v and start is None:
            start = i
        elif not v and start is not None:
            runs.append((start, i))
            start = None
    if start is not None:
        runs.append((start, len(mask)))
    return runs


def merged_patch_grid(n_image_tokens: int, *, image_grid_thw=None, spatial_merge_size: int | None = None,
                      base_side: int | None = None) -> tuple[int, int, int]:
    """(rows, cols, offset): where the first image's vision tokens sit on the image.

    Qwen2-VL family (image_grid_thw [t, h, w] in patches, merged by spatial_merge_size): the merged grid is
    (h / m, w / m), tokens in raster order. LLaVA family: a square grid, sqrt of the token count; when the
    count is not a square (LLaVA-NeXT tiles, a kept CLS token) the base view of base_side x base_side patches
    comes first, after one CLS token when there is exactly one extra token.
    """
    if image_grid_thw is not None:
        t, h, w = (int(x) for x in np.asarray(image_grid_thw).reshape(-1)[:3])
        m = int(spatial_merge_size or 1)
        return h // m, w // m, 0
    side = math.isqrt(n_image_tokens)
    if side * side == n_image_tokens:
        return side, side, 0
    if base_side and n_image_tokens >= base_side * base_side:
        offset = 1 if n_image_tokens == base_side * base_side + 1 else 0
        return base_side, base_side, offset
    raise ValueError(f"{n_image_tokens} image tokens do not form a square patch grid and the vision config "
                     "gives no base image size: pass base_side (vision image_size // patch_size)")


def token_map(token_weights, start: int, rows: int, cols: int) -> np.ndarray:
    """The weights of tokens start .. start + rows * cols as a [rows, cols] raster."""
    w = np.asarray(token_weights, dtype=np.float64).reshape(-1)
    if start + rows * cols > w.size:
        raise ValueError(f"a {rows} x {cols} patch grid from token {start} needs {start + rows * cols} tokens, "
                         f"the sample has {w.size}")
    return w[start:start + rows * cols].reshape(rows, cols)


# ----------------------------------------------------------------------------------------------- importance


@dataclass
class ImportanceMap:
    """Token importance of one calibration sample: the weights every token gets, and its vision tokens' map."""

    source: str
    image: object               # PIL image of the sample (None for text-only rows)
    weights_first_block: np.ndarray   # [T] token weights in block 0's Hessians (both chains equal there)
    weights_mean: np.ndarray          # [T] mean over blocks (later blocks on an RTN-quantized chain)
    vision_mask: np.ndarray           # [T] bool
    valid: np.ndarray                 # [T] float
    grid: tuple[int, int, int] | None  # (rows, cols, offset into the first image's tokens)
    map_first_block: np.ndarray | None = None
    map_mean: np.ndarray | None = None
    stats: dict = field(default_factory=dict)


def mean_over_modules(weights, n_samples: int) -> list:
    """Strategies return one [T] tensor per sample, or name -> per-sample list (vlmq): the per-sample mean."""
    if isinstance(weights, dict):
        per_name = list(weights.values())
        return [sum(w[i].double() for w in per_name) / len(per_name) for i in range(n_samples)]
    return [w.double() for w in weights]


def weight_split(weights: np.ndarray, vision: np.ndarray, valid: np.ndarray) -> dict:
    """Mean weight of vision and of text tokens, the vision tokens' share of the total weight, and the
    fraction of vision tokens with weight 0 (dropped from the Hessian)."""
    ok = valid > 0
    vis, txt = ok & vision, ok & ~vision
    total = float(weights[ok].sum())
    return {
        "vision_mean": float(weights[vis].mean()) if vis.any() else float("nan"),
        "text_mean": float(weights[txt].mean()) if txt.any() else float("nan"),
        "vision_share": float(weights[vis].sum()) / total if total > 0 else float("nan"),
        "vision_tokens": int(vis.sum()),
        "text_tokens": int(txt.sum()),
        "vision_dropped": float((weights[vis] == 0).mean()) if vis.any() else float("nan"),
        "vision_cv": float(weights[vis].std() / weights[vis].mean()) if vis.any() and weights[vis].mean() > 0
        else float("nan"),
    }


def weight_targets(manifest: dict, groups: dict | None) -> list[str]:
    """The store keys a job's token weights come from at every block: the token masks, and the global pass's
    state or the block-local weights tasks' objects."""
    from . import plan
    from .store import keys

    job, n_shards = manifest["job"], len(manifest["shards"])
    out = [keys.token_masks(job, k) for k in range(n_shards)]
    if plan.needs_global_importance(manifest):
        out.append(keys.importance_state(job))
    if plan.needs_weight_tasks(manifest):
        out += [keys.token_weights(job, b, k) for b in range(manifest["n_blocks"]) for k in range(n_shards)]
    return out


def importance_maps(spec_dict: dict, *, n_samples: int = 4, device: str = "cpu") -> list[ImportanceMap]:
    """The job's token weights on the first n_samples calibration samples of its spec (same seed, so the same
    selection), each sample's vision tokens mapped onto its image's patch grid.

    The weights come from the job's own tasks, run on those samples in a temporary store only as far as the
    weights need (the gradient pass of tlq and modality; for vlmq and qig every block, on the quantized
    chain as the job computes it).
    """
    import dataclasses
    import tempfile

    import torch

    from . import steps
    from .calib.data import load_rows
    from .spec import JobSpec
    from .staging import encode_calibration, model_config, stage_job
    from .store import LocalStore

    spec = JobSpec.from_dict(spec_dict)
    spec = dataclasses.replace(spec, samples=n_samples)
    if spec.quant.method == "rtn":  # no calibration statistics: every token weighs the same
        spec = dataclasses.replace(spec, quant=dataclasses.replace(spec.quant, method="gptq", importance="uniform"))
    calib = encode_calibration(spec)
    samples = calib.samples
    with tempfile.TemporaryDirectory(prefix="tlq-report-") as tmp:
        store = LocalStore(tmp)
        job, _ = stage_job(store, spec)
        steps.run_embedded(store, job, device=device, targets=weight_targets)
        ctx = steps.job_context(store, job, device)
        n_shards = len(ctx.manifest["shards"])
        masks = [ctx.token_masks(k) for k in range(n_shards)]
        valid = [v.cpu() for m in masks for v in m[0]]
        vision = [v.cpu() for m in masks for v in m[1]]
        per_block = []
        for b in range(ctx.manifest["n_blocks"]):
            weights = [ctx.token_weights(b, k) for k in range(n_shards)]
            if isinstance(weights[0], dict):
                weights = {name: [w for part in weights for w in part[name]] for name in weights[0]}
            else:
                weights = [w for part in weights for w in part]
            per_block.append([w.cpu() for w in mean_over_modules(weights, len(samples))])
        steps.drop_contexts(store, job)

    n = len(samples)
    images_by_source = _images_of_sources(load_rows(spec.calib)[0], calib.sources[:n])
    vision_config = getattr(model_config(spec.model), "vision_config", None)
    merge = getattr(vision_config, "spatial_merge_size", None)
    base_side = None
    if vision_config is not None and getattr(vision_config, "image_size", None) and getattr(vision_config, "patch_size", None):
        base_side = int(vision_config.image_size) // int(vision_config.patch_size)
    maps = []
    for i, s in enumerate(samples):
        first = per_block[0][i].cpu().numpy()
        mean = (sum(pb[i] for pb in per_block) / len(per_block)).cpu().numpy()
        vmask = vision[i].cpu().numpy()
        m = ImportanceMap(source=calib.sources[i], image=images_by_source.get(calib.sources[i]),
                          weights_first_block=first, weights_mean=mean, vision_mask=vmask,
                          valid=valid[i].cpu().numpy(), grid=None)
        runs = vision_runs(vmask)
        if runs:
            grid_thw = s["image_grid_thw"][0].cpu().numpy() if "image_grid_thw" in s else None
            rows, cols, offset = merged_patch_grid(runs[0][1] - runs[0][0], image_grid_thw=grid_thw,
                                                   spatial_merge_size=merge, base_side=base_side)
            m.grid = (rows, cols, offset)
            m.map_first_block = token_map(first, runs[0][0] + offset, rows, cols)
            m.map_mean = token_map(mean, runs[0][0] + offset, rows, cols)
        m.stats = {"first_block": weight_split(first, vmask, m.valid), "mean": weight_split(mean, vmask, m.valid)}
        maps.append(m)
    return maps


def _images_of_sources(rows, sources: list[str]) -> dict:
    """source ("file.jsonl:line") -> first image of that calibration row."""
    wanted = set(sources)
    return {r.source: r.images[0] for r in rows if r.source in wanted and r.images}


# ----------------------------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on workers or CI
    import matplotlib.pyplot as plt

    return plt


def plot_loss_table(table: LossTable, path: Path) -> Path:
    """Heatmap of log10 loss, blocks down, modules across, each cell annotated with its loss."""
    plt = _pyplot()
    with np.errstate(divide="ignore", invalid="ignore"):
        logl = np.log10(np.where(table.losses > 0, table.losses, np.nan))
    fig_w = max(4.0, 1.0 + 0.9 * len(table.modules))
    fig_h = max(2.5, 1.2 + 0.45 * len(table.blocks))
    fig, ax = plt.subplots(figsize=(fig_w, fig_h), dpi=100)
    im = ax.imshow(logl, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(table.modules)), table.modules, rotation=40, ha="right", fontsize=8)
    ax.set_yticks(range(len(table.blocks)), [f"block {b}" for b in table.blocks], fontsize=8)
    for i in range(len(table.blocks)):
        for j in range(len(table.modules)):
            v = table.losses[i, j]
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=7, color="white")
    fig.colorbar(im, ax=ax, label="log10 loss")
    ax.set_title(f"calibration loss per module ({table.prefix})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def plot_importance(m: ImportanceMap, path: Path, title: str) -> Path:
    """The sample's image, and its vision tokens' weights (block 0, mean over blocks) laid over it."""
    plt = _pyplot()
    panels = [("image", None), ("block 0", m.map_first_block), ("mean over blocks", m.map_mean)]
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.3), dpi=100)
    for ax, (name, heat) in zip(axes, panels):
        ax.set_axis_off()
        if m.image is not None:
            width, height = m.image.size
            ax.imshow(np.asarray(m.image), extent=(0, width, height, 0))
        else:
            width, height = (heat.shape[1], heat.shape[0]) if heat is not None else (1, 1)
        if heat is not None:
            shown = ax.imshow(heat, cmap="inferno", alpha=0.6 if m.image is not None else 1.0,
                              extent=(0, width, height, 0), interpolation="nearest")
            fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
        ax.set_title(name, fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def plot_timeline(bars: list[Bar], path: Path, title: str) -> Path:
    """Gantt chart: one row per lane, bars coloured by kind."""
    plt = _pyplot()
    lanes = list(dict.fromkeys(b.lane for b in bars))
    kinds = list(dict.fromkeys(b.kind for b in bars))
    colors = plt.get_cmap("tab20")
    fig, ax = plt.subplots(figsize=(9, max(2.0, 0.9 + 0.5 * len(lanes))), dpi=100)
    for b in bars:
        ax.barh(lanes.index(b.lane), max(b.seconds, 1e-6), left=b.start, height=0.6,
                color=colors(kinds.index(b.kind) % 20), edgecolor="black", linewidth=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors(i % 20)) for i in range(len(kinds))]
    ax.legend(handles, kinds, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_yticks(range(len(lanes)), lanes, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds since start")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------- html


@dataclass
class Section:
    heading: str
    text: str = ""
    images: list[str] = field(default_factory=list)   # paths relative to index.html
    table: list[list[str]] | None = None              # first row is the header


def render_html(title: str, sections: list[Section]) -> str:
    """One self-contained page (no scripts, images by relative link)."""
    e = html.escape
    parts = [f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{e(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto}img{max-width:100%}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px;font-size:90%}</style>",
             f"</head><body><h1>{e(title)}</h1>"]
    for s in sections:
        parts.append(f"<h2>{e(s.heading)}</h2>")
        if s.text:
            parts.append(f"<p>{e(s.text)}</p>")
        if s.table:
            head, *rows = s.table
            parts.append("<table><tr>" + "".join(f"<th>{e(c)}</th>" for c in head) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows]
            parts.append("</table>")
        for img in s.images:
            parts.append(f"<p><img src='{e(img)}' alt='{e(Path(img).stem)}'></p>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _fmt(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"


def _peak_text(peak: dict) -> str:
    parts = [f"{name} {_fmt(peak.get(key))}" for key, name in (("rss_mib", "RSS"), ("cuda_mib", "CUDA"))
             if peak.get(key) is not None]
    return ", ".join(parts) or "-"


def stage_time_rows(report: dict) -> list[list[str]]:
    """Table rows (header first) of the report's per-stage wall and CPU seconds and peak memory: a local
    job's stages, or a farm job's task kinds. [] when the report has no timings."""
    t = report.get("time") or {}
    stages = t.get("stages") or {}
    if not stages:
        return []
    order = STAGE_ORDER + KIND_ORDER
    names = [s for s in order if s in stages] + sorted(s for s in stages if s not in order)
    cpu = t.get("stages_cpu") or {}
    kinds = (report.get("peak_memory") or {}).get("kinds") or {}
    rows = [["stage", "wall s", "CPU s", "peak RSS MiB"]]
    for name in names:
        rows.append([name, _fmt(stages[name]), _fmt(cpu.get(name)), _fmt((kinds.get(name) or {}).get("rss_mib"))])
    rows.append(["total", _fmt(t.get("total_s")), _fmt(t.get("cpu_s")),
                 _fmt((report.get("peak_memory") or {}).get("rss_mib"))])
    return rows


def block_time_rows(report: dict) -> list[list[str]]:
    """Table rows (header first) of the report's per-block wall and CPU seconds and peak memory; []
    without them."""
    blocks = (report.get("time") or {}).get("blocks") or []
    if not blocks:
        return []
    rows = [["block", "wall s", "CPU s", "peak RSS MiB"]]
    for e in blocks:
        name = f"{e['tower']} {e['index']}" if e.get("tower") else str(e["index"])
        rows.append([name, _fmt(e.get("seconds")), _fmt(e.get("cpu_s")), _fmt(e.get("peak_rss_mib"))])
    return rows


def build_report(report: dict, out_dir: str | Path, *, task_records: list[dict] | None = None,
                 importance: list[ImportanceMap] | None = None, importance_note: str = "",
                 title: str | None = None) -> Path:
    """Write out_dir/index.html and its PNGs from a tlq_report.json dict; returns the index path.

    task_records: a farm job's task log (timeline per worker); without them the report's own timeline (a
    farm export) or the local job's stage and block times are drawn. importance: maps from importance_maps() (None: the section says why not,
    with importance_note)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = report.get("spec") or {}
    q = spec.get("quant") or {}
    title = title or (f"tlq-farm report: {Path(str(spec.get('model', '?'))).name} W{q.get('bits', '?')}"
                      f"{'A' + str(q['act_bits']) if q.get('act_bits') else ''} g{q.get('group_size', '?')} "
                      f"{q.get('method', '?')} / {q.get('importance', '?')}")
    cal = report.get("calibration") or {}
    totals = report.get("totals") or {}
    sections = [Section("Job", table=[
        ["field", "value"],
        ["model", str(spec.get("model", "?"))], ["calibration data", str(spec.get("calib", "?"))],
        ["model class", str(report.get("model_class", "?"))],
        ["samples / tokens", f"{cal.get('samples', '?')} / {cal.get('tokens', '?')} "
                             f"({cal.get('vision_tokens', '?')} vision, {cal.get('text_tokens', '?')} text)"],
        ["quantized linears", str(totals.get("modules", "?"))],
        ["total loss", "n/a (not measured)" if "loss" in totals and totals["loss"] is None else _fmt(totals.get("loss"))],
        ["total time (s)", _fmt((report.get("time") or {}).get("total_s"))],
        ["peak memory (MiB)", _peak_text(report.get("peak_memory") or {})],
    ])]

    images = []
    for i, table in enumerate(module_loss_tables(report)):
        images.append(plot_loss_table(table, out_dir / f"losses-{i}.png").name)
    loss_text = ("Loss of each linear's solve (the token-weighted output error the solver minimizes), "
                 "colour on a log scale.")
    if not images:
        loss_text = ("No loss was measured: round-to-nearest uses no calibration statistics."
                     if q.get("method") == "rtn" else "The report holds no measured losses.")
    sections.append(Section("Calibration loss per module and block", loss_text, images))

    if importance:
        imgs, rows = [], [["sample", "vision tokens", "grid", "vision mean w (block 0)", "text mean w (block 0)",
                           "vision share (block 0)", "vision mean w (blocks)", "vision dropped"]]
        for i, m in enumerate(importance):
            if m.map_first_block is not None:
                grid = f"{m.grid[0]} x {m.grid[1]}"
                imgs.append(plot_importance(m, out_dir / f"importance-{i}.png", m.source).name)
            else:
                grid = "-"
            s0, sm = m.stats["first_block"], m.stats["mean"]
            rows.append([m.source, str(s0["vision_tokens"]), grid, _fmt(s0["vision_mean"]), _fmt(s0["text_mean"]),
                         _fmt(s0["vision_share"]), _fmt(sm["vision_mean"]), _fmt(sm["vision_dropped"])])
        sections.append(Section(f"Token importance ({q.get('importance', '?')})",
                                "Weights of the vision tokens in the Hessians, on the image's merged patch grid, "
                                "recomputed on the first calibration samples. " + importance_note, imgs, rows))
    else:
        sections.append(Section("Token importance", importance_note or "not computed"))

    time_rows = stage_time_rows(report)
    if time_rows:
        sections.append(Section("Time and peak memory per stage", table=time_rows))
    block_rows = block_time_rows(report)
    if block_rows:
        sections.append(Section("Time and peak memory per block", "Every task of a block summed; peak: its "
                                "largest task's.", table=block_rows))

    if task_records:
        bars = timeline_from_task_records(task_records)
        text = f"{len(task_records)} task records, {len({b.lane for b in bars})} worker processes."
        lane_title = "tasks per worker"
    elif report.get("timeline"):
        bars = timeline_from_report(report)
        text = (f"{len(bars)} tasks from the export's report, {len({b.lane for b in bars})} worker processes "
                "(the task records when the export was written).")
        lane_title = "tasks per worker"
    else:
        bars = timeline_from_report(report)
        text = "No task records (a local job): its stages and decoder blocks in order."
        lane_title = "stages and blocks"
    if bars:
        sections.append(Section("Timeline", text, [plot_timeline(bars, out_dir / "timeline.png", lane_title).name]))
    else:
        sections.append(Section("Timeline", "the report has no timings and no task records were found"))

    index = out_dir / "index.html"
    index.write_text(render_html(title, sections))
    return index
