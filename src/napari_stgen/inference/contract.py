"""What every expression predictor offers (GenST, HistoTx) and what a prediction asks for.

::

    pred: Predictor = load_predictor("default")          # inference.registry
    parts = predict_tiles(slide, pred, TileRequest(tiles, grid=grid))   # inference.engine
    spots = pred.predict_spots(slide, xy_px, SpotRequest())              # (N, G) at centres

No torch here; the predictors import it when they run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from napari_stgen.coords import Grid

if TYPE_CHECKING:  # type names only: these modules need the contract themselves
    from napari_stgen.inference.cache import TileCache
    from napari_stgen.inference.cancel import CancelToken
    from napari_stgen.inference.confidence import Confidence
    from napari_stgen.inference.engine import PartialResult
    from napari_stgen.io.slide import Slide

#: Patches (or sites) per model call, everywhere a batch size defaults.
BATCH_SIZE = 64
#: HistoTx test-time adaptation steps the CLI and widgets use (``histotx.prepare_measured``):
#: chosen by the leave-one-patient-out measurement in docs/histotx.md ("Test-time adaptation")
DEFAULT_ADAPT_STEPS = 200


class Kind(str, Enum):
    """Checkpoint kinds (the model card's ``kind``); members equal their string value."""

    GENST = "genst"
    HISTOTX = "histotx"
    STMDIT = "stmdit"

    __str__ = str.__str__  # "genst", not "Kind.GENST", in messages and file names


#: The kinds that predict expression from an image (``Predictor``).
PREDICTOR_KINDS = (Kind.GENST, Kind.HISTOTX)


@dataclass
class TileRequest:
    """Which grid cells to predict and how (``engine.predict_tiles``).

    ``tiles`` (n, 2) grid (row, col) of ``grid`` (default: the slide grid of the model's
    cell); ``cache`` / ``centre_um`` (y, x) / ``progressive`` / ``block``: GenST (see
    ``engine.predict_tiles``); ``measured`` (a ``Measured``, AnnData, .h5ad path or a
    measured-spots Points layer) and ``image_only``: HistoTx.
    """

    tiles: np.ndarray
    grid: Grid | None = None
    batch_size: int = BATCH_SIZE
    cancel: CancelToken | None = None
    cache: TileCache | None = None
    centre_um: Sequence[float] | None = None
    block: int = 24
    progressive: bool = False
    measured: Any = None
    image_only: bool = False
    skip_unreadable: bool = False  # GenST: NaN rows where pixels cannot be read, no error


@dataclass
class SpotRequest:
    """How to predict at arbitrary centres (``Predictor.predict_spots``; ``stgen predict``).

    ``grid`` + ``tiles``: the centres are these cells (GenST reads them block-wise and a
    context model sees the cells' windows); ``skip_unreadable``: NaN rows where pixels cannot
    be read; ``measured`` / ``image_only`` / ``adapt_steps``: HistoTx (measured spots).
    """

    batch_size: int = BATCH_SIZE
    progress: Callable[[int, int], None] | None = None
    grid: Grid | None = None
    tiles: np.ndarray | None = None
    skip_unreadable: bool = False
    measured: Any = None
    image_only: bool = False
    adapt_steps: int = 0


@dataclass
class SpotResult:
    """Expression at centres: ``expr`` (N, G) log1p CP10k; ``code`` (N,) gene code or None;
    ``uncertainty`` (N,) or None; ``info``: what the AnnData records under ``uns``."""

    expr: np.ndarray
    code: np.ndarray | None = None
    uncertainty: np.ndarray | None = None
    info: dict = field(default_factory=dict)


@runtime_checkable
class Predictor(Protocol):
    """A loaded expression model (GenST or HistoTx) as the engine, CLI and widgets use it.

    ``genes``: panel order of every ``expr``; ``mpp`` / ``patch_um`` / ``patch_px``: the
    patches it reads; ``confidence``: GenST's novelty scorer when its checkpoint has one,
    else None; ``n_codes`` 0 for a model without a gene codebook.
    """

    kind: str
    name: str
    checksum: str
    card: dict
    genes: list[str]
    mpp: float
    patch_um: float
    patch_px: int
    device: str
    n_codes: int
    batch_size: int
    confidence: Confidence | None

    def predict(self, patches: np.ndarray, **options: Any) -> Any:
        """Expression (and gene codes) of uint8 (N, patch_px, patch_px, 3) patches."""
        ...

    def predict_tiles(self, slide: Slide, request: TileRequest) -> Iterator[PartialResult]:
        """``PartialResult`` per batch of the request's grid cells."""
        ...

    def predict_spots(self, slide: Slide, xy_px: np.ndarray, request: SpotRequest) -> SpotResult:
        """Expression at level-0 pixel centres (x, y)."""
        ...

    def code_profiles(self) -> np.ndarray:
        """(n_codes, G) decoded profile per gene code ((0, G) without a codebook)."""
        ...
