"""Where a PubSub's subscriptions live: NOTIFY channels or durable ones, behind one interface.

An endpoint holds one :class:`Channels` object, chosen once when it is made
(:func:`choose_channels`), as broadcaster holds one backend: :class:`NotifyChannels`
(every message one NOTIFY, subscriptions in the hub) or :class:`DurableChannels`
(messages kept in the log, subscriptions owned by the streams thread). Both answer
the same few methods; each counts the subscription limit where its subscriptions live.
"""

from __future__ import annotations

import abc
import logging
from typing import Any, Callable, Dict, List, Optional, Sequence

import psycopg2

from .._core.connection import Connection
from .._core.health import LOG_STALLED, LOG_UNAVAILABLE, Health
from .._core.hub import Hub
from .._core.wire import Frame
from .._formats import Raw, error_frame, format_time, loads, new_message_id
from .._dsn import Dsn, libpq_dsn
from ..errors import ConfigError, LogUnavailable, first_line
from ..sources import log
from ..sources.base import Notification
from ..sources.log import Row
from .protocol import Action, reply_frame
from .publication import format_publication, message_type
from .publisher import Publisher
from .streams import Reply, Streams

logger = logging.getLogger(__name__)

#: Hub keys of subscriptions start with this, apart from audiences.
SUBSCRIPTION_PREFIX = "sub:"


def subscription_key(channel: str) -> str:
    """The hub key of ``channel``'s subscribers."""
    return SUBSCRIPTION_PREFIX + channel


class Channels(abc.ABC):
    """The delivery side of one endpoint: subscriptions, publishing, and what health reads.

    :param hub: the endpoint's hub (subscribers are joined there as :func:`subscription_key`).
    :param publisher: the endpoint's publisher.
    :param max_subscriptions: subscriptions a client may ask for per connection.
    """

    #: Whether messages are kept in the log (clients resume with ``since``).
    durable = False

    def __init__(self, hub: Hub, publisher: Publisher, *, max_subscriptions: int) -> None:
        self.hub = hub
        self.publisher = publisher
        self.max_subscriptions = max_subscriptions

    def subscriptions(self, conn: Connection) -> List[str]:
        """The channels ``conn`` is subscribed to, sorted."""
        n = len(SUBSCRIPTION_PREFIX)
        return sorted(k[n:] for k in self.hub.keys_of(conn) if k.startswith(SUBSCRIPTION_PREFIX))

    def too_many(self, conn: Connection, channel: str) -> Optional[str]:
        """Why a client may not add ``channel`` to ``conn``'s subscriptions, or None."""
        held = self._counted(conn)
        if channel not in held and len(held) >= self.max_subscriptions:
            return f"too many subscriptions: at most {self.max_subscriptions} per connection"
        return None

    @abc.abstractmethod
    def _counted(self, conn: Connection) -> Sequence[str]:
        """The channels the limit counts for ``conn``."""

    @abc.abstractmethod
    def join(self, conn: Connection, channel: str, *, policy: str, reply: Reply) -> bool:
        """Subscribe ``conn`` from the server (no hook, no limit); False if it is gone.
        Raises :class:`LogUnavailable` when a durable log cannot take it now."""

    @abc.abstractmethod
    def request(self, conn: Connection, channel: str, action: Action, policy: str) -> None:
        """A client's subscribe, allowed already: subscribe and answer it (or answer why not)."""

    @abc.abstractmethod
    def unsubscribe(self, conn: Connection, channel: str) -> bool:
        """End ``conn``'s subscription to ``channel``; False if it had none."""

    @abc.abstractmethod
    def publish(self, channel: str, message: Any, *, type: str, message_id: Optional[str],
                reply_to: Any) -> str:
        """Send a checked ``message`` to ``channel``'s subscribers in every worker; its id."""

    @abc.abstractmethod
    def publish_from_client(self, channel: str, payload: str, message_id: str) -> None:
        """Send a client's ``publish`` (its payload's JSON text as written)."""

    def deliver(self, batch: Sequence[Notification]) -> Sequence[Notification]:
        """Take what is this object's from the listener's ``batch``; the rest is publications."""
        return batch

    def resync(self, reason: str, tell_clients: Callable[[str], None]) -> None:
        """The listener reconnected: messages may have been missed."""
        tell_clients(reason)

    def forget(self, conn: Connection) -> None:
        """``conn`` is over."""

    def health(self, health: Health) -> Health:
        """``health`` (the sources'), with what this delivery adds."""
        return health

    def refuse_batches(self, what: str) -> None:
        """Raise :class:`ConfigError` if ``what`` (a batching method) is not available here."""

    def prune(self) -> Optional[int]:
        """One pruning pass of the durable log (see :meth:`PubSub.prune`)."""
        raise ConfigError("prune() needs a durable endpoint (durable=True)")

    def start(self) -> None:
        """Start this process's threads, if any."""

    def stop(self) -> None:
        """Stop them."""

    def check(self) -> None:
        """Refuse a setup that cannot work (before a server starts)."""

    def sample(self) -> None:
        """Record database-side figures (metrics)."""


class NotifyChannels(Channels):
    """Every message one NOTIFY on the pub/sub channel; subscriptions are the hub's keys."""

    def _counted(self, conn: Connection) -> Sequence[str]:
        return self.subscriptions(conn)

    def join(self, conn: Connection, channel: str, *, policy: str, reply: Reply) -> bool:
        return self.hub.join(conn, subscription_key(channel),
                             drop_as=channel if policy == "drop" else None)

    def request(self, conn: Connection, channel: str, action: Action, policy: str) -> None:
        self.join(conn, channel, policy=policy, reply=False)
        conn.send(reply_frame("subscribed", channel, action.id))

    def unsubscribe(self, conn: Connection, channel: str) -> bool:
        return self.hub.leave(conn, subscription_key(channel))

    def publish(self, channel: str, message: Any, *, type: str, message_id: Optional[str],
                reply_to: Any) -> str:
        return self.publisher.publish(channel, message, type=type, message_id=message_id,
                                      reply_to=reply_to)

    def publish_from_client(self, channel: str, payload: str, message_id: str) -> None:
        self.publisher.notify(format_publication(channel, payload, message_id=message_id))


class DurableSettings:
    """The options of a durable endpoint, checked (:class:`ConfigError`) when made."""

    def __init__(self, *, schema: str, retention_seconds: float, retention_messages: int,
                 prune_interval: Optional[float], sequencer_poll: float, max_replay: int,
                 replay_budget: int, read_dsn: Optional[Dsn] = None,
                 read_max_wait: float = 2.0) -> None:
        if not (retention_seconds > 0 and retention_messages >= 1):
            raise ConfigError("retention_seconds must be above 0 and retention_messages at "
                              "least 1")
        if max_replay < 1 or replay_budget < 1:
            raise ConfigError("max_replay and replay_budget must be at least 1 message")
        if not 0 < sequencer_poll <= 10:
            raise ConfigError(f"sequencer_poll must be above 0 and at most 10 seconds, got "
                              f"{sequencer_poll!r}")
        if prune_interval is not None and not prune_interval > 0:
            raise ConfigError(f"prune_interval must be above 0 seconds (or None), got "
                              f"{prune_interval!r}")
        if not 0 < read_max_wait <= 60:
            raise ConfigError(f"log_read_max_wait must be above 0 and at most 60 seconds, got "
                              f"{read_max_wait!r}")
        #: The streaming replica the log is read from (None: the primary).
        self.read_dsn: Optional[str] = None
        if read_dsn is not None:
            self.read_dsn = libpq_dsn(read_dsn)
            try:
                psycopg2.extensions.parse_dsn(self.read_dsn)
            except psycopg2.Error as exc:
                raise ConfigError(f"log_read_dsn is not a connection string or URI: "
                                  f"{first_line(exc)}") from None
        self.read_max_wait = read_max_wait
        self.schema = schema
        self.retention_seconds = retention_seconds
        self.retention_messages = retention_messages
        self.prune_interval = prune_interval
        self.sequencer_poll = sequencer_poll
        self.max_replay = max_replay
        self.replay_budget = replay_budget
        #: The NOTIFY channel the sequencer wakes readers on.
        self.wake_channel = log.wake_channel_for(schema)


class DurableChannels(Channels):
    """Every channel a durable stream in the log; the streams thread owns the subscriptions.

    A subscription is counted when the client asks (:meth:`Streams.claimed`), so the
    limit holds for a burst of requests the streams thread has not answered yet.

    :param hub: the endpoint's hub.
    :param publisher: the endpoint's publisher.
    :param max_subscriptions: subscriptions a client may ask for per connection.
    :param settings: the log's options.
    :param label: the ``endpoint`` label of the metrics.
    :param max_queue: the sockets' queue bound in frames.
    :param max_queue_bytes: the same in bytes.
    :param timestamps: message frames carry ``"time"``.
    """

    durable = True

    def __init__(self, hub: Hub, publisher: Publisher, *, max_subscriptions: int,
                 settings: DurableSettings, label: str, max_queue: int, max_queue_bytes: int,
                 timestamps: bool) -> None:
        super().__init__(hub, publisher, max_subscriptions=max_subscriptions)
        self.wake_channel = settings.wake_channel
        self.timestamps = timestamps
        self.streams = Streams(
            publisher.dsn, schema=settings.schema, hub=hub, key=subscription_key,
            make_frame=self.frame, label=label, retention_seconds=settings.retention_seconds,
            retention_messages=settings.retention_messages,
            prune_every=settings.prune_interval, max_queue=max_queue,
            max_queue_bytes=max_queue_bytes, sequencer_poll=settings.sequencer_poll,
            max_replay=settings.max_replay, replay_budget=settings.replay_budget,
            read_dsn=settings.read_dsn, read_max_wait=settings.read_max_wait)

    def _counted(self, conn: Connection) -> Sequence[str]:
        return sorted(self.streams.claimed(conn))

    def join(self, conn: Connection, channel: str, *, policy: str, reply: Reply) -> bool:
        if self.hub.get(conn.id) is None:  # live from the channel's head; the reply says which
            return False
        refused = self.streams.subscribe(conn, channel, reply=reply)
        if refused is not None:
            raise LogUnavailable(refused)
        return True

    def request(self, conn: Connection, channel: str, action: Action, policy: str) -> None:
        # the streams thread replies; the limit is counted again where the claim is taken
        refused = self.streams.subscribe(conn, channel, since=action.since, epoch=action.epoch,
                                         reply_to=action.id, limit=self.max_subscriptions)
        if refused is not None:
            conn.send(error_frame(refused, reply_to=action.id))

    def unsubscribe(self, conn: Connection, channel: str) -> bool:
        had = subscription_key(channel) in self.hub.keys_of(conn)
        self.streams.unsubscribe(conn, channel)
        return had

    def publish(self, channel: str, message: Any, *, type: str, message_id: Optional[str],
                reply_to: Any) -> str:
        message_id = message_id or new_message_id()
        self._append(channel, message, type=type, message_id=message_id, reply_to=reply_to)
        return message_id

    def publish_from_client(self, channel: str, payload: str, message_id: str) -> None:
        self._append(channel, Raw(payload), type="json", message_id=message_id, reply_to=None)

    def _append(self, channel: str, message: Any, *, type: str, message_id: str,
                reply_to: Any) -> int:
        args = log.publish_args(channel, message, type=type, message_id=message_id,
                                reply_to=reply_to, max_payload=self.streams.max_payload)
        return self.publisher.append(self.streams.schema, args)

    def deliver(self, batch: Sequence[Notification]) -> Sequence[Notification]:
        woken = [n.payload for n in batch if n.channel == self.wake_channel]
        if not woken:
            return batch
        self.streams.wake(woken)
        return [n for n in batch if n.channel != self.wake_channel]

    def resync(self, reason: str, tell_clients: Callable[[str], None]) -> None:
        """Durable channels read what they missed from the log; nobody needs ``resync``."""
        self.streams.wake_all()

    def forget(self, conn: Connection) -> None:
        self.streams.forget(conn)

    def health(self, health: Health) -> Health:
        """The log's health too: readable and moving."""
        status = self.streams.status()
        detail = dict(health.detail)
        detail["log"] = ("stalled" if status["stalled"] else
                         "connected" if status["connected"] else "disconnected")
        if status["error"]:
            detail["log_error"] = status["error"]
        reason = health.reason
        if reason is None and not status["connected"]:
            reason = LOG_UNAVAILABLE
        elif reason is None and status["stalled"]:
            reason = LOG_STALLED
        return Health(reason is None, reason, detail)

    def refuse_batches(self, what: str) -> None:
        raise ConfigError(f"{what}() is not available on a durable endpoint: batches travel "
                          f"as NOTIFYs and are not kept in the log")

    def prune(self) -> Optional[int]:
        return self.streams.prune()

    def start(self) -> None:
        self.streams.start()

    def stop(self) -> None:
        self.streams.stop()

    def check(self) -> None:
        """Refuse a log that is missing, of another version, or that this role lacks rights
        on (:class:`LogUnavailable`)."""
        self.streams.check()

    def sample(self) -> None:
        self.streams.sample()

    def frame(self, row: Row, epoch: str) -> Frame:
        """The frame of a durable message: ``offset`` and ``epoch`` after its id."""
        extra: Dict[str, Any] = {"offset": row.offset, "epoch": epoch}
        if row.reply_to is not None:
            extra["reply_to"] = loads(row.reply_to)
        if self.timestamps:
            extra["time"] = format_time(row.published)
        return message_type(row.type).frame(row.channel, row.payload, row.id, extra)
