"""A one-node Slurm cluster for the tests: Debian's ``slurm-wlm`` and ``munge`` (``make slurm``
installs them), started in a private temporary folder and stopped after the tests.

Everything the cluster uses is its own: the munge key and socket, ``slurm.conf``, the state, spool,
log and pid files, and two free TCP ports; so two test runs on one machine do not share a daemon.
The daemons run in the foreground as children of the test process, each set to receive SIGTERM
when that process dies (``PR_SET_PDEATHSIG``), so even a killed test run leaves none behind.
Slurm's client commands find this cluster through ``SLURM_CONF`` in :attr:`SlurmCluster.env`.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

COMMANDS = ("munged", "munge", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "srun", "sinfo", "scancel")
PR_SET_PDEATHSIG = 1


def unavailable() -> Optional[str]:
    """Why a one-node Slurm cannot be started here, or ``None`` when it can."""
    missing = [c for c in COMMANDS if shutil.which(c) is None and not Path("/usr/sbin", c).exists()]
    if missing:
        return f"Slurm is not installed (no {', '.join(missing)}): `make slurm` installs slurm-wlm and munge"
    if os.geteuid() != 0:
        return "starting slurmd needs root (it launches jobs as their users)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """Runs in the daemon before exec: SIGTERM it when the test process dies."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class SlurmCluster:
    """munged, slurmctld and slurmd for one node (this machine, all its CPUs, no cgroups)."""

    def __init__(self, kill_wait: int = 10) -> None:
        # Not under pytest's tmp_path: that is 0700 and the daemons' log checks want to traverse it.
        self.root = Path(tempfile.mkdtemp(prefix="resdense-slurm-"))
        self.root.chmod(0o755)
        self.host = socket.gethostname().split(".")[0]
        self.cpus = os.cpu_count() or 1
        self.kill_wait = kill_wait
        self.env = dict(os.environ, SLURM_CONF=str(self.root / "slurm.conf"))
        self._procs: dict[str, subprocess.Popen] = {}

    def _write_config(self) -> None:
        r = self.root
        for sub in ("munge", "state", "spool"):
            (r / sub).mkdir(mode=0o700)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        lines = [
            f"ClusterName=rd{os.getpid()}", f"SlurmctldHost={self.host}",
            f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
            "AuthType=auth/munge", f"AuthInfo=socket={r}/munge/sock", "CredType=cred/munge",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "MpiDefault=none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "ReturnToService=2",
            "SlurmUser=root", "SlurmdUser=root", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", f"KillWait={self.kill_wait}",
            f"StateSaveLocation={r}/state", f"SlurmdSpoolDir={r}/spool",
            f"SlurmctldPidFile={r}/slurmctld.pid", f"SlurmdPidFile={r}/slurmd.pid",
            f"SlurmctldLogFile={r}/slurmctld.log", f"SlurmdLogFile={r}/slurmd.log",
            f"NodeName={self.host} CPUs={self.cpus} State=UNKNOWN",
            f"PartitionName=debug Nodes={self.host} Default=YES MaxTime=30 State=UP",
        ]
        (r / "slurm.conf").write_text("\n".join(lines) + "\n")

    def _spawn(self, name: str, *args: str) -> None:
        log = open(self.root / f"{name}.out", "w")
        self._procs[name] = subprocess.Popen([_binary(name), *args], stdout=log, stderr=subprocess.STDOUT,
                                             env=self.env, preexec_fn=_die_with_parent)

    def start(self, timeout: float = 60) -> None:
        """Start the three daemons; wait until ``sinfo`` shows the node idle."""
        self._write_config()
        m = self.root / "munge"
        self._spawn("munged", "-F", "-f", f"--socket={m}/sock", f"--key-file={m}/munge.key",
                    f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log", f"--seed-file={m}/seed")
        self._wait(lambda: (m / "sock").exists(), timeout, "munged")
        self._spawn("slurmctld", "-D", "-i")
        self._spawn("slurmd", "-D")
        self._wait(lambda: self.run("sinfo", "-h", "-o", "%t").stdout.strip() == "idle", timeout, "the node idle")

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited ({proc.returncode}): {self.log(name)[-1500:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"waited {timeout:.0f} s for {what}; slurmctld log: {self.log('slurmctld')[-1500:]}")
            time.sleep(0.2)

    def log(self, name: str) -> str:
        paths = [self.root / f"{name}.log", self.root / "munge" / f"{name}.log", self.root / f"{name}.out"]
        return "".join(p.read_text(errors="replace") for p in paths if p.is_file())

    def run(self, *cmd: str, check: bool = False, timeout: float = 60) -> subprocess.CompletedProcess:
        """A Slurm client command against this cluster."""
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=check, timeout=timeout)

    def jobs(self) -> list[str]:
        """``JOBID STATE REASON`` of every job in the queue (array tasks one by one)."""
        out = self.run("squeue", "-h", "-r", "-o", "%i %T %r").stdout
        return [line for line in out.splitlines() if line.strip()]

    def wait_done(self, job: str, timeout: float) -> None:
        """Wait until job ``job`` (all its array tasks) has left the queue."""
        self._wait(lambda: not any(line.split()[0].split("_")[0] == job for line in self.jobs()), timeout,
                   f"job {job} to finish")

    def stop(self) -> None:
        """Cancel every job, wait for them to go, stop the daemons (children first) and delete the folder."""
        if self._procs.get("slurmctld") and self._procs["slurmctld"].poll() is None:
            self.run("scancel", "--full", "--user", "root")
            deadline = time.monotonic() + self.kill_wait + 10
            while self.jobs() and time.monotonic() < deadline:
                time.sleep(0.3)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self._procs.pop(name, None)
            if proc is None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)
