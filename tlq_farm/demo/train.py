"""Train the demo VLM from scratch on CPU.

python -m tlq_farm.demo.train --recipe --out tlq_farm/demo/model      # the shipped weights (three stages)
python -m tlq_farm.demo.train --out DIR --seed 0 [--init DIR0 ...]       # one stage

Every step draws fresh scenes from a generator seeded by --seed, so the run is a pure function of its
arguments: the same seed, step count, thread count and starting model give the same weights.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import random
import time
from pathlib import Path

import torch

from tlq_farm.calib.encode import IGNORE_INDEX
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


def conversation_messages(qa_pairs: list[tuple[str, str]]) -> list[dict]:
    """A chat about one image: the image comes with the first question, later turns are text only."""
    messages = []
    for turn, (prompt, answer) in enumerate(qa_pairs):
        content = ([{"type": "image"}] if turn == 0 else []) + [{"type": "text", "text": prompt}]
        messages.append({"role": "user", "content": content})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def _token_ids(processor, text: str, n_image_tokens: int) -> list[int]:
    """Token ids of a rendered chat with the image placeholder expanded, as the processor does it."""
    expanded = text.replace(processor.image_token, processor.image_token * n_image_tokens)
    return processor.tokenizer(expanded, add_special_tokens=False)["input_ids"]


def encode_conversations(processor, scenes_with_questions: list) -> list[dict]:
    """Training encodings of (image, [(prompt, answer), ...]) chats, every answer labelled.

    Each answer's span (with its end-of-turn token) is found like encode_example does it: by the
    token length of the chat rendered up to that question with the generation prompt. All scenes have
    the same image size, so the placeholder expands to the same number of tokens; pixels are processed
    in one batch. A one-question chat equals encode_example's output.
    """
    pixels = processor.image_processor(images=[image for image, _ in scenes_with_questions], return_tensors="pt")
    grid = pixels["image_grid_thw"]
    merge = processor.image_processor.merge_size
    per_image = pixels["pixel_values"].shape[0] // len(scenes_with_questions)
    encoded = []
    for i, (_, qa_pairs) in enumerate(scenes_with_questions):
        n_image_tokens = int(grid[i].prod()) // (merge * merge)
        messages = conversation_messages(qa_pairs)
        full_ids = _token_ids(processor, processor.apply_chat_template(messages, tokenize=False), n_image_tokens)
        labels = [IGNORE_INDEX] * len(full_ids)
        for turn in range(len(qa_pairs)):
            asked = processor.apply_chat_template(messages[: 2 * turn + 1], tokenize=False,
                                                  add_generation_prompt=True)
            answered = processor.apply_chat_template(messages[: 2 * turn + 2], tokenize=False)
            start = len(_token_ids(processor, asked, n_image_tokens))
            end = len(_token_ids(processor, answered, n_image_tokens))
            labels[start:end] = full_ids[start:end]
        input_ids = torch.tensor([full_ids])
        image_positions = input_ids == processor.image_token_id
        encoded.append({
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "mm_token_type_ids": image_positions.long(),
            "pixel_values": pixels["pixel_values"][i * per_image:(i + 1) * per_image],
            "image_grid_thw": grid[i:i + 1],
            "labels": torch.tensor([labels]),
            "vision_mask": image_positions,
        })
    return encoded


def draw_training_chats(rng: random.Random, batch_size: int, max_turns: int = 1, *,
                        caption_rate: float = 0.5, kind_weights: dict[str, float] | None = None) -> list:
    """`batch_size` scenes, each with 1..max_turns of its questions (the first of a drawn kind).

    The first question's kind is uniform (the scene generator's own draw, as at evaluation) when
    `kind_weights` is None; otherwise it is drawn with these relative weights (kinds left out: 0).

    With probability `caption_rate` the chat ends with a description of the whole picture
    ("describe the picture ?" -> "big red circle"): dense, image-only supervision, as in captioning
    pre-training. The first turn is always a question, as at evaluation.
    """
    kinds = list(scenes.QUESTION_KINDS)
    if kind_weights is not None:
        check_kind_weights(kind_weights)
        weights = [kind_weights.get(k, 0.0) for k in kinds]
    chats = []
    for _ in range(batch_size):
        kind = None if kind_weights is None else rng.choices(kinds, weights=weights)[0]
        image, questions = scenes.make_scene(rng, kind)
        caption = [q for q in questions if q[0] == scenes.CAPTION_PROMPT]
        asked = [q for q in questions if q[0] != scenes.CAPTION_PROMPT][: rng.randint(1, max_turns)]
        chats.append((image, asked + caption if rng.random() < caption_rate else asked))
    return chats


def build_probe(processor, per_kind: int, seed: int = HELD_OUT_SEED) -> dict:
    """One-question held-out encodings per kind, batched, for cheap progress checks during training."""
    rng = random.Random(seed)
    probe = {}
    for kind in scenes.QUESTION_KINDS:
        chats = []
        for _ in range(per_kind):
            image, questions = scenes.make_scene(rng, kind)
            chats.append((image, questions[:1]))
        probe[kind] = pad_and_stack(encode_conversations(processor, chats), processor.tokenizer.pad_token_id)
    return probe


def first_answer_token_accuracy(model, batch: dict) -> float:
    """Share of rows whose first answer token is the model's argmax (teacher forced, one forward)."""
    labels = batch["labels"]
    first = (labels != IGNORE_INDEX).int().argmax(dim=1)  # position of the first labelled token per row
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits = model(**inputs).logits
    rows = torch.arange(labels.shape[0])
    predicted = logits[rows, first - 1].argmax(dim=-1)  # logits at t-1 predict token t
    return (predicted == labels[rows, first]).float().mean().item()


def probe_report(model, probe: dict) -> str:
    """'mean | kind acc ...' of first_answer_token_accuracy over the probe (model left in train mode)."""
    model.eval()
    scores = {kind: first_answer_token_accuracy(model, batch) for kind, batch in probe.items()}
    model.train()
    mean = sum(scores.values()) / len(scores)
    return f"probe {mean:.3f} | " + " ".join(f"{k} {v:.2f}" for k, v in scores.items())


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
    steps: int = 2000,
    batch_size: int = 32,
    lr: float = 1e-3,
    vision_lr_scale: float = 1.0,
    warmup: int = 30,
    threads: int = 2,
    log_every: int = 50,
    max_turns: int = 3,
    caption_rate: float = 0.5,
    probe_per_kind: int = 16,
    snapshot_every: int = 0,
    kind_weights: dict[str, float] | None = None,
    init: str | Path | None = None,
) -> Path:
    """Train a demo model and save it (weights + processor) to `out_dir`.

    The model starts from a random init drawn with `seed`, or from the saved demo model in `init` (a
    second stage: training goes on with a new stream, schedule and `kind_weights`, see
    draw_training_chats).

    `vision_lr_scale` multiplies the learning rate of the vision tower and merger, which start from
    nothing and have to become useful before any answer can depend on the picture. Every `log_every`
    steps a held-out probe (`probe_per_kind` questions per kind) is scored; it reads its own generator,
    so it does not change the training stream. `snapshot_every` > 0 also saves the model so far to
    `<out_dir>-step<N>`.
    """
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    if init is None:
        model = build_model(build_config(tokenizer))
    else:
        model = _load_for_training(init)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params:,}", flush=True)

    groups: dict[tuple[bool, bool], list] = {}
    for name, param in model.named_parameters():
        is_vision = name.startswith("model.visual.")
        decays = param.ndim >= 2 and "embed" not in name
        groups.setdefault((is_vision, decays), []).append(param)
    optimizer = torch.optim.AdamW([
        {"params": params, "weight_decay": 0.01 if decays else 0.0,
         "lr_scale": vision_lr_scale if is_vision else 1.0}
        for (is_vision, decays), params in sorted(groups.items())
    ], lr=lr)
    probe = build_probe(processor, probe_per_kind) if probe_per_kind else None
    rng = random.Random(seed)
    out_dir = Path(out_dir)
    started = time.time()
    running = None
    for step in range(steps):
        chats = draw_training_chats(rng, batch_size, max_turns, caption_rate=caption_rate, kind_weights=kind_weights)
        encoded = encode_conversations(processor, chats)
        batch = pad_and_stack(encoded, tokenizer.pad_token_id)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup) * group["lr_scale"]
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if (step + 1) % log_every == 0 or step == 0:
            report = probe_report(model, probe) if probe else ""
            print(f"step {step + 1}/{steps} loss {running:.4f} {time.time() - started:.0f}s {report}", flush=True)
        if snapshot_every and (step + 1) % snapshot_every == 0 and step + 1 < steps:
            _save(model, processor, out_dir.with_name(f"{out_dir.name}-step{step + 1}"))

    _save(model, processor, out_dir)
    print(f"saved to {out_dir} after {time.time() - started:.0f}s", flush=True)
    return out_dir


def check_init(model_dir: str | Path) -> Path:
    """`model_dir` if it holds a saved demo model of the architecture and vocabulary build_config gives."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"--init {model_dir}: no config.json there; give the folder of a saved demo model")
    config = json.loads(config_path.read_text())
    expected = build_config(build_tokenizer()).to_dict()

    def sizes(c: dict) -> tuple:
        text, vision = c.get("text_config", {}), c.get("vision_config", {})
        return (c.get("model_type"), text.get("vocab_size"), text.get("hidden_size"),
                text.get("num_hidden_layers"), vision.get("depth"), vision.get("embed_dim"))

    if sizes(config) != sizes(expected):
        raise ValueError(f"--init {model_dir}: not a demo model of this version (its architecture, vocabulary "
                         "or sizes differ); train stage one from scratch first")
    return model_dir


def _load_for_training(model_dir: str | Path):
    from transformers import Qwen2VLForConditionalGeneration

    return Qwen2VLForConditionalGeneration.from_pretrained(check_init(model_dir))


def check_kind_weights(kind_weights: dict[str, float]) -> None:
    """Raise ValueError unless the weights name known kinds only, are >= 0 and are not all 0."""
    kinds = scenes.QUESTION_KINDS
    if set(kind_weights) - set(kinds) or min(kind_weights.values()) < 0 or sum(kind_weights.values()) <= 0:
        raise ValueError(f"kind_weights needs weights >= 0, not all 0, for kinds among {', '.join(kinds)}; "
                         f"got {kind_weights}")


def parse_kind_weights(text: str) -> dict[str, float]:
    """'shape=3,digit=4' -> weights for draw_training_chats; kinds not named get 1."""
    weights = {kind: 1.0 for kind in scenes.QUESTION_KINDS}
    for item in filter(None, (part.strip() for part in text.split(","))):
        kind, sep, value = item.partition("=")
        if not sep or kind not in weights:
            raise ValueError(f"bad kind weight {item!r}: write KIND=WEIGHT with KIND among "
                             f"{', '.join(scenes.QUESTION_KINDS)}")
        try:
            weights[kind] = float(value)
        except ValueError:
            raise ValueError(f"bad kind weight {item!r}: {value!r} is not a number") from None
        if weights[kind] < 0:
            raise ValueError(f"bad kind weight {item!r}: weights must be >= 0")
    check_kind_weights(weights)  # all zero is only wrong as a whole
    return weights


def _save(model, processor, out_dir: Path) -> None:
    """Save weights and processor (the model goes back to train mode afterwards)."""
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    model.train()


# The shipped weights: three runs of train(), each stage starting from the one before (docs/demo.md).
# Stage one learns colour, size, side, count and the digit's colour; shape and the digit stall there
# (0.60 and 0.44), and the later stages ask about them more often until the vision tower separates them.
RECIPE = (
    {"seed": 0, "steps": 2000},
    {"seed": 1, "steps": 800, "lr": 3e-4, "kind_weights": "shape=3,digit=4,count=1.5"},
    {"seed": 2, "steps": 1200, "lr": 5e-4, "vision_lr_scale": 3.0, "threads": 1,
     "kind_weights": "shape=4,digit=6,count=1.5"},
)


def train_recipe(out_dir: str | Path, stages=RECIPE, *, stage_dir: str | Path | None = None, **common) -> Path:
    """Run `stages` (train() keyword sets; kind_weights as 'KIND=W,...' text) in order, each from the last.

    Stage i < last is saved to `stage_dir`/stage<i> (a temporary folder if None), the last to `out_dir`.
    `common` goes to every stage (log_every, probe_per_kind, snapshot_every) unless the stage sets it.
    """
    import contextlib
    import tempfile

    keep = contextlib.nullcontext(stage_dir) if stage_dir is not None else tempfile.TemporaryDirectory()
    with keep as where:
        where = Path(where)
        init = None
        for number, stage in enumerate(stages, start=1):
            kwargs = dict(stage)
            if kwargs.get("kind_weights") is not None:
                kwargs["kind_weights"] = parse_kind_weights(kwargs["kind_weights"])
            last = number == len(stages)
            target = Path(out_dir) if last else where / f"stage{number}"
            print(f"stage {number}/{len(stages)}: {stage} -> {target}", flush=True)
            init = train(target, init=init, **{**common, **kwargs})  # a stage's own setting wins
    return Path(out_dir)


def main(argv: list[str] | None = None) -> None:
    defaults = {name: p.default for name, p in inspect.signature(train).parameters.items()}
    parser = argparse.ArgumentParser(description="Train the demo VLM from scratch on CPU.")
    parser.add_argument("--out", required=True, help="folder for the trained model and processor")
    parser.add_argument("--seed", type=int, default=defaults["seed"], help="seed of the init and of the training stream")
    parser.add_argument("--steps", type=int, default=defaults["steps"])
    parser.add_argument("--batch-size", type=int, default=defaults["batch_size"])
    parser.add_argument("--lr", type=float, default=defaults["lr"])
    parser.add_argument("--vision-lr-scale", type=float, default=defaults["vision_lr_scale"],
                        help="learning-rate multiplier of the vision tower and merger")
    parser.add_argument("--warmup", type=int, default=defaults["warmup"], help="linear warmup steps")
    parser.add_argument("--max-turns", type=int, default=defaults["max_turns"], help="questions per training image, at most")
    parser.add_argument("--caption-rate", type=float, default=defaults["caption_rate"],
                        help="share of training chats that end with a description of the picture")
    parser.add_argument("--threads", type=int, default=defaults["threads"], help="torch threads (fixed for reproducibility)")
    parser.add_argument("--log-every", type=int, default=defaults["log_every"], help="steps between loss and probe reports")
    parser.add_argument("--snapshot-every", type=int, default=defaults["snapshot_every"], help="also save <out>-step<N> every N steps")
    parser.add_argument("--eval-n", type=int, default=0, help="held-out samples to score after training")
    parser.add_argument("--init", default=None, help="start from this saved demo model instead of a random init")
    parser.add_argument("--kind-weights", default=None,
                        help="how often each kind opens a chat, e.g. shape=3,digit=4 (others 1); default uniform")
    parser.add_argument("--recipe", action="store_true",
                        help="run the stages that made the shipped weights (RECIPE); only --out, --log-every, "
                             "--snapshot-every, --eval-n and --keep-stages apply")
    parser.add_argument("--keep-stages", default=None, help="with --recipe: save the earlier stages in this folder")
    args = parser.parse_args(argv)
    if args.recipe:
        stage_options = ("seed", "steps", "batch_size", "lr", "vision_lr_scale", "warmup", "max_turns",
                         "caption_rate", "threads", "init", "kind_weights")
        tuned = [f"--{name.replace('_', '-')}" for name in stage_options
                 if getattr(args, name) != defaults[name]]
        if tuned:
            parser.error(f"--recipe sets every stage's options itself; drop {', '.join(tuned)}")
        out = train_recipe(args.out, stage_dir=args.keep_stages, log_every=args.log_every,
                           snapshot_every=args.snapshot_every)
    else:
        if args.steps <= 0 or args.batch_size <= 0:
            parser.error("--steps and --batch-size must be positive")
        try:
            kind_weights = None if args.kind_weights is None else parse_kind_weights(args.kind_weights)
            if args.init is not None:
                check_init(args.init)
        except (ValueError, FileNotFoundError) as exc:
            parser.error(str(exc))
        out = train(args.out, seed=args.seed, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                    vision_lr_scale=args.vision_lr_scale, threads=args.threads, max_turns=args.max_turns,
                    warmup=args.warmup, caption_rate=args.caption_rate, log_every=args.log_every,
                    snapshot_every=args.snapshot_every, kind_weights=kind_weights, init=args.init)
    if args.eval_n:
        print(f"held-out ({args.eval_n} samples, seed {HELD_OUT_SEED}): {score_held_out(out, args.eval_n)}",
              flush=True)


def score_held_out(model_dir: str | Path, n: int) -> dict:
    """Greedy exact match on `n` held-out samples, overall and per question kind."""
    import tempfile

    from tlq_farm.evaluate import evaluate, load_model_and_processor, write_heldout_set

    model, processor = load_model_and_processor(model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        jsonl = write_heldout_set(tmp, n)
        result = {"overall": evaluate((model, processor), jsonl, max_new_tokens=4)["accuracy"]}
        rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
        for kind in scenes.QUESTION_KINDS:
            picked = [json.dumps(r) for r in rows if scenes.kind_of_prompt(r["prompt"]) == kind]
            kind_jsonl = Path(tmp) / f"{kind}.jsonl"
            kind_jsonl.write_text("\n".join(picked) + "\n")
            result[kind] = evaluate((model, processor), kind_jsonl, max_new_tokens=4)["accuracy"]
    return result


if __name__ == "__main__":
    main()
