"""One raw row of a dataset, read through a config's column mapping (multiple-choice `columns`,
SFT `sft`): each value a column or a Jinja2 template over the row; a problem is one DataError
naming the row and the column (`file row N, column 'x': problem`)."""

from __future__ import annotations

import json

from flexora_cli.data.templates import TemplateError, is_template, render
from flexora_cli.errors import DataError

LETTERS = "ABCDEFGH"


class Row:
    """One row, read through the column mapping; problems are `where, column 'x': problem`."""

    def __init__(self, raw: object, where: str, mapping: str = "dataset.columns"):
        if not isinstance(raw, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(raw).__name__}")
        self.raw, self.where, self.mapping = raw, where, mapping

    def fail(self, source: str, problem: str) -> DataError:
        what = f"template {source!r}" if is_template(source) else f"column '{source}'"
        return DataError(f"{self.where}, {what}: {problem}")

    def value(self, source: str) -> object:
        """The column's value, or the template rendered over the row."""
        if is_template(source):
            try:
                return render(source, self.raw)
            except TemplateError as exc:
                raise self.fail(source, str(exc)) from exc
        if source not in self.raw:
            columns = ", ".join(list(self.raw)[:12])
            raise self.fail(source, f"missing (the row has {columns}); fix {self.mapping}")
        return self.raw[source]

    def text(self, source: str, allow_empty: bool = False) -> str:
        value = self.value(source)
        if value is None or value != value:  # an empty CSV cell reads as None or NaN
            value = ""
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)  # CSV readers type "1999" as a number
        if not isinstance(value, str):
            raise self.fail(source, f"expected text, got {json.dumps(value, default=str)[:80]}")
        if not allow_empty and not value.strip():
            raise self.fail(source, "renders nothing; fix the template" if is_template(source) else "empty")
        return value

    def choices(self, spec: str | list) -> list[str]:
        if isinstance(spec, list):
            return [self.text(source) for source in spec]
        value = self.value(spec)
        if not isinstance(value, list):
            raise self.fail(spec, f"expected a list of choices, got {json.dumps(value, default=str)[:80]}")
        if not all(isinstance(v, str) and v.strip() for v in value):
            raise self.fail(spec, f"expected a list of non-empty texts, got {json.dumps(value)[:80]}")
        return value

    def label(self, source: str, label_format: str, choices: list[str]) -> int:
        """The gold choice's index, from an index, a 1-based number, a letter or the answer's text."""
        value = self.value(source)
        shown = str(value).strip()
        if label_format == "text":
            valid = choices
        elif label_format == "letter":
            valid, shown = list(LETTERS[: len(choices)]), shown.upper()
        else:
            base = 0 if label_format == "index" else 1
            valid = [str(i + base) for i in range(len(choices))]
            if isinstance(value, float) and value.is_integer():
                shown = str(int(value))
        if shown not in valid:
            hint = (
                " (unlabelled split? evaluate on a labelled one)"
                if shown in ("", "-1", "None", "nan")
                else ""
            )
            expected = "one of the choices' texts" if label_format == "text" else ", ".join(valid)
            raise self.fail(source, f"label {value!r} out of range, expected {expected}{hint}")
        return valid.index(shown)
