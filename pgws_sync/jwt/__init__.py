"""postgres-websockets on pgws_sync: JWT-authorised channels to and from the database."""
