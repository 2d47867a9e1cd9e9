"""The delivery interface: PubSub and Push choose NOTIFY or durable channels once, and the
server-side API raises the errors its docs name (no database needed)."""

from __future__ import annotations

from typing import Iterator, List

import pytest

from pgws_sync import ConfigError, InvalidChannel, Listener, PubSub, Push
from pgws_sync._core.connection import Connection
from pgws_sync.pubsub.channels import Channels, DurableChannels, NotifyChannels

#: Nothing listens there: these endpoints are made and closed, never started.
NOWHERE = "postgresql://nobody@127.0.0.1:9/nothing"


@pytest.fixture
def endpoints() -> Iterator[List[PubSub]]:
    made: List[PubSub] = []
    yield made
    for endpoint in made:
        endpoint.close(timeout=0)


def make(endpoints: List[PubSub], kind: type = PubSub, **options) -> PubSub:
    endpoint = kind(Listener(NOWHERE), **options)
    endpoints.append(endpoint)
    return endpoint


@pytest.mark.parametrize("kind", [PubSub, Push])
def test_the_mode_is_chosen_once_as_one_channels_object(endpoints, kind):
    notify = make(endpoints, kind)
    durable = make(endpoints, kind, durable=True, public=True)
    assert type(notify.channels) is NotifyChannels and not notify.channels.durable
    assert type(durable.channels) is DurableChannels and durable.channels.durable
    assert isinstance(notify.channels, Channels) and isinstance(durable.channels, Channels)
    assert durable.channels.wake_channel in durable.listen_channels
    assert durable.channels.wake_channel not in notify.listen_channels


def test_the_subscription_limit_is_counted_where_the_subscriptions_live(endpoints):
    endpoint = make(endpoints, max_subscriptions=2)
    conn = Connection(["a"])
    endpoint.hub.add(conn)
    for channel in ("one", "two"):
        assert endpoint.channels.too_many(conn, channel) is None
        assert endpoint.subscribe(conn, channel)
    assert endpoint.subscriptions(conn) == ["one", "two"]
    assert endpoint.channels.too_many(conn, "two") is None  # already held
    assert "at most 2 per connection" in str(endpoint.channels.too_many(conn, "three"))
    assert endpoint.unsubscribe(conn, "one") and not endpoint.unsubscribe(conn, "one")
    assert endpoint.channels.too_many(conn, "three") is None


def test_what_one_mode_lacks_is_refused_with_a_config_error(endpoints):
    notify = make(endpoints)
    durable = make(endpoints, durable=True, public=True)
    with pytest.raises(ConfigError, match="needs a durable endpoint"):
        notify.prune()
    with pytest.raises(ConfigError, match="not available on a durable endpoint"):
        durable.publish_batched("c", "k", 1, name="n")
    with pytest.raises(ConfigError, match="not available on a durable endpoint"):
        durable.cancel_batch("c", "k")


@pytest.mark.parametrize("durable", [False, True])
def test_server_side_calls_raise_invalid_channel_for_a_bad_name(endpoints, durable):
    endpoint = make(endpoints, durable=durable, public=durable)
    conn = Connection(["a"])
    endpoint.hub.add(conn)
    for bad in ("", "x" * 201, "tab\there"):
        with pytest.raises(InvalidChannel):
            endpoint.subscribe(conn, bad)
        with pytest.raises(InvalidChannel):
            endpoint.publish(bad, 1)
    with pytest.raises(InvalidChannel):
        make(endpoints).publish_batched("", "k", 1, name="n")
    with pytest.raises(InvalidChannel):
        make(endpoints).cancel_batch("", "k")


def test_durable_options_are_checked_where_they_are_kept(endpoints):
    with pytest.raises(ConfigError, match="retention_seconds"):
        make(endpoints, durable=True, public=True, retention_seconds=0)
    with pytest.raises(ConfigError, match="sequencer_poll"):
        make(endpoints, durable=True, public=True, sequencer_poll=11)
    with pytest.raises(ConfigError, match="override can_subscribe"):
        make(endpoints, durable=True)
