"""A real two-node Slurm cluster on 127.0.0.1 for tests: munged, slurmctld and two emulated slurmd.

    cluster = LocalSlurm.start()               # as root; Slurm + munge installed (tests/slurm/debian.py)
    job = cluster.submit(["examples/slurm/tiny_cpu.sbatch"], cwd=ROOT, export={"OUTPUT_DIR": out})
    info = cluster.wait(job, timeout=600)      # {"JobState": "COMPLETED", "ExitCode": "0:0", ...}
    cluster.stop()                             # cancels jobs, stops the daemons by pid, restores /etc/hosts

Everything lives in one fresh temp dir (config, state, spool, logs, a private munged socket), on free
ports, so it neither needs nor touches a system Slurm/munge setup, and two test sessions can run side
by side. Debian's Slurm build allows several slurmd on one host (`slurmd -N nodeX`, one port each);
the node names get a tagged /etc/hosts line (removed by `stop`) because jobs resolve them, e.g. as the
MASTER_ADDR of a multi-node torch job. The recipe is the one measured in ../shared/DESIGN.md.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.slurm.debian import which

NODES = ("node1", "node2")
HOSTS = Path("/etc/hosts")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY"}


class SlurmError(RuntimeError):
    """The cluster did not come up or a job could not be submitted; the message carries the logs' tails."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"({path}: {e})"


def _slurm_conf(base: Path, ctld_port: int, node_ports: list[int], srun_ports: int, first_job: int) -> str:
    host = socket.gethostname().split(".")[0]
    nodes = "\n".join(
        f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={p} CPUs=2 RealMemory=2000 State=UNKNOWN"
        for n, p in zip(NODES, node_ports)
    )
    # One line per setting; the why of the less obvious ones:
    # - EnforcePartLimits=ALL: a job asking for more than the partition has is refused, not pending forever;
    # - SlurmdParameters=config_overrides: each emulated node claims the CPUs written here;
    # - MinJobAge: keep finished jobs visible to `scontrol show job` (there is no accounting database);
    # - FirstJobId: random, so two sessions' jobs differ, and with them the rendezvous port that
    #   megatron_sapo/cluster/launch.py derives from the job id (20000 + id % 10000);
    # - %n in slurmd paths: one spool/pid/log per emulated node (multiple-slurmd).
    return f"""\
ClusterName=msapotest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={base}/munge/munge.socket
CredType=cred/munge
StateSaveLocation={base}/ctld/state
SlurmctldPidFile={base}/ctld/slurmctld.pid
SlurmctldLogFile={base}/ctld/slurmctld.log
SlurmdSpoolDir={base}/%n/spool
SlurmdPidFile={base}/%n/slurmd.pid
SlurmdLogFile={base}/%n/slurmd.log
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
SrunPortRange={srun_ports}-{srun_ports + 99}
FirstJobId={first_job}
EnforcePartLimits=ALL
SlurmdParameters=config_overrides
MinJobAge=3600
KillWait=5
InactiveLimit=0
SlurmdTimeout=60
MailProg=/bin/true
{nodes}
PartitionName=debug Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class LocalSlurm:
    """A running two-node cluster; build it with `LocalSlurm.start()`, always end it with `stop()`."""

    base: Path
    """The temp dir holding slurm.conf, the daemons' state, spool, pid and log files."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment for Slurm client commands (SLURM_CONF, PATH with sbin)."""
    hosts_line: str | None = None
    """The line added to /etc/hosts (removed again by `stop`)."""
    pids: dict[str, int] = field(default_factory=dict)
    """Daemon name → pid, read from the pid files the daemons wrote."""

    @property
    def conf(self) -> Path:
        return self.base / "slurm.conf"

    @classmethod
    def start(cls, *, ready_timeout: float = 60) -> LocalSlurm:
        base = Path(tempfile.mkdtemp(prefix="msapo-slurm-"))
        base.chmod(0o755)  # munged runs as the munge user and must reach its dir under here
        env = {**os.environ, "SLURM_CONF": str(base / "slurm.conf")}
        env["PATH"] = os.pathsep.join([env.get("PATH", ""), "/usr/sbin", "/sbin"])
        cluster = cls(base=base, env=env)
        try:
            cluster._start(ready_timeout)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _start(self, ready_timeout: float) -> None:
        base = self.base
        for d in ("ctld/state", *(f"{n}/spool" for n in NODES)):
            (base / d).mkdir(parents=True)
        # srun's ports: a block above the rendezvous ports jobs derive (20000-29999); daemons: free ports
        srun_ports = random.randrange(40000, 50000, 100)
        first_job = random.randrange(1, 10000) * 100
        ports = [_free_port() for _ in NODES]
        self.conf.write_text(_slurm_conf(base, _free_port(), ports, srun_ports, first_job))
        self._add_hosts()
        self._start_munged()
        self._run_daemon("slurmctld", ["slurmctld", "-f", str(self.conf), "-c", "-i"])
        for n in NODES:
            self._run_daemon(n, ["slurmd", "-f", str(self.conf), "-N", n])
        self._wait_idle(ready_timeout)

    def _add_hosts(self) -> None:
        self.hosts_line = f"127.0.0.1 {' '.join(NODES)}  # test cluster {self.base}"
        text = HOSTS.read_text()
        with HOSTS.open("a") as f:
            f.write(("" if text.endswith("\n") or not text else "\n") + self.hosts_line + "\n")

    def _start_munged(self) -> None:
        mdir = self.base / "munge"
        mdir.mkdir()
        mdir.chmod(0o755)  # munged insists that everyone may traverse to its socket
        munge = pwd.getpwnam("munge")
        os.chown(mdir, munge.pw_uid, munge.pw_gid)
        key = Path("/etc/munge/munge.key")  # created by the Debian package; every daemon here shares it
        if not key.is_file():
            subprocess.run([which("mungekey") or "mungekey", "--create", "--keyfile", str(key)], check=True)
            os.chown(key, munge.pw_uid, munge.pw_gid)
        args = [
            "runuser", "-u", "munge", "--", which("munged") or "munged",
            f"--socket={mdir}/munge.socket", f"--pid-file={mdir}/munged.pid",
            f"--log-file={mdir}/munged.log", f"--seed-file={mdir}/munged.seed", f"--key-file={key}",
        ]  # fmt: skip
        self._run_daemon("munged", args, pid_file=mdir / "munged.pid")
        check = subprocess.run(
            f"munge -n --socket={mdir}/munge.socket | unmunge --socket={mdir}/munge.socket",
            shell=True,
            capture_output=True,
            text=True,
        )
        if check.returncode != 0:
            raise SlurmError(f"munge credential check failed: {check.stderr.strip()}")

    def _run_daemon(self, name: str, args: list[str], *, pid_file: Path | None = None) -> None:
        """Run a self-daemonising program and record the pid it writes."""
        if pid_file is None:
            sub = "ctld/slurmctld.pid" if name == "slurmctld" else f"{name}/slurmd.pid"
            pid_file = self.base / sub
        log = self.base / f"{name}.start.log"
        with log.open("w") as out:
            proc = subprocess.run(args, env=self.env, stdout=out, stderr=subprocess.STDOUT, timeout=60)
        deadline = time.monotonic() + 20
        while not pid_file.is_file() or not pid_file.read_text().strip():
            if proc.returncode != 0 or time.monotonic() > deadline:
                raise SlurmError(f"{name} did not start (exit {proc.returncode}):\n{_tail(log)}")
            time.sleep(0.1)
        self.pids[name] = int(pid_file.read_text().split()[0])

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        states = ""
        while time.monotonic() < deadline:
            proc = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False)
            states = proc.stdout.strip()
            if proc.returncode == 0 and sorted(states.split()) == sorted([*NODES, "idle", "idle"]):
                return
            time.sleep(0.5)
        logs = "\n".join(
            f"--- {p}\n{_tail(p)}" for p in [self.base / "ctld/slurmctld.log", self.base / "node1/slurmd.log"]
        )
        raise SlurmError(f"nodes not idle after {timeout:.0f} s (sinfo: {states!r})\n{logs}")

    # ------------------------------------------------------------------ jobs

    def run(self, args: list[str], *, check: bool = True, **kw) -> subprocess.CompletedProcess:
        """A Slurm client command against this cluster."""
        proc = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=60, **kw)
        if check and proc.returncode != 0:
            raise SlurmError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def submit(
        self, args: list[str], *, cwd: Path, export: dict[str, str] | None = None, output: Path | None = None
    ) -> str:
        """`sbatch --parsable [--export ALL,K=V..] [--output F] ARGS` from `cwd`; returns the job id."""
        opts = ["--parsable"]
        if export:
            opts.append("--export=" + ",".join(["ALL", *(f"{k}={v}" for k, v in export.items())]))
        if output is not None:
            opts.append(f"--output={output}")
        proc = self.run(["sbatch", *opts, *args], cwd=cwd)
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str, *, retry_s: float = 60) -> dict[str, str]:
        """`scontrol show job -o` as a dict (JobState, ExitCode, NodeList, ...).

        A busy slurmctld on a loaded machine sometimes drops a client (scontrol dies of SIGPIPE):
        retried for up to `retry_s` seconds before it is an error.
        """
        deadline = time.monotonic() + retry_s
        while True:
            proc = self.run(["scontrol", "show", "job", "-o", job_id], check=False)
            if proc.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(1)
        if proc.returncode != 0:
            raise SlurmError(f"scontrol show job {job_id} failed ({proc.returncode}): {proc.stderr.strip()}")
        fields: dict[str, str] = {}
        for token in proc.stdout.split():
            key, sep, value = token.partition("=")
            if sep:
                fields[key] = value
        return fields

    def wait(self, job_id: str, *, timeout: float) -> dict[str, str]:
        """Poll until the job reaches a final state; on timeout cancel it and return its last record."""
        deadline = time.monotonic() + timeout
        info = self.job(job_id)
        while info.get("JobState") not in FINAL_STATES:
            if time.monotonic() > deadline:
                self.run(["scancel", job_id], check=False)
                info["TimedOutAfter"] = f"{timeout:.0f}s"
                return info
            time.sleep(1)
            info = self.job(job_id)
        return info

    # ------------------------------------------------------------------ teardown

    def stop(self) -> None:
        """Cancel jobs, stop every daemon started here (by pid), remove stragglers and the hosts line."""
        if "slurmctld" in self.pids:
            self.run(["scancel", "--full", "--partition=debug"], check=False)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                queue = self.run(["squeue", "-h", "-o", "%i"], check=False)
                if queue.returncode != 0 or not queue.stdout.strip():
                    break
                time.sleep(0.5)
        # each daemon takes ~2 s to exit: stop the Slurm ones together, munged (their auth) after them
        _terminate([self.pids.pop(n) for n in [*NODES, "slurmctld"] if n in self.pids])
        _terminate([self.pids.pop("munged")] if "munged" in self.pids else [])
        # job steps left behind by a slurmd that died first
        _terminate(_processes_with_env("SLURM_CONF", str(self.conf)), grace=2)
        self._remove_hosts()
        shutil.rmtree(self.base, ignore_errors=True)

    def _remove_hosts(self) -> None:
        if self.hosts_line is None:
            return
        lines = HOSTS.read_text().splitlines(keepends=True)
        # rewrite in place (not a rename): /etc/hosts may be a bind mount in containers
        HOSTS.write_text("".join(x for x in lines if x.rstrip("\n") != self.hosts_line))
        self.hosts_line = None


def _terminate(pids: list[int], grace: float = 15) -> None:
    """SIGTERM every pid, wait up to `grace` seconds for all of them, SIGKILL the ones still there."""
    alive = []
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            alive.append(pid)
    deadline = time.monotonic() + grace
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [pid for pid in alive if _exists(pid)]
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _processes_with_env(key: str, value: str) -> list[int]:
    """Pids (other than this process) whose environment has key=value: the cluster's own processes."""
    needle = f"{key}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
    return found
