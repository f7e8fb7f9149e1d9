"""Train the demo VLM from scratch on CPU.

python -m tlq_farm.demo.train --out tlq_farm/demo/model --seed 0

Every step draws fresh scenes from a generator seeded by --seed, so the run is a pure function of its
arguments: the same seed, step count and thread count give the same weights.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path

import torch

from tlq_farm.calib.encode import IGNORE_INDEX, encode_example
from tlq_farm.demo import scenes
from tlq_farm.demo.build import build_config, build_model, build_processor, build_tokenizer

HELD_OUT_SEED = 1001  # the evaluation set; training streams never use it
CALIB_SEED = 2002  # the bundled calibration set


def pad_and_stack(encoded: list[dict], pad_token_id: int) -> dict:
    """Collate encode_example outputs into one right-padded batch.

    Token-aligned tensors are padded (labels with IGNORE_INDEX, masks with 0); vision tensors
    (pixel_values, image_grid_thw), which are per patch / per image, are concatenated.
    """
    longest = max(e["input_ids"].shape[1] for e in encoded)
    pad_value = {"input_ids": pad_token_id, "labels": IGNORE_INDEX}
    token_keys = ("input_ids", "attention_mask", "labels", "mm_token_type_ids")
    batch: dict[str, torch.Tensor] = {}
    for key in token_keys:
        rows = []
        for e in encoded:
            t = e[key]
            pad = torch.full((1, longest - t.shape[1]), pad_value.get(key, 0), dtype=t.dtype)
            rows.append(torch.cat([t, pad], dim=1))
        batch[key] = torch.cat(rows, dim=0)
    for key in ("pixel_values", "image_grid_thw"):
        batch[key] = torch.cat([e[key] for e in encoded], dim=0)
    return batch


def encode_scenes(processor, samples: list, text_cache: dict) -> list[dict]:
    """encode_example for scene samples, fast: text encodings cached per (prompt, answer), pixels batched.

    All scenes have the same image size, so the token layout of a (prompt, answer) pair never changes
    and only the pixels differ; the result equals encode_example's sample by sample.
    """
    pixels = processor.image_processor(images=[image for image, _, _ in samples], return_tensors="pt")
    per_image = pixels["pixel_values"].shape[0] // len(samples)
    encoded = []
    for i, (image, prompt, answer) in enumerate(samples):
        key = (prompt, answer)
        if key not in text_cache:
            text_cache[key] = encode_example(processor, [image], prompt, answer)
        e = dict(text_cache[key])
        e["pixel_values"] = pixels["pixel_values"][i * per_image:(i + 1) * per_image]
        e["image_grid_thw"] = pixels["image_grid_thw"][i:i + 1]
        encoded.append(e)
    return encoded


def lr_at(step: int, total_steps: int, peak_lr: float, warmup: int) -> float:
    """Linear warmup to `peak_lr`, then cosine decay to a tenth of it."""
    if step < warmup:
        return peak_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return peak_lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def train(
    out_dir: str | Path,
    *,
    seed: int = 0,
    steps: int = 1200,
    batch_size: int = 32,
    lr: float = 2e-3,
    warmup: int = 60,
    threads: int = 1,
    log_every: int = 50,
) -> Path:
    """Train a fresh demo model and save it (weights + processor) to `out_dir`."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    model = build_model(build_config(tokenizer))
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params:,}", flush=True)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.98),
    )
    rng = random.Random(seed)
    text_cache: dict = {}
    started = time.time()
    running = None
    for step in range(steps):
        samples = [scenes.make_sample(rng) for _ in range(batch_size)]
        encoded = encode_scenes(processor, samples, text_cache)
        batch = pad_and_stack(encoded, tokenizer.pad_token_id)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if (step + 1) % log_every == 0 or step == 0:
            print(f"step {step + 1}/{steps} loss {running:.4f} {time.time() - started:.0f}s", flush=True)

    model.eval()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    print(f"saved to {out_dir} after {time.time() - started:.0f}s", flush=True)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the demo VLM from scratch on CPU.")
    parser.add_argument("--out", required=True, help="folder for the trained model and processor")
    parser.add_argument("--seed", type=int, default=0, help="seed of the init and of the training stream")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (fixed for reproducibility)")
    parser.add_argument("--eval-n", type=int, default=0, help="held-out samples to score after training")
    args = parser.parse_args(argv)
    out = train(args.out, seed=args.seed, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                threads=args.threads)
    if args.eval_n:
        import tempfile

        from tlq_farm.evaluate import evaluate

        with tempfile.TemporaryDirectory() as tmp:
            jsonl = scenes.write_set(tmp, args.eval_n, HELD_OUT_SEED)
            result = evaluate(out, jsonl, max_new_tokens=4)
        print(f"held-out ({args.eval_n} samples, seed {HELD_OUT_SEED}): {result}", flush=True)


if __name__ == "__main__":
    main()
