"""Synthesize dock widget: draw a region, move gene sliders, generate H&E tiles in place.

Thin Qt layer over :mod:`napari_stgen.inference.synthesis_grid`. Drawing a rectangle (or
clicking a point) on the region layer predicts the region's expression (from the viewer's
prediction store, else through the prediction engine) and sets each gene slider to it.
Generate (or live mode, debounced) runs STMDiT in a napari ``thread_worker`` generator with
progress and Cancel; a newer request cancels the older one. The result appears exactly over
the region as an image layer in µm with its record in ``metadata['stgen']['tile']``; variants by
seed, a before/after toggle (before: the H&E alone, every overlay hidden), Keep / Discard, Reset
and an export of the kept tiles. Nothing loads until the user draws or picks a region.

The pieces live beside it: controls (``synthesize_ui``), gene sliders (``gene_row``), the
region layer (``synthesis_region``), results (``synthesis_results``), the profile ↔ generate
sequencing (``synthesis_flow``) and the worker lifecycle (``jobs``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QFileDialog, QWidget

from napari_stgen.errors import StgenError
from napari_stgen.inference import synthesis_grid as sg
from napari_stgen.inference.device import set_threads
from napari_stgen.inference.export import StoreExtras, store_to_anndata
from napari_stgen.io.anndata import write_h5ad
from napari_stgen.io.layer_meta import GENERATED, generated_metadata, with_info
from napari_stgen.io.napari_writer import write_layers
from napari_stgen.widgets.gene_row import GeneRow
from napari_stgen.widgets.jobs import Failed, JobProgress, JobSpec, WidgetJobs, guarded
from napari_stgen.widgets.state import find_slide_layer, get_state
from napari_stgen.widgets.synthesis_flow import Next, SynthesisFlow
from napari_stgen.widgets.synthesis_region import NO_REGION, REGION_LAYER, RegionLayerMixin
from napari_stgen.widgets.synthesis_results import OVERLAY_KINDS, ResultsMixin, offset_text
from napari_stgen.widgets.synthesize_ui import LIVE_DEBOUNCE_MS, build_ui

if TYPE_CHECKING:  # type names only
    from napari_stgen.inference.cancel import CancelToken
    from napari_stgen.inference.contract import Predictor
    from napari_stgen.inference.stmdit_model import STMDiTModel
    from napari_stgen.inference.synthesis_plan import SynthesisPlan
    from napari_stgen.io.slide_handle import Slide

__all__ = [
    "LIVE_DEBOUNCE_MS",
    "NO_REGION",
    "OVERLAY_KINDS",
    "PREVIEW_LAYER",
    "REGION_LAYER",
    "SynthesizeWidget",
]

REGION_DEBOUNCE_MS = 150
N_DEFAULT_GENES = 8
PREVIEW_LAYER = "Synthesis preview"


# ----------------------------------------------------------------------------- worker jobs
def _load_job(state: Any, stmdit_name: str) -> Any:
    try:
        return sg.load_generator(stmdit_name), state.predictor()
    except StgenError as e:
        return Failed(f"could not load the models: {e}")


def _profile_job(
    slide: Slide,
    model: STMDiTModel,
    predictor: Predictor,
    plan: SynthesisPlan,
    known: tuple[np.ndarray, np.ndarray] | None,
    token: CancelToken,
    threads: int | None,
):
    set_threads(threads)
    gen = sg.iter_region_profile(slide, model, predictor, plan, known, token)
    return (yield from guarded("region prediction", gen))


def _generate_job(
    slide: Slide,
    model: STMDiTModel,
    profile: Any,
    cond: Any,
    params: dict,
    token: CancelToken,
    threads: int | None,
):
    set_threads(threads)
    gen = sg.iter_synthesize(slide, model, profile, cond, cancel=token, **params)
    return (yield from guarded("generation", gen))


class SynthesizeWidget(RegionLayerMixin, ResultsMixin, QWidget):
    """Draw a region, set gene sliders and generate H&E tiles with STMDiT in place."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        self.viewer = napari_viewer
        # napari hands plugin widgets a PublicOnlyProxy per widget: key the shared state by
        # the real viewer so the Predict / Export widgets see the same store
        self.state = get_state(getattr(napari_viewer, "__wrapped__", napari_viewer))
        self.model: Any = None
        self.predictor: Any = None
        self._model_name: str | None = None
        self._pred_name: str | None = None
        self.profile: Any = None
        self.result: Any = None
        self.preview_layer: Any = None
        self.region_layer: Any = None
        self.kept: list[Any] = []  # napari_stgen.io.anndata.GeneratedTile
        self.kept_layers: list[Any] = []
        self.rows: dict[str, GeneRow] = {}
        self.progress = JobProgress()
        self.jobs = WidgetJobs(self, self.progress, self._notify, self.shutdown)
        self.workers = self.jobs.workers  # running workers (newest last), the jobs' own list
        self._tokens = self.jobs.tokens  # the newest token of each kind
        self.flow = SynthesisFlow()
        self._hidden_overlays: list[Any] = []  # overlays hidden by the "before" view
        self._live_timer = QTimer(self)
        self._live_timer.setSingleShot(True)
        self._live_timer.setInterval(LIVE_DEBOUNCE_MS)
        self._live_timer.timeout.connect(self.generate)
        self._region_timer = QTimer(self)
        self._region_timer.setSingleShot(True)
        self._region_timer.setInterval(REGION_DEBOUNCE_MS)
        self._region_timer.timeout.connect(self.update_region)
        build_ui(self)
        self.viewer.layers.events.inserted.connect(self._refresh_region_layers)
        self.viewer.layers.events.removed.connect(self._on_layer_removed)
        self._refresh_region_layers()

    @property
    def busy(self) -> bool:
        """Whether a model load, region prediction or generation is running."""
        return self.jobs.busy

    # ------------------------------------------------------------------ models
    def _on_model_changed(self, *_: Any) -> None:
        self.model = None
        self.profile = None
        self.flow.model_changed()
        self._region_timer.start()

    def _ensure_models(self, then: Any) -> bool:
        """True when models are loaded; else load them in a worker and call ``then`` after."""
        name = self.model_combo.currentText().strip() or "default"
        pred_ok = self.predictor is not None and self._pred_name == self.state.model_name
        if self.model is not None and self._model_name == name and pred_ok:
            return True
        if self.flow.need_models(then) is not Next.LOAD:
            return False
        self.status_label.setText("loading models…")
        pred_name = self.state.model_name

        def done(models: Any) -> None:
            if isinstance(models, Failed):
                self.flow.load_failed()
                self._notify(models.message, error=True)
                return
            self.model, self.predictor = models
            self._model_name, self._pred_name = name, pred_name
            self._on_models_loaded()
            for call in self.flow.models_loaded():
                call()

        def failed(e: BaseException) -> None:
            self.flow.load_failed()
            self._notify(f"could not load the models: {e}", error=True)

        worker = self._worker(_load_job, self.state, name)
        worker.errored.connect(failed)
        spec = JobSpec(on_return=done, on_finished=lambda *_: self.flow.load_ended())
        self.jobs.start("load", worker, spec=spec)
        return False

    def _on_models_loaded(self) -> None:
        m = self.model
        self._gene_model.setStringList(sorted(m.genes))
        s = m.sampler
        for w, v in (
            (self.guid_genes, s.guidance_genes),
            (self.guid_morph, s.guidance_morph),
            (self.guid_expr, s.guidance_expr),
            (self.steps_spin, s.steps),
        ):
            w.blockSignals(True)
            w.setValue(v)
            w.blockSignals(False)
        for g in list(self.rows):
            if g not in m.genes:
                self.remove_gene(g)
        for g in sg.informative_genes(m, N_DEFAULT_GENES):
            self.add_gene(g, removable=False)
        self.status_label.setText(
            f"{m.name}: {len(m.genes)} genes, tiles {m.tile_px} px at {m.mpp:g} µm/px "
            f"({m.tile_um:g} µm); expression from {self.predictor.name}"
        )

    @property
    def genes(self) -> list[str]:
        """Genes with a slider, in display order."""
        return list(self.rows)

    def add_gene(self, gene: str, removable: bool = True) -> bool:
        """Add a slider for ``gene`` (a gene of the generator's panel, any case)."""
        if self.model is None:
            return False
        match = {g.upper(): g for g in self.model.genes}.get(gene.strip().upper())
        if match is None:
            self._notify(f"{gene!r} is not in the generator's panel", error=True)
            return False
        if match in self.rows:
            return True
        row = GeneRow(match, removable, self._on_slider, self.remove_gene)
        r = self.genes_grid.rowCount()
        self.genes_grid.addWidget(row.name, 2 * r, 0)
        self.genes_grid.addWidget(row.slider, 2 * r, 1)
        self.genes_grid.addWidget(row.remove, 2 * r, 2)
        self.genes_grid.addWidget(row.info, 2 * r + 1, 1, 1, 2)
        self.rows[match] = row
        if self.profile is not None:
            self._init_row(row)
        return True

    def remove_gene(self, gene: str) -> None:
        """Remove a gene's slider (its value returns to each tile's prediction)."""
        row = self.rows.pop(gene, None)
        if row is None:
            return
        for w in row.widgets():
            self.genes_grid.removeWidget(w)
            w.deleteLater()
        self._schedule_live()

    def _add_gene_from_edit(self) -> None:
        if self.add_gene(self.gene_edit.text()):
            self.gene_edit.clear()

    def slider_values(self) -> dict[str, float]:
        """Current slider values (log1p CP10k) by gene."""
        return {g: r.value() for g, r in self.rows.items() if r.predicted is not None}

    def set_value(self, gene: str, value: float) -> None:
        """Move a gene's slider (as a user would); live mode regenerates after the debounce."""
        self.rows[gene].slider.setValue(float(value))

    def _init_row(self, row: GeneRow) -> None:
        p = self.profile.value(row.gene)
        i = self.model.genes.index(row.gene)
        lo, hi = (float(v) for v in np.asarray(self.model.gene_range)[i])
        row.set_profile(p, (lo, hi), sg.slider_range(self.model, row.gene, p))

    def reset_sliders(self) -> None:
        """Return every slider to the region's predicted value."""
        if self.profile is None:
            return
        for row in self.rows.values():
            self._init_row(row)
        self._schedule_live()

    def _on_slider(self, gene: str) -> None:
        row = self.rows.get(gene)
        if row is not None:
            row._update_info()
        self._schedule_live()

    def _on_param_changed(self, *_: Any) -> None:
        self._schedule_live()

    def _schedule_live(self) -> None:
        if self.live_check.isChecked() and self.profile is not None:
            self._live_timer.start()

    def _slide(self) -> Any:
        layer = find_slide_layer(self.viewer, self.state)  # never a generated tile
        if layer is None:
            raise StgenError("open a slide first (File ▸ Open or File ▸ Open Sample)")
        return self.state.set_slide_layer(layer)

    # ------------------------------------------------------------------ region profile
    def _worker(self, fn: Any, *args: Any) -> Any:
        from napari.qt.threading import thread_worker  # napari

        return thread_worker(fn, start_thread=False)(*args)

    def _region_text(self, plan: Any, src: str) -> str:
        h, w = plan.out_hw
        rows, cols = plan.grid_shape
        return (
            f"Region {w * plan.px_um:.0f} × {h * plan.px_um:.0f} µm at "
            f"({plan.region_um[0]:.0f}, {plan.region_um[1]:.0f}) µm → {plan.n_tiles} tile(s) "
            f"({rows}×{cols}); {src}"
        )

    def _plan(self, region: Any) -> tuple[Any, Any]:
        """(slide, plan) of a region (StgenError when there is no slide or a bad region)."""
        slide = self._slide()
        return slide, sg.plan_region(
            region, self.model.mpp, self.model.tile_px, latent_factor=self.model.latent_factor
        )

    def update_region(self) -> Any:
        """Plan the current region and predict its profile (worker); sliders follow."""
        region = self.region_um()
        if region is None:
            return None
        if not self._ensure_models(self.update_region):
            return None
        try:
            slide, plan = self._plan(region)
        except StgenError as e:
            self._notify(str(e), error=True)
            return None
        sig = (id(slide), self._model_name, plan.region_um)
        if self.flow.region_request(sig, self.profile is not None) is Next.NOTHING:
            return None
        self._snap_region_shape(plan.region_um)
        known = sg.known_from_store(self.state.store, slide, self.predictor, plan)
        token = self.jobs.new_token("profile")
        self.region_label.setText(self._region_text(plan, "predicting expression…"))
        worker = self._worker(
            _profile_job, slide, self.model, self.predictor, plan, known, token, self.state.threads
        )
        spec = JobSpec(
            desc="Predicting region",
            on_return=lambda prof, t=token, s=slide: self._on_profile(prof, t, s),
            on_finished=self._on_finished,
            failed="region prediction failed",
        )
        self.cancel_btn.setEnabled(True)
        return self.jobs.start("profile", worker, token, spec)

    def _on_profile(self, prof: Any, token: CancelToken, slide: Slide) -> None:
        if not self.jobs.is_current("profile", token) or prof is None:
            return
        if isinstance(prof, Failed):
            self.flow.profile_failed()
            self._notify(prof.message, error=True)
            return
        if prof.new is not None and len(prof.new):
            self.state.store.ensure(slide, self.predictor, prof.grid)
            self.state.store.add_result(prof.new)
        self.profile = prof
        for row in self.rows.values():
            self._init_row(row)
        src = f"{prof.cells_known}/{prof.cells_total} cells from the prediction store."
        self.region_label.setText(self._region_text(prof.plan, src))
        if self.flow.profile_ready(self.live_check.isChecked()) is Next.GENERATE:
            self.generate()

    # ------------------------------------------------------------------ generation
    def params(self) -> dict[str, Any]:
        """Sampler parameters from the controls (keyword arguments of ``iter_synthesize``)."""
        seed = int(self.seed_spin.value())
        return {
            "seeds": [seed + k for k in range(int(self.variants_spin.value()))],
            "steps": int(self.steps_spin.value()),
            "guidance_genes": float(self.guid_genes.value()),
            "guidance_morph": float(self.guid_morph.value()),
            "guidance_expr": float(self.guid_expr.value()),
            "use_morphology": bool(self.use_morph.isChecked()),
        }

    def generate(self) -> Any:
        """Generate the region with the current sliders (cancelling any running generation)."""
        self._live_timer.stop()
        region = self.region_um()
        if region is None:
            self._notify("draw a rectangle (or click a point) on the region layer first")
            return None
        if not self._ensure_models(self.generate):
            return None
        try:
            plan = sg.plan_region(
            region, self.model.mpp, self.model.tile_px, latent_factor=self.model.latent_factor
        )
        except StgenError as e:
            self._notify(str(e), error=True)
            return None
        profiled = None if self.profile is None else self.profile.plan.region_um
        if self.flow.generate_request(profiled, plan.region_um) is Next.PROFILE:
            self.update_region()
            return None
        try:
            slide = self._slide()
            cond = sg.conditioning(self.profile, self.slider_values())
        except StgenError as e:
            self._notify(str(e), error=True)
            return None
        token = self.jobs.new_token("generate")
        params = self.params()
        self.status_label.setText(
            f"generating {plan.n_tiles} tile(s) × {len(params['seeds'])} variant(s), "
            f"{params['steps']} steps…"
        )
        worker = self._worker(
            _generate_job, slide, self.model, self.profile, cond, params, token, self.state.threads
        )
        spec = JobSpec(
            desc="Synthesizing tiles",
            on_return=lambda r, t=token: self._on_generated(r, t),
            on_finished=self._on_finished,
            failed="generation failed",
        )
        self.cancel_btn.setEnabled(True)
        return self.jobs.start("generate", worker, token, spec)

    def _on_generated(self, res: Any, token: Any) -> None:
        if not self.jobs.is_current("generate", token) or res is None:
            return
        if isinstance(res, Failed):
            self._notify(res.message, error=True)
            return
        self.result = res
        tr = res.plan.layer_transform()
        if self.preview_layer is None or self.preview_layer not in self.viewer.layers:
            self.preview_layer = self.viewer.add_image(
                res.images[0],
                name=PREVIEW_LAYER,
                rgb=True,
                scale=tr["scale"],
                translate=tr["translate"],
                units="um",
                metadata=generated_metadata(res.records[0]),
            )
        else:
            ly = self.preview_layer
            ly.data = res.images[0]
            ly.scale, ly.translate = tr["scale"], tr["translate"]
            ly.metadata = with_info(ly.metadata, kind=GENERATED, tile=res.records[0])
        self._on_before_after(self.after_check.isChecked())
        self._keep_region_on_top()
        self.variant_slider.blockSignals(True)
        self.variant_slider.setRange(0, len(res.images) - 1)
        self.variant_slider.setValue(0)
        self.variant_slider.blockSignals(False)
        self.show_variant(0)
        self._update_result_buttons()
        off = offset_text(res.records[0])
        self.status_label.setText(f"generated {len(res.images)} variant(s); offsets: {off}")

    def export_kept(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the kept tiles to an ``.h5ad``: the predicted tiles under them as rows, the
        generated tiles (pixels + conditioning records) in ``uns['stgen']['generated']``."""
        if not self.kept:
            raise StgenError("no kept tiles to export (press Keep first)")
        store, slide = self.state.store, self.state.slide
        rows = np.zeros(0, np.int64)
        if len(store):
            rows = np.unique(
                np.concatenate(
                    [store.rows_in_region(tuple(t.extra["region_um"])) for t in self.kept]
                )
            )
        if slide is None or len(rows) == 0:
            data = [ly.as_layer_data_tuple() for ly in self.kept_layers if ly in self.viewer.layers]
            return write_layers(path, data, overwrite=overwrite)
        extras = StoreExtras(generated=list(self.kept))
        adata = store_to_anndata(store, slide, self.predictor, self.state.code_names, rows, extras)
        return write_h5ad(adata, path, overwrite=overwrite)

    def _export_dialog(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export kept tiles", "", "AnnData (*.h5ad)")
        if not path:
            return
        try:
            out = self.export_kept(path, overwrite=True)
        except StgenError as e:
            self._notify(str(e), error=True)
            return
        self.status_label.setText(f"wrote {out}")

    # ------------------------------------------------------------------ workers
    def _on_finished(self, token: Any, current: bool) -> None:
        if current and token.cancelled:
            self.status_label.setText("cancelled")
        if not any(k in self.jobs.tokens for k in ("profile", "generate")):
            self.cancel_btn.setEnabled(False)

    def cancel(self) -> None:
        """Cancel the running region prediction and generation (stop at the next step)."""
        self.jobs.cancel("profile", "generate")
        self.flow.cancel()
        self.cancel_btn.setEnabled(False)

    def shutdown(self) -> None:
        """Stop timers and all work (the viewer is closing)."""
        self._live_timer.stop()
        self._region_timer.stop()
        self.live_check.setChecked(False)
        self.cancel()
        self.jobs.shutdown()

    def _notify(self, msg: str, error: bool = False) -> None:
        self.status_label.setText(msg)
        try:
            from napari.utils.notifications import show_error, show_info  # napari

            (show_error if error else show_info)(msg)
        except Exception:  # noqa: BLE001 - notifications are best effort
            pass
