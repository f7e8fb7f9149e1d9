"""Submodule outputs kept between a block's forwards (tlq_farm.reuse): served only where they are the numbers
a recomputation gives, so that a job's export is the same bytes with them and without."""

import pytest
import torch
from torch import nn

from tlq_farm import steps
from tlq_farm.reuse import ForwardReuse, _spill_output, _tensors, final_modules, tail_linears
from tlq_farm.staging import stage_job
from tlq_farm.store import LocalStore

from test_farm_support import export_bytes, job_spec, make_job_files

torch.set_num_threads(1)
pytestmark = pytest.mark.timeout(300)


class Counted(nn.Linear):
    """A linear that counts the times it computes (a served output is not computed)."""

    def forward(self, x):
        self.computed += 1
        return super().forward(x)


class Attn(nn.Module):
    def __init__(self, inplace: bool):
        super().__init__()
        self.a1, self.a2, self.inplace = Counted(8, 8), Counted(8, 8), inplace

    def forward(self, x):
        h = self.a1(x)
        if self.inplace:
            h.mul_(0.5)
        return self.a2(torch.tanh(h))


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.m1, self.m2 = Counted(8, 16), Counted(16, 8)
        self.returns = "output"  # or "tuple", or "edited" (m2's output changed in place)

    def forward(self, x):
        y = self.m2(torch.relu(self.m1(x)))
        if self.returns == "tuple":
            return y, None
        if self.returns == "edited":
            y.mul_(2)
        return y


class Toy(nn.Module):
    """attn (a1 -> a2) then mlp (m1 -> m2), a residual around each; `inplace`: attn edits a1's output."""

    def __init__(self, inplace: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.attn, self.mlp = Attn(inplace), Mlp()
        for m in self.modules():
            m.computed = 0

    @property
    def calls(self) -> dict[str, int]:
        return {n: self.get_submodule(n).computed for n in ("attn.a1", "attn.a2", "mlp.m1", "mlp.m2")}

    def forward(self, x):
        x = x + self.attn(x)
        y = self.mlp(x)
        return x + (y[0] if isinstance(y, tuple) else y)


GROUPS = [["attn.a1"], ["attn.a2"], ["mlp.m1"], ["mlp.m2"]]


def test_final_modules_are_those_whose_linears_are_all_in_earlier_groups():
    toy = Toy()
    assert final_modules(toy, GROUPS, 0) == []
    assert final_modules(toy, GROUPS, 1) == ["attn.a1"]
    assert final_modules(toy, GROUPS, 2) == ["attn", "attn.a1", "attn.a2"]
    assert final_modules(toy, GROUPS, 4) == ["attn", "attn.a1", "attn.a2", "mlp", "mlp.m1", "mlp.m2"]


def stages(toy: Toy, reuse: ForwardReuse, x: torch.Tensor, tails: bool = False, look=None) -> list[torch.Tensor]:
    """One forward per stage (as a true-sequential block runs), each under its stage's final modules;
    look(stage, reuse) after each."""
    outs = []
    for g in range(len(GROUPS) + 1):
        with torch.no_grad(), reuse.stage(toy, ("job", 0, "q"), final_modules(toy, GROUPS, g),
                                          keep=g < len(GROUPS),
                                          tails=tail_linears(toy, GROUPS, g) if tails else None) as handle:
            handle.key = (0, 0)
            outs.append(toy(x))
        if look:
            look(g, reuse)
    return outs


def test_tail_linears_are_the_last_linear_of_their_parent_to_be_quantized():
    toy = Toy()
    assert [tail_linears(toy, GROUPS, g) for g in range(5)] == [{}, {"attn.a2": "attn"}, {}, {"mlp.m2": "mlp"}, {}]
    assert tail_linears(toy, [["attn.a1", "attn.a2"], ["mlp.m1", "mlp.m2"]], 1) == {}  # m1 not done before


def test_a_tail_input_stands_for_its_parent_and_changes_no_number():
    x = torch.randn(3, 8)
    expected = stages(Toy(), ForwardReuse(0), x)
    toy, reuse, kept = Toy(), ForwardReuse(1 << 20), {}

    def look(g, r):
        kept[g] = {k[2]: type(e.output).__name__ for k, e in r.entries.items()}

    got = stages(toy, reuse, x, tails=True, look=look)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    # After stage 1 attn is held as a2's input (a1's output dropped); after stage 3 mlp as m2's input.
    assert kept[1] == {"attn": "_TailInput"}
    assert kept[3] == {"attn": "Tensor", "mlp": "_TailInput"}
    assert reuse.tails == 2
    # The propagate computed m2 from the kept input, not m1.
    assert toy.get_submodule("mlp.m1").computed == 4 + 1  # stages 0-3, and the one-token probe


@pytest.mark.parametrize("returns", ["tuple", "edited"])
def test_a_parent_that_does_not_return_its_linear_output_as_it_is_keeps_no_tail(returns):
    x = torch.randn(3, 8)
    plain = Toy()
    plain.mlp.returns = returns
    expected = stages(plain, ForwardReuse(0), x)
    toy, reuse = Toy(), ForwardReuse(1 << 20)
    toy.mlp.returns = returns
    got = stages(toy, reuse, x, tails=True)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert reuse.tails == 1  # attn's only
    # Every module is itself again: no forward of an instance's own, no hook left.
    assert all("forward" not in m.__dict__ and not m._forward_pre_hooks and not m._forward_hooks
               for m in toy.modules())


def test_served_outputs_skip_the_linears_and_change_no_number():
    x = torch.randn(3, 8)
    plain = Toy()
    expected = stages(plain, ForwardReuse(0), x)
    assert plain.calls == {n: 5 for n in plain.calls}
    toy, reuse, kept = Toy(), ForwardReuse(1 << 20), {}
    got = stages(toy, reuse, x, look=lambda g, r: kept.__setitem__(g, sorted(k[2] for k in r.entries)))
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    # a1 once (stage 1, kept); a2 at stages 0-2 (attn kept at 2, serving a1 inside it); mlp's linears
    # until they are final (m1 kept at stage 3, served at 4).
    assert toy.calls == {"attn.a1": 2, "attn.a2": 3, "mlp.m1": 4, "mlp.m2": 5}
    assert reuse.hits == 4 and "attn" not in toy.__dict__
    # What a module's kept output subsumes is dropped; the last stage, which keeps nothing, drops what it serves.
    assert kept == {0: [], 1: ["attn.a1"], 2: ["attn"], 3: ["attn", "mlp.m1"], 4: []} and reuse.nbytes == 0


def test_an_output_edited_in_place_is_computed_again():
    x = torch.randn(3, 8)
    expected = stages(Toy(inplace=True), ForwardReuse(0), x)
    toy, reuse = Toy(inplace=True), ForwardReuse(1 << 20)
    got = stages(toy, reuse, x)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    # Kept at stages 1 and 2 and edited after each time: never served (served, it would be halved twice).
    assert toy.calls["attn.a1"] == 3 and reuse.hits == 3  # attn at stages 3 and 4, m1 at 4


def test_a_full_budget_keeps_nothing_more_and_changes_no_number():
    x = torch.randn(3, 8)
    expected = stages(Toy(), ForwardReuse(0), x)
    reuse = ForwardReuse(3 * 8 * 4)  # room for one [3, 8] float32 output
    got = stages(Toy(), reuse, x)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert reuse.refused > 0 and reuse.nbytes <= reuse.max_bytes


def file_mappings() -> list[tuple[int, int, str]]:
    """(start, end, path) of this process's mappings of kept-output files."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and "tlq-kept-" in parts[5]:
                start, end = (int(a, 16) for a in parts[0].split("-"))
                out.append((start, end, parts[5].strip()))
    return out


@pytest.fixture
def kept_dir(tmp_path, monkeypatch):
    """The temporary directory that kept outputs are spilled to."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def run_spilled(look) -> ForwardReuse:
    """The toy's stages with every kept output spilled to a file (look(stage, reuse) after each), checked to
    give the numbers of a run that keeps nothing; returns the run's ForwardReuse."""
    x = torch.randn(3, 8)
    expected = stages(Toy(), ForwardReuse(0), x)
    reuse = ForwardReuse(1 << 20, spill_from=0)
    got = stages(Toy(), reuse, x, tails=True, look=look)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    return reuse


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"), reason="needs /proc/self/maps")
def test_kept_outputs_live_in_unlinked_files_and_change_no_number(kept_dir):
    seen = {}

    def look(g, r):
        tensors = [t for e in r.entries.values() for t in _tensors(e.output)]
        maps = file_mappings()
        seen[g] = (len(tensors), all(any(a <= t.data_ptr() < b and p.endswith("(deleted)") for a, b, p in maps)
                                     for t in tensors))
        assert list(kept_dir.iterdir()) == []  # unlinked as soon as mapped

    reuse = run_spilled(look)
    assert seen[1] == (1, True) and seen[3] == (2, True)  # attn as a2's input; then attn, mlp as m2's input
    # The last stage served and dropped them: their files are no longer mapped.
    assert not reuse.entries and reuse.nbytes == 0
    assert not [m for m in file_mappings() if str(kept_dir) in m[2]]


def kept_resident_kib() -> dict[int, int]:
    """Start address -> resident KiB of each mapping of a kept-output file (/proc/self/smaps)."""
    out, start = {}, None
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if "-" in parts[0] and len(parts) >= 5 and ":" in parts[3]:  # a mapping's header line
                start = int(parts[0].split("-")[0], 16) if len(parts) == 6 and "tlq-kept-" in parts[5] else None
            elif start is not None and parts[0] == "Rss:":
                out[start] = int(parts[1])
    return out


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/smaps"), reason="needs /proc/self/smaps")
def test_a_served_kept_output_leaves_memory_when_its_batch_ends(kept_dir):
    resident, hits = {}, {}

    def look(g, r):
        starts = [t.untyped_storage().data_ptr() for e in r.entries.values() for t in _tensors(e.output)]
        rss = kept_resident_kib()
        resident[g], hits[g] = sorted(rss.get(a, -1) for a in starts), r.hits

    run_spilled(look)
    # Stage 3 served attn (kept at stage 2) and read its page; once the batch's forward ended, no kept
    # output of the block is resident, and the next stage is served the same numbers from the file.
    assert hits[3] > hits[2] and resident[3] == [0, 0] and resident[2] == [0]


def test_kept_outputs_stay_in_memory_where_no_file_can_be_written(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    x = torch.randn(3, 8)
    expected = stages(Toy(), ForwardReuse(0), x)
    reuse = ForwardReuse(1 << 20, spill_from=0)
    got = stages(Toy(), reuse, x, tails=True)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert reuse.hits > 0 and reuse.tails == 2


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_job_files(tmp_path_factory.mktemp("reuse"))


@pytest.mark.parametrize("quant", [dict(), dict(method="gptaq", importance="vlmq")], ids=["gptq", "gptaq-vlmq"])
def test_a_job_exports_the_same_bytes_with_and_without_kept_outputs(files, tmp_path, monkeypatch, quant):
    from tlq_farm.jobs import download_export

    spec = job_spec(*files, **quant)
    found = {}
    # With the budget, every kept tensor goes through a file (spill_from 0: the test model's are small).
    monkeypatch.setattr(steps.REUSE, "spill_from", 0)
    for budget in (0, 1 << 30):
        monkeypatch.setattr(steps.REUSE, "max_bytes", budget)
        store = LocalStore(tmp_path / f"store-{budget}")
        job, _ = stage_job(store, spec)
        tails = steps.REUSE.tails
        assert steps.run_embedded(store, job)
        download_export(store, job, tmp_path / f"out-{budget}")
        found[budget] = export_bytes(tmp_path / f"out-{budget}")
        records = steps.task_records(store, job)
        reused = sum(r.get("reused_outputs", 0) for r in records)
        assert (reused > 0) == (budget > 0)
        if budget:
            assert steps.REUSE.tails > tails  # MLPs held as down_proj's input
        stats = [r for r in records if r["kind"] in ("stats", "quantize") and "-g00" not in r["task"]]
        assert stats and all("reused_outputs" in r for r in stats)
    assert found[0] == found[1 << 30]
    assert not steps.REUSE.entries  # each shard's entries go with its propagate


def test_a_spilled_output_keeps_its_structure():
    from collections import namedtuple

    Pair = namedtuple("Pair", "out extra")
    x, y = torch.randn(3, 8), torch.randn(2)
    for output in (x, (x, None), [x, y], Pair(x, None)):
        got = _spill_output(output, 0)
        assert type(got) is type(output)
        pairs = [(got, output)] if torch.is_tensor(output) else list(zip(got, output))
        assert all(a is None is b or (torch.equal(a, b) and a.data_ptr() != b.data_ptr()) for a, b in pairs)
