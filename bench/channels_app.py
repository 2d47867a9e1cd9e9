"""The app ``python -m bench.fanout --mode pubsub|durable`` serves: a PubSub endpoint on /ws
that subscribes every socket to the channel ``bench`` as it connects (durable with
BENCH_MODE=durable, its log in the schema BENCH_LOG_SCHEMA, default pgws_sync). With
BENCH_CHANNELS=K above 1, every socket is subscribed to ``bench0`` ... ``bench<K-1>``. With
BENCH_LOG_READ_DSN, the durable log is read from that streaming replica."""

import os

from flask import Flask

from pgws_sync import Listener, PubSub


COUNT = int(os.environ.get("BENCH_CHANNELS", "1"))
CHANNELS = ["bench"] if COUNT == 1 else [f"bench{i}" for i in range(COUNT)]


class AutoSubscribe(PubSub):
    def on_connect(self, conn, request):
        for channel in CHANNELS:
            self.subscribe(conn, channel)


app = Flask(__name__)
listener = Listener(os.environ.get("PGWS_DB_URI", ""))
endpoint = AutoSubscribe(listener, durable=os.environ.get("BENCH_MODE") == "durable", public=True,
                         log_schema=os.environ.get("BENCH_LOG_SCHEMA", "pgws_sync"),
                         log_read_dsn=os.environ.get("BENCH_LOG_READ_DSN") or None)
endpoint.init_app(app, "/ws")
