"""docs/architecture.md §3: imports only point down. interfaces → domain → kit.

Parses every module under src/surge and fails on an import that points up a layer, so the
rule holds as the code grows (a new domain package is picked up automatically).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "surge"
INTERFACES = {"app", "cli", "worker", "api", "demo", "cluster"}
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


# ---- the one service pattern (ADR 0014, CONTRIBUTING.md) -----------------------------------
#: SQLAlchemy names that build or run a query: a route never needs them.
QUERY_NAMES = {"select", "text", "insert", "update", "delete", "exists", "func", "tuple_"}
#: Calls on a session that run SQL.
SESSION_QUERIES = {"execute", "scalar", "scalars", "get", "stream", "merge"}


def _route_offences(path: Path) -> list[str]:
    """A route module may call services only: no repository, no query built or run."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for line, name in _imports(path):
        parts = name.split(".")
        if "repository" in parts:
            found.append(f"{path.name}:{line} imports {name}")
        if parts[0] == "sqlalchemy" and parts[-1] in QUERY_NAMES:
            found.append(f"{path.name}:{line} imports the query builder {name}")
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in SESSION_QUERIES
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "session"
        ):
            found.append(f"{path.name}:{node.lineno} runs a query (session.{node.func.attr})")
    return found


def _service_offences(path: Path, package: str) -> list[str]:
    """A service imports no other domain's repository, and follows the one pattern: a
    stateless ``XService`` class, one module singleton, no ``configure``, no settings kept."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for line, name in _imports(path):
        parts = name.split(".")
        if "repository" in parts and _top_level(name) not in {package, None}:
            found.append(f"{path.name}:{line} imports another domain's repository {name}")
        if name == "surge.config.settings":
            found.append(f"{path.name}:{line} reads the global settings (use runtime.settings)")
    classes = {
        node.name: node
        for node in tree.body
        if isinstance(node, ast.ClassDef) and node.name.endswith("Service")
    }
    if not classes:
        found.append(f"{path.name}: no XService class")
    singletons = [
        node
        for node in tree.body
        if isinstance(node, ast.Assign)
        and isinstance(node.value, ast.Call)
        and isinstance(node.value.func, ast.Name)
        and node.value.func.id in classes
    ]
    if not singletons:
        found.append(f"{path.name}: no module singleton (`wallet = WalletService(...)`)")
    for cls in classes.values():
        for node in ast.walk(cls):
            if (
                isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                and node.name == "configure"
            ):
                found.append(f"{path.name}:{node.lineno} {cls.name}.configure (stateless)")
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.ctx, ast.Store)
                and isinstance(node.value, ast.Name)
                and node.value.id == "self"
                and node.attr in {"settings", "db", "redis", "runtime"}
            ):
                found.append(f"{path.name}:{node.lineno} {cls.name} keeps self.{node.attr}")
    return found


def _is_route_module(path: Path) -> bool:
    """``routes.py``, and the page modules a console's routes include (``pages/*.py``)."""
    return path.name == "routes.py" or path.parent.name == "pages"


@pytest.mark.parametrize("package", _domains())
def test_routes_talk_to_services_only(package: str) -> None:
    offenders = [o for p in _modules(package) if _is_route_module(p) for o in _route_offences(p)]
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize("package", _domains())
def test_services_follow_the_one_pattern(package: str) -> None:
    services = [p for p in _modules(package) if p.name == "service.py"]
    offenders = [o for p in services for o in _service_offences(p, package)]
    assert not offenders, "\n".join(offenders)


def test_route_checker_catches_a_repository_and_a_query(tmp_path: Path) -> None:
    bad = tmp_path / "routes.py"
    bad.write_text(
        "from surge.wallet import repository\n"
        "from sqlalchemy import select\n"
        "async def handler(session):\n"
        "    return await session.execute(select(1))\n"
    )
    found = _route_offences(bad)
    assert len(found) == 3, found


def test_service_checker_catches_the_old_patterns(tmp_path: Path) -> None:
    bad = tmp_path / "service.py"
    bad.write_text(
        "from surge.identity import repository\n"
        "from surge.config import settings\n"
        "class WalletService:\n"
        "    def __init__(self, settings):\n"
        "        self.settings = settings\n"
        "    def configure(self, settings):\n"
        "        self.settings = settings\n"
        "wallet = WalletService(settings)\n"
    )
    found = _service_offences(bad, "wallet")
    assert any("another domain's repository" in o for o in found), found
    assert any("global settings" in o for o in found), found
    assert any(".configure" in o for o in found), found
    assert any("keeps self.settings" in o for o in found), found
    assert _service_offences(bad, "identity") != []  # still a configure and kept settings


def test_every_domain_has_a_service() -> None:
    """Same anatomy: a domain package has a ``service.py`` (its one entry for others)."""
    missing = [p for p in _domains() if not (SRC / p / "service.py").exists()]
    assert not missing, missing


@pytest.mark.parametrize("package", _domains())
def test_listings_share_one_page_shape(package: str) -> None:
    """Issue 12: six identical ``XPage`` classes. A listing replies ``Page[XRead]``
    (``surge.kit.web.pagination``); an alias ``XPage = Page[XRead]`` is fine."""
    offenders = []
    for path in _modules(package):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ClassDef) and node.name.endswith("Page"):
                fields = {
                    stmt.target.id
                    for stmt in node.body
                    if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                }
                if {"items", "next_cursor"} <= fields:
                    offenders.append(f"{path.relative_to(SRC)}:{node.lineno} class {node.name}")
    assert not offenders, "use kit.web.pagination.Page[T]:\n" + "\n".join(offenders)


# ---- size (issue 12): a module is read in one sitting --------------------------------------
MAX_LINES = 600


def _oversized(root: Path) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        with path.open("rb") as lines:
            count = sum(1 for _ in lines)
        if count > MAX_LINES:
            found.append(f"{path.relative_to(root)}: {count} lines")
    return found


def test_no_source_file_over_600_lines() -> None:
    """Split along a real seam (a private module behind the package face), never by
    squeezing lines: see CONTRIBUTING.md, "Size and layout"."""
    offenders = _oversized(SRC.parent)
    assert not offenders, f"over {MAX_LINES} lines:\n" + "\n".join(offenders)


def test_size_checker_counts_every_line(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "big.py").write_text("x = 1\n" * (MAX_LINES + 1))
    (tmp_path / "pkg" / "fits.py").write_text("x = 1\n" * MAX_LINES)
    assert _oversized(tmp_path) == [f"pkg/big.py: {MAX_LINES + 1} lines"]
