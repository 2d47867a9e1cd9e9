"""Channel name validation."""

import pytest

from pgws_sync import InvalidChannel, PgwsError
from pgws_sync._formats import validate_channel


@pytest.mark.parametrize("name", ["pgws", "MixedCase", "with-dash", "with space", 'quo"te', "x" * 63,
                                  "\u00e9" * 31])
def test_valid_names_are_kept_as_written(name):
    assert validate_channel(name) == name


@pytest.mark.parametrize("name,why", [
    ("", "empty"),
    ("x" * 64, "64 bytes"),
    ("\u00e9" * 32, "64 bytes"),
    ("a\x00b", "NUL"),
    (None, "string"),
    (42, "string"),
])
def test_invalid_names_are_refused_with_a_reason(name, why):
    with pytest.raises(InvalidChannel) as info:
        validate_channel(name)
    assert isinstance(info.value, PgwsError) and isinstance(info.value, ValueError)
    assert why in str(info.value)


def test_a_lone_surrogate_is_a_clear_invalid_channel():
    from pgws_sync import InvalidChannel
    from pgws_sync._formats import validate_channel

    with pytest.raises(InvalidChannel, match="encodable as UTF-8"):
        validate_channel("bad\ud800")
