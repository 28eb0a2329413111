"""The Synthesize dock's profile ↔ generate sequencing and the sampler settings, without a GUI."""

from __future__ import annotations

import pytest

from napari_stgen.errors import StgenError
from napari_stgen.inference.cancel import CancelToken, as_token, is_cancelled
from napari_stgen.inference.sampler_settings import SamplerSettings
from napari_stgen.widgets.synthesis_flow import Next, SynthesisFlow


def test_generate_waits_for_models_then_profile():
    flow = SynthesisFlow()
    calls = []
    assert flow.need_models(lambda: calls.append("a")) is Next.LOAD
    assert flow.need_models(lambda: calls.append("b")) is Next.NOTHING  # one load at a time
    for c in flow.models_loaded():
        c()
    assert calls == ["a", "b"] and not flow.loading and not flow.waiting
    assert flow.generate_request(None, (0, 0, 1, 1)) is Next.PROFILE
    assert flow.region_request(("s", "m", (0, 0, 1, 1)), False) is Next.PROFILE
    assert flow.profile_ready(live=False) is Next.GENERATE  # the waiting generation runs
    assert flow.profile_ready(live=False) is Next.NOTHING


def test_profiled_region_is_not_profiled_again_until_the_model_changes():
    flow = SynthesisFlow()
    sig = ("s", "m", (0, 0, 1, 1))
    assert flow.region_request(sig, False) is Next.PROFILE
    assert flow.region_request(sig, True) is Next.NOTHING
    assert flow.generate_request((0, 0, 1, 1), (0, 0, 1, 1)) is Next.GENERATE
    flow.model_changed()
    assert flow.region_request(sig, True) is Next.PROFILE


def test_cancel_and_failures_drop_waiting_work():
    flow = SynthesisFlow()
    flow.need_models(lambda: None)
    flow.load_failed()
    assert not flow.waiting and not flow.loading
    flow.generate_request(None, (0, 0, 1, 1))
    flow.cancel()
    assert flow.profile_ready(live=False) is Next.NOTHING
    flow.generate_request(None, (0, 0, 1, 1))
    flow.profile_failed()
    assert flow.profile_ready(live=True) is Next.GENERATE  # live mode still regenerates


def test_sampler_settings_resolve_once_from_the_card():
    card = {"sampler": {"steps": 8, "guidance_genes": 3.0, "guide_t_min": None}}
    s = SamplerSettings.from_card(card)
    assert (s.steps, s.guidance, s.guidance_expr, s.guide_t_min) == (8, (3.0, 1.0), 0.0, 0.0)
    r = s.resolve(steps=None, guidance_morph=0.5)
    assert (r.steps, r.guidance) == (8, (3.0, 0.5))
    with pytest.raises(StgenError, match="steps must be ≥ 1"):
        s.resolve(steps=0)
    with pytest.raises(TypeError):
        s.resolve(stepz=3)
    assert SamplerSettings.card_block()["steps"] == SamplerSettings().steps


def test_one_cancel_token_and_the_signals_it_adapts():
    tok = CancelToken()
    assert not is_cancelled(tok)
    tok.cancel()
    assert is_cancelled(tok) and is_cancelled(lambda: True) and not is_cancelled(None)
    with pytest.raises(Exception, match="synthesis cancelled"):
        as_token(tok, "synthesis cancelled").check()
