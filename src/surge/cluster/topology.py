"""The cluster's hosts, their addresses and every server's configuration (pure: no I/O).

One bridge, one network namespace per host, one address per host (ADR 0022)::

    10.77.0.1        the machine itself (the bridge): load, tests, `surge cluster status`
    10.77.0.11-13    etcd ×3                 (Patroni's DCS, etcd3 API)
    10.77.0.21-22    PostgreSQL 15 + Patroni (streaming replication, synchronous_mode)
    10.77.0.30       HAProxy                 :5000 primary (/primary), :5001 replicas (/replica?lag=)
    10.77.0.31       PgBouncer               :6432 transaction mode: surge → :5000, surge_ro → :5001
    10.77.0.41-42    Redis primary + replica
    10.77.0.51-53    Redis Sentinel ×3       (quorum 2)
    10.77.0.61-62    Surge API nodes         (uvicorn)
    10.77.0.65       Surge worker node       (the job fleet)
    10.77.0.80       nginx                   :80, passive health (max_fails) on the API nodes

The timings are Patroni's and Sentinel's defaults scaled down so a failover finishes inside
a test (TTL 10 s instead of 30 s, loop_wait 2 s instead of 10 s); ``ClusterConfig`` holds them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

SUBNET = "10.77.0"
BRIDGE = "sgc0"
NS_PREFIX = "sgc-"
GATEWAY = f"{SUBNET}.1"

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_SUPERUSER = ("postgres", "surge-cluster-su")
PG_REPLICATION = ("replicator", "surge-cluster-rep")
PG_REWIND = ("rewinder", "surge-cluster-rw")
APP_USER = ("surge", "surge-cluster-app")
DB_NAME = "surge"
SENTINEL_MASTER = "surge"
#: The secret every Surge node of the cluster shares (a test cluster's, not production's).
SECRET_KEY = "surge-cluster-secret-surge-cluster-secret-0123"


@dataclass(frozen=True)
class Host:
    name: str  # etcd1, pg1, haproxy, ...
    role: str  # etcd | postgres | haproxy | pgbouncer | redis | sentinel | api | worker | nginx
    index: int  # last octet

    @property
    def address(self) -> str:
        return f"{SUBNET}.{self.index}"

    @property
    def netns(self) -> str:
        return f"{NS_PREFIX}{self.name}"

    @property
    def veth(self) -> str:  # host side of the veth pair (≤ 15 characters)
        return f"sgv{self.index}"


@dataclass(frozen=True)
class ClusterConfig:
    root: Path  # state folder (.data/cluster)
    api_nodes: int = 2
    synchronous: bool = True
    ttl: int = 10
    loop_wait: int = 2
    retry_timeout: int = 4
    #: HAProxy drops a replica from the read endpoint beyond this replay lag (bytes).
    max_replica_lag: int = 1_048_576
    sentinel_down_after_ms: int = 2_000
    sentinel_failover_timeout_ms: int = 10_000
    web_processes: int = 1
    hosts: tuple[Host, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.hosts:
            hosts = [Host(f"etcd{i}", "etcd", 10 + i) for i in (1, 2, 3)]
            hosts += [Host(f"pg{i}", "postgres", 20 + i) for i in (1, 2)]
            hosts += [Host("haproxy", "haproxy", 30), Host("pgbouncer", "pgbouncer", 31)]
            hosts += [Host(f"redis{i}", "redis", 40 + i) for i in (1, 2)]
            hosts += [Host(f"sentinel{i}", "sentinel", 50 + i) for i in (1, 2, 3)]
            hosts += [Host(f"api{i}", "api", 60 + i) for i in range(1, self.api_nodes + 1)]
            hosts += [Host("worker", "worker", 65), Host("nginx", "nginx", 80)]
            object.__setattr__(self, "hosts", tuple(hosts))

    def of(self, role: str) -> list[Host]:
        return [h for h in self.hosts if h.role == role]

    def host(self, name: str) -> Host:
        return next(h for h in self.hosts if h.name == name)

    def folder(self, host: Host) -> Path:
        return self.root / host.name

    # ---- addresses Surge and the load use -------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://{self.host('nginx').address}"

    @property
    def database_url(self) -> str:
        """Surge's writes: PgBouncer (transaction mode) → HAProxy :5000 → the Patroni leader."""
        user, password = APP_USER
        return f"postgresql+asyncpg://{user}:{password}@{self.host('pgbouncer').address}:6432/{DB_NAME}"

    @property
    def replica_url(self) -> str:
        user, password = APP_USER
        return (
            f"postgresql+asyncpg://{user}:{password}@{self.host('pgbouncer').address}:6432/"
            f"{DB_NAME}_ro"
        )

    @property
    def direct_primary_url(self) -> str:
        """HAProxy's primary endpoint without PgBouncer: migrations (their advisory lock is a
        session lock, which transaction pooling would hand to another client) and checks."""
        user, password = APP_USER
        return (
            f"postgresql+asyncpg://{user}:{password}@{self.host('haproxy').address}:5000/{DB_NAME}"
        )

    @property
    def sentinels(self) -> str:
        return ",".join(f"{h.address}:26379" for h in self.of("sentinel"))

    def surge_env(self) -> dict[str, str]:
        """Surge's usual settings, pointed at the cluster's routing layers."""
        return {
            "DATABASE_URL": self.database_url,
            "DATABASE_REPLICA_URLS": self.replica_url,
            "SURGE_DB_PGBOUNCER": "true",
            "SURGE_DB_POOL_MAX": "10",
            "SURGE_DB_POOL_MIN": "2",
            "REDIS_URL": f"redis://{self.host('redis1').address}:6379/0",
            "SURGE_REDIS_SENTINELS": self.sentinels,
            "SURGE_REDIS_SENTINEL_MASTER": SENTINEL_MASTER,
            "SURGE_ENV": "production",
            "SURGE_SECRET_KEY": SECRET_KEY,
            "SURGE_LOG_JSON": "true",
            "SURGE_RATELIMIT_ENABLED": "false",  # the load comes from one address
            # bench/cluster.py's few writers each withdraw thousands of times: the money
            # path's figure, not the 24 h payout cap's (ADR 0051).
            "SURGE_WALLET_WITHDRAWAL_DAILY_MAX": str(10**15),
            "SURGE_WEB_WORKERS": str(self.web_processes),
            "SURGE_JOBS_PROCESSES": "1",
        }

    # ---- configuration files --------------------------------------------------------------
    def etcd_command(self, host: Host) -> list[str]:
        cluster = ",".join(f"{h.name}=http://{h.address}:2380" for h in self.of("etcd"))
        return [
            "etcd", "--name", host.name, "--data-dir", str(self.folder(host) / "data"),
            "--listen-client-urls", f"http://{host.address}:2379",
            "--advertise-client-urls", f"http://{host.address}:2379",
            "--listen-peer-urls", f"http://{host.address}:2380",
            "--initial-advertise-peer-urls", f"http://{host.address}:2380",
            "--initial-cluster", cluster, "--initial-cluster-state", "new",
            "--initial-cluster-token", "surge-cluster",
            "--heartbeat-interval", "200", "--election-timeout", "2000",
            "--logger", "zap", "--log-level", "warn",
        ]  # fmt: skip

    def patroni_config(self, host: Host) -> str:
        folder = self.folder(host)
        su, su_pw = PG_SUPERUSER
        rep, rep_pw = PG_REPLICATION
        rw, rw_pw = PG_REWIND
        etcd = [f"{h.address}:2379" for h in self.of("etcd")]
        config = {
            "scope": "surge",
            "namespace": "/service/",
            "name": host.name,
            "log": {"level": "INFO"},
            "restapi": {
                "listen": f"{host.address}:8008",
                "connect_address": f"{host.address}:8008",
            },
            "etcd3": {"hosts": etcd},
            "bootstrap": {
                "dcs": {
                    "ttl": self.ttl,
                    "loop_wait": self.loop_wait,
                    "retry_timeout": self.retry_timeout,
                    "maximum_lag_on_failover": self.max_replica_lag,
                    "synchronous_mode": self.synchronous,
                    "postgresql": {
                        "use_pg_rewind": True,
                        "use_slots": True,
                        "parameters": {
                            "wal_level": "replica",
                            "hot_standby": "on",
                            "wal_log_hints": "on",
                            "max_connections": 200,
                            "max_wal_senders": 10,
                            "max_replication_slots": 10,
                            "shared_buffers": "64MB",
                            "synchronous_commit": "on",
                        },
                    },
                },
                "initdb": [{"encoding": "UTF8"}, {"locale": "C"}, "data-checksums"],
                "pg_hba": [
                    f"host replication {rep} {SUBNET}.0/24 scram-sha-256",
                    f"host all all {SUBNET}.0/24 scram-sha-256",
                    "local all all trust",
                ],
            },
            "postgresql": {
                "listen": f"{host.address}:5432",
                "connect_address": f"{host.address}:5432",
                "data_dir": str(folder / "data"),
                "bin_dir": str(PG_BIN),
                "pgpass": str(folder / "pgpass"),
                "authentication": {
                    "superuser": {"username": su, "password": su_pw},
                    "replication": {"username": rep, "password": rep_pw},
                    "rewind": {"username": rw, "password": rw_pw},
                },
                "parameters": {"unix_socket_directories": str(folder)},
            },
            "tags": {"nofailover": False, "noloadbalance": False},
        }
        return json.dumps(config, indent=2)  # JSON is YAML

    def haproxy_config(self) -> str:
        me = self.host("haproxy")
        nodes = self.of("postgres")
        lines = [
            "global",
            "    maxconn 2000",
            f"    pidfile {self.folder(me) / 'haproxy.pid'}",
            "defaults",
            "    mode tcp",
            "    retries 2",
            "    timeout connect 2s",
            "    timeout client 30m",
            "    timeout server 30m",
            "    timeout check 2s",
            "listen stats",
            "    mode http",
            f"    bind {me.address}:7000",
            "    stats enable",
            "    stats uri /",
            "listen primary",
            f"    bind {me.address}:5000",
            "    option httpchk GET /primary",
            "    http-check expect status 200",
            "    default-server inter 1s fall 2 rise 2 on-marked-down shutdown-sessions",
            *(f"    server {n.name} {n.address}:5432 maxconn 200 check port 8008" for n in nodes),
            "listen replicas",
            f"    bind {me.address}:5001",
            "    balance roundrobin",
            f"    option httpchk GET /replica?lag={self.max_replica_lag}",
            "    http-check expect status 200",
            "    default-server inter 1s fall 2 rise 2 on-marked-down shutdown-sessions",
            *(f"    server {n.name} {n.address}:5432 maxconn 200 check port 8008" for n in nodes),
        ]
        return "\n".join(lines) + "\n"

    def pgbouncer_config(self) -> str:
        me = self.host("pgbouncer")
        folder = self.folder(me)
        proxy = self.host("haproxy").address
        return "\n".join([
            "[databases]",
            f"{DB_NAME} = host={proxy} port=5000 dbname={DB_NAME}",
            f"{DB_NAME}_ro = host={proxy} port=5001 dbname={DB_NAME}",
            "[pgbouncer]",
            f"listen_addr = {me.address}",
            "listen_port = 6432",
            "unix_socket_dir =",
            "auth_type = scram-sha-256",
            f"auth_file = {folder / 'userlist.txt'}",
            "pool_mode = transaction",
            "max_client_conn = 2000",
            "default_pool_size = 40",
            "reserve_pool_size = 5",
            "server_login_retry = 1",
            "server_connect_timeout = 3",
            "query_wait_timeout = 10",
            "server_check_delay = 5",
            "ignore_startup_parameters = extra_float_digits",
            f"logfile = {folder / 'pgbouncer.log'}",
            f"pidfile = {folder / 'pgbouncer.pid'}",
            "admin_users = surge",
            "",
        ])  # fmt: skip

    def pgbouncer_users(self) -> str:
        user, password = APP_USER
        return f'"{user}" "{password}"\n'

    def redis_command(self, host: Host) -> list[str]:
        command = [
            "redis-server", "--bind", host.address, "--port", "6379",
            "--protected-mode", "no", "--save", "", "--appendonly", "no",
            "--dir", str(self.folder(host)), "--daemonize", "no",
            "--replica-announce-ip", host.address,
        ]  # fmt: skip
        if host.name != "redis1":
            command += ["--replicaof", self.host("redis1").address, "6379"]
        return command

    def sentinel_config(self, host: Host) -> str:
        primary = self.host("redis1").address
        return "\n".join([
            f"bind {host.address}",
            "port 26379",
            "protected-mode no",
            f"dir {self.folder(host)}",
            f"sentinel announce-ip {host.address}",
            f"sentinel monitor {SENTINEL_MASTER} {primary} 6379 2",
            f"sentinel down-after-milliseconds {SENTINEL_MASTER} {self.sentinel_down_after_ms}",
            f"sentinel failover-timeout {SENTINEL_MASTER} {self.sentinel_failover_timeout_ms}",
            f"sentinel parallel-syncs {SENTINEL_MASTER} 1",
            "",
        ])  # fmt: skip

    def nginx_config(self) -> str:
        me = self.host("nginx")
        folder = self.folder(me)
        servers = "\n".join(
            f"        server {h.address}:8000 max_fails=2 fail_timeout=3s;" for h in self.of("api")
        )
        return f"""daemon off;
worker_processes 1;
pid {folder / "nginx.pid"};
error_log {folder / "error.log"} warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {folder / "tmp"};
    proxy_temp_path {folder / "tmp"};
    fastcgi_temp_path {folder / "tmp"};
    uwsgi_temp_path {folder / "tmp"};
    scgi_temp_path {folder / "tmp"};
    upstream surge {{
{servers}
        keepalive 64;
    }}
    server {{
        listen {me.address}:80 backlog=4096;
        location / {{
            proxy_pass http://surge;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_connect_timeout 1s;
            proxy_read_timeout 30s;
            # A node that refuses or drops the connection before answering: try the next.
            # POSTs are not replayed once sent (nginx's rule), unless the node never got them.
            proxy_next_upstream error timeout http_502;
            proxy_next_upstream_tries 2;
        }}
        location = /nginx-status {{ stub_status; }}
    }}
}}
"""
