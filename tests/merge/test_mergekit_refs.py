"""Model references in mergekit YAMLs that cannot apply offline get one-line errors naming them."""

from __future__ import annotations

import pytest
from make_mergekit_e2e import write_inputs

from skillgraft.errors import NotFoundError
from skillgraft.merge.config import from_dict
from skillgraft.merge.engine import MergeOptions, plan_merge


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return write_inputs(tmp_path_factory.mktemp("refs"))


def _plan(cfg: dict, tmp_path):
    return plan_merge(from_dict(cfg), MergeOptions(out=tmp_path / "out", dry_run=True))


@pytest.mark.parametrize(
    ("where", "ref", "message", "hint"),
    [
        ("input", "mistralai/Mistral-7B-v0.1", "looks like a Hugging Face Hub id", "huggingface-cli download"),
        ("base", "mistralai/Mistral-7B-v0.1", "looks like a Hugging Face Hub id", "huggingface-cli download"),
        ("input", "org/model+org/lora", "'model\\+lora' reference", "merge the adapter"),
        ("input", "org/model@v2", "model@revision", "download that revision"),
    ],
)
def test_references_that_need_the_hub_are_named(models, tmp_path, where, ref, message, hint):
    base, ft = str(models["base"]), str(models["ft_a"])
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": ref if where == "base" else base,
        "models": [{"model": ref if where == "input" else ft}],
    }
    with pytest.raises(NotFoundError, match=message) as e:
        _plan(cfg, tmp_path)
    assert hint in (e.value.hint or "")
    assert not (tmp_path / "out").exists()


def test_a_missing_local_path_says_where_it_was_looked_up(models, tmp_path):
    cfg = {"merge_method": "linear", "models": [{"model": str(models["base"])}, {"model": str(tmp_path / "nope")}]}
    with pytest.raises(NotFoundError, match="no such file or directory") as e:
        _plan(cfg, tmp_path)
    assert "next to the config file" in (e.value.hint or "")
