"""ARCHITECTURE §3: imports only point down. interfaces → domain → kit.

Parses every module under src/surge and fails on an import that points up a layer, so the
rule holds as the code grows (a new domain package is picked up automatically).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "surge"
INTERFACES = {"app", "cli", "worker", "api", "demo"}
#: Modules below the domains that any layer may use.
FOUNDATION = {"kit", "config", "models", "sim"}


def _top_level(name: str) -> str | None:
    parts = name.split(".")
    if parts[0] != "surge":
        return None
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def _modules(package: str) -> list[Path]:
    return sorted((SRC / package).rglob("*.py")) if (SRC / package).is_dir() else []


def test_kit_imports_no_domain_nor_interface() -> None:
    offenders = []
    for path in _modules("kit"):
        for line, name in _imports(path):
            top = _top_level(name)
            if top is None or top in {"", "kit", "config"}:
                continue
            offenders.append(f"{path.relative_to(SRC)}:{line} imports {name}")
    assert not offenders, "surge.kit must stay domain-free:\n" + "\n".join(offenders)


def test_kit_has_no_domain_words() -> None:
    words = ("wallet", "partner", "reseller", "withdrawal", "subscription", "privilege")
    offenders = [
        f"{path.relative_to(SRC)}: {word}"
        for path in _modules("kit")
        for word in words
        if word in path.read_text().lower()
    ]
    assert not offenders, "domain words inside surge.kit:\n" + "\n".join(offenders)


def _domains() -> list[str]:
    return sorted(
        p.name
        for p in SRC.iterdir()
        if p.is_dir() and (p / "__init__.py").exists() and p.name not in FOUNDATION | INTERFACES
    )


@pytest.mark.parametrize("package", ["models", *_domains()])
def test_domains_do_not_import_interfaces(package: str) -> None:
    offenders = [
        f"{path.relative_to(SRC)}:{line} imports {name}"
        for path in _modules(package)
        for line, name in _imports(path)
        if _top_level(name) in INTERFACES
    ]
    assert not offenders, "\n".join(offenders)


def test_checker_catches_an_upward_import(tmp_path: Path) -> None:
    """The checker itself can fail: a kit-like module importing a domain is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("from surge.wallet.service import wallet\nimport surge.app\n")
    names = [name for _, name in _imports(bad)]
    assert {_top_level(n) for n in names} >= {"wallet", "app"}


@pytest.mark.parametrize("package", ["kit", "models", *_domains()])
def test_only_interfaces_start_simulators(package: str) -> None:
    """The simulators stand for the world outside: product code reaches them by URL only."""
    offenders = [
        f"{path.relative_to(SRC)}:{line} imports {name}"
        for path in _modules(package)
        for line, name in _imports(path)
        if _top_level(name) == "sim"
    ]
    assert not offenders, "\n".join(offenders)
