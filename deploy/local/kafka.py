"""Run a real single-node Apache Kafka (KRaft, broker+controller) on 127.0.0.1.

Kafka's jars come from Maven Central (the only place they can come from here):
`resolve_classpath()` copies org.apache.kafka:kafka_2.13 and its dependencies
into `<repo>/.cache/kafka-<version>/libs` once; later calls only read a marker.

Logging: the kafka_2.13 POM brings slf4j-api 1.7.36 and no backend. The backend
added is log4j-core 2.24.3 with log4j-slf4j-impl, the binding for SLF4J *1.x*.
log4j-slf4j2-impl would be the wrong one: slf4j-api 1.7 does not discover SLF4J 2
providers and falls back to its no-op logger. The broker logs to
<data_dir>/server.log; JVM stdout/stderr go to <data_dir>/kafka.out.

`KafkaBroker(data_dir).start()` is idempotent: a broker already running from
the same data dir (pid file) and answering is reused.

`KafkaCluster(data_dir, ports, controller_ports).start()` runs several such nodes as one cluster
(three for `make run-cluster` and the fault tests), each in a data dir of its own.

With `scram=ScramListener(port, users)` the broker also listens on a SASL_PLAINTEXT port that
authenticates with SCRAM; its users are created when the storage is formatted (a data dir formatted
before keeps its users). With `tls=TlsListener(port, directory)` it also listens on an SSL port, with a
self-signed certificate for 127.0.0.1 (clients: `kafka_ssl_ca_location` = its `ca_file`). The PLAINTEXT
listener stays, for the controller and the local tools.

CLI: python -m deploy.local.kafka {start,stop,status} [--data-dir D] [--port P] [--controller-port C]
     [--sasl-port S --scram-user NAME:PASSWORD ...] [--ssl-port T]
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from deploy.local.probe import port_open, tail

KAFKA_VERSION = "4.1.1"
SLF4J_VERSION = "1.7.36"  # what kafka_2.13 4.1.1 depends on
LOG4J_VERSION = "2.24.3"
DEPENDENCY_PLUGIN_VERSION = "3.8.1"

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA_DIR = REPO / ".local" / "kafka"

JVM_OPTS = [
    "-Xms256m",
    "-Xmx512m",
    "-XX:+UseSerialGC",  # 2 cores, small heap: no parallel GC threads to feed
    # Only the quick compiler: a freshly started broker otherwise spends seconds of CPU compiling,
    # taken from the services on a 2-core machine; a local broker's load never needs C2's code.
    "-XX:TieredStopAtLevel=1",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
    "-Djava.net.preferIPv4Stack=true",
]

_POM = f"""<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.imgpipe</groupId>
  <artifactId>kafka-runtime</artifactId>
  <version>{KAFKA_VERSION}</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>{KAFKA_VERSION}</version></dependency>
    <dependency><groupId>org.slf4j</groupId><artifactId>slf4j-api</artifactId><version>{SLF4J_VERSION}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-api</artifactId><version>{LOG4J_VERSION}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId><version>{LOG4J_VERSION}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId><version>{LOG4J_VERSION}</version></dependency>
  </dependencies>
  <build>
    <plugins>
      <plugin><groupId>org.apache.maven.plugins</groupId><artifactId>maven-dependency-plugin</artifactId><version>{DEPENDENCY_PLUGIN_VERSION}</version></plugin>
    </plugins>
  </build>
</project>
"""

_LOG4J2 = """\
status = warn
# keep logging through Kafka's own shutdown hook
shutdownHook = disable
appender.file.type = File
appender.file.name = file
appender.file.fileName = {log_file}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = file
logger.state.name = state.change.logger
logger.state.level = WARN
logger.authorizer.name = kafka.authorizer.logger
logger.authorizer.level = WARN
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.clients.name = org.apache.kafka.clients
logger.clients.level = WARN
"""


def resolve_classpath(cache_dir: Path | None = None) -> str:
    """Download Kafka's jars once (Maven) and return the java classpath."""
    cache = Path(cache_dir) if cache_dir else REPO / ".cache" / f"kafka-{KAFKA_VERSION}"
    cache.mkdir(parents=True, exist_ok=True)
    libs, marker = cache / "libs", cache / "libs.complete"
    digest = hashlib.sha256(_POM.encode()).hexdigest()
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel test sessions share the cache
        if not (marker.exists() and marker.read_text() == digest):
            mvn = shutil.which("mvn")
            if not mvn:
                raise RuntimeError("Maven (mvn) is needed to fetch Kafka's jars: apt-get install -y maven")
            marker.unlink(missing_ok=True)
            shutil.rmtree(libs, ignore_errors=True)
            (cache / "pom.xml").write_text(_POM)
            cmd = [
                mvn,
                "-q",
                "-B",
                "-f",
                str(cache / "pom.xml"),
                "dependency:copy-dependencies",
                f"-DoutputDirectory={libs}",
                f"-Dmaven.repo.local={cache / 'm2'}",
            ]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"resolving Kafka jars failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
            marker.write_text(digest)
    return os.pathsep.join(str(p) for p in sorted(libs.glob("*.jar")))


def _new_cluster_id() -> str:
    # Kafka's own Uuid format: url-safe base64 of 16 random bytes, no padding.
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cid.startswith("-"):  # would be parsed as a CLI flag
            return cid


@dataclass(frozen=True)
class ScramListener:
    """An extra SASL_PLAINTEXT listener on 127.0.0.1:port, authenticating the users (name -> password)
    with `mechanism` (SCRAM-SHA-256 or SCRAM-SHA-512)."""

    port: int
    users: dict[str, str] = field(repr=False)
    mechanism: str = "SCRAM-SHA-256"

    def format_args(self) -> list[str]:
        return [
            arg
            for name, password in self.users.items()
            for arg in ("--add-scram", f"{self.mechanism}=[name={name},password={password}]")
        ]

    def properties(self) -> str:
        mechanism = self.mechanism.lower()
        return (
            f"sasl.enabled.mechanisms={self.mechanism}\n"
            f"listener.name.sasl_plaintext.{mechanism}.sasl.jaas.config="
            "org.apache.kafka.common.security.scram.ScramLoginModule required;\n"
        )


@dataclass(frozen=True)
class TlsListener:
    """An extra SSL listener on 127.0.0.1:port, with a self-signed certificate for 127.0.0.1 made by Java's
    keytool (which comes with the JVM the broker needs) in `directory`; clients trust it through ca_file."""

    port: int
    directory: Path
    password: str = field(default="imgpipe-local-only", repr=False)  # guards a keystore that never leaves this machine

    @property
    def keystore(self) -> Path:
        return self.directory / "broker.p12"

    @property
    def ca_file(self) -> Path:
        """The broker's certificate (PEM): what a client sets as kafka_ssl_ca_location."""
        return self.directory / "broker-ca.pem"

    def create(self) -> None:
        """Make the keystore and the client's PEM once; a directory that has them keeps them."""
        if self.keystore.exists() and self.ca_file.exists():
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        keytool = shutil.which("keytool") or "keytool"
        store = ["-keystore", str(self.keystore), "-storetype", "PKCS12", "-storepass", self.password]
        for args in (
            [
                "-genkeypair",
                "-alias",
                "broker",
                "-keyalg",
                "RSA",
                "-keysize",
                "2048",
                "-validity",
                "3650",
                "-dname",
                "CN=127.0.0.1",
                "-ext",
                "SAN=IP:127.0.0.1",
                "-keypass",
                self.password,
            ],
            ["-exportcert", "-rfc", "-alias", "broker", "-file", str(self.ca_file)],
        ):
            result = subprocess.run([keytool, *args, *store], capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"keytool {args[0]} failed:\n{result.stdout}{result.stderr}")

    def properties(self) -> str:
        return (
            f"listener.name.ssl.ssl.keystore.location={self.keystore}\n"
            "listener.name.ssl.ssl.keystore.type=PKCS12\n"
            f"listener.name.ssl.ssl.keystore.password={self.password}\n"
            f"listener.name.ssl.ssl.key.password={self.password}\n"
        )


class KafkaBroker:
    def __init__(
        self,
        data_dir: Path,
        port: int = 9092,
        controller_port: int = 9093,
        partitions: int = 12,
        scram: ScramListener | None = None,
        node_id: int = 1,
        quorum_voters: str | None = None,
        initial_cluster_id: str | None = None,
        tls: TlsListener | None = None,
    ):
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.controller_port = controller_port
        self.partitions = partitions
        self.scram = scram
        self.tls = tls
        # As a node of a KafkaCluster: its id, the controller quorum ("1@127.0.0.1:9093,2@...") and the
        # cluster id its storage is formatted with (all nodes share one).
        self.node_id = node_id
        self.quorum_voters = quorum_voters or f"{node_id}@127.0.0.1:{controller_port}"
        self.initial_cluster_id = initial_cluster_id
        self.internal_replicas = min(3, len(self.quorum_voters.split(",")))  # of Kafka's own topics
        self.pid_file = self.data_dir / "kafka.pid"
        self.properties_file = self.data_dir / "server.properties"
        self.log_file = self.data_dir / "server.log"  # log4j2 output
        self.out_file = self.data_dir / "kafka.out"  # JVM stdout/stderr
        self.log_dirs = self.data_dir / "logs"
        self._proc: subprocess.Popen | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    def pid(self) -> int | None:
        """Pid of a live broker started from this data dir, else None."""
        try:
            pid = int(self.pid_file.read_text())
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
            return None
        if state in ("Z", "X"):
            return None
        # The cmdline check guards against pid reuse. It can read empty for a
        # moment while a starting JVM maps its memory: don't treat that as dead.
        return pid if not cmdline or str(self.properties_file).encode() in cmdline else None

    def cluster_id(self) -> str | None:
        try:
            text = (self.log_dirs / "meta.properties").read_text()
        except FileNotFoundError:
            return None
        return next(
            (line.split("=", 1)[1].strip() for line in text.splitlines() if line.startswith("cluster.id=")), None
        )

    def is_ready(self, timeout: float = 2.0) -> bool:
        """True if *this* broker answers (a foreign one on the same port does not count)."""
        if not port_open(self.port):  # avoids librdkafka's connect-refused log spam
            return False
        from confluent_kafka.admin import AdminClient

        try:
            metadata = AdminClient({"bootstrap.servers": self.bootstrap_servers}).list_topics(timeout=timeout)
        except Exception:
            return False
        return bool(metadata.brokers) and metadata.cluster_id == self.cluster_id()

    def start(self, timeout: float = 90) -> KafkaBroker:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.data_dir / "start.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent starters (e.g. pytest-xdist workers) share one broker
            return self._start(time.monotonic() + timeout)

    def _start(self, deadline: float) -> KafkaBroker:
        if self.pid() is not None:
            running_port = self._configured_port()
            if running_port != self.port:
                raise RuntimeError(f"Kafka from {self.data_dir} already runs on port {running_port}, not {self.port}")
            if self._wait_ready(deadline):
                return self
            raise RuntimeError(
                f"Kafka pid {self.pid()} from {self.data_dir} is running but not answering "
                f"on {self.bootstrap_servers}:\n{tail(self.log_file)}"
            )
        for port in (self.port, self.controller_port, *(extra.port for extra in (self.scram, self.tls) if extra)):
            if port_open(port):
                raise RuntimeError(f"cannot start Kafka from {self.data_dir}: 127.0.0.1:{port} is already in use")
        classpath = resolve_classpath()
        if self.tls:
            self.tls.create()
        self._write_config()
        java = [
            shutil.which("java") or "java",
            *JVM_OPTS,
            f"-Dlog4j2.configurationFile={self.data_dir / 'log4j2.properties'}",
            "-cp",
            classpath,
        ]
        if self.cluster_id() is None:
            fmt = subprocess.run(
                [
                    *java,
                    "kafka.tools.StorageTool",
                    "format",
                    "--ignore-formatted",
                    "--cluster-id",
                    self.initial_cluster_id or _new_cluster_id(),
                    "--config",
                    str(self.properties_file),
                    *(self.scram.format_args() if self.scram else []),
                ],
                capture_output=True,
                text=True,
            )
            if fmt.returncode != 0:
                raise RuntimeError(f"kafka storage format failed:\n{fmt.stdout}{fmt.stderr}")
        self.log_file.unlink(missing_ok=True)  # so the tail in a start error is about this start
        with open(self.out_file, "wb") as out:
            self._proc = subprocess.Popen(
                [*java, "kafka.Kafka", str(self.properties_file)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pid_file.write_text(str(self._proc.pid))
        if not self._wait_ready(deadline):
            alive = self._proc.poll() is None
            self.stop()
            raise RuntimeError(
                f"Kafka {'did not answer in time' if alive else 'exited'}; "
                f"{self.out_file}:\n{tail(self.out_file)}\n{self.log_file}:\n{tail(self.log_file)}"
            )
        return self

    def _configured_port(self) -> int | None:
        for line in self.properties_file.read_text().splitlines():
            if line.startswith("advertised.listeners="):
                plaintext = next(url for url in line.split("=", 1)[1].split(",") if url.startswith("PLAINTEXT://"))
                return int(plaintext.rsplit(":", 1)[1])
        return None

    def _wait_ready(self, deadline: float) -> bool:
        while time.monotonic() < deadline:
            if self._proc is not None:
                self._proc.poll()  # reap, so a dead child stops looking alive
            if self.pid() is None:
                return False
            if self.is_ready():
                return True
            time.sleep(0.3)
        return False

    def _write_config(self) -> None:
        (self.data_dir / "log4j2.properties").write_text(_LOG4J2.format(log_file=self.log_file))
        extra = (f",SASL_PLAINTEXT://127.0.0.1:{self.scram.port}" if self.scram else "") + (
            f",SSL://127.0.0.1:{self.tls.port}" if self.tls else ""
        )
        self.properties_file.write_text(f"""\
process.roles=broker,controller
node.id={self.node_id}
controller.quorum.voters={self.quorum_voters}
listeners=PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}{extra}
advertised.listeners=PLAINTEXT://127.0.0.1:{self.port}{extra}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT,SSL:SSL
{self.scram.properties() if self.scram else ""}{self.tls.properties() if self.tls else ""}log.dirs={self.log_dirs}
num.partitions={self.partitions}
auto.create.topics.enable=false
offsets.topic.replication.factor={self.internal_replicas}
transaction.state.log.replication.factor={self.internal_replicas}
transaction.state.log.min.isr={min(2, self.internal_replicas)}
share.coordinator.state.topic.replication.factor={self.internal_replicas}
share.coordinator.state.topic.min.isr={min(2, self.internal_replicas)}
group.initial.rebalance.delay.ms=0
# lets the tests shorten the consumers' session (the broker's default minimum is 6 s)
group.min.session.timeout.ms=1000
{_CLUSTER_FAILURE_DETECTION if self.internal_replicas > 1 else ""}""")

    def stop(self, timeout: float = 30) -> None:
        pid = self.pid()
        if pid is not None:
            try:
                os.killpg(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            if not self._wait_exit(pid, timeout):
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self._wait_exit(pid, 10)
        self._proc = None
        self.pid_file.unlink(missing_ok=True)

    def _wait_exit(self, pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.pid == pid:
                self._proc.poll()
            if self.pid() is None:
                return True
            time.sleep(0.1)
        return False


# A node of a cluster that dies is fenced, and its partitions get new leaders, after 4 s rather than
# Kafka's 9 s: the nodes are on one machine's loopback.
_CLUSTER_FAILURE_DETECTION = """\
broker.session.timeout.ms=4000
broker.heartbeat.interval.ms=500
"""


class KafkaCluster:
    """KRaft nodes on 127.0.0.1 that form one cluster: each is broker and controller (combined mode)
    and a voter of the controller quorum, so three survive the loss of any one. Node n (from 1) keeps
    its data in <data_dir>/node-<n> and listens on ports[n-1] and controller_ports[n-1]. Kafka's own
    topics get min(3, nodes) replicas; imgpipe's get the settings kafka_replication_factor and
    kafka_min_insync_replicas (shared.kafka.ensure_topics)."""

    def __init__(self, data_dir: Path, ports: list[int], controller_ports: list[int], partitions: int = 12):
        self.data_dir = Path(data_dir).resolve()
        voters = ",".join(f"{n}@127.0.0.1:{port}" for n, port in enumerate(controller_ports, start=1))
        self.nodes = [
            KafkaBroker(self.data_dir / f"node-{n}", port, controller_port, partitions, node_id=n, quorum_voters=voters)
            for n, (port, controller_port) in enumerate(zip(ports, controller_ports, strict=True), start=1)
        ]
        formatted = {node.cluster_id() for node in self.nodes} - {None}
        if len(formatted) > 1:
            raise RuntimeError(f"the nodes under {self.data_dir} belong to different clusters: {formatted}")
        cluster_id = formatted.pop() if formatted else _new_cluster_id()
        for node in self.nodes:  # a node formatted later (its data dir removed) joins the same cluster
            node.initial_cluster_id = cluster_id

    @property
    def bootstrap_servers(self) -> str:
        return ",".join(node.bootstrap_servers for node in self.nodes)

    def start(self, timeout: float = 120) -> KafkaCluster:
        """Start the nodes that are not running, all at once (a node answers only once a majority of
        the quorum runs), and wait until every node is a live broker of the cluster. Idempotent: also
        brings back a node that died."""
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            failures = [exc for exc in pool.map(_start_node, self.nodes, [timeout] * len(self.nodes)) if exc]
        if failures:
            self.stop()
            raise failures[0]
        self._wait_for_brokers(time.monotonic() + timeout)
        return self

    def _wait_for_brokers(self, deadline: float) -> None:
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": self.bootstrap_servers})
        wanted = {node.node_id for node in self.nodes}
        while True:
            try:
                live = set(admin.list_topics(timeout=2).brokers)
            except Exception:
                live = set()
            if live >= wanted:
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"Kafka nodes {sorted(wanted - live)} did not join the cluster under {self.data_dir}"
                )
            time.sleep(0.3)

    def stop(self, timeout: float = 30) -> None:
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(lambda node: node.stop(timeout), self.nodes))


def _start_node(node: KafkaBroker, timeout: float) -> Exception | None:
    try:
        node.start(timeout)
    except Exception as exc:
        return exc
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.local.kafka", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["start", "stop", "status"])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--port", type=int, default=9092)
    parser.add_argument("--controller-port", type=int, default=9093)
    parser.add_argument("--sasl-port", type=int, help="also listen for SASL_PLAINTEXT (SCRAM-SHA-256) here")
    parser.add_argument(
        "--scram-user",
        action="append",
        default=[],
        metavar="NAME:PASSWORD",
        help="a SCRAM user created when the storage is formatted (repeatable)",
    )
    parser.add_argument(
        "--ssl-port", type=int, help="also listen for SSL here, with a self-signed certificate in <data dir>/tls"
    )
    args = parser.parse_args(argv)
    scram = None
    if args.sasl_port:
        scram = ScramListener(args.sasl_port, dict(user.split(":", 1) for user in args.scram_user))
    tls = TlsListener(args.ssl_port, args.data_dir / "tls") if args.ssl_port else None
    broker = KafkaBroker(args.data_dir, port=args.port, controller_port=args.controller_port, scram=scram, tls=tls)
    if args.command == "start":
        broker.start()
        sasl = f", SASL_PLAINTEXT (SCRAM) on 127.0.0.1:{scram.port}" if scram else ""
        ssl = f", SSL on 127.0.0.1:{tls.port} (certificate: {tls.ca_file})" if tls else ""
        print(f"kafka running on {broker.bootstrap_servers}{sasl}{ssl} (pid {broker.pid()}, data {broker.data_dir})")
    elif args.command == "stop":
        broker.stop()
        print("kafka stopped")
    else:
        pid = broker.pid()
        if pid is None:
            print("kafka not running")
            return 1
        print(f"kafka pid {pid} on {broker.bootstrap_servers}: {'ready' if broker.is_ready() else 'not answering'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
