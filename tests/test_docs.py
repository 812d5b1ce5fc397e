"""The README is the front door: short, and every page of docs/ is one link away; no link points nowhere."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def markdown_files() -> list[Path]:
    return [
        REPO / "README.md",
        *sorted((REPO / "docs").glob("*.md")),
        REPO / "weights" / "README.md",
        REPO / "tests" / "golden" / "README.md",
    ]


def test_readme_is_short_and_links_every_docs_page():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    linked = {m.group(1) for m in LINK.finditer(readme)}
    pages = {f"docs/{p.name}" for p in (REPO / "docs").glob("*.md")}
    assert pages and pages <= linked, f"not linked from README.md: {sorted(pages - linked)}"
    assert "make serve" in readme and "make test" in readme


def test_relative_links_point_at_files_that_exist():
    broken = []
    for md in markdown_files():
        for m in LINK.finditer(md.read_text()):
            target = m.group(1).split("#")[0]
            if not target or re.match(r"^[a-z]+:", target):  # in-page anchors, http(s), mailto
                continue
            if not (md.parent / target).exists():
                broken.append(f"{md.relative_to(REPO)} -> {m.group(1)}")
    assert not broken, broken


# --- what the docs claim about the code: settings, flags, commands, metrics, error codes --------------------------

DCAR_VAR = re.compile(r"\bDCAR_[A-Z0-9_]+")
BACKTICKED = re.compile(r"`([^`]+)`")
# DCAR_* names in the docs that are not server settings, and the file that reads each
NOT_SETTINGS = {
    "DCAR_GOLDEN_DIR": "tests/golden/README.md",
    "DCAR_UI_WEIGHTS": "tests/ui/conftest.py",
    "DCAR_PUBLISH_PORT": "docker-compose.yml",
}


def table(text: str, header: str) -> list[list[str]]:
    """The rows (cells stripped; ``\\|`` kept inside a cell) of the Markdown table whose header line starts so."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = re.split(r"(?<!\\)\|", line.strip())[1:-1]
        rows.append([c.strip() for c in cells])
    return rows


def serve_parser():
    from dcar.cli.main import build_parser

    return build_parser("serve").commands["serve"]


def shown(value) -> str:
    """A settings default as the docs write it: true/false, 2 for 2.0."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def test_the_settings_table_matches_server_settings():
    from typing import Literal, get_args, get_origin

    from dcar.server.settings import Settings

    fields = Settings.model_fields
    options = {o: a.dest for a in serve_parser()._actions for o in a.option_strings}
    documented_flags = {}
    problems = []
    for name_cell, flag_cell, default_cell, meaning in table(
        (REPO / "docs" / "serving.md").read_text(), "| setting | flag |"
    ):
        names = [n.removeprefix("DCAR_").lower() for n in DCAR_VAR.findall(name_cell)]
        unknown = [n for n in names if n not in fields]
        if unknown:
            problems.append(f"{name_cell}: no such setting {unknown}")
            continue
        # "`127.0.0.1` / `8000`" for two settings in one row; "`67108864` (64 MiB)"; prose is not checked
        if default_cell.startswith("`"):
            literals = BACKTICKED.findall(default_cell)[: len(names)]
            for name, literal in zip(names, literals):
                default = fields[name].get_default(call_default_factory=True)
                if literal != shown(default):
                    problems.append(f"DCAR_{name.upper()}: documented default {literal}, code {default!r}")
        for name, flag in zip(names, re.findall(r"--[a-z-]+", flag_cell)):
            documented_flags[flag] = name
            if options.get(flag) != name:
                problems.append(f"DCAR_{name.upper()}: {flag} is not a dcar serve flag of this setting")
        for name in names:  # every value a Literal setting takes (e.g. log_level's critical)
            annotation = fields[name].annotation
            for value in get_args(annotation) if get_origin(annotation) is Literal else ():
                if f"`{value}`" not in meaning:
                    problems.append(f"DCAR_{name.upper()}: the value {value!r} is not documented")
    for flag, dest in options.items():
        if dest in fields and flag not in documented_flags:
            problems.append(f"dcar serve {flag} (DCAR_{dest.upper()}) is not in the settings table")
    assert not problems, problems


def test_every_dcar_variable_the_docs_name_exists():
    from dcar.server.settings import Settings

    settings = {f"DCAR_{name.upper()}" for name in Settings.model_fields}
    named = {}
    for path in [*markdown_files(), REPO / "docker-compose.yml", *(REPO / "deploy").rglob("*.yaml")]:
        for var in DCAR_VAR.findall(path.read_text()):
            named.setdefault(var, path.relative_to(REPO))
    unknown = {v: str(p) for v, p in named.items() if v not in settings and v not in NOT_SETTINGS}
    assert not unknown, f"DCAR_* names that are no setting: {unknown}"
    for var, reader in NOT_SETTINGS.items():
        assert var in (REPO / reader).read_text(), f"{var}: {reader} no longer reads it"


def test_every_command_and_make_target_is_documented():
    from dcar.cli.main import COMMANDS, build_parser

    rows = [r[0] for r in table((REPO / "docs" / "serving.md").read_text(), "| command | what it does |")]
    for name in COMMANDS:
        assert any(f"`dcar {name}" in cell for cell in rows), f"dcar {name} is not in docs/serving.md"
    train = build_parser("train").commands["train"]
    subcommands = next(a.choices for a in train._actions if getattr(a, "choices", None))
    train_row = next(cell for cell in rows if cell.startswith("`dcar train"))
    missing = [s for s in subcommands if s not in train_row]
    assert not missing, f"dcar train {missing} not in docs/serving.md's command table"

    makefile = (REPO / "Makefile").read_text()
    phony = re.search(r"^\.PHONY:(.*)$", makefile, re.M).group(1).split()
    development = (REPO / "docs" / "development.md").read_text()
    missing = [t for t in phony if f"`make {t}" not in development]
    assert not missing, f"make targets not in docs/development.md: {missing}"


def test_every_benchmark_script_is_in_docs_performance():
    performance = (REPO / "docs" / "performance.md").read_text()
    scripts = [
        p.name
        for p in sorted((REPO / "benchmarks").glob("*.py"))
        if '__name__ == "__main__"' in p.read_text()
    ]
    assert scripts
    missing = [s for s in scripts if f"`benchmarks/{s}`" not in performance]
    assert not missing, f"not in docs/performance.md's script table: {missing}"


def test_the_metrics_table_matches_what_the_server_exports():
    from prometheus_client import generate_latest

    from dcar.server.guard import ConnectionGuard
    from dcar.server.metrics import Metrics
    from dcar.server.settings import Settings

    metrics = Metrics()
    metrics.watch_gpu_memory(lambda: 0.0, lambda: 0.0)  # CUDA only, documented all the same
    ConnectionGuard(Settings(), metrics.registry)
    text = generate_latest(metrics.registry).decode()
    exported = {m.group(1) for m in re.finditer(r"^# TYPE (dcar_\w+) ", text, re.M)}

    rows = {}
    for row in table((REPO / "docs" / "serving.md").read_text(), "| metric | type |"):
        for name in BACKTICKED.findall(row[0]):
            rows[name] = " ".join(row)
    documented = {n for n in rows if n.startswith("dcar_")}
    assert exported - documented == set(), f"exported, not in docs/serving.md: {exported - documented}"
    assert documented - exported == set(), f"in docs/serving.md, not exported: {documented - exported}"
    # every label value that exists from the start is named in its row (info metrics carry data, not values)
    for m in re.finditer(r"^(dcar_\w+?)(?:_bucket|_count|_sum)?\{([^}]*)\}", text, re.M):
        name = m.group(1)
        if name.endswith("_info") or name not in rows:
            continue
        for label, value in re.findall(r'(\w+)="([^"]*)"', m.group(2)):
            if label != "le":
                assert f"`{label}`" in rows[name] and f"`{value}`" in rows[name], (name, label, value)


def test_every_error_code_is_in_the_errors_table_of_docs_api():
    statuses = {}
    for status, _when, codes in table((REPO / "docs" / "api.md").read_text(), "| status | when |"):
        statuses[status] = set(BACKTICKED.findall(codes))
    raised = set()
    for path in (REPO / "server").glob("*.py"):
        source = path.read_text()
        # ApiError(400, "invalid_value", ...), json_error(415, "...", ...), _raw_response("408 Request
        # Timeout", "request_timeout", ...), and errors.py's codes = {405: "method_not_allowed", ...}
        raised |= set(re.findall(r'\(\s*(\d{3}),\s*"([a-z][a-z0-9_]+)"', source))
        raised |= set(re.findall(r'"(\d{3}) [A-Za-z ]+",\s*"([a-z][a-z0-9_]+)"', source))
        for mapping in re.findall(r"codes = \{([^}]*)\}", source):
            raised |= set(re.findall(r'(\d{3}): "([a-z][a-z0-9_]+)"', mapping))
    raised.discard(("499", "cancelled"))  # a job whose client left: nobody reads its error
    assert len(raised) > 20
    missing = sorted((s, c) for s, c in raised if c not in statuses.get(s, set()))
    assert not missing, f"(status, code) not in docs/api.md's error table: {missing}"
