"""The deployment files: docker-compose.yml, the Dockerfile and config/.env.example.

There is no Docker engine in the test environment: these tests read the files for what a deploy
depends on, and compare .env.example with the variables the code really reads.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from sudo_queue.doctor import SlackEnv
from sudo_queue.settings import Settings

from .helpers import ROOT

ENV_EXAMPLE = ROOT / "config" / ".env.example"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def test_compose_has_redis_worker_and_slack(compose: dict[str, Any]) -> None:
    """Three services: Redis, and the worker and Slack app built from this repository."""
    services = compose["services"]
    assert set(services) == {"redis", "worker", "slack"}
    assert services["redis"]["image"].startswith("redis:7")
    for name in ("worker", "slack"):
        assert services[name]["build"] == ".", name
    assert services["worker"]["command"] == ["worker"]
    assert services["slack"]["command"][:1] == ["slack"]
    assert "--host" in services["slack"]["command"]
    assert services["slack"]["ports"] == ["3000:3000"]


def test_compose_redis_keeps_its_data(compose: dict[str, Any]) -> None:
    """Redis runs with AOF (fsync every second), no eviction, a volume and a health check."""
    redis = compose["services"]["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command
    assert "--appendfsync everysec" in command
    assert "--maxmemory-policy noeviction" in command
    assert any(v.endswith(":/data") for v in redis["volumes"])
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert "ports" not in redis  # no password: not published outside the compose network


def test_compose_apps_wait_for_healthy_redis_and_restart(compose: dict[str, Any]) -> None:
    """Worker and Slack app read .env, reach the compose Redis, start after it is healthy,
    and restart; so does Redis."""
    services = compose["services"]
    for name in ("worker", "slack"):
        service = services[name]
        assert service["env_file"] == ".env", name
        assert service["environment"]["SUDO_QUEUE_REDIS_URL"] == "redis://redis:6379/0", name
        assert service["depends_on"] == {"redis": {"condition": "service_healthy"}}, name
    for name, service in services.items():
        assert service["restart"] == "unless-stopped", name
    assert services["worker"]["environment"]["SUDO_QUEUE_NOTIFY"] == "slack"
    assert "/healthz" in " ".join(services["slack"]["healthcheck"]["test"])


def test_dockerfile_installs_the_package() -> None:
    """The Dockerfile installs sudo-queue with the slack extra, copies the policy, drops root,
    and runs the `sudo-queue` entry point."""
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11", text, re.MULTILINE)
    for path in ("pyproject.toml", "sudo_queue", "workers", "adapters", "config"):
        assert re.search(rf"^COPY .*\b{path}\b", text, re.MULTILINE), path
    assert 'pip install ".[slack]"' in text
    assert re.search(r"^USER \w+", text, re.MULTILINE)
    assert 'ENTRYPOINT ["sudo-queue"]' in text


def test_dockerignore_keeps_secrets_out_of_the_image() -> None:
    """The build context leaves out .env files, the virtualenv and git history."""
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".env", ".env.*", ".venv", ".git"} <= ignored


def variables_the_code_reads() -> set[str]:
    """SUDO_QUEUE_* / SLACK_* names written as strings in the code, plus every settings field."""
    names = {f"SUDO_QUEUE_{name.upper()}" for name in Settings.model_fields}
    names |= {str(f.validation_alias) for f in SlackEnv.model_fields.values()}
    try:
        slack_config = importlib.import_module("sudo_queue.adapters.slack_config")
    except ImportError:
        pass
    else:
        fields = slack_config.SlackSettings.model_fields.values()
        names |= {str(f.validation_alias) for f in fields if f.validation_alias}
    literal = re.compile(r"""["']((?:SUDO_QUEUE|SLACK)_[A-Z0-9_]*[A-Z0-9])["']""")
    for folder in ("sudo_queue", "workers", "adapters"):
        for path in (ROOT / folder).rglob("*.py"):
            names |= set(literal.findall(path.read_text()))
    return names


def test_env_example_documents_every_variable() -> None:
    """Every variable the code reads appears in config/.env.example (set or commented out)."""
    documented = set(re.findall(r"^#? ?([A-Z][A-Z0-9_]+)=", ENV_EXAMPLE.read_text(), re.MULTILINE))
    missing = variables_the_code_reads() - documented
    assert not missing, f"add to config/.env.example: {sorted(missing)}"


def test_env_example_holds_no_secrets() -> None:
    """The example sets no token or secret: only placeholders."""
    for line in ENV_EXAMPLE.read_text().splitlines():
        name, _, value = line.removeprefix("# ").partition("=")
        if any(word in name for word in ("TOKEN", "SECRET", "KEY")) and not name.endswith("KEYS"):
            assert value in ("", "xoxb-...", "xapp-..."), line


def test_readme_documents_deployment_and_trust_boundary() -> None:
    """README tells a deployer how to run the compose file and what a gate does not protect."""
    text = (ROOT / "README.md").read_text()
    assert "docker compose up" in text
    assert "not a sandbox" in text
    assert Path(ROOT / "config" / ".env.example").name in text
