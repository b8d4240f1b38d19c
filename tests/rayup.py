"""What the `ray up` tests share: whether this machine can make their namespaces and sshd."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SSHD_PATHS = ("/usr/sbin/sshd", "/usr/local/sbin/sshd")
TOOLS = ("unshare", "ip", "ssh", "ssh-keygen", "rsync", "mount")


def missing_requirements() -> str | None:
    """Why this machine cannot run the test, or None."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return "needs Linux and root (network, PID and mount namespaces)"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if not any(os.access(path, os.X_OK) for path in SSHD_PATHS):
        missing.append("sshd")
    try:
        pwd.getpwnam("sshd")  # sshd's privilege separation user, made by the openssh-server package
    except KeyError:
        missing.append("the sshd user")
    if missing:
        return f"missing {', '.join(missing)} (Debian: apt-get install openssh-server rsync iproute2; .ci/run does)"
    # The namespaces, and the mounts the flow makes in them, on the file system its folder is on.
    with tempfile.TemporaryDirectory(prefix="rlprobe") as folder:
        for name in ("low", "up", "work"):
            os.mkdir(os.path.join(folder, name))
        mounts = (f"mount -t overlay overlay -o lowerdir={folder}/low,upperdir={folder}/up,workdir={folder}/work "
                  f"{folder}/low && mount -t tmpfs tmpfs /run")
        probe = subprocess.run(["unshare", "--net", "--pid", "--mount", "--fork", "sh", "-c", mounts],
                               capture_output=True, text=True)
    if probe.returncode:
        return f"cannot make the namespaces and mounts here: {probe.stderr.strip()}"
    return None
