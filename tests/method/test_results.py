"""The typed results round-trip through JSON and name what a damaged file lacks."""

from __future__ import annotations

import json

import pytest

from flexora_cli.errors import DamagedArtifactError, MissingArtifactError
from flexora_cli.method import SearchResult, Selection, ranking


def search_result(alpha: list[float]) -> SearchResult:
    return SearchResult(
        alpha=alpha, ranking=ranking(alpha), scaled_alpha=[1.0] * len(alpha), alpha_sum=sum(alpha),
        lora_params_per_layer=[10] * len(alpha), hypergradient="darts", unroll_steps=0, steps=3,
        seconds=1.5, padding_waste=0.1, num_processes=1, precision="fp32", max_grad_norm=1.0,
        nonfinite_steps_skipped=0, history=[{"step": 1, "alpha": alpha}],
    )  # fmt: skip


def test_search_result_and_selection_round_trip(tmp_path):
    result = search_result([0.2, -0.1, -0.1])
    path = tmp_path / "alpha.json"
    path.write_text(json.dumps(result.to_json()))
    assert json.loads(path.read_text())["num_layers"] == 3  # for readers of the file
    assert SearchResult.read(path, "search", "select") == result
    selection = Selection(
        layers=[0], rule="positive", trainable_params=10, num_layers=3, all_layers_params=30
    )
    assert Selection.from_json(json.loads(json.dumps(selection.to_json()))) == selection


def test_missing_and_damaged_files_are_one_clear_line(tmp_path):
    path = tmp_path / "alpha.json"
    with pytest.raises(MissingArtifactError, match="`flexora search` writes"):
        SearchResult.read(path, "search", "select")
    path.write_text(json.dumps({"alpha": [0.1], "ranking": [0]}))
    with pytest.raises(DamagedArtifactError, match="lacks alpha_sum, hypergradient.*rerun `flexora search`"):
        SearchResult.read(path, "search", "select")
    with pytest.raises(DamagedArtifactError, match=r"lacks \(not an object\)"):
        Selection.from_json([1, 2], path)
