"""`ray up` with a head and a worker, each a machine of its own, on one box.

Everything runs in one outer set of Linux namespaces (network, PID, mount) that the test makes
(`unshare`), so no packet can leave the box and no address outside it is dialled:
- the outer network namespace holds a bridge (10.77.0.1) and moto's S3 server on it, and is where
  the user's machine runs `ray up`, `ray dashboard` (the SSH tunnel) and `ray job submit`;
- each machine is a network namespace of its own, joined to the bridge by a veth pair (head
  10.77.0.10, worker 10.77.0.11; a default route to the bridge, which leads nowhere), with its own
  sshd, and its own PID and mount namespaces: root's home is an overlay on its own folder, /tmp
  and /run are its own, and `ray stop` there sees that machine's processes alone.
The test's folder is seen by both machines at its own path (as a shared mount would be), for the
data and the sshd files. The search's storage is the bucket.

What the test changes in cluster.local.yaml, beyond what tests/test_ray_up.py does: the two
addresses, and one CPU per machine in the start commands (`--num-cpus=1`). The search is the smoke
test with two Train workers per trial, so each trial's DDP ranks and the final phase's must use
both machines (gloo across the veth pairs). setup_commands put the file-mounted source
(~/raylocal) on PYTHONPATH instead of installing it.
"""

from __future__ import annotations

import inspect
import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import yaml
from helpers import SESSION_MARK
from rayup import ROOT, SSHD_PATHS, missing_requirements

from raylocal.cluster import LOOPBACK_SWITCH

pytestmark = [pytest.mark.slow, pytest.mark.ray]

BRIDGE = "10.77.0.1"
MACHINES = {"head": "10.77.0.10", "worker": "10.77.0.11"}
S3_PORT = 9000
BUCKET = "twonodes"
NAME = "two"
# `ray start`'s default range for its workers' own ports (--min-worker-port, --max-worker-port).
RAY_WORKER_PORTS = range(10002, 20000)
# Ray's processes: what may not outlive `ray down` on either machine (Python's and grep -E's syntax).
RAY_PROCESS = re.compile(r"raylet|gcs_server|ray::|default_worker|dashboard|log_monitor|monitor\.py|"
                         r"runtime_env|ray/_private|ray/autoscaler")


def cluster_config(key: Path) -> dict:
    config = yaml.safe_load((ROOT / "cluster.local.yaml").read_text())
    config["cluster_name"] = f"raylocal-two-{os.getpid()}"
    config["provider"] |= {"head_ip": MACHINES["head"], "worker_ips": [MACHINES["worker"]]}
    config["auth"] = {"ssh_user": "root", "ssh_private_key": str(key)}
    # This environment instead of a venv with torch from the index; the mounted source first.
    config["setup_commands"] = [
        f"grep -qs '{sys.prefix}/bin/activate' ~/.bashrc || echo 'source {sys.prefix}/bin/activate' >> ~/.bashrc",
        "grep -qs 'PYTHONPATH=$HOME/raylocal' ~/.bashrc || echo 'export PYTHONPATH=$HOME/raylocal' >> ~/.bashrc",
    ]
    for start in ("head_start_ray_commands", "worker_start_ray_commands"):
        config[start] = [command + " --num-cpus=1" if "ray start" in command else command
                         for command in config[start]]
    return config


def sshd_config(work: Path, machine: str, key: Path) -> str:
    path = f"{sys.prefix}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    return textwrap.dedent(f"""\
        ListenAddress {MACHINES[machine]}:22
        HostKey {work}/{machine}/host_key
        PidFile /run/sshd.pid
        AuthorizedKeysFile {key}.pub
        PermitRootLogin prohibit-password
        PasswordAuthentication no
        KbdInteractiveAuthentication no
        UsePAM no
        StrictModes no
        SetEnv PATH={path} RAY_USAGE_STATS_ENABLED=0 AWS_EC2_METADATA_DISABLED=true {SESSION_MARK}={os.environ.get(SESSION_MARK, "")}
        """)


# A private /tmp (the folder given) that still shows the paths every machine needs at their own
# paths: the test's folder, this Python environment and the repository, which CI keeps under /tmp.
KEEP_BEFORE = """\
keep_before() {
  local i=0 path
  for path in "$WORK" "$PYTHON_PREFIX" "$REPO"; do
    mkdir -p /run/keep/$i && mount --bind "$path" /run/keep/$i; i=$((i + 1))
  done
  mount --bind "$1" /tmp
  i=0
  for path in "$WORK" "$PYTHON_PREFIX" "$REPO"; do
    mkdir -p "$path" && mount --bind /run/keep/$i "$path"; i=$((i + 1))
  done
}
"""

# Each machine, in its own network namespace: own PID and mount namespaces, own /run, /tmp and home.
MACHINE = KEEP_BEFORE + """\
set -euo pipefail
M=$1
mount -t tmpfs tmpfs /run
keep_before "$WORK/$M/tmp"
mount -t overlay overlay -o "lowerdir=$ROOT_HOME,upperdir=$WORK/$M/home-upper,workdir=$WORK/$M/home-work" "$ROOT_HOME"
mkdir -p /run/sshd
"$SSHD" -f "$WORK/$M/sshd_config" -E "$WORK/$M/sshd.log"
touch "$WORK/$M/up"
while true; do sleep 1; done
"""

# The outer namespace: the network, the S3 server, the machines, then the user's flow.
OUTER = KEEP_BEFORE + """\
set -euo pipefail
ip link set lo up
mount -t tmpfs tmpfs /run
keep_before "$WORK/client/tmp"
ip link add br0 type bridge
ip addr add "$BRIDGE/24" dev br0
ip link set br0 up
for M in head worker; do
  ADDR=$([ $M = head ] && echo "$HEAD_IP" || echo "$WORKER_IP")
  ip netns add $M
  ip link add v-$M type veth peer name eth0 netns $M
  ip link set v-$M master br0 up
  ip -n $M link set lo up
  ip -n $M addr add "$ADDR/24" dev eth0
  ip -n $M link set eth0 up
  ip -n $M route add default via "$BRIDGE"
  ip netns exec $M unshare --pid --mount --fork --kill-child --mount-proc bash "$WORK/machine.sh" $M &
  echo $! > "$WORK/$M/unshare.pid"
done
python -m moto.server -H "$BRIDGE" -p "$S3_PORT" > "$WORK/moto.log" 2>&1 &
python "$WORK/watch.py" &
WATCH=$!
for i in $(seq 600); do [ -e "$WORK/head/up" ] && [ -e "$WORK/worker/up" ] && break; sleep 0.2; done
python - <<'EOF'
import os, time, boto3
for _ in range(300):
    try:
        boto3.client("s3").create_bucket(Bucket=os.environ["BUCKET"]); break
    except Exception:
        time.sleep(0.2)
else:
    raise SystemExit("moto's S3 server did not start")
EOF
cd "$REPO"
echo "== ray up"
ray get-auth-token --generate >/dev/null
ray up -y --no-config-cache "$WORK/cluster.yaml"
echo "== waiting for the worker"
for i in $(seq 60); do
  ray exec "$WORK/cluster.yaml" 'ray status' > "$WORK/status.txt" 2>&1 || true
  python "$WORK/nodes.py" "$WORK/status.txt" | grep -qx 2 && break
  sleep 5
done
echo "== ray status"
cat "$WORK/status.txt"
ray dashboard --port 8265 "$WORK/cluster.yaml" > "$WORK/tunnel.log" 2>&1 &
TUNNEL=$!
for i in $(seq 300); do python -c "import socket; socket.create_connection(('127.0.0.1', 8265), 1)" 2>/dev/null && break; sleep 0.2; done
echo "== ray job submit"
RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --runtime-env-json "$RUNTIME_ENV" -- \\
  python -m raylocal.tune --address auto --smoke-test --workers-per-trial 2 --quiet --data-dir "$WORK/data" \\
  --unverified-data \\
  --storage "s3://$BUCKET/raylocal" --name "$NAME" --export-dir /root/best_model
touch "$WORK/stop-watch"
wait $WATCH
python - <<'EOF'
import json, os, pathlib, boto3
client, bucket, work = boto3.client("s3"), os.environ["BUCKET"], pathlib.Path(os.environ["WORK"])
pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
keys = sorted(item["Key"] for page in pages for item in page.get("Contents", []))
(work / "bucket.json").write_text(json.dumps(keys))
(work / "results").mkdir()
for key in keys:
    if key.endswith("/result.json"):
        client.download_file(bucket, key, str(work / "results" / key.replace("/", "__")))
EOF
kill $TUNNEL
echo "== ray down"
ray down -y "$WORK/cluster.yaml"
# `ray down` runs `ray stop` on the head alone: on a worker, Ray's log monitor outlives the head.
# So the user's last step (docs/cluster.md): `ray stop` on each worker, over SSH.
ps_on() { nsenter --target "$(pgrep -P "$(cat "$WORK/$1/unshare.pid")")" --pid --mount ps -eo pid,args; }
ps_on worker > "$WORK/worker/after-ray-down.txt"
echo "== ray stop on the worker"
ssh -i "$WORK/id_ed25519" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o IdentitiesOnly=yes \
  "root@$WORKER_IP" "bash --login -c -i 'source ~/.bashrc; ray stop'"
for M in head worker; do
  for i in $(seq 60); do
    ps_on $M > "$WORK/$M/after-down.txt"
    grep -qE "$RAY_PROCESS" "$WORK/$M/after-down.txt" || break
    sleep 1
  done
done
echo "== done"
"""

# Every listening TCP socket of both machines, by `ss -ltnp` inside each network namespace, polled
# while the search runs; each with its process's command line (the PIDs are the outer namespace's).
WATCH = """\
import json, os, re, subprocess, time
work = os.environ["WORK"]
seen = {}
while not os.path.exists(f"{work}/stop-watch"):
    for machine in ("head", "worker"):
        lines = subprocess.run(["nsenter", f"--net=/run/netns/{machine}", "ss", "-ltnpH"],
                               capture_output=True, text=True).stdout.splitlines()
        for line in lines:
            fields = line.split()
            local = fields[3]
            for pid in re.findall(r"pid=(\\d+)", line) or ["0"]:
                try:
                    command = open(f"/proc/{pid}/cmdline").read().replace("\\0", " ").strip()
                except OSError:
                    command = ""
                seen.setdefault((machine, local, pid), [line, command])
    time.sleep(0.5)
with open(f"{work}/listeners.json", "w") as file:
    json.dump([[*key, *value] for key, value in sorted(seen.items())], file, indent=1)
"""


def status_nodes(status: str) -> int:
    """How many nodes `ray status` lists as running (Active, Idle or Healthy: " N TYPE" lines)."""
    import re  # also run alone, inside the namespaces (nodes.py)

    count, counting = 0, False
    for line in status.splitlines():
        if re.match(r"(Active|Idle|Healthy):$", line.strip()):
            counting = True
        elif re.match(r"\w[\w ]*:$", line.strip()) or not line.strip():
            counting = False
        elif counting and (match := re.match(r"\s+(\d+) \S", line)):
            count += int(match.group(1))
    return count


@pytest.fixture
def work():
    # Short: beside Ray's own session folders (see tests/test_ray_up.py); every namespace's own
    # /tmp and /run are folders or mounts in it, so removing it removes all the test made.
    folder = Path(tempfile.mkdtemp(prefix="rl2n", dir=os.environ.get("RAY_TMPDIR")))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def prepare(work: Path, data_dir: Path) -> None:
    for folder in ("client/tmp", "client/home", "head", "worker"):
        (work / folder).mkdir(parents=True)
    for machine in MACHINES:
        for folder in ("home-upper", "home-work", "tmp"):
            (work / machine / folder).mkdir()
    key = work / "id_ed25519"
    for path in (key, work / "head" / "host_key", work / "worker" / "host_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    for machine in MACHINES:
        (work / machine / "sshd_config").write_text(sshd_config(work, machine, key))
    (work / "cluster.yaml").write_text(yaml.safe_dump(cluster_config(key)))
    nodes = f"import sys\n{inspect.getsource(status_nodes)}\nprint(status_nodes(open(sys.argv[1]).read()))\n"
    for name, text in (("machine.sh", MACHINE), ("outer.sh", OUTER), ("watch.py", WATCH), ("nodes.py", nodes)):
        (work / name).write_text(text)
    shutil.copytree(data_dir, work / "data")


def flow_environment(work: Path, root_home: Path) -> dict[str, str]:
    s3 = {"AWS_ENDPOINT_URL": f"http://{BRIDGE}:{S3_PORT}", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_EC2_METADATA_DISABLED": "true"}
    # The session's own token, loopback switch and temporary folder stay outside: the cluster makes
    # its own, as for a user; nothing of this machine's AWS settings comes in.
    env = {key: value for key, value in os.environ.items()
           if key not in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE", LOOPBACK_SWITCH, "RAY_ADDRESS", "TMPDIR", "RAY_TMPDIR")
           and not key.startswith("AWS_")}
    return env | s3 | {
        "WORK": str(work), "REPO": str(ROOT), "PYTHON_PREFIX": sys.prefix,
        "SSHD": next(p for p in SSHD_PATHS if os.access(p, os.X_OK)),
        "ROOT_HOME": str(root_home), "HOME": str(work / "client" / "home"), "BRIDGE": BRIDGE,
        "HEAD_IP": MACHINES["head"], "WORKER_IP": MACHINES["worker"], "S3_PORT": str(S3_PORT),
        "BUCKET": BUCKET, "NAME": NAME, "RUNTIME_ENV": json.dumps({"env_vars": s3}), "RAY_PROCESS": RAY_PROCESS.pattern,
        "PATH": f"{sys.prefix}/bin:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0"}


def run_flow(work: Path, env: dict[str, str]) -> str:
    try:
        done = subprocess.run(["unshare", "--net", "--pid", "--mount", "--fork", "--kill-child", "--mount-proc",
                               "bash", str(work / "outer.sh")], check=False, env=env, capture_output=True, text=True,
                              timeout=1200)
    except subprocess.TimeoutExpired as timeout:
        pytest.fail(f"the two-machine flow did not end in 20 minutes:\n{timeout.stdout!r:.6000}\n"
                    f"{timeout.stderr!r:.6000}")
    output = done.stdout + done.stderr
    print(output[-20000:])
    assert done.returncode == 0, output[-8000:]
    return done.stdout


def listeners(work: Path) -> list[tuple[str, str, int, int, str]]:
    """(machine, address, port, process id, command line) of every listening socket seen on both machines."""
    rows = json.loads((work / "listeners.json").read_text())
    print("\nlistening sockets (ss -ltnp in each machine's network namespace):")
    found = []
    for machine, local, pid, line, command in rows:
        print(f"  {machine:6} {line}\n         {command[:160]}")
        address, _, port = local.rpartition(":")
        found.append((machine, address.strip("[]").split("%")[0], int(port), int(pid), command))
    return found


def check_raylocal_sockets(found: list[tuple[str, str, int, int, str]]) -> None:
    """The Train workers' own sockets (the rendezvous store, gloo's), told from Ray's by port: Ray
    gives each of its workers a port in its worker range; the others' ports are the system's picks.
    A process is a Train worker if it was ever seen as one (its title changes as it runs)."""
    train = {pid for _, _, _, pid, command in found if "RayTrainWorker" in command or "join_process_group" in command}
    ours = [(machine, address, port) for machine, address, port, pid, _ in found
            if pid in train and port not in RAY_WORKER_PORTS]
    assert {machine for machine, *_ in ours} == set(MACHINES), ours
    assert all(address == MACHINES[machine] for machine, address, _ in ours), ours


def test_ray_up_with_a_worker_on_a_second_machine_searches_on_both(work, tiny_mnist_dir):
    reason = missing_requirements()
    if reason:
        pytest.skip(reason)
    pytest.importorskip("moto", reason="the S3 server is moto's (pip install -e '.[test]')")
    root_home = Path(pwd.getpwuid(0).pw_dir)
    before = sorted(path.name for path in root_home.iterdir())
    prepare(work, tiny_mnist_dir)
    stdout = run_flow(work, flow_environment(work, root_home))
    found = listeners(work)
    for step in ("== ray up", "== ray status", "== ray job submit", "== ray down", "== ray stop on the worker",
                 "== done"):
        assert step in stdout
    status = (work / "status.txt").read_text()
    assert status_nodes(status) == 2, status

    card = json.loads((work / "head" / "home-upper" / "best_model" / "model_card.json").read_text())
    final = card["final"]
    assert (final["workers"], final["dist_backend"]) == (2, "gloo")
    assert len(final["worker_nodes"].split(",")) == 2, final["worker_nodes"]

    check_raylocal_sockets(found)
    keys = json.loads((work / "bucket.json").read_text())
    # Every trial's DDP ranks ran on both machines, as the final phase's did.
    trial_nodes = trial_results_nodes(work, keys)
    assert trial_nodes == [set(final["worker_nodes"].split(","))] * 2, trial_nodes
    print("the worker's processes after `ray down`:\n" + (work / "worker" / "after-ray-down.txt").read_text())
    for machine in MACHINES:
        after = (work / machine / "after-down.txt").read_text()
        assert not [line for line in after.splitlines() if RAY_PROCESS.search(line)], after
    # The export and the report, uploaded to the bucket (the storage layer's).
    assert f"raylocal/{NAME}/best_model/model_card.json" in keys, keys
    assert f"raylocal/{NAME}/best_model/model.onnx" in keys
    assert any(key.startswith(f"raylocal/{NAME}/report/") for key in keys), keys
    assert sorted(path.name for path in root_home.iterdir()) == before


def trial_results_nodes(work: Path, keys: list[str]) -> list[set[str]]:
    """For each trial, the Ray nodes its reports name (`worker_nodes`: where its DDP ranks ran),
    from the trials' result.json files in the bucket (copied out of the namespaces by the flow)."""
    trial = re.compile(rf"raylocal/{NAME}/run_trial[^/]*/result\.json")
    results = [key for key in keys if trial.fullmatch(key)]
    assert len(results) == 2, keys  # the smoke test's two trials
    nodes = []
    for key in results:
        lines = filter(str.strip, (work / "results" / key.replace("/", "__")).read_text().splitlines())
        nodes.append({node for line in lines for node in json.loads(line)["worker_nodes"].split(",")})
    return nodes
