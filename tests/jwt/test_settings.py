"""The JWT gateway's settings: postgres-websockets' PGWS_* variables."""

import pytest

from pgws_sync import ConfigError
from pgws_sync.jwt.settings import GatewaySettings, create_gateway_app, settings_from_environ


def test_settings_from_environ_defaults_and_bind() -> None:
    settings = settings_from_environ({"PGWS_JWT_SECRET": "s"}, dsn="d")
    assert settings == GatewaySettings(dsn="d", secret="s")
    assert (settings.listen_channel, settings.port, settings.pool_size, settings.retries) == (
        "postgres-websockets-listener", 3000, 10, 5)
    assert settings.bind == "0.0.0.0:3000"
    for host, bind in [("*", "0.0.0.0:3000"), ("*6", "[::]:3000"), ("::1", "[::1]:3000"),
                       ("localhost", "localhost:3000")]:
        assert GatewaySettings(dsn="d", secret="s", host=host).bind == bind
    with pytest.raises(ConfigError, match="PGWS_JWT_SECRET"):
        settings_from_environ({}, dsn="d")
    assert settings_from_environ({}, dsn="d", secret="flag").secret == "flag"


def test_check_listener_interval_sets_the_listeners_heartbeat() -> None:
    env = {"PGWS_JWT_SECRET": "s" * 32}
    assert settings_from_environ(env, dsn="").heartbeat_interval == 10.0  # a check every 5 s
    settings = settings_from_environ({**env, "PGWS_CHECK_LISTENER_INTERVAL": "1000"}, dsn="")
    assert settings.check_listener_ms == 1000 and settings.heartbeat_interval == 2.0
    gateway = create_gateway_app(settings)
    try:
        assert gateway.listener.heartbeat_interval == 2.0  # SELECT 1 after 1 s without traffic
    finally:
        gateway.close(0)
    for bad in ("50", "-1", "often"):
        with pytest.raises(ConfigError, match="PGWS_CHECK_LISTENER_INTERVAL"):
            settings_from_environ({**env, "PGWS_CHECK_LISTENER_INTERVAL": bad}, dsn="")
