"""Calibration data: JSONL rows or a `datasets.save_to_disk` folder -> encoded samples.

A row is {"image": path | [paths], "prompt": str, "answer": str}; image paths are relative to the JSONL
file. Rows whose image is missing or unreadable, and samples longer than --seq-len, are skipped and
counted (CalibSet.skipped); a malformed file, a row without a prompt, or a set left empty is an error.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch


class CalibError(ValueError):
    """Calibration data that cannot be used; the message says which file / line and what to fix."""


@dataclass
class Row:
    images: list  # PIL images
    prompt: str
    answer: str | None
    source: str


@dataclass
class CalibSet:
    samples: list[dict]          # encoded samples (encode_example outputs), batch dim 1
    skipped: dict[str, int] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return int(sum(s["attention_mask"].sum() for s in self.samples))


def _open_image(path: Path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def _jsonl_rows(path: Path, skipped: dict[str, int]) -> list[Row]:
    rows = []
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise CalibError(f"cannot read calibration file {path}: {e}") from e
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise CalibError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be one JSON object") from e
        if not isinstance(d, dict) or not isinstance(d.get("prompt"), str):
            raise CalibError(f'{path}:{lineno}: a row needs a "prompt" string (and "image", "answer")')
        imgs = d.get("image", d.get("images")) or []
        imgs = [imgs] if isinstance(imgs, str) else list(imgs)
        try:
            pil = [_open_image((path.parent / p) if not Path(p).is_absolute() else Path(p)) for p in imgs]
        except FileNotFoundError:
            skipped["missing image"] = skipped.get("missing image", 0) + 1
            continue
        except OSError:
            skipped["unreadable image"] = skipped.get("unreadable image", 0) + 1
            continue
        answer = d.get("answer")
        rows.append(Row(pil, d["prompt"], None if answer is None else str(answer), f"{path.name}:{lineno}"))
    return rows


def _dataset_rows(path: Path) -> list[Row]:
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a test extra
        raise CalibError(f"{path} looks like a saved dataset; install the `datasets` package to read it") from e
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[next(iter(ds))]
    if "prompt" not in ds.column_names:
        raise CalibError(f'saved dataset {path} has columns {ds.column_names}: it needs "prompt" (and "image", "answer")')
    rows = []
    for i, d in enumerate(ds):
        imgs = d.get("image", d.get("images")) or []
        imgs = imgs if isinstance(imgs, list) else [imgs]
        rows.append(Row([im.convert("RGB") for im in imgs], d["prompt"], d.get("answer"), f"{path.name}[{i}]"))
    return rows


def load_rows(path: str | Path) -> tuple[list[Row], dict[str, int]]:
    p = Path(path)
    skipped: dict[str, int] = {}
    if p.is_file():
        rows = _jsonl_rows(p, skipped)
    elif p.is_dir() and ((p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists()):
        rows = _dataset_rows(p)
    elif p.is_dir() and sorted(p.glob("*.jsonl")):
        rows = []
        for f in sorted(p.glob("*.jsonl")):
            rows += _jsonl_rows(f, skipped)
    else:
        raise CalibError(f"calibration data {path} not found: pass a JSONL file, a folder of JSONL files, or a folder saved with datasets.save_to_disk")
    return rows, skipped


def load_calibration(path: str | Path, processor, *, samples: int, seq_len: int, seed: int) -> CalibSet:
    """Rows -> shuffled (by seed) -> encoded through the model's processor and chat template -> first `samples`."""
    from .encode import SampleTooLong, encode_example, is_multimodal_processor

    rows, skipped = load_rows(path)
    multimodal = is_multimodal_processor(processor)
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    out, sources = [], []
    for i in order:
        if len(out) == samples:
            break
        r = rows[i]
        images = r.images
        if images and not multimodal:
            # A text-only model calibrates on the text of a VLM set; counted so the report shows it.
            skipped["images dropped (text-only model)"] = skipped.get("images dropped (text-only model)", 0) + 1
            images = []
        try:
            enc = encode_example(processor, images, r.prompt, r.answer, max_len=seq_len)
        except SampleTooLong:
            skipped["longer than --seq-len"] = skipped.get("longer than --seq-len", 0) + 1
            continue
        out.append(enc)
        sources.append(r.source)
    if not out:
        why = ", ".join(f"{v} {k}" for k, v in skipped.items()) or "no rows"
        raise CalibError(f"calibration set {path} is empty after loading ({why}): check the image paths and --seq-len")
    return CalibSet(out, skipped, sources)


def model_inputs(sample: dict) -> dict:
    """The keys of an encoded sample that the model's forward takes."""
    return {k: v for k, v in sample.items() if k not in ("labels", "vision_mask") and isinstance(v, torch.Tensor)}
