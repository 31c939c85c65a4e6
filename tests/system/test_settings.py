"""Settings come from the environment and fail loudly on bad values; production settings pass --deploy."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from controlplane.env import database_from_url, env_bool, env_int

ROOT = Path(__file__).resolve().parents[2]


def _manage(*args, env_overrides: dict, tmp_path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL", "DEBUG", "SECRET_KEY"}}
    env.update({"DATA_DIR": str(tmp_path)}, **env_overrides)
    return subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_bad_boolean_names_the_variable(monkeypatch):
    monkeypatch.setenv("DEBUG", "maybe")
    with pytest.raises(ImproperlyConfigured, match="^DEBUG: expected a boolean"):
        env_bool("DEBUG", True)


def test_bad_integer_names_the_variable(monkeypatch):
    monkeypatch.setenv("PORT", "eighty")
    with pytest.raises(ImproperlyConfigured, match="^PORT: expected an integer"):
        env_int("PORT", 8000)


def test_database_urls_parse():
    pg = database_from_url("DATABASE_URL", "postgres://u:p%40ss@db.local:5433/cp?sslmode=require")
    assert (pg["ENGINE"], pg["NAME"], pg["USER"], pg["PASSWORD"], pg["HOST"], pg["PORT"]) == (
        "django.db.backends.postgresql", "cp", "u", "p@ss", "db.local", "5433")
    assert pg["OPTIONS"] == {"sslmode": "require"}
    assert database_from_url("DATABASE_URL", "sqlite:////tmp/x.db")["NAME"] == "/tmp/x.db"
    with pytest.raises(ImproperlyConfigured, match="^DATABASE_URL: unsupported scheme"):
        database_from_url("DATABASE_URL", "mysql://x/y")


def test_a_bad_value_stops_the_process_with_one_clear_line(tmp_path):
    result = _manage("check", env_overrides={"TIME_ZONE": "Mars/Olympus"}, tmp_path=tmp_path)
    assert result.returncode != 0
    assert "TIME_ZONE: unknown time zone 'Mars/Olympus'" in result.stderr


def test_production_refuses_to_start_without_a_secret_key(tmp_path):
    result = _manage("check", env_overrides={"DEBUG": "0", "ALLOWED_HOSTS": "cp.example.com"}, tmp_path=tmp_path)
    assert result.returncode != 0 and "SECRET_KEY: must be set when DEBUG is off" in result.stderr


def test_check_deploy_is_clean_with_production_settings(tmp_path):
    result = _manage(
        "check", "--deploy", "--fail-level", "WARNING",
        env_overrides={"DEBUG": "0", "SECRET_KEY": "q8vJ2mX0pL7rT4wZ9bN1cF6hK3sD5gA8eY2uI0oP7lM4nB6vC1xZ",
                       "ALLOWED_HOSTS": "cp.example.com"},
        tmp_path=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout
