"""docker-compose.yml: valid Compose, and every meterstream service is one the code can run."""

from __future__ import annotations

from typing import Any

from meterstream.cli import cli
from meterstream.settings import ENV_PREFIX, STRIPE_API_KEY_PATTERN, Settings, load_settings
from tests.deploy.conftest import (
    COMPOSE_FILE,
    ROOT,
    compose_environment,
    meterstream_services,
    run,
    tool,
)


def test_compose_file_validates() -> None:
    done = run(
        tool("docker-compose"), "-f", str(COMPOSE_FILE), "config", "-q", env=compose_environment()
    )
    assert done.returncode == 0, done.stderr


def test_compose_refuses_to_start_without_a_stripe_key() -> None:
    env = compose_environment()
    del env["STRIPE_API_KEY"]
    done = run(tool("docker-compose"), "-f", str(COMPOSE_FILE), "config", "-q", env=env)
    assert done.returncode != 0
    assert "set STRIPE_API_KEY" in done.stderr


def test_no_secret_is_written_in_the_compose_file() -> None:
    assert not STRIPE_API_KEY_PATTERN.search(COMPOSE_FILE.read_text())


def test_the_stack_has_every_stage(compose: dict[str, Any]) -> None:
    commands = [service["command"][0] for service in meterstream_services(compose).values()]
    assert sorted(commands) == ["aggregate", "aggregate", "migrate", "report", "serve"]
    services = compose["services"]
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert services["postgres"]["image"] == "postgres:16"
    for name in ("kafka", "postgres"):
        assert services[name]["healthcheck"]["test"], name
    assert {"prometheus", "grafana"} <= set(services)


def test_every_service_command_is_a_meterstream_subcommand(compose: dict[str, Any]) -> None:
    for name, service in meterstream_services(compose).items():
        assert service["command"][0] in cli.commands, f"{name}: {service['command']}"


def test_every_variable_set_on_a_meterstream_service_is_a_setting(
    compose: dict[str, Any],
) -> None:
    fields = set(Settings.model_fields)
    for name, service in meterstream_services(compose).items():
        environment: dict[str, str] = service.get("environment", {})
        assert environment, name
        for variable in environment:
            assert variable.startswith(ENV_PREFIX), f"{name}: {variable}"
            assert variable.removeprefix(ENV_PREFIX).lower() in fields, f"{name}: {variable}"
        # And the values are valid settings, as the service will read them.
        load_settings(**{k.removeprefix(ENV_PREFIX).lower(): v for k, v in environment.items()})


def test_workers_share_a_consumer_group_and_wait_for_the_migration(
    compose: dict[str, Any],
) -> None:
    services = meterstream_services(compose)
    workers = [s for s in services.values() if s["command"] == ["aggregate"]]
    assert len({w["environment"]["METERSTREAM_CONSUMER_GROUP"] for w in workers}) == 1
    for service in services.values():
        if service["command"] != ["migrate"]:
            assert service["depends_on"]["migrate"]["condition"] == (
                "service_completed_successfully"
            )
    migrate = next(s for s in services.values() if s["command"] == ["migrate"])
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_mounted_files_exist_and_the_catalogue_is_the_example(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume["source"]
            if source.startswith("/"):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
    for name, service in meterstream_services(compose).items():
        catalogue = service["environment"]["METERSTREAM_METERS_FILE"]
        mounts = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
        assert mounts[catalogue] == str(ROOT / "examples" / "meters.toml"), name


def test_the_image_runs_meterstream_as_a_user() -> None:
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    assert "FROM python:3.11-slim" in lines
    assert 'ENTRYPOINT ["meterstream"]' in lines
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users, "no USER: the image would run as root"
    assert users[-1] not in {"root", "0"}
