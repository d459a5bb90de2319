"""Rendering the nginx config from settings: defaults, environment, validation, nginx -t."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from pydantic import ValidationError

from serving.gateway.render import (
    GatewaySettings,
    check_config,
    main,
    nginx_command,
    prepare_prefix,
    render_config,
)


def test_defaults_render_a_config_nginx_accepts(tmp_path: Path) -> None:
    settings = GatewaySettings()
    config = prepare_prefix(settings, tmp_path)
    text = config.read_text()
    assert "{{" not in text
    assert "daemon off;" in text
    assert "limit_req_status 429;" in text
    assert "client_max_body_size 16m;" in text
    assert "escape=json" in text
    assert "listen 0.0.0.0:8001 http2;" in text
    assert "grpc_pass grpc://kronos_grpc;" in text
    # the upstream waits for the server's deadline (300 s) plus the margin (5 s)
    assert "proxy_read_timeout 305000ms;" in text
    assert "grpc_read_timeout 305000ms;" in text
    for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        assert (tmp_path / "tmp" / name).is_dir()
    check_config(tmp_path)  # raises if nginx -t fails


def test_environment_overrides_with_comma_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KRONOS_GATEWAY_UPSTREAM_HTTP", "kronos-1:8080, kronos-2:8080")
    monkeypatch.setenv("KRONOS_GATEWAY_ALLOW_CIDRS", "10.1.0.0/16,192.168.1.7")
    monkeypatch.setenv("KRONOS_GATEWAY_RATE_LIMIT", "600r/m")
    monkeypatch.setenv("KRONOS_GATEWAY_SERVER_DEADLINE_S", "30")
    settings = GatewaySettings()
    assert settings.upstream_http == ["kronos-1:8080", "kronos-2:8080"]
    assert settings.allow_cidrs == ["10.1.0.0/16", "192.168.1.7/32"]
    text = render_config(settings)
    assert "server kronos-1:8080;" in text and "server kronos-2:8080;" in text
    assert "10.1.0.0/16 1;" in text and "192.168.1.7/32 1;" in text
    assert "rate=600r/m;" in text
    assert "proxy_read_timeout 35000ms;" in text
    assert "/dev/stdout" not in text
    monkeypatch.setenv("KRONOS_GATEWAY_ACCESS_LOG_STDOUT", "true")
    assert "access_log /dev/stdout kronos_json;" in render_config(GatewaySettings())


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("upstream_http", "kronos:8080; evil"),
        ("upstream_grpc", ""),
        ("allow_cidrs", "10.0.0.0/33"),
        ("admin_cidrs", "not-a-network"),
        ("rate_limit", "20 r/s"),
        ("max_body_size", "16mb; x"),
        ("access_log", "logs/a.log; include /etc/passwd"),
        ("worker_processes", "two"),
        ("error_log_level", "loud"),
    ],
)
def test_values_that_could_break_or_inject_config_are_rejected(field: str, value: str) -> None:
    with pytest.raises(ValidationError):
        GatewaySettings(**{field: value})


def test_ports_must_differ() -> None:
    # the rendered config tells REST from gRPC requests by the port they arrive on
    with pytest.raises(ValidationError, match="must differ"):
        GatewaySettings(http_port=9000, grpc_port=9000)
    with pytest.raises(ValidationError, match="must differ"):
        GatewaySettings(grpc_port=8002)  # the default status port


def test_allow_list_reads_the_grpc_port_and_keeps_repository_rpcs_admin_only() -> None:
    text = render_config(GatewaySettings(grpc_port=18001))
    assert "18001 grpc;" in text  # $kronos_protocol: requests on the gRPC port
    admin_lines = [line for line in text.splitlines() if line.rstrip().endswith("admin:repository;")]
    assert any("inference\\.GRPCInferenceService/Repository" in line for line in admin_lines)
    assert any("ModelRepositoryService/Repository" in line for line in admin_lines)
    open_grpc = next(line for line in text.splitlines() if line.rstrip().endswith("open:grpc;"))
    assert "Repository" not in open_grpc


def test_unknown_placeholder_is_an_error() -> None:
    with pytest.raises(KeyError, match="nope"):
        render_config(GatewaySettings(), template="worker_processes {{ nope }};")


def test_broken_config_fails_nginx_t(tmp_path: Path) -> None:
    prepare_prefix(GatewaySettings(), tmp_path)
    config = tmp_path / "nginx.conf"
    config.write_text(config.read_text().replace("grpc_pass grpc://kronos_grpc;", "grpc_pass grpc://;"))
    with pytest.raises(subprocess.CalledProcessError):
        check_config(tmp_path)


def test_cli_renders_checks_and_prints_the_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KRONOS_GATEWAY_HTTP_PORT", "18123")
    assert main(["--prefix", str(tmp_path), "--check"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == " ".join(nginx_command(tmp_path))
    assert "-e stderr" in printed
    assert "listen 0.0.0.0:18123;" in (tmp_path / "nginx.conf").read_text()
