"""One connection: its frame-bounded queue, its ids, its guarded socket and its writer."""

import os
import queue
import socket
import threading
import uuid

import pytest

from pgws_sync import Connection
from pgws_sync._core.connection import Delivery, FrameQueue, GuardedSocket
from pgws_sync._core.ids import uuid4_string

from ..helpers import wait_for


def test_connection_ids_are_random_uuid4_strings_and_unique_across_threads():
    ids = []
    lock = threading.Lock()

    def make(n):
        mine = [Connection(["a"]).id for _ in range(n)]
        with lock:
            ids.extend(mine)

    threads = [threading.Thread(target=make, args=(500,)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == len(ids) == 4000
    for text in ids[:200]:
        parsed = uuid.UUID(text)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122 and str(parsed) == text


def test_ids_are_formatted_exactly_as_the_uuid_module_does():
    data = os.urandom(16 * 256) + bytes(16) + b"\xff" * 16
    for start in range(0, len(data), 16):
        assert uuid4_string(data, start) == str(uuid.UUID(bytes=data[start:start + 16], version=4))


def test_a_frame_queue_has_every_attribute_of_a_queue():
    """FrameQueue sets Queue's attributes itself (one condition instead of three):
    a Python that adds one to queue.Queue.__init__ fails here, not in production."""
    frames = FrameQueue(4)
    assert set(vars(queue.Queue(4))) <= set(vars(frames))
    got = []
    waiter = threading.Thread(target=lambda: got.append(frames.get(timeout=10)))
    waiter.start()
    frames.put_nowait("x")  # wakes the waiting get
    waiter.join(10)
    frames.task_done()
    assert got == ["x"] and frames.unfinished_tasks == 0 and frames.qsize() == 0


def test_a_frame_queue_wakes_its_waiting_writer_times_out_and_keeps_order():
    """The one-waiter condition: a get that is already waiting is woken by a put; a get
    with nothing to take times out with queue.Empty; items come out in order."""
    frames = FrameQueue(4)
    with pytest.raises(queue.Empty):
        frames.get(timeout=0.01)
    assert frames.not_empty._waiter is None  # a timed-out wait leaves nothing behind
    got = []
    waiter = threading.Thread(target=lambda: got.extend(frames.get(timeout=30) for _ in range(3)))
    waiter.start()
    wait_for(lambda: frames.not_empty._waiter is not None, message="the get waiting")
    for item in ("a", "b", "c"):
        frames.put_nowait(item)
    waiter.join(10)
    assert got == ["a", "b", "c"] and frames.qsize() == 0


def test_a_forked_child_draws_ids_of_its_own():
    Connection(["a"])  # the parent now holds unused random bytes
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next ids and leave at once
        os.write(write, " ".join(Connection(["a"]).id for _ in range(3)).encode())
        os._exit(0)
    os.close(write)
    child_ids = os.read(read, 4096).decode().split()
    os.close(read)
    os.waitpid(pid, 0)
    parent_ids = [Connection(["a"]).id for _ in range(3)]
    assert len(child_ids) == 3 and not set(child_ids) & set(parent_ids)


# ------------------------------------------------------------ latch, delivery


def test_deliveries_encode_once_and_join_in_order():
    text, binary = Delivery.of("h\u00e9"), Delivery.of(b"\x00\x01")
    assert text.texts == ("h\u00e9",) and text.wire == b"\x81\x03h\xc3\xa9"
    assert binary.texts == (b"\x00\x01",) and binary.wire == b"\x82\x02\x00\x01"
    both = Delivery.join([text, binary])
    assert both.texts == ("h\u00e9", b"\x00\x01") and both.wire == text.wire + binary.wire
    assert Delivery.join([text]) is text


# ------------------------------------------------------------ the guarded socket


@pytest.fixture
def pair():
    server, client = socket.socketpair()
    yield server, client
    server.close()
    client.close()


def test_a_guarded_socket_writes_everything_even_when_the_peer_reads_slowly(pair):
    server, client = pair
    guarded = GuardedSocket(server, write_timeout=10.0, on_close=lambda: None)
    data = bytes(range(256)) * 16384  # 4 MiB: far more than a socket buffer takes at once
    received = bytearray()

    def read():
        while len(received) < len(data):
            chunk = client.recv(65536)
            if not chunk:
                return
            received.extend(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    guarded.sendall(data)
    reader.join(10)
    assert bytes(received) == data


def test_a_write_blocked_past_its_deadline_fails_and_abort_ends_traffic(pair):
    server, client = pair
    closed = []
    guarded = GuardedSocket(server, write_timeout=0.2, on_close=lambda: closed.append(True))
    with pytest.raises(TimeoutError, match="write blocked"):
        guarded.sendall(b"x" * (64 << 20))  # nobody reads
    guarded.close()  # what simple-websocket calls when its reader ends
    assert closed == [True]
    with pytest.raises(ConnectionAbortedError):
        guarded.send_nowait(b"late")
    client.settimeout(5)
    while client.recv(1 << 20):  # the peer sees the end of the stream
        pass


def test_an_idle_socket_is_written_directly_and_a_busy_one_queues(pair):
    server, client = pair
    conn = Connection(["a"], max_queue=4)
    guarded = GuardedSocket(server, write_timeout=5.0, on_close=conn.wake)
    conn.attach(None, guarded)
    assert conn.deliver(Delivery.of("now"))
    client.settimeout(5)
    assert client.recv(100) == b"\x81\x03now" and conn.queue_depth == 0  # no writer needed
    with guarded.lock:  # another writer holds the socket: the frame waits for the writer
        holder = threading.Thread(target=lambda: conn.deliver(Delivery.of("later")))
        holder.start()
        holder.join(5)
    assert conn.queue_depth == 1
