"""HISA_PDL: which kernel kinds launch with programmatic dependent launch."""

import pytest
import torch

from hisa.ops import pdl


def test_hisa_pdl_names_all_none_or_a_list_of_kinds():
    assert pdl._kinds("0") == frozenset() and pdl._kinds("") == frozenset()
    assert pdl._kinds("1") == frozenset(pdl.KINDS)
    assert pdl._kinds("selection, attention") == {"selection", "attention"}


def test_an_unknown_kind_is_refused_with_the_known_ones_named():
    with pytest.raises(ValueError, match="unknown kernel kinds.*'attn'.*linear"):
        pdl._kinds("linear,attn")


def test_the_cpu_never_launches_with_pdl(monkeypatch):
    monkeypatch.setattr(pdl, "ENABLED", frozenset(pdl.KINDS))
    assert pdl.launch_kwargs(torch.zeros(1), "linear") == {}
