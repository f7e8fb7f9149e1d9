"""Calibration data: JSONL rows or a `datasets.save_to_disk` folder -> encoded samples.

A row is {"image": path | [paths], "prompt": str, "answer": str}; image paths are relative to the JSONL
file. Rows whose image is missing or unreadable, and samples longer than --seq-len, are skipped and
counted (CalibSet.skipped, with the rows in CalibSet.skipped_rows; CalibSet.notes says it in the log); a
malformed file, a row without a prompt, a path that is no calibration source, or a set left empty is an error.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch


class CalibError(ValueError):
    """Calibration data that cannot be used; the message says which file / line and what to fix."""


SOURCES = "a JSONL file, a folder of *.jsonl files, or a folder saved with datasets.save_to_disk"
# How many row references a log line or an error names per reason; the counts are always complete.
SHOWN_ROWS = 3
TOO_LONG = "longer than --seq-len"
IMAGES_DROPPED = "images dropped (text-only model)"


@dataclass
class Row:
    images: list  # PIL images
    prompt: str
    answer: str | None
    source: str


def _count(skipped: dict[str, int], rows: dict[str, list[str]], reason: str, source: str) -> None:
    skipped[reason] = skipped.get(reason, 0) + 1
    rows.setdefault(reason, []).append(source)


def _row_key(ref: str) -> tuple[str, int]:
    """'c.jsonl:12' -> ('c.jsonl', 12), 'ds[3]' -> ('ds', 3): rows in file order, not in shuffle order."""
    name, sep, num = ref.rstrip("]").replace("[", ":").rpartition(":")
    return (name, int(num)) if sep and num.isdigit() else (ref, 0)


def _rows(n: int) -> str:
    return f"{n} row" if n == 1 else f"{n} rows"


def _refs(n: int, refs: list[str]) -> str:
    shown = sorted(refs, key=_row_key)[:SHOWN_ROWS]
    return ", ".join(shown) + (", ..." if n > len(shown) else "")


def describe_skips(skipped: dict[str, int], rows: dict[str, list[str]]) -> str:
    """'2 missing image (c.jsonl:3, c.jsonl:7), 1 longer than --seq-len (c.jsonl:5)': counts, first rows."""
    return ", ".join(f"{n} {reason}" + (f" ({_refs(n, rows[reason])})" if rows.get(reason) else "")
                     for reason, n in skipped.items())


@dataclass
class CalibSet:
    samples: list[dict]          # encoded samples (encode_example outputs), batch dim 1
    skipped: dict[str, int] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)
    skipped_rows: dict[str, list[str]] = field(default_factory=dict)  # reason -> row references ('c.jsonl:3')

    @property
    def tokens(self) -> int:
        return int(sum(s["attention_mask"].sum() for s in self.samples))

    def notes(self, requested: int) -> list[str]:
        """The log lines about what the data did not give: skipped rows, and fewer samples than asked."""
        lines = []
        skips = {k: v for k, v in self.skipped.items() if k != IMAGES_DROPPED}
        parts = [f"skipped {_rows(sum(skips.values()))}: {describe_skips(skips, self.skipped_rows)}"] if skips else []
        if dropped := self.skipped.get(IMAGES_DROPPED):
            parts.append(f"images dropped from {_rows(dropped)} for the text-only model "
                         f"({_refs(dropped, self.skipped_rows.get(IMAGES_DROPPED, []))})")
        if parts:
            lines.append(f"calibration: {'; '.join(parts)} (counted in tlq_report.json)")
        if len(self.samples) < requested:
            n = len(self.samples)
            lines.append(f"--samples {requested} asked, the data has {n} usable {'row' if n == 1 else 'rows'}: using {n}")
        return lines


def _open_image(path: Path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def _jsonl_rows(path: Path, skipped: dict[str, int], skipped_rows: dict[str, list[str]]) -> list[Row]:
    rows = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CalibError(f"calibration file {path} is not UTF-8 text: pass {SOURCES}") from None
    except OSError as e:
        raise CalibError(f"cannot read calibration file {path} ({e.strerror or e}): check its permissions") from None
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
        imgs = [imgs] if isinstance(imgs, str) else imgs
        if not isinstance(imgs, list) or not all(isinstance(p, str) for p in imgs):
            raise CalibError(f'{path}:{lineno}: "image" must be a path or a list of paths, relative to the JSONL file')
        source = f"{path.name}:{lineno}"
        pil = _open_images([(path.parent / p) if not Path(p).is_absolute() else Path(p) for p in imgs],
                           source, skipped, skipped_rows)
        if pil is None:
            continue
        answer = d.get("answer")
        rows.append(Row(pil, d["prompt"], None if answer is None else str(answer), source))
    return rows


def _open_images(paths: list[Path], source: str, skipped, skipped_rows) -> list | None:
    """The row's images, or None (counted) when one is missing or unreadable."""
    try:
        return [_open_image(p) for p in paths]
    except FileNotFoundError:
        _count(skipped, skipped_rows, "missing image", source)
    except (OSError, ValueError):  # PIL's UnidentifiedImageError is an OSError; a decompression bomb a ValueError
        _count(skipped, skipped_rows, "unreadable image", source)
    return None


def _dataset_rows(path: Path, skipped: dict[str, int], skipped_rows: dict[str, list[str]]) -> list[Row]:
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a test extra
        raise CalibError(f"{path} looks like a saved dataset; install the `datasets` package to read it") from e
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises FileNotFoundError, ValueError, pyarrow errors...: all mean "broken"
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CalibError(f"saved dataset {path} cannot be loaded ({why}): save it again with "
                         "datasets.save_to_disk") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[next(iter(ds))]
    if "prompt" not in ds.column_names:
        raise CalibError(f'saved dataset {path} has columns {ds.column_names}: it needs "prompt" (and "image", "answer")')
    rows = []
    for i, d in enumerate(ds):
        source = f"{path.name}[{i}]"
        if not isinstance(d["prompt"], str):
            raise CalibError(f'saved dataset {path}, row {i}: "prompt" must be a string, not {type(d["prompt"]).__name__}')
        imgs = d.get("image", d.get("images")) or []
        imgs = imgs if isinstance(imgs, list) else [imgs]
        if all(isinstance(im, str) for im in imgs):  # a column of paths, relative to the dataset folder
            pil = _open_images([path / im for im in imgs], source, skipped, skipped_rows)
            if pil is None:
                continue
        else:
            pil = [im.convert("RGB") for im in imgs]
        answer = d.get("answer")
        rows.append(Row(pil, d["prompt"], None if answer is None else str(answer), source))
    return rows


def _not_a_source(p: Path) -> CalibError:
    if not p.exists():
        return CalibError(f"calibration data {p} not found: pass {SOURCES}")
    if p.is_dir():
        n = sum(1 for _ in p.iterdir())
        held = "it is empty" if n == 0 else f"it holds {n} entries, none of them *.jsonl, and no dataset_info.json"
        return CalibError(f"calibration data {p} is a folder but not a calibration set ({held}): pass {SOURCES}")
    return CalibError(f"calibration data {p} is neither a file nor a folder: pass {SOURCES}")


def _load_rows(path: str | Path) -> tuple[list[Row], dict[str, int], dict[str, list[str]]]:
    p = Path(path)
    skipped: dict[str, int] = {}
    skipped_rows: dict[str, list[str]] = {}
    if p.is_file():
        rows = _jsonl_rows(p, skipped, skipped_rows)
    elif p.is_dir() and ((p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists()):
        rows = _dataset_rows(p, skipped, skipped_rows)
    elif p.is_dir() and sorted(p.glob("*.jsonl")):
        rows = []
        for f in sorted(p.glob("*.jsonl")):
            rows += _jsonl_rows(f, skipped, skipped_rows)
    else:
        raise _not_a_source(p)
    return rows, skipped, skipped_rows


def load_rows(path: str | Path) -> tuple[list[Row], dict[str, int]]:
    rows, skipped, _ = _load_rows(path)
    return rows, skipped


def load_calibration(path: str | Path, processor, *, samples: int, seq_len: int, seed: int) -> CalibSet:
    """Rows -> shuffled (by seed) -> encoded through the model's processor and chat template -> first `samples`."""
    from .encode import SampleTooLong, encode_example, is_multimodal_processor, require_chat_template

    # Before any row is read: a model without a chat template cannot encode any of them.
    require_chat_template(processor)
    rows, skipped, skipped_rows = _load_rows(path)
    if not rows and not skipped:
        raise CalibError(f'calibration data {path} has no rows: it needs one JSON object per line, such as '
                         '{"image": "images/0001.png", "prompt": "...", "answer": "..."}')
    multimodal = is_multimodal_processor(processor)
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    out, sources = [], []
    shortest_too_long = None
    for i in order:
        if len(out) == samples:
            break
        r = rows[i]
        images = r.images
        if images and not multimodal:
            # A text-only model calibrates on the text of a VLM set; counted so the report shows it.
            _count(skipped, skipped_rows, IMAGES_DROPPED, r.source)
            images = []
        try:
            enc = encode_example(processor, images, r.prompt, r.answer, max_len=seq_len)
        except SampleTooLong as e:
            _count(skipped, skipped_rows, TOO_LONG, r.source)
            shortest_too_long = min(shortest_too_long or e.n_tokens, e.n_tokens)
            continue
        except CalibError:
            raise
        except ValueError as e:  # a row the template cannot render as a prompt and answer
            raise CalibError(f"{r.source}: {str(e).splitlines()[0]}") from None
        out.append(enc)
        sources.append(r.source)
    if not out:
        fixes = []
        if skipped.get("missing image") or skipped.get("unreadable image"):
            fixes.append("check the image paths (relative to the JSONL file) and files")
        if shortest_too_long is not None:
            fixes.append(f"raise --seq-len to at least {shortest_too_long} or shorten the samples")
        skips = {k: v for k, v in skipped.items() if k != IMAGES_DROPPED}
        raise CalibError(f"calibration set {path} is empty after loading (nothing left after skipping "
                         f"{describe_skips(skips, skipped_rows)}): {' and '.join(fixes) or 'add usable rows'}")
    return CalibSet(out, skipped, sources, skipped_rows)


def model_inputs(sample: dict) -> dict:
    """The keys of an encoded sample that the model's forward takes."""
    return {k: v for k, v in sample.items() if k not in ("labels", "vision_mask") and isinstance(v, torch.Tensor)}
