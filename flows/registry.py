"""The CSMF model in the MLflow registry: a pyfunc wrapper around a serving bundle, and look-ups.

    model = mlflow.pyfunc.load_model("models:/csmf@challenger")
    model.predict(pd.DataFrame({"user_id": [42, 7], "k": [10, 10], "weights": ["1,1.8,1.2", None]}))
    #  -> user_id, item_ids (list), scores (list), cold_start

    bundle = resolve_bundle("models:/csmf@champion")      # local bundle directory (cached)
    rec = load_recommender(None)                          # the champion (DEFAULT_REF)
    model = resolve_model(None)                           # bundle + the version it came from
    print(model.describe())                               # "csmf version 3 (models:/csmf@champion, ...)"

Registered model "csmf": every successful pipeline run logs a new version (`log_and_register`) and
points the alias "challenger" at it, except a re-run whose inputs (dataset digest, training config,
code version, date) and model (`model_digest`) equal an existing version's: that version is reused
(`find_version`), so identical re-runs do not fill the registry with copies. "champion" moves only
through `promote`, which the flow's gate task calls when flows/gate.py says so (the first model the
evaluation data can measure becomes champion, so a fresh installation can serve
`models:/csmf@champion` after its first run on a normal day). The pyfunc is logged from code
(flows/pyfunc_model.py, nothing pickled) and carries the bundle as the artifact "bundle" and the
`csmf_core`, `data_contracts` and `flows` source trees as code paths, so it loads without this
checkout (given the pinned requirements). Each version has a signature and an input example
(`model_signature`, `input_example`), params and metrics on its logged model, and its model card as
description (flows/model_card.py); the registered model "csmf" has a description too.

This module never imports prefect: it is loaded inside model servers.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import yaml

from csmf_core.fsutil import whole_by_manifest, write_manifest
from flows import serve_limits
from flows.env import resolve_home
from flows.inputs import contained, safe_name
from flows.model_card import registered_description
from flows.names import DATASET_TAG, DATE_TAG, GATE_VERIFIED_TAG, RUN_TAG

REGISTERED_MODEL = "csmf"
CHALLENGER, CHAMPION = "challenger", "champion"
# what every consumer (csmf recommend / embed / evaluate, serving) loads when given no reference: the
# version the gate promoted, never merely the newest one (which may be a challenger it rejected)
DEFAULT_REF = f"models:/{REGISTERED_MODEL}@{CHAMPION}"
DEFAULT_K = 50
REQUIREMENTS = (
    "torch",
    "numpy",
    "pandas",
    "pyarrow",
    "polars",
    "faiss-cpu",
    "pyyaml",
    "mlflow",
)
MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")  # the models-from-code file MLflow runs
_PACKAGES = ("csmf_core", "data_contracts", "flows")
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


class CSMFPyfunc(mlflow.pyfunc.PythonModel):
    """pyfunc over `csmf_core.serving.Recommender`.

    Input: a DataFrame with `user_id` (int) and optionally `k` (int, default 50), `weights` (per
    row: a list of N floats, a "k0,k1,k2" string, or empty = the bundle's default fused weights) and
    `mode` (per row: an objective's name or index for that stage's own ranking; not with weights).
    Other columns are refused by the scoring server's guard (serve_limits.check_columns).
    Output: one row per input row, same order: user_id, item_ids (list[int]), scores (list[float]),
    cold_start (bool: the user id is unknown to the model and got the generic vector).

    Ids are int64 end to end (csmf_core/ids.py): an id outside int64, a string, a bool, a missing id,
    a non-integral float, or a float beyond 2**53 (where a float may already be another id: pandas
    makes a whole column float when one row is) is refused, never rounded.

    Bad input (no user_id column, such an id, more rows than CSMF_SERVE_MAX_USERS, k outside 1..MAX_K,
    weights that are not one finite non-negative number per objective) raises MlflowException
    INVALID_PARAMETER_VALUE, which `mlflow models serve` answers with HTTP 400 and the message;
    anything else would be a generic 400. Inside the scoring server `load_context` also installs the
    body size and JSON depth limits (flows/serve_limits.py).
    """

    def load_context(self, context: Any) -> None:
        from csmf_core.serving import Recommender

        self.limits = serve_limits.Limits.from_env()  # a bad setting stops the server at start
        if serve_limits.in_scoring_server():
            serve_limits.install_request_guard(self.limits)
        self.recommender = Recommender.load(context.artifacts["bundle"])

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        try:
            return self._predict(model_input)
        except (ValueError, TypeError, KeyError) as exc:
            raise mlflow.exceptions.MlflowException.invalid_parameter_value(
                f"csmf: {exc}. Input: user_id (int), optional k (1..{_max_k()}), optional weights "
                "(one number >= 0 per objective, e.g. '1,1.8,1.2') or mode (an objective's name or index)"
            ) from exc

    def _predict(self, model_input: pd.DataFrame) -> pd.DataFrame:
        if not isinstance(model_input, pd.DataFrame):
            raise TypeError(f"expected a DataFrame with a user_id column, got {type(model_input).__name__}")
        if "user_id" not in model_input.columns:
            raise ValueError(f"input needs a user_id column, got columns {list(model_input.columns)}")
        limits = getattr(self, "limits", None) or serve_limits.Limits.from_env()
        if len(model_input) > limits.max_users:
            raise ValueError(
                f"{len(model_input):,} users in one request, more than "
                f"{serve_limits.ENV_MAX_USERS}={limits.max_users:,}; split them over several requests"
            )
        users = [_user_id(u) for u in model_input["user_id"]]
        ks = [_k(v) for v in model_input["k"]] if "k" in model_input.columns else [DEFAULT_K] * len(users)
        ws = (
            [_weights(v) for v in model_input["weights"]]
            if "weights" in model_input.columns
            else [None] * len(users)
        )
        modes = (
            [_mode(v) for v in model_input["mode"]] if "mode" in model_input.columns else [None] * len(users)
        )
        for r, (w, m) in enumerate(zip(ws, modes)):
            if w is not None and m is not None:
                raise ValueError(
                    f"row {r}: weights {list(w)} and mode {m!r} given; a row ranks by one of them"
                )
        out: list[dict | None] = [None] * len(users)
        groups: dict[tuple, list[int]] = {}
        for r, key in enumerate(zip(ks, ws, modes)):
            groups.setdefault(key, []).append(r)
        for (k, w, m), rows in groups.items():  # one batched query per distinct (k, weights, mode)
            recs = self.recommender.recommend([users[r] for r in rows], k=k, weights=w, mode=m)
            for r, rec in zip(rows, recs):
                out[r] = rec
        return pd.DataFrame(
            {
                "user_id": users,
                "item_ids": [o["items"] for o in out],
                "scores": [o["scores"] for o in out],
                "cold_start": [o["cold_start"] for o in out],
            }
        )


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip())


def _max_k() -> int:
    from csmf_core.serving import MAX_K

    return MAX_K


def _user_id(v: Any) -> int:
    """A row's user id: an exact int64 (csmf_core.ids.check_id), never through float."""
    from csmf_core.ids import check_id

    if _missing(v):
        raise ValueError(f"user_id is missing ({v!r}); every row needs an integer user_id")
    return check_id(v, "user_id")


def _mode(v: Any) -> int | str | None:
    """A row's mode: missing = None (fused); an objective's name, or its index (1.0 from a JSON float
    column is 1); the Recommender checks it against the bundle's objectives."""
    if _missing(v):
        return None
    if isinstance(v, str):
        return v.strip()
    if isinstance(v, bool) or not float(v).is_integer():
        raise ValueError(f"mode must be an objective's name or index, got {v!r}")
    return int(v)


def _k(v: Any) -> int:
    """A row's k: missing = DEFAULT_K; else an integer 1..MAX_K (10.0 from a JSON float column is 10;
    a string is refused, as for user_id)."""
    if _missing(v):
        return DEFAULT_K
    if isinstance(v, str):
        raise ValueError(f"k must be an integer from 1 to {_max_k()}, got the string {v!r}")
    try:
        f = float(v)
    except (TypeError, ValueError):
        f = float("nan")
    if isinstance(v, bool) or not f.is_integer() or not 1 <= f <= _max_k():
        raise ValueError(f"k must be an integer from 1 to {_max_k()}, got {v!r}")
    return int(f)


def _weights(v: Any) -> tuple[float, ...] | None:
    """A row's weights: None (bundle default), "1,1.8,1.2", or a list/array of floats."""
    if v is None or (isinstance(v, float | str) and _missing(v)):
        return None
    if isinstance(v, str):
        try:
            return tuple(float(x) for x in v.replace("[", "").replace("]", "").split(",") if x.strip())
        except ValueError as exc:
            raise ValueError(f"weights {v!r}: expected comma-separated numbers like '1,1.8,1.2'") from exc
    return tuple(float(x) for x in v)


def pinned_requirements() -> list[str]:
    """`name==version` of the installed serving dependencies (local labels such as +cpu dropped)."""
    reqs = []
    for name in REQUIREMENTS:
        try:
            reqs.append(f"{name}=={metadata.version(name).split('+')[0]}")
        except metadata.PackageNotFoundError:
            continue
    return reqs


def code_paths() -> list[str]:
    """Source trees shipped with the model (flows/pyfunc_model.py imports flows.registry.CSMFPyfunc)."""
    root = Path(__file__).resolve().parents[1]
    return [str(root / p) for p in _PACKAGES]


def model_signature():
    """The pyfunc's signature: user_id, k, weights, mode -> user_id, item_ids, scores, cold_start.

    The input columns are typed `Any` on purpose: MLflow enforces a typed input schema before the
    model sees the request, casting ids through pandas dtypes (a float column, 2**63) and answering
    with its own messages; `CSMFPyfunc.predict` checks every value itself (exact int64 ids, k in
    1..MAX_K, one weight per objective) and names the problem. user_id is optional in the schema for
    the same reason: a request without it gets csmf's message ("input needs a user_id column")."""
    from mlflow.models import ModelSignature
    from mlflow.types import DataType
    from mlflow.types.schema import AnyType, Array, ColSpec, Schema

    inputs = Schema([ColSpec(AnyType(), name, required=False) for name in serve_limits.INPUT_COLUMNS])
    outputs = Schema(
        [
            ColSpec(DataType.long, "user_id"),
            ColSpec(Array(DataType.long), "item_ids"),
            ColSpec(Array(DataType.double), "scores"),
            ColSpec(DataType.boolean, "cold_start"),
        ]
    )
    return ModelSignature(inputs=inputs, outputs=outputs)


def input_example(bundle_dir: str | Path) -> pd.DataFrame:
    """Two known users of the bundle: the first with the default weights and k 10, the second with its
    default weights written out ("1,1.8,1.2") and k 5."""
    from csmf_core.bundle import read_vocab

    bundle = Path(bundle_dir)
    users = read_vocab(bundle / "features" / "users.parquet", "user_id")[:2].tolist()
    weights = ",".join(f"{w:g}" for w in json.loads((bundle / "bundle.json").read_text())["default_weights"])
    return pd.DataFrame(
        {"user_id": users, "k": [10, 5][: len(users)], "weights": [None, weights][: len(users)]}
    )


def pyfunc_spec(bundle_dir: str | Path) -> dict[str, Any]:
    """The keyword arguments of `mlflow.pyfunc.log_model` / `save_model` for a bundle: the model from
    code, the bundle artifact, code paths, signature, input example and pinned requirements."""
    return {
        "python_model": str(MODEL_CODE),
        "artifacts": {"bundle": str(Path(bundle_dir).resolve())},
        "code_paths": code_paths(),
        "signature": model_signature(),
        "input_example": input_example(bundle_dir),
        "pip_requirements": pinned_requirements(),
    }


@contextmanager
def _no_package_scan() -> Iterator[None]:
    """Within: MLflow's check of the model's requirements against this environment
    (`warn_dependency_requirement_mismatches`, run by every `log_model`) reads each one's installed
    version as it always does, without first mapping every installed distribution to its top-level
    modules (`importlib.metadata.packages_distributions()`: ~0.28 s a process on the 2-core VM,
    docs/performance.md). MLflow consults that map only for a requirement whose distribution
    metadata is missing; `pinned_requirements` read each version from that metadata, so it is
    never consulted here. An empty map stands in while the model is logged and the unbuilt state
    is put back after (a map MLflow had already built is left alone). MLflow's global is
    process-wide: a `log_model` without `pip_requirements` in another thread meanwhile would infer
    from the empty map (csmf has none). On an MLflow without these module globals this does
    nothing."""
    from mlflow.utils import requirements_utils as ru

    if getattr(ru, "_MODULES_TO_PACKAGES", ()) is not None:  # built already, or another MLflow
        yield
        return
    ru._MODULES_TO_PACKAGES = {}
    try:
        yield
    finally:
        ru._MODULES_TO_PACKAGES = None
        if hasattr(ru, "_PACKAGES_TO_MODULES"):
            ru._PACKAGES_TO_MODULES = None


def log_and_register(
    run_id: str,
    bundle_dir: str | Path,
    *,
    version_tags: Mapping[str, Any] | None = None,
    description: str | None = None,
    model_params: Mapping[str, Any] | None = None,
    model_metrics: Mapping[str, float] | None = None,
):
    """Log the bundle as a pyfunc model on `run_id` (`pyfunc_spec`; `model_params` and `model_metrics`
    on the logged model, the metrics also on the run), register it as a new version of "csmf" with
    `description` (its model card), describe the registered model, and set the aliases (module
    docstring). Returns the `ModelVersion`.

    Idempotent per pipeline run: when `version_tags[RUN_TAG]` names a pipeline run that already
    registered a version (a retry after a late failure), that version is reused.

    Uses the fluent API inside `start_run(run_id=...)`: the active run is thread-local, so this is
    safe inside a Prefect task thread. The run is left FINISHED.
    """
    tags = {k: str(v) for k, v in (version_tags or {}).items()}
    client = mlflow.MlflowClient()
    version = _registered_by(client, tags.get(RUN_TAG))  # a retry after a late failure reuses it
    if version is None:
        params = {k: str(v) for k, v in (model_params or {}).items()}
        with mlflow.start_run(run_id=run_id), _no_package_scan():
            info = mlflow.pyfunc.log_model(name="model", params=params or None, **pyfunc_spec(bundle_dir))
            if model_metrics:
                mlflow.log_metrics({k: float(v) for k, v in model_metrics.items()}, model_id=info.model_id)
        version = mlflow.register_model(info.model_uri, REGISTERED_MODEL, tags=tags)
    objectives = json.loads((Path(bundle_dir) / "bundle.json").read_text())["objectives"]
    client.update_registered_model(REGISTERED_MODEL, description=registered_description(objectives))
    if description:
        client.update_model_version(REGISTERED_MODEL, version.version, description=description)
    client.set_registered_model_alias(REGISTERED_MODEL, CHALLENGER, version.version)
    return client.get_model_version(REGISTERED_MODEL, version.version)


def champion(client: mlflow.MlflowClient | None = None):
    """The ModelVersion holding alias "champion", or None (no registered model or no champion yet)."""
    client = client or mlflow.MlflowClient()
    try:
        return client.get_model_version_by_alias(REGISTERED_MODEL, CHAMPION)
    except mlflow.exceptions.MlflowException:
        return None


def line_head(run_date: str, client: mlflow.MlflowClient | None = None, dataset: str | None = None):
    """The head of the training line for a run for `run_date` (train.start_from=line): the newest
    registered version (latest run date, then highest version) trained for a date before `run_date`
    whose gate verification passed (tag csmf.gate_verified=true), promoted or not; None when there
    is none. A version the gate never saw (its run died before the gate) or that failed verification
    is never continued. dataset: only versions trained on that dataset (tag csmf.dataset)."""
    best, best_key = None, None
    for v in _versions_or_none(client or mlflow.MlflowClient()):
        tags = v.tags or {}
        date = tags.get(DATE_TAG)
        if not date or date >= run_date or tags.get(GATE_VERIFIED_TAG) != "true":
            continue
        if dataset is not None and tags.get(DATASET_TAG) != dataset:
            continue
        key = (date, int(v.version))
        if best_key is None or key > best_key:
            best, best_key = v, key
    return best


def promote(version: str, client: mlflow.MlflowClient | None = None) -> None:
    """Point alias "champion" at `version` (the gate's decision; also for a manual rollback)."""
    (client or mlflow.MlflowClient()).set_registered_model_alias(REGISTERED_MODEL, CHAMPION, str(version))


def model_digest(checkpoint_dir: str | os.PathLike) -> str:
    """16-hex sha256 of what a checkpoint computes: every state-dict tensor (name, dtype, shape, bytes)
    and the owner stage of every unit. Not the file bytes: checkpoint.json carries the run's step
    reports (timings differ between identical runs), and the model.pt layout is torch's to change."""
    import torch

    from csmf_core.checkpoint import load_checkpoint

    model, owners, _ = load_checkpoint(checkpoint_dir)
    h = hashlib.sha256()
    parts = [("param", k, v) for k, v in model.state_dict().items()]
    parts += [("owner", k, v) for k, v in owners.units.items()]
    for kind, name, t in sorted(parts, key=lambda p: (p[0], p[1])):
        h.update(f"{kind}\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update("\0".join(owners.stages).encode())
    return h.hexdigest()[:16]


def find_version(client: mlflow.MlflowClient, tags: Mapping[str, str]):
    """The newest version of "csmf" whose tags hold every one of `tags` (key and value), or None.

    The pipeline's register task asks it for a version with its own inputs and model digest: a
    re-run with identical inputs that trained (or resumed) the bit-identical model reuses that version
    instead of filling the registry with copies."""
    if not tags or not all(tags.values()):
        return None
    try:
        versions = client.search_model_versions(f"name='{REGISTERED_MODEL}'")
    except mlflow.exceptions.MlflowException:  # no registered model yet
        return None
    same = [v for v in versions if all((v.tags or {}).get(k) == str(x) for k, x in tags.items())]
    return max(same, key=lambda v: int(v.version)) if same else None


def _registered_by(client: mlflow.MlflowClient, pipeline_run_id: str | None):
    """The version of "csmf" already registered by pipeline run `pipeline_run_id` (tag RUN_TAG), if any."""
    if not pipeline_run_id:
        return None
    try:
        versions = client.search_model_versions(f"name='{REGISTERED_MODEL}'")
    except mlflow.exceptions.MlflowException:  # no registered model yet
        return None
    mine = [v for v in versions if (v.tags or {}).get(RUN_TAG) == pipeline_run_id]
    return max(mine, key=lambda v: int(v.version)) if mine else None


def _version_for(ref: str | None, client: mlflow.MlflowClient):
    """The ModelVersion a reference names (see resolve_bundle)."""
    name = REGISTERED_MODEL
    if ref is None:
        try:
            return client.get_model_version_by_alias(name, CHAMPION)
        except mlflow.exceptions.MlflowException:
            versions = _versions_or_none(client)
            raise LookupError(
                f"no champion of registered model {name!r} yet ("
                + (
                    f"versions {', '.join(sorted((str(v.version) for v in versions), key=int))} exist, "
                    "none promoted by the gate"
                    if versions
                    else "no version registered: run the pipeline first, `csmf run`"
                )
                + f"); pass --model models:/{name}@{CHALLENGER}, models:/{name}/<version> or latest"
            ) from None
    if ref in ("latest", f"models:/{name}", f"models:/{name}/latest"):
        versions = client.search_model_versions(f"name='{name}'")
        if not versions:
            raise LookupError(
                f"no versions of registered model {name!r}: run the pipeline first (`csmf run`)"
            )
        return max(versions, key=lambda v: int(v.version))
    m = re.fullmatch(r"models:/([^/@]+)(?:@([\w-]+)|/(\d+))", ref)
    if m:
        name, alias, number = m.groups()
        safe_name(name, f"model reference {ref!r}: the model name")  # it names the cache directory
        try:
            return (
                client.get_model_version_by_alias(name, alias)
                if alias
                else client.get_model_version(name, number)
            )
        except mlflow.exceptions.MlflowException as exc:
            if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise  # an unreachable server or a refused request is not a missing model
            raise LookupError(
                f"model reference {ref!r}: no such {'alias' if alias else 'version'}; {_inventory(client, name)}"
            ) from None
    if _RUN_ID.match(ref):
        versions = [
            v
            for v in client.search_model_versions(f"name='{name}'")
            if ref in (v.run_id, (v.tags or {}).get(RUN_TAG))
        ]
        if not versions:
            raise LookupError(f"no version of {name!r} was registered by MLflow run {ref}")
        return max(versions, key=lambda v: int(v.version))
    if Path(ref).exists():
        raise ValueError(
            f"model reference {ref!r}: a path, but not a serving-bundle directory (no bundle.json)"
        )
    raise ValueError(
        f"model reference {ref!r}: use a serving-bundle directory, models:/{name}@<alias>, "
        f"models:/{name}/<version>, an MLflow run id, latest, or nothing for the champion"
        + (" (no such directory)" if ("/" in ref or ref.startswith(".")) else "")
    )


def _inventory(client: mlflow.MlflowClient, name: str) -> str:
    """What the registry holds for `name`: its versions and aliases, for a reference that missed."""
    versions = _versions_or_none(client, name)
    if not versions:
        return f"registered model {name!r} has no version here (MLflow store {mlflow.get_tracking_uri()})"
    numbers = sorted(int(v.version) for v in versions)
    try:  # search results carry no aliases: the registered model has them
        aliases = client.get_registered_model(name).aliases or {}
    except mlflow.exceptions.MlflowException:
        aliases = {}
    named = ", ".join(f"{a} (v{v})" for a, v in sorted(aliases.items()))
    return f"{name!r} has versions {', '.join(map(str, numbers))}" + (
        f" and aliases {named}" if named else " and no alias"
    )


def _versions_or_none(client: mlflow.MlflowClient, name: str = REGISTERED_MODEL) -> list:
    try:
        return client.search_model_versions(f"name='{name}'")
    except mlflow.exceptions.MlflowException:
        return []


@dataclass(frozen=True)
class ResolvedModel:
    """What a model reference resolved to: the local bundle and, for a registry reference, the
    ModelVersion it came from (None for a bundle directory)."""

    ref: str
    bundle: Path
    version: Any = None

    def describe(self) -> str:
        """One line naming the model used, e.g. "csmf version 3 (models:/csmf@champion; aliases
        champion; gate: promoted)" or "bundle directory /path (not from the registry)"."""
        v = self.version
        if v is None:
            return f"bundle directory {self.bundle} (not from the registry)"
        notes = [self.ref]
        aliases = sorted(getattr(v, "aliases", None) or [])
        notes.append(f"aliases {', '.join(aliases)}" if aliases else "no alias")
        gate_tag = (v.tags or {}).get("csmf.gate")
        if gate_tag:
            notes.append(f"gate: {gate_tag}")
        return f"{v.name} version {v.version} ({'; '.join(notes)})"


def resolve_model(ref: str | None = None, *, home: str | os.PathLike | None = None) -> ResolvedModel:
    """`resolve_bundle` plus the registry version it came from (`ResolvedModel.describe()` names it).

    ref None means DEFAULT_REF, the champion: LookupError (saying which versions exist and how to pick
    one) when the gate has promoted none yet."""
    if ref is not None and Path(ref).is_dir() and (Path(ref) / "bundle.json").is_file():
        return ResolvedModel(str(ref), Path(ref).resolve())
    client = mlflow.MlflowClient()
    found = _version_for(ref, client)
    bundle = _download(found, home)  # checks the name and number before anything touches the disk
    version = client.get_model_version(found.name, found.version)  # with its aliases and tags
    return ResolvedModel(ref or DEFAULT_REF, bundle, version)


def resolve_bundle(ref: str | None = None, *, home: str | os.PathLike | None = None) -> Path:
    """Local serving-bundle directory of a registered model version.

    ref: "models:/csmf@champion", "models:/csmf/3", an MLflow run id (the register run or the
    pipeline's parent run), "latest" (the newest version, whatever the gate said), or None = the
    champion (DEFAULT_REF). A local bundle directory is returned as is. The model is downloaded once to
    `<home>/cache/models/<name>/<version>/` (versions are immutable).
    """
    return resolve_model(ref, home=home).bundle


def _download(version, home: str | os.PathLike | None) -> Path:
    """The bundle directory of `version` in the local model cache (downloaded on first use)."""
    # names and numbers from the registry become directories: one safe component each, inside the cache
    cache = resolve_home(home) / "cache" / "models"
    name = safe_name(version.name, "registered model name")
    number = str(version.version)
    if not number.isascii() or not number.isdigit():
        raise ValueError(f"registered model {name!r} has version {number!r}, expected a number")
    dest = contained(cache, name, number, what="model cache directory")
    # every file as downloaded (a deleted or truncated model.pt is fetched again, not trusted forever;
    # entries from before the manifest once): download beside it, then rename: never a half-filled cache
    if not whole_by_manifest(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{version.version}-", dir=dest.parent))
        try:
            uri = f"models:/{version.name}/{version.version}"
            mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp))
            if not (tmp / "MLmodel").is_file():
                raise FileNotFoundError(
                    f"registered model {version.name}/{version.version}: its artifacts ({uri}, source "
                    f"{getattr(version, 'source', '?')}) hold no MLmodel: the registry's artifact store "
                    "no longer has this model's files"
                )
            write_manifest(tmp)
            shutil.rmtree(dest, ignore_errors=True)
            os.replace(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    mlmodel = yaml.safe_load((dest / "MLmodel").read_text())
    rel = mlmodel["flavors"]["python_function"]["artifacts"]["bundle"]["path"]
    bundle = contained(dest, rel, what=f"the bundle path in {dest / 'MLmodel'}")
    if not (bundle / "bundle.json").is_file():
        raise FileNotFoundError(
            f"{bundle}: downloaded model {version.name}/{version.version} has no bundle.json"
        )
    return bundle


def load_recommender(ref: str | None = None, *, home: str | os.PathLike | None = None):
    """`csmf_core.serving.Recommender` of a registered version (same references as resolve_bundle;
    None = the champion)."""
    from csmf_core.serving import Recommender

    return Recommender.load(resolve_bundle(ref, home=home))
