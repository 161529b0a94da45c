import pytest

from besa.errors import BesaError
from besa.settings.options import parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [("512MiB", 512 * 2**20), ("2G", 2 * 2**30), ("1.5gb", int(1.5 * 2**30)), ("100", 100), (7, 7), (None, None),
     ("none", None)],
)  # fmt: skip
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["lots", "4 parsecs", "-1G", ""])
def test_parse_size_rejects_nonsense(text):
    with pytest.raises(BesaError, match="invalid memory size"):
        parse_size(text)
