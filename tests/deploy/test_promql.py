"""The PromQL selector extraction that the dashboard and alert tests rely on."""

from __future__ import annotations

import pytest
from promql import selectors, substitute, variable_promql


def names(expr: str) -> list[str]:
    return [s.name for s in selectors(expr)]


def test_functions_aggregations_and_grouping_labels_are_not_metrics():
    expr = (
        "histogram_quantile(0.95, sum by (instance, le) (rate(dcar_request_duration_seconds_bucket"
        '{job="dcar", endpoint=~"/v1/generate|/v1/edit"}[5m])))'
    )
    [sel] = selectors(expr)
    assert sel.name == "dcar_request_duration_seconds_bucket"
    assert sel.matchers == [("job", "=", "dcar"), ("endpoint", "=~", "/v1/generate|/v1/edit")]


def test_binary_operators_postfix_grouping_and_vector_matching():
    expr = (
        "sum(rate(a_total[1m])) by (task) / on (task) group_left(x) sum without (le) (b_count) "
        "and ignoring (instance) c > bool 0.5 unless d offset 5m"
    )
    assert names(expr) == ["a_total", "b_count", "c", "d"]


def test_strings_numbers_durations_and_subqueries_hold_no_metrics():
    expr = (
        'label_replace(max_over_time(up{job="x"}[10m:30s]), "dst", "$1 rate(fake[1m])", "src", "(.*)") '
        "* 1e3 + Inf - 0x1F"
    )
    assert names(expr) == ["up"]


def test_name_matcher_and_colon_names():
    assert names('{__name__="dcar_queue_size", instance="a"} + job:dcar_images:rate5m') == [
        "dcar_queue_size",
        "job:dcar_images:rate5m",
    ]
    with pytest.raises(ValueError, match="without a metric name"):
        selectors('{job="x"}')


def test_escaped_quotes_in_label_values():
    [sel] = selectors(r'x{a="say \"hi\"", b=~' + "'it\\'s'}")
    assert sel.matchers == [("a", "=", 'say "hi"'), ("b", "=~", "it's")]


def test_grafana_variables_are_substituted_and_unknown_ones_refused():
    assert (
        substitute(
            'rate(x{i=~"$instance"}[$__rate_interval]) + ${a} + [[b]] + ${c:regex}',
            {"instance": ".*", "__rate_interval": "30s", "a": "1", "b": "2", "c": "3"},
        )
        == 'rate(x{i=~".*"}[30s]) + 1 + 2 + 3'
    )
    with pytest.raises(KeyError, match=r"\$nope"):
        substitute("x[$nope]", {})


def test_variable_queries():
    assert (
        variable_promql('label_values(dcar_model_info{job="dcar"}, instance)')
        == 'dcar_model_info{job="dcar"}'
    )
    assert variable_promql("query_result(topk(3, up))") == "topk(3, up)"
