"""--max-shard-size: transformers' size rule (convert_file_size_to_int) plus a bare byte count."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from neoxconv.errors import NeoxconvError
from neoxconv.io import parse_size


@pytest.mark.parametrize("text, size", [
    ("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("2GiB", 2 * 2**30), ("10KiB", 10 * 2**10), ("5gb", 5 * 10**9),
    ("5 GB", 5 * 10**9), ("12345", 12345),
])
def test_accepted_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["1.5GB", "5 lightyears", "", "0", "-5GB", "3TB"])
def test_bad_size_is_one_line(text):
    with pytest.raises(NeoxconvError, match=r"^cannot read size .* \(use e.g. 5GB, 500MB, 2GiB\)$"):
        parse_size(text)


def test_cli_bad_size_stops_before_converting(tmp_path):
    from neoxconv.cli import app

    result = CliRunner().invoke(app, ["convert", str(tmp_path), str(tmp_path / "out"), "--to", "hf",
                                      "--max-shard-size", "lots"])
    assert isinstance(result.exception, NeoxconvError) and "cannot read size 'lots'" in str(result.exception)
    assert not (tmp_path / "out").exists()
