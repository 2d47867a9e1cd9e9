"""The one error tree, and the public API it belongs to."""

import pickle

import pytest

import pgws_sync
from pgws_sync import errors
from pgws_sync.errors import TokenRefused


def test_every_error_is_a_pgws_error_in_errors_and_the_front_door_ones_in_the_package():
    for cls in errors.ERRORS:
        assert issubclass(cls, pgws_sync.PgwsError)
        assert getattr(errors, cls.__name__) is cls, cls
        front = cls in errors.FRONT_DOOR_ERRORS
        assert (cls.__name__ in pgws_sync.__all__) is front, cls
        assert cls.__module__ == ("pgws_sync" if front else "pgws_sync.errors"), cls
        assert pickle.loads(pickle.dumps(cls)) is cls  # found where __module__ says
    # every class errors.py defines is in the tree
    defined = {v for v in vars(errors).values()
               if isinstance(v, type) and issubclass(v, Exception) and not issubclass(v, Warning)}
    assert defined == set(errors.ERRORS)


def test_errors_name_their_cause():
    assert str(pgws_sync.InvalidChannel("x" * 70, "it is 70 bytes long")) == \
        f"invalid channel name {'x' * 70!r}: it is 70 bytes long"
    assert "at most 7999" in str(pgws_sync.PayloadTooLarge(9000, 8000, "c"))
    assert str(TokenRefused("Token expired")) == "Token expired"
    refused = pgws_sync.Refused(403, "no", {"X": "1"})
    assert (refused.status, refused.body, refused.headers) == (403, "no", {"X": "1"})


def test_the_public_api_resolves_and_the_old_names_still_work_with_a_warning():
    assert 20 <= len(pgws_sync.__all__) <= 28  # 25, and live tables' three
    for name in pgws_sync.__all__:
        assert hasattr(pgws_sync, name), name
    with pytest.warns(DeprecationWarning, match="use pgws_sync.Pgws"):
        assert pgws_sync.PGWS is pgws_sync.Pgws
    for name in pgws_sync._MOVED:
        assert name not in pgws_sync.__all__
        with pytest.warns(DeprecationWarning, match=f"pgws_sync.{name} is deprecated"):
            getattr(pgws_sync, name)
    with pytest.warns(DeprecationWarning):
        from pgws_sync import ListenerStopped
    assert ListenerStopped is errors.ListenerStopped
    with pytest.raises(AttributeError):
        pgws_sync.NoSuchName
