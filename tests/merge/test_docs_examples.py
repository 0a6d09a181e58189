"""Every example config in docs/merging.md names a real method with valid parameters."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from skillgraft.merge.config import from_dict
from skillgraft.merge.registry import all_methods, get_method

DOC = Path(__file__).parents[2] / "docs" / "merging.md"
EXAMPLES = [line for line in DOC.read_text().splitlines() if line.startswith("{base:")]


def test_every_method_has_an_example():
    documented = {yaml.safe_load(line)["method"] for line in EXAMPLES}
    assert {m.name for m in all_methods()} <= documented


@pytest.mark.parametrize("line", EXAMPLES, ids=[re.search(r"method: (\w+)", x).group(1) for x in EXAMPLES])
def test_example_validates(line):
    cfg = from_dict(yaml.safe_load(line))
    info = get_method(cfg.method)
    info.make_params(cfg.parameters)
    assert info.min_inputs <= len(cfg.inputs) <= (info.max_inputs or 99)
