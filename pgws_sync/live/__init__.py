"""Live tables: a table's changes published into the durable log, and pages loaded at a position."""
