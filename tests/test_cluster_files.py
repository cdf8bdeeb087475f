"""The deployment files (cluster/, infra/) are valid and consistent with the code:
YAML/JSON parse, required fields are present, every entrypoint they name is a real job
whose options and config parse, and no file holds a credential."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from dakd.cli import RUNNERS, add_job_options
from dakd.config import JOB_CONFIGS, load_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER, INFRA = REPO / "cluster", REPO / "infra"
DEPLOY_FILES = sorted(p for d in (CLUSTER, INFRA) for p in d.rglob("*") if p.is_file())
# Files whose commands are checked: the deployment files and the README's "Run on a cluster".
COMMAND_FILES = DEPLOY_FILES + [REPO / "README.md"]
SECRET_NAMES = re.compile(r"(SECRET|TOKEN|PASSWORD|ACCESS_KEY)", re.I)


def load_yaml(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def check_ray_cluster_spec(spec: dict, where: str) -> None:
    """Head + an autoscaled GPU worker group, one image, token auth, settings from Secrets."""
    import ray

    assert spec["rayVersion"] == ray.__version__, f"{where}: rayVersion vs installed ray"
    assert spec.get("enableInTreeAutoscaling") is True, f"{where}: autoscaling"
    groups = [spec["headGroupSpec"]] + spec["workerGroupSpecs"]
    all_containers = [c for g in groups for c in containers(g["template"])]
    images = {c["image"] for c in all_containers}
    assert len(images) == 1 and images.pop().startswith("ghcr.io/YOUR_ORG/dakd:"), f"{where}: one dakd image"
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if any("nvidia.com/gpu" in c["resources"]["limits"] for c in containers(g["template"]))]
    assert gpu_groups, f"{where}: a GPU worker group"
    for g in spec["workerGroupSpecs"]:
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], f"{where}: {g['groupName']} replicas"
    for c in all_containers:
        env = env_of(c)
        assert env["RAY_AUTH_MODE"]["value"] == "token", f"{where}: {c['name']} token auth"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "auth_token"
        refs = {next(iter(r.values()))["name"] for r in c.get("envFrom", [])}
        assert {"dakd-s3", "dakd-settings"} <= refs, f"{where}: {c['name']} S3/MLflow settings from Secret/ConfigMap"
        assert "secretRef" in next(r for r in c["envFrom"] if "secretRef" in r)


def test_kuberay_raycluster():
    doc = load_yaml("raycluster.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    check_ray_cluster_spec(doc["spec"], "raycluster.yaml")
    assert doc["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # no training on the head


def test_kuberay_rayjob():
    doc = load_yaml("rayjob.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    check_ray_cluster_spec(spec["rayClusterSpec"], "rayjob.yaml")
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == "/app"  # where infra/Dockerfile puts jobs/
    assert spec["shutdownAfterJobFinishes"] is True
    assert env_of(containers(spec["submitterPodTemplate"])[0])["RAY_AUTH_MODE"]["value"] == "token"


def test_ray_up_autoscaler_yaml():
    doc = load_yaml("ray-up-aws.yaml")
    types = doc["available_node_types"]
    assert doc["head_node_type"] in types
    gpu = [t for n, t in types.items() if n != doc["head_node_type"]]
    assert gpu and all(re.match(r"(g|p)\d", t["node_config"]["InstanceType"]) for t in gpu)
    assert all(t["max_workers"] <= doc["max_workers"] and t["min_workers"] <= t["max_workers"] for t in gpu)
    assert types[doc["head_node_type"]]["resources"] == {"CPU": 0}
    assert doc["docker"]["image"] == load_yaml("raycluster.yaml")["spec"]["headGroupSpec"]["template"]["spec"][
        "containers"][0]["image"]
    starts = " ".join(doc["head_start_ray_commands"] + doc["worker_start_ray_commands"])
    assert starts.count("RAY_AUTH_MODE=token ray start") == 2 and "--dashboard-host=127.0.0.1" in starts
    assert "~/.ray/auth_token" in doc["file_mounts"]


def test_runtime_env_examples():
    examples = sorted((CLUSTER / "runtime_env").glob("*.json"))
    assert examples
    for path in examples:
        env = json.loads(path.read_text())
        assert {".git", ".venv", "runs", "mlruns"} <= set(env["excludes"]), path.name
        for module in env.get("py_modules", []):
            assert (REPO / module / "__init__.py").exists(), f"{path.name}: py_modules {module}"
        assert not any(SECRET_NAMES.search(k) for k in env.get("env_vars", {})), f"{path.name}: secrets in env_vars"


# ---------------------------------------------------------------- entrypoints
ENTRY = re.compile(r"python (jobs/[\w]+\.py)((?:[ \t]+(?:\\\n)?[^\s\\`\"|;]+)*)")
# `dakd <job>` as a command: followed by an option, a line continuation, a closing backtick or the line end
DAKD_CMD = re.compile(r"(?<![\w/.-])dakd ([a-z][a-z-]+)(?=\s+--|\s*\\$|`|$)", re.M)


def entrypoints() -> list[tuple[str, str, list[str]]]:
    """(file, jobs/x.py, args) for every `python jobs/x.py ...` in cluster/ and infra/."""
    found = []
    for path in COMMAND_FILES:
        text = path.read_text(errors="replace").replace("\\\n", " ")
        for m in ENTRY.finditer(text):
            found.append((str(path.relative_to(REPO)), m.group(1), shlex.split(m.group(2).replace("#", " #"), comments=True)))
    return found


def test_every_entrypoint_is_a_real_job_with_valid_options():
    found = entrypoints()
    assert {f for f, _, _ in found} >= {"cluster/rayjob.yaml", "cluster/raycluster.yaml", "cluster/ray-up-aws.yaml",
                                        "README.md"}
    readme = (REPO / "README.md").read_text() + (CLUSTER / "README.md").read_text()
    import argparse

    for where, script, args in found:
        job = Path(script).stem.replace("_", "-")
        assert (REPO / script).exists() and job in RUNNERS, f"{where}: {script} is not a job"
        assert script in readme, f"{where}: {script} is not documented in the README"
        args = [re.sub(r"\$\{?(\w+)\}?", r"placeholder", a) for a in args]  # shell variables
        parser = argparse.ArgumentParser(prog=script, exit_on_error=False)
        add_job_options(parser, job)
        ns = parser.parse_args(args)
        overrides = list(ns.overrides) + [f"{f}={json.dumps(getattr(ns, f))}" for f in ("output", "overwrite", "on_error")
                                          if getattr(ns, f, None) is not None]
        if ns.config:
            assert (REPO / ns.config).exists(), f"{where}: --config {ns.config} does not exist"
        preset = getattr(ns, "preset", None)
        load_config(JOB_CONFIGS[job], str(REPO / ns.config) if ns.config else None, overrides,
                    preset=(preset, job) if preset else None)


def test_every_dakd_command_named_is_a_job():
    named = set()
    for path in COMMAND_FILES:
        named |= set(DAKD_CMD.findall(path.read_text(errors="replace")))
    assert "pipeline" in named
    unknown = {n for n in named if n not in RUNNERS}
    assert not unknown, f"`dakd <job>` names that are not jobs: {unknown} (jobs: {sorted(RUNNERS)})"


# ---------------------------------------------------------------- no credentials, loopback only
CREDENTIAL_PATTERNS = [
    re.compile(r"AKIA[0-9A-Z]{16}"),  # AWS access key id
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"(?i)(secret|password|token)[\w]*\s*[:=]\s*['\"]?[A-Za-z0-9/+_\-]{24,}"),
]


@pytest.mark.parametrize("path", DEPLOY_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_credentials_in_files(path):
    text = path.read_text(errors="replace")
    for pattern in CREDENTIAL_PATTERNS:
        assert not pattern.search(text), f"{path}: looks like a credential: {pattern.search(text).group(0)[:40]}"
    if path.suffix in (".yaml", ".yml"):
        for doc in yaml.safe_load_all(text):
            for item in _walk(doc):
                if isinstance(item, dict) and "name" in item and SECRET_NAMES.search(str(item["name"])):
                    assert "value" not in item, f"{path}: {item['name']} has a literal value (use valueFrom a Secret)"


def _walk(node):
    yield node
    if isinstance(node, dict):
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def test_local_stack_scripts_bind_loopback_only():
    up = (INFRA / "local" / "up").read_text()
    for script in ("up", "down"):
        subprocess.run(["bash", "-n", str(INFRA / "local" / script)], check=True)
    assert "HOST=127.0.0.1" in up and "0.0.0.0" not in up
    # every listening address the script passes is $HOST
    for flag in ("--host", "-H", "--node-ip-address", "--dashboard-host"):
        values = re.findall(rf"{flag} (\S+)", up)
        assert values and all(v == '"$HOST"' for v in values), (flag, values)
    assert "RAY_AUTH_MODE=token" in up and "--block" in up
    down = (INFRA / "local" / "down").read_text()
    assert "ray stop" not in down and "pkill" not in down and "killall" not in down  # only its own process groups


def test_dockerfile_targets_and_pins():
    text = (INFRA / "Dockerfile").read_text()
    assert re.search(r"^FROM .* AS gpu$", text, re.M) and re.search(r"^FROM .* AS cpu$", text, re.M)
    pins = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    for pkg in ("torch", "torchvision"):
        assert f"{pkg}=={pins[pkg]}" in text, f"Dockerfile {pkg} pin differs from constraints.txt"
    assert "mamba-ssm==" in text and "--no-build-isolation" in text and "mambavision==1.2.0" in text
    assert "-c /src/constraints.txt" in text
    assert not re.search(r"^ENV .*(SECRET|TOKEN|PASSWORD)", text, re.M)
