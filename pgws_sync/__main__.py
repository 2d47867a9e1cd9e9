"""``python -m pgws_sync``: the pgws-sync command."""

from .cli import main

raise SystemExit(main())
