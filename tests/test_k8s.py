"""infra/k8s and the k8s launcher, checked offline by the tools that define what is valid (no cluster runs here):

- plain Kubernetes manifests: Kubernetes' own OpenAPI schemas, strict (kubernetes-validate);
- the work pool's base job template: the checks Prefect's server runs on `prefect work-pool create`, then the
  Kubernetes worker's own rendering of a flow run's Job, whose manifest must pass Kubernetes' schemas too;
- the TrainJob: Kubeflow Trainer's generated API models (kubeflow-trainer-api), with unknown fields refused.
"""
from __future__ import annotations

import asyncio
import copy
import json
import sys
from pathlib import Path
from uuid import uuid4

import kubernetes_validate
import pytest
import yaml
from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.objects import FlowRun
from prefect.server.schemas.actions import WorkPoolCreate
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.utilities.schema_tools.validation import is_valid_schema, validate
from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration
from pydantic import ValidationError

from gptmini.errors import UserError
from gptmini.launch import k8s

K8S = Path(__file__).resolve().parents[1] / "infra" / "k8s"
PLAIN = ["pvc.yaml", "prepare-job.yaml", "rbac.yaml"]  # core Kubernetes kinds only
# A Kubernetes release clusters still run, and the newest the validator ships.
VERSIONS = ["1.33", kubernetes_validate.latest_version()]
# infra/k8s/trainjob.yaml is trainjob_manifest(*TRAINJOB_ARGS, **TRAINJOB_KWARGS).
TRAINJOB_ARGS = ("gptmini-demo", ["--preset", "demo", "--data-dir", "/state/data/shards", "--out",
                                  "/state/runs/gptmini-demo", "--parallel", "ddp", "--resume", "auto"])
TRAINJOB_KWARGS = dict(nnodes=2, nproc_per_node=1, image="gptmini:latest", gpus_per_node=1,
                       env={"MLFLOW_TRACKING_URI": "http://mlflow:5000"})


def load_all(name: str) -> list[dict]:
    return list(yaml.safe_load_all((K8S / name).read_text()))


def template() -> dict:
    return json.loads((K8S / "work-pool-template.json").read_text())


def test_every_file_in_infra_k8s_is_checked_here():
    assert sorted(p.name for p in K8S.iterdir()) == sorted([*PLAIN, "trainjob.yaml", "work-pool-template.json"])


# Plain Kubernetes manifests


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", PLAIN)
def test_plain_manifests_match_kubernetes_schemas(name: str, version: str):
    for obj in load_all(name):
        kubernetes_validate.validate(obj, version, strict=True)


def test_kubernetes_schemas_refuse_a_misspelled_field():
    pvc = load_all("pvc.yaml")[0]
    pvc["spec"]["accessMode"] = pvc["spec"].pop("accessModes")
    with pytest.raises(kubernetes_validate.ValidationError, match="accessMode"):
        kubernetes_validate.validate(pvc, VERSIONS[-1], strict=True)


# The work pool's base job template


def test_work_pool_template_passes_prefect_servers_checks():
    """What the server checks on `prefect work-pool create --base-job-template`: every placeholder of the job
    configuration is a declared variable (WorkPoolCreate), the variables are a valid schema, and their defaults
    conform to it (validate_job_variable_defaults_for_work_pool, through the same schema_tools calls)."""
    tpl = template()
    WorkPoolCreate(name="gptmini-k8s", type="kubernetes", base_job_template=tpl)
    is_valid_schema(tpl["variables"], preprocess=False)
    defaults = {key: spec["default"] for key, spec in tpl["variables"]["properties"].items() if "default" in spec}
    validate(defaults, tpl["variables"], raise_on_error=True, preprocess=True, ignore_required=True,
             allow_none_with_default=True)


def test_prefect_server_refuses_an_undeclared_placeholder():
    tpl = template()
    tpl["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"][
        "claimName"] = "{{ state_clam }}"
    with pytest.raises(ValidationError, match="state_clam"):
        WorkPoolCreate(name="gptmini-k8s", type="kubernetes", base_job_template=tpl)


def flow_run_job(values: dict) -> KubernetesWorkerJobConfiguration:
    """The Job the Kubernetes worker would create for a flow run of a deployment with these job variables: the
    worker's own templating (from_template_and_values) and per-run preparation (env, labels, command)."""
    # The client would resolve Prefect blocks and variables the template names; it names none, so it is never
    # called, and no server is needed.
    client = PrefectClient(api="http://127.0.0.1:9/api")
    config = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(template(), values, client=client))
    config.prepare_for_flow_run(FlowRun(flow_id=uuid4(), name="gentle-fox"))
    return config


def pod_spec(config: KubernetesWorkerJobConfiguration) -> dict:
    return config.job_manifest["spec"]["template"]["spec"]


def for_kubernetes(job: dict) -> dict:
    """The manifest as the API server keeps it. prefect-kubernetes's validator demands `parallelism` and
    `completions` inside the pod spec (a quirk of its default template), which is no place Kubernetes has
    them; the API server drops unknown fields with a warning (fieldValidation=Warn, its default). Strict
    validation of everything else still applies."""
    job = copy.deepcopy(job)
    for key in ("parallelism", "completions"):
        job["spec"]["template"]["spec"].pop(key)
    return job


OVERRIDES = {"image": "registry.example.com/gptmini:cuda", "gpus": 1, "memory_limit": "32Gi",
             "prefect_api_url": "http://prefect-server.prefect.svc.cluster.local:4200/api",
             "env": {"NCCL_DEBUG": "WARN"}}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("values", [{}, OVERRIDES], ids=["defaults", "overrides"])
def test_flow_run_job_matches_kubernetes_schemas(values: dict, version: str):
    validate(values, template()["variables"], raise_on_error=True, preprocess=True, ignore_required=True,
             allow_none_with_default=True)  # as the server checks a deployment's job variables
    kubernetes_validate.validate(for_kubernetes(flow_run_job(values).job_manifest), version, strict=True)


def test_flow_run_pod_mounts_the_shared_state_where_gptmini_state_points():
    spec = pod_spec(flow_run_job({}))
    container = spec["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["GPTMINI_STATE"] == "/state" and env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert container["volumeMounts"] == [{"name": "state", "mountPath": "/state"}]
    assert spec["volumes"] == [{"name": "state", "persistentVolumeClaim": {"claimName": "gptmini-state"}}]
    assert container["image"] == "gptmini:latest" and spec["serviceAccountName"] == "gptmini"
    assert container["resources"] == {"limits": {}, "requests": {"cpu": "2", "memory": "8Gi"}}


def test_flow_run_pod_takes_overrides():
    container = pod_spec(flow_run_job(OVERRIDES))["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["PREFECT_API_URL"] == OVERRIDES["prefect_api_url"] and env["NCCL_DEBUG"] == "WARN"
    assert env["GPTMINI_STATE"] == "/state"  # a deployment's env adds to the template's, not replaces it
    assert container["resources"]["limits"] == {"memory": "32Gi", "nvidia.com/gpu": 1}
    assert container["image"] == OVERRIDES["image"]


def test_flow_run_pod_keeps_the_workers_prefect_api_url_when_unset():
    with temporary_settings({PREFECT_API_URL: "http://prefect.internal:4200/api"}):
        env = {e["name"]: e.get("value") for e in pod_spec(flow_run_job({}))["containers"][0]["env"]}
    assert env["PREFECT_API_URL"] == "http://prefect.internal:4200/api"


# The TrainJob


def through_trainer_models(manifest: dict) -> dict:
    """The manifest as Kubeflow Trainer's API models read it (types checked strictly) and write it back. from_dict
    drops a field it does not know, so a manifest that comes back unchanged has no unknown field either."""
    return TrainerV1alpha1TrainJob.from_dict(manifest).to_dict()


def test_trainjob_yaml_is_the_launchers_manifest():
    assert load_all("trainjob.yaml") == [k8s.trainjob_manifest(*TRAINJOB_ARGS, **TRAINJOB_KWARGS)]


@pytest.mark.parametrize("gpus_per_node", [0, 8])
def test_trainjob_matches_kubeflow_trainer_models(gpus_per_node: int):
    for job in (load_all("trainjob.yaml")[0],
                k8s.trainjob_manifest("run-1", ["--preset", "tiny"], nnodes=4, nproc_per_node=max(1, gpus_per_node),
                                      image="gptmini:cuda", namespace="ml", gpus_per_node=gpus_per_node)):
        assert through_trainer_models(job) == job


def node_pod_patch(job: dict) -> dict:
    return job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0][
        "template"]["spec"]["template"]["spec"]


def test_trainer_model_check_catches_a_misspelled_field():
    job = load_all("trainjob.yaml")[0]
    node_pod_patch(job)["volume"] = node_pod_patch(job).pop("volumes")
    read = through_trainer_models(job)
    assert "volume" not in node_pod_patch(read) and read != job


def test_trainer_model_check_catches_a_wrong_type():
    job = load_all("trainjob.yaml")[0]
    job["spec"]["trainer"]["numNodes"] = "2"
    with pytest.raises(ValidationError, match="numNodes"):
        through_trainer_models(job)


def status(conditions: list[tuple[str, str]] = (), ready: int = 0) -> dict:
    """A TrainJob with this status: (type, reason) conditions that are True, and node Jobs ready."""
    job = load_all("trainjob.yaml")[0]
    job["status"] = {
        "conditions": [{"type": kind, "status": "True", "reason": reason, "message": "",
                        "lastTransitionTime": "2026-01-01T00:00:00Z"} for kind, reason in conditions],
        "jobsStatus": [{"name": "node", "active": 1, "ready": ready, "succeeded": 0, "failed": 0, "suspended": 0}],
    }
    TrainerV1alpha1TrainJob.from_dict(job)  # a status the Trainer's models accept
    return job


@pytest.mark.parametrize("job, state", [
    (status(), "PENDING"),
    (status(ready=1), "RUNNING"),
    (status([("Suspended", "Suspended")]), "SUSPENDED"),
    (status([("Complete", "JobSetCompleted")]), "COMPLETED"),
    (status([("Failed", "FailedJobs")]), "FAILED"),
    (status([("Failed", "DeadlineExceeded")]), "DEADLINE"),
], ids=["pending", "running", "suspended", "complete", "failed", "deadline"])
def test_trainjob_status_reads_as_slurm_names_it(job: dict, state: str):
    assert k8s.state_of(job) == state


# The launcher's input checks


@pytest.mark.parametrize("change, names", [
    (dict(nnodes=0), ["nnodes (0)"]),
    (dict(nproc_per_node=0), ["nproc_per_node (0)"]),
    (dict(gpus_per_node=2, nproc_per_node=4), ["nproc_per_node (4)", "GPUs per node"]),
    (dict(name="GPTmini"), ["'GPTmini'", "lower-case"]),
    (dict(name="9lives"), ["'9lives'", "starting with a letter"]),
    (dict(name="a" * 55), ["at most 54 characters for 2 node(s)"]),
    (dict(namespace="ML_Team"), ["'ML_Team'", "kubectl get namespaces"]),
    (dict(state_claim="my claim"), ["'my claim'", "kubectl get pvc"]),
    (dict(image=" "), ["image is empty"]),
    (dict(env={"PET_NNODES": "3"}), ["PET_NNODES", "set nnodes"]),
], ids=["nnodes", "nproc", "nproc-over-gpus", "upper-case-name", "digit-first-name", "long-name", "namespace",
        "claim", "image", "reserved-env"])
def test_bad_trainjob_inputs_name_the_value_and_the_fix(change: dict, names: list[str]):
    kwargs = {"name": "gptmini-demo", "trainer_args": [], "nnodes": 2, "nproc_per_node": 1, "image": "gptmini:latest",
              **change}
    with pytest.raises(UserError) as raised:
        k8s.trainjob_manifest(**kwargs)
    for name in names:
        assert name in str(raised.value)


def test_without_the_kubernetes_client_the_launcher_says_what_to_install(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "kubernetes", None)  # as if `gptmini[k8s]` were not installed
    k8s._client.cache_clear()
    try:
        with pytest.raises(UserError, match=r"pip install 'gptmini\[k8s\]'"):
            k8s.job_state("gptmini-demo")
    finally:
        k8s._client.cache_clear()
