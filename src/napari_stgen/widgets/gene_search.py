"""The gene search box shared by the widgets: case-insensitive, substring completion."""

from __future__ import annotations

from qtpy.QtCore import QStringListModel, Qt
from qtpy.QtWidgets import QCompleter, QLineEdit, QWidget


def gene_search_edit(parent: QWidget, placeholder: str) -> tuple[QLineEdit, QStringListModel]:
    """A line edit completing over a gene list; set the genes with ``model.setStringList``."""
    edit = QLineEdit()
    edit.setPlaceholderText(placeholder)
    model = QStringListModel([])
    comp = QCompleter(model, parent)
    comp.setCaseSensitivity(Qt.CaseSensitivity.CaseInsensitive)
    comp.setFilterMode(Qt.MatchFlag.MatchContains)
    edit.setCompleter(comp)
    return edit, model
