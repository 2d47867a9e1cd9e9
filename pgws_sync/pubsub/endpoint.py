"""PubSub: client subscriptions and server-side publishing through PostgreSQL, in every worker."""

from __future__ import annotations

import datetime
import logging
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .._dsn import Dsn
from .. import _metrics
from .._core.connection import APP_JSON, Connection
from .._core.health import Health
from .._core.wire import CloseCode, Frame
from .._formats import (error_frame, json_message, message_frame, new_message_id, utc_now,
                        validate_channel)
from .._listening import ListeningEndpoint, listener_dsn
from ..errors import (
    BatcherStopped,
    ConfigError,
    InvalidChannel,
    InvalidPayload,
    MessageTooLarge,
    PayloadTooLarge,
    ProtocolError,
    PublishFailed,
)
from ..sources import log
from ..sources.base import Notification, Source
from ..sources.notify_pool import DEFAULT_MAX_QUEUE_USAGE
from .batching import Batcher, Finished
from .protocol import BACKPRESSURE_POLICIES, Action, parse_action, reply_frame
from .publication import (
    DEFAULT_PUBSUB_CHANNEL,
    BatchField,
    Publication,
    channel_name,
    format_marker,
    format_publication,
    message_body,
    message_type,
    parse_publication,
    publication_frame,
)
from .publisher import Publisher
from .streams import Reply
from .channels import (SUBSCRIPTION_PREFIX, Channels, DurableChannels, DurableSettings,
                       NotifyChannels, subscription_key)
from .control import (CONTROL_SUFFIX, Control, change_frames, format_control, matches,
                      parse_control, presence_frame)
from ..sources.presence import Answer, PresenceStore, info_value

logger = logging.getLogger(__name__)

__all__ = ["PubSub", "SUBSCRIPTION_PREFIX"]


class PubSub(ListeningEndpoint):
    """Channel pub/sub over WebSockets; every message goes through PostgreSQL.

    Clients send ``{"action": "subscribe" | "unsubscribe" | "publish",
    "channel": ..., "id": ...}`` (see docs/protocol.md); the server publishes
    with :meth:`publish`, :meth:`send_to` and :meth:`publish_batched`. Each
    message is one NOTIFY on ``pubsub_channel``, so it reaches subscribers in
    every worker, and SQL can publish too. Override :meth:`can_subscribe`
    (default: allow) and :meth:`can_publish` (default: refuse).

    :param listener: the source of publications (a :class:`Listener`, or another source).
    :param dsn: database for publishing (default: the listener's).
    :param pubsub_channel: the NOTIFY channel publications travel on.
    :param backpressure: ``"close"`` (a full queue closes with 1013) or ``"drop"`` (a ``gap`` frame).
    :param max_subscriptions: subscriptions per connection.
    :param pool_size: publishing connections per process.
    :param batch_grace: seconds a worker waits past a batch's window for the publishing
        worker to close it, before closing it itself.
    :param timestamps: message frames carry ``"time"``, when they were published (RFC 3339, UTC).
    :param max_queue_usage: refuse to publish (``PublishFailed``, cause ``queue_full``) while
        PostgreSQL's notification queue is fuller than this (0 to 1; None: never).
    :param durable: every channel is a durable stream kept in the database: messages carry
        offsets, clients resume with ``since``, nothing is lost (docs/guides/durable.md).
    :param log_schema: the schema of the durable log (``pgws-sync migrate`` creates it).
    :param retention_seconds: durable messages older than this are pruned.
    :param retention_messages: only this many of a channel's newest durable messages are kept.
    :param prune_interval: seconds between two pruning passes of a worker (None: never; one
        worker at a time prunes).
    :param sequencer_poll: seconds between two looks for newly committed durable messages by
        the elected sequencer (one worker per database).
    :param log_read_dsn: a streaming replica of the database to read the durable log from
        (catch-up, paging, heads); wake-ups, numbering, publishing and pruning stay on the
        primary (docs/scaling-out.md).
    :param log_read_max_wait: seconds a read waits for the replica to replay what the
        primary held when the read began, before reading from the primary instead.
    :param public: a durable endpoint whose every channel anyone may read, history included
        (without it, a durable endpoint needs its own :meth:`can_subscribe`).
    :param max_replay: the most messages one durable resume replays; a ``since`` further
        back gets ``resync_required``.
    :param replay_budget: the most messages one connection may have replayed in all; past
        it, a resume gets ``resync_required``.
    :param control_channel: the NOTIFY channel of :meth:`disconnect`, :meth:`subscribe_matching`
        and :meth:`unsubscribe_matching`, and of presence changes (default:
        ``pubsub_channel`` + ``":control"``).
    :param presence: keep who is subscribed to each channel in the database (every worker
        and host): clients may ask ``{"action": "presence"}`` and subscribers get ``join``
        and ``leave`` frames (docs/guides/presence.md).
    :param presence_timeout: seconds after which the members of a worker that stopped
        beating (killed, its host lost) leave; heartbeats go every third of it.
    :param max_presence_members: the most members a ``presence`` reply lists (its ``count``
        is exact).
    :param presence_events_max: above this many members a channel's subscribers get
        ``presence_count`` frames instead of ``join`` / ``leave``.
    :param presence_grace: seconds the memberships of a socket a drain closed (1012) wait,
        unannounced, for the socket's return to take their place (its ``join`` then names
        the member it ``replaces``); after that they leave.
    :param **options: those of :class:`WebSocketEndpoint`.
    """

    def __init__(
        self,
        listener: Source,
        *,
        dsn: Optional[Dsn] = None,
        pubsub_channel: str = DEFAULT_PUBSUB_CHANNEL,
        backpressure: str = "close",
        max_subscriptions: int = 100,
        pool_size: int = 4,
        batch_grace: float = 1.0,
        timestamps: bool = False,
        max_queue_usage: Optional[float] = DEFAULT_MAX_QUEUE_USAGE,
        durable: bool = False,
        log_schema: str = log.DEFAULT_SCHEMA,
        retention_seconds: float = 86400.0,
        retention_messages: int = 100_000,
        prune_interval: Optional[float] = 30.0,
        sequencer_poll: float = 0.005,
        log_read_dsn: Optional[Dsn] = None,
        log_read_max_wait: float = 2.0,
        public: bool = False,
        max_replay: int = 10_000,
        replay_budget: int = 100_000,
        control_channel: Optional[str] = None,
        presence: bool = False,
        presence_timeout: float = 30.0,
        max_presence_members: int = 1000,
        presence_events_max: int = 100,
        presence_grace: float = 10.0,
        **options: Any,
    ) -> None:
        if backpressure not in BACKPRESSURE_POLICIES:
            raise ConfigError(f"backpressure must be 'close' or 'drop', got {backpressure!r}")
        if max_subscriptions < 1:
            raise ConfigError(f"max_subscriptions must be at least 1, got {max_subscriptions}")
        if not batch_grace >= 0:
            raise ConfigError(f"batch_grace must be zero or more seconds, got {batch_grace!r}")
        self.backpressure = backpressure
        self.max_subscriptions = max_subscriptions
        self.timestamps = timestamps
        self.publisher = Publisher(listener_dsn(listener, dsn, type(self).__name__),
                                   pubsub_channel=pubsub_channel, pool_size=pool_size,
                                   max_queue_usage=max_queue_usage)
        self.pubsub_channel = self.publisher.pubsub_channel
        try:
            self.control_channel = validate_channel(
                self.pubsub_channel + CONTROL_SUFFIX if control_channel is None
                else control_channel)
        except InvalidChannel as exc:
            raise ConfigError(f"control_channel: {exc} (give control_channel=<a shorter "
                              f"name>)") from None
        if self.control_channel == self.pubsub_channel:
            raise ConfigError("control_channel and pubsub_channel must differ")
        if not (presence_timeout >= 1.0 and max_presence_members >= 0
                and presence_events_max >= 0 and presence_grace >= 0):
            raise ConfigError("presence_timeout must be at least 1 second, "
                              "max_presence_members, presence_events_max and presence_grace "
                              "0 or more")
        self.max_presence_members = max_presence_members
        self.presence_events_max = presence_events_max
        #: The presence store of this process (None: presence is off).
        self.presence: Optional[PresenceStore] = (
            PresenceStore(self.publisher.dsn, schema=log_schema, scope=self.control_channel,
                          timeout=presence_timeout, grace=presence_grace)
            if presence else None)
        self.batcher = Batcher(self._send_marker, grace=batch_grace)
        # The one choice of delivery: every method below asks self.channels.
        settings: Optional[DurableSettings] = None
        if durable:
            if not public and not self._decides_subscriptions():
                raise ConfigError(
                    f"a durable {type(self).__name__} replays history to whoever subscribes: "
                    f"override {self.SUBSCRIPTION_HOOK} to say who may read which channel, or "
                    f"pass public=True if anyone may read every channel")
            settings = DurableSettings(
                schema=log_schema, retention_seconds=retention_seconds,
                retention_messages=retention_messages, prune_interval=prune_interval,
                sequencer_poll=sequencer_poll, max_replay=max_replay,
                replay_budget=replay_budget, read_dsn=log_read_dsn,
                read_max_wait=log_read_max_wait)
        super().__init__(listener, [self.pubsub_channel, self.control_channel] + (
            [settings.wake_channel] if settings is not None else []), **options)
        self.channels: Channels = (
            NotifyChannels(self.hub, self.publisher, max_subscriptions=max_subscriptions)
            if settings is None else
            DurableChannels(self.hub, self.publisher, max_subscriptions=max_subscriptions,
                            settings=settings, label=self.label, max_queue=self.max_queue,
                            max_queue_bytes=self.max_queue_bytes, timestamps=timestamps))

    # ---------------------------------------------------- application hooks

    def on_client_message(self, conn: Connection, channel: Optional[str], payload: str,
                          message_id: Any) -> Any:
        """A client's ``{"action": "message", "channel": ..., "payload": ..., "id": ...}``.

        ``payload`` is its JSON text as written ("null" if absent). Return a reply
        (any JSON value) for the sender as a message with ``reply_to``, or None
        for ``{"event": "received"}``; raise :class:`ProtocolError` to answer
        with an error frame. The default refuses every message.
        """
        raise ProtocolError("this endpoint takes no messages (override on_client_message)")

    #: The hook that decides who may subscribe (named in errors).
    SUBSCRIPTION_HOOK = "can_subscribe"

    def can_subscribe(self, conn: Connection, channel: str) -> bool:
        """Whether ``conn`` may subscribe to ``channel`` (default: yes; a durable endpoint
        must override it, or be made with ``public=True``)."""
        return True

    def _decides_subscriptions(self) -> bool:
        """Whether the app decides who may subscribe (it overrides the hook)."""
        return type(self).can_subscribe is not PubSub.can_subscribe

    def can_publish(self, conn: Connection, channel: str) -> bool:
        """Whether ``conn`` may publish to ``channel`` (default: no)."""
        return False

    def presence_info(self, conn: Connection) -> Dict[str, Any]:
        """The public info of ``conn`` as a member of a channel (JSON, at most 1 KiB): what
        ``presence`` replies and ``join`` / ``leave`` frames show beside its id (default
        ``{}``)."""
        return {}

    # ---------------------------------------------------- server-side API

    def publish(self, channel: str, message: Any, *, type: str = "json",
                json_text: bool = False, message_id: Optional[str] = None,
                reply_to: Any = None) -> str:
        """Send ``message`` to every subscriber of ``channel`` in every worker; returns its id.

        ``type``: ``json`` (a Python value, sent as JSON; JSON text as written with
        ``json_text=True``), ``text`` (a str), or ``binary`` (bytes, sent as a binary frame). ``message_id`` (default: a fresh one) is
        the id every recipient sees; ``reply_to`` (a client's message id) comes
        with it. Raises :class:`PayloadTooLarge` for messages whose NOTIFY would
        reach 8000 bytes, :class:`InvalidPayload` or :class:`InvalidChannel` for
        bad input, :class:`PublishFailed` when the database does not take it.
        """
        channel_name(channel)  # the pub/sub rule in both modes (the log's own is looser)
        message_type(type)
        if json_text and type != "json":
            raise InvalidPayload(f"json_text=True is for json messages, not {type!r} ones")
        return self.channels.publish(channel, json_message(message, json_text), type=type,
                                     message_id=message_id, reply_to=reply_to)

    def prune(self) -> Optional[int]:
        """Prune the durable log now (one pass, on this thread): messages deleted, or None
        if another process is pruning it."""
        return self.channels.prune()

    def send_to(self, connection_id: str, message: Any, *, type: str = "json",
                channel: Optional[str] = None, message_id: Optional[str] = None,
                reply_to: Any = None) -> str:
        """Send ``message`` to one connection, in whichever worker it is; returns the id.

        The frame carries ``channel`` if one is given. Nothing happens if no
        such connection exists (any more). ``message_id`` and ``reply_to`` as in
        :meth:`publish`.
        """
        message_type(type)
        return self.publisher.publish(channel, message, type=type, to=connection_id,
                                      message_id=message_id, reply_to=reply_to)

    def publish_batched(self, channel: str, key: str, message: Any, *, name: str,
                        window: float = 0.1, text: bool = False) -> str:
        """Add ``message`` to the batch of ``(channel, key)``: subscribers get everything
        published for it within ``window`` seconds of the first as one message,
        ``{"name": name, "messages": [...]}``, identical messages once; returns the item's id.

        With ``text=True`` messages are strings and the batch is one text message:
        ``name``, a blank line, then one message per line. Every item travels through
        the database at once and every worker batches what it receives the same way,
        so a batch is one message whichever workers or hosts publish into it. On
        shutdown a worker hands its open batches to its own sockets before closing them.
        Raises :class:`InvalidChannel` for a bad channel name.
        """
        channel_name(channel)
        self.channels.refuse_batches("publish_batched")
        if not isinstance(key, str) or not isinstance(name, str):
            raise InvalidPayload("a batch's key and name must be strings")
        if not (isinstance(window, (int, float)) and 0 <= window < float("inf")):
            raise InvalidPayload(f"window must be zero or more seconds, got {window!r}")
        if self.batcher.stopped:
            raise BatcherStopped("the endpoint is closing; nothing more can be batched")
        kind = "text" if text else "json"
        if self.batcher.kind(channel, key) not in (None, kind):
            raise InvalidPayload(f"the open batch for channel {channel!r}, key {key!r} "
                                 f"collects {'JSON' if text else 'text'} messages")
        message_id = new_message_id()
        payload = format_publication(channel, message_body(message, kind), type=kind,
                                     message_id=message_id, time=utc_now(),
                                     batch=BatchField(key, name=name, window=float(window)))
        self.batcher.published(message_id)
        self.publisher.notify(payload)
        return message_id

    def cancel_batch(self, channel: str, key: str) -> bool:
        """Discard the open batch of ``(channel, key)`` in every worker; False if none was
        open in this one. Raises :class:`InvalidChannel` for a bad channel name."""
        channel_name(channel)
        self.channels.refuse_batches("cancel_batch")
        was_open = self.batcher.kind(channel, key) is not None
        self.publisher.notify(format_marker(channel, BatchField(key, cancel=True)))
        return was_open

    def subscribe(self, conn: Connection, channel: str, *,
                  backpressure: Optional[str] = None, reply: Reply = True) -> bool:
        """Subscribe ``conn`` (e.g. from :meth:`on_connect`); False if it is gone.

        ``backpressure`` overrides the endpoint's policy for this channel.
        No hook is asked and no limit applies. On a durable endpoint the socket
        gets a ``subscribed`` frame naming the epoch and offset, unless ``reply``
        is False (or a :class:`~pgws_sync.pubsub.streams.SubscribeAnswer`: its frames
        instead of ``subscribed`` and ``error``). Raises :class:`InvalidChannel` for a bad
        channel name, :class:`LogUnavailable` when the durable log cannot take it now.
        """
        channel_name(channel)
        policy = self._policy(backpressure)
        joined = self.channels.join(conn, channel, policy=policy, reply=reply)
        if joined:
            self._present(conn, channel)
        return joined

    def unsubscribe(self, conn: Connection, channel: str) -> bool:
        """End ``conn``'s subscription to ``channel``; False if it had none."""
        had = self.channels.unsubscribe(conn, channel)
        if self.presence is not None:  # also a durable subscribe not answered yet
            self.presence.leave(channel, conn.id)
        return had

    def subscriptions(self, conn: Connection) -> List[str]:
        """The channels ``conn`` is subscribed to, sorted."""
        return self.channels.subscriptions(conn)

    # ---------------------------------------------------- cluster-wide control

    def disconnect(self, code: int = 4000, reason: str = "", **metadata: Any) -> None:
        """Close, in every worker and host, every socket of this endpoint whose
        ``conn.metadata`` holds all of ``metadata`` (none given: every socket), with ``code``
        (1000 or 3000-4999; 4400-4499 tell pgws.js not to come back) and ``reason``.

        Returns once the control NOTIFY is sent; each worker closes its matching sockets
        when its listener reads it. Raises :class:`InvalidPayload` for a bad code, reason
        or metadata (JSON values only), :class:`PublishFailed` when the database does not
        take it.
        """
        self._control(format_control("disconnect", metadata, code=code, reason=reason,
                                     notify_channel=self.control_channel))

    def subscribe_matching(self, channel: str, **metadata: Any) -> None:
        """Subscribe, in every worker and host, every socket whose ``conn.metadata`` holds all
        of ``metadata`` to ``channel`` (no hook is asked, no limit applies). Each gets
        ``{"event": "subscribed", "channel": ..., "server": true}`` (on a durable endpoint
        the ``subscribed`` frame naming the epoch and offset). Raises as :meth:`disconnect`,
        and :class:`InvalidChannel`."""
        channel_name(channel)
        self._control(format_control("subscribe", metadata, channel=channel,
                                     notify_channel=self.control_channel))

    def unsubscribe_matching(self, channel: str, **metadata: Any) -> None:
        """End, in every worker and host, the subscription to ``channel`` of every socket whose
        ``conn.metadata`` holds all of ``metadata``; each that had one gets
        ``{"event": "unsubscribed", "channel": ..., "server": true}``. Raises as
        :meth:`subscribe_matching`."""
        channel_name(channel)
        self._control(format_control("unsubscribe", metadata, channel=channel,
                                     notify_channel=self.control_channel))

    def _control(self, text: str) -> None:
        self.publisher.notify(text, channel=self.control_channel)

    # ---------------------------------------------------- monitoring

    @property
    def connection_count(self) -> int:
        """Open connections of this endpoint in this process."""
        return len(self.hub)

    def connection_list(self) -> List[Dict[str, Any]]:
        """Each connection of this process: id, audiences, subscriptions, metadata,
        queue depth and frames dropped by channel (``drop`` policy)."""
        return [
            {
                "id": conn.id,
                "audiences": list(conn.audiences),
                "subscriptions": self.subscriptions(conn),
                "metadata": dict(conn.metadata),
                "queue_depth": conn.queue_depth,
                "dropped": dict(conn.dropped),
            }
            for conn in self.hub.connections()
        ]

    # ---------------------------------------------------- endpoint hooks

    def on_message(self, conn: Connection, data: Frame) -> None:
        """Handle one client action; every problem is answered with an error frame."""
        try:
            action = parse_action(data, durable=self.channels.durable)
        except ProtocolError as exc:
            conn.send(error_frame(exc.reason, reply_to=exc.reply_to))
            return
        channel = action.channel
        if action.action == "message":
            self._client_message(conn, action)
        elif channel is None:  # parse_action names a channel for every other action
            conn.send(error_frame("missing field 'channel'", reply_to=action.id))
        elif action.action == "subscribe":
            self._client_subscribe(conn, channel, action)
        elif action.action == "unsubscribe":
            self.unsubscribe(conn, channel)
            conn.send(reply_frame("unsubscribed", channel, action.id))
        elif action.action == "presence":
            self._client_presence(conn, channel, action)
        else:
            self._client_publish(conn, channel, action)

    def close(self, timeout: float = 5.0, *, drain: float = 0.0) -> None:
        """Hand the open batches to this process's sockets, then close every socket (see
        :meth:`WebSocketEndpoint.close`). Other workers close their batches as usual."""
        if not self.closing:
            finished = self.batcher.stop()
            self.hub.fan_out([(SUBSCRIPTION_PREFIX + f.channel, self._batch_frame(f))
                              for f in finished])
            if finished:
                logger.info("handed %d open batches to this worker's sockets before closing "
                            "them", len(finished))
        super().close(timeout, drain=drain)

    def on_closed(self) -> None:
        if self.presence is not None:  # its leaves go out while the listener still reads
            self.presence.stop()
        super().on_closed()
        self.channels.stop()
        self.publisher.close()

    # ---------------------------------------------------- listener sink

    def on_notifications(self, batch: Sequence[Notification]) -> None:
        """Turn each publication into its frame and hand it to its subscribers, in order;
        then act on the control messages."""
        controls = [n for n in batch if n.channel == self.control_channel]
        if controls:
            batch = [n for n in batch if n.channel != self.control_channel]
        self._deliver(batch)
        for note in controls:
            self._act(note)

    def _deliver(self, batch: Sequence[Notification]) -> None:
        pending: List[Tuple[str, Frame]] = []
        for note in self.channels.deliver(batch):
            try:
                pub = parse_publication(note.payload)
            except InvalidPayload as exc:
                logger.warning("dropped a publication on channel %r: %s", note.channel, exc)
                continue
            if pub.batch is not None and pub.channel is not None:
                if not pub.batch.is_marker:
                    self.batcher.item(pub)
                    continue
                finished = self.batcher.marker(pub)
                if finished is not None:
                    pending.append((SUBSCRIPTION_PREFIX + pub.channel, self._batch_frame(finished)))
                continue
            message_id = pub.id or new_message_id()
            frame = publication_frame(pub, message_id, time=self._time(pub.time))
            if pub.time is not None and _metrics.enabled():
                self._observe_lag(pub.time)
            if pub.target is None and pub.channel is not None:
                pending.append((SUBSCRIPTION_PREFIX + pub.channel, frame))
                continue
            self.hub.fan_out(pending)  # whatever came before goes first
            pending = []
            if pub.target is not None:
                self.hub.send_to(pub.target, frame)
        self.hub.fan_out(pending)

    def on_resync(self, reason: str) -> None:
        """Durable channels read what they missed from the log; the others get ``resync``."""
        self.channels.resync(reason, super().on_resync)

    def resync_channels(self, conn: Connection) -> Optional[Sequence[str]]:
        """A resync frame names the socket's own subscriptions."""
        return self.subscriptions(conn)

    def prepare(self) -> None:
        super().prepare()
        self.channels.start()
        if self.presence is not None:
            self.presence.start()

    def health(self) -> Health:
        """The sources' health, and on a durable endpoint the log's: readable and moving.
        Presence's state is the operator's detail only (it fails alone)."""
        health = self.channels.health(super().health())
        if self.presence is None:
            return health
        status = self.presence.status()
        detail = dict(health.detail)
        detail["presence"] = "failing" if status["error"] else "ok"
        if status["error"]:
            detail["presence_error"] = status["error"]
        return health._replace(detail=detail)

    def sample_more(self) -> None:
        self.channels.sample()

    def check_setup(self) -> None:
        """A durable endpoint refuses a log that is missing, of another version, or that this
        role lacks rights on (:class:`LogUnavailable`)."""
        super().check_setup()
        self.channels.check()

    def _forget(self, conn: Connection) -> None:
        super()._forget(conn)
        self.channels.forget(conn)
        if self.presence is not None:
            self.presence.gone(conn.id, drained=conn.close_code == CloseCode.SERVICE_RESTART)

    # ---------------------------------------------------- internals

    def _act(self, note: Notification) -> None:
        """One control message: act on this process's matching sockets (each alone)."""
        try:
            control = parse_control(note.payload)
        except InvalidPayload as exc:
            logger.warning("dropped a control message on channel %r: %s", note.channel, exc)
            return
        if control.op == "presence":
            self._presence_change(control)
            return
        acted = 0
        for conn in self.hub.connections():
            if not matches(conn.metadata, control.match):
                continue
            try:
                acted += self._act_on(conn, control)
            except Exception:  # one socket's failure stays with it
                logger.exception("control %r failed for connection %s", control.op, conn.id)
        logger.info("control %s %s: %d sockets of this worker matched %r", control.op,
                    control.channel or control.code, acted, control.match)

    def _presence_change(self, control: Control) -> None:
        """A presence change: its frames to this process's subscribers of the channel."""
        if self.presence is None:
            return
        self.presence.changed(str(control.channel))
        members = self.hub.members(subscription_key(str(control.channel)))
        if not members:
            return
        for about, frame in change_frames(control, counts_above=self.presence_events_max):
            for conn in members:
                if conn.id != about:
                    conn.send(frame)

    def _act_on(self, conn: Connection, control: Control) -> int:
        if control.op == "disconnect":
            conn.request_close(control.code, control.reason)
            return 1
        channel = str(control.channel)
        if control.op == "unsubscribe":
            if not self.unsubscribe(conn, channel):
                return 0
            conn.send(reply_frame("unsubscribed", channel, None, server=True))
            return 1
        if subscription_key(channel) in self.hub.keys_of(conn):
            return 0
        if self.channels.durable:  # the streams thread sends the subscribed frame
            return int(self.subscribe(conn, channel, reply=True))
        if not self.subscribe(conn, channel, reply=False):
            return 0
        conn.send(reply_frame("subscribed", channel, None, server=True))
        return 1

    def _client_subscribe(self, conn: Connection, channel: str, action: Action) -> None:
        problem = self._subscribe_problem(conn, channel)
        if problem is not None:
            conn.send(error_frame(problem, reply_to=action.id))
            return
        self.channels.request(conn, channel, action, self._policy(action.backpressure))
        self._present(conn, channel)

    def _present(self, conn: Connection, channel: str) -> None:
        """``conn`` is (being) subscribed to ``channel``: it is a member there now."""
        if self.presence is None:
            return
        try:
            info = info_value(self.presence_info(conn))
        except Exception:  # an application hook: log, and the member has no info
            logger.exception("presence_info failed for connection %s", conn.id)
            info = {}
        self.presence.join(channel, conn.id, info)

    def _client_presence(self, conn: Connection, channel: str, action: Action) -> None:
        """``{"action": "presence"}``: answered by the presence thread, never this one."""
        store = self.presence
        if store is None:
            conn.send(error_frame("presence is not enabled on this endpoint",
                                  reply_to=action.id))
            return
        if not self._ask(self.can_subscribe, conn, channel):
            conn.send(error_frame(f"not allowed to see who is in {channel!r}",
                                  reply_to=action.id))
            return

        def answer(found: Optional[Answer]) -> None:
            if found is None:
                conn.send(error_frame("presence unavailable, try again", reply_to=action.id))
                return
            conn.send(presence_frame(channel, action.id, found.total,
                                     [m.frame_value() for m in found.members]))

        store.query(channel, self.max_presence_members, answer)

    def _subscribe_problem(self, conn: Connection, channel: str,
                           verb: str = "subscribe to") -> Optional[str]:
        """Why a client may not subscribe ``conn`` to ``channel`` now, or None if it may."""
        problem = self.channels.too_many(conn, channel)
        if problem is not None:
            return problem
        if not self._ask(self.can_subscribe, conn, channel):
            return f"not allowed to {verb} {channel!r}"
        return None

    def _client_publish(self, conn: Connection, channel: str, action: Action) -> None:
        if not self._ask(self.can_publish, conn, channel):
            conn.send(error_frame(f"not allowed to publish to {channel!r}", reply_to=action.id))
            return
        message_id = new_message_id()
        try:
            self.channels.publish_from_client(channel, action.payload or "null", message_id)
        except MessageTooLarge as exc:
            conn.send(error_frame(f"payload too large: the message is {exc.size} bytes; the "
                                  f"log takes at most {exc.limit}", reply_to=action.id))
            return
        except PayloadTooLarge as exc:
            conn.send(error_frame(
                f"payload too large: the message would be {exc.size} bytes in PostgreSQL, "
                f"which takes less than {exc.limit}", reply_to=action.id))
            return
        except (InvalidPayload, PublishFailed) as exc:
            conn.send(error_frame(str(exc), reply_to=action.id))
            return
        conn.send(reply_frame("published", channel, action.id, id=message_id))

    def _ask(self, hook: Any, conn: Connection, channel: str) -> bool:
        try:
            return bool(hook(conn, channel))
        except Exception:  # an application hook: refuse, log, keep the socket
            logger.exception("%s failed for connection %s, channel %r",
                             getattr(hook, "__name__", "hook"), conn.id, channel)
            return False

    def _client_message(self, conn: Connection, action: Action) -> None:
        try:
            reply = self.on_client_message(conn, action.channel, action.payload or "null",
                                           action.id)
        except ProtocolError as exc:
            conn.send(error_frame(exc.reason, reply_to=action.id))
            return
        except Exception:  # an application hook: log it, answer, keep the socket
            logger.exception("on_client_message failed for connection %s", conn.id)
            conn.send(error_frame("the message could not be handled", reply_to=action.id))
            return
        if reply is None:
            conn.send(reply_frame("received", action.channel, action.id))
            return
        try:
            body = str(message_body(reply))
        except InvalidPayload as exc:
            logger.warning("on_client_message returned a reply that is not JSON: %s", exc)
            conn.send(error_frame("the reply could not be sent", reply_to=action.id))
            return
        extra: Dict[str, Any] = {"reply_to": action.id} if action.id is not None else {}
        if self.timestamps:
            extra["time"] = utc_now()
        conn.send(message_frame(action.channel, body, new_message_id(), extra=extra), kind=APP_JSON)

    def _policy(self, backpressure: Optional[str]) -> str:
        """``backpressure``, else the endpoint's policy; :class:`ConfigError` for another."""
        policy = backpressure or self.backpressure
        if policy not in BACKPRESSURE_POLICIES:
            raise ConfigError(f"backpressure must be 'close' or 'drop', got {policy!r}")
        return policy

    def _send_marker(self, channel: str, marker: BatchField) -> None:
        self.publisher.notify(format_marker(channel, marker))

    def _batch_frame(self, finished: Finished) -> Frame:
        return publication_frame(Publication(finished.channel, finished.type, finished.body),
                                 finished.id, time=self._time(finished.time))

    def _observe_lag(self, published: str) -> None:
        try:
            sent = datetime.datetime.fromisoformat(published.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return
        _metrics.observe("delivery_lag_seconds", max(0.0, time.time() - sent),
                         endpoint=self.label)

    def _time(self, published: Optional[str]) -> Optional[str]:
        """The ``time`` of a frame: when it was published, else now (None without timestamps)."""
        if not self.timestamps:
            return None
        return published or utc_now()
