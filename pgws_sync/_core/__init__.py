"""The core every product stands on: the wire, connections, the shared reader, the hub, the endpoint."""
