"""RabbitMQ nodes of the test's own: a cluster of N nodes (N >= 1) on 127.0.0.1, in a folder given to it.

Stopping or killing one of them disturbs nothing else: each cluster has its own epmd (ERL_EPMD_PORT), its
own Erlang cookie (HOME), its own node names, ports, data and logs. The machine's RabbitMQ is never touched.

    with RabbitCluster(tmp_path, nodes=3) as cluster:   # start() on entry, destroy() on exit
        cluster.ctl(0, "add_vhost", "shop")
        url = cluster.failover_url("shop")             # amqp://guest:guest@127.0.0.1:<port>/shop;... (kombu failover)
        cluster.stop_node(1)                           # graceful (rabbitmqctl stop); kill=True for SIGKILL
        cluster.start_node(1)                          # it rejoins the cluster, its data kept

The nodes run /usr/lib/rabbitmq/bin/rabbitmq-server directly, as this user (the /usr/sbin wrappers switch to
the rabbitmq user and its cookie), with the system's rabbitmq-env.conf replaced by an empty file (it names the
node). Peer discovery is classic_config: every node lists every other, and a blank node joins the first one
it reaches under a lock (RabbitMQ 3.9+), so the nodes start in parallel. Measured on a 2-core machine: see
`timings`, which each start fills in (printed by the tests that use it).
"""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

from tests.stack import free_port, memory_kb

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
EPMD = shutil.which("epmd") or "/usr/lib/erlang/bin/epmd"
# The first frame a broker sends after the client's protocol header (AMQP 0-9-1): a method frame, type 1.
AMQP_HEADER = b"AMQP\x00\x00\x09\x01"
# The settings' RABBITMQ_CONSUMER_TIMEOUT_SECONDS default (1800 s), in ms: the value compose and the README give.
CONSUMER_TIMEOUT_MS = 1_800_000


def _port_answers(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


def amqp_answers(port: int) -> bool:
    """Whether a broker on this port has its AMQP listener up (it opens only once the node has fully booted)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(AMQP_HEADER)
            return sock.recv(1) == b"\x01"
    except OSError:
        return False


class RabbitCluster:
    """`nodes` RabbitMQ nodes on 127.0.0.1 clustered together, with data, logs and config under `directory`.

    Node i is `<prefix><i>@localhost`, its AMQP listener on `ports[i]`. The guest user works (from loopback
    only, RabbitMQ's default). Use it as a context manager, or call `start()` and, always, `destroy()`.

    A node takes 125-150 MB resident (three: about 400 MB); above `memory_mb` it raises RabbitMQ's memory alarm
    and blocks publishers. `consumer_timeout` is the settings' default, made explicit.
    """

    def __init__(
        self,
        directory: Path,
        *,
        nodes: int = 3,
        prefix: str = "rabbit-test-",
        memory_mb: int = 256,
        management: bool = False,
    ):
        assert nodes >= 1
        self.directory = Path(directory)
        self.size = nodes
        self.names = [f"{prefix}{i}@localhost" for i in range(nodes)]
        self.epmd_port = free_port()
        self.ports = [free_port() for _ in range(nodes)]
        self.dist_ports = [free_port() for _ in range(nodes)]
        self.memory_mb = memory_mb
        # The management plugin's HTTP API (Flower's broker tab reads queue lengths from it), one port per node.
        self.management_ports = [free_port() for _ in range(nodes)] if management else []
        self.home = self.directory / "home"
        self.epmd: subprocess.Popen | None = None
        self.processes: list[subprocess.Popen | None] = [None] * nodes
        self.timings: dict[str, float] = {}
        self.peak_rss_kb = [0] * nodes
        self._prepare()

    # --- URLs ---------------------------------------------------------------------------------------

    def url(self, vhost: str = "/", node: int = 0) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.ports[node]}/{quote(vhost, safe='')}"

    @property
    def urls(self) -> list[str]:
        return [self.url(node=i) for i in range(self.size)]

    def management_api(self, node: int = 0) -> str:
        """The management plugin's HTTP API of a node (with management=True), as Flower's --broker-api takes it."""
        return f"http://guest:guest@127.0.0.1:{self.management_ports[node]}/api/"

    def failover_url(self, vhost: str = "/") -> str:
        """Every node's URL joined by ";": kombu tries them in turn (the settings' CELERY_BROKER_URL form)."""
        return ";".join(self.url(vhost, node=i) for i in range(self.size))

    # --- Files and environment ----------------------------------------------------------------------

    def _node_dir(self, i: int) -> Path:
        return self.directory / f"node{i}"

    def log_path(self, i: int) -> Path:
        return self._node_dir(i) / "log" / "node.log"

    def _prepare(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        cookie = self.home / ".erlang.cookie"
        cookie.write_text(os.urandom(16).hex().upper())
        cookie.chmod(0o400)
        (self.directory / "rabbitmq-env.conf").write_text("")  # instead of the system's, which names the node
        peers = "".join(
            f"cluster_formation.classic_config.nodes.{n + 1} = {name}\n" for n, name in enumerate(self.names)
        )
        for i in range(self.size):
            node = self._node_dir(i)
            for sub in ("mnesia", "log"):
                (node / sub).mkdir(parents=True, exist_ok=True)
            plugins = "[rabbitmq_management]" if self.management_ports else "[]"
            (node / "enabled_plugins").write_text(f"{plugins}.\n")
            management = (
                f"management.tcp.ip = 127.0.0.1\nmanagement.tcp.port = {self.management_ports[i]}\n"
                if self.management_ports
                else ""
            )
            (node / "rabbitmq.conf").write_text(
                management + f"listeners.tcp.1 = 127.0.0.1:{self.ports[i]}\n"
                # Tasks acknowledge late: the channel of a consumer holding a message longer is closed.
                f"consumer_timeout = {CONSUMER_TIMEOUT_MS}\n"
                f"vm_memory_high_watermark.absolute = {self.memory_mb}MB\n"
                "disk_free_limit.absolute = 50MB\n"
                # The quorum queues' write-ahead log is kept in memory until it rolls over: keep it small.
                "raft.wal_max_size_bytes = 16000000\n"
                "log.console = false\n"
                "log.file.level = info\n"
                "cluster_formation.peer_discovery_backend = classic_config\n"
                # The first blank node to take the lock looks for peers that hold the tables this long (3 x 200 ms,
                # 10 x 500 ms by default), then starts the cluster; the others, waiting on the lock, join it.
                "cluster_formation.discovery_retry_limit = 3\n"
                "cluster_formation.discovery_retry_interval = 200\n" + peers
            )

    def env(self, i: int) -> dict[str, str]:
        """The environment of node i's server and of the CLI tools run against it."""
        node = self._node_dir(i)
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("RABBITMQ_", "ERL_")) and key not in ("HOME",)
        }
        env.update(
            HOME=str(self.home),
            ERL_EPMD_PORT=str(self.epmd_port),
            ERL_EPMD_ADDRESS="127.0.0.1",
            RABBITMQ_CONF_ENV_FILE=str(self.directory / "rabbitmq-env.conf"),
            RABBITMQ_NODENAME=self.names[i],
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.ports[i]),
            RABBITMQ_DIST_PORT=str(self.dist_ports[i]),
            # The CLI tools are Erlang nodes too: any free port (the default range is shared by the machine).
            RABBITMQ_CTL_DIST_PORT_MIN="0",
            RABBITMQ_CTL_DIST_PORT_MAX="0",
            RABBITMQ_MNESIA_BASE=str(node / "mnesia"),
            RABBITMQ_LOG_BASE=str(node / "log"),
            RABBITMQ_LOGS=str(self.log_path(i)),
            RABBITMQ_CONFIG_FILE=str(node / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(node / "advanced.config"),  # absent
            RABBITMQ_CONFIG_FILES=str(node / "conf.d"),  # absent
            RABBITMQ_ENABLED_PLUGINS_FILE=str(node / "enabled_plugins"),
            RABBITMQ_PID_FILE=str(node / "node.pid"),
            # Three nodes and the machine's own share two cores: no scheduler bound to one.
            RABBITMQ_SCHEDULER_BIND_TYPE="u",
            # Smaller preallocated tables than RabbitMQ's (a million processes, five million atoms, 65536 ports):
            # about 13 MB less resident memory per node, room for hundreds of connections still.
            RABBITMQ_MAX_NUMBER_OF_PROCESSES="65536",
            RABBITMQ_MAX_NUMBER_OF_ATOMS="1048576",
            ERL_MAX_PORTS="8192",
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
        )
        return env

    # --- Processes ----------------------------------------------------------------------------------

    def _start_epmd(self) -> None:
        if self.epmd is not None and self.epmd.poll() is None:
            return
        self.epmd = subprocess.Popen(
            [EPMD, "-port", str(self.epmd_port), "-address", "127.0.0.1"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._wait(lambda: _port_answers(self.epmd_port), 10, "epmd to listen")

    def _spawn(self, i: int) -> None:
        with (self._node_dir(i) / "log" / "stdout.log").open("ab") as out:
            self.processes[i] = subprocess.Popen(
                [str(RABBITMQ_BIN / "rabbitmq-server")],
                env=self.env(i),
                cwd=self._node_dir(i),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its group: the script, its beam.smp, erl_child_setup, inet_gethost
            )

    def start(self, timeout: float = 90) -> "RabbitCluster":
        """Start every node at once; return when each answers AMQP and node 0 sees all of them running."""
        started = time.monotonic()
        try:
            self._start_epmd()
            for i in range(self.size):
                self._spawn(i)
            self._wait(lambda: all(self._booted(i) for i in range(self.size)), timeout, "every node to boot")
            self.timings["boot"] = time.monotonic() - started
            if self.size > 1:
                self._wait(
                    lambda: len(self.running_nodes(0)) == self.size,
                    max(5.0, timeout - (time.monotonic() - started)),
                    "every node to join the cluster",
                    interval=0.5,
                )
        except BaseException:
            self.destroy()
            raise
        self.timings["start"] = time.monotonic() - started
        rss = self.sample_memory()
        print(
            f"[rabbitmq] {self.size} node(s) booted in {self.timings['boot']:.1f} s, clustered in "
            f"{self.timings['start']:.1f} s; RSS {[kb // 1024 for kb in rss]} MB"
        )
        return self

    def _booted(self, i: int) -> bool:
        process = self.processes[i]
        if process is None or process.poll() is not None:
            code = process and process.returncode
            raise RuntimeError(f"node {self.names[i]} exited with {code} before it answered\n{self.logs()}")
        return amqp_answers(self.ports[i])

    def node_running(self, i: int) -> bool:
        """Node i's server process runs and its AMQP listener answers."""
        process = self.processes[i]
        return process is not None and process.poll() is None and amqp_answers(self.ports[i])

    def stop_node(self, i: int, *, kill: bool = False, timeout: float = 30) -> float:
        """Stop node i: `rabbitmqctl stop` (graceful), or SIGKILL of its processes with kill=True; returns seconds."""
        started = time.monotonic()
        process = self.processes[i]
        if process is None or process.poll() is not None:
            return 0.0
        self.sample_memory()
        if not kill:
            try:
                self.ctl(i, "stop", timeout=timeout)
                process.wait(timeout)
            except (subprocess.SubprocessError, OSError):
                kill = True
        if kill or process.poll() is None:
            self._kill(process)
        seconds = self.timings[f"stop {i}"] = time.monotonic() - started
        print(f"[rabbitmq] node {self.names[i]} {'killed' if kill else 'stopped'} in {seconds:.1f} s")
        return seconds

    def start_node(self, i: int, timeout: float = 60) -> float:
        """Start node i again (with its data: it rejoins its cluster); returns seconds until it answers and is running
        in node 0's view (or another running node's, when node 0 is the one restarted)."""
        assert self.processes[i] is None or self.processes[i].poll() is not None, f"node {i} is running"
        started = time.monotonic()
        self._start_epmd()
        self._spawn(i)
        try:
            self._wait(lambda: self._booted(i), timeout, f"node {self.names[i]} to boot")
            if self.size > 1:
                viewer = next(n for n in range(self.size) if n != i and self.node_running(n)) if i == 0 else 0
                self._wait(
                    lambda: self.names[i] in self.running_nodes(viewer),
                    timeout,
                    f"node {self.names[i]} to rejoin the cluster",
                    interval=0.5,
                )
        except BaseException:
            self._kill(self.processes[i])
            raise
        seconds = self.timings[f"start {i}"] = time.monotonic() - started
        print(f"[rabbitmq] node {self.names[i]} started again and running in its cluster in {seconds:.1f} s")
        return seconds

    def _kill(self, process: subprocess.Popen | None) -> None:
        """SIGKILL a node's beam.smp, then what is left of its process group; reaps them (no zombie left behind).

        The server script waits for its beam.smp (it traps signals): killing the beam first lets the script reap
        it and exit; killing both at once would leave the beam a zombie of no one's.
        """
        if process is None:
            return
        if process.poll() is None:
            for pid in self._group_beams(process.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # the script if still there, erl_child_setup, inet_gethost
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(10)

    def destroy(self) -> None:
        """Kill every node and the epmd (their groups: nothing of theirs outlives this) and remove the folder."""
        for process in self.processes:
            if process is not None:
                self._kill(process)
        if self.epmd is not None:
            self._kill(self.epmd)
        # A beam that lost its epmd still shows up by its node name: make sure none of ours runs.
        for pid in self._our_beams():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.directory, ignore_errors=True)

    def _our_beams(self) -> list[int]:
        """Pids of any beam.smp or epmd of this cluster left over (their parent gone): a beam names the cluster's
        folder on its command line; an epmd started by a beam (`epmd -daemon`) has the cluster's ERL_EPMD_PORT."""
        folder, port = str(self.directory).encode(), f"ERL_EPMD_PORT={self.epmd_port}\x00".encode()
        found = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes()
                ours = (b"beam" in cmdline and folder in cmdline) or (
                    b"epmd" in cmdline and port in (proc / "environ").read_bytes()
                )
            except OSError:
                continue
            if ours:
                found.append(int(proc.name))
        return found

    def __enter__(self) -> "RabbitCluster":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.destroy()

    # --- CLI ----------------------------------------------------------------------------------------

    def ctl(self, i: int, *args: str, tool: str = "rabbitmqctl", timeout: float = 30, check: bool = True) -> str:
        """Run a CLI tool (rabbitmqctl, rabbitmq-queues, rabbitmq-diagnostics) against node i; returns its stdout."""
        result = subprocess.run(
            [str(RABBITMQ_BIN / tool), "-n", self.names[i], *args],
            env=self.env(i),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise subprocess.CalledProcessError(result.returncode, result.args, result.stdout, result.stderr)
        return result.stdout

    def queues(self, i: int, *args: str, **kwargs) -> str:
        return self.ctl(i, *args, tool="rabbitmq-queues", **kwargs)

    def running_nodes(self, i: int) -> list[str]:
        """The running nodes of node i's cluster, as node i sees them; [] when it cannot say."""
        try:
            status = json.loads(self.ctl(i, "cluster_status", "--formatter", "json", timeout=15))
        except (subprocess.SubprocessError, ValueError):
            return []
        return sorted(status.get("running_nodes", []))

    def add_vhost(self, vhost: str) -> None:
        """A vhost, guest given every permission on it."""
        self.ctl(0, "add_vhost", vhost)
        self.ctl(0, "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")

    def list_queues(self, vhost: str = "/", *columns: str) -> dict[str, dict]:
        """`rabbitmqctl list_queues` on a running node: {queue name: {column: value}} (default: messages, leader,
        online members)."""
        columns = columns or ("messages", "leader", "online")
        viewer = next(n for n in range(self.size) if self.node_running(n))
        out = self.ctl(viewer, "list_queues", "-q", "-p", vhost, "name", *columns, "--formatter", "json")
        return {row["name"]: row for row in json.loads(out)}

    def quorum_leader(self, queue: str, vhost: str = "/") -> int:
        """The index of the node leading quorum queue `queue`."""
        return self.names.index(self.list_queues(vhost, "leader")[queue]["leader"])

    def quorum_members_online(self, queue: str, vhost: str = "/") -> list[str]:
        return sorted(self.list_queues(vhost, "online")[queue]["online"])

    def depth(self, queue: str, vhost: str = "/") -> int:
        """Messages ready in `queue` now, asked over AMQP of a running node (list_queues' counts lag by seconds)."""
        from kombu import Connection

        node = next(n for n in range(self.size) if self.node_running(n))
        with Connection(self.url(vhost, node=node), connect_timeout=5) as connection:
            return int(connection.default_channel.queue_declare(queue=queue, passive=True).message_count)

    # --- Measures -----------------------------------------------------------------------------------

    def beam_pid(self, i: int) -> int | None:
        """The pid of node i's beam.smp (the server script's child, in its process group), or None."""
        process = self.processes[i]
        if process is None or process.poll() is not None:
            return None
        return next(iter(self._group_beams(process.pid)), None)

    @staticmethod
    def _group_beams(pgid: int) -> list[int]:
        found = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                stat = (proc / "stat").read_text()
            except OSError:
                continue
            # pid (comm) state ppid pgrp ...: comm may hold spaces, so split after its closing parenthesis.
            comm = stat[stat.index("(") + 1 : stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2 :].split()
            if comm.startswith("beam") and int(fields[2]) == pgid and fields[0] != "Z":
                found.append(int(proc.name))
        return found

    def sample_memory(self) -> list[int]:
        """Each running node's resident memory now (KiB); keeps each node's peak (VmHWM) in `peak_rss_kb`."""
        now = []
        for i in range(self.size):
            pid = self.beam_pid(i)
            usage = memory_kb(pid) if pid is not None else {}
            now.append(usage.get("VmRSS", 0))
            self.peak_rss_kb[i] = max(self.peak_rss_kb[i], usage.get("VmHWM", 0))
        return now

    def logs(self, tail: int = 3000) -> str:
        parts = []
        for i in range(self.size):
            for path in (self.log_path(i), self._node_dir(i) / "log" / "stdout.log"):
                if path.exists():
                    parts.append(f"--- {self.names[i]}: {path.name}\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)

    def _wait(self, condition, timeout: float, what: str, interval: float = 0.1) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.logs()}")
            time.sleep(interval)
