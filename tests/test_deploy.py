"""Deployment files: docker-compose.yml, ops/ (Dockerfile, systemd units, bootstrap.sh, env examples).

No Docker engine or systemd runs here, so the files are checked by parsing them, by running the parts
that run anywhere (bootstrap.sh --help / --dry-run, the scripts that write the service configs), and
with systemd-analyze, docker compose and shellcheck where they are installed.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
OPS = ROOT / "ops"
BOOTSTRAP = OPS / "bootstrap.sh"
DOCKERFILE = OPS / "worker.Dockerfile"
UNIT = OPS / "tlq-farm-worker.service"
TEMPLATE_UNIT = OPS / "tlq-farm-worker@.service"
WORKER_ENV_EXAMPLE = OPS / "worker.env.example"
COMPOSE_ENV_EXAMPLE = OPS / "compose.env.example"

SECRET_VARIABLES = ("REDIS_PASSWORD", "S3_ACCESS_KEY", "S3_SECRET_KEY", "FLOWER_BASIC_AUTH")
# Compose interpolation: ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?err}, ${NAME?err}, $NAME.
INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-?+])?(?P<arg>[^}]*)\}")


# ------------------------------------------------------------------------------------ helpers


def image_tag(reference: str) -> str | None:
    """The tag of an image reference ('redis:8.2-alpine' -> '8.2-alpine'), None when it has none.

    A registry port ('host:5000/name') is not a tag: only a ':' after the last '/' counts. A digest
    ('@sha256:...') pins the image too and is returned as the tag.
    """
    if "@" in reference:
        return reference.split("@", 1)[1]
    last = reference.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else None


def systemd_seconds(span: str) -> float:
    """A systemd time span ('30min', '1h 30min', '90', '45s') in seconds."""
    units = {"": 1, "s": 1, "sec": 1, "second": 1, "seconds": 1, "m": 60, "min": 60, "minute": 60,
             "minutes": 60, "h": 3600, "hr": 3600, "hour": 3600, "hours": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", span.strip())
    if not parts or re.sub(r"[\d.\sa-z]", "", span):
        raise ValueError(f"not a systemd time span: {span!r}")
    return sum(float(number) * units[unit] for number, unit in parts)


def read_unit(path: Path) -> configparser.ConfigParser:
    """A systemd unit as INI: case-sensitive keys, no %-interpolation (%i is systemd's), repeats allowed."""
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read_string(path.read_text())
    return parser


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs of a Dockerfile, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    result = []
    for line in joined.splitlines():
        if line.strip():
            instruction, _, arguments = line.strip().partition(" ")
            result.append((instruction.upper(), arguments.strip()))
    return result


def env_file_keys(path: Path) -> list[str]:
    return [line.split("=", 1)[0] for line in path.read_text().splitlines() if re.match(r"^[A-Z_][A-Z0-9_]*=", line)]


def unprivileged_prefix() -> list[str]:
    """Command prefix that runs as nobody when the tests run as root (empty when not root)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot check behaviour without root")
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def bootstrap(*arguments: str, path_prefix: Path | None = None, as_nobody: bool = False) -> subprocess.CompletedProcess:
    """Run ops/bootstrap.sh non-interactively (stdin is not a terminal)."""
    environment = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
    if path_prefix is not None:
        environment["PATH"] = f"{path_prefix}:{environment['PATH']}"
    command = (unprivileged_prefix() if as_nobody else []) + ["bash", str(BOOTSTRAP), *arguments]
    return subprocess.run(command, cwd=ROOT, env=environment, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=60)


def python_for(as_nobody: bool) -> str:
    """A Python 3.10+ interpreter the bootstrap run can execute (the test venv may live under /root)."""
    if not as_nobody or os.geteuid() != 0:
        return sys.executable
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.access(candidate, os.X_OK) and subprocess.run(
                [*unprivileged_prefix(), candidate, "-c", "import sys; sys.exit(sys.version_info < (3, 10))"],
                capture_output=True).returncode == 0:
            return candidate
    pytest.skip("no Python 3.10+ that an unprivileged user can run")


def dry_run(*arguments: str, as_nobody: bool = False, **options) -> subprocess.CompletedProcess:
    return bootstrap("--dry-run", "--source", str(ROOT), "--python", python_for(as_nobody), *arguments,
                     as_nobody=as_nobody, **options)


FULL_SETTINGS = ("--broker-url", "redis://:hunter2hex@farm.lab:6379/0", "--store-url", "s3://tlq-farm/runs",
                 "--access-key-id", "AKFARM", "--secret-access-key", "sekritkey0123", "--s3-endpoint",
                 "http://farm.lab:8333")


def fake_nvidia_smi(folder: Path, stdout: str, status: int = 0) -> Path:
    """A stand-in for the nvidia-smi binary of a machine with (or without) GPUs."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "nvidia-smi"
    script.write_text(f"#!/bin/sh\nprintf '%s' '{stdout}'\nexit {status}\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return folder


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def command_script(service: dict) -> str:
    """The shell script of a service started as `sh -ec SCRIPT`."""
    assert service["entrypoint"][:2] == ["/bin/sh", "-ec"], service["entrypoint"]
    (script,) = service["command"]
    return script


def run_printf_lines(script: str, environment: dict, replace: tuple[str, str]) -> None:
    """Run the printf lines of a compose command script (compose's $$ -> $), writing into a test folder."""
    lines = [line.replace("$$", "$").replace(*replace) for line in script.splitlines() if line.strip().startswith("printf")]
    assert lines, "no printf line in the script"
    subprocess.run(["sh", "-ec", "\n".join(lines)], env={"PATH": os.environ["PATH"], **environment}, check=True, timeout=30)


# --------------------------------------------------------------------------- helper self-checks


def test_helpers_parse_what_they_claim():
    assert image_tag("redis:8.2-alpine") == "8.2-alpine"
    assert image_tag("registry.lab:5000/tlq/worker") is None
    assert image_tag("registry.lab:5000/tlq/worker:0.1") == "0.1"
    assert image_tag("redis@sha256:abc") == "sha256:abc"
    assert systemd_seconds("30min") == 1800
    assert systemd_seconds("1h 30min") == 5400
    assert systemd_seconds("90") == 90
    with pytest.raises(ValueError):
        systemd_seconds("infinity!")


# -------------------------------------------------------------------------------- compose file


def test_compose_has_the_farm_services(services):
    assert {"redis", "s3", "s3-init", "worker", "flower"} <= set(services)


def test_secrets_are_required_and_never_defaulted():
    text = COMPOSE_FILE.read_text()
    uses = [m for m in INTERPOLATION.finditer(text) if m.group("name") in SECRET_VARIABLES]
    assert {m.group("name") for m in uses} == set(SECRET_VARIABLES)
    for match in uses:
        # ${NAME:?message}: compose stops with the message when it is unset or empty.
        assert match.group("op") == ":?" and match.group("arg"), f"{match.group(0)} must be ${{NAME:?message}}"
    assert "${REDIS_PASSWORD:?set REDIS_PASSWORD}" in text


def test_redis_requires_the_password_and_keeps_an_append_only_file(services, tmp_path):
    redis = services["redis"]
    assert redis["environment"]["REDIS_PASSWORD"] == "${REDIS_PASSWORD:?set REDIS_PASSWORD}"
    script = command_script(redis)
    assert re.search(r"redis-server\s+/tmp/redis/redis\.conf\s", script)
    assert re.search(r"--appendonly\s+yes\b", script)
    # The config the script writes sets exactly that password.
    run_printf_lines(script, {"REDIS_PASSWORD": "0123abcdef"}, ("/tmp/redis/redis.conf", str(tmp_path / "redis.conf")))
    assert (tmp_path / "redis.conf").read_text() == 'requirepass "0123abcdef"\n'
    # The password is not on a command line (visible in ps) anywhere in the service.
    assert "--requirepass" not in script
    assert "redis-cli -a" not in json.dumps(redis["healthcheck"])


def test_s3_store_gets_its_identity_from_the_environment(services, tmp_path):
    s3 = services["s3"]
    assert s3["environment"] == {"S3_ACCESS_KEY": "${S3_ACCESS_KEY:?set S3_ACCESS_KEY}",
                                 "S3_SECRET_KEY": "${S3_SECRET_KEY:?set S3_SECRET_KEY}"}
    script = command_script(s3)
    assert "-s3.config=/tmp/s3.json" in script and re.search(r"\bserver\b.*-s3\b", script)
    run_printf_lines(script, {"S3_ACCESS_KEY": "farmkey", "S3_SECRET_KEY": "0badc0de"},
                     ("/tmp/s3.json", str(tmp_path / "s3.json")))
    identities = json.loads((tmp_path / "s3.json").read_text())["identities"]
    assert identities == [{"name": "tlq-farm", "credentials": [{"accessKey": "farmkey", "secretKey": "0badc0de"}],
                           "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]


def test_bucket_is_created_at_start(services):
    init = services["s3-init"]
    script = command_script(init)
    assert "create-bucket" in script and "head-bucket" in script
    assert init["environment"]["TLQ_BUCKET"] == "${TLQ_BUCKET:-tlq-farm}"
    assert init["environment"]["AWS_ENDPOINT_URL"] == "http://s3:8333"
    assert init["depends_on"]["s3"]["condition"] == "service_healthy"
    assert init["restart"] == "no"


def test_scripts_escape_dollars_for_compose(services):
    # A bare $VAR in a command would be filled in by compose from the host, not by the container's shell.
    for name in ("redis", "s3", "s3-init"):
        script = command_script(services[name])
        bare = re.findall(r"(?<!\$)\$(?![${])", script.replace("$$", ""))
        assert not bare, f"{name}: unescaped $ in its command script"


def test_worker_reserves_gpus_and_has_broker_and_store_settings(services):
    worker = services["worker"]
    assert worker["build"] == {"context": ".", "dockerfile": "ops/worker.Dockerfile"}
    assert (ROOT / worker["build"]["dockerfile"]).is_file()
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] and ("count" in d or "device_ids" in d)
               for d in devices), devices
    environment = worker["environment"]
    assert environment["TLQ_BROKER_URL"] == "redis://:${REDIS_PASSWORD:?set REDIS_PASSWORD}@redis:6379/0"
    assert environment["TLQ_STORE_URL"].startswith("s3://${TLQ_BUCKET:-tlq-farm}/")
    assert environment["AWS_ACCESS_KEY_ID"] == "${S3_ACCESS_KEY:?set S3_ACCESS_KEY}"
    assert environment["AWS_SECRET_ACCESS_KEY"] == "${S3_SECRET_KEY:?set S3_SECRET_KEY}"
    assert environment["AWS_DEFAULT_REGION"].startswith("${AWS_DEFAULT_REGION")
    assert worker["restart"] == "unless-stopped"
    assert worker["stop_signal"] == "SIGTERM"


def test_internal_urls_name_real_services_and_ports(services):
    """The host:port in the broker and endpoint URLs is a service of this file listening on that port."""
    listening = {"redis": 6379, "s3": 8333}
    for name in ("worker", "flower", "s3-init"):
        for key, value in services[name]["environment"].items():
            for host, port in re.findall(r"(?:redis|https?)://(?:[^@/]*@)?([a-z0-9-]+):(\d+)", value):
                assert host in services, f"{name}.{key} names unknown host {host!r}"
                assert listening.get(host) == int(port), f"{name}.{key}: {host} listens on {listening.get(host)}"
    published = {name: [p.rsplit(":", 1)[-1] for p in services[name]["ports"]] for name in listening}
    assert published == {"redis": ["6379"], "s3": ["8333"]}


def test_flower_has_basic_auth_and_points_at_the_broker(services):
    flower = services["flower"]
    environment = flower["environment"]
    assert environment["FLOWER_BASIC_AUTH"].startswith("${FLOWER_BASIC_AUTH:?")
    assert environment["CELERY_BROKER_URL"] == services["worker"]["environment"]["TLQ_BROKER_URL"]
    assert flower["command"][:2] == ["celery", "flower"]
    # Not published on every interface by default.
    assert all(port.startswith("${FLOWER_BIND:-127.0.0.1}:") for port in flower["ports"])


def test_named_volumes_are_declared_and_used_for_state(compose, services):
    declared = set(compose.get("volumes") or {})
    used = set()
    for name, service in services.items():
        for mount in service.get("volumes", []):
            source = mount.split(":", 1)[0] if isinstance(mount, str) else mount.get("source", "")
            if source and not source.startswith((".", "/", "~", "$")):
                used.add(source)
                assert source in declared, f"{name} mounts volume {source!r} that is not declared"
    assert "/data" in [m.split(":")[1] for m in services["redis"]["volumes"]]
    assert "/data" in [m.split(":")[1] for m in services["s3"]["volumes"]]
    assert used == declared == {"redis-data", "s3-data"}


def test_depends_on_conditions_refer_to_services_that_can_meet_them(services):
    checked = 0
    for name, service in services.items():
        depends = service.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: depends_on should give a condition for each service"
        for target, spec in depends.items():
            assert target in services, f"{name} depends on unknown service {target!r}"
            condition = spec["condition"]
            if condition == "service_healthy":
                assert "test" in services[target].get("healthcheck", {}), f"{name} waits for {target}'s health, which has no healthcheck"
            elif condition == "service_completed_successfully":
                assert services[target].get("restart") == "no", f"{target} must run once to complete"
            else:
                assert condition == "service_started", condition
            checked += 1
    assert services["worker"]["depends_on"] == {
        "redis": {"condition": "service_healthy"}, "s3": {"condition": "service_healthy"},
        "s3-init": {"condition": "service_completed_successfully"}}
    assert checked >= 5


def test_healthchecks_are_commands(services):
    for name in ("redis", "s3"):
        test = services[name]["healthcheck"]["test"]
        assert test[0] in ("CMD", "CMD-SHELL") and len(test) >= 2, (name, test)


def test_images_are_pinned_to_a_tag(services):
    for name, service in services.items():
        if "image" not in service:
            assert "build" in service, f"{name} has neither image nor build"
            continue
        tag = image_tag(service["image"])
        assert tag, f"{name}: image {service['image']!r} has no tag"
        assert tag != "latest" and "latest" not in tag.split("-"), f"{name}: image {service['image']!r} is not pinned"


def test_compose_env_example_covers_every_variable_of_the_compose_file():
    referenced = {m.group("name") for m in INTERPOLATION.finditer(COMPOSE_FILE.read_text())}
    documented = set(env_file_keys(COMPOSE_ENV_EXAMPLE))
    assert referenced - documented == set()
    # The secrets are left blank in the example, so compose refuses to start until they are filled in.
    values = dict(line.split("=", 1) for line in COMPOSE_ENV_EXAMPLE.read_text().splitlines() if re.match(r"^[A-Z_][A-Z0-9_]*=", line))
    assert all(values[name] == "" for name in SECRET_VARIABLES)


def test_docker_compose_config_when_available(tmp_path):
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("docker compose is not installed")
    base = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    missing = subprocess.run([docker, "compose", "-f", str(COMPOSE_FILE), "config", "--quiet"], env=base,
                             capture_output=True, text=True, cwd=tmp_path)
    assert missing.returncode != 0 and "REDIS_PASSWORD" in missing.stderr
    secrets = {name: "x0" for name in SECRET_VARIABLES}
    ok = subprocess.run([docker, "compose", "-f", str(COMPOSE_FILE), "config", "--quiet"], env={**base, **secrets},
                        capture_output=True, text=True, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr


# ---------------------------------------------------------------------------------- Dockerfile


def test_dockerfile_uses_a_cuda_base_with_matching_torch_wheels():
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    froms = [i for i, (name, _) in enumerate(instructions) if name == "FROM"]
    assert len(froms) == 1
    global_args = dict(re.match(r"([A-Z_]+)=(.*)", a).groups() for n, a in instructions[: froms[0]] if n == "ARG")
    base = re.sub(r"\$\{(\w+)\}", lambda m: global_args[m.group(1)], instructions[froms[0]][1]).split()[0]
    assert base.startswith("nvidia/cuda:"), base
    assert image_tag(base) and "latest" not in image_tag(base)
    cuda = re.match(r"nvidia/cuda:(\d+)\.(\d+)", base).groups()
    stage_args = dict(re.match(r"([A-Z_]+)=(.*)", a).groups() for n, a in instructions[froms[0]:] if n == "ARG" and "=" in a)
    torch_cuda = re.search(r"/whl/cu(\d+)$", stage_args["TORCH_INDEX_URL"]).group(1)
    assert torch_cuda == "".join(cuda), f"torch wheels cu{torch_cuda} do not match the CUDA {'.'.join(cuda)} base"
    runs = " ".join(a for n, a in instructions if n == "RUN")
    assert '--index-url "$TORCH_INDEX_URL"' in runs and "pip install /src/tlq-farm" in runs


def test_dockerfile_runs_tlq_farm_worker_as_a_non_root_user():
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    users = [a for n, a in instructions if n == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    last_user = max(i for i, (n, _) in enumerate(instructions) if n == "USER")
    assert not any(n == "RUN" for n, _ in instructions[last_user:]), "RUN after the final USER"
    (entrypoint,) = [json.loads(a) for n, a in instructions if n == "ENTRYPOINT"]
    position = entrypoint.index("tlq-farm")
    assert entrypoint[position: position + 2] == ["tlq-farm", "worker"]
    assert ("STOPSIGNAL", "SIGTERM") in instructions


def test_build_context_leaves_out_secrets_and_the_local_venv():
    ignored = set((OPS / "worker.Dockerfile.dockerignore").read_text().split())
    assert {".env", ".venv", ".git", "tlq-runs"} <= ignored
    # What `pip install .` needs stays in.
    assert not {"pyproject.toml", "tlq_farm", "coordinator", "worker"} & ignored


# ---------------------------------------------------------------------------------- systemd


@pytest.mark.parametrize("path", [UNIT, TEMPLATE_UNIT], ids=lambda p: p.name)
def test_units_have_the_required_keys(path):
    unit = read_unit(path)
    assert unit.sections() == ["Unit", "Service", "Install"]
    service = unit["Service"]
    assert service["EnvironmentFile"] == "/etc/tlq-farm/worker.env"
    assert service["Restart"] == "always"
    assert service["User"] == "tlq-farm" and service["Group"] == "tlq-farm"
    assert service["KillSignal"] == "SIGTERM"
    assert service["KillMode"] == "mixed"
    # Long enough for a running block task to finish under Celery's warm shutdown.
    assert systemd_seconds(service["TimeoutStopSec"]) >= 15 * 60
    assert re.search(r"(^|\s)/opt/tlq-farm/venv/bin/tlq-farm worker(\s|$)", service["ExecStart"])
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    assert "network-online.target" in unit["Unit"]["After"]


def test_template_unit_pins_one_gpu_per_instance():
    unit = read_unit(TEMPLATE_UNIT)
    service = unit["Service"]
    assert "CUDA_VISIBLE_DEVICES=%i" in service["Environment"].split()
    # On the command line too: EnvironmentFile= would override Environment= for the same variable.
    assert service["ExecStart"].startswith("/usr/bin/env CUDA_VISIBLE_DEVICES=%i ")
    assert "%i" in unit["Unit"]["Description"]
    assert unit["Unit"]["Conflicts"] == "tlq-farm-worker.service"


def test_units_pass_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # verify wants the executables to exist: point ExecStart at one that does.
    for source, name in ((UNIT, UNIT.name), (TEMPLATE_UNIT, "tlq-farm-worker@0.service")):
        text = source.read_text().replace("/opt/tlq-farm/venv/bin/tlq-farm", shutil.which("true") or "/bin/true")
        (tmp_path / name).write_text(text.replace("EnvironmentFile=/", "EnvironmentFile=-/"))
    result = subprocess.run([analyze, "verify", "--man=no", "tlq-farm-worker.service", "tlq-farm-worker@0.service"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    complaints = [line for line in result.stderr.splitlines() if "tlq-farm-worker" in line]
    assert result.returncode == 0 and not complaints, result.stderr


def test_bootstrap_defaults_match_the_units():
    script = BOOTSTRAP.read_text()
    assert "PREFIX=/opt/tlq-farm " in script and "SERVICE_USER=tlq-farm " in script
    assert "readonly ENV_FILE=$ENV_DIR/worker.env" in script and "readonly ENV_DIR=/etc/tlq-farm" in script


# -------------------------------------------------------------------------------- env files


def test_worker_env_example_documents_every_variable():
    lines = WORKER_ENV_EXAMPLE.read_text().splitlines()
    keys = env_file_keys(WORKER_ENV_EXAMPLE)
    assert {"TLQ_BROKER_URL", "TLQ_STORE_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL",
            "AWS_DEFAULT_REGION", "TLQ_WORKER_ARGS"} == set(keys)
    for key in keys:
        index = next(i for i, line in enumerate(lines) if line.startswith(f"{key}="))
        assert lines[index - 1].startswith("#"), f"{key} has no comment above it"
    # The keys bootstrap.sh writes, in the same order.
    written = re.search(r"readonly ENV_KEYS=\(([^)]*)\)", BOOTSTRAP.read_text()).group(1).split()
    assert written == keys


# ------------------------------------------------------------------------------ bootstrap.sh


def test_bootstrap_is_valid_bash():
    result = subprocess.run(["bash", "-n", str(BOOTSTRAP)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert BOOTSTRAP.read_text().splitlines()[2] == "set -euo pipefail"
    assert os.access(BOOTSTRAP, os.X_OK)


def test_bootstrap_help_needs_no_root():
    result = bootstrap("--help", as_nobody=True)
    assert result.returncode == 0, result.stderr
    for option in ("--source", "--env-file", "--broker-url", "--gpus", "--dry-run", "tlq-farm workers"):
        assert option in result.stdout


def test_bootstrap_refuses_to_install_without_root():
    result = bootstrap("--source", str(ROOT), *FULL_SETTINGS, as_nobody=True)
    assert result.returncode == 1
    assert "run as root" in result.stderr and "--dry-run" in result.stderr


def test_bootstrap_dry_run_plans_one_unit_per_requested_gpu():
    result = dry_run(*FULL_SETTINGS, "--gpus", "0,2", "--worker-args", "--max-memory 48GiB", as_nobody=True)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "[dry-run] systemctl enable tlq-farm-worker@0.service tlq-farm-worker@2.service" in out
    assert "[dry-run] systemctl restart --no-block tlq-farm-worker@0.service tlq-farm-worker@2.service" in out
    assert f"pip install --upgrade {ROOT}" in out
    # The env file it would write, with the secrets hidden.
    assert "TLQ_BROKER_URL=redis://:***@farm.lab:6379/0" in out
    assert "AWS_SECRET_ACCESS_KEY=***" in out
    assert 'TLQ_WORKER_ARGS="--max-memory 48GiB"' in out
    assert "AWS_ACCESS_KEY_ID=AKFARM" in out and "AWS_DEFAULT_REGION=us-east-1" in out
    assert "hunter2hex" not in out + result.stderr and "sekritkey0123" not in out + result.stderr


def test_bootstrap_finds_gpus_with_nvidia_smi(tmp_path):
    with_gpus = fake_nvidia_smi(tmp_path / "gpus", "0\n1\n")
    result = dry_run(*FULL_SETTINGS, path_prefix=with_gpus)
    assert result.returncode == 0, result.stderr
    assert "systemctl enable tlq-farm-worker@0.service tlq-farm-worker@1.service" in result.stdout
    # A machine whose driver is not loaded: nvidia-smi fails with its message on stdout.
    broken = fake_nvidia_smi(tmp_path / "broken", "NVIDIA-SMI has failed because it could not talk to the driver\n", 9)
    result = dry_run(*FULL_SETTINGS, path_prefix=broken)
    assert result.returncode == 0, result.stderr
    assert "systemctl enable tlq-farm-worker.service" in result.stdout
    assert "no GPU found" in result.stderr
    result = dry_run(*FULL_SETTINGS, "--gpus", "none", path_prefix=with_gpus)
    assert "systemctl enable tlq-farm-worker.service" in result.stdout


def test_bootstrap_clones_a_git_source_and_installs_its_units():
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    result = bootstrap("--dry-run", "--source", "https://git.example.lab/tlq-farm.git", "--ref", "v0.1.0",
                       "--prefix", "/srv/tlq", "--python", sys.executable, "--gpus", "1", *FULL_SETTINGS)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "[dry-run] git clone https://git.example.lab/tlq-farm.git /srv/tlq/src" in out
    assert "[dry-run] git -C /srv/tlq/src checkout --force --detach v0.1.0" in out
    assert "pip install --upgrade /srv/tlq/src" in out
    assert "tlq-farm-worker@.service from /srv/tlq/src/ops/tlq-farm-worker@.service" in out
    assert "systemctl enable tlq-farm-worker@1.service" in out


def test_bootstrap_merges_an_env_file_with_options(tmp_path):
    prepared = tmp_path / "worker.env"
    prepared.write_text("# prepared once\nTLQ_BROKER_URL=redis://:oldpw@old.lab:6379/0\n"
                        "TLQ_STORE_URL='s3://tlq-farm/runs'\nAWS_ACCESS_KEY_ID=\"AKFILE\"\n"
                        "AWS_SECRET_ACCESS_KEY=filesecret\n\nAWS_DEFAULT_REGION=eu-west-1\r\n")
    result = dry_run("--env-file", str(prepared), "--broker-url", "redis://:newpw@new.lab:6379/0", "--gpus", "none")
    assert result.returncode == 0, result.stderr
    rendered = result.stdout.split("secrets shown as ***:\n", 1)[1].split("==>", 1)[0].splitlines()
    assert rendered[1:] == ["TLQ_BROKER_URL=redis://:***@new.lab:6379/0", "TLQ_STORE_URL=s3://tlq-farm/runs",
                            "AWS_ACCESS_KEY_ID=AKFILE", "AWS_SECRET_ACCESS_KEY=***", "AWS_DEFAULT_REGION=eu-west-1"]


def test_bootstrap_accepts_the_worker_env_example():
    result = dry_run("--env-file", str(WORKER_ENV_EXAMPLE), "--gpus", "0")
    assert result.returncode == 0, result.stderr
    for key in env_file_keys(WORKER_ENV_EXAMPLE):
        assert re.search(rf"^{key}=", result.stdout, re.M), key


@pytest.mark.parametrize(
    "arguments, message",
    [
        (("--broker-url", "http://farm.lab:6379"), "is not a Redis URL"),
        (("--broker-url", "redis://:pa ss@farm.lab/0"), "percent-encode"),
        (("--store-url", "tlq-farm/runs"), "must be s3://BUCKET/PREFIX or an absolute folder"),
        (("--s3-endpoint", "farm.lab:8333"), "must start with http:// or https://"),
        (("--gpus", "0,x"), "--gpus '0,x' must be a list like 0,1"),
        (("--colour", "blue"), "unknown argument '--colour'"),
        (("--user", "Bad User"), "not a valid user name"),
    ],
    ids=["broker-scheme", "broker-chars", "store", "endpoint", "gpus", "unknown-arg", "user"],
)
def test_bootstrap_rejects_bad_settings_with_a_reason(arguments, message):
    result = dry_run(*FULL_SETTINGS, *arguments)
    assert result.returncode == 1
    assert message in result.stderr, result.stderr


def test_bootstrap_names_what_is_missing_when_not_interactive():
    result = dry_run("--broker-url", "redis://:pw@farm.lab:6379/0", "--store-url", "s3://tlq-farm/runs")
    assert result.returncode == 1
    assert "AWS_ACCESS_KEY_ID is not set" in result.stderr and "--env-file" in result.stderr
    # A shared folder as the store needs no S3 keys.
    result = dry_run("--broker-url", "redis://:pw@farm.lab:6379/0", "--store-url", "/mnt/farm/runs", "--gpus", "none")
    assert result.returncode == 0, result.stderr
    assert "AWS_ACCESS_KEY_ID" not in result.stdout and "NFS" in result.stderr
    result = bootstrap("--dry-run")
    assert result.returncode == 1 and "--source is required" in result.stderr


def test_shellcheck_when_available():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed")
    result = subprocess.run([shellcheck, "--severity=warning", str(BOOTSTRAP)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout
