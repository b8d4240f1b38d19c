"""cluster.yaml: the checks `ray up` runs before it talks to AWS, plus what the file promises.

`ray up` (ray.autoscaler._private.commands.create_or_update_cluster) reads the file with
yaml.safe_load and hands it to `_bootstrap_config`, which
  1. prepare_config: merges ray/autoscaler/aws/defaults.yaml, setup commands, per-type min/max;
  2. imports the AWS provider (needs boto3) and fills node resources from
     ec2.describe_instance_types (needs credentials; on failure `ray up` only warns);
  3. validate_config: ray-schema.json (jsonschema) and the head/min/max checks;
  4. provider.bootstrap_config: IAM profile, key pair, subnets, security groups (AWS API calls).
These tests run that same `_bootstrap_config` with step 2's and step 4's AWS calls replaced by
no-ops (they need boto3 and AWS credentials), so steps 1 and 3 are Ray's own code, unchanged.
Neither step needs boto3 or starts Ray.
"""

from __future__ import annotations

import copy
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")  # ray[default] brings it; `ray up` needs it too
commands = pytest.importorskip("ray.autoscaler._private.commands")
from packaging.requirements import Requirement  # noqa: E402

import ray  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
GPU_INSTANCE = re.compile(r"^(g4dn|g5|g6|g6e|gr6|p4d|p4de|p5|p5e|p5en)\.")


class OfflineAWS:
    """Stands in for AWSNodeProvider's two class-level hooks that call AWS; the rest is Ray's code."""

    @staticmethod
    def fillout_available_node_types_resources(config):
        return config  # real: ec2.describe_instance_types; our node types set `resources` themselves

    @staticmethod
    def bootstrap_config(config):
        return config  # real: IAM role/profile, key pair, subnets, security groups


def raw_config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())  # as create_or_update_cluster loads it


def bootstrap(config: dict, monkeypatch) -> dict:
    """`ray up`'s _bootstrap_config minus AWS: prepare_config, then validate_config."""
    monkeypatch.setitem(commands._NODE_PROVIDERS, "aws", lambda provider_config: OfflineAWS)
    return commands._bootstrap_config(copy.deepcopy(config), no_config_cache=True)


@pytest.fixture
def config(monkeypatch) -> dict:
    try:
        return bootstrap(raw_config(), monkeypatch)
    except jsonschema.ValidationError as error:  # the schema's own message, without jsonschema's docstrings
        where = "/".join(map(str, error.absolute_path)) or "the top level"
        pytest.fail(f"cluster.yaml fails ray-schema.json at {where}: {error.message}")


def node_types(config: dict) -> tuple[dict, dict]:
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    (worker,) = (spec for name, spec in types.items() if name != config["head_node_type"])
    return head, worker


def start_command(commands_list: list[str]) -> list[str]:
    """Tokens of the `ray start ...` part of the one start command that runs it."""
    (command,) = (cmd for cmd in commands_list if "ray start" in cmd)
    tail = command[command.index("ray start") :]
    return shlex.split(tail)


def test_cluster_yaml_passes_the_checks_ray_up_runs(config):
    assert config["cluster_name"] == "raylocal"
    assert config["provider"]["type"] == "aws"
    assert config["provider"]["region"] and config["provider"]["availability_zone"]
    # prepare_config merged the shared setup commands into the head's and the workers'.
    assert config["head_setup_commands"][: len(config["setup_commands"])] == config["setup_commands"]
    assert config["worker_setup_commands"][: len(config["setup_commands"])] == config["setup_commands"]


def test_one_cpu_head_and_an_autoscaling_gpu_worker_group(config):
    head, worker = node_types(config)
    assert head["max_workers"] == 0 and "GPU" not in head["resources"]
    # CPU 0 is deliberate (see cluster.yaml): training never lands on the head.
    assert head["resources"].get("CPU") == 0
    assert worker["min_workers"] == 0 and 1 <= worker["max_workers"] <= config["max_workers"]
    assert worker["resources"].get("GPU", 0) >= 1
    assert GPU_INSTANCE.match(worker["node_config"]["InstanceType"])
    for spec in (head, worker):
        assert re.fullmatch(r"ami-[0-9a-f]{8,17}", spec["node_config"]["ImageId"])


def test_dashboard_is_bound_to_loopback_and_workers_join_the_head(config):
    head_tokens = start_command(config["head_start_ray_commands"])
    assert "--head" in head_tokens
    assert [token for token in head_tokens if token.startswith("--dashboard-host")] == ["--dashboard-host=127.0.0.1"]
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_tokens
    assert "--port=6379" in head_tokens
    assert "0.0.0.0" not in " ".join(config["head_start_ray_commands"])
    assert "--address=$RAY_HEAD_IP:6379" in start_command(config["worker_start_ray_commands"])
    assert config["head_start_ray_commands"][0] == config["worker_start_ray_commands"][0] == "ray stop"


def test_token_auth_as_the_ray_docs_set_it_up_for_ray_up_clusters(config):
    # docs.ray.io/en/latest/ray-security/token-auth.html, "Ray clusters on remote virtual machines":
    # the locally generated token is mounted on every node, RAY_AUTH_MODE=token set on every node.
    user = config["auth"]["ssh_user"]
    assert config["file_mounts"].get(f"/home/{user}/.ray/auth_token") == "~/.ray/auth_token"
    appends = r"""echo (['"])export RAY_AUTH_MODE=token\1 >> ~/\.bashrc"""
    assert any(re.search(appends, cmd) for cmd in config["initialization_commands"])
    # ...and the Ray daemons get it whatever ~/.bashrc says.
    for start in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        (command,) = (cmd for cmd in start if "ray start" in cmd)
        assert "RAY_AUTH_MODE=token" in command.split("ray start")[0]


def test_every_node_installs_the_ray_pinned_in_pyproject(config):
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (pinned,) = (Requirement(dep) for dep in dependencies if Requirement(dep).name == "ray")
    installs = [Requirement(req) for cmd in config["setup_commands"] for req in re.findall(r'"(ray\[[^"]+)"', cmd)]
    assert len(installs) == 1, config["setup_commands"]
    (installed,) = installs
    assert (installed.name, installed.extras, installed.specifier) == (pinned.name, pinned.extras, pinned.specifier)
    assert str(pinned.specifier) == "==2.60.0"
    # `ray up` wants the local Ray to match the cluster's: so does this test environment.
    assert pinned.specifier.contains(ray.__version__)
    # raylocal itself: from the mounted source tree, in the same pip resolve as Ray.
    assert any("ray[" in cmd and "~/raylocal" in cmd for cmd in config["setup_commands"])
    assert all((ROOT / local).exists() for remote, local in config["file_mounts"].items() if local.startswith("./"))


def test_the_autoscaler_on_the_head_gets_boto3(config):
    assert any("boto3" in cmd for cmd in config["head_setup_commands"])


def broken_misspelled_top_level_key(config):
    config["max_worker"] = config.pop("max_workers")


def broken_gpu_count_is_a_string(config):
    node_types(config)[1]["resources"]["GPU"] = "one"


def broken_head_type_missing(config):
    config["head_node_type"] = "head.gpu"


def broken_min_workers_above_max(config):
    config["max_workers"] = 0
    node_types(config)[1]["min_workers"] = 2


@pytest.mark.parametrize(
    ("breakage", "error"),
    [
        (broken_misspelled_top_level_key, jsonschema.ValidationError),
        (broken_gpu_count_is_a_string, jsonschema.ValidationError),
        (broken_head_type_missing, ValueError),
        (broken_min_workers_above_max, ValueError),
    ],
)
def test_a_broken_copy_fails_validation(breakage, error, monkeypatch):
    broken = raw_config()
    breakage(broken)
    with pytest.raises(error):
        bootstrap(broken, monkeypatch)
