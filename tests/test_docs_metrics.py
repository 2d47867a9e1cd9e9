"""The metrics table in docs/deployment.md is the library's own list."""

import re

from pgws_sync._metrics import DEFINITIONS

from .helpers import ROOT


def test_every_metric_is_documented_once_and_nothing_else():
    text = (ROOT / "docs" / "deployment.md").read_text()
    documented = re.findall(r"^\| `(pgws_sync_\w+)` \|", text, re.M)
    exported = [f"pgws_sync_{name}" + ("_total" if kind == "counter" else "")
                for kind, name, _, _, _ in DEFINITIONS]
    assert documented == exported
