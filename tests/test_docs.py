"""The files a newcomer reads first: a short README whose links work, the licence, a released
CHANGELOG, and package metadata that says what it is."""

import configparser
import re

from pgws_sync import __version__

from .helpers import ROOT


def test_the_readme_is_short_and_its_links_lead_somewhere():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 90
    assert "../shared" not in text and "anchor" not in text
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), target


def test_licence_changelog_and_metadata():
    assert "MIT License" in (ROOT / "LICENSE").read_text()
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert changelog.index("## Unreleased") < changelog.index(f"## {__version__} (")
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    meta = cfg["metadata"]
    assert meta["license"] == "MIT" and meta["license_files"] == "LICENSE"
    assert meta["author"] and meta["description"] and "Typing :: Typed" in meta["classifiers"]


def test_each_guide_s_first_snippet_is_a_complete_app(monkeypatch):
    """The first Python block of the product guides and use cases runs as written: imports,
    app and all (it builds the endpoint; nothing connects until a request)."""
    monkeypatch.setenv("SECRET_KEY", "s" * 32)
    for page in ("guides/pubsub.md", "guides/durable.md", "guides/push.md", "guides/presence.md",
                 "use-cases/live-rows.md", "use-cases/public-feed.md", "guides/live-tables.md"):
        text = (ROOT / "docs" / page).read_text()
        code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
        namespace = {"__name__": "snippet_" + page[:-3].replace("/", "_").replace("-", "_")}
        exec(compile(code, page, "exec"), namespace)
        assert "app" in namespace and namespace["app"].url_map, page
