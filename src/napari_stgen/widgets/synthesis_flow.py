"""The Synthesize dock's profile ↔ generate sequencing as a small state object (no Qt).

Generating needs the generator and predictor loaded and the region's expression profile;
a request that arrives before them is queued: :class:`SynthesisFlow` says what the widget
does next (:class:`Next`) and remembers what waits (calls after the model load, a generation
after the profile), so the sequencing can be tested without a GUI.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from enum import Enum

__all__ = ["Next", "SynthesisFlow"]


class Next(str, Enum):
    """What the widget does next for a request."""

    NOTHING = "nothing"  # up to date, or waiting for work already running
    LOAD = "load"  # start loading the models
    PROFILE = "profile"  # predict the region's profile first
    GENERATE = "generate"  # generate now


@dataclass
class SynthesisFlow:
    """Pending work of the Synthesize dock: model-load waiters, the profiled region, and a
    generation that waits for a profile."""

    loading: bool = False
    waiting: list[Callable[[], object]] = field(default_factory=list)  # run after the load
    region_sig: Hashable | None = None  # (slide, model, region) of the last profile request
    generate_after_profile: bool = False

    # ------------------------------------------------------------------ models
    def need_models(self, then: Callable[[], object]) -> Next:
        """Models are missing: queue ``then``; LOAD when no load is running yet."""
        self.waiting.append(then)
        if self.loading:
            return Next.NOTHING
        self.loading = True
        return Next.LOAD

    def models_loaded(self) -> list[Callable[[], object]]:
        """The load ended well: the queued calls, to run now."""
        self.loading = False
        calls, self.waiting = self.waiting, []
        return calls

    def load_failed(self) -> None:
        """The load failed: forget the queued calls."""
        self.loading = False
        self.waiting = []

    def load_ended(self) -> None:
        """The load's worker finished (after its result or error)."""
        self.loading = False

    def model_changed(self) -> None:
        """Another generator was picked: the region must be profiled again."""
        self.region_sig = None

    # ------------------------------------------------------------------ profile / generate
    def region_request(self, sig: Hashable, has_profile: bool) -> Next:
        """PROFILE unless ``sig`` was profiled already and its profile is there."""
        if sig == self.region_sig and has_profile:
            return Next.NOTHING
        self.region_sig = sig
        return Next.PROFILE

    def generate_request(self, profiled_region: object, planned_region: object) -> Next:
        """GENERATE when the profile covers the planned region, else PROFILE (and generate
        once the profile arrives)."""
        if profiled_region is None or profiled_region != planned_region:
            self.generate_after_profile = True
            self.region_sig = None
            return Next.PROFILE
        return Next.GENERATE

    def profile_failed(self) -> None:
        """The profile failed: no generation follows."""
        self.generate_after_profile = False

    def profile_ready(self, live: bool) -> Next:
        """A profile arrived: GENERATE when one waits for it or live mode is on."""
        if self.generate_after_profile or live:
            self.generate_after_profile = False
            return Next.GENERATE
        return Next.NOTHING

    def cancel(self) -> None:
        """The user cancelled: no generation waits any more."""
        self.generate_after_profile = False
