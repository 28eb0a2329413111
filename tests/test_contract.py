"""The predictor contract and the model registry: both shipped predictors satisfy it."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")


def test_registry_lists_kinds_and_loads_predictors():
    from napari_stgen.inference.contract import Kind, Predictor
    from napari_stgen.inference.registry import (
        kind_of,
        list_models,
        load_predictor,
        read_panel,
        takes_measured,
    )

    names = list_models()
    assert names[0] == "default" and not any(n.endswith("genst_default.safetensors") for n in names)
    assert list_models((Kind.STMDIT,))[0] == "default"
    assert kind_of("default") is Kind.GENST and kind_of("histotx") is Kind.HISTOTX
    assert str(Kind.HISTOTX) == "histotx" and Kind.GENST == "genst"
    assert read_panel("histotx")["kind"] == "histotx"
    for name, kind in (("default", Kind.GENST), ("histotx", Kind.HISTOTX)):
        pred = load_predictor(name, device="cpu")
        assert isinstance(pred, Predictor) and pred.kind == kind
        assert takes_measured(pred) is (kind is Kind.HISTOTX)
        assert len(pred.genes) == len(read_panel(name)["genes"])
