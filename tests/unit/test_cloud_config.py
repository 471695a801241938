"""``shoulders cluster config``: the Ray cluster-launcher YAML (aws, gcp) and the KubeRay manifests validate against
the schemas their tools use, install shoulders on every node, keep the GPU off the head, and carry no secret.

The launcher schema is the one inside the installed ``ray`` package (``ray up`` validates with it, after merging
its provider defaults: both are checked). The KubeRay schemas are the v1 ``openAPIV3Schema`` of KubeRay's CRDs,
kept in tests/schemas/kuberay_crd_v1.json, read as the API server's strict field validation reads them.
No Ray is started.
"""

from __future__ import annotations

import copy
import json
import os
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml

from cluster.cli.main import build_parser, main
from cluster.cli.remote import config_options
from cluster.remote.cloud_config import render
from cluster.remote.cloud_options import CloudOptions
from engine.config.schema import load_job

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "cluster" / "deploy"
KUBERAY_CRD = ROOT / "tests" / "schemas" / "kuberay_crd_v1.json"
SOURCE = "git+https://github.com/OWNER/shoulders.git@v0.1.0"
STORAGE = "s3://bucket/shoulders"
FAKE_SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAFAKEKEYID0000001",
    "AWS_SECRET_ACCESS_KEY": "fake/secret+access/key/never-written-0001",
    "AWS_SESSION_TOKEN": "FakeSessionTokenNeverWritten0001",
    "AWS_ENDPOINT_URL": "http://s3.fake-endpoint.internal:8333",
    "AWS_DEFAULT_REGION": "eu-fake-1",
}

LAUNCHER_CASES = {
    "aws-role": CloudOptions(provider="aws", source=SOURCE),
    "aws-keys": CloudOptions(provider="aws", source=SOURCE, credentials="keys", max_workers=8, min_workers=2),
    "aws-image": CloudOptions(provider="aws", image="registry.example/shoulders:0.1.0", instance_profile="shoulders-nodes"),
    "gcp-role": CloudOptions(provider="gcp", source=SOURCE, project="my-project"),
    "gcp-keys": CloudOptions(provider="gcp", source=SOURCE, project="my-project", credentials="keys", gpus_per_worker=4),
}
KUBERAY_CASES = {
    "keys-source": CloudOptions(provider="kuberay", source=SOURCE, storage=STORAGE),
    "keys-image": CloudOptions(provider="kuberay", image="registry.example/shoulders:0.1.0", storage=STORAGE, gpus_per_worker=2),
    "role": CloudOptions(provider="kuberay", source=SOURCE, storage=STORAGE, credentials="role", service_account="shoulders"),
}


def documents(options: CloudOptions) -> dict[str, dict]:
    return {name: yaml.safe_load(text) for name, text in render(options).items()}


def launcher_schema() -> dict:
    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def check_as_ray_up_does(config: dict) -> None:
    """``ray up``: the schema on the file as written, then its provider defaults merged in and checked again."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    jsonschema.validate(config, launcher_schema())
    validate_config(prepare_config(copy.deepcopy(config)))


def kubernetes_strict(node: object) -> object:
    """A CRD schema as the API server's strict field validation (``kubectl apply --validate=strict``) reads it:
    an unknown field is an error unless ``x-kubernetes-preserve-unknown-fields``; int-or-string takes both."""
    if isinstance(node, dict):
        if node.get("x-kubernetes-int-or-string") and "anyOf" not in node:
            node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        if (node.get("type") == "object" and "properties" in node and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")):
            node["additionalProperties"] = False
        for value in node.values():
            kubernetes_strict(value)
    elif isinstance(node, list):
        for value in node:
            kubernetes_strict(value)
    return node


@pytest.fixture(scope="module")
def kuberay_validators() -> dict[str, jsonschema.protocols.Validator]:
    crd = json.loads(KUBERAY_CRD.read_text())
    return {kind: jsonschema.Draft202012Validator(kubernetes_strict({**copy.deepcopy(crd[kind]), "$defs": crd["$defs"]}))
            for kind in ("RayCluster", "RayJob")}


def check_kuberay(manifest: dict, validators: dict) -> None:
    assert manifest["apiVersion"] == "ray.io/v1"
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validators[manifest["kind"]].iter_errors(manifest)]
    assert not errors, errors


@pytest.mark.parametrize("case", LAUNCHER_CASES)
def test_launcher_yaml_validates_as_ray_up_does(case):
    (config,) = documents(LAUNCHER_CASES[case]).values()
    check_as_ray_up_does(config)


@pytest.mark.parametrize("case", KUBERAY_CASES)
def test_kuberay_manifests_validate_against_the_crds(case, kuberay_validators):
    manifests = documents(KUBERAY_CASES[case])
    assert sorted(m["kind"] for m in manifests.values()) == ["RayCluster", "RayJob"]
    for manifest in manifests.values():
        check_kuberay(manifest, kuberay_validators)


def test_the_validations_catch_a_wrong_field(kuberay_validators):
    """A misspelt field or a resource quantity that is not one fails, so the two tests above can fail."""
    (config,) = documents(LAUNCHER_CASES["aws-role"]).values()
    config["available_node_types"]["worker_gpu"]["max_worker"] = 4
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        check_as_ray_up_does(config)

    job = documents(KUBERAY_CASES["keys-source"])["rayjob.yaml"]
    typo = copy.deepcopy(job)
    typo["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParam"] = {}
    with pytest.raises(AssertionError, match="rayStartParam"):
        check_kuberay(typo, kuberay_validators)
    quantity = copy.deepcopy(job)
    quantity["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = "8 cores"
    with pytest.raises(AssertionError, match="does not match"):
        check_kuberay(quantity, kuberay_validators)


@pytest.mark.parametrize("case", LAUNCHER_CASES)
def test_launcher_head_has_no_gpu_and_workers_do(case):
    options = LAUNCHER_CASES[case]
    (config,) = documents(options).values()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"]["GPU"] == 0 and "--num-gpus=0" in config["head_start_ray_commands"][-1]
    assert head["node_config"].get("InstanceType", head["node_config"].get("machineType")) in ("m5.2xlarge", "n2-standard-8")
    (worker,) = [t for name, t in types.items() if name != config["head_node_type"]]
    assert worker["resources"]["GPU"] == (options.gpus_per_worker or 1)
    assert (worker["min_workers"], worker["max_workers"], config["max_workers"]) == (options.min_workers, options.max_workers, options.max_workers)


@pytest.mark.parametrize("case", KUBERAY_CASES)
def test_kuberay_head_has_no_gpu_and_workers_do(case):
    options = KUBERAY_CASES[case]
    for manifest in documents(options).values():
        spec = manifest["spec"] if manifest["kind"] == "RayCluster" else manifest["spec"]["rayClusterSpec"]
        head = spec["headGroupSpec"]
        assert head["rayStartParams"]["num-gpus"] == "0"
        assert all("nvidia.com/gpu" not in c["resources"]["limits"] for c in head["template"]["spec"]["containers"])
        (group,) = spec["workerGroupSpecs"]
        (container,) = group["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == (options.gpus_per_worker or 1)
        assert container["resources"]["requests"]["nvidia.com/gpu"] == (options.gpus_per_worker or 1)
        assert group["maxReplicas"] == options.max_workers


def test_every_node_installs_torch_then_shoulders(tmp_path):
    (config,) = documents(LAUNCHER_CASES["aws-role"]).values()
    assert config["setup_commands"] == ["pip install --no-cache-dir torch", f"pip install --no-cache-dir {SOURCE}"]
    assert config["docker"]["image"] == "rayproject/ray:2.60.0-py311-gpu"

    wheel = tmp_path / "shoulders-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"PK")
    (config,) = documents(CloudOptions(provider="gcp", project="p", source=str(wheel), torch="torch==2.11.0")).values()
    assert config["file_mounts"]["/tmp/shoulders-dist/" + wheel.name] == str(wheel)
    assert config["setup_commands"] == ["pip install --no-cache-dir torch==2.11.0", f"pip install --no-cache-dir /tmp/shoulders-dist/{wheel.name}"]

    (config,) = documents(LAUNCHER_CASES["aws-image"]).values()
    assert config["setup_commands"] == [] and config["docker"]["image"] == "registry.example/shoulders:0.1.0"

    job = documents(KUBERAY_CASES["keys-source"])["rayjob.yaml"]
    for group in (job["spec"]["rayClusterSpec"]["headGroupSpec"], job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]):
        (container,) = group["template"]["spec"]["containers"]
        assert group["template"]["metadata"]["annotations"] == {"ray.io/overwrite-container-cmd": "true"}
        install = f"pip install --no-cache-dir torch && pip install --no-cache-dir {SOURCE}"
        assert container["args"] == [install + " && { ulimit -n 65536; $KUBERAY_GEN_RAY_START_CMD; }"]


def test_rayjob_trains_the_job_with_checkpoints_in_storage():
    """The entrypoint is the CLI's train command, and its overrides are keys the job schema accepts."""
    job = documents(KUBERAY_CASES["keys-image"])["rayjob.yaml"]
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[:5] == ["python", "-m", "cluster.cli.main", "train", "jobs/quickstart.yaml"]
    overrides = words[5:]
    assert f"run.storage_path={STORAGE}" in overrides and "scaling.num_workers=8" in overrides  # 4 pods x 2 GPUs
    loaded = load_job(ROOT / "jobs" / "quickstart.yaml", overrides)
    assert loaded.run.storage_path == STORAGE and loaded.scaling.use_gpu is True


def test_no_secret_value_is_written_only_names(tmp_path, monkeypatch):
    for name, value in FAKE_SECRETS.items():
        monkeypatch.setenv(name, value)
    commands = [
        ["--provider", "aws", "--source", SOURCE, "--credentials", "keys"],
        ["--provider", "aws", "--source", SOURCE],
        ["--provider", "gcp", "--source", SOURCE, "--project", "p", "--credentials", "keys"],
        ["--provider", "kuberay", "--source", SOURCE, "--storage", STORAGE],
        ["--provider", "kuberay", "--image", "img:1", "--storage", STORAGE, "--credentials", "role", "--service-account", "sa"],
    ]
    for i, command in enumerate(commands):
        assert main(["cluster", "config", *command, "-o", str(tmp_path / str(i))]) == 0
    texts = {path: path.read_text() for path in tmp_path.rglob("*") if path.is_file()}
    assert len(texts) == 7
    for path, text in texts.items():
        leaked = [name for name, value in FAKE_SECRETS.items() if value in text]
        assert not leaked, f"{path} holds the value of {leaked}"

    keys_launcher = yaml.safe_load(texts[tmp_path / "0" / "ray-cluster-aws.yaml"])
    assert keys_launcher["file_mounts"]["/home/ray/.shoulders/storage.env"] == "~/.shoulders/storage.env"
    assert all(". /home/ray/.shoulders/storage.env" in c for c in (keys_launcher["head_start_ray_commands"][-1],
                                                                    keys_launcher["worker_start_ray_commands"][-1]))
    role_launcher = yaml.safe_load(texts[tmp_path / "1" / "ray-cluster-aws.yaml"])
    assert role_launcher["available_node_types"]["worker_gpu"]["node_config"]["IamInstanceProfile"] == {"Name": "ray-autoscaler-v1"}
    assert "storage.env" not in texts[tmp_path / "1" / "ray-cluster-aws.yaml"].split("\ncluster_name:")[1]

    cluster = yaml.safe_load(texts[tmp_path / "3" / "raycluster.yaml"])
    for group in (cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]):
        (container,) = group["template"]["spec"]["containers"]
        storage_env = {e["name"]: e for e in container["env"] if e["name"].startswith("AWS_")}
        assert set(storage_env) == set(FAKE_SECRETS)
        for name, entry in storage_env.items():
            assert "value" not in entry and entry["valueFrom"]["secretKeyRef"]["name"] == "shoulders-storage"
            assert entry["valueFrom"]["secretKeyRef"]["key"] == name
    role = yaml.safe_load(texts[tmp_path / "4" / "rayjob.yaml"])
    head_pod = role["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert head_pod["serviceAccountName"] == "sa" and not any(e["name"].startswith("AWS_") for e in head_pod["containers"][0]["env"])


def test_cli_writes_the_files_and_refuses_bad_options(tmp_path, capsys):
    assert main(["cluster", "config", "--provider", "kuberay", "--source", SOURCE, "--storage", STORAGE, "-o", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raycluster.yaml", "rayjob.yaml"]
    assert capsys.readouterr().out.split() == [str(tmp_path / "raycluster.yaml"), str(tmp_path / "rayjob.yaml")]

    with pytest.raises(SystemExit) as exit_info:
        main(["cluster", "config", "--provider", "azure", "-o", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "'aws', 'gcp', 'kuberay'" in capsys.readouterr().err

    refusals = {
        "--source": ["--provider", "aws"],
        "--storage": ["--provider", "kuberay", "--source", SOURCE],
        "--project": ["--provider", "gcp", "--source", SOURCE],
        "local wheel": ["--provider", "kuberay", "--source", "dist/shoulders-0.1.0-py3-none-any.whl", "--storage", STORAGE],
        "--service-account": ["--provider", "kuberay", "--image", "i", "--storage", STORAGE, "--credentials", "role"],
        "--max-workers": ["--provider", "aws", "--source", SOURCE, "--min-workers", "5", "--max-workers", "4"],
        "--name": ["--provider", "kuberay", "--image", "i", "--storage", STORAGE, "--name", "Shoulders_GPU"],
    }
    for named, command in refusals.items():
        assert main(["cluster", "config", *command, "-o", str(tmp_path / "refused")]) == 2, named
        assert named in capsys.readouterr().err, named
    assert not (tmp_path / "refused").exists()


def deploy_files() -> list[Path]:
    return sorted(DEPLOY.glob("*.yaml"))


def test_deploy_examples_are_the_generators_output():
    """cluster/deploy/*.yaml are generated: each starts with the command that wrote it, and running it again
    gives the same text (edit the generator, then rerun the command from the repository root)."""
    assert [p.name for p in deploy_files()] == ["ray-cluster-aws.yaml", "ray-cluster-gcp.yaml", "raycluster.yaml", "rayjob.yaml"]
    for path in deploy_files():
        first = path.read_text().splitlines()[0]
        assert first.startswith("# Generated by: shoulders cluster config "), f"{path}: not generated by shoulders cluster config"
        args = build_parser().parse_args(shlex.split(first.removeprefix("# Generated by: "))[1:])
        assert args.out == "cluster/deploy"
        expected = render(config_options(args), args.out)[path.name]
        assert path.read_text() == expected, f"{path} differs from the generator's output: rerun `{first.removeprefix('# Generated by: ')}`"


def test_deploy_examples_validate(kuberay_validators):
    for path in deploy_files():
        document = yaml.safe_load(path.read_text())
        if document.get("apiVersion") == "ray.io/v1":
            check_kuberay(document, kuberay_validators)
        else:
            check_as_ray_up_does(document)


def test_cluster_config_imports_neither_torch_nor_ray(tmp_path):
    script = textwrap.dedent(f"""
        import json, sys
        from cluster.cli.main import main
        assert main(["cluster", "config", "--provider", "kuberay", "--source", "x", "--storage", "s3://b/p", "-o", {str(tmp_path)!r}]) == 0
        assert main(["cluster", "config", "--provider", "aws", "--source", "x", "-o", {str(tmp_path)!r}]) == 0
        heavy = ["torch", "ray", "engine.loop.recipe", "transformers", "peft", "deepspeed"]
        print(json.dumps({{name: name in sys.modules for name in heavy}}))
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not any(loaded.values()), loaded
