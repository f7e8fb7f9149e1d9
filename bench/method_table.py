"""Method table: RTN / GPTQ / GPTAQ x token importance on the demo VLM -> docs/results.md.

Every configuration is one local job (run_local, fmt="fake") on a calibration sample drawn with --seed
from a pool of demo scenes, scored on held-out scenes against the full-precision model. Results are
appended to a JSON-lines cache as they finish, so a rerun skips the configurations already done.

    python bench/method_table.py --jobs 16                       # the full grid
    python bench/method_table.py --settings W4 --seeds 1 --heldout 60 --jobs 2   # a quick subset

The markdown table is written between the markers below; the rest of --out (the analysis) is kept.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BEGIN = "<!-- method-table:begin (written by bench/method_table.py) -->"
END = "<!-- method-table:end -->"

# Weight grids (the demo's linear widths, 128 and 384, are multiples of 64 and 32).
SETTINGS = {
    "W4": {"bits": 4, "act_bits": None},
    "W3": {"bits": 3, "act_bits": None},
    "W2": {"bits": 2, "act_bits": None},
    "W4A8": {"bits": 4, "act_bits": 8},
}
METHODS = ("rtn", "gptq", "gptaq")
IMPORTANCE = ("uniform", "modality", "vlmq", "qig", "tlq")
# A calibration pool bigger than the bundled set; its seed is neither the training streams' nor held-out's.
POOL_SEED = 3003
POOL_SIZE = 512
# Rough seconds on one unloaded x86 core, for the up-front estimate only (the running estimate uses the
# measured times): scoring per held-out sample, and calibration per configuration at 32 samples.
EVAL_S_PER_SAMPLE = 0.06
CALIB_S_AT_32 = {"rtn": 1.0, "uniform": 4.0, "modality": 6.0, "vlmq": 6.0, "tlq": 6.0, "qig": 38.0}
GPTAQ_FACTOR = 1.3  # the second (full-precision) chain and the cross term


# ----------------------------------------------------------------------------------------------- grid


def config_key(cfg: dict) -> str:
    """Stable identity of a configuration in the cache."""
    return json.dumps(cfg, sort_keys=True)


def grid(settings, methods, importances, seeds, *, samples: int, heldout: int, group_size: int,
         max_new_tokens: int, model: str) -> list[dict]:
    """Every configuration to run. RTN uses no calibration data: one run per setting, uniform only."""
    out = []
    for setting in settings:
        for method in methods:
            imps = ["uniform"] if method == "rtn" else list(importances)
            for importance in imps:
                for seed in ([0] if method == "rtn" else seeds):
                    out.append({"setting": setting, "method": method, "importance": importance, "seed": seed,
                                "samples": samples, "heldout": heldout, "group_size": group_size,
                                "max_new_tokens": max_new_tokens, "model": model})
    return out


def cost_guess(cfg: dict) -> float:
    """Guessed single-core seconds of one configuration (calibration + scoring)."""
    if cfg["method"] == "fp":
        return EVAL_S_PER_SAMPLE * cfg["heldout"]
    calib = CALIB_S_AT_32["rtn" if cfg["method"] == "rtn" else cfg["importance"]] * cfg["samples"] / 32
    return calib * (GPTAQ_FACTOR if cfg["method"] == "gptaq" else 1.0) + EVAL_S_PER_SAMPLE * cfg["heldout"]


def estimate_wall_s(configs: list[dict], jobs: int) -> float:
    """Longest-first list scheduling of the guessed costs on `jobs` processes."""
    lanes = [0.0] * max(1, jobs)
    for c in sorted((cost_guess(c) for c in configs), reverse=True):
        lanes[lanes.index(min(lanes))] += c
    return max(lanes)


# ----------------------------------------------------------------------------------------------- one run

_WORKER: dict = {}


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _shared_eval(model: str, heldout_jsonl: str, device: str):
    """(FP model, processor, prepared held-out set, FP answer logits), built once per worker process."""
    key = (model, heldout_jsonl, device)
    if _WORKER.get("key") != key:
        from tlq_farm.evaluate import answer_logits, load_for_eval, prepare_eval_set

        fp_model, processor, _ = load_for_eval(model, device=device)
        prepared = prepare_eval_set(processor, heldout_jsonl)
        _WORKER.update(key=key, fp=fp_model, processor=processor, prepared=prepared,
                       ref_logits=answer_logits(fp_model, prepared))
    return _WORKER["fp"], _WORKER["processor"], _WORKER["prepared"], _WORKER["ref_logits"]


def score(model, cfg: dict, heldout_jsonl: str, device: str) -> dict:
    """evaluate()'s metrics against the FP model, the held-out encodings and FP logits shared per process."""
    from tlq_farm.evaluate import score_prepared

    _, processor, prepared, ref_logits = _shared_eval(cfg["model"], heldout_jsonl, device)
    return score_prepared(model, processor, prepared, reference_logits=ref_logits,
                          max_new_tokens=cfg["max_new_tokens"])


def run_fp(cfg: dict, heldout_jsonl: str, device: str) -> dict:
    """The full-precision row."""
    t = time.perf_counter()
    fp_model = _shared_eval(cfg["model"], heldout_jsonl, device)[0]
    result = score(fp_model, cfg, heldout_jsonl, device)
    return {**result, "calib_s": 0.0, "eval_s": time.perf_counter() - t}


def run_config(cfg: dict, calib_jsonl: str, heldout_jsonl: str, device: str) -> dict:
    """Quantize (fake export into a temp folder) and score against the full-precision model."""
    from tlq_farm.evaluate import load_for_eval
    from tlq_farm.pipeline import run_local
    from tlq_farm.spec import JobSpec, QuantSpec

    s = SETTINGS[cfg["setting"]]
    q = QuantSpec(bits=s["bits"], act_bits=s["act_bits"], group_size=cfg["group_size"], method=cfg["method"],
                  importance=cfg["importance"])
    spec = JobSpec(model=cfg["model"], calib=calib_jsonl, quant=q, samples=cfg["samples"], seed=cfg["seed"],
                   fmt="fake")
    _shared_eval(cfg["model"], heldout_jsonl, device)
    with tempfile.TemporaryDirectory(prefix="tlq-table-") as tmp:
        t = time.perf_counter()
        report = run_local(spec, Path(tmp) / "export", device=device, progress=False, log=lambda m: None)
        run_s = time.perf_counter() - t
        t = time.perf_counter()
        # The export as a user loads it (activation fake-quant hooks for W4A8 come from its tlq_quant.json).
        model = load_for_eval(Path(tmp) / "export", device=device)[0]
        result = score(model, cfg, heldout_jsonl, device)
        eval_s = time.perf_counter() - t
    stages = report["time"]["stages"]
    layout = report["layout"]["blocks"]
    return {
        **result,
        # Calibration: capture, importance pass and the block solves (not model loading or export).
        "calib_s": sum(v for k, v in stages.items() if k not in ("load", "export", "calibration data")),
        "run_s": run_s, "eval_s": eval_s,
        "block_loss": [b["loss"] for b in report["blocks"][layout]],
        "module_loss": {k: v["loss"] for k, v in report["modules"].items()},
        "calibration": report["calibration"], "importance_summary": report.get("importance", {}),
    }


def _run_one(cfg, calib_jsonl, heldout_jsonl, device):
    t = time.perf_counter()
    if cfg["method"] == "diagnose-importance":
        return cfg, importance_diagnostics(cfg["model"], calib_jsonl, [cfg["importance"]], samples=cfg["samples"],
                                           group_size=cfg["group_size"])
    if cfg["method"] == "diagnose-blind":
        return cfg, blind_scores(cfg["model"], heldout_jsonl, samples=cfg["samples"])
    if cfg["method"] == "diagnose-residual":
        return cfg, residual_updates(cfg["model"], heldout_jsonl, samples=cfg["samples"])
    if cfg["method"] == "fp":
        out = run_fp(cfg, heldout_jsonl, device)
    else:
        out = run_config(cfg, calib_jsonl, heldout_jsonl, device)
    out["wall_s"] = time.perf_counter() - t
    return cfg, out


# ----------------------------------------------------------------------------------------------- cache


def read_cache(path: Path) -> dict[str, dict]:
    """config key -> result of every finished configuration (a torn last line is ignored)."""
    done = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            done[config_key(rec["config"])] = rec
    return done


def append_cache(path: Path, cfg: dict, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps({"config": cfg, "result": result}, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------------------------- table


def mean_spread(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation; 0 for a single value)."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _cell(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    m, s = mean_spread(values)
    return f"{m:{fmt}} ± {s:{fmt}}" if len(values) > 1 else f"{m:{fmt}}"


METRICS = (("accuracy", "Exact-match accuracy (higher is better)", ".3f"),
           ("nll", "NLL per answer token (lower is better)", ".3f"),
           ("kl", "KL(FP || quantized) per answer token (lower is better)", ".2e"),
           ("calib_s", "Calibration time, seconds (capture + importance pass + block solves, one CPU thread)", ".1f"))


def markdown_tables(records: list[dict], settings: list[str]) -> str:
    """One table per metric: rows method x importance, columns settings; cells mean ± std over seeds."""
    rows: dict[tuple[str, str], dict[str, list[dict]]] = {}
    fp = [r for r in records if r["config"]["method"] == "fp"]
    order = {m: i for i, m in enumerate(METHODS)}
    for r in records:
        c = r["config"]
        if c["method"] == "fp":
            continue
        rows.setdefault((c["method"], c["importance"]), {}).setdefault(c["setting"], []).append(r["result"])
    keys = sorted(rows, key=lambda k: (order.get(k[0], 9), IMPORTANCE.index(k[1]) if k[1] in IMPORTANCE else 9))
    out = []
    for metric, title, fmt in METRICS:
        out += [f"### {title}", "", "| method | importance | " + " | ".join(settings) + " |",
                "|---|---|" + "---|" * len(settings)]
        if fp and metric in ("accuracy", "nll"):
            v = fp[0]["result"][metric]
            out.append(f"| FP (no quantization) | - | " + " | ".join(f"{v:{fmt}}" for _ in settings) + " |")
        for method, imp in keys:
            cells = [_cell([r[metric] for r in rows[(method, imp)].get(s, [])], fmt) for s in settings]
            label = "RTN (no calibration data)" if method == "rtn" else method.upper()
            out.append(f"| {label} | {imp} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def machine_line(jobs: int, device: str) -> str:
    import torch

    return (f"{platform.machine()} {os.cpu_count()} CPU cores ({platform.processor() or platform.platform()}), "
            f"device {device}, {jobs} parallel processes x 1 torch thread, torch {torch.__version__}")


def write_markdown(path: Path, body: str) -> None:
    """Replace the text between the markers in `path` (or create it), keeping everything else."""
    block = f"{BEGIN}\n{body}\n{END}"
    if path.is_file():
        text = path.read_text()
        if BEGIN in text and END in text:
            head, _, rest = text.partition(BEGIN)
            _, _, tail = rest.partition(END)
            path.write_text(head + block + tail)
            return
        path.write_text(text.rstrip() + "\n\n" + block + "\n")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# Results\n\n" + block + "\n")


# ----------------------------------------------------------------------------------------------- importance diagnostics


def importance_diagnostics(model: str, calib_jsonl: str, importances, *, samples: int, group_size: int,
                           seed: int = 0) -> list[dict]:
    """For each importance strategy, the distribution of its token weights on `samples` calibration
    samples (W4, GPTQ): vision/text mean weight, vision share, coefficient of variation of the vision
    weights and the fraction of vision tokens dropped (weight 0)."""
    import numpy as np

    from tlq_farm.report import importance_maps, weight_split
    from tlq_farm.spec import JobSpec, QuantSpec

    out = []
    for imp in importances:
        spec = JobSpec(model=model, calib=calib_jsonl, samples=samples, seed=seed, fmt="fake",
                       quant=QuantSpec(bits=4, group_size=group_size, importance=imp))
        maps = importance_maps(spec.to_dict(), n_samples=samples)
        for which in ("first_block", "mean"):
            w = np.concatenate([getattr(m, f"weights_{which}") for m in maps])
            vis = np.concatenate([m.vision_mask for m in maps])
            ok = np.concatenate([m.valid for m in maps])
            split = weight_split(w, vis, ok)
            vw = w[vis & (ok > 0)]
            split.update(importance=imp, blocks=which,
                         vision_p10=float(np.percentile(vw, 10)), vision_p90=float(np.percentile(vw, 90)))
            out.append(split)
    return out


def residual_updates(model: str, heldout_jsonl: str, *, samples: int = 16) -> list[dict]:
    """How much each decoder block changes the residual stream of the FP model on held-out scenes:
    mean over tokens of ||block(x) - x|| / ||x||, separately for vision and text tokens. Blocks whose
    updates are small relative to the stream leave little for any quantizer, weighted or not, to get wrong."""
    import torch

    from tlq_farm.evaluate import load_for_eval, model_inputs, prepare_eval_set
    from tlq_farm.models.adapter import block_output, find_layout

    fp, processor, _ = load_for_eval(model)
    blocks = find_layout(fp).decoder_blocks(fp)
    sums = [{"vision": 0.0, "text": 0.0, "n_vision": 0, "n_text": 0} for _ in blocks]
    current: dict = {}

    def hook(i):
        def fn(_m, args, kwargs, out):
            x = args[0] if args else kwargs["hidden_states"]
            y = block_output(out)
            ratio = ((y - x).norm(dim=-1) / x.norm(dim=-1).clamp(min=1e-12)).reshape(-1)
            vis = current["vision"]
            sums[i]["vision"] += float(ratio[vis].sum()); sums[i]["n_vision"] += int(vis.sum())
            sums[i]["text"] += float(ratio[~vis].sum()); sums[i]["n_text"] += int((~vis).sum())
        return fn

    handles = [b.register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            for r in prepare_eval_set(processor, heldout_jsonl, samples):
                current["vision"] = r["full_inputs"]["vision_mask"].reshape(-1).bool()
                fp(**model_inputs(fp, r["full_inputs"]))
    finally:
        for h in handles:
            h.remove()
    return [{"block": i, "vision": s["vision"] / max(1, s["n_vision"]), "text": s["text"] / max(1, s["n_text"])}
            for i, s in enumerate(sums)]


def blind_scores(model: str, heldout_jsonl: str, *, samples: int = 60) -> dict:
    """The FP model on held-out scenes with their real images and with a blank image of the same size:
    how much of the answer comes from the picture at all (a model that ignores it gives its vision
    tokens nothing to protect)."""
    from PIL import Image

    from tlq_farm.demo.scenes import blank_canvas
    from tlq_farm.evaluate import load_for_eval, prepare_eval_set, prepare_sample, read_jsonl_rows, score_prepared

    fp, processor, _ = load_for_eval(model)
    seeing = prepare_eval_set(processor, heldout_jsonl, samples)
    blind = []
    for row in read_jsonl_rows(heldout_jsonl, samples):
        sizes = [Image.open(p).size for p in row["image_paths"]]
        images = [blank_canvas().resize(size) for size in sizes]
        blind.append(prepare_sample(processor, images, row["prompt"], row["answer"]))
    return {"samples": len(seeing), "with_image": score_prepared(fp, processor, seeing, max_new_tokens=3),
            "blank_image": score_prepared(fp, processor, blind, max_new_tokens=3)}


def blind_markdown(b: dict) -> str:
    w, z = b["with_image"], b["blank_image"]
    return "\n".join([f"### The FP model with and without the picture ({b['samples']} held-out scenes)", "",
                      "| image | accuracy | NLL |", "|---|---|---|",
                      f"| the scene | {w['accuracy']:.3f} | {w['nll']:.3f} |",
                      f"| blank (background colour only) | {z['accuracy']:.3f} | {z['nll']:.3f} |"]) + "\n"


def residual_markdown(rows: list[dict], samples: int) -> str:
    lines = [f"### Residual update per decoder block, FP model on {samples} held-out scenes: "
             "mean ||block(x) - x|| / ||x||", "",
             "| | " + " | ".join(f"block {r['block']}" for r in rows) + " |", "|---|" + "---|" * len(rows),
             "| vision tokens | " + " | ".join(f"{r['vision']:.3f}" for r in rows) + " |",
             "| text tokens | " + " | ".join(f"{r['text']:.3f}" for r in rows) + " |"]
    return "\n".join(lines) + "\n"


def diagnostics_markdown(diag: list[dict], samples: int) -> str:
    lines = [f"### Token weights per strategy (W4, GPTQ, {samples} calibration samples of seed 0)", "",
             "| importance | blocks | vision tokens | text tokens | mean w vision | mean w text | vision share of "
             "weight | vision w p10-p90 | vision CV | vision dropped |", "|---|---|---|---|---|---|---|---|---|---|"]
    for d in diag:
        lines.append(f"| {d['importance']} | {'block 0' if d['blocks'] == 'first_block' else 'mean'} | "
                     f"{d['vision_tokens']} | {d['text_tokens']} | {d['vision_mean']:.3f} | {d['text_mean']:.3f} | "
                     f"{d['vision_share']:.3f} | {d['vision_p10']:.3f}-{d['vision_p90']:.3f} | {d['vision_cv']:.2f} | "
                     f"{d['vision_dropped']:.2f} |")
    return "\n".join(lines) + "\n"


def block_loss_markdown(records: list[dict], setting: str) -> str:
    """Mean per-block calibration loss by method x importance for one setting (seed-averaged)."""
    rows: dict[tuple[str, str], list[list[float]]] = {}
    for r in records:
        c = r["config"]
        # RTN solves without a Hessian, so it has no calibration loss to show.
        if c["method"] not in ("fp", "rtn") and c["setting"] == setting and "block_loss" in r["result"]:
            rows.setdefault((c["method"], c["importance"]), []).append(r["result"]["block_loss"])
    if not rows:
        return ""
    n_blocks = max(len(v[0]) for v in rows.values())
    lines = [f"### Calibration loss per decoder block ({setting}, mean over seeds)", "",
             "Each solve's loss is measured with its own token weights, so rows with different importance "
             "are on different scales; compare methods within one importance.", "",
             "| method | importance | " + " | ".join(f"block {b}" for b in range(n_blocks)) + " |",
             "|---|---|" + "---|" * n_blocks]
    for (method, imp), losses in sorted(rows.items(), key=lambda kv: (METHODS.index(kv[0][0]), IMPORTANCE.index(kv[0][1]))):
        means = [statistics.fmean(l[b] for l in losses) for b in range(n_blocks)]
        lines.append(f"| {method} | {imp} | " + " | ".join(f"{m:.3g}" for m in means) + " |")
    return "\n".join(lines) + "\n"


def modality_ratio_markdown(records: list[dict], setting: str) -> str:
    """MBQ's per-layer vision/text gradient ratio (raw and floored), mean over the cached modality runs."""
    raws, floored = [], []
    for r in records:
        c, imp = r["config"], r["result"].get("importance_summary") or {}
        if c["importance"] == "modality" and c["setting"] == setting and "modality_ratio_raw" in imp:
            raws.append(imp["modality_ratio_raw"])
            floored.append(imp["modality_ratio"])
    if not raws:
        return ""
    n = len(raws[0])
    mean = lambda rows, b: statistics.fmean(x[b] for x in rows)  # noqa: E731
    return "\n".join([f"### modality: vision/text gradient ratio per decoder block ({setting}, {len(raws)} runs)", "",
                      "| | " + " | ".join(f"block {b}" for b in range(n)) + " |", "|---|" + "---|" * n,
                      "| raw r_l | " + " | ".join(f"{mean(raws, b):.3f}" for b in range(n)) + " |",
                      "| floored at the median | " + " | ".join(f"{mean(floored, b):.3f}" for b in range(n)) + " |"]) + "\n"


# ----------------------------------------------------------------------------------------------- main


def _shown_path(path: str) -> str:
    """The path relative to the repository when it lies inside it."""
    try:
        return str(Path(path).relative_to(ROOT))
    except ValueError:
        return path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=1, help="parallel processes (each with one torch thread)")
    p.add_argument("--seeds", type=int, default=3, help="calibration seeds 0..N-1 (the sample selection)")
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma list of {', '.join(SETTINGS)}")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--importance", default=",".join(IMPORTANCE), help=f"comma list of {', '.join(IMPORTANCE)}")
    p.add_argument("--heldout", type=int, default=300, help="held-out scenes scored per configuration")
    p.add_argument("--samples", type=int, default=32, help="calibration samples per run")
    p.add_argument("--group-size", type=int, default=64, help="weight group size")
    p.add_argument("--max-new-tokens", type=int, default=3, help="greedy tokens for exact match (answers are 1-2 words)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default=None, help="model folder (default: the bundled demo VLM)")
    p.add_argument("--out", default=str(ROOT / "docs" / "results.md"), help="markdown file (the table part is replaced)")
    p.add_argument("--json", dest="json_out", default=None, help="write every raw result to this JSON file")
    p.add_argument("--cache", default=None, help="JSON-lines cache of finished configurations "
                   "(default: bench/results/method_table.jsonl)")
    p.add_argument("--work", default=None, help="folder for the calibration pool and held-out set "
                   "(default: bench/results/data)")
    p.add_argument("--diagnose", type=int, default=16, help="calibration samples for the token-weight "
                   "statistics section (0: skip)")
    return p.parse_args(argv)


def _split(text: str, allowed, what: str) -> list:
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise SystemExit(f"--{what} {text!r}: choose from {', '.join(allowed)} (comma separated)")
    return items


def main(argv=None) -> int:
    args = parse_args(argv)
    settings = _split(args.settings, SETTINGS, "settings")
    methods = _split(args.methods, METHODS, "methods")
    importances = _split(args.importance, IMPORTANCE, "importance")
    if args.seeds < 1 or args.heldout < 1 or args.samples < 1 or args.jobs < 1:
        raise SystemExit("--seeds, --heldout, --samples and --jobs must be at least 1")
    from tlq_farm.demo import DEMO_MODEL_DIR, scenes
    from tlq_farm.demo.train import HELD_OUT_SEED

    model = str(Path(args.model or DEMO_MODEL_DIR).resolve())
    if not (Path(model) / "config.json").is_file():
        raise SystemExit(f"{model} is not a model folder (no config.json): train the demo model first "
                         "(python -m tlq_farm.demo.train --out tlq_farm/demo/model) or pass --model")
    results_dir = ROOT / "bench" / "results"
    cache = Path(args.cache) if args.cache else results_dir / "method_table.jsonl"
    work = Path(args.work) if args.work else results_dir / "data"
    pool_size = max(POOL_SIZE, 2 * args.samples)
    calib_jsonl = work / f"calib-pool-{POOL_SEED}-{pool_size}" / "data.jsonl"
    heldout_jsonl = work / f"heldout-{HELD_OUT_SEED}-{args.heldout}" / "data.jsonl"
    for path, n, seed in ((calib_jsonl, pool_size, POOL_SEED), (heldout_jsonl, args.heldout, HELD_OUT_SEED)):
        if not path.is_file():
            scenes.write_set(path.parent, n, seed)

    common = dict(samples=args.samples, heldout=args.heldout, group_size=args.group_size,
                  max_new_tokens=args.max_new_tokens, model=model)
    configs = grid(settings, methods, importances, list(range(args.seeds)), **common)
    fp_cfg = {"setting": "-", "method": "fp", "importance": "-", "seed": 0, **common}
    configs = [fp_cfg] + configs
    done = read_cache(cache)
    todo = [c for c in configs if config_key(c) not in done]
    # Longest first, so the last processes to finish are not all waiting on one slow configuration.
    todo.sort(key=lambda c: -cost_guess(c))
    est = estimate_wall_s(todo, args.jobs)
    print(f"{len(configs)} configurations, {len(configs) - len(todo)} cached in {cache}, {len(todo)} to run on "
          f"{args.jobs} processes; estimate ~{est / 60:.1f} min on unloaded cores", flush=True)

    started = time.perf_counter()
    # The token-weight statistics run in the same pool (they are not cached: they take seconds).
    diag_cfgs = []
    if args.diagnose:
        diag_cfgs = [{"method": "diagnose-importance", "importance": imp, "model": model, "samples": args.diagnose,
                      "group_size": args.group_size} for imp in importances]
        diag_cfgs.append({"method": "diagnose-residual", "model": model, "samples": args.diagnose})
        diag_cfgs.append({"method": "diagnose-blind", "model": model, "samples": args.heldout})
    diag_results: dict = {}
    if todo or diag_cfgs:
        # spawn: fresh interpreters, no torch thread pools inherited from this process.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=context, initializer=_init_worker,
                                 initargs=(1,)) as pool:
            futures = [pool.submit(_run_one, c, str(calib_jsonl), str(heldout_jsonl), args.device)
                       for c in diag_cfgs + todo]
            cpu_s, n_done = 0.0, 0
            for fut in as_completed(futures):
                cfg, result = fut.result()
                if cfg["method"].startswith("diagnose"):
                    diag_results[cfg["method"] + ":" + cfg.get("importance", "")] = result
                    continue
                append_cache(cache, cfg, result)
                done[config_key(cfg)] = {"config": cfg, "result": result}
                n_done += 1
                cpu_s += result["wall_s"]
                elapsed = time.perf_counter() - started
                left = (cpu_s / n_done) * (len(todo) - n_done) / args.jobs
                print(f"[{n_done}/{len(todo)}] {cfg['setting']} {cfg['method']} {cfg['importance']} seed {cfg['seed']}: "
                      f"acc {result['accuracy']:.3f} nll {result['nll']:.4f} kl {result['kl']:.2e} "
                      f"({result['wall_s']:.0f}s); elapsed {elapsed / 60:.1f} min, ~{left / 60:.1f} min left", flush=True)
    wall = time.perf_counter() - started

    records = [done[config_key(c)] for c in configs]
    command = "python bench/method_table.py " + " ".join(argv if argv is not None else sys.argv[1:])
    parts = ["## Method table", "",
             f"Command: `{command.strip()}`  ",
             f"Machine: {machine_line(args.jobs, args.device)}  ",
             f"Model: {_shown_path(model)}; calibration: {args.samples} samples drawn with seeds 0..{args.seeds - 1} from a "
             f"pool of {pool_size} scenes (seed {POOL_SEED}); held-out: {args.heldout} scenes (seed {HELD_OUT_SEED}); "
             f"group size {args.group_size}, symmetric weights; W4A8 = per-token int8 activations; "
             f"exact match over {args.max_new_tokens} greedy tokens. Cells: mean ± std over seeds. "
             "RTN uses no calibration data: one run, no spread.  ",
             f"This run: {len(todo)} configurations computed in {wall / 60:.1f} min, {len(configs) - len(todo)} from the cache.",
             "", markdown_tables(records, settings)]
    parts.append(block_loss_markdown(records, settings[0]))
    parts.append(modality_ratio_markdown(records, settings[0]))
    diag = [row for imp in importances for row in diag_results.get(f"diagnose-importance:{imp}", [])]
    residual = diag_results.get("diagnose-residual:", [])
    if diag:
        parts.append(diagnostics_markdown(diag, args.diagnose))
    if residual:
        parts.append(residual_markdown(residual, args.diagnose))
    blind = diag_results.get("diagnose-blind:")
    if blind:
        parts.append(blind_markdown(blind))
    write_markdown(Path(args.out), "\n".join(parts))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"records": records, "importance_diagnostics": diag,
                                                   "residual_updates": residual, "blind": blind}, indent=1))
    print(f"wrote {args.out}" + (f" and {args.json_out}" if args.json_out else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
