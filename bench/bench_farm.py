"""Farm time against the embedded run, and what a second worker gains.

    .venv/bin/python bench/bench_farm.py                 # Llama hidden 1024, MLP 2816, 4 blocks, 32 x ~256 tokens in 2048-token shards
    .venv/bin/python bench/bench_farm.py --hidden 256 --samples 8   # a quick check
    .venv/bin/python bench/bench_farm.py --skip single --shared-folder   # scaling without the S3 server's CPU
    .venv/bin/python bench/bench_farm.py --skip single two --shared-folder --partition-tokens 2048
    .venv/bin/python bench/bench_farm.py --skip single two --tlq-samples 128   # the usual calibration size
    .venv/bin/python bench/bench_farm.py --skip two tlq folder --checkpoint-dtype bfloat16   # as models are published
    .venv/bin/python bench/bench_farm.py --skip two tlq folder --cache-bytes 120m   # a cache below the block's set

Builds a Llama from a config (no download) and a calibration set of text rows, then times, one run each and
side by side, every command from its start to the downloaded export (the workers are started, and have
imported torch, before the clock starts; one torch thread in every process):

  1. the embedded run (`tlq-farm run`, a folder store, this machine's one process);
  2. the farm with 1 worker: Celery over a private redis-server, S3 on moto's server over loopback;
  3. the farm with 1 worker on a shared folder store (no S3);
  4. two jobs submitted together (W4 and W3 of the same model), on 1 and on 2 workers (S3);
  5. one GPTAQ + tlq job (the gradient pass, the fp chain) on 1 and on 2 workers (S3).

Prints a Markdown table (docs/benchmarks.md, section "Farm") with the ratios, and checks that every farm
export is the embedded run's bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

WORDS = "the a cat dog red blue green tree car house runs sits is on under near big small one two three".split()
CLI = str(Path(sys.executable).parent / "tlq-farm")


def make_model(root: Path, layers: int, hidden: int, intermediate: int, dtype: str = "float32") -> Path:
    """The Llama, its checkpoint in `dtype` (bfloat16: as published models are; the tasks compute in float32
    on a CPU either way)."""
    from tlq_farm.models.tiny import make_tiny

    heads = max(1, hidden // 64)
    path = make_tiny("llama", root / "model", seed=0, num_hidden_layers=layers, hidden_size=hidden,
                     intermediate_size=intermediate, num_attention_heads=heads, num_key_value_heads=max(1, heads // 4),
                     head_dim=hidden // heads)
    if dtype != "float32":
        import torch
        from safetensors.torch import load_file, save_file

        for f in path.glob("*.safetensors"):
            save_file({k: v.to(getattr(torch, dtype)) for k, v in load_file(f).items()}, f, metadata={"format": "pt"})
        config = json.loads((path / "config.json").read_text())
        config["torch_dtype"] = config["dtype"] = dtype
        (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def make_calib(root: Path, samples: int, words: int) -> Path:
    rows = []
    for i in range(samples):
        w = [WORDS[(i * 7 + j * 3 + j * j) % len(WORDS)] for j in range(words)]
        rows.append(json.dumps({"prompt": " ".join(w[: words // 2]), "answer": " ".join(w[words // 2:])}))
    path = root / "calib.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


def task_io(folder: Path) -> str:
    """S3 requests and bytes read by the job's tasks, and their cache hit rate (tlq_report.json's store_io;
    the coordinator's staging not counted)."""
    io = json.loads((folder / "tlq_report.json").read_text())["store_io"]
    return (f"{io['requests']} S3 requests by its tasks, {io['read_bytes'] / 1e6:.0f} MB read, "
            f"cache hit rate {io['cache_hit_rate']:.0%}")


def export_files(folder: Path) -> dict[str, bytes]:
    from test_farm_support import export_bytes

    return export_bytes(folder)


class Farm:
    """A private redis-server, moto's S3 server (its own process) and worker processes."""

    def __init__(self, root: Path, folder_store: Path, cache_bytes: str = ""):
        from test_farm_support import free_port

        from s3_server import DUMMY_ENVIRONMENT

        self.root = root
        redis_port, s3_port = free_port(), free_port()
        self.redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "no"],
                                      stdout=subprocess.DEVNULL)
        self.moto = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-p", str(s3_port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.broker = f"redis://127.0.0.1:{redis_port}/0"
        self.env = dict(os.environ, **DUMMY_ENVIRONMENT, TLQ_BROKER_URL=self.broker,
                        AWS_ENDPOINT_URL=f"http://127.0.0.1:{s3_port}", TLQ_TORCH_THREADS="1", OMP_NUM_THREADS="1",
                        PYTHONPATH=str(ROOT), TLQ_ALLOWED_STORES=f"s3://bench-farm,{folder_store}",
                        TLQ_CACHE_DIR=str(root / "cache"))
        if cache_bytes:
            self.env["TLQ_CACHE_BYTES"] = cache_bytes
        self.workers: list[subprocess.Popen] = []
        time.sleep(2)
        subprocess.run([sys.executable, "-c", "import boto3; boto3.client('s3').create_bucket(Bucket='bench-farm')"],
                       env=self.env, check=True)

    def scale(self, n: int) -> None:
        """Exactly n workers, started and settled (imports done) before returning."""
        while len(self.workers) > n:
            w = self.workers.pop()
            w.terminate()
            w.wait(30)
        while len(self.workers) < n:
            log = open(self.root / f"worker-{len(self.workers)}.log", "ab")
            self.workers.append(subprocess.Popen([CLI, "worker", "--loglevel", "WARNING"], env=self.env, cwd=ROOT,
                                                 stdout=log, stderr=subprocess.STDOUT))
        time.sleep(20)  # a worker imports torch and transformers and says hello before it takes tasks

    def timed(self, cmds: list[list[str]]) -> tuple[float, float]:
        """(wall seconds of the commands, CPU seconds the S3 server spent meanwhile on this machine's cores)."""
        before = cpu_seconds(self.moto.pid)
        wall = timed(cmds, self.env)
        return wall, cpu_seconds(self.moto.pid) - before

    def stop(self) -> None:
        self.scale(0)
        self.redis.terminate()
        self.moto.terminate()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a live process has used (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(cmds: list[list[str]], env: dict) -> float:
    """Wall seconds until every command (started together) has finished; each must succeed."""
    t = time.perf_counter()
    procs = [subprocess.Popen(c, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for c in cmds]
    for p, c in zip(procs, cmds):
        _, err = p.communicate()
        if p.returncode:
            raise RuntimeError(f"{' '.join(c)} failed:\n{err.decode()[-2000:]}")
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--tlq-samples", type=int, default=0,
                    help="calibration samples of the GPTAQ + tlq job (0: --samples); 128, the usual calibration "
                         "size, gives its blocks two statistics partitions at this width, where 32 gives one")
    ap.add_argument("--words", type=int, default=120, help="words per calibration row (about 2 tokens each)")
    ap.add_argument("--shard-tokens", type=int, default=2048,
                    help="calibration tokens per shard: several shards let workers split a block's data")
    ap.add_argument("--partition-tokens", type=int, default=0,
                    help="--partition-tokens of the GPTAQ + tlq job (0: the plan's choice, one partition per block at "
                         "this size; 2048: four, so that workers split each block's statistics)")
    ap.add_argument("--checkpoint-dtype", default="float32", choices=("float32", "bfloat16"),
                    help="the dtype the model's checkpoint is saved in (staged and moved through the store as is)")
    ap.add_argument("--cache-bytes", default="",
                    help="TLQ_CACHE_BYTES of the workers (unset: the cache grows to what the job's blocks read "
                         "again); below that figure the tasks download again what they read a moment before")
    ap.add_argument("--skip", nargs="*", default=[], help="scenarios to leave out: single, folder, two, tlq")
    ap.add_argument("--shared-folder", action="store_true",
                    help="run the two-worker scenarios (two, tlq) on the shared folder store instead of moto's S3: "
                         "on one machine the S3 server's own CPU competes with the workers for the same cores")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-farm-"))
    model = make_model(work, args.layers, args.hidden, args.intermediate, args.checkpoint_dtype)
    calib = make_calib(work, args.samples, args.words)
    folder_store = work / "shared-store"
    folder_store.mkdir()
    # --dtype float32: these workers are CPUs, and a farm's --dtype auto would compute a bf16 checkpoint in bf16.
    common = ["run", str(model), "--calib", str(calib), "--samples", str(args.samples), "--seq-len", "4096",
              "--shard-tokens", str(args.shard_tokens), "--quiet", "--create-store", "--dtype", "float32"]
    env1 = dict(os.environ, OMP_NUM_THREADS="1", TLQ_BROKER_URL="")
    rows: list[tuple[str, float, float | None, str]] = []

    def run(tag: str, extra: list[str], store: str, env: dict, broker: bool = False) -> list[str]:
        out = work / f"out-{tag}-{uuid.uuid4().hex[:6]}"
        cmd = [CLI, *common, *extra, "--store", store, "--out", str(out)] + (["--broker", farm.broker] if broker else [])
        return cmd, out

    farm = Farm(work, folder_store, args.cache_bytes)

    def scaling_store() -> str:
        return str(folder_store / uuid.uuid4().hex[:8]) if args.shared_folder else f"s3://bench-farm/{uuid.uuid4().hex[:8]}"

    where = "shared folder" if args.shared_folder else "S3"
    try:
        if "single" not in args.skip:
            cmd, ref = run("embedded", [], str(work / "embedded-store"), env1)
            embedded = timed([cmd], env1)
            rows.append(("embedded (folder store, one process)", embedded, None, "-"))
            farm.scale(1)
            cmd, out = run("s3-1", [], f"s3://bench-farm/{uuid.uuid4().hex[:8]}", farm.env, broker=True)
            t, moto = farm.timed([cmd])
            rows.append(("farm, 1 worker (Redis + moto S3 over loopback)", t, moto,
                         f"{t / embedded:.2f} x embedded; export {'equal' if export_files(out) == export_files(ref) else 'DIFFERS'}; "
                         f"{task_io(out)}"))
            if "folder" not in args.skip:
                cmd, out = run("folder-1", [], str(folder_store / uuid.uuid4().hex[:8]), farm.env, broker=True)
                t, _ = farm.timed([cmd])
                rows.append(("farm, 1 worker (Redis + a shared folder store)", t, None,
                             f"{t / embedded:.2f} x embedded; export {'equal' if export_files(out) == export_files(ref) else 'DIFFERS'}"))
        if "two" not in args.skip:
            found = {}
            for n in (1, 2):
                farm.scale(n)
                prefix = scaling_store()
                cmds = [run(f"two-{bits}", ["--bits", str(bits)], f"{prefix}-w{bits}", farm.env, broker=True)[0]
                        for bits in (4, 3)]
                found[n], moto = farm.timed(cmds)
                moto = None if args.shared_folder else moto
                rows.append((f"two jobs together (W4 and W3), {n} worker{'s' if n > 1 else ''}, {where}", found[n], moto,
                             "" if n == 1 else f"{found[1] / found[2]:.2f} x faster than 1 worker"))
        if "tlq" not in args.skip:
            found = {}
            for n in (1, 2):
                farm.scale(n)
                cmd, _ = run("tlq", ["--method", "gptaq", "--importance", "tlq",
                                     "--partition-tokens", str(args.partition_tokens)], scaling_store(), farm.env,
                             broker=True)
                if args.tlq_samples:  # its own rows: the other jobs' samples stay what they were
                    (work / "tlq").mkdir(exist_ok=True)
                    cmd[cmd.index("--calib") + 1] = str(make_calib(work / "tlq", args.tlq_samples, args.words))
                    cmd[cmd.index("--samples") + 1] = str(args.tlq_samples)
                found[n], moto = farm.timed([cmd])
                moto = None if args.shared_folder else moto
                parts = f", --partition-tokens {args.partition_tokens}" if args.partition_tokens else ""
                parts += f", {args.tlq_samples} samples" if args.tlq_samples else ""
                rows.append((f"one GPTAQ + tlq job{parts}, {n} worker{'s' if n > 1 else ''}, {where}", found[n], moto,
                             "" if n == 1 else f"{found[1] / found[2]:.2f} x faster than 1 worker"))
    finally:
        farm.stop()
    cpu = "?"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch

    print(f"Machine: {cpu}, {os.cpu_count()} cores; torch {torch.__version__}; one torch thread per process.")
    print(f"Job: Llama {args.layers} blocks, hidden {args.hidden}, MLP {args.intermediate}, {args.checkpoint_dtype} "
          f"checkpoint, GPTQ W4 g128, "
          f"{args.samples} samples of {args.words} words, {args.shard_tokens} tokens per shard.\n")
    print("| run | wall s | S3 server CPU s | ratio |\n|---|---:|---:|---|")
    for name, t, moto, note in rows:
        print(f"| {name} | {t:.1f} | {'-' if moto is None else f'{moto:.1f}'} | {note} |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
