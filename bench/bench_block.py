"""Per-block time and memory breakdown of one calibration block: importance, stats, solve, propagate.

    python bench/bench_block.py                        # a Llama-architecture model of hidden 1024, CPU
    python bench/bench_block.py --model DIR --calib JSONL
    python bench/bench_block.py --device cuda --hidden 4096 --intermediate 11008

Memory: peak RSS on CPU (ru_maxrss, whole process) or peak CUDA allocation per step on GPU, next to the
sizes the planner reasons with (block weights, float64 Hessians, shard activations).
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tlq_farm import block as B  # noqa: E402
from tlq_farm.importance import ImportanceContext, get_strategy  # noqa: E402
from tlq_farm.models.adapter import find_layout, linear_names, load_model  # noqa: E402
from tlq_farm.spec import QuantSpec  # noqa: E402


def mib(n_bytes: float) -> float:
    return n_bytes / 2**20


class Meter:
    def __init__(self, device: str):
        self.device = device
        self.rows: list[tuple[str, float, float]] = []

    def step(self, name, fn):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        out = fn()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            peak = mib(torch.cuda.max_memory_allocated())
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        self.rows.append((name, time.perf_counter() - t, peak))
        return out


def synthetic_inputs(model, n, seq_len, device):
    g = torch.Generator().manual_seed(0)
    vocab = model.config.get_text_config().vocab_size
    return [{"input_ids": torch.randint(0, vocab, (1, seq_len), generator=g).to(device),
             "attention_mask": torch.ones(1, seq_len, dtype=torch.long, device=device)} for _ in range(n)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--calib")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--importance", default="uniform")
    ap.add_argument("--method", default="gptq")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = args.device
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            from tlq_farm.models.tiny import make_tiny

            heads = args.hidden // 64
            path = make_tiny("llama", Path(tmp) / "m", hidden_size=args.hidden, intermediate_size=args.intermediate,
                             num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), head_dim=64,
                             num_hidden_layers=2)
        else:
            path = args.model
        model, proc = load_model(str(path), device=dev)
        for p in model.parameters():
            p.requires_grad_(False)
        lay = find_layout(model)
        blocks = lay.decoder_blocks(model)
        if args.calib:
            from tlq_farm.calib.data import load_calibration, model_inputs

            cs = load_calibration(args.calib, proc, samples=args.samples, seq_len=args.seq_len, seed=0)
            samples = [{k: v.to(dev) for k, v in s.items()} for s in cs.samples]
            inputs = [model_inputs(s) for s in samples]
        else:
            samples = synthetic_inputs(model, args.samples, args.seq_len, dev)
            for s in samples:
                s["labels"] = s["input_ids"].clone()
                s["vision_mask"] = torch.zeros_like(s["input_ids"], dtype=torch.bool)
            inputs = [{k: v for k, v in s.items() if k in ("input_ids", "attention_mask")} for s in samples]
        spec = QuantSpec(method=args.method, importance=args.importance, group_size=128).validate()
        m = Meter(dev)
        caps = m.step("capture (prefix)", lambda: [B.capture(model, blocks, x) for x in inputs])
        ctx = ImportanceContext(spec=spec, blocks=blocks, norm=lay.get(model, lay.norm), head=lay.get(model, lay.head),
                                captured=caps, valid=[s["attention_mask"].reshape(-1).float() for s in samples],
                                vision=[s["vision_mask"].reshape(-1).bool() for s in samples],
                                labels=[s["labels"] for s in samples], names=[linear_names(b) for b in blocks])
        strat = get_strategy(args.importance)
        m.step("importance: global pass", lambda: strat.prepare(ctx))
        blk = blocks[0]
        names = linear_names(blk)
        q_in = [(c.hidden, c.kwargs(0)) for c in caps]
        w = m.step("importance: block weights", lambda: strat.block_weights(ctx, 0, blk, names, q_in, q_in))
        groups = B.sequential_groups(blk, q_in[0], names)
        for gi, group in enumerate(groups):
            stats = m.step(f"stats group {gi} ({'/'.join(n.split('.')[-1] for n in group)})",
                           lambda: B.accumulate_stats(blk, q_in, w, group))
            for n in group:
                W = blk.get_submodule(n).weight.detach().float()
                res = m.step(f"solve {n} {tuple(W.shape)}", lambda: B.solve(W, stats[n], spec))
                B.apply_qweight(blk, n, res)
        m.step("propagate", lambda: B.propagate(blk, q_in))

        tokens = sum(int(s["attention_mask"].sum()) for s in samples)
        d = model.config.get_text_config().hidden_size
        weights_b = sum(p.numel() * p.element_size() for p in blk.parameters())
        hess_b = sum(blk.get_submodule(n).in_features ** 2 * 8 for n in names)
        acts_b = tokens * d * 4
        print(f"model {lay.model_class}, hidden {d}, {len(names)} linears per block, {len(samples)} samples, {tokens} tokens, "
              f"device {dev}, torch threads {args.threads}, importance {args.importance}, method {args.method}\n")
        print("| step | seconds | peak memory (MiB) |\n|---|---:|---:|")
        for name, s, peak in m.rows:
            print(f"| {name} | {s:.3f} | {peak:.0f} |")
        print(f"\nsizes: block weights {mib(weights_b):.1f} MiB, Hessians (float64, all linears) {mib(hess_b):.1f} MiB, "
              f"activations per chain {mib(acts_b):.1f} MiB")


if __name__ == "__main__":
    main()
