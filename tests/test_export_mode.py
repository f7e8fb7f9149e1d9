"""Exported files get the usual modes from the umask (0666 / 0777 & ~umask), on every export path: a
serving account must be able to read an export whenever the umask lets it."""

import os
import stat

import pytest
import torch
from click.testing import CliRunner

from coordinator.cli import main
from tlq_farm.store import LocalStore

from test_farm_support import make_job_files

torch.set_num_threads(1)
pytestmark = pytest.mark.timeout(300)

COMMON = ["--group-size", "32", "--samples", "6", "--seq-len", "512", "--shard-tokens", "45", "--method", "rtn",
          "--quiet"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_job_files(tmp_path_factory.mktemp("export-mode"))


class umask:
    """Set the process umask for a block and restore it after."""

    def __init__(self, mask: int):
        self.mask = mask

    def __enter__(self):
        self.old = os.umask(self.mask)

    def __exit__(self, *exc):
        os.umask(self.old)


def modes(folder):
    """(mode of the folder, {relative path: mode} of everything under it)."""
    return (stat.S_IMODE(folder.stat().st_mode),
            {p.relative_to(folder).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*")})


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)],
                         ids=["umask-022", "umask-077"])
def test_embedded_and_in_memory_exports_follow_the_umask(files, tmp_path, mask, file_mode, dir_mode):
    model, calib = files
    args = ["run", str(model), "--calib", str(calib)] + COMMON
    runner = CliRunner()
    (tmp_path / "store").mkdir()
    with umask(mask):
        farm = runner.invoke(main, args + ["--store", str(tmp_path / "store"), "--out", str(tmp_path / "farm")],
                             env={"TLQ_BROKER_URL": ""})
        memory = runner.invoke(main, args + ["--in-memory", "--out", str(tmp_path / "memory")])
    assert farm.exit_code == 0, farm.output
    assert memory.exit_code == 0, memory.output
    for out in (tmp_path / "farm", tmp_path / "memory"):
        folder_mode, inside = modes(out)
        assert folder_mode == dir_mode, out
        assert "model.safetensors" in inside and "tlq_report.json" in inside and "config.json" in inside
        wrong = {name: oct(m) for name, m in inside.items() if m != (dir_mode if (out / name).is_dir() else file_mode)}
        assert wrong == {}, out


def test_get_file_writes_the_umask_mode_and_replaces_a_file_of_another_mode(tmp_path):
    store = LocalStore(tmp_path / "store")
    store.put_bytes("a/b.bin", b"payload")
    target = tmp_path / "out" / "b.bin"
    target.parent.mkdir()
    target.write_bytes(b"old")
    target.chmod(0o600)
    with umask(0o027):
        store.get_file("a/b.bin", target)
        store.get_file("a/b.bin", tmp_path / "new" / "deeper" / "b.bin")
    assert target.read_bytes() == b"payload"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "new" / "deeper" / "b.bin").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "new" / "deeper").stat().st_mode) == 0o750
