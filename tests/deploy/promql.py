"""Reading the shipped observability files: PromQL selectors, Grafana variables, dashboard and alert queries.

``selectors(expr)`` walks a PromQL expression token by token and returns every series selector in it (metric
name plus label matchers), skipping function and aggregation names, keywords, grouping label lists (``by``,
``without``, ``on``, ``ignoring``, ``group_left``, ``group_right``), strings, numbers and range or subquery
brackets. Names keep their exposition suffixes (``_bucket``, ``_sum``, ``_count``, ``_total``, ``_info``), which
is what a query names and what ``/metrics`` exposes. Imported by the tests of this folder as ``promql``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "docker" / "grafana" / "dashboards" / "dcar.json"
ALERTS = REPO / "docker" / "prometheus" / "alerts.yml"
PROMETHEUS_CONFIG = REPO / "docker" / "prometheus" / "prometheus.yml"

TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<comment>\#[^\n]*)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<duration>(?:\d+(?:ms|[smhdwy]))+(?![\w:]))
  | (?P<number>0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=,(){}\[\]@])
""",
    re.VERBOSE,
)

# Keywords followed by a parenthesised list of label names (not an expression).
LABEL_LIST_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
# Words that are never series names where they stand alone.
KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}
MATCH_OPS = {"=", "!=", "=~", "!~"}


@dataclass
class Selector:
    """A series selector: ``name{label op "value", ...}``."""

    name: str
    matchers: list[tuple[str, str, str]] = field(default_factory=list)


def tokenize(expr: str) -> list[tuple[str, str]]:
    tokens, pos = [], 0
    while pos < len(expr):
        m = TOKEN.match(expr, pos)
        if m is None:
            raise ValueError(f"cannot tokenize PromQL at {pos}: {expr[pos : pos + 30]!r} in {expr!r}")
        pos = m.end()
        if m.lastgroup not in ("space", "comment"):
            tokens.append((m.lastgroup, m.group()))
    return tokens


def _unquote(text: str) -> str:
    body = text[1:-1]
    if text[0] == "`":
        return body  # raw string: no escapes
    if text[0] == "'":
        body = body.replace("\\'", "'").replace('"', '\\"')
    return json.loads(f'"{body}"')  # Go's escapes, as far as PromQL uses them, are JSON's


def _closing(tokens: list[tuple[str, str]], i: int, open_: str, close: str) -> int:
    """Index of the token closing the bracket opened at ``i``."""
    depth = 0
    for j in range(i, len(tokens)):
        if tokens[j] == ("op", open_):
            depth += 1
        elif tokens[j] == ("op", close):
            depth -= 1
            if depth == 0:
                return j
    raise ValueError(f"unbalanced {open_!r} in PromQL")


def _matchers(tokens: list[tuple[str, str]], i: int, j: int, expr: str) -> list[tuple[str, str, str]]:
    """Matchers between ``{`` at ``i`` and ``}`` at ``j``."""
    out, k = [], i + 1
    while k < j:
        if tokens[k] == ("op", ","):
            k += 1
            continue
        (kind_l, label), (kind_o, op), (kind_v, value) = tokens[k : k + 3]
        if kind_l != "ident" or kind_o != "op" or op not in MATCH_OPS or kind_v != "string":
            raise ValueError(f"bad label matcher at {tokens[k : k + 3]} in {expr!r}")
        out.append((label, op, _unquote(value)))
        k += 3
    return out


def selectors(expr: str) -> list[Selector]:
    """Every series selector in ``expr`` (Grafana variables must be substituted first)."""
    tokens = tokenize(expr)
    found: list[Selector] = []
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        nxt = tokens[i + 1] if i + 1 < len(tokens) else ("", "")
        if kind == "op" and text == "[":
            i = _closing(tokens, i, "[", "]") + 1  # range or subquery: durations only
        elif kind == "op" and text == "{":  # a selector without a name: {__name__="..."}
            j = _closing(tokens, i, "{", "}")
            matchers = _matchers(tokens, i, j, expr)
            names = [v for label, op, v in matchers if label == "__name__" and op == "="]
            if not names:
                raise ValueError(f"a selector without a metric name in {expr!r}")
            found.append(Selector(names[0], matchers))
            i = j + 1
        elif kind == "ident":
            low = text.lower()
            if low in LABEL_LIST_KEYWORDS and nxt == ("op", "("):
                i = _closing(tokens, i + 1, "(", ")") + 1
            elif (
                low in KEYWORDS
                or nxt == ("op", "(")
                or (nxt[0] == "ident" and nxt[1].lower() in ("by", "without"))
            ):
                i += 1  # keyword, function call, or aggregation (also with a leading by/without clause)
            elif nxt == ("op", "{"):
                j = _closing(tokens, i + 1, "{", "}")
                found.append(Selector(text, _matchers(tokens, i + 1, j, expr)))
                i = j + 1
            else:
                found.append(Selector(text))
                i += 1
        else:
            i += 1
    return found


# --- Grafana ---------------------------------------------------------------------------------------------

GRAFANA_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)")


def substitute(expr: str, variables: dict[str, str]) -> str:
    """Replace ``$name``, ``${name}``, ``${name:fmt}`` and ``[[name]]``; an unknown variable is an error."""

    def repl(m: re.Match) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        if name not in variables:
            raise KeyError(f"Grafana variable ${name} has no value for the test (in {expr!r})")
        return variables[name]

    return GRAFANA_VARIABLE.sub(repl, expr)


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_variables(dash: dict, rate_interval: str = "1m") -> dict[str, str]:
    """Values for every variable the dashboard defines ("All" where allowed) and Grafana's built-ins."""
    values = {
        "__rate_interval": rate_interval,
        "__interval": rate_interval,
        "__range": "1h",
        "__range_s": "3600",
        "__interval_ms": "60000",
    }
    for var in dash.get("templating", {}).get("list", []):
        if var.get("includeAll"):
            values[var["name"]] = var.get("allValue") or ".*"
        else:
            current = var.get("current", {}).get("value")
            values[var["name"]] = current[0] if isinstance(current, list) else str(current)
    return values


def panels(dash: dict) -> list[dict]:
    """Every panel, also those nested in rows."""
    out = []
    for p in dash.get("panels", []):
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def dashboard_queries(dash: dict) -> list[tuple[str, str]]:
    """(where, PromQL with Grafana variables substituted) for every panel target and query variable."""
    values = dashboard_variables(dash)
    out = []
    for p in panels(dash):
        for t in p.get("targets", []):
            if t.get("expr"):
                out.append((f"panel {p['title']!r} {t.get('refId')}", substitute(t["expr"], values)))
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        q = var.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        out.append((f"variable ${var['name']}", substitute(variable_promql(q), values)))
    return out


def variable_promql(query: str) -> str:
    """The PromQL inside a Grafana Prometheus variable query (``label_values(sel, label)``, ``query_result(q)``)."""
    m = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*", query, re.S)
    if m:
        return m.group(1)
    m = re.fullmatch(r"\s*query_result\((.*)\)\s*", query, re.S)
    if m:
        return m.group(1)
    raise ValueError(f"unsupported Grafana variable query {query!r}")


def panel_target(dash: dict, title: str, legend: str | None = None) -> str:
    """The expression of the panel titled ``title`` (the target with ``legend``, else its only target)."""
    matches = [p for p in panels(dash) if p.get("title") == title]
    assert len(matches) == 1, f"{len(matches)} panels titled {title!r}"
    targets = matches[0]["targets"]
    if legend is not None:
        targets = [t for t in targets if t.get("legendFormat") == legend]
    assert len(targets) == 1, f"panel {title!r}: {len(targets)} targets with legend {legend!r}"
    return targets[0]["expr"]


# --- Prometheus rules ------------------------------------------------------------------------------------


def alert_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every alerting and recording rule of alerts.yml."""
    rules = yaml.safe_load(ALERTS.read_text())
    out = []
    for group in rules["groups"]:
        for rule in group["rules"]:
            name = rule.get("alert") or rule.get("record")
            out.append((f"rule {name}", rule["expr"]))
    return out
