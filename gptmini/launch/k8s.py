"""The Kubernetes launcher: one Kubeflow Trainer TrainJob on the `torch-distributed` ClusterTrainingRuntime.

    TrainJob (numNodes N)  ->  JobSet  ->  N pods `<name>-node-0-<i>`, each `torchrun -m gptmini.train ...`

Kubeflow Trainer places the nodes and tells torchrun everything it needs through the PET_* variables torchrun
reads as its flags' defaults: PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK (the pod's completion index),
PET_MASTER_ADDR (`<name>-node-0-0.<name>`, the first pod behind the JobSet's headless service) and
PET_MASTER_PORT. So the command names no rendezvous at all. Every node mounts the shared state claim at /state
(the run folder and the shards must be at the same path on every node), and the trainer runs with
`--resume auto`, so a retried TrainJob resumes from the run's last checkpoint. Deleting the TrainJob deletes its
pods, which get SIGTERM first (the trainer checkpoints on it).

Written against kubeflow-trainer-api 2.3 (trainer.kubeflow.org/v1alpha1, whose models tests/test_k8s.py
validates the manifest with) and, for what the models don't say, Kubeflow Trainer's source: the Torch plugin
(the PET_* variables), pkg/constants (the `node` job and container), trainjob_types.go (the Complete, Failed and
Suspended conditions, the DeadlineExceeded reason, the RFC 1035 name rule) and the Kubeflow SDK's pod labels.
The calls to the cluster (submit, job_state, follow, cancel) use the official `kubernetes` client; no cluster
ran them here.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from functools import cache
from typing import Any, Callable

from gptmini.errors import Failure, UserError

GROUP, VERSION, PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
# The torch-distributed runtime's replicated job and its trainer container are both named `node`.
NODE = "node"
STATE_MOUNT = "/state"
GPU = "nvidia.com/gpu"
# Who owns our runtime patch; Kubeflow Trainer keys patches by it.
MANAGER = "gptmini"
# The pods of a TrainJob carry its JobSet's labels (the JobSet is named as the TrainJob) and their Job's
# completion index, which is also the torchrun node rank.
JOBSET_LABEL = "jobset.sigs.k8s.io/jobset-name"
REPLICATED_JOB_LABEL = "jobset.sigs.k8s.io/replicatedjob-name"
NODE_RANK_LABEL = "batch.kubernetes.io/job-completion-index"
# The torch runtime sets these itself, and its webhook refuses a TrainJob that sets them too.
RESERVED_ENV = frozenset({"PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT"})
TERMINAL = frozenset({"COMPLETED", "FAILED", "DEADLINE"})

DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
RFC1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


class K8sError(UserError):
    """The API server refused the TrainJob (invalid, a name taken, no permission, Kubeflow Trainer not
    installed): a retry can't help."""


def check_name(name: str, nnodes: int) -> None:
    """A TrainJob name the Trainer accepts and that fits its pods' hostnames, `<name>-node-0-<rank>`: a
    hostname is one DNS label of at most 63 characters, and PET_MASTER_ADDR is the first pod's."""
    longest = 63 - len(f"-{NODE}-0-{nnodes - 1}")
    if not RFC1035_LABEL.fullmatch(name) or len(name) > longest:
        raise UserError(f"TrainJob name {name!r} is not a Kubernetes name of at most {longest} characters for "
                        f"{nnodes} node(s): use lower-case letters, digits and '-', starting with a letter and "
                        "ending with a letter or digit, e.g. 'gptmini-demo'")


def check_inputs(name: str, *, nnodes: int, nproc_per_node: int, image: str, namespace: str, gpus_per_node: int,
                 runtime: str, state_claim: str, env: dict[str, str]) -> None:
    if nnodes < 1 or nproc_per_node < 1 or gpus_per_node < 0:
        raise UserError(f"nnodes ({nnodes}) and nproc_per_node ({nproc_per_node}) must be >= 1 and gpus_per_node "
                        f"({gpus_per_node}) >= 0")
    if gpus_per_node and nproc_per_node > gpus_per_node:
        raise UserError(f"nproc_per_node ({nproc_per_node}) is more than gpus_per_node ({gpus_per_node}): each "
                        "process drives one GPU; set nproc_per_node to the GPUs per node")
    check_name(name, nnodes)
    if not DNS_LABEL.fullmatch(namespace) or len(namespace) > 63:
        raise UserError(f"namespace {namespace!r} is not a Kubernetes namespace name (lower-case letters, digits "
                        "and '-', at most 63 characters); `kubectl get namespaces` lists them")
    for what, value, lister in (("state_claim", state_claim, "kubectl get pvc"),
                                ("runtime", runtime, "kubectl get clustertrainingruntimes")):
        if not DNS_SUBDOMAIN.fullmatch(value) or len(value) > 253:
            raise UserError(f"{what} {value!r} is not a Kubernetes object name (lower-case letters, digits, '-' "
                            f"and '.'); `{lister}` lists them")
    if not image.strip():
        raise UserError("image is empty; give the gptmini image the nodes pull, e.g. "
                        "'registry.example.com/gptmini:cuda'")
    if reserved := sorted(RESERVED_ENV & env.keys()):
        raise UserError(f"env sets {', '.join(reserved)}, which Kubeflow Trainer's torch runtime sets from numNodes "
                        "and numProcPerNode; drop them and set nnodes / nproc_per_node instead")


def node_patch(state_claim: str) -> dict[str, Any]:
    """The pod spec patch for every node: the shared state claim at /state, and a /dev/shm in memory (the
    container runtime's default is 64 MiB, too small for NCCL and for tensors shared between ranks)."""
    return {
        "volumes": [{"name": "state", "persistentVolumeClaim": {"claimName": state_claim}},
                    {"name": "dshm", "emptyDir": {"medium": "Memory"}}],
        "containers": [{"name": NODE, "volumeMounts": [{"name": "state", "mountPath": STATE_MOUNT},
                                                       {"name": "dshm", "mountPath": "/dev/shm"}]}],
    }


def trainjob_manifest(name: str, trainer_args: list[str], *, nnodes: int, nproc_per_node: int, image: str,
                      namespace: str = "default", gpus_per_node: int = 0, runtime: str = "torch-distributed",
                      state_claim: str = "gptmini-state", env: dict[str, str] | None = None) -> dict:
    """The TrainJob that runs `torchrun -m gptmini.train <trainer_args>` on `nnodes` nodes: infra/k8s/trainjob.yaml
    is this function's output for that file's parameters (tests/test_k8s.py holds them equal)."""
    env = env or {}
    check_inputs(name, nnodes=nnodes, nproc_per_node=nproc_per_node, image=image, namespace=namespace,
                 gpus_per_node=gpus_per_node, runtime=runtime, state_claim=state_claim, env=env)
    node_env = {"GPTMINI_STATE": STATE_MOUNT, "PYTHONUNBUFFERED": "1", **env}
    trainer: dict[str, Any] = {
        "image": image,
        "command": ["torchrun", "-m", "gptmini.train"],  # no flags: torchrun reads them from the PET_* variables
        "args": list(trainer_args),
        "numNodes": nnodes,
        "numProcPerNode": nproc_per_node,
        "env": [{"name": key, "value": value} for key, value in node_env.items()],
    }
    if gpus_per_node:
        trainer["resourcesPerNode"] = {"limits": {GPU: str(gpus_per_node)}}
    patch = {"manager": MANAGER, "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [
        {"name": NODE, "template": {"spec": {"template": {"spec": node_patch(state_claim)}}}}]}}}}
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainJob",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/part-of": "gptmini"}},
        "spec": {"runtimeRef": {"name": runtime}, "trainer": trainer, "runtimePatches": [patch]},
    }


def state_of(trainjob: dict) -> str:
    """A TrainJob's state as Slurm names it, from its status: COMPLETED, FAILED, DEADLINE (activeDeadlineSeconds
    ran out), SUSPENDED, else RUNNING once a node Job has all its pods ready, PENDING before."""
    status = trainjob.get("status") or {}
    true = {c["type"]: c.get("reason", "") for c in status.get("conditions") or [] if c.get("status") == "True"}
    if "Complete" in true:
        return "COMPLETED"
    if "Failed" in true:
        return "DEADLINE" if true["Failed"] == "DeadlineExceeded" else "FAILED"
    if "Suspended" in true:
        return "SUSPENDED"
    ready = any(job.get("ready", 0) > 0 for job in status.get("jobsStatus") or [] if job.get("name") == NODE)
    return "RUNNING" if ready else "PENDING"


# Talking to the cluster


@cache
def _client() -> Any:
    """The `kubernetes` client package, configured from ~/.kube/config or, inside a pod, its service account."""
    try:
        import kubernetes
    except ImportError:
        raise UserError("the k8s launcher needs the Kubernetes client: pip install 'gptmini[k8s]'") from None
    try:
        kubernetes.config.load_config()
    except kubernetes.config.ConfigException as exc:
        raise Failure(f"no Kubernetes cluster configured ({exc}): set KUBECONFIG or run inside a pod") from None
    return kubernetes


def _message(body: str | None) -> str:
    """The reason in an API server's error body (a Status object), else the body as it came."""
    try:
        return json.loads(body or "")["message"]
    except (ValueError, KeyError, TypeError):
        return body or "no reason given"


def submit(manifest: dict) -> str:
    """Create the TrainJob; returns its name. One the API server refuses is a K8sError with its reason."""
    k8s = _client()
    meta = manifest["metadata"]
    try:
        k8s.client.CustomObjectsApi().create_namespaced_custom_object(
            GROUP, VERSION, meta.get("namespace", "default"), PLURAL, manifest)
    except k8s.client.ApiException as exc:
        if exc.status == 404:
            raise K8sError(f"the cluster does not know TrainJobs ({GROUP}/{VERSION}) or namespace "
                           f"{meta.get('namespace')!r}: install Kubeflow Trainer, or fix the namespace") from None
        if exc.status in (400, 403, 409, 422):  # malformed, no permission, the name taken, invalid
            raise K8sError(f"the API server refused TrainJob {meta['name']!r} ({exc.status} {exc.reason}): "
                           f"{_message(exc.body)}") from None
        raise
    return meta["name"]


def job_state(name: str, namespace: str = "default") -> str | None:
    """PENDING, RUNNING, COMPLETED, ... (see state_of); None when the TrainJob does not exist (deleted)."""
    k8s = _client()
    try:
        job = k8s.client.CustomObjectsApi().get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except k8s.client.ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return state_of(job)


def cancel(name: str, namespace: str = "default") -> None:
    """Delete the TrainJob; its JobSet and pods go with it, each pod getting SIGTERM (the trainer checkpoints)."""
    k8s = _client()
    try:
        k8s.client.CustomObjectsApi().delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except k8s.client.ApiException as exc:
        if exc.status != 404:
            raise


def _first_node_pod(name: str, namespace: str) -> Any | None:
    """The newest pod of node rank 0 (a restarted node is a new pod), or None before there is one."""
    selector = f"{JOBSET_LABEL}={name},{REPLICATED_JOB_LABEL}={NODE},{NODE_RANK_LABEL}=0"
    pods = _client().client.CoreV1Api().list_namespaced_pod(namespace, label_selector=selector).items
    return max(pods, key=lambda pod: pod.metadata.creation_timestamp, default=None)


def _stream_log(pod: Any, namespace: str, on_line: Callable[[str], None]) -> bool:
    """Send the node container's log into on_line until the container ends; False if it has not started."""
    k8s = _client()
    try:
        for line in k8s.watch.Watch().stream(k8s.client.CoreV1Api().read_namespaced_pod_log,
                                             name=pod.metadata.name, namespace=namespace, container=NODE):
            on_line(line)
    except k8s.client.ApiException as exc:
        if exc.status == 400:  # "container ... is waiting to start"
            return False
        raise
    return True


def _attempt(pod: Any) -> tuple[str, int]:
    """Which run of the node container this is: the pod, and how often the kubelet restarted it in place."""
    statuses = pod.status.container_statuses or []
    return pod.metadata.name, sum(s.restart_count for s in statuses if s.name == NODE)


def follow(name: str, namespace: str, on_line: Callable[[str], None], poll: float = 5.0) -> str:
    """Stream the node-0 pod's log (rank 0 logs for the run) into on_line until the TrainJob ends; returns its end
    state, CANCELLED if someone deleted it. If this is interrupted (the flow run cancelled, Ctrl-C), the TrainJob
    is deleted: nothing keeps running that nobody follows."""
    streamed: set[tuple[str, int]] = set()
    state: str | None = None
    try:
        while True:
            state = job_state(name, namespace)
            if state is None:
                return "CANCELLED"
            pod = _first_node_pod(name, namespace)
            started = pod is not None and pod.status.phase in ("Running", "Succeeded", "Failed")
            if started and (attempt := _attempt(pod)) not in streamed and _stream_log(pod, namespace, on_line):
                streamed.add(attempt)
                continue  # the container ended: read the state again at once
            if state in TERMINAL:
                return state
            time.sleep(poll)
    finally:
        if state is not None and state not in TERMINAL:
            cancel(name, namespace)


@dataclass
class K8sOptions:
    """Where the TrainJob runs: the image (infra/Dockerfile, a CUDA build for GPUs), its namespace, GPUs per node,
    the ReadWriteMany claim mounted at /state in every node (the flow's state folder must be that same claim),
    and the ClusterTrainingRuntime Kubeflow Trainer installs."""
    image: str = "gptmini:latest"
    namespace: str = "default"
    gpus_per_node: int = 0
    state_claim: str = "gptmini-state"
    runtime: str = "torch-distributed"


def launch(trainer_args: list[str], name: str, *, nnodes: int, nproc_per_node: int, options: K8sOptions,
           on_line: Callable[[str], None]) -> str:
    """Create the TrainJob `name` (replacing a finished one of that name, from an earlier attempt) and follow it to
    its end; returns the end state."""
    manifest = trainjob_manifest(name, trainer_args, nnodes=nnodes, nproc_per_node=nproc_per_node,
                                 image=options.image, namespace=options.namespace,
                                 gpus_per_node=options.gpus_per_node, runtime=options.runtime,
                                 state_claim=options.state_claim)
    if job_state(name, options.namespace) is not None:
        cancel(name, options.namespace)
        while job_state(name, options.namespace) is not None:  # deletion is asynchronous
            time.sleep(1)
    submit(manifest)
    return follow(name, options.namespace, on_line)
