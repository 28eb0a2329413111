"""One gene slider of the Synthesize dock: the gene, a labelled slider whose groove shows the
observed range and the predicted value, a predicted/observed caption, a remove button."""

from __future__ import annotations

from typing import Any

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QLabel, QSlider, QToolButton, QWidget

__all__ = ["GeneRow"]


class GeneRow:
    """One gene slider: label, labelled double slider, predicted/observed text, remove."""

    def __init__(self, gene: str, removable: bool, on_change: Any, on_remove: Any) -> None:
        from superqt import QLabeledDoubleSlider  # superqt: loaded with the first slider

        self.gene = gene
        self.name = QLabel(gene)
        self.name.setMinimumWidth(64)
        self.slider = QLabeledDoubleSlider(Qt.Orientation.Horizontal)
        self.slider.setDecimals(2)
        self.slider.setRange(0.0, 1.0)
        self.slider.setEnabled(False)
        self.info = QLabel("–")
        self.info.setStyleSheet("color: gray; font-size: 10px")
        self.info.setWordWrap(True)  # never widens the dock
        self.predicted: float | None = None
        self.observed: tuple[float, float] = (0.0, 1.0)
        self.remove = QToolButton()
        self.remove.setText("×")
        self.remove.setToolTip(f"remove {gene}")
        self.remove.setVisible(removable)
        self.remove.clicked.connect(lambda: on_remove(gene))
        self.slider.valueChanged.connect(lambda _v: on_change(gene))

    def widgets(self) -> list[QWidget]:
        return [self.name, self.slider, self.remove, self.info]

    def value(self) -> float:
        return float(self.slider.value())

    def set_profile(self, predicted: float, observed: tuple[float, float], rng: tuple) -> None:
        self.predicted, self.observed = float(predicted), observed
        blocked = self.slider.blockSignals(True)
        self.slider.setRange(float(rng[0]), float(rng[1]))
        self.slider.setValue(float(predicted))
        self.slider.blockSignals(blocked)
        self.slider.setEnabled(True)
        self._mark_groove(rng)
        self._update_info()

    def _mark_groove(self, rng: tuple) -> None:
        """Colour the observed range on the groove and draw the predicted value as a tick."""
        lo, hi = float(rng[0]), float(rng[1])
        span = max(hi - lo, 1e-9)

        def frac(v: float) -> float:
            return float(np.clip((v - lo) / span, 0.0, 1.0))

        a, b = frac(self.observed[0]), frac(self.observed[1])
        p = frac(self.predicted if self.predicted is not None else lo)
        p0, p1 = max(p - 0.006, 0.0), min(p + 0.006, 1.0)

        def colour(x: float) -> str:
            if p0 <= x <= p1:
                return "#f2c94c"  # the predicted value
            return "#2f7d68" if a <= x <= b else "#4a4f58"  # observed range / outside

        cuts = sorted({round(v, 4) for v in (0.0, a, b, p0, p1, 1.0)})
        stops = []  # strictly increasing positions (Qt rejects repeated stops)
        for k, (u, v) in enumerate(zip(cuts[:-1], cuts[1:], strict=True)):
            c = colour((u + v) / 2)
            stops += [f"stop:{u + (0.0001 if k else 0.0):.4f} {c}", f"stop:{v:.4f} {c}"]
        grad = ", ".join(stops)
        inner = self.slider.findChild(QSlider) or self.slider
        inner.setStyleSheet(
            "QSlider::groove:horizontal { height: 6px; border-radius: 3px; "
            f"background: qlineargradient(x1:0, y1:0, x2:1, y2:0, {grad}); }}"
            "QSlider::add-page:horizontal, QSlider::sub-page:horizontal { background: none; }"
            "QSlider::handle:horizontal { width: 14px; margin: -5px 0; border-radius: 7px; "
            "background: #dfe3ea; }"
        )

    def _update_info(self) -> None:
        if self.predicted is None:
            return
        lo, hi = self.observed
        d = self.value() - self.predicted
        delta = f"  Δ {d:+.2f}" if abs(d) > 5e-3 else ""
        self.info.setText(f"predicted {self.predicted:.2f} · observed {lo:.2f}–{hi:.2f}{delta}")
        self.slider.setToolTip(self.info.text())
