"""Render the Kronos gateway's nginx configuration from `KRONOS_GATEWAY_*` settings.

The template (`nginx.conf.template`, beside this file) holds `{{ name }}` placeholders; this
module fills them from `GatewaySettings`, validating every value that lands in the config
so that no setting can inject nginx syntax. The rendered config runs unprivileged from a
prefix directory (`nginx -p PREFIX -c PREFIX/nginx.conf -e stderr`) with `daemon off;`.

Command line (also used by the gateway container):

    python -m serving.gateway.render --prefix /tmp/kronos-gateway [--check] [--exec]

Only the standard library and pydantic-settings are imported, so the module also runs as a
plain script (`python render.py ...`) in the slim gateway image.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

TEMPLATE_PATH = Path(__file__).with_name("nginx.conf.template")
PLACEHOLDER = re.compile(r"\{\{\s*([a-z_]+)\s*\}\}")
TEMP_DIRS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")

_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):\d{1,5}$")
_SAFE_PATH = re.compile(r"^[A-Za-z0-9._/:-]+$")
_SIZE = re.compile(r"^\d+[kKmMgG]?$")
_RATE = re.compile(r"^\d+r/[sm]$")

CommaList = Annotated[list[str], NoDecode]


def _split_commas(value: object) -> object:
    """Accept `a,b,c` strings (how environment variables carry lists) as well as lists."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class GatewaySettings(BaseSettings):
    """Gateway knobs; each is read from `KRONOS_GATEWAY_<NAME>` (lists are comma-separated)."""

    model_config = SettingsConfigDict(env_prefix="KRONOS_GATEWAY_", extra="ignore")

    listen_host: str = Field("0.0.0.0", description="address the REST and gRPC servers bind")
    http_port: int = Field(8000, ge=1, le=65535, description="REST (HTTP/1.1) port")
    grpc_port: int = Field(8001, ge=1, le=65535, description="gRPC (HTTP/2 cleartext) port")
    status_host: str = Field("127.0.0.1", description="address of /gateway/health")
    status_port: int = Field(8002, ge=1, le=65535, description="port of /gateway/health")
    upstream_http: CommaList = Field(
        default_factory=lambda: ["127.0.0.1:8080"],
        description="MLServer REST servers, host:port, comma-separated (one per replica)",
    )
    upstream_grpc: CommaList = Field(
        default_factory=lambda: ["127.0.0.1:8081"],
        description="MLServer gRPC servers, host:port, comma-separated (one per replica)",
    )
    allow_cidrs: CommaList = Field(
        default_factory=lambda: ["127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "::1/128"],
        description="client networks allowed to call at all; others get 403",
    )
    admin_cidrs: CommaList = Field(
        default_factory=lambda: ["127.0.0.1/32", "::1/128"],
        description="networks allowed on the admin surface: model repository (REST and the "
        "repository RPCs of both gRPC services), API docs, gRPC reflection",
    )
    rate_limit: str = Field("20r/s", description="sustained rate per client address (Nr/s, Nr/m)")
    rate_limit_burst: int = Field(40, ge=0, description="requests above the rate let through")
    rate_limit_zone_size: str = Field("10m", description="shared memory for client states")
    max_body_size: str = Field("16m", description="largest request body; larger: 413")
    client_body_buffer_size: str = Field("1m", description="body bytes kept in memory")
    server_deadline_s: float = Field(
        300.0, gt=0, description="the server's request deadline (KRONOS_DEFAULT_DEADLINE_S)"
    )
    timeout_margin_s: float = Field(
        5.0, ge=0, description="extra wait past the deadline, so the server's own answer wins"
    )
    connect_timeout_s: float = Field(5.0, gt=0, description="upstream connect timeout")
    client_timeout_s: float = Field(60.0, gt=0, description="client header/body read timeout")
    upstream_keepalive: int = Field(32, ge=1, description="idle upstream connections kept")
    worker_processes: str = Field("auto", description="nginx worker processes (N or auto)")
    worker_connections: int = Field(1024, ge=16, description="connections per worker")
    access_log: str = Field("logs/access.log", description="JSON access log (prefix-relative)")
    access_log_stdout: bool = Field(False, description="also write access log lines to stdout")
    error_log: str = Field("stderr", description="error log: stderr or a path")
    error_log_level: str = Field("warn", description="error log level")
    user: str = Field("", description="worker user; only used when nginx starts as root")
    shadow_http: CommaList = Field(
        default_factory=list,
        description="challenger MLServer REST servers (host:port) that get a copy of inference requests; empty: none",
    )
    shadow_grpc: CommaList = Field(
        default_factory=list,
        description="challenger MLServer gRPC servers (host:port) that get a copy of ModelInfer calls; empty: none",
    )
    shadow_percent: float = Field(
        100.0, ge=0, le=100, description="share of REST inference requests copied to shadow_http (%, by request id)"
    )
    shadow_relay_port: int = Field(
        8003, ge=1, le=65535, description="loopback port of the relay that lets shadow requests outlive the client's"
    )

    @field_validator(
        "upstream_http", "upstream_grpc", "allow_cidrs", "admin_cidrs", "shadow_http", "shadow_grpc", mode="before"
    )
    @classmethod
    def _lists(cls, value: object) -> object:
        return _split_commas(value)

    @field_validator("upstream_http", "upstream_grpc")
    @classmethod
    def _servers(cls, servers: list[str]) -> list[str]:
        if not servers:
            raise ValueError("at least one upstream server is needed")
        return cls._shadow_servers(servers)

    @field_validator("shadow_http", "shadow_grpc")
    @classmethod
    def _shadow_servers(cls, servers: list[str]) -> list[str]:
        for server in servers:
            if not _HOST_PORT.match(server):
                raise ValueError(f"upstream server {server!r} is not host:port")
        return servers

    @field_validator("allow_cidrs", "admin_cidrs")
    @classmethod
    def _networks(cls, cidrs: list[str]) -> list[str]:
        return [str(ipaddress.ip_network(cidr, strict=False)) for cidr in cidrs]

    @field_validator("rate_limit")
    @classmethod
    def _rate(cls, rate: str) -> str:
        if not _RATE.match(rate):
            raise ValueError(f"rate_limit {rate!r} must look like 20r/s or 600r/m")
        return rate

    @field_validator("max_body_size", "client_body_buffer_size", "rate_limit_zone_size")
    @classmethod
    def _size(cls, size: str) -> str:
        if not _SIZE.match(size):
            raise ValueError(f"size {size!r} must be digits with an optional k/m/g suffix")
        return size

    @field_validator("worker_processes")
    @classmethod
    def _workers(cls, workers: str) -> str:
        if workers != "auto" and not workers.isdigit():
            raise ValueError("worker_processes must be a number or 'auto'")
        return workers

    @field_validator("access_log", "error_log", "listen_host", "status_host")
    @classmethod
    def _safe(cls, value: str) -> str:
        if not _SAFE_PATH.match(value.strip("[]")):
            raise ValueError(f"{value!r} contains characters not allowed in the nginx config")
        return value

    @field_validator("error_log_level")
    @classmethod
    def _level(cls, level: str) -> str:
        allowed = {"debug", "info", "notice", "warn", "error", "crit", "alert", "emerg"}
        if level not in allowed:
            raise ValueError(f"error_log_level must be one of {sorted(allowed)}")
        return level

    @field_validator("user")
    @classmethod
    def _user(cls, user: str) -> str:
        if user and not re.match(r"^[A-Za-z0-9_.-]+$", user):
            raise ValueError("user must be a plain user name")
        return user

    @model_validator(mode="after")
    def _distinct_ports(self) -> GatewaySettings:
        # the config tells REST from gRPC requests by the port they arrived on
        ports = [self.http_port, self.grpc_port, self.status_port]
        if self.shadow_http:
            ports.append(self.shadow_relay_port)
        if len(set(ports)) != len(ports):
            raise ValueError(f"http_port, grpc_port, status_port and shadow_relay_port must differ, got {ports}")
        return self

    @property
    def upstream_timeout_s(self) -> float:
        """How long the gateway waits for an upstream answer: deadline plus margin."""
        return self.server_deadline_s + self.timeout_margin_s


def _ms(seconds: float) -> int:
    """nginx durations are rendered in whole milliseconds (at least 1)."""
    return max(1, round(seconds * 1000))


def _host(host: str) -> str:
    """IPv6 listen addresses need brackets in nginx."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def template_values(settings: GatewaySettings) -> dict[str, str]:
    """The value of every template placeholder for these settings."""
    indent = " " * 8
    return {
        "worker_processes": settings.worker_processes,
        "worker_connections": str(settings.worker_connections),
        "error_log": settings.error_log,
        "error_log_level": settings.error_log_level,
        "user_directive": f"user {settings.user};\n" if settings.user else "",
        "allow_entries": "\n".join(f"{indent}{c} 1;" for c in settings.allow_cidrs),
        "admin_entries": "\n".join(f"{indent}{c} 1;" for c in settings.admin_cidrs),
        "rate_limit": settings.rate_limit,
        "rate_limit_burst": str(settings.rate_limit_burst),
        "rate_limit_zone_size": settings.rate_limit_zone_size,
        "access_log": settings.access_log,
        "access_log_stdout": ("access_log /dev/stdout kronos_json;" if settings.access_log_stdout else ""),
        "max_body_size": settings.max_body_size,
        "client_body_buffer_size": settings.client_body_buffer_size,
        "client_timeout_ms": str(_ms(settings.client_timeout_s)),
        "connect_timeout_ms": str(_ms(settings.connect_timeout_s)),
        "upstream_timeout_ms": str(_ms(settings.upstream_timeout_s)),
        "upstream_keepalive": str(settings.upstream_keepalive),
        "http_servers": "\n".join(f"{indent}server {s};" for s in settings.upstream_http),
        "grpc_servers": "\n".join(f"{indent}server {s};" for s in settings.upstream_grpc),
        "listen_host": _host(settings.listen_host),
        "http_port": str(settings.http_port),
        "grpc_port": str(settings.grpc_port),
        "status_listen": f"{_host(settings.status_host)}:{settings.status_port}",
        **shadow_values(settings),
    }


def _percent(value: float) -> str:
    """A split_clients share: at most two decimals, no exponent."""
    return f"{value:.2f}".rstrip("0").rstrip(".")


def shadow_values(settings: GatewaySettings) -> dict[str, str]:
    """The shadow-traffic parts of the config (empty strings when no shadow server is set).

    REST: nginx's `mirror` keeps the client's connection busy until the copy is answered
    (the next request of a keep-alive client would wait for the challenger), so the copy
    goes to a loopback relay that is let go after 1 ms; the relay, with
    `proxy_ignore_client_abort`, carries the request to the challenger and drops its answer.
    gRPC: HTTP/2 streams are independent, so `ModelInfer` is copied straight to the
    challenger's gRPC servers. Which requests are copied is decided by the request id
    (`split_clients`), the same id the model servers sample by."""
    values = {"shadow_http_block": "", "shadow_rest_locations": "", "shadow_grpc_locations": ""}
    if not settings.shadow_http and not settings.shadow_grpc:
        return values
    indent = " " * 8
    share = (
        f"{indent}* 1;"
        if settings.shadow_percent >= 100
        else f"{indent}{_percent(settings.shadow_percent)}% 1;\n{indent}* 0;"
    )
    http_block = f"""
    # --- shadow traffic: a share of inference requests, by request id, is copied to the
    # challenger servers; their answers are dropped (see the shadow locations below).
    split_clients "$kronos_request_id" $kronos_shadow {{
{share}
    }}
"""
    if settings.shadow_http:
        block, locations = _shadow_rest(settings)
        http_block += block
        values["shadow_rest_locations"] = locations
    if settings.shadow_grpc:
        block, locations = _shadow_grpc(settings)
        http_block += block
        values["shadow_grpc_locations"] = locations
    values["shadow_http_block"] = http_block
    return values


def _servers_block(name: str, servers: list[str], keepalive: int) -> str:
    lines = "\n".join(f"        server {server};" for server in servers)
    return f"""    upstream {name} {{
{lines}
        keepalive {keepalive};
    }}
"""


def _shadow_rest(settings: GatewaySettings) -> tuple[str, str]:
    """(http-level upstream + loopback relay, REST server locations) of the REST copies."""
    relay = f"127.0.0.1:{settings.shadow_relay_port}"
    timeout, connect = _ms(settings.upstream_timeout_s), _ms(settings.connect_timeout_s)
    block = _servers_block("kronos_shadow_http", settings.shadow_http, settings.upstream_keepalive)
    block += f"""    server {{
        listen {relay};
        server_name _;
        access_log off;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_ignore_client_abort on;
        proxy_connect_timeout {connect}ms;
        proxy_send_timeout {timeout}ms;
        proxy_read_timeout {timeout}ms;
        location / {{
            proxy_pass http://kronos_shadow_http;
        }}
    }}
"""
    locations = f"""
        # Inference requests: also copied to the shadow (challenger) servers, see above.
        location ~ ^(/v2/models/[^/]+(/versions/[^/]+)?/infer|/invocations)$ {{
            mirror /_kronos_shadow;
            mirror_request_body on;
            proxy_pass http://kronos_http;
        }}
        location = /_kronos_shadow {{
            internal;
            access_log off;
            error_log {settings.error_log} crit;  # the relay is let go on purpose: no timeout lines
            if ($kronos_shadow = 0) {{
                return 204;
            }}
            proxy_set_header X-Request-ID $kronos_request_id;
            proxy_set_header X-Kronos-Shadow "1";
            proxy_connect_timeout {connect}ms;
            proxy_send_timeout {timeout}ms;
            proxy_read_timeout 1ms;
            proxy_pass http://{relay}$request_uri;
        }}
"""
    return block, locations


def _shadow_grpc(settings: GatewaySettings) -> tuple[str, str]:
    """(http-level upstream, gRPC server locations) of the ModelInfer copies."""
    block = _servers_block("kronos_shadow_grpc", settings.shadow_grpc, settings.upstream_keepalive)
    locations = """
        # ModelInfer calls: also copied to the shadow (challenger) gRPC servers.
        location = /inference.GRPCInferenceService/ModelInfer {
            mirror /_kronos_shadow_grpc;
            mirror_request_body on;
            grpc_pass grpc://kronos_grpc;
        }
        location = /_kronos_shadow_grpc {
            internal;
            access_log off;
            if ($kronos_shadow = 0) {
                return 204;
            }
            rewrite ^ $request_uri break;  # the copy calls the method the client called
            grpc_set_header X-Request-ID $kronos_request_id;
            grpc_set_header X-Kronos-Shadow "1";
            grpc_pass grpc://kronos_shadow_grpc;
        }
"""
    return block, locations


def render_config(settings: GatewaySettings, template: str | None = None) -> str:
    """The nginx configuration text; raises KeyError on a placeholder without a value."""
    text = TEMPLATE_PATH.read_text() if template is None else template
    values = template_values(settings)

    def fill(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in values:
            raise KeyError(f"template placeholder {{{{ {name} }}}} has no value")
        return values[name]

    return PLACEHOLDER.sub(fill, text)


def prepare_prefix(settings: GatewaySettings, prefix: Path) -> Path:
    """Create the prefix layout (logs/, tmp/*) and write nginx.conf; returns its path."""
    prefix = prefix.resolve()
    (prefix / "logs").mkdir(parents=True, exist_ok=True)
    for name in TEMP_DIRS:
        (prefix / "tmp" / name).mkdir(parents=True, exist_ok=True)
    config = prefix / "nginx.conf"
    config.write_text(render_config(settings))
    return config


def find_nginx() -> str:
    """The nginx binary: $PATH first, then Debian's /usr/sbin/nginx."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise FileNotFoundError("nginx not found on PATH or in /usr/sbin")
    return found


def nginx_command(prefix: Path, nginx: str | None = None, test: bool = False) -> list[str]:
    """The command that runs (or with `test`, validates) nginx from a prepared prefix."""
    prefix = prefix.resolve()
    command = [nginx or find_nginx(), "-p", f"{prefix}/", "-c", str(prefix / "nginx.conf"), "-e", "stderr"]
    return [*command, "-t", "-q"] if test else command


def check_config(prefix: Path, nginx: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run `nginx -t` on the rendered config; raises CalledProcessError when it is invalid."""
    return subprocess.run(nginx_command(prefix, nginx, test=True), check=True, capture_output=True, text=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Render the config into a prefix, optionally validate it and replace this process."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--prefix",
        type=Path,
        default=Path(os.environ.get("KRONOS_GATEWAY_PREFIX", "/tmp/kronos-gateway")),
        help="directory for nginx.conf, logs/ and tmp/",
    )
    parser.add_argument("--nginx", default=None, help="nginx binary (default: found on PATH)")
    parser.add_argument("--check", action="store_true", help="validate with nginx -t")
    parser.add_argument(
        "--exec", dest="run", action="store_true", help="then replace this process with nginx (foreground)"
    )
    parser.add_argument("--print", dest="show", action="store_true", help="print the rendered config")
    args = parser.parse_args(argv)

    settings = GatewaySettings()
    config = prepare_prefix(settings, args.prefix)
    if args.show:
        print(config.read_text())
    if args.check:
        try:
            check_config(args.prefix, args.nginx)
        except subprocess.CalledProcessError as error:
            sys.stderr.write(error.stderr)
            return 1
    if args.run:
        command = nginx_command(args.prefix, args.nginx)
        os.execv(command[0], command)
    print(" ".join(nginx_command(args.prefix, args.nginx)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
