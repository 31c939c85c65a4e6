"""docker-compose.yml (no Docker engine here): every service is defined, health-checked, and runs a real
entry point of this project."""
import importlib
from pathlib import Path

import yaml
from django.core.management import get_commands

ROOT = Path(__file__).resolve().parents[2]


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _entry_points(command: list[str]) -> list[list[str]]:
    """Split `sh -c "a && b && exec c"` into its commands; a plain list is one command."""
    if command[:2] == ["sh", "-c"]:
        return [part.replace("exec ", "", 1).split() for part in command[2].split("&&")]
    return [command]


def test_every_service_is_defined_with_a_health_check():
    services = _compose()["services"]
    assert set(services) >= {"postgres", "redis", "web", "otlp-grpc", "worker", "beat"}
    for name in ("postgres", "redis", "web", "otlp-grpc", "worker", "beat"):
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no health check"


def test_app_services_use_postgres_and_redis():
    for name in ("web", "otlp-grpc", "worker", "beat"):
        env = _compose()["services"][name]["environment"]
        assert env["DATABASE_URL"].startswith("postgres://") and env["REDIS_URL"].startswith("redis://")


def test_each_command_names_a_real_entry_point():
    commands = get_commands()
    for name in ("web", "otlp-grpc", "worker", "beat"):
        for argv in _entry_points(_compose()["services"][name]["command"]):
            if argv[:2] == ["python", "manage.py"]:
                assert argv[2] in commands, f"{name}: no management command {argv[2]!r}"
            elif argv[0] == "celery":
                assert argv[1] == "-A"
                module = importlib.import_module(argv[2])
                assert hasattr(module, "celery_app") or hasattr(module, "app"), f"{name}: {argv[2]} has no app"
                assert argv[3] in {"worker", "beat"}
            else:
                raise AssertionError(f"{name}: unknown entry point {argv}")
    assert (ROOT / "Dockerfile").exists()
