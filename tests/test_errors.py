"""The one error tree, and the public API it belongs to."""

import pgws_sync
from pgws_sync import errors


def test_every_error_is_a_pgws_error_exported_from_the_package():
    for cls in errors.ERRORS:
        assert issubclass(cls, pgws_sync.PgwsError)
        assert getattr(pgws_sync, cls.__name__) is cls, cls
        assert cls.__module__ == "pgws_sync" and cls.__name__ in pgws_sync.__all__
    # every class errors.py defines is in the tree
    defined = {v for v in vars(errors).values() if isinstance(v, type) and issubclass(v, Exception)}
    assert defined == set(errors.ERRORS)


def test_errors_name_their_cause():
    assert str(pgws_sync.InvalidChannel("x" * 70, "it is 70 bytes long")) == \
        f"invalid channel name {'x' * 70!r}: it is 70 bytes long"
    assert "at most 7999" in str(pgws_sync.PayloadTooLarge(9000, 8000, "c"))
    assert str(pgws_sync.TokenRefused("Token expired")) == "Token expired"
    refused = pgws_sync.Refused(403, "no", {"X": "1"})
    assert (refused.status, refused.body, refused.headers) == (403, "no", {"X": "1"})


def test_the_public_api_resolves_and_the_old_name_still_works():
    for name in pgws_sync.__all__:
        assert hasattr(pgws_sync, name), name
    assert pgws_sync.PGWS is pgws_sync.Pgws
