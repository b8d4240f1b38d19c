"""`ray up` proven on a machine of your own: cluster.local.yaml against a throw-away sshd.

The whole flow of the README's "Running on your own machines" runs in Linux namespaces made
for this test alone (`unshare`), so the machine is left as it was found:
- a network namespace: sshd takes port 22 (the only port Ray's SSH runner dials) on a loopback
  of its own, and nothing in it can be reached from outside;
- a PID namespace: the `ray stop` that `ray up` and `ray down` run on the head sees only this
  test's processes, never a user's own Ray; when the namespace ends, everything in it does;
- a mount namespace: root's home is an overlay whose writes (~/.bashrc, ~/.ray/auth_token,
  ~/ray_bootstrap_config.yaml) land in the test's folder, /run is private (sshd's directory),
  and Ray's temporary folder is the test's (RAY_TMPDIR), so `ray_current_cluster` is untouched.

What the test changes in cluster.local.yaml: the head's address (127.0.0.1, no workers), the
account (root) and key (a fresh one), and setup_commands, which would build a venv and install
torch (5.5 GB) from the package index; here the head uses this test's own environment instead.
Everything else (file mounts, token auth, the start commands) is the file's. After the submitted
search, serve.yaml (its export_dir set to the search's export) goes to the head with `serve deploy`,
as docs/serving.md shows, and answers a PNG as `raylocal predict` does.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import textwrap
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import SESSION_MARK
from PIL import Image
from rayup import ROOT, SSHD_PATHS, missing_requirements

from raylocal import predict
from raylocal.cluster import LOOPBACK_SWITCH

pytestmark = [pytest.mark.slow, pytest.mark.ray]

def local_config(work: Path, key: Path) -> dict:
    config = yaml.safe_load((ROOT / "cluster.local.yaml").read_text())
    config["cluster_name"] = f"raylocal-up-test-{os.getpid()}"
    config["provider"] |= {"head_ip": "127.0.0.1", "worker_ips": []}
    config["auth"] = {"ssh_user": "root", "ssh_private_key": str(key)}
    # The file's setup_commands build a venv and install torch from the index: this environment instead.
    config["setup_commands"] = [f"grep -qs '{sys.prefix}/bin/activate' ~/.bashrc || "
                                f"echo 'source {sys.prefix}/bin/activate' >> ~/.bashrc"]
    return config


FLOW = """\
set -euo pipefail
ip link set lo up
mount -t overlay overlay -o "lowerdir=$ROOT_HOME,upperdir=$WORK/home-upper,workdir=$WORK/home-work" "$ROOT_HOME"
mount -t tmpfs tmpfs /run
mkdir -p /run/sshd
"$SSHD" -f "$WORK/sshd_config" -E "$WORK/sshd.log"
cd "$REPO"
echo "== ray up"
ray get-auth-token --generate >/dev/null
ray up -y --no-config-cache "$WORK/cluster.yaml"
echo "== ray job submit"
RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 -- \\
  python -m raylocal.tune --address auto --smoke-test --quiet --data-dir "$DATA" --unverified-data \\
  --storage "$WORK/results" --name up --export-dir "$WORK/export"
echo "== serve deploy"
ray exec "$WORK/cluster.yaml" "serve deploy $WORK/serve.yaml"
for _ in $(seq 180); do curl -sf http://127.0.0.1:8000/healthz >/dev/null && break; sleep 1; done
curl -sf http://127.0.0.1:8000/healthz >/dev/null || { echo "serve deploy: no answer on /healthz in 3 minutes"; exit 1; }
echo "== serve predict"
curl -s --data-binary @"$WORK/digit.png" -H "Content-Type: image/png" http://127.0.0.1:8000/predict
echo
ray exec "$WORK/cluster.yaml" "serve shutdown -y"
echo "== ray down"
ray down -y "$WORK/cluster.yaml"
echo "== done"
"""


def after_title(output: str, title: str) -> str:
    """What the flow printed after a title line of its own; empty when it never got there."""
    return output.split(title + "\n", 1)[1] if title + "\n" in output else ""


def serve_config(work: Path) -> dict:
    """serve.yaml as the docs have a user edit it: export_dir where the submitted search wrote its export."""
    config = yaml.safe_load((ROOT / "serve.yaml").read_text())
    config["applications"][0]["args"]["export_dir"] = str(work / "export")
    return config


def sshd_config(work: Path, key: Path) -> str:
    path = f"{sys.prefix}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    return textwrap.dedent(f"""\
        ListenAddress 127.0.0.1:22
        HostKey {work}/host_key
        PidFile {work}/sshd.pid
        AuthorizedKeysFile {key}.pub
        PermitRootLogin prohibit-password
        PasswordAuthentication no
        KbdInteractiveAuthentication no
        UsePAM no
        StrictModes no
        SetEnv PATH={path} RAY_TMPDIR={work}/ray RAY_USAGE_STATS_ENABLED=0 {SESSION_MARK}={os.environ.get(SESSION_MARK, "")}
        """)


@pytest.fixture
def work():
    # Short: Ray's unix sockets live under RAY_TMPDIR, and their paths may not exceed 107 bytes. So
    # beside Ray's own session folders (conftest pins RAY_TMPDIR there), not in the test session's.
    folder = Path(tempfile.mkdtemp(prefix="rlup", dir=os.environ.get("RAY_TMPDIR")))
    # Ray's SSH runner keeps its control sockets in /tmp/ray_ssh_<user>/<cluster>: remove what it adds.
    control = set(Path("/tmp").glob("ray_ssh_*")) | set(Path("/tmp").glob("ray_ssh_*/*"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        added = set(Path("/tmp").glob("ray_ssh_*")) | set(Path("/tmp").glob("ray_ssh_*/*"))
        for path in sorted(added - control, reverse=True):  # sockets before their folders
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def test_ray_up_on_your_own_machines_runs_a_submitted_search(work, tiny_mnist_dir):
    reason = missing_requirements()
    if reason:
        pytest.skip(reason)
    import hashlib

    def files_of(home: Path) -> dict[str, str]:
        """Every file under root's home and its SHA-256 (a link: where it points)."""
        found = {}
        for path in home.rglob("*"):
            if path.is_symlink():
                found[str(path)] = f"-> {os.readlink(path)}"
            elif path.is_file():
                with open(path, "rb") as file:
                    found[str(path)] = hashlib.file_digest(file, "sha256").hexdigest()
        return found

    root_home = Path(pwd.getpwuid(0).pw_dir)
    before = files_of(root_home)
    for folder in ("home-upper", "home-work", "client-home", "ray"):
        (work / folder).mkdir()
    key = work / "id_ed25519"
    for path in (key, work / "host_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    (work / "sshd_config").write_text(sshd_config(work, key))
    (work / "cluster.yaml").write_text(yaml.safe_dump(local_config(work, key)))
    (work / "serve.yaml").write_text(yaml.safe_dump(serve_config(work)))
    digit = np.zeros((75, 75), dtype=np.uint8)
    digit[20:40, 30:36] = 255
    Image.fromarray(digit).save(work / "digit.png")
    # Inside the namespace, once the head runs: what listens on the dashboard's port, and what its
    # job API answers a request without the token.
    checks = ('echo "== dashboard listeners"\nss -Hltn "sport = :8265"\n'
              'echo "== job API without the token"\n'
              "curl -s -o /dev/null -w '%{http_code}\\n' http://127.0.0.1:8265/api/jobs/\n")
    (work / "flow.sh").write_text(FLOW.replace('echo "== ray job submit"\n', checks + 'echo "== ray job submit"\n'))
    sshd = next(path for path in SSHD_PATHS if os.access(path, os.X_OK))
    # The session's own token and loopback switch stay outside: the cluster makes its own, as for a user.
    env = {key: value for key, value in os.environ.items()
           if key not in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE", LOOPBACK_SWITCH, "RAY_ADDRESS")}
    env |= {"WORK": str(work), "REPO": str(ROOT), "DATA": str(tiny_mnist_dir), "SSHD": sshd,
            "ROOT_HOME": str(root_home), "HOME": str(work / "client-home"), "RAY_TMPDIR": str(work / "ray"),
            # `ray up` and `ray down` cache the resolved config in the temporary folder.
            "TMPDIR": str(work),
            "PATH": f"{sys.prefix}/bin:{env['PATH']}", "RAY_USAGE_STATS_ENABLED": "0"}
    try:
        done = subprocess.run(["unshare", "--net", "--pid", "--mount", "--fork", "--kill-child", "--mount-proc",
                               "bash", str(work / "flow.sh")], env=env, capture_output=True, timeout=600)
        code, stdout, stderr = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as timeout:
        code, stdout, stderr = None, timeout.stdout or b"", timeout.stderr or b""
    stdout, output = stdout.decode(errors="replace"), (stdout + stderr).decode(errors="replace")
    # Root's home as the flow left it, before this process reads the export (onnxruntime keeps a
    # database under ~/.cache of whoever runs it).
    after = files_of(root_home)
    # The dashboard listened on loopback alone and refused a request without the token: checked
    # first, on whatever the flow printed, since they must hold even when a later step fails.
    section = after_title(stdout, "== dashboard listeners").split("== ")[0]
    bound = [line.split()[3] for line in section.splitlines() if line.strip()]
    assert bound and set(bound) == {"127.0.0.1:8265"}, section or output[-6000:]
    assert after_title(stdout, "== job API without the token")[:4] == "401\n", output[-6000:]
    assert code == 0, ("the ray up flow did not end in 10 minutes\n" if code is None else "") + output[-6000:]
    for step in ("== ray up", "== ray job submit", "== serve deploy", "== serve predict", "== ray down", "== done"):
        assert step in stdout
    assert "succeeded" in output  # ray job submit's closing line
    card = json.loads((work / "export" / "model_card.json").read_text())
    assert card["search"]["trials"] == 2 and (work / "export" / "model.onnx").is_file()
    # The head ran what the file says: token auth on, the file mounts.
    assert (work / "home-upper" / ".ray" / "auth_token").read_text() == (
        work / "client-home" / ".ray" / "auth_token").read_text()
    assert "export RAY_AUTH_MODE=token" in (work / "home-upper" / ".bashrc").read_text()
    mounted = work / "home-upper" / "raylocal"
    assert (mounted / "pyproject.toml").read_text() == (ROOT / "pyproject.toml").read_text()
    assert (mounted / "raylocal" / "tune.py").is_file()
    # serve.yaml, deployed with `serve deploy` on the head, answered as `raylocal predict` does on the export.
    served = json.loads(after_title(stdout, "== serve predict").splitlines()[0])
    [expected] = predict.main(Namespace(export_dir=work / "export", images=[work / "digit.png"], annotate=None))
    assert (served["label"], served["confidence"]) == pytest.approx((expected["label"], expected["confidence"]), abs=1e-3)
    # Root's real home is as it was, file by file: every write went to the overlay.
    assert after == before
