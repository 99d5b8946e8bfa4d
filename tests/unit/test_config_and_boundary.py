"""Config validation and the import boundary of csmf_core."""

import ast
import pathlib

import pytest

from csmf_core.config import ConfigError, build_config, load_config


def test_defaults_match_the_paper():
    cfg = build_config()
    assert cfg.cpp.tau == 0.75 and cfg.loss.eta == 1.8 and cfg.model.dim == 64
    assert cfg.eval.fused_weights == (1.0, 1.8, 1.2)


def test_overrides_and_errors_reported_together(tmp_path):
    cfg = build_config({"cpp": {"tau": 0.5}}, ["train.lr=0.01", "train.epochs=[1,2,3]", "model.hidden=64,32"])
    assert cfg.cpp.tau == 0.5 and cfg.train.lr == 0.01 and cfg.train.epochs == (1, 2, 3)
    assert cfg.model.hidden == (64, 32)
    with pytest.raises(ConfigError) as e:
        build_config({"cpp": {"tua": 0.5}, "nope": {}}, ["train.lr=abc"])
    msg = str(e.value)
    assert "cpp.tua" in msg and "unknown section 'nope'" in msg and "train.lr" in msg
    with pytest.raises(ConfigError, match="cpp.tau must be in"):
        build_config({"cpp": {"tau": 1.5}})
    with pytest.raises(ConfigError, match="not one of"):
        build_config({"cpp": {"rule": "magic"}})
    p = tmp_path / "c.yaml"
    p.write_text("# csmf run --config c.yaml\ntrain:\n  batch_size: 64\n")
    assert load_config(p).train.batch_size == 64
    assert build_config().digest() == build_config().digest() != cfg.digest()


def test_unknown_keys_and_bad_values_are_reported_in_one_message():
    """The name pass used to stop the build: a typo hid every range error until it was fixed."""
    with pytest.raises(ConfigError) as e:
        build_config(
            {"train": {"epoch": 3, "lr": -1}},
            ["model.dim=0", "foo.bar=1", "eval.ks=[x]", "eval.primary_k=20"],
        )
    lines = [ln.strip() for ln in str(e.value).splitlines()[1:]]
    assert len(lines) == 5
    assert lines[0].startswith("unknown key train.epoch ") and lines[1].startswith("unknown section 'foo'")
    assert lines[2].startswith("eval.ks: ")  # a type error
    assert lines[3:] == [
        "model.dim must be >= 2, got 0",
        "train.lr must be > 0, got -1.0",
    ]  # range errors too
    # eval.primary_k is judged against eval.ks, which was refused: that rule is left out, not misreported
    assert not any("primary_k" in ln for ln in lines)


def test_malformed_yaml_is_a_config_error_naming_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: [1\n")
    for path in (bad,):
        with pytest.raises(ConfigError, match=r"bad.yaml is not valid YAML: .* at line \d+, column \d+"):
            load_config(path)
        with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
            load_config(None, tuned=path)
    with pytest.raises(ConfigError, match=r"override 'train.epochs=\[1,': the value is not valid YAML"):
        build_config({}, ["train.epochs=[1,", "model.dim=0"])
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"train:\n  lr: 0.01 # caf\xe9\n")
    with pytest.raises(ConfigError, match="latin.yaml is not UTF-8 text"):
        load_config(latin)
    from csmf_core.tuning import load_space

    with pytest.raises(ConfigError, match="search space: not valid YAML"):
        load_space("train.lr: {low: [1\n")


def test_fixed_keys_leave_the_search_space():
    """--set train.epochs=1,1,1 with csmf tune: trials replaced it with the space's epochs, silently."""
    from csmf_core.tuning import fix_space, load_space, override_keys

    space = load_space(
        "train.lr: {low: 1.0e-4, high: 1.0e-2}\ntrain.epochs: {per_stage: [[1, 2]]}\n"
        "loss.aml: {choices: [true, false]}\nloss.eta: {low: 1.2, high: 3.0, when: {loss.aml: true}}\n"
    )
    keys = override_keys(["train.epochs=1,1,1", "loss.aml=false"])
    assert keys == ["train.epochs", "loss.aml"]
    kept, dropped = fix_space(space, keys, build_config({}, ["train.epochs=1,1,1", "loss.aml=false"]))
    assert [p.key for p in kept] == ["train.lr"] and dropped == ["train.epochs", "loss.aml", "loss.eta"]
    kept, dropped = fix_space(space, ["loss.aml"], build_config({}, ["loss.aml=true"]))
    assert [(p.key, p.when) for p in kept] == [("train.lr", ()), ("train.epochs", ()), ("loss.eta", ())]
    assert dropped == ["loss.aml"]


def _imports(package: str):
    """(file, imported module) for every import statement of a top-level package, function-level too."""
    root = pathlib.Path(__file__).resolve().parents[2] / package
    for f in root.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                yield from ((f, a.name) for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                yield f, node.module


def test_core_never_imports_orchestration():
    banned = {"prefect", "mlflow"}
    for f, n in _imports("csmf_core"):
        assert n.split(".")[0] not in banned, f"{f.name} imports {n}"


def test_data_contracts_imports_neither_the_core_nor_orchestration():
    """csmf_core reads dataset.yaml and partitions through data_contracts, never the other way round:
    the contract stays loadable without torch, the model code, Prefect or MLflow."""
    banned = {"csmf_core", "flows", "torch", "prefect", "mlflow"}
    for f, n in _imports("data_contracts"):
        assert n.split(".")[0] not in banned, f"{f.name} imports {n}"


def _core_import_graph(root: pathlib.Path) -> dict[str, set[str]]:
    """csmf_core module -> the csmf_core modules it imports anywhere in its file (function-level too)."""
    graph: dict[str, set[str]] = {}
    for f in root.rglob("*.py"):
        parts = f.relative_to(root.parent).with_suffix("").parts
        mod = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                deps.add(node.module)
                deps |= {f"{node.module}.{a.name}" for a in node.names}
        graph[mod] = {d for d in deps if d.startswith("csmf_core")}
    return {m: {d for d in deps if d in graph} for m, deps in graph.items()}


def test_reading_rows_never_imports_training():
    """Row types live in csmf_core.rows: the loader, the server, the bundle, evaluation and validation
    reach neither the trainer nor the cascade, even through other modules."""
    graph = _core_import_graph(pathlib.Path(__file__).resolve().parents[2] / "csmf_core")
    for start in ("loader", "serving", "bundle", "evaluate", "validation", "rows"):
        seen, todo = set(), [f"csmf_core.{start}"]
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo += graph[m]
        assert not seen & {"csmf_core.train", "csmf_core.cascade", "csmf_core.optim"}, (start, sorted(seen))


def test_one_optimiser_step_for_every_method():
    """CSMF's stages and every comparison method train through csmf_core.optim.Optimiser.step: the only
    backward call in csmf_core and flows."""
    repo = pathlib.Path(__file__).resolve().parents[2]
    calls = [
        f"{f.relative_to(repo).as_posix()}:{n}"
        for d in ("csmf_core", "flows")
        for f in sorted((repo / d).rglob("*.py"))
        for n, line in enumerate(f.read_text().splitlines(), 1)
        if ".backward(" in line
    ]
    assert len(calls) == 1 and calls[0].startswith("csmf_core/optim.py:"), calls


def test_configs_default_yaml_is_the_builtin_default():
    root = pathlib.Path(__file__).resolve().parents[2]
    assert load_config(root / "configs" / "default.yaml") == build_config()
    # every key written out, not only equal values (train.deterministic was missing from the file)
    import yaml

    written = yaml.safe_load((root / "configs" / "default.yaml").read_text())
    assert {f"{sec}.{k}" for sec, keys in written.items() for k in keys} == set(build_config().flat())
    load_config(root / "configs" / "kuairand.yaml")  # parses and validates


# Issue #13 item 7: every key has a rule. Bad values per key, as `--set` would pass them; every
# float key (and list of floats) is also tried with nan, inf and -inf below.
BAD_VALUES = {
    "model.dim": ["1"],
    "model.hidden": ["[64,1]", "[]"],
    "model.emb_dim": ["0"],
    "model.id_emb_dim": ["0"],
    "model.hist_emb_dim": ["0"],
    "model.init_seed": ["-1", str(2**32)],
    "cpp.rule": ["magic"],
    "cpp.tau": ["0", "1"],
    "cpp.ratio": ["0", "1.5"],
    "cpp.min_keep": ["0"],
    "cpp.min_free": ["0"],
    "cpp.min_free_output": ["0"],
    "cpp.freed_init": ["magic"],
    "loss.temperature": ["0"],
    "loss.logq": ["maybe"],
    "loss.request_negatives": ["some"],
    "loss.aml": ["maybe"],
    "loss.sigma": ["-0.1"],
    "loss.eta": ["0"],
    "loss.upstream": ["magic"],
    "loss.fast_upstream": ["maybe"],
    "train.batch_size": ["1"],
    "train.lr": ["0", "-1"],
    "train.epochs": ["[1,-1]", "[]"],
    "train.weight_decay": ["-0.1"],
    "train.grad_clip": ["-1"],
    "train.max_loss": ["0"],
    "train.seed": ["-1", str(2**32)],
    "train.threads": ["-1"],
    "train.device": ["tpu"],
    "train.deterministic": ["maybe"],
    "train.split_scores": ["yes please"],
    "train.loader": ["disk"],
    "train.shuffle_window": ["0"],
    "train.processes": ["0"],
    "train.dist_backend": ["mpi", "nccl"],  # nccl with the default train.device=cpu
    "train.embedding_optimizer": ["sgd"],
    "recover.enabled": ["maybe"],
    "recover.fraction": ["0", "1.5"],
    "recover.epochs": ["-1"],
    "recover.lr_scale": ["0"],
    "eval.ks": ["[0,50]", "[10,50,50]"],
    "eval.primary_k": ["7"],
    "eval.fused_weights": ["[-1,1,1]", "[0,0,0]"],
    "eval.max_users": ["-1"],
    "data.seq_len": ["0"],
    "data.n_req_neg": ["0"],
    "data.train_days": ["-1"],
    "data.eval_days": ["0"],
    "data.val_days": ["-1", "often"],
    "data.val_refit": ["maybe"],
    "data.item_stats": ["[0]", "[7,7]"],
    "gate.enabled": ["maybe"],
    "gate.tolerance": ["-0.1"],
    "gate.sample_users": ["0"],
    "gate.min_users": ["0", "-3", "2.5"],
    "retention.keep_days": ["-1"],
    "model.id_buckets": ["0", "-5", "many"],
    "model.evict_after_days": ["0", "1.5"],
    "train.mode": ["warm"],
    "train.incremental_days": ["0"],
    "train.patience": ["-1", "1.5"],
    "train.full_every_days": ["0"],
    "train.start_from": ["latest", "challenger"],
    "train.incremental_logq": ["day", "all"],
    "train.incremental_select_from": ["parent", "Unseen"],
    "train.incremental_rehearsal": ["-0.5", "nan", "inf", "[1,-1]", "often"],
    "train.rehearsal_candidates": ["[0,-3]", "nan", "[]"],
    "train.rehearsal_days": ["0", "1.5"],
    "ingest.dask": ["yes", "host:8786", "local2"],
    "ingest.workers": ["0"],
    "ingest.shards": ["-1"],
}


def _float_keys() -> set[str]:
    import dataclasses
    import types
    import typing

    from csmf_core.config import CSMFConfig

    out = set()
    for section, cls in typing.get_type_hints(CSMFConfig).items():
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            # float, tuple[float, ...], or either of them | str ("auto" settings)
            options = (
                typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
            )
            if any(t is float or typing.get_args(t)[:1] == (float,) for t in options):
                out.add(f"{section}.{f.name}")
    return out


def _cases():
    for key, values in BAD_VALUES.items():
        for v in values:
            yield key, v
    for key in sorted(_float_keys()):
        for v in ("nan", "inf", "-inf"):
            yield key, f"[1,{v},1]" if key == "eval.fused_weights" else v


def test_every_config_key_has_a_rule():
    assert set(BAD_VALUES) == set(build_config().flat()), "add bad values for new keys to BAD_VALUES"
    assert _float_keys() >= {"train.lr", "eval.fused_weights", "gate.tolerance"}


@pytest.mark.parametrize(("key", "value"), list(_cases()))
def test_bad_value_is_refused_naming_the_key(key, value):
    with pytest.raises(ConfigError) as e:
        build_config(None, [f"{key}={value}"])
    lines = str(e.value).splitlines()[1:]
    assert len(lines) == 1 and lines[0].strip().startswith(key), lines  # one message, for this key


def test_boundary_values_are_accepted():
    ok = [
        "train.threads=0",
        "train.patience=0",
        "recover.epochs=0",
        "loss.sigma=0",
        "train.grad_clip=0",
        "eval.max_users=0",
        "eval.fused_weights=[0,1,0]",
        "data.n_req_neg=1",
        "train.seed=4294967295",
        "recover.fraction=1",
        "train.dist_backend=nccl",
        "train.device=cuda",
    ]
    cfg = build_config(None, ok)
    assert cfg.train.threads == 0 and cfg.eval.fused_weights == (0.0, 1.0, 0.0)


def test_issue_values_reported_together_before_training():
    bad = ["eval.fused_weights=[nan,1,1]", "train.threads=-1", "recover.epochs=-1"]
    bad += ["model.emb_dim=0", "train.lr=inf"]
    with pytest.raises(ConfigError) as e:
        build_config(None, bad)
    lines = [x.strip() for x in str(e.value).splitlines()[1:]]
    assert sorted(x.split(" ", 1)[0] for x in lines) == sorted(b.split("=", 1)[0] for b in bad)
    assert "eval.fused_weights must be finite (no NaN or inf), got (nan, 1.0, 1.0)" in lines


def test_fused_weights_must_match_the_objectives():
    from csmf_core.config import check_objectives

    cfg = build_config()
    check_objectives(cfg, ["exposure", "click", "conversion"])  # 3 weights, 3 objectives
    with pytest.raises(
        ConfigError, match=r"eval.fused_weights has 3 values .* 2 objectives \['view', 'buy'\]"
    ):
        check_objectives(cfg, ["view", "buy"])


def test_default_fused_weights_fit_any_number_of_objectives():
    """The shipped weights are the paper's three; other counts get one weight each, a list the user
    gave of the wrong length stays an error, and auto or a fitting list is left alone."""
    from csmf_core.config import check_objectives, fit_objectives

    three = ["exposure", "click", "conversion"]
    cfg, why = fit_objectives(build_config(), three)
    assert cfg.eval.fused_weights == (1.0, 1.8, 1.2) and why is None
    for objectives in (["view", "buy"], ["a", "b", "c", "d"]):
        cfg, why = fit_objectives(build_config(), objectives)
        assert cfg.eval.fused_weights == (1.0,) * len(objectives)
        assert f"this dataset has {len(objectives)}" in why and "equal weights" in why
        check_objectives(cfg, objectives)
        # the rest of the config is untouched
        assert {k: v for k, v in cfg.flat().items() if k != "eval.fused_weights"} == {
            k: v for k, v in build_config().flat().items() if k != "eval.fused_weights"
        }
    mine = build_config(None, ["eval.fused_weights=[1.0, 2.0, 3.0]"])
    assert fit_objectives(mine, ["view", "buy"]) == (mine, None)
    with pytest.raises(ConfigError, match="eval.fused_weights has 3 values"):
        check_objectives(mine, ["view", "buy"])
    auto = build_config(None, ["eval.fused_weights=auto"])
    assert fit_objectives(auto, ["view", "buy"]) == (auto, None)
