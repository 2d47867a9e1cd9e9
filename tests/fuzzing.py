"""Property-based fuzzing of client frames: hypothesis strategies and the strict-JSON oracle.

``PGWS_FUZZ_EXAMPLES`` sets how many frames each fuzz test sends (default 150 in
``make test``; a development run may ask for thousands).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, List, Union

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("PGWS_FUZZ_EXAMPLES", "150"))

#: The settings of every fuzz test: bounded examples, no deadline (a real server answers).
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])

Frame = Union[str, bytes]

#: Any character, lone surrogates (what a browser's JSON.stringify sends for a broken string),
#: controls and astral characters included.
chars = st.one_of(
    st.characters(min_codepoint=0, max_codepoint=0x10FFFF),
    st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),
    st.sampled_from(["\x00", "\x7f", "\u2028", "\ufeff", "\U0001F600", '"', "\\"]),
)
texts = st.text(chars, max_size=40)
numbers = st.one_of(
    st.integers(min_value=-(10 ** 40), max_value=10 ** 40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -0.0, 1e308, -1e-320, 2 ** 53 + 1]),
)
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), numbers, texts),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(texts, children, max_size=4),
    max_leaves=12,
)


def _dump(value: Any) -> str:
    """JSON text for ``value``: lone surrogates as ``\\uXXXX`` escapes, NaN/Infinity as literals."""
    return json.dumps(value, ensure_ascii=True, allow_nan=True)


def action_frames(fields: dict) -> st.SearchStrategy[str]:
    """JSON objects mixing well-formed fields (``fields``: name -> strategy) with anything."""
    optional = {name: strategy | json_values for name, strategy in fields.items()}
    objects = st.fixed_dictionaries({}, optional=optional)
    extra = st.dictionaries(texts, json_values, max_size=2)
    return st.builds(lambda a, b: {**b, **a}, objects, extra).map(_dump)


def almost(frames: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """Frames cut short or with a character slipped in: almost-JSON."""
    cut = st.tuples(frames, st.integers(min_value=0, max_value=200)).map(lambda t: t[0][:t[1]])
    spliced = st.tuples(frames, st.integers(min_value=0, max_value=200), chars).map(
        lambda t: t[0][:t[1]] + t[2] + t[0][t[1]:])
    return cut | spliced


#: Frames no particular protocol expects: extremes of size, nesting and numbers, binary, and
#: plain text (with lone surrogates replaced, as a browser's WebSocket.send does).
edge_frames: st.SearchStrategy[Frame] = st.one_of(
    st.integers(min_value=1, max_value=3000).map(lambda n: "[" * n + "]" * n),
    st.integers(min_value=1, max_value=3000).map(lambda n: '{"a":' * n + "1" + "}" * n),
    st.integers(min_value=300, max_value=6000).map(lambda n: '{"id": 1' + "0" * n + "}"),
    st.sampled_from(['{"id": 1e400, "action": "subscribe", "channel": "c"}',
                     '{"id": -1e400}', '{"id": NaN}', "NaN", "Infinity", "", " ", "null",
                     '{"action": "subscribe", "channel": "\\ud800"}', '"\\udfff"',
                     '{"payload": ' + "9" * 5000 + "}"]),
    st.text(chars, min_size=1000, max_size=30000).map(_dump),
    st.binary(max_size=64),
    texts,
)


def as_sent(frame: Frame) -> Frame:
    """What goes over the wire: a text frame's lone surrogates become U+FFFD, as a browser's
    WebSocket.send makes them (escaped ones, ``\\ud800`` in JSON text, stay)."""
    if isinstance(frame, str):
        return frame.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    return frame


def client_frames(fields: dict) -> st.SearchStrategy[Frame]:
    """Everything a hostile client might send a protocol whose fields are ``fields``."""
    frames = action_frames(fields)
    return st.one_of(frames, almost(frames), edge_frames).map(as_sent)


# ----------------------------------------------------------------- the oracle


def _reject(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def strict_json(text: str) -> Any:
    """Decode ``text`` as RFC 8259 JSON: no NaN or Infinity, finite numbers, no lone surrogates."""
    text.encode("utf-8")  # a lone surrogate in the frame itself
    value = json.loads(text, parse_constant=_reject)
    stack: List[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float):
            assert math.isfinite(item), f"a non-finite number in {text[:200]!r}"
        elif isinstance(item, str):
            item.encode("utf-8")  # an escaped lone surrogate
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return value


def answers_until(recv: Callable[[], Frame], is_sentinel: Callable[[Any], bool]) -> List[Any]:
    """Read frames up to the sentinel's; every one must be strict JSON; returns those before it."""
    before: List[Any] = []
    while True:
        frame = recv()
        assert isinstance(frame, str), f"a binary frame came back: {frame[:100]!r}"
        value = strict_json(frame)
        if is_sentinel(value):
            return before
        before.append(value)


def no_tracebacks(log: str) -> None:
    """The server log shows no traceback and no ERROR line."""
    lines = [line for line in log.splitlines() if "Traceback" in line or "[ERROR]" in line]
    assert not lines, log[-3000:]
