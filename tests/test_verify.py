"""`tlq-farm verify`: every committed object of a job checked against its marker, the corrupt ones deleted,
and the job brought back to the clean run's bytes by resume (or by staging again for staged inputs)."""

import json

import pytest
import torch
from click.testing import CliRunner
from s3_server import moto_s3, s3_store_factory  # noqa: F401  (fixtures)

from coordinator.cli import main
from tlq_farm.jobs import download_export
from tlq_farm import steps, verify
from tlq_farm.staging import stage_job
from tlq_farm.store import LocalStore, keys
from tlq_farm.verify import verify_job

from test_farm_support import export_bytes, job_spec, make_job_files

torch.set_num_threads(1)
pytestmark = pytest.mark.timeout(300)
NO_BROKER = {"TLQ_BROKER_URL": ""}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_job_files(tmp_path_factory.mktemp("verify"))


@pytest.fixture(scope="module")
def clean(files, tmp_path_factory):
    """quant name -> the checkpoint files of a clean embedded run (tlq_report.json left out: it holds timings)."""
    cache = {}

    def get(**quant):
        name = json.dumps(quant, sort_keys=True)
        if name not in cache:
            root = tmp_path_factory.mktemp("clean")
            store = LocalStore(root / "store")
            job, _ = stage_job(store, job_spec(*files, **quant))
            assert steps.run_embedded(store, job)
            download_export(store, job, root / "out")
            cache[name] = checkpoint(root / "out")
        return cache[name]

    return get


def checkpoint(folder):
    return {name: data for name, data in export_bytes(folder).items() if name != "tlq_report.json"}


def invoke(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env={**NO_BROKER, **(env or {})})


def flip_bytes(data: bytes) -> bytes:
    """Same size, other content: only the sha256 sees it."""
    return bytes(b ^ 0xFF for b in data[:16]) + data[16:]


def test_a_clean_job_verifies_with_counts_and_exit_0(files, tmp_path):
    store = LocalStore(tmp_path / "store")
    job, _ = stage_job(store, job_spec(*files, method="rtn"))
    assert steps.run_embedded(store, job)
    committed = store.list_committed(keys.job_prefix(job))
    total = sum(store.commit_info(k).size for k in committed)

    calls = []
    summary = verify_job(store, job, progress=lambda n, of: calls.append((n, of)))
    assert calls[0] == (0, total) and sum(n for n, _ in calls) == total
    assert (summary["objects"], summary["bytes"], summary["corrupt"], summary["state"]) == (len(committed), total,
                                                                                          [], "ok")
    res = invoke("verify", job, "--store", store.url, "--quiet")
    assert res.exit_code == 0, res.output
    assert f"checked {len(committed)} objects" in res.output and "every object matches" in res.output
    res = invoke("verify", job, "--store", store.url, "--json", "--quiet")
    assert res.exit_code == 0 and json.loads(res.output)["bytes"] == total
    assert store.list_committed(keys.job_prefix(job)) == committed  # a clean verify deletes nothing


def test_corrupt_s3_objects_are_deleted_and_resume_restores_the_clean_bytes(files, clean, s3_store_factory,
                                                                            moto_s3, tmp_path, monkeypatch):
    monkeypatch.setattr(verify, "IN_MEMORY_BYTES", 1024)  # larger objects stream through get_file
    store = s3_store_factory()
    job, _ = stage_job(store, job_spec(*files, method="rtn"))
    assert steps.run_embedded(store, job)
    weights = keys.export_file(job, "model.safetensors")
    qweight = store.list_committed(keys.qweights_prefix(job, 1))[0]
    for key in (weights, qweight):  # garbage written straight into the bucket, markers untouched
        raw = store.client.get_object(Bucket=store.bucket, Key=store._full(key))["Body"].read()
        store.client.put_object(Bucket=store.bucket, Key=store._full(key), Body=flip_bytes(raw))

    env = {"AWS_ENDPOINT_URL": moto_s3}
    res = invoke("verify", job, "--store", store.url, "--quiet", env=env)
    assert res.exit_code == 1, res.output
    assert f"corrupt, deleted: {weights}" in res.output and f"corrupt, deleted: {qweight}" in res.output
    last = res.output.strip().splitlines()[-1]
    assert "2 of" in last and f"`tlq-farm resume {job} --store {store.url}` recomputes them" in last
    assert not store.is_committed(weights) and not store.is_committed(qweight)
    assert not store.is_committed(keys.export_index(job))  # withdrawn: the export task runs again

    res = invoke("resume", job, "--store", store.url, env=env)
    assert res.exit_code == 0, res.output
    res = invoke("export", job, "--store", store.url, "--out", tmp_path / "out", env=env)
    assert res.exit_code == 0, res.output
    assert checkpoint(tmp_path / "out") == clean(method="rtn")
    res = invoke("verify", job, "--store", store.url, "--quiet", env=env)
    assert res.exit_code == 0, res.output


def test_a_corrupt_local_shard_of_a_running_job_is_recomputed_by_resume(files, clean, tmp_path):
    store = LocalStore(tmp_path / "store")
    job, _ = stage_job(store, job_spec(*files))
    assert not steps.run_embedded(store, job, max_tasks=6)  # block 0 part way
    victim = keys.acts(job, "q", 0, 1)
    store.path(victim).write_bytes(flip_bytes(store.path(victim).read_bytes()))

    res = invoke("verify", job, "--store", store.url, "--json", "--quiet")
    assert res.exit_code == 1
    summary = json.loads(res.stdout)
    assert summary["corrupt"] == [victim] and summary["state"] == "resumable"
    assert "sha256" in summary["problems"][victim]
    assert not store.is_committed(victim)

    res = invoke("resume", job, "--store", store.url)
    assert res.exit_code == 0, res.output
    logs = store.list_committed(keys.tasks_prefix(job))
    assert sum(1 for k in logs if "/embed-s0001--" in k) == 2  # the deleted shard's producer ran again
    download_export(store, job, tmp_path / "out")
    assert checkpoint(tmp_path / "out") == clean()


def test_a_lost_staged_input_withdraws_the_manifest_so_that_staging_runs_again(files, clean, tmp_path):
    spec = job_spec(*files, method="rtn")
    store = LocalStore(tmp_path / "store")
    job, _ = stage_job(store, spec)
    assert not steps.run_embedded(store, job, max_tasks=3)  # the embeds only
    victim = keys.staged_block(job, 1)
    store.path(victim).write_bytes(b"not a checkpoint")

    res = invoke("verify", job, "--store", store.url, "--quiet")
    assert res.exit_code == 1
    assert f"corrupt, deleted: {victim}" in res.output and f"withdrawn: {keys.manifest(job)}" in res.output
    assert "`tlq-farm run` with the same model, data and options" in res.output.strip().splitlines()[-1]

    assert stage_job(store, spec) == (job, False)  # staged again, under the same job id
    assert steps.run_embedded(store, job)
    logs = store.list_committed(keys.tasks_prefix(job))
    assert sum(1 for k in logs if "/embed-" in k) == 3  # the embeds were kept, not recomputed
    download_export(store, job, tmp_path / "out")
    assert checkpoint(tmp_path / "out") == clean(method="rtn")


def test_verify_refuses_an_unknown_job_and_a_missing_store_in_one_line(tmp_path):
    LocalStore(tmp_path / "store")
    res = invoke("verify", "0123abcd", "--store", tmp_path / "store")
    assert res.exit_code == 1 and "has no committed objects" in res.output and "tlq-farm jobs" in res.output
    res = invoke("verify", "0123abcd", "--store", tmp_path / "nowhere")
    assert res.exit_code == 1 and "does not exist" in res.output
    assert not (tmp_path / "nowhere").exists()
    res = invoke("verify", "Not_A_Job", "--store", tmp_path / "store")
    assert res.exit_code == 2 and "job id" in res.output
