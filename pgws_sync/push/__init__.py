"""websocket-push on pgws_sync: users, rooms and tab windows fed by backend messages."""
