"""Procedurally drawn scenes and questions for the demo VLM.

Each sample is a small picture of coloured shapes (or a seven-segment digit) on a plain background
(a faint colour ramp, see BACKGROUND_RAMP), with a question whose one- or two-word answer can only
be read from the picture. Drawing uses PIL primitives only (no fonts), so the pixels are the same on
every machine for a given seed.

CLI: python -m tlq_farm.demo.scenes --n 500 --seed 7 --out DIR
"""

from __future__ import annotations

import argparse
import functools
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

IMAGE_SIZE = 128
# The background: a faint ramp, red from left to right and blue from top to bottom, around a light grey.
# Qwen2-VL's vision tower has no absolute position embedding (2D RoPE only), so on a uniform background
# no vision token can tell where in the picture it is and "left or right" stays at chance; the ramp
# lets every patch that shows some background know its place, as the varied content of a photo does.
BACKGROUND = (236, 236, 236)
BACKGROUND_RAMP = 12  # +-12 levels of red across the width and of blue down the height

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (150, 60, 190),
    "orange": (245, 130, 20),
}
SHAPES = ("square", "circle", "triangle", "diamond")
PLURALS = {shape: shape + "s" for shape in SHAPES}
SIZES = {"small": (22, 26), "big": (38, 44)}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
MAX_COUNT = 3
# Object centres keep this distance from the vertical midline, so that left/right is unambiguous.
MIDLINE_GAP = 16

# Seven-segment layout: which of the segments a..g are lit for each digit.
SEGMENTS_OF_DIGIT = {
    0: "abcdef", 1: "bc", 2: "abged", 3: "abgcd", 4: "fgbc",
    5: "afgcd", 6: "afgedc", 7: "abc", 8: "abcdefg", 9: "abcdfg",
}

QUESTION_KINDS = ("color", "shape", "count", "digit", "digit_color", "position", "size")

TEMPLATE_WORDS = (
    "what color is the shape object how many are there digit shown left or right of big small "
    "which on the describe picture"
).split()
CAPTION_PROMPT = "describe the picture ?"


def vocabulary() -> list[str]:
    """Every word a prompt or answer can contain (the demo tokenizer's word list), in a fixed order."""
    words: list[str] = []
    for group in (TEMPLATE_WORDS, list(COLORS), list(SHAPES), list(PLURALS.values()), list(NUMBER_WORDS), ["?"]):
        for word in group:
            if word not in words:
                words.append(word)
    return words


def _shape_polygon(shape: str, cx: float, cy: float, size: float) -> list[tuple[float, float]] | None:
    """Vertices of a polygonal shape centred at (cx, cy) with bounding size `size`; None for a circle."""
    h = size / 2
    if shape == "square":
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "diamond":
        return [(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)]
    return None


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, color: str, cx: float, cy: float, size: float) -> None:
    """Draw one filled shape."""
    fill = COLORS[color]
    polygon = _shape_polygon(shape, cx, cy, size)
    if polygon is None:
        h = size / 2
        draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=fill)
    else:
        draw.polygon(polygon, fill=fill)


def draw_digit(draw: ImageDraw.ImageDraw, digit: int, color: str, x0: int, y0: int, width: int, height: int) -> None:
    """Draw `digit` as a seven-segment figure in the box (x0, y0, width, height)."""
    t = max(3, width // 5)  # stroke thickness
    mid = y0 + height // 2
    x1, y1 = x0 + width, y0 + height
    boxes = {
        "a": (x0, y0, x1, y0 + t),
        "g": (x0, mid - t // 2, x1, mid - t // 2 + t),
        "d": (x0, y1 - t, x1, y1),
        "f": (x0, y0, x0 + t, mid),
        "b": (x1 - t, y0, x1, mid),
        "e": (x0, mid, x0 + t, y1),
        "c": (x1 - t, mid, x1, y1),
    }
    for segment in SEGMENTS_OF_DIGIT[digit]:
        draw.rectangle(boxes[segment], fill=COLORS[color])


def _place(rng: random.Random, sizes: list[int], tries: int = 200) -> list[tuple[int, int]] | None:
    """Centres for objects of the given sizes inside the canvas, without overlap.

    Returns None when no placement was found (the caller draws a new scene).
    """
    margin = 3
    centres: list[tuple[int, int]] = []
    for size in sizes:
        h = size // 2 + 1
        for _ in range(tries):
            cx = rng.randint(h + margin, IMAGE_SIZE - h - margin)
            cy = rng.randint(h + margin, IMAGE_SIZE - h - margin)
            ok = True
            for (ox, oy), osize in zip(centres, sizes):
                gap = (size + osize) // 2 + 4
                if abs(cx - ox) < gap and abs(cy - oy) < gap:
                    ok = False
                    break
            if ok:
                centres.append((cx, cy))
                break
        else:
            return None
    return centres


def _random_size(rng: random.Random, label: str | None = None) -> tuple[str, int]:
    label = label or rng.choice(list(SIZES))
    lo, hi = SIZES[label]
    return label, rng.randint(lo, hi)


def _ramp(i: int) -> int:
    """Offset of pixel row/column i on the background ramp: -BACKGROUND_RAMP .. +BACKGROUND_RAMP."""
    return round(BACKGROUND_RAMP * (2 * i / (IMAGE_SIZE - 1) - 1))


@functools.cache
def _background_bytes() -> bytes:
    r, g, b = BACKGROUND
    return bytes(channel for y in range(IMAGE_SIZE) for x in range(IMAGE_SIZE)
                 for channel in (r + _ramp(x), g, b + _ramp(y)))


def blank_canvas() -> Image.Image:
    """A new image of the background alone (what every scene is drawn on)."""
    return Image.frombytes("RGB", (IMAGE_SIZE, IMAGE_SIZE), _background_bytes())


def _new_canvas() -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = blank_canvas()
    return image, ImageDraw.Draw(image)


def _draw_objects(rng: random.Random, objects: list[dict]) -> Image.Image | None:
    """Draw objects (dicts with shape, color, px) and set their cx, cy; None if they did not fit."""
    centres = _place(rng, [o["px"] for o in objects])
    if centres is None:
        return None
    image, draw = _new_canvas()
    for obj, (cx, cy) in zip(objects, centres):
        obj["cx"], obj["cy"] = cx, cy
        draw_shape(draw, obj["shape"], obj["color"], cx, cy, obj["px"])
    return image


def _objects_scene(rng: random.Random):
    """One object of a random shape, colour and size, on the left or right half of the picture.

    Questions about its colour, shape, size and side. One object per scene keeps every answer a property
    of the whole picture, which the tiny model learns within a CPU budget.
    """
    shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
    size_label, px = _random_size(rng)
    h = px // 2 + 1
    side = rng.choice(("left", "right"))
    middle = IMAGE_SIZE // 2
    margin = 3
    if side == "left":
        cx = rng.randint(h + margin, middle - MIDLINE_GAP)
    else:
        cx = rng.randint(middle + MIDLINE_GAP, IMAGE_SIZE - h - margin)
    cy = rng.randint(h + margin, IMAGE_SIZE - h - margin)
    image, draw = _new_canvas()
    draw_shape(draw, shape, color, cx, cy, px)
    questions = [
        ("color", f"what color is the {shape} ?", color),
        ("shape", f"what shape is the {color} object ?", shape),
        ("size", f"is the {shape} big or small ?", size_label),
        ("position", f"is the {shape} on the left or right ?", side),
        ("caption", CAPTION_PROMPT, f"{size_label} {color} {shape}"),
    ]
    return image, questions


def _count_scene(rng: random.Random):
    """1..MAX_COUNT small objects of one shape in random colours; how many of them are there."""
    shape = rng.choice(SHAPES)
    count = rng.randint(1, MAX_COUNT)
    objects = []
    for _ in range(count):
        size_label, px = _random_size(rng, "small")
        objects.append({"shape": shape, "color": rng.choice(list(COLORS)), "size": size_label, "px": px})
    image = _draw_objects(rng, objects)
    if image is None:
        return None, []
    return image, [("count", f"how many {PLURALS[shape]} are there ?", NUMBER_WORDS[count]),
                   ("caption", CAPTION_PROMPT, f"{NUMBER_WORDS[count]} {PLURALS[shape]}")]


def _digit_scene(rng: random.Random):
    """One seven-segment digit in a random colour, place and size."""
    digit = rng.randint(0, 9)
    color = rng.choice(list(COLORS))
    height = rng.randint(50, 70)
    width = height // 2 + rng.randint(4, 10)
    x0 = rng.randint(4, IMAGE_SIZE - width - 4)
    y0 = rng.randint(4, IMAGE_SIZE - height - 4)
    image, draw = _new_canvas()
    draw_digit(draw, digit, color, x0, y0, width, height)
    return image, [("digit", "what digit is shown ?", NUMBER_WORDS[digit]),
                   ("digit_color", "what color is the digit ?", color),
                   ("caption", CAPTION_PROMPT, f"{color} digit {NUMBER_WORDS[digit]}")]


_SCENE_OF_KIND = {
    "color": _objects_scene, "shape": _objects_scene, "size": _objects_scene, "position": _objects_scene,
    "count": _count_scene, "digit": _digit_scene, "digit_color": _digit_scene,
}


def make_scene(rng: random.Random, kind: str | None = None) -> tuple[Image.Image, list[tuple[str, str]]]:
    """A scene and questions about it: the first is of `kind` (random if None), then the others, shuffled.

    The description ("describe the picture ?") is among the others. Returns (image, [(prompt, answer), ...]).
    """
    if kind is not None and kind not in _SCENE_OF_KIND:
        raise ValueError(f"unknown question kind {kind!r}; choose one of {', '.join(QUESTION_KINDS)}")
    while True:
        chosen = kind or rng.choice(QUESTION_KINDS)
        image, questions = _SCENE_OF_KIND[chosen](rng)
        of_kind = [q for q in questions if q[0] == chosen]
        if image is None or not of_kind:  # a crowded scene that did not fit is simply drawn again
            continue
        first = rng.choice(of_kind)
        rest = [q for q in questions if q is not first]
        rng.shuffle(rest)
        return image, [(p, a) for _, p, a in [first] + rest]


def kind_of_prompt(prompt: str) -> str:
    """The question kind a prompt asks (for per-kind scores of a JSONL set), "caption" for the description."""
    if prompt == CAPTION_PROMPT:
        return "caption"
    for kind, start in (("digit_color", "what color is the digit"), ("digit", "what digit"), ("color", "what color"),
                        ("shape", "what shape"), ("size", "is the") if "big or small" in prompt else ("position", "is the"),
                        ("count", "how many")):
        if prompt.startswith(start):
            return kind
    raise ValueError(f"prompt {prompt!r} is not one of the demo question templates")


def make_sample(rng: random.Random, kind: str | None = None) -> tuple[Image.Image, str, str]:
    """One (image, prompt, answer) drawn from `rng` (a `random.Random`); `kind` picks a question type."""
    image, questions = make_scene(rng, kind)
    prompt, answer = questions[0]
    return image, prompt, answer


def generate(n: int, seed: int) -> list[tuple[Image.Image, str, str]]:
    """`n` samples from a generator seeded with `seed` (same seed -> same samples)."""
    rng = random.Random(seed)
    return [make_sample(rng) for _ in range(n)]


def write_set(out_dir: str | Path, n: int, seed: int, *, jsonl_name: str = "data.jsonl") -> Path:
    """Write `n` samples drawn with `seed` as out_dir/<jsonl_name> + out_dir/images/NNNNN.png.

    JSONL rows are {"image": "images/00001.png", "prompt": ..., "answer": ...}, image paths relative to
    the JSONL file. Returns the JSONL path.
    """
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    jsonl_path = out_dir / jsonl_name
    with open(jsonl_path, "w") as f:
        for i, (image, prompt, answer) in enumerate(generate(n, seed), start=1):
            rel = f"images/{i:05d}.png"
            image.save(out_dir / rel, format="PNG", optimize=False)
            f.write(json.dumps({"image": rel, "prompt": prompt, "answer": answer}) + "\n")
    return jsonl_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a set of demo scenes with questions and answers.")
    parser.add_argument("--n", type=int, default=500, help="number of samples")
    parser.add_argument("--seed", type=int, default=7, help="random seed (same seed -> same files)")
    parser.add_argument("--out", required=True, help="output folder (data.jsonl + images/)")
    parser.add_argument("--jsonl-name", default="data.jsonl", help="name of the JSONL file in --out")
    args = parser.parse_args(argv)
    if args.n <= 0:
        parser.error("--n must be a positive number of samples")
    path = write_set(args.out, args.n, args.seed, jsonl_name=args.jsonl_name)
    print(f"wrote {args.n} samples to {path}")


if __name__ == "__main__":
    main()
