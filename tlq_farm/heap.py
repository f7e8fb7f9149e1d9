"""The cyclic garbage collector and the objects a process keeps for its whole life.

Importing torch and transformers' model code makes some 670,000 objects (functions, classes, their
dicts) that live until the process exits. CPython's collector walks all older objects again each time
their number has grown by a quarter, so imports pay for repeated walks of what they have just made
(about 1 CPU s of the demo's 9), and every later full collection walks them once more. `long_lived`
pauses the collector while such objects are made and then moves every object alive to the permanent
generation (`gc.freeze`), which later collections skip. Use it around imports only: a calibration
tensor made inside would never be collected if it ended up in a reference cycle.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager


@contextmanager
def long_lived():
    """Run the block with the collector paused, then freeze what is alive (nested uses freeze once, at
    the outermost exit)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.freeze()
            gc.enable()
