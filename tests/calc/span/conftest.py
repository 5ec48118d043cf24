"""Fixtures of the SPAN tests: the real Takasbank parameter file, parsed once per test module."""

from __future__ import annotations

import pytest

from calc.span.parser import load_span_file
from tests.support import SPAN_FILE


@pytest.fixture(scope="module")
def params():
    """The Takasbank SPAN file of 2016-05-17 (data/span/), parsed."""
    return load_span_file(SPAN_FILE)
