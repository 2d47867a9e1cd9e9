"""The sequencer's pacing (a quiet log is looked at every poll, a busy one in larger batches)
and its wake-ups (each names a channel, its new head and the WAL position)."""

from __future__ import annotations

import psycopg2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgws_sync import publish_durable
from pgws_sync.sources.log import WakeTarget, lsn, wake_channel_for, wake_target
from pgws_sync.sources.sequencer import FILL, MAX_STRETCH, Sequencer, pause

from ..durable_helpers import new_log, number_all, one, publish_many
from ..helpers import wait_for


@pytest.mark.parametrize("numbered, stretch", [
    (0, 1.0), (1, 1.0), (FILL, 1.0), (2 * FILL, 2.0), (3 * FILL, 3.0), (1000, MAX_STRETCH)])
def test_the_wait_grows_with_what_a_call_numbered_up_to_the_cap(numbered, stretch):
    assert pause(0.005, numbered) == pytest.approx(0.005 * stretch)


@given(channel=st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1,
                       max_size=200), head=st.integers(0, 2**62), wal=st.integers(0, 2**64 - 1))
def test_a_wake_up_gives_back_its_channel_head_and_wal_position(channel, head, wal):
    payload = f"{channel}\t{head}\t{wal >> 32:X}/{wal & 0xFFFFFFFF:X}"
    assert wake_target(payload) == WakeTarget(channel, head, wal)
    assert wake_target(channel) == WakeTarget(channel, None, None)  # an earlier build's


@given(payload=st.text() | st.from_regex(r"[^\t]{0,5}\t-?[0-9]{0,25}\t[0-9A-Fa-f/x-]{0,20}",
                                          fullmatch=True))
def test_any_payload_on_the_wake_up_channel_parses_to_a_head_a_log_can_hold(payload):
    # anyone connected may NOTIFY there: a forged payload must neither raise nor name a
    # head the log's bigint cannot hold (the replica's check would fail on it)
    target = wake_target(payload)
    assert target.head is None or 0 <= target.head < 2**63
    assert target.head is not None or target.channel == payload


def test_the_sequencer_s_wake_ups_name_each_channel_s_new_head(pg_dsn):
    schema = new_log(pg_dsn)
    listening = psycopg2.connect(pg_dsn)
    listening.autocommit = True
    try:
        with listening.cursor() as cur:
            cur.execute(f'LISTEN "{wake_channel_for(schema)}"')
            cur.execute("SELECT pg_current_wal_insert_lsn()")
            before = lsn(cur.fetchone()[0])
        publish_many(pg_dsn, schema, [("a b", 1), ("x", 2), ("a b", 3)], numbered=False)
        number_all(pg_dsn, schema)
        wait_for(lambda: listening.poll() or len(listening.notifies) >= 2, 10, "two wake-ups")
        woken = sorted(wake_target(n.payload) for n in listening.notifies)
        assert [(w.channel, w.head) for w in woken] == [("a b", 2), ("x", 1)]
        assert all(w.wal is not None and w.wal > before for w in woken)
    finally:
        listening.close()


def test_a_quiet_sequencer_still_numbers_a_gap_that_commits_late(pg_dsn):
    # after a call that numbered nothing the sequencer only looks (has_work): a gap, a
    # message below numbered_upto whose transaction commits late, must still count
    schema = new_log(pg_dsn)
    sequencer = Sequencer(pg_dsn, schema=schema, poll_interval=0.005)
    late = psycopg2.connect(pg_dsn)
    try:
        publish_durable(late, "g", {"n": "late"}, schema=schema)  # seq 1, not committed
        publish_many(pg_dsn, schema, [("g", "early")], numbered=False)  # seq 2, committed
        sequencer.start()
        wait_for(lambda: one(pg_dsn, f"SELECT numbered_upto FROM {schema}.meta") == 2
                 and sequencer._quiet, 20, "seq 2 numbered and the sequencer quiet")
        assert one(pg_dsn, f"SELECT count(*) FROM {schema}.gaps") == 1
        late.commit()
        wait_for(lambda: one(pg_dsn, f"SELECT count(*) FROM {schema}.offsets") == 2,
                 20, "the late message numbered")
        assert one(pg_dsn, f"SELECT count(*) FROM {schema}.gaps") == 0
    finally:
        sequencer.stop()
        late.close()

