"""pgws_sync's own fan-out benchmark: N WebSocket clients, M notifications, figures in a table."""
