"""Selection rules on hand-made α̂ vectors."""

from __future__ import annotations

import pytest

from flexora_cli.errors import ConfigError, FlexoraError
from flexora_cli.method import explicit_layers, select_layers
from flexora_cli.settings import SelectSettings

ALPHA = [0.4, -0.3, 0.0, 0.9, -0.5, -0.5]
PARAMS = [100, 100, 100, 300, 100, 100]


def test_positive_keeps_layers_above_zero():
    assert select_layers(ALPHA, "positive") == [0, 3]


def test_positive_with_flat_alpha_is_an_error_not_an_empty_selection():
    with pytest.raises(FlexoraError, match="no layer has α̂ > 0"):
        select_layers([0.0] * 4, "positive")


def test_top_k_takes_the_k_best():
    assert select_layers(ALPHA, "top_k", k=3) == [0, 2, 3]
    assert select_layers(ALPHA, "top_k", k=6) == list(range(6))


@pytest.mark.parametrize("k", [0, 7, None])
def test_top_k_out_of_range(k):
    with pytest.raises(ConfigError, match="select.k"):
        select_layers(ALPHA, "top_k", k=k)


def test_budget_fills_in_rank_order_within_max_params():
    # ranking 3 (300), 0 (100), 2 (100), 1 (100), ...
    assert select_layers(ALPHA, "budget", max_params=400, params_per_layer=PARAMS) == [0, 3]
    assert select_layers(ALPHA, "budget", max_params=250, params_per_layer=PARAMS) == [0, 2]  # skips the 300


def test_budget_below_cheapest_layer():
    with pytest.raises(ConfigError, match="max_params=50"):
        select_layers(ALPHA, "budget", max_params=50, params_per_layer=PARAMS)


def test_explicit_layers_and_all():
    assert explicit_layers(SelectSettings(layers=[5, 1]), 6) == [1, 5]
    assert explicit_layers(SelectSettings(layers="all"), 3) == [0, 1, 2]
    with pytest.raises(ConfigError, match=r"\[6\] out of range"):
        explicit_layers(SelectSettings(layers=[1, 6]), 6)
