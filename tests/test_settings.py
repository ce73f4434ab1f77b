"""Configuration from the environment, as an operator meets it: the contract's defaults,
one clear error per malformed variable, no secret in a repr, and the key ring the
embedded database keeps for itself."""

from __future__ import annotations

import stat
from datetime import timedelta
from pathlib import Path

import pytest

from broker.crypto import KeyRing
from broker.errors import ConfigurationError
from broker.settings import VARIABLES, Settings
from broker.storage.database import key_ring_for

SPEC_AUTH_URL = "https://appcenter.intuit.com/connect/oauth2"
SPEC_TOKEN_URL = "https://oauth.platform.intuit.com/oauth2/v1/tokens/bearer"
SPEC_REVOKE_URL = "https://developer.api.intuit.com/v2/oauth2/tokens/revoke"

CLIENT_SECRET = "s3cr3t-Intuit-app-Kw9zQ"
KEY_SPEC = KeyRing.generate_spec("prod1")
KEY_MATERIAL = KEY_SPEC.partition(":")[2]


def test_defaults_match_the_contract() -> None:
    settings = Settings.from_env({})

    assert settings.database_url is None
    assert settings.embedded_database
    assert settings.data_dir == Path("./.broker-data")
    assert settings.grpc_addr == "127.0.0.1:50051"
    assert settings.http_addr == "127.0.0.1:8080"
    assert settings.encryption_keys is None
    assert settings.environment == "sandbox"
    assert settings.auth_url == SPEC_AUTH_URL
    assert settings.token_url == SPEC_TOKEN_URL
    assert settings.revoke_url == SPEC_REVOKE_URL
    assert settings.proactive_age == timedelta(days=30)
    assert settings.background_age == timedelta(days=60)
    assert settings.refresh_job_schedule.text == "sunday 02:00"
    assert settings.refresh_job_schedule.interval == timedelta(days=7)
    assert settings.refresh_job_rate_limit == timedelta(milliseconds=500)
    assert settings.refresh_job_max_per_run == 0
    assert settings.disable_background_refresh is False
    assert settings.refresh_job_on_startup is False


def test_production_uses_intuits_endpoints_too() -> None:
    settings = Settings.from_env({"QB_ENVIRONMENT": "production"})

    assert settings.environment == "production"
    assert (settings.auth_url, settings.token_url, settings.revoke_url) == (
        SPEC_AUTH_URL,
        SPEC_TOKEN_URL,
        SPEC_REVOKE_URL,
    )


def test_every_variable_is_read() -> None:
    settings = Settings.from_env(
        {
            "BROKER_DATABASE_URL": "postgresql://broker@db.internal:5432/broker",
            "BROKER_DATA_DIR": "/var/lib/qbo-broker",
            "BROKER_GRPC_ADDR": "0.0.0.0:9000",
            "BROKER_HTTP_ADDR": "[::]:9001",
            "BROKER_ENCRYPTION_KEYS": KEY_SPEC,
            "QB_CLIENT_ID": "app-id",
            "QB_CLIENT_SECRET": CLIENT_SECRET,
            "QB_REDIRECT_URI": "https://broker.example.com/oauth/callback",
            "QB_ENVIRONMENT": "production",
            "QB_AUTH_URL": "http://127.0.0.1:8090/connect/oauth2",
            "QB_TOKEN_URL": "http://127.0.0.1:8090/oauth2/v1/tokens/bearer",
            "QB_REVOKE_URL": "http://127.0.0.1:8090/v2/oauth2/tokens/revoke",
            "QB_REFRESH_TOKEN_PROACTIVE_DAYS": "20",
            "QB_REFRESH_TOKEN_BACKGROUND_DAYS": "45",
            "QB_REFRESH_JOB_SCHEDULE": "monday 03:30",
            "QB_REFRESH_JOB_RATE_LIMIT_MS": "250",
            "QB_REFRESH_JOB_MAX_PER_RUN": "1000",
            "QB_DISABLE_BACKGROUND_REFRESH": "true",
            "QB_REFRESH_JOB_ON_STARTUP": "TRUE",
            "BROKER_INSECURE": "true",  # 0.0.0.0 without mutual TLS
        }
    )

    assert settings.database_url == "postgresql://broker@db.internal:5432/broker"
    assert not settings.embedded_database
    assert settings.data_dir == Path("/var/lib/qbo-broker")
    assert settings.grpc_addr == "0.0.0.0:9000"
    assert settings.http_addr == "[::]:9001"
    assert settings.encryption_keys is not None
    assert settings.encryption_keys.primary_id == "prod1"
    assert settings.client_id == "app-id"
    assert settings.client_secret.value == CLIENT_SECRET
    assert settings.redirect_uri == "https://broker.example.com/oauth/callback"
    assert settings.environment == "production"
    assert settings.token_url == "http://127.0.0.1:8090/oauth2/v1/tokens/bearer"
    assert settings.auth_url == "http://127.0.0.1:8090/connect/oauth2"
    assert settings.revoke_url == "http://127.0.0.1:8090/v2/oauth2/tokens/revoke"
    assert settings.proactive_age == timedelta(days=20)
    assert settings.background_age == timedelta(days=45)
    assert settings.refresh_job_schedule.text == "monday 03:30"
    assert settings.refresh_job_rate_limit == timedelta(milliseconds=250)
    assert settings.refresh_job_max_per_run == 1000
    assert settings.disable_background_refresh is True
    assert settings.refresh_job_on_startup is True


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("QB_REFRESH_TOKEN_PROACTIVE_DAYS", "thirty"),
        ("QB_REFRESH_TOKEN_PROACTIVE_DAYS", "0"),
        ("QB_REFRESH_TOKEN_PROACTIVE_DAYS", "-5"),
        ("QB_REFRESH_TOKEN_PROACTIVE_DAYS", "365"),
        ("QB_REFRESH_TOKEN_PROACTIVE_DAYS", "nan"),
        ("QB_REFRESH_TOKEN_BACKGROUND_DAYS", "sixty"),
        ("QB_REFRESH_TOKEN_BACKGROUND_DAYS", "200"),
        ("QB_REFRESH_TOKEN_BACKGROUND_DAYS", "inf"),
        ("QB_REFRESH_JOB_RATE_LIMIT_MS", "fast"),
        ("QB_REFRESH_JOB_RATE_LIMIT_MS", "-1"),
        ("QB_REFRESH_JOB_MAX_PER_RUN", "lots"),
        ("QB_REFRESH_JOB_MAX_PER_RUN", "-1"),
        ("QB_DISABLE_BACKGROUND_REFRESH", "maybe"),
        ("QB_DISABLE_BACKGROUND_REFRESH", "2"),
        ("QB_REFRESH_JOB_ON_STARTUP", "yes please"),
        ("QB_TOKEN_URL", "not a url"),
        ("QB_TOKEN_URL", "ftp://oauth.platform.intuit.com/oauth2/v1/tokens/bearer"),
        ("QB_AUTH_URL", "http://"),
        ("QB_REVOKE_URL", "developer.api.intuit.com/v2/oauth2/tokens/revoke"),
        ("QB_REDIRECT_URI", "/oauth/callback"),
        ("BROKER_GRPC_ADDR", "localhost"),
        ("BROKER_GRPC_ADDR", "127.0.0.1:grpc"),
        ("BROKER_GRPC_ADDR", "127.0.0.1:70000"),
        ("BROKER_HTTP_ADDR", "8080"),
        ("BROKER_HTTP_ADDR", "127.0.0.1:"),
        ("QB_ENVIRONMENT", "staging"),
        ("QB_ENVIRONMENT", "prod"),
        ("BROKER_ENCRYPTION_KEYS", "k1"),
    ],
)
def test_a_malformed_value_is_a_configuration_error_naming_the_variable(
    variable: str, value: str
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        Settings.from_env({variable: value})
    assert variable in str(caught.value)


def test_a_fractional_cap_per_run_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="QB_REFRESH_JOB_MAX_PER_RUN"):
        Settings.from_env({"QB_REFRESH_JOB_MAX_PER_RUN": "2.5"})


@pytest.mark.parametrize("schedule", ["blursday 02:00", "sunday 25:61", "whenever"])
def test_an_unreadable_sweep_schedule_is_a_configuration_error(schedule: str) -> None:
    with pytest.raises(ConfigurationError, match="QB_REFRESH_JOB_SCHEDULE"):
        Settings.from_env({"QB_REFRESH_JOB_SCHEDULE": schedule})


def test_repr_and_str_show_neither_the_client_secret_nor_key_material() -> None:
    settings = Settings.from_env(
        {
            "QB_CLIENT_ID": "app-id",
            "QB_CLIENT_SECRET": CLIENT_SECRET,
            "BROKER_ENCRYPTION_KEYS": f"{KEY_SPEC},{KeyRing.generate_spec('old1')}",
        }
    )

    for shown in (repr(settings), str(settings), f"{settings}", repr(settings.client_secret)):
        assert CLIENT_SECRET not in shown
        assert KEY_MATERIAL not in shown
    assert "app-id" in repr(settings)  # the repr is still useful


def test_repr_does_not_show_the_database_password() -> None:
    settings = Settings.from_env(
        {
            "BROKER_DATABASE_URL": "postgresql://broker:Db-Pa55word-xyz@db.internal/broker",
            "BROKER_ENCRYPTION_KEYS": KEY_SPEC,
        }
    )
    assert "Db-Pa55word-xyz" not in repr(settings)


def test_serving_requires_the_intuit_app_credentials() -> None:
    with pytest.raises(ConfigurationError) as caught:
        Settings.from_env({}).require_intuit_credentials()
    assert "QB_CLIENT_ID" in str(caught.value)
    assert "QB_CLIENT_SECRET" in str(caught.value)

    with pytest.raises(ConfigurationError) as caught:
        Settings.from_env({"QB_CLIENT_ID": "app-id"}).require_intuit_credentials()
    assert "QB_CLIENT_SECRET" in str(caught.value)

    Settings.from_env(
        {"QB_CLIENT_ID": "app-id", "QB_CLIENT_SECRET": CLIENT_SECRET}
    ).require_intuit_credentials()


def test_an_external_database_without_keys_is_refused() -> None:
    external = Settings.from_env({"BROKER_DATABASE_URL": "postgresql://broker@db/broker"})

    with pytest.raises(ConfigurationError, match="BROKER_ENCRYPTION_KEYS"):
        external.require_key_ring_policy()
    with pytest.raises(ConfigurationError, match="BROKER_ENCRYPTION_KEYS"):
        key_ring_for(external)

    Settings.from_env(
        {"BROKER_DATABASE_URL": "postgresql://broker@db/broker", "BROKER_ENCRYPTION_KEYS": KEY_SPEC}
    ).require_key_ring_policy()
    Settings.from_env({}).require_key_ring_policy()  # embedded: the broker keeps its own key


def test_the_embedded_database_gets_a_private_key_file_that_is_reused(tmp_path: Path) -> None:
    data_dir = tmp_path / "not-yet-created"
    settings = Settings.from_env({"BROKER_DATA_DIR": str(data_dir)})

    first = key_ring_for(settings)

    key_files = list(data_dir.iterdir())
    assert len(key_files) == 1
    mode = stat.S_IMODE(key_files[0].stat().st_mode)
    assert mode == 0o600, oct(mode)
    content = key_files[0].read_text()

    second = key_ring_for(Settings.from_env({"BROKER_DATA_DIR": str(data_dir)}))

    assert key_files[0].read_text() == content
    assert second.primary_id == first.primary_id
    sealed, key_id = first.encrypt("refresh-token-value", "123:refresh_token")
    assert second.decrypt(sealed, key_id, "123:refresh_token") == "refresh-token-value"


def test_configured_keys_win_and_no_key_file_is_written(tmp_path: Path) -> None:
    settings = Settings.from_env(
        {"BROKER_DATA_DIR": str(tmp_path / "data"), "BROKER_ENCRYPTION_KEYS": KEY_SPEC}
    )

    ring = key_ring_for(settings)

    assert ring.primary_id == "prod1"
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("content", ["", "k1:not-base64!!\n", "k1:" + "QUJD" * 3 + "\n"])
def test_a_corrupt_key_file_is_a_clear_configuration_error(tmp_path: Path, content: str) -> None:
    data_dir = tmp_path / "data"
    settings = Settings.from_env({"BROKER_DATA_DIR": str(data_dir)})
    key_ring_for(settings)
    (key_file,) = data_dir.iterdir()
    key_file.write_text(content)

    with pytest.raises(ConfigurationError) as caught:
        key_ring_for(settings)

    assert str(key_file) in str(caught.value)
    assert key_file.read_text() == content  # never silently replaced: tokens depend on it


def test_the_environment_picks_intuits_endpoint_set() -> None:
    sandbox = Settings.from_env({})
    production = Settings.from_env({"QB_ENVIRONMENT": "production"})

    assert sandbox.intuit_environment.api_base_url == "https://sandbox-quickbooks.api.intuit.com"
    assert production.intuit_environment.api_base_url == "https://quickbooks.api.intuit.com"
    assert "sandbox" in sandbox.intuit_environment.discovery_url
    assert "sandbox" not in production.intuit_environment.discovery_url
    # An override replaces one endpoint and keeps the environment's others.
    proxied = Settings.from_env(
        {"QB_ENVIRONMENT": "production", "QB_TOKEN_URL": "https://egress.internal/token"}
    )
    assert proxied.token_url == "https://egress.internal/token"
    assert proxied.revoke_url == SPEC_REVOKE_URL


def test_the_documented_configuration_table_matches_the_code() -> None:
    """docs/operations.md lists every variable with the default the code has."""
    table = (Path(__file__).parent.parent / "docs" / "operations.md").read_text()
    rows = {line.split("|")[1]: line for line in table.splitlines() if line.startswith("| `")}
    for variable in VARIABLES:
        row = next((line for names, line in rows.items() if f"`{variable.name}`" in names), None)
        assert row is not None, f"{variable.name} is not documented"
        default = variable.default_text
        if default and variable.name not in ("BROKER_DATA_DIR",):
            assert f"`{default}`" in row, f"{variable.name}: the docs do not say {default}"


@pytest.mark.parametrize(
    "url",
    [
        "not-a-url",
        "mysql://broker@db/broker",
        "postgresql:///broker",
        "postgresql://broker@db:notaport/broker",
    ],
)
def test_a_malformed_database_url_is_refused_without_echoing_it(url: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        Settings.from_env({"BROKER_DATABASE_URL": url})
    assert "BROKER_DATABASE_URL" in str(caught.value)
    assert url not in str(caught.value)  # it may carry a password
