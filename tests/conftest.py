import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """arch -> folder of a tiny random model built from its transformers config, saved once per session."""
    from tlq_farm.models.tiny import make_tiny

    root = tmp_path_factory.mktemp("tiny")
    cache: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in cache:
            cache[arch] = make_tiny(arch, root / arch, seed=0)
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def calib_jsonl(tmp_path_factory):
    """A small calibration set (JSONL + PNGs) that every architecture can read."""
    import json

    from tlq_farm.models.tiny import tiny_image

    root = tmp_path_factory.mktemp("calib")
    (root / "images").mkdir()
    prompts = ["what is in the picture", "describe the image", "which color is it", "count the shapes"]
    answers = ["a red circle", "two blue squares", "green", "three"]
    rows = []
    for i in range(8):
        tiny_image(i, 56).save(root / "images" / f"{i}.png")
        rows.append({"image": f"images/{i}.png", "prompt": prompts[i % 4], "answer": answers[i % 4]})
    path = root / "calib.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def first_block_inputs(model_dir, calib_path, n: int, *, vision: bool = False):
    """(blocks, encoded samples, block-0 sample inputs) of a model on n calibration samples; the decoder
    blocks, or with vision=True the vision tower's."""
    from tlq_farm import block as B
    from tlq_farm.calib.data import load_calibration, model_inputs
    from tlq_farm.models.adapter import find_layout, load_model

    model, proc = load_model(str(model_dir))
    layout = find_layout(model)
    blocks = layout.vision_block_list(model) if vision else layout.decoder_blocks(model)
    samples = load_calibration(calib_path, proc, samples=n, seq_len=512, seed=0).samples
    caps = [B.capture(model, blocks, model_inputs(s)) for s in samples]
    return blocks, samples, [(c.hidden, c.kwargs(0)) for c in caps]
