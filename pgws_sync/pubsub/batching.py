"""Batching: messages for one (channel, key) within a time window leave as one message."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from ..errors import BatcherStopped, InvalidPayload

logger = logging.getLogger(__name__)

#: ``publish(channel, message, type)``: how a finished batch is sent (``type`` json or text).
PublishFn = Callable[[str, Any, str], Any]


class _Batch:
    __slots__ = ("name", "text", "deadline", "messages", "seen")

    def __init__(self, name: str, text: bool, deadline: float) -> None:
        self.name = name
        self.text = text
        self.deadline = deadline
        self.messages: List[Any] = []
        self.seen: Set[Any] = set()

    def message(self) -> Any:
        if self.text:
            return "\n".join([self.name, *self.messages])
        return {"name": self.name, "messages": self.messages}


class Batcher:
    """Collects messages per ``(channel, key)`` and publishes each batch once its window ends.

    The first message for a ``(channel, key)`` opens a batch that closes
    ``window`` seconds later; everything added meanwhile joins it, identical
    messages once. A closed batch is published with ``publish(channel,
    message, type)`` as ``{"name": name, "messages": [...]}`` (type ``json``)
    or, for text batches, as the lines ``name``, then each message, joined
    with ``\\n`` (type ``text``). Publishing happens on a named daemon thread
    (started on first use in each process), never under the lock.
    """

    def __init__(self, publish: PublishFn, *, thread_name: str = "pgws-batcher") -> None:
        self._publish = publish
        self._thread_name = thread_name
        self._lock = threading.Lock()  # guards _batches, _stopped, _thread, _pid
        self._wakeup = threading.Condition(self._lock)
        self._batches: Dict[Tuple[str, str], _Batch] = {}
        self._stopped = False
        self._thread: Optional[threading.Thread] = None
        self._pid: Optional[int] = None

    # ------------------------------------------------------------ public

    def add(self, channel: str, key: str, message: Any, *, name: str, window: float = 0.1,
            text: bool = False) -> None:
        """Add ``message`` to the batch of ``(channel, key)``, opening one if needed.

        ``window`` (seconds) and ``name`` count for the message that opens a
        batch. With ``text=True`` the message must be a ``str`` (one line of
        the text batch). Raises :class:`InvalidPayload` for a message that
        cannot be sent, :class:`BatcherStopped` after :meth:`stop`.
        """
        if not isinstance(name, str):
            raise InvalidPayload(f"a batch name must be a str, not {type(name).__name__}")
        if not window >= 0:
            raise InvalidPayload(f"window must be zero or more seconds, got {window!r}")
        if text:
            if not isinstance(message, str):
                raise InvalidPayload(f"a text batch takes str messages, not {type(message).__name__}")
            identity: Any = message
        else:
            try:
                identity = json.dumps(message, sort_keys=True, separators=(",", ":"),
                                      allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise InvalidPayload(f"the message cannot be sent as JSON: {exc}") from None
        with self._lock:
            if self._stopped:
                raise BatcherStopped("the batcher is stopped; nothing more can be batched")
            self._ensure_thread()
            batch = self._batches.get((channel, key))
            if batch is None:
                batch = _Batch(name, text, time.monotonic() + window)
                self._batches[(channel, key)] = batch
                self._wakeup.notify()
            elif batch.text != text:
                kind = "text" if batch.text else "JSON"
                raise InvalidPayload(
                    f"the open batch for channel {channel!r}, key {key!r} collects {kind} messages"
                )
            if identity not in batch.seen:
                batch.seen.add(identity)
                batch.messages.append(message)

    def cancel(self, channel: str, key: str) -> bool:
        """Discard the open batch of ``(channel, key)``; False if there was none."""
        with self._lock:
            return self._batches.pop((channel, key), None) is not None

    def pending(self) -> int:
        """How many batches are open."""
        with self._lock:
            return len(self._batches)

    def flush(self) -> int:
        """Publish every open batch now, on the calling thread; returns how many."""
        with self._lock:
            due = sorted(self._batches.items(), key=lambda kv: kv[1].deadline)
            self._batches.clear()
        self._send(due)
        return len(due)

    def stop(self, *, flush: bool = True, timeout: float = 5.0) -> int:
        """Stop the thread; publish (``flush=True``) or discard what is open. Returns how many
        batches were published. Later :meth:`add` calls raise :class:`BatcherStopped`."""
        with self._lock:
            self._stopped = True
            self._wakeup.notify_all()
            thread = self._thread if self._pid == os.getpid() else None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                logger.warning("batcher thread %s did not stop within %.1fs", thread.name, timeout)
        if flush:
            return self.flush()
        with self._lock:
            self._batches.clear()
        return 0

    # --------------------------------------------------------- internals

    def _ensure_thread(self) -> None:
        """Start the timer thread in this process (called with the lock held)."""
        pid = os.getpid()
        if self._pid == pid:
            return
        self._pid = pid
        self._thread = threading.Thread(target=self._run, name=f"{self._thread_name}-{pid}",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            with self._lock:
                while True:
                    if self._stopped:
                        return
                    now = time.monotonic()
                    due = [(k, b) for k, b in self._batches.items() if b.deadline <= now]
                    if due:
                        for k, _ in due:
                            del self._batches[k]
                        break
                    soonest = min((b.deadline for b in self._batches.values()), default=now + 1.0)
                    self._wakeup.wait(min(1.0, max(0.001, soonest - now)))
            due.sort(key=lambda kv: kv[1].deadline)
            self._send(due)

    def _send(self, due: List[Tuple[Tuple[str, str], _Batch]]) -> None:
        for (channel, key), batch in due:
            try:
                self._publish(channel, batch.message(), "text" if batch.text else "json")
            except Exception as exc:  # one failed batch must not stop the others
                logger.warning("could not publish the batch for channel %r, key %r: %s",
                               channel, key, exc)
