"""The demo VLM shipped with tlq-farm (a tiny Qwen2-VL trained on drawn scenes) and its calibration set.

DEMO_MODEL_DIR loads with AutoProcessor / AutoModelForImageTextToText; DEMO_CALIB_JSONL holds
{"image", "prompt", "answer"} rows with image paths relative to it.
"""

from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent
DEMO_MODEL_DIR = DEMO_DIR / "model"
DEMO_CALIB_DIR = DEMO_DIR / "calib"
DEMO_CALIB_JSONL = DEMO_CALIB_DIR / "calib.jsonl"

__all__ = ["DEMO_MODEL_DIR", "DEMO_CALIB_DIR", "DEMO_CALIB_JSONL"]
