"""tlq-farm against llm-compressor on the same GPTQ job: CPU time, wall time, peak memory, and quality.

    .venv/bin/python bench/bench_peer.py --arch llama --samples 16            # --repeats 2, --seq-len 256
    .venv/bin/python bench/bench_peer.py --arch qwen2 --samples 64 --json /tmp/peer.json
    .venv/bin/python bench/bench_peer.py --layers 2 --samples 4 --repeats 1   # a quick end-to-end check
    .venv/bin/python bench/bench_peer.py --tlq-args=--no-true-sequential      # llm-compressor's own schedule

What it does:

1. Sets up llm-compressor in a virtual environment of its own (bench/.peer-venv), never in the project's:
   torch 2.14.1 first (from this machine's disk), then llmcompressor. Skipped when that venv already works.
2. Builds a Llama or Qwen2 model from a transformers config (hidden 1024, MLP 2816, 16 heads, 4 KV heads,
   vocab 1000, seeded random weights, std 0.02) with a word-level tokenizer, saved with save_pretrained.
3. Writes calibration rows (JSONL) that encode to exactly --seq-len tokens through the chat template, takes
   the token ids tlq-farm encodes from them, and hands llm-compressor those very ids as a tokenized
   datasets.Dataset. The ids each tool actually used are read back and compared (mismatches must be 0).
4. Runs the two tools interleaved (A B A B ...), each in a process of its own with one torch thread,
   W4A16, group 128, symmetric, GPTQ, no act-order, damp 0.01, lm_head and embeddings in full precision.
   Each process is measured from its start to its exit (imports, loading, calibration, export):
   user + sys CPU seconds (os.wait4), wall seconds, peak RSS.
5. Scores the full-precision model and every export on held-out sequences (not in the calibration set):
   mean KL(FP || quantized) of the next-token distributions over all positions, NLL of the next token,
   and top-1 agreement with FP.
6. Prints one markdown table per run and a summary of medians with the ratios tlq-farm / llm-compressor.

This file also runs inside the llm-compressor venv (--llmc-child), so its top-level imports are the
standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEER_VENV = ROOT / "bench" / ".peer-venv"
TORCH_PINS = ("torch==2.14.1", "torchvision==0.29.1")
# The packages that must keep the versions above whatever llmcompressor's metadata asks for.
PINNED = {"torch", "torchvision"}
TOOLS = ("tlq-farm", "llm-compressor")
SIZES = dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=4,
             head_dim=64)
VOCAB = 1000
N_WORDS = 256  # the qwen2 byte-level tokenizer takes about 3.6 tokens per word: ~930 of the 1000 ids
HELD_OUT = 32
# Every child computes with one thread, whatever it reads first.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TLQ_TORCH_THREADS": "1",
              "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
# tlq-farm's CLI behind torch.set_num_threads(1), so the thread count does not depend on the environment.
TLQ_LAUNCH = ("import sys, torch; torch.set_num_threads(1); from coordinator.cli import main; "
              "sys.argv[0] = 'tlq-farm'; main()")


def fail(message: str, code: int = 2) -> None:
    print(f"bench_peer: {message}", file=sys.stderr)
    sys.exit(code)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------- peer venv

def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def peer_versions(venv: Path) -> dict | None:
    """{'llmcompressor', 'torch', 'transformers', 'compressed_tensors'} versions, or None when the venv
    does not import them or holds another torch than the pinned one."""
    if not venv_python(venv).is_file():
        return None
    probe = ("import json, torch, transformers, compressed_tensors, llmcompressor; "
             "from llmcompressor import oneshot; from llmcompressor.modifiers.quantization import GPTQModifier; "
             "print(json.dumps({'llmcompressor': llmcompressor.__version__, 'torch': torch.__version__, "
             "'transformers': transformers.__version__, 'compressed_tensors': compressed_tensors.__version__}))")
    done = subprocess.run([str(venv_python(venv)), "-c", probe], capture_output=True, text=True,
                          env=dict(os.environ, **ONE_THREAD))
    if done.returncode != 0:
        return None
    versions = json.loads(done.stdout.strip().splitlines()[-1])
    return versions if versions["torch"].split("+")[0] == TORCH_PINS[0].split("==")[1] else None


def last_error_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("WARNING: Location")]
    errors = [ln for ln in lines if "error" in ln.lower()]
    return (errors or lines or ["no output"])[-1][:300]


def pip(venv: Path, *args: str, what: str) -> None:
    cmd = [str(venv_python(venv)), "-m", "pip", "install", "-q", "--disable-pip-version-check", *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        fail(f"llm-compressor setup failed installing {what} into {venv}: {last_error_line(done.stderr)}; "
             f"fix that (network, pip, disk) and rerun, or `rm -r {venv}` to start over")


def requirements(venv: Path) -> list[str]:
    """llmcompressor's install requirements without extras and without the pinned packages."""
    probe = "import json, importlib.metadata as m; print(json.dumps(m.requires('llmcompressor') or []))"
    done = subprocess.run([str(venv_python(venv)), "-c", probe], capture_output=True, text=True, check=True)
    keep = []
    for req in json.loads(done.stdout):
        name = re.match(r"[A-Za-z0-9._-]+", req).group(0).lower()
        if "extra ==" not in req and name not in PINNED:
            keep.append(req)
    return keep


def setup_peer(venv: Path, version: str | None) -> dict:
    """The llm-compressor venv's versions, setting it up first where it does not work yet."""
    versions = peer_versions(venv)
    if versions and version in (None, versions["llmcompressor"]):
        return versions
    say(f"setting up llm-compressor in {venv} (once; a few minutes)")
    if not venv_python(venv).is_file():
        done = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True)
        if done.returncode != 0:
            fail(f"cannot create the venv {venv}: {last_error_line(done.stderr)}; check that python3 -m venv works")
    pip(venv, *TORCH_PINS, what=" ".join(TORCH_PINS))
    # llmcompressor's metadata caps torch below 2.14.1 (0.14.0.1 asks torch<=2.14.0), so pip would fetch
    # another torch: the package goes in without its dependencies, and those come next with torch held.
    package = f"llmcompressor=={version}" if version else "llmcompressor"
    pip(venv, "--no-deps", package, what=package)
    held = venv / "torch-held.txt"
    held.write_text("\n".join(TORCH_PINS) + "\n")
    pip(venv, "-c", str(held), *requirements(venv), what="llmcompressor's dependencies (torch held at 2.14.1)")
    versions = peer_versions(venv)
    if not versions:
        fail(f"llm-compressor installed into {venv} but does not import with torch 2.14.1; "
             f"run `{venv_python(venv)} -c 'import llmcompressor'` to see why, or `rm -r {venv}` and rerun")
    return versions


# ------------------------------------------------------------------------------------------- model, text

def vocabulary(n: int, seed: int) -> list[str]:
    """n distinct made-up words of one to three syllables: letters only, so each is one token."""
    import random

    rng = random.Random(seed)
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choice(syllables) for _ in range(rng.choice((1, 2, 2, 3)))))
    return sorted(words)


def build_model(arch: str, folder: Path, layers: int, words: list[str], seed: int) -> Path:
    """A seeded random model of `arch` from its config (no download) and its tokenizer, saved in `folder`."""
    import torch
    from transformers import AutoModelForCausalLM

    from tlq_farm.models.tiny import build_tokenizer, tiny_config

    tokenizer = build_tokenizer(words, arch=arch)
    if len(tokenizer) > VOCAB:
        fail(f"the {arch} tokenizer has {len(tokenizer)} tokens, more than the vocab of {VOCAB}: lower N_WORDS")
    config = tiny_config(arch, VOCAB, tokenizer=tokenizer, num_hidden_layers=layers, **SIZES)
    torch.manual_seed(seed)
    # transformers' init draws every linear and the embeddings from N(0, 0.02): the next-token
    # distributions are far from uniform (entropy ~6.7 nats of 6.9), and the blocks dominate the residual.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if folder.exists():
        shutil.rmtree(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def successors(words: list[str], seed: int) -> dict[str, list[str]]:
    """Each word's four likely next words, so that the text has some structure for attention to find."""
    import random

    rng = random.Random(seed)
    return {w: rng.sample(words, 4) for w in words}


def word_chain(words: list[str], table: dict[str, list[str]], n: int, rng) -> list[str]:
    """n words of a first-order chain: mostly a likely successor, one step in eight anywhere."""
    out = [rng.choice(words)]
    while len(out) < n:
        nxt = table[out[-1]]
        out.append(rng.choice(words) if rng.random() < 0.125 else rng.choices(nxt, weights=(8, 4, 2, 1))[0])
    return out


def template_overhead(tokenizer, word: str) -> int:
    """Tokens the chat template adds to a one-word prompt and a one-word answer."""
    from tlq_farm.calib.encode import encode_example

    return int(encode_example(tokenizer, [], word, word)["input_ids"].shape[1]) - 2


def text_rows(words: list[str], n_rows: int, n_words: int, seed: int) -> list[dict]:
    """n_rows {"prompt", "answer"} rows of n_words words in all (three quarters prompt)."""
    import random

    rng = random.Random(seed)
    table = successors(words, 0)
    rows = []
    for _ in range(n_rows):
        chain = word_chain(words, table, n_words, rng)
        cut = n_words * 3 // 4
        rows.append({"prompt": " ".join(chain[:cut]), "answer": " ".join(chain[cut:])})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def calibration_ids(model_dir: Path, calib: Path, samples: int, seq_len: int, seed: int) -> list[list[int]]:
    """The token ids tlq-farm encodes from `calib`: the CLI's own loader, samples, sequence length and seed."""
    from tlq_farm.spec import JobSpec, QuantSpec
    from tlq_farm.staging import encode_calibration

    spec = JobSpec(model=str(model_dir), calib=str(calib), quant=QuantSpec(), samples=samples, seq_len=seq_len,
                   seed=seed)
    found = encode_calibration(spec)
    ids = [s["input_ids"][0].tolist() for s in found.samples]
    wrong = sorted({len(s) for s in ids if len(s) != seq_len})
    if len(ids) != samples or wrong:
        fail(f"calibration encodes to {len(ids)} samples with lengths {wrong or [seq_len]}, not {samples} x "
             f"{seq_len}: the template overhead estimate is off for this tokenizer")
    return ids


def held_out_ids(tokenizer, rows: list[dict], seq_len: int) -> list[list[int]]:
    from tlq_farm.calib.encode import encode_example

    ids = [encode_example(tokenizer, [], r["prompt"], r["answer"])["input_ids"][0].tolist() for r in rows]
    if any(len(s) != seq_len for s in ids):
        fail(f"held-out rows encode to lengths {sorted({len(s) for s in ids})}, not {seq_len}")
    return ids


def mismatches(a: list[list[int]], b: list[list[int]]) -> int:
    """Token ids that differ between two sets of sequences, order of the sequences aside (a tool may
    visit them in another order); a missing or extra sequence counts all its ids."""
    a, b = sorted(map(tuple, a)), sorted(map(tuple, b))
    n = sum(sum(x != y for x, y in zip(s, t)) + abs(len(s) - len(t)) for s, t in zip(a, b))
    return n + sum(len(s) for s in a[len(b):]) + sum(len(t) for t in b[len(a):])


# ------------------------------------------------------------------------------------------- measuring

def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    kids = [int(k) for k in f.read().split()]
                found += kids
                todo += kids
        except OSError:
            continue
    return found


def status_kib(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class PeakWatch:
    """The largest VmHWM of a process tree, read every 50 ms. tlq-farm resets its own high-water mark at
    each task (to measure the task), so the kernel's ru_maxrss at exit is only the last task's mark."""

    def __init__(self, pid: int):
        self.pid, self.peak_kib = pid, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.05):
            for p in [self.pid, *descendants(self.pid)]:
                self.peak_kib = max(self.peak_kib, status_kib(p, "VmHWM"))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak_kib


def measured(cmd: list[str], env: dict, log: Path) -> dict:
    """Run `cmd` to its end -> {rc, user_s, sys_s, cpu_s, wall_s, peak_rss_mib} of that process (and the
    processes it waited for)."""
    with open(log, "w") as out:
        start = time.perf_counter()
        child = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        watch = PeakWatch(child.pid)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)  # already reaped: Popen must not wait again
    peak_kib = max(watch.stop(), usage.ru_maxrss)  # ru_maxrss is in KiB on Linux
    return {"rc": child.returncode, "user_s": usage.ru_utime, "sys_s": usage.ru_stime,
            "cpu_s": usage.ru_utime + usage.ru_stime, "wall_s": wall, "peak_rss_mib": peak_kib / 1024}


def child_env(pythonpath: str | None = None) -> dict:
    env = dict(os.environ, **ONE_THREAD)
    env.pop("PYTHONPATH", None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return env


def run_tlq(model: Path, calib: Path, run_dir: Path, args) -> dict:
    cmd = [sys.executable, "-c", TLQ_LAUNCH, "run", str(model), "--calib", str(calib),
           "--samples", str(args.samples), "--seq-len", str(args.seq_len), "--seed", str(args.seed),
           "--bits", "4", "--group-size", "128", "--sym", "--method", "gptq", "--importance", "uniform",
           "--no-act-order", "--damp", "0.01", "--out", str(run_dir / "out"),
           # A fresh store per run: the same job in a used store would attach to the finished one.
           "--store", str(run_dir / "store"), "--create-store", "--quiet", *args.tlq_args.split()]
    # The checkout's code, not whatever the venv has installed.
    return measured(cmd, child_env(str(ROOT)), run_dir / "log.txt")


def tlq_used_ids(store: Path) -> list[list[int]]:
    """The input_ids tlq-farm staged for its job (what its tasks calibrated on)."""
    from tlq_farm.staging import list_jobs, load_manifest
    from tlq_farm.steps import samples_from_tensors
    from tlq_farm.store import LocalStore, keys
    from tlq_farm.store.tensors import get_tensors

    s = LocalStore(store, create=False)
    (job,) = list_jobs(s)
    shards = range(len(load_manifest(s, job)["shards"]))
    return [x["input_ids"][0].tolist() for k in shards
            for x in samples_from_tensors(get_tensors(s, keys.calib_shard(job, k)))]


def tlq_task_peak_mib(store: Path) -> float:
    """The largest peak RSS tlq-farm's task records hold: each task's own VmHWM, exact where the 50 ms
    watch may miss a short task's peak."""
    from tlq_farm import steps
    from tlq_farm.staging import list_jobs
    from tlq_farm.store import LocalStore

    s = LocalStore(store, create=False)
    (job,) = list_jobs(s)
    return max((float(r.get("peak_rss_mib") or 0.0) for r in steps.task_records(s, job)), default=0.0)


def run_llmc(model: Path, ids_file: Path, run_dir: Path, args, venv: Path) -> dict:
    spec = {"model": str(model), "ids": str(ids_file), "out": str(run_dir / "out"),
            "seen": str(run_dir / "seen_ids.json"), "samples": args.samples, "seq_len": args.seq_len}
    spec_file = write_jsonl(run_dir / "spec.json", [spec])
    cmd = [str(venv_python(venv)), str(Path(__file__).resolve()), "--llmc-child", str(spec_file)]
    return measured(cmd, child_env(), run_dir / "log.txt")


def llmc_child(spec_file: str) -> None:
    """Inside the llm-compressor venv: GPTQ W4A16 on the given token ids, the export saved compressed."""
    spec = json.loads(Path(spec_file).read_text())
    import torch

    torch.set_num_threads(1)
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = json.loads(Path(spec["ids"]).read_text())
    data = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(s) for s in ids]})
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    seen: dict[tuple, None] = {}

    def record(_module, inputs):
        # What reaches the embedding is what calibration used, after llm-compressor's collation. The
        # sequential pipeline embeds each sample twice (calibrate, then propagate): each is kept once.
        seen.update(dict.fromkeys(map(tuple, inputs[0].reshape(-1, inputs[0].shape[-1]).tolist())))

    hook = model.get_input_embeddings().register_forward_pre_hook(record)
    recipe = GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"], dampening_frac=0.01,
                          actorder=None, block_size=128)
    oneshot(model=model, tokenizer=tokenizer, dataset=data, recipe=recipe,
            num_calibration_samples=spec["samples"], max_seq_length=spec["seq_len"],
            shuffle_calibration_samples=False, batch_size=1)
    hook.remove()
    model.save_pretrained(spec["out"], save_compressed=True)
    tokenizer.save_pretrained(spec["out"])
    Path(spec["seen"]).write_text(json.dumps([list(s) for s in seen]))


# ------------------------------------------------------------------------------------------- quality

def load_export(path: Path):
    """A causal LM in float32; a compressed-tensors export dequantized at load, as plain linears."""
    import warnings

    import torch
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    config = json.loads((path / "config.json").read_text())
    extra = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if config.get(
        "quantization_config") else {}
    # transformers warns that the checkpoint's own quantization_config wins: it does, but for `dequantize`.
    warnings.filterwarnings("ignore", message="You passed `quantization_config`")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **extra).eval()


def logits_of(model, ids: list[list[int]], batch: int = 8):
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(ids), batch):
            x = torch.tensor(ids[i:i + batch])
            out.append(model(input_ids=x, attention_mask=torch.ones_like(x)).logits.float())
    return torch.cat(out)


def quality(logits, ref, ids: list[list[int]]) -> dict:
    """Mean KL(ref || logits) and top-1 agreement over all positions; NLL of the next token."""
    import torch

    from tlq_farm.evaluate import kl_divergence, token_nll

    v = logits.shape[-1]
    targets = torch.tensor(ids)[:, 1:].reshape(-1)
    out = {"nll": token_nll(logits[:, :-1].reshape(-1, v), targets).mean().item()}
    if ref is not None:
        out["kl"] = kl_divergence(ref.reshape(-1, v), logits.reshape(-1, v)).mean().item()
        out["top1"] = (ref.argmax(-1) == logits.argmax(-1)).double().mean().item()
    return out


def kept_in_full_precision(model, fp) -> bool:
    """Embeddings and lm_head equal to the full-precision model's."""
    import torch

    return all(torch.equal(getattr(model, f)().weight, getattr(fp, f)().weight)
               for f in ("get_input_embeddings", "get_output_embeddings"))


# ------------------------------------------------------------------------------------------- report

COLUMNS = (("cpu_s", "CPU s", "{:.1f}"), ("sys_s", "sys s", "{:.1f}"), ("wall_s", "wall s", "{:.1f}"),
           ("peak_rss_mib", "peak RSS MiB", "{:.0f}"), ("kl", "KL(FP‖Q)", "{:.5f}"), ("nll", "NLL", "{:.4f}"),
           ("top1", "top-1 agree", "{:.4f}"))


def table(rows: list[dict], first: str) -> str:
    head = f"| {first} | " + " | ".join(c[1] for c in COLUMNS) + " |"
    lines = [head, "|---|" + "---:|" * len(COLUMNS)]
    for r in rows:
        cells = [fmt.format(r[k]) if isinstance(r.get(k), (int, float)) else r.get(k, "") for k, _, fmt in COLUMNS]
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(rows: list[dict], fp: dict) -> str:
    med = {}
    for tool in TOOLS:
        mine = [r for r in rows if r["tool"] == tool]
        med[tool] = {k: statistics.median(r[k] for r in mine) for k, _, _ in COLUMNS}
        med[tool]["label"] = f"{tool} (median of {len(mine)})"
    a, b = med[TOOLS[0]], med[TOOLS[1]]
    ratio = {k: f"{a[k] / b[k]:.3f}" if b[k] else "" for k, _, _ in COLUMNS}
    ratio["label"] = "tlq-farm / llm-compressor"
    return table([a, b, ratio, dict(fp, label="full precision")], "tool")


# ------------------------------------------------------------------------------------------- main

def git_commit() -> str:
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True)
    return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def machine() -> str:
    names = re.findall(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    return f"{names[0] if names else 'unknown CPU'}, {os.cpu_count()} cores"


def prepare(args, work: Path) -> tuple[Path, Path, Path, list, list]:
    """Model, calibration JSONL, the calibration ids (as a file too) and the held-out ids."""
    from transformers import AutoTokenizer

    words = vocabulary(N_WORDS, args.seed)
    model = build_model(args.arch, work / "model", args.layers, words, args.seed)
    tokenizer = AutoTokenizer.from_pretrained(model)
    content = args.seq_len - template_overhead(tokenizer, words[0])
    calib = write_jsonl(work / "calib.jsonl", text_rows(words, args.samples, content, args.seed + 1))
    ids = calibration_ids(model, calib, args.samples, args.seq_len, args.seed)
    ids_file = work / "calib_ids.json"
    ids_file.write_text(json.dumps(ids))
    # Another seed of the same chain: rows that the calibration set does not hold.
    held = held_out_ids(tokenizer, text_rows(words, HELD_OUT, content, args.seed + 2), args.seq_len)
    return model, calib, ids_file, ids, held


def used_ids(tool: str, run_dir: Path) -> list[list[int]]:
    if tool == "tlq-farm":
        return tlq_used_ids(run_dir / "store")
    return json.loads((run_dir / "seen_ids.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=("llama", "qwen2"), default="llama")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "peer")
    ap.add_argument("--peer-venv", type=Path, default=PEER_VENV)
    ap.add_argument("--llmc-version", help="llmcompressor version to install (default: the newest)")
    ap.add_argument("--json", type=Path, help="write the raw rows here")
    ap.add_argument("--tlq-args", default="", help="more tlq-farm run options, e.g. '--no-true-sequential' (one "
                    "forward for all of a block's linears, as llm-compressor's sequential pipeline calibrates)")
    ap.add_argument("--llmc-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.llmc_child:
        return llmc_child(args.llmc_child)

    peer = setup_peer(args.peer_venv, args.llmc_version)
    sys.path.insert(0, str(ROOT))
    import torch
    import transformers

    torch.set_num_threads(1)
    transformers.utils.logging.disable_progress_bar()
    work = args.work / f"{args.arch}-L{args.layers}-n{args.samples}-s{args.seq_len}"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    model, calib, ids_file, ids, held = prepare(args, work)
    say(f"model {model}: {args.arch}, {args.layers} layers; calibration {len(ids)} x {args.seq_len} tokens")

    rows = []
    for rep in range(args.repeats):
        for tool in TOOLS:  # interleaved, so that a change in the machine's load hits both tools alike
            run_dir = work / "runs" / f"{tool}-{rep}"
            run_dir.mkdir(parents=True)
            say(f"run {rep + 1}/{args.repeats}: {tool}")
            m = (run_tlq(model, calib, run_dir, args) if tool == "tlq-farm"
                 else run_llmc(model, ids_file, run_dir, args, args.peer_venv))
            if m["rc"] != 0:
                log = (run_dir / "log.txt").read_text()
                fail(f"{tool} failed (exit {m['rc']}): {last_error_line(log)}; whole log: {run_dir / 'log.txt'}")
            m.update(tool=tool, repeat=rep, label=f"{tool} #{rep + 1}", id_mismatches=mismatches(ids, used_ids(
                tool, run_dir)))
            if tool == "tlq-farm":
                m["peak_rss_mib"] = max(m["peak_rss_mib"], tlq_task_peak_mib(run_dir / "store"))
            say(f"  {m['cpu_s']:.1f} CPU s, {m['wall_s']:.1f} wall s; token ids differing from tlq-farm's "
                f"encoding: {m['id_mismatches']}")
            shutil.rmtree(run_dir / "store", ignore_errors=True)  # activations and statistics: disk only
            rows.append(m)

    fp_model = load_export(model)
    ref = logits_of(fp_model, held)
    fp = quality(ref, None, held)
    for m in rows:
        q = load_export(work / "runs" / f"{m['tool']}-{m['repeat']}" / "out")
        m.update(quality(logits_of(q, held), ref, held), kept=kept_in_full_precision(q, fp_model))
        del q

    print(f"\nmachine: {machine()}; tlq-farm {git_commit()}; llmcompressor {peer['llmcompressor']} "
          f"(torch {peer['torch']}, transformers {peer['transformers']}, compressed-tensors "
          f"{peer['compressed_tensors']}); project venv torch {torch.__version__}, transformers "
          f"{transformers.__version__}")
    print(f"job: {args.arch}, {args.layers} layers, hidden 1024; W4A16 g128 sym GPTQ, damp 0.01; "
          f"{len(ids)} x {args.seq_len} calibration tokens; {HELD_OUT} x {args.seq_len} held-out"
          + (f"; tlq-farm also given {args.tlq_args}" if args.tlq_args else ""))
    print(f"token ids differing between the two tools' calibration inputs: "
          f"{max(m['id_mismatches'] for m in rows)}; embeddings and lm_head kept: "
          f"{all(m['kept'] for m in rows)}\n")
    for m in rows:
        print(table([m], "run") + "\n")
    print(summary(rows, fp))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "full_precision": fp, "llmc": peer, "args": {
            k: str(v) for k, v in vars(args).items()}}, indent=1))
    if any(m["id_mismatches"] for m in rows):
        fail("the two tools calibrated on different token ids", 1)


if __name__ == "__main__":
    main()
