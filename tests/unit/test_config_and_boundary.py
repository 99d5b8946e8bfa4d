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


def test_core_never_imports_orchestration():
    root = pathlib.Path(__file__).resolve().parents[2] / "csmf_core"
    banned = {"prefect", "mlflow"}
    for f in root.rglob("*.py"):
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for n in names:
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
    load_config(root / "configs" / "kuairand.yaml")  # parses and validates
