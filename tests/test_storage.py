"""One storage layer for what raylocal reads and writes itself, against a real S3 server on loopback."""

from __future__ import annotations

import json

import pytest
from s3server import s3_server

from raylocal.config import ConfigError, Experiment
from raylocal.plan import plan_search
from raylocal.results import MANIFEST, read_manifest, write_manifest
from raylocal.settings import Settings
from raylocal.storage import check_writable, fetch, open_storage
from raylocal.tune import cli

pytest.importorskip("moto", reason="the S3 tests need moto[server] (pip install -e '.[test]')")


@pytest.fixture(scope="module")
def s3():
    with s3_server() as server:
        server.make_bucket("bars")
        yield server


@pytest.fixture
def s3_env(s3, monkeypatch, tmp_path):
    """The variables a user of an S3-compatible store sets, and no AWS files of this machine's."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RAYLOCAL_CACHE", str(tmp_path / "cache"))
    for key, value in s3.environment().items():
        monkeypatch.setenv(key, value)
    return s3


def test_a_folder_on_s3_is_written_read_listed_and_fetched(s3_env, tmp_path):
    folder = open_storage("s3://bars/layer/run1")
    assert folder.remote and folder.name == "run1" and folder.parent().uri == "s3://bars/layer"
    assert folder.child("final", "x").uri == "s3://bars/layer/run1/final/x"
    folder.write_text("a.json", '{"a": 1}')
    assert folder.is_file("a.json") and json.loads(folder.read_text("a.json")) == {"a": 1}
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "model.onnx").write_bytes(b"\0" * 1000)
    folder.child("best_model").upload(tmp_path / "export")
    assert s3_env.keys("bars", "layer/run1/") == ["layer/run1/a.json", "layer/run1/best_model/model.onnx"]
    assert folder.folders() == ["best_model"]
    local = fetch("s3://bars/layer/run1/best_model")
    assert (local / "model.onnx").read_bytes() == b"\0" * 1000 and local.is_relative_to(tmp_path / "cache")
    folder.move("a.json", "b.json")
    assert not folder.is_file("a.json") and folder.is_file("b.json")
    # The endpoint in the URI's query, as for MinIO or Ceph without AWS_ENDPOINT_URL.
    host = s3_env.endpoint.removeprefix("http://")
    queried = open_storage(f"s3://bars/layer/run1?endpoint_override={host}&scheme=http")
    assert queried.child("best_model").uri == f"s3://bars/layer/run1/best_model?endpoint_override={host}&scheme=http"
    assert queried.is_file("b.json")


def test_a_local_path_is_the_same_layer(tmp_path):
    folder = open_storage(tmp_path / "results").child("run1")
    assert not folder.remote and folder.local() == tmp_path / "results" / "run1"
    write_manifest(folder, {"seed": 3}, Experiment().describe())
    assert read_manifest(tmp_path / "results" / "run1")["flags"] == {"seed": 3}
    assert [path.name for path in folder.local().iterdir()] == [MANIFEST]  # written whole, no temporary left


def test_a_search_on_s3_is_resumed_from_its_manifest_there(s3_env):
    folder = open_storage("s3://bars/searches/old")
    write_manifest(folder, {"seed": 4, "views": 3, "trials": 7}, Experiment().with_budget(trials=7).describe())
    for settings in (Settings(resume=True, name="old", storage="s3://bars/searches"),
                     Settings(resume="s3://bars/searches/old")):
        plan = plan_search(settings)
        assert plan.resume and plan.folder.uri == "s3://bars/searches/old" and plan.storage == "s3://bars/searches"
        assert (plan.settings.seed, plan.settings.views, plan.experiment.budget.trials) == (4, 3, 7)
    with pytest.raises(ConfigError, match="no raylocal search to resume at s3://bars/searches/gone"):
        plan_search(Settings(resume="s3://bars/searches/gone"))


def bad_storage_cases(s3):
    nothing = s3.endpoint.rsplit(":", 1)[0] + ":1"  # a port where nothing listens
    return {
        "unreachable endpoint": ({"AWS_ENDPOINT_URL": nothing}, "s3://bars/x", "NETWORK_CONNECTION"),
        "missing bucket": ({}, "s3://no-such-bucket/x", "NO_SUCH_BUCKET"),
        "unknown scheme": ({}, "nosuchfs://bars/x", "storage nosuchfs://bars/x: Unrecognized filesystem type"),
    }


@pytest.mark.parametrize("case", ["unreachable endpoint", "missing bucket", "unknown scheme"])
def test_bad_storage_fails_before_any_work_in_one_line(s3_env, tmp_path, monkeypatch, capsys, case):
    env, uri, message = bad_storage_cases(s3_env)[case]
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    before = s3_env.keys("bars")
    assert cli(["--storage", uri, "--name", "bad", "--data-dir", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("raylocal-tune: error: ") and message in err, err
    assert s3_env.keys("bars") == before
    assert not (tmp_path / "raylocal_results").exists() and not list(tmp_path.glob("*:"))


@pytest.mark.parametrize("credentials", ["missing", "wrong"])
def test_bad_credentials_fail_before_any_work_in_one_line(tmp_path, monkeypatch, capsys, credentials):
    # A server that checks credentials after its first request (the bucket's creation).
    with s3_server(INITIAL_NO_AUTH_ACTION_COUNT="1") as strict:
        strict.make_bucket("locked")
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        for key, value in strict.environment(credentials=credentials == "wrong").items():
            monkeypatch.setenv(key, value)
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
            if credentials == "missing":
                monkeypatch.delenv(key, raising=False)
        monkeypatch.chdir(tmp_path)
        assert cli(["--storage", "s3://locked/x", "--name", "bad"]) == 2
        err = capsys.readouterr().err
        expected = "INVALID_ACCESS_KEY_ID" if credentials == "wrong" else "are credentials set"
        assert err.count("\n") == 1 and "cannot write to storage s3://locked/x/bad: " in err and expected in err, err
        assert not (tmp_path / "raylocal_results").exists()


def test_the_writability_probe_leaves_nothing(s3_env):
    check_writable(open_storage("s3://bars/probe"))
    assert s3_env.keys("bars", "probe") == []
