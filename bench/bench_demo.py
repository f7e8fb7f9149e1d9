"""The demo (`tlq-farm run` with no arguments), as a user runs it, paired with another version of the code.

    .venv/bin/python bench/bench_demo.py [--against TREE] [--pairs 3]

TREE is another checkout of tlq-farm (e.g. `git worktree add /tmp/base <commit>`), run with this venv by
putting it first on PYTHONPATH. The runs alternate (this tree, TREE, this tree, ...), each in a fresh folder:

- the whole command, `python -m coordinator.cli run --quiet`: user + sys CPU seconds of the process;
- the run after the imports: a process that first imports what any run imports (the CLI, transformers'
  Qwen2-VL model and processor code, compressed-tensors) and then calls the CLI's `run`, timing only the call.
  On a shared machine the imports vary from day to day more than the run does.

Prints each pair and the ratio (this tree / TREE); the export bytes of the two must be the same.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

AFTER_IMPORTS = """
import sys, time
import coordinator.cli as cli
import compressed_tensors, compressed_tensors.compressors
import transformers.models.qwen2_vl.modeling_qwen2_vl, transformers.models.qwen2_vl.processing_qwen2_vl
from transformers import AutoModelForImageTextToText, AutoProcessor
t = time.process_time()
cli.main(["run", "--quiet"], standalone_mode=False)
print("AFTER_IMPORTS", time.process_time() - t)
"""


def run(tree: Path, code: str | None) -> tuple[float, str]:
    """(CPU seconds, sha256 of the export's model.safetensors) of one demo run with `tree` first on the path:
    the whole process's user + sys, or with `code` the figure it prints."""
    with tempfile.TemporaryDirectory(prefix="tlq-bench-demo-") as folder:
        env = dict(os.environ, PYTHONPATH=str(tree))
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        args = [sys.executable, "-c", code] if code else [sys.executable, "-m", "coordinator.cli", "run", "--quiet"]
        out = subprocess.run(args, cwd=folder, env=env, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"the demo failed with {tree} first on the path:\n{out.stderr[-2000:]}")
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        if code:
            cpu = float(next(line.split()[1] for line in out.stdout.splitlines() if line.startswith("AFTER_IMPORTS")))
        (model,) = Path(folder).glob("tlq-runs/model-*/model.safetensors")
        return cpu, hashlib.sha256(model.read_bytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", type=Path, help="another tlq-farm checkout to pair with")
    parser.add_argument("--pairs", type=int, default=3)
    args = parser.parse_args()
    trees = [ROOT] + ([args.against.resolve()] if args.against else [])
    run(ROOT, None)  # page cache warm, as after installation
    for label, code in (("whole command", None), ("after the imports", AFTER_IMPORTS)):
        rows = []
        for i in range(args.pairs):
            rows.append([run(tree, code) for tree in trees])
        print(f"{label}: CPU s, this tree" + (f" vs {args.against}" if args.against else ""))
        for i, row in enumerate(rows, 1):
            cpus = [cpu for cpu, _ in row]
            line = f"  {i}: " + "  ".join(f"{c:.2f}" for c in cpus)
            if len(row) == 2:
                line += f"  ratio {cpus[0] / cpus[1]:.3f}"
                if row[0][1] != row[1][1]:
                    line += "  (the exports differ)"
            print(line)
        medians = [statistics.median(row[j][0] for row in rows) for j in range(len(trees))]
        print("  median: " + "  ".join(f"{m:.2f}" for m in medians))


if __name__ == "__main__":
    main()
