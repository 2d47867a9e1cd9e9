"""wsnotify on pgws_sync: channel subscriptions, publishing through PostgreSQL, batching."""
