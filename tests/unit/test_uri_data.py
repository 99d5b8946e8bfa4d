"""Datasets by URI (issue #19 item 3): file:// is read in place, s3:// (moto's S3 server on 127.0.0.1)
is mirrored under the stage root; validate, prep and the bundle's user histories give exactly what
they give on the local copy, and no object key or URI can make a reader write outside its directory.
The whole daily flow by file:// URI runs in tests/integration/test_pipeline.py (`happy`).
"""

from __future__ import annotations

import filecmp
import json
import socket
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from csmf_core import prep
from csmf_core.bundle import user_histories
from csmf_core.fsutil import is_uri, local_dataset, redact, stage_dataset
from data_contracts import load_spec, validate_dataset
from tests.conftest import assert_same_model_ready

TRAIN = ("2026-01-01", "2026-01-05")
EVAL = "2026-01-06"


def _prepare(src, out):
    return prep.prepare(src, out, train_dates=TRAIN, eval_dates=EVAL, seq_len=5, n_req_neg=4)


def test_uri_detection_and_redaction():
    assert is_uri("s3://b/k") and is_uri("file:///tmp/x") and is_uri("gs://b/x")
    assert not is_uri("/tmp/x") and not is_uri("data/x") and not is_uri(Path("/tmp")) and not is_uri("c:x")
    assert redact("s3://AKIA:secret@bucket/ds?secret_key=s&endpoint_override=h:1") == "s3://bucket/ds"


def test_file_uri_validates_and_prepares_like_the_path(tiny_world, tmp_path):
    ds = tiny_world["ds"]
    by_path, by_uri = validate_dataset(ds), validate_dataset(ds.as_uri())
    assert by_uri.ok and by_uri.counts == by_path.counts and by_uri.counts["rows"] > 0
    assert local_dataset(ds.as_uri()) == ds  # read in place: nothing is copied
    assert load_spec(ds.as_uri()).objective_names == load_spec(ds).objective_names
    _prepare(ds.as_uri(), tmp_path / "by-uri")
    assert_same_model_ready(tiny_world["mr"], tmp_path / "by-uri")


def test_a_missing_file_uri_is_one_contract_error(tmp_path):
    report = validate_dataset((tmp_path / "nope").as_uri())
    assert not report.ok and [v.rule for v in report.errors] == ["missing_path"]


def test_outputs_must_be_local_paths(tiny_world, tmp_path):
    with pytest.raises(ValueError, match="model-ready output directory file:///.* is a URI"):
        _prepare(tiny_world["ds"], (tmp_path / "x").as_uri())
    with pytest.raises(ValueError, match="quarantine directory s3://b/q is a URI"):
        validate_dataset(tiny_world["ds"], max_violation_rate=0.1, quarantine_dir="s3://b/q")
    assert not any(p.name.startswith("file:") for p in Path.cwd().iterdir())


# ---- another filesystem: the mirror ------------------------------------------------------------------
def _local_fs_mirror(src: Path, stage: Path) -> Path:
    """Stage `src` through pyarrow's LocalFileSystem treated as a remote one (no server needed)."""
    return stage_dataset(pafs.LocalFileSystem(), str(src), "test://" + str(src), stage)


def test_the_mirror_is_incremental_and_follows_deletions(tiny_world, tmp_path):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(tiny_world["ds"], src)
    (src / "notes.txt").write_text("not part of the layout")
    dest = _local_fs_mirror(src, tmp_path / "stage")
    assert dest.parent == tmp_path / "stage" and not (dest / "notes.txt").exists()
    cmp = filecmp.dircmp(src / "events", dest / "events")
    assert not cmp.left_only and not cmp.right_only
    staged = dest / "users.parquet"
    before = staged.stat().st_mtime_ns
    victim = sorted((src / "events").iterdir())[0]
    shutil.rmtree(victim)
    assert _local_fs_mirror(src, tmp_path / "stage") == dest
    assert staged.stat().st_mtime_ns == before  # unchanged files are not copied again
    assert not (dest / "events" / victim.name).exists()  # deleted at the source: deleted here
    assert validate_dataset(dest).counts["rows"] == validate_dataset(src).counts["rows"]


@pytest.fixture(scope="module")
def s3(tmp_path_factory, tiny_world):
    """moto's S3 server on 127.0.0.1 with the tiny dataset under s3://csmf/tiny/."""
    pytest.importorskip("moto", reason="moto[server] is a dev extra (pip install -e '.[dev]')")
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    mp = pytest.MonkeyPatch()
    for k, v in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        mp.setenv(k, v)
    query = f"?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    fs = pafs.S3FileSystem(
        endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1", allow_bucket_creation=True
    )
    fs.create_dir("csmf")
    pafs.copy_files(str(tiny_world["ds"]), "csmf/tiny", destination_filesystem=fs)
    try:
        yield {"fs": fs, "uri": f"s3://csmf/tiny{query}", "query": query}
    finally:
        server.stop()
        mp.undo()


def test_s3_dataset_validates_prepares_and_builds_histories_like_the_path(s3, tiny_world, tmp_path):
    stage = tmp_path / "staged"
    local = local_dataset(s3["uri"], stage_root=stage)
    assert local.parent == stage and local != tiny_world["ds"]
    report = validate_dataset(local)
    assert report.ok and report.counts == validate_dataset(tiny_world["ds"]).counts
    prep.prepare(local, tmp_path / "mr", train_dates=TRAIN, eval_dates=EVAL, seq_len=5, n_req_neg=4)
    assert_same_model_ready(tiny_world["mr"], tmp_path / "mr")
    meta = json.loads((tiny_world["mr"] / "meta.json").read_text())
    users = pq.read_table(tiny_world["mr"] / "users.parquet")["user_id"].to_numpy(zero_copy_only=False)[1:]
    items = pq.read_table(tiny_world["mr"] / "items.parquet")["item_id"].to_numpy(zero_copy_only=False)[1:]
    names = [o["name"] for o in meta["objectives"]]
    want = user_histories(tiny_world["ds"], users.astype(np.int64), items.astype(np.int64), names, EVAL, 5)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CSMF_HOME", str(tmp_path / "home"))  # the readers' default stage root
        got = user_histories(s3["uri"], users.astype(np.int64), items.astype(np.int64), names, EVAL, 5)
        assert validate_dataset(s3["uri"]).ok
    assert want.keys() == got.keys() and all(np.array_equal(want[k], got[k]) for k in want)
    assert (tmp_path / "home" / "staged").is_dir()


class _ListingFS:
    """A filesystem whose listing is given (what a store that keeps '..' in object keys would list)."""

    type_name = "fake"

    def __init__(self, files: dict[str, bytes]):
        self.files = files

    def get_file_info(self, what):
        if isinstance(what, str):
            return pafs.FileInfo(what, pafs.FileType.Directory)
        return [pafs.FileInfo(p, pafs.FileType.File, size=len(b), mtime_ns=1) for p, b in self.files.items()]

    def open_input_stream(self, path):
        import io

        return io.BytesIO(self.files[path])


@pytest.mark.parametrize(
    "key", ["events/../../escaped.parquet", "events/dt=2026-01-01/../../../escaped.parquet"]
)
def test_an_object_key_with_dotdot_is_refused_and_nothing_is_written_outside(tmp_path, key):
    fs = _ListingFS({"ds/dataset.yaml": b"name: x", f"ds/{key}": b"PAR1"})
    stage = tmp_path / "deep" / "staged"
    with pytest.raises(ValueError, match=r"'\.\.' path part; refusing"):
        stage_dataset(fs, "ds", "fake://ds", stage)
    assert not any(p.name == "escaped.parquet" for p in tmp_path.rglob("*"))


def test_a_symlink_planted_in_the_mirror_is_not_followed_out(tmp_path):
    fs = _ListingFS({"ds/dataset.yaml": b"name: x", "ds/events/dt=2026-01-01/a.parquet": b"PAR1"})
    dest = stage_dataset(fs, "ds", "fake://ds", tmp_path / "staged")
    outside = tmp_path / "outside"
    outside.mkdir()
    import shutil

    shutil.rmtree(dest / "events")
    (dest / "events").symlink_to(outside)
    (dest / ".csmf-staged.json").write_text("{}")
    with pytest.raises(ValueError, match="leads outside"):
        stage_dataset(fs, "ds", "fake://ds", tmp_path / "staged")
    assert not any(outside.iterdir())


def test_s3_credentials_never_appear_in_messages(s3):
    bad = f"s3://AKIAXX:topsecret@csmf/nope{s3['query']}&secret_key=topsecret"
    report = validate_dataset(bad)
    assert not report.ok and "topsecret" not in report.to_markdown()
