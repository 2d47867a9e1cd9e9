"""pgws.js in Node (``node --test tests/js/pgws.test.js``): each defect of issue 26 through a fake WebSocket,
the ES module build, and the classic script loaded with ``require()``."""

from __future__ import annotations

import json
import re
import subprocess

import pgws_sync
from pgws_sync._core.assets import client_esm, client_js, esm_build

from . import programs
from .helpers import ROOT

JS_TESTS = ROOT / "tests" / "js"


def run_node(*args: str) -> subprocess.CompletedProcess:  # type: ignore[type-arg]
    node = programs.require("node", "PGWS_NODE")
    return subprocess.run([node, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_pgws_js_in_node_through_a_fake_websocket() -> None:
    done = run_node("--test", str(JS_TESTS / "pgws.test.js"))
    summary = dict(re.findall(r"^# (pass|fail|cancelled) (\d+)$", done.stdout, re.M))
    assert done.returncode == 0 and summary.get("fail") == "0", done.stdout[-4000:] + done.stderr
    print(f"\nnode --test: {summary}")
    assert int(summary["pass"]) >= 18 and summary.get("cancelled") == "0"


def test_the_es_module_build_is_pgws_js_and_works_in_node() -> None:
    assert client_esm() == esm_build(client_js()), "run tools/build-pgws-esm after editing pgws.js"
    script = """
        import PgwsSocket, {PgwsSocket as Named} from "./pgws_sync/pgws.mjs";
        import {FakeWebSocket} from "./tests/js/fake_websocket.js";
        globalThis.WebSocket = FakeWebSocket;
        const sock = new PgwsSocket("ws://example.test/ws");
        await new Promise((r) => setTimeout(r, 5));
        const ws = FakeWebSocket.all[0];
        ws.open("pgws.v2");
        sock.subscribe("c");
        console.log(JSON.stringify([PgwsSocket === Named, typeof globalThis.PgwsSocket,
                                    ws.protocols, ws.actions("subscribe")[0].channel, sock.enveloped]));
        sock.close();
    """
    done = run_node("--input-type=module", "-e", script)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [True, "undefined", ["pgws.v2"], "c", True]


def test_the_classic_script_still_loads_with_require_and_as_a_global() -> None:
    script = """
        require("./tests/js/fake_websocket.js");  // CustomEvent, where Node lacks it
        const PgwsSocket = require("./pgws_sync/pgws.js");
        const vm = require("node:vm");
        const fs = require("node:fs");
        const sandbox = {URL, EventTarget, CustomEvent, TextEncoder, setTimeout, clearTimeout};
        vm.runInNewContext(fs.readFileSync("./pgws_sync/pgws.js", "utf8"), sandbox);
        console.log(JSON.stringify([typeof PgwsSocket, typeof sandbox.PgwsSocket,
                                    PgwsSocket.DEFAULTS.maxDelay]));
    """
    done = run_node("-e", script)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == ["function", "function", 30000]


def test_the_type_declarations_compile_against_an_app() -> None:
    tsc = programs.require("tsc", "PGWS_TSC")
    done = subprocess.run([tsc, "--noEmit", "--strict", "--target", "es2020", "--lib", "es2020,dom",
                           "--moduleResolution", "node", "--module", "es2020",
                           str(JS_TESTS / "types_check.ts")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_type_declarations_name_every_option_event_and_method() -> None:
    source = (ROOT / "pgws_sync" / "pgws.js").read_text()
    types = (ROOT / "pgws_sync" / "pgws.d.ts").read_text()
    defaults = re.search(r"const DEFAULTS = \{(.*?)\n  \};", source, re.S).group(1)  # type: ignore[union-attr]
    options = re.findall(r"^    (\w+):", defaults, re.M)
    declared = re.search(r"interface PgwsOptions \{(.*?)\n\}", types, re.S).group(1)  # type: ignore[union-attr]
    assert sorted(options) == sorted(re.findall(r"^  (\w+)\?:", declared, re.M))
    emitted = set(re.findall(r'_emit\("(\w+)"', source))
    events = re.search(r"interface PgwsEventMap \{(.*?)\n\}", types, re.S).group(1)  # type: ignore[union-attr]
    assert emitted == set(re.findall(r"^  (\w+):", events, re.M))
    methods = set(re.findall(r"^    (?:get )?([a-z]\w*)\(", source, re.M)) - {"constructor"}
    assert methods <= set(re.findall(r"^  (?:readonly )?(\w+)", types, re.M)), methods


def test_package_json_ships_the_three_files_at_the_library_version() -> None:
    package = json.loads((ROOT / "pgws_sync" / "package.json").read_text())
    assert package["version"] == pgws_sync.__version__
    for name in package["files"]:
        assert (ROOT / "pgws_sync" / name).is_file(), name
    assert package["exports"]["."] == {"types": "./pgws.d.ts", "import": "./pgws.mjs",
                                       "require": "./pgws.js"}
