"""flows/figures.py `BackgroundFigures`: figures drawn by a child process, logged by `finish`.

The reference for the bytes is MLflow's own `log_figure` of the same figure drawn in this process
(what the flow logged before figures moved to a child process)."""

from __future__ import annotations

import numpy as np
import pytest

from flows.figures import BackgroundFigures, cascade_figure, ownership_figure, recall_at_k_figure

ROWS = [
    {"objective": o, "scorer": s, "k": k, "recall": 0.1 * k / 50, "ndcg": 0.0, "users": 3}
    for o in ("exposure", "click")
    for s in (o, "fused", "popularity")
    for k in (10, 50)
]
SNAPSHOTS = {"after cpp_prune_exposure": {"user.layers.0": [3, 5], "output": [4, 4]}}
CASCADE = [
    {"step": 0, "name": "pretrain_exposure", "exposure recall@50": 0.2, "exposure ndcg@50": 0.1},
    {"step": 1, "name": "finetune_click", "exposure recall@50": 0.2, "exposure ndcg@50": 0.1,
     "click recall@50": 0.3, "click ndcg@50": None},
]  # fmt: skip


class Files:
    """A tracker that keeps what `log_artifact` hands it: {artifact path: bytes}."""

    def __init__(self):
        self.files: dict[str, bytes] = {}

    def log_artifact(self, path, artifact_path=None):
        from pathlib import Path

        path = Path(path)
        self.files[f"{artifact_path}/{path.name}" if artifact_path else path.name] = path.read_bytes()


def test_the_child_draws_the_bytes_mlflow_logs_for_the_same_figures(tmp_path):
    import mlflow

    from flows.tracking import MlflowTracker, ensure_experiment

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = ensure_experiment("figures", tmp_path / "artifacts", uri)
    own = MlflowTracker.start(exp, "own", tracking_uri=uri)
    own.log_figure(recall_at_k_figure(ROWS), "figures/recall_at_k.png")
    own.log_figure(ownership_figure(SNAPSHOTS, ["exposure", "click"]), "figures/ownership.png")
    own.log_figure(cascade_figure(CASCADE, ["exposure", "click"], 50, "2026-01-06"), "figures/cascade.png")

    def reference(name: str) -> bytes:
        path = mlflow.artifacts.download_artifacts(
            run_id=own.run_id,
            artifact_path=f"figures/{name}",
            dst_path=str(tmp_path / "ref"),
            tracking_uri=uri,
        )
        return open(path, "rb").read()

    a, b = Files(), Files()
    figures = BackgroundFigures(tmp_path / "work" / "figures")
    figures.add("recall_at_k", {"rows": ROWS}, "figures/recall_at_k.png", [a, b])
    # NumPy scalars, as metric rows carry them, become plain numbers in the spec
    snapshots = {"after cpp_prune_exposure": {"user.layers.0": [np.int64(3), 5], "output": [4, np.int32(4)]}}
    figures.add(
        "ownership", {"snapshots": snapshots, "stages": ["exposure", "click"]}, "figures/ownership.png", [a]
    )
    args = {"rows": CASCADE, "objectives": ["exposure", "click"], "k": 50, "days": "2026-01-06"}
    figures.add("cascade", args, "figures/cascade.png", [b])
    figures.start()
    assert a.files == {} and b.files == {}  # nothing is logged before finish
    logged = figures.finish()
    assert logged == ["figures/recall_at_k.png", "figures/ownership.png", "figures/cascade.png"]
    assert set(a.files) == {"figures/recall_at_k.png", "figures/ownership.png"}
    assert set(b.files) == {"figures/recall_at_k.png", "figures/cascade.png"}
    for tracker in (a, b):
        for path, data in tracker.files.items():
            assert data == reference(path.split("/")[-1]), path
    assert not (tmp_path / "work" / "figures").exists()  # removed once logged
    assert figures.finish() == []  # finished: nothing more to wait for


def test_a_failing_child_raises_with_its_error_and_logs_nothing(tmp_path):
    a = Files()
    figures = BackgroundFigures(tmp_path / "figures")
    figures.add("recall_at_k", {"rows": ROWS, "no_such_argument": 1}, "figures/recall_at_k.png", [a])
    with pytest.raises(RuntimeError, match=r"(?s)exited with code 1: .*no_such_argument"):
        figures.finish()  # starts the child itself when start() was not called
    assert a.files == {}
    assert (tmp_path / "figures" / "stderr.txt").is_file()  # kept for a look


def test_nothing_queued_starts_nothing_and_misuse_is_refused(tmp_path):
    figures = BackgroundFigures(tmp_path / "figures")
    figures.start()
    assert figures.finish() == [] and not (tmp_path / "figures").exists()
    with pytest.raises(ValueError, match="unknown figure 'pie'"):
        figures.add("pie", {}, "figures/pie.png", [Files()])
    figures.add("recall_at_k", {"rows": ROWS}, "recall_at_k.png", [Files()])
    figures.start()
    assert figures.finish() == ["recall_at_k.png"]  # an artifact at the run's root


def test_figures_added_after_start_go_to_the_same_child(tmp_path):
    """The flow starts the child on the pruning figures and adds evaluate's later: one process draws
    them all, each the bytes it draws when queued before start (same PNG files, same order)."""
    early, late = Files(), Files()
    before = BackgroundFigures(tmp_path / "before")
    after = BackgroundFigures(tmp_path / "after")
    jobs = [
        ("ownership", {"snapshots": SNAPSHOTS, "stages": ["exposure", "click"]}, "figures/ownership.png"),
        ("recall_at_k", {"rows": ROWS}, "figures/recall_at_k.png"),
        (
            "cascade",
            {"rows": CASCADE, "objectives": ["exposure", "click"], "k": 50, "days": "d"},
            "figures/cascade.png",
        ),
    ]
    for kind, kwargs, name in jobs:
        before.add(kind, kwargs, name, [early])
    before.start()
    after.add(*jobs[0], [late])
    after.start()
    child = after._process
    for kind, kwargs, name in jobs[1:]:
        after.add(kind, kwargs, name, [late])
        assert after._process is child  # no second child
    assert before.finish() == after.finish() == [name for _, _, name in jobs]
    assert child.returncode == 0
    assert late.files == early.files and len(late.files) == 3


def test_a_job_file_that_cannot_be_written_is_reported_at_finish(tmp_path, monkeypatch):
    """A full disk while the flow goes on: `add` does not fail the task, `finish` names the error."""
    from pathlib import Path

    figures = BackgroundFigures(tmp_path / "figures")
    figures.add("recall_at_k", {"rows": ROWS}, "figures/a.png", [Files()])
    figures.start()
    real = Path.write_text

    def full(self, *a, **k):
        if self.name.startswith("job-"):
            raise OSError(28, "No space left on device")
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", full)
    figures.add("recall_at_k", {"rows": ROWS}, "figures/b.png", [Files()])  # does not raise
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="could not be handed to the child.*No space left"):
        figures.finish()


def test_a_figure_added_after_the_child_failed_ends_in_its_error(tmp_path):
    figures = BackgroundFigures(tmp_path / "figures")
    figures.add("recall_at_k", {"rows": ROWS, "no_such_argument": 1}, "figures/a.png", [Files()])
    figures.start()
    figures._process.wait()  # died on the first job: its stdin is closed at the other end
    figures.add("recall_at_k", {"rows": ROWS}, "figures/b.png", [Files()])  # does not raise
    with pytest.raises(RuntimeError, match=r"(?s)exited with code 1: .*no_such_argument"):
        figures.finish()


def test_a_value_that_is_not_json_fails_where_it_is_queued(tmp_path):
    figures = BackgroundFigures(tmp_path / "figures")
    with pytest.raises(TypeError, match="not JSON: object"):
        figures.add("recall_at_k", {"rows": [object()]}, "figures/recall_at_k.png", [Files()])
    assert figures.jobs == [] and figures.finish() == []


def test_close_stops_a_child_still_drawing_and_salvage_never_raises(tmp_path, monkeypatch):
    import subprocess
    import sys

    figures = BackgroundFigures(tmp_path / "figures")
    figures.add("recall_at_k", {"rows": ROWS}, "figures/recall_at_k.png", [Files()])
    real = subprocess.Popen  # a child that would run for a minute: close() must not wait for it
    monkeypatch.setattr(
        subprocess,
        "Popen",
        lambda args, **kw: real([sys.executable, "-c", "import time; time.sleep(60)"], **kw),
    )
    figures.start()
    process, stderr = figures._process, figures._stderr
    figures.close()
    assert process.poll() is not None and stderr.closed
    assert figures.jobs == [] and figures.finish() == []
    figures.close()  # idempotent
    monkeypatch.undo()

    broken = BackgroundFigures(tmp_path / "broken")
    broken.add("recall_at_k", {"rows": ROWS, "no_such_argument": 1}, "figures/recall_at_k.png", [Files()])
    assert broken.salvage() == []  # the child failed: nothing logged, nothing raised


@pytest.fixture
def three_threads():
    """torch at 3 intra-op threads for the test (restored after)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        yield torch
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("end", ["finish", "close", "failing child"])
def test_the_parent_leaves_the_child_a_core_while_it_draws(tmp_path, three_threads, end):
    """One intra-op thread fewer from start() until finish() or close(), whatever the child did."""
    torch = three_threads
    figures = BackgroundFigures(tmp_path / "figures")
    kwargs = {"rows": ROWS, "no_such_argument": 1} if end == "failing child" else {"rows": ROWS}
    figures.add("recall_at_k", kwargs, "figures/recall_at_k.png", [Files()])
    assert torch.get_num_threads() == 3  # queueing changes nothing
    figures.start()
    assert torch.get_num_threads() == 2
    figures.start()  # already started: not one fewer again
    assert torch.get_num_threads() == 2
    if end == "finish":
        assert figures.finish() == ["figures/recall_at_k.png"]
    elif end == "close":
        figures.close()
    else:
        with pytest.raises(RuntimeError, match="no_such_argument"):
            figures.finish()
    assert torch.get_num_threads() == 3
    figures.close()  # nothing left to restore: unchanged
    assert torch.get_num_threads() == 3


def test_one_thread_or_no_torch_is_left_as_it_is(tmp_path, three_threads, monkeypatch):
    import sys

    from flows import figures as fig

    torch = three_threads
    torch.set_num_threads(1)
    assert fig._leave_a_core() is None and torch.get_num_threads() == 1
    monkeypatch.delitem(sys.modules, "torch")  # a process that never imported torch
    assert fig._leave_a_core() is None
    assert "torch" not in sys.modules  # and it was not imported for this


def test_the_flow_turns_a_figure_failure_into_a_warning(tmp_path):
    from flows.pipeline import finish_figures

    figures = BackgroundFigures(tmp_path / "figures")
    figures.add("recall_at_k", {"rows": ROWS, "no_such_argument": 1}, "figures/recall_at_k.png", [Files()])
    warnings: list[str] = []
    assert finish_figures(figures, warnings.append) == []
    assert (
        len(warnings) == 1 and "figures were not logged" in warnings[0] and "no_such_argument" in warnings[0]
    )
    ok = BackgroundFigures(tmp_path / "ok")
    ok.add("recall_at_k", {"rows": ROWS}, "figures/recall_at_k.png", [Files()])
    assert finish_figures(ok, warnings.append) == ["figures/recall_at_k.png"] and len(warnings) == 1
