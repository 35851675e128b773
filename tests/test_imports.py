"""Imports run one way: each package's modules stand on floors, and a module imports only modules on
its own floor or below, with no circle anywhere.

Every import counts: at the top of a module, inside a function (a lazy import), under
``TYPE_CHECKING``, and ``importlib.import_module("...")`` or ``__import__("...")`` with a literal
name. Hiding an import from the interpreter leaves the dependency in the design.

``FLOORS`` has one row per package: its floors bottom up, each a list of module names; a name
ending in ``.*`` stands for a subpackage and all its modules. A module of the package on no floor
fails the test, so a new module gets its floor when it is made. The floors of a package are
also written in its ``__init__.py`` docstring (gateway/__init__.py, fleet/__init__.py).

Between packages, ``PACKAGES`` is the order, bottom up (the CLI on top, fleet's spec at the
ground of everything); ``CROSSINGS`` names the imports against it, each with its reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

FLOORS: dict[str, list[list[str]]] = {
    "gateway": [
        # 0: one concept each, importing nothing of the gateway's
        ["gateway", "gateway.wire", "gateway.channel", "gateway.keys", "gateway.ledger", "gateway.limits",
         "gateway.metrics", "gateway.money", "gateway.overload", "gateway.redact", "gateway.sla", "gateway.sli",
         "gateway.logsafe", "gateway.listener"],
        # 1: the errors' shape (on wire's Reply), the router (on the channel), the state backends
        ["gateway.errors", "gateway.router", "gateway.state.*"],
        # 2: the door, the breakers, the backends' Protocols
        ["gateway.door", "gateway.risk", "gateway.backends"],
        # 3: admission; the synthetic probes
        ["gateway.admission", "gateway.probes"],
        # 4: the meter (settles what admission charged)
        ["gateway.meter"],
        # 5: the upstream call (routing, retries, relay), which ends in the meter
        ["gateway.proxy"],
        # 6: the app: the request path's wiring, background loops, FastAPI routes
        ["gateway.app"],
        # 7: the process (uvicorn, the listener)
        ["gateway.__main__"],
    ],
    "fleet": [
        # 0: where the project is; the table of provider kinds; reading Prometheus text
        ["fleet", "fleet.project", "fleet.kinds", "fleet.prometheus"],
        # 1: the schema (the stack file as a Spec); where a stack's state lives
        ["fleet.spec", "fleet.paths"],
        # 2: pure functions of the spec, one concept each
        ["fleet.capacity", "fleet.channel", "fleet.mesh_keys", "fleet.stackfile", "fleet.alerts", "fleet.canary"],
        # 3: failover: the effective spec (drained providers applied), computed once and passed on
        ["fleet.failover"],
        # 4: the gateway's routing config, from the effective spec
        ["fleet.routing"],
        # 5: the plan
        ["fleet.plan"],
        # 6: what judges the plan or carries a part of it: policy rules, the worker launch, the Ansible
        #    inventory and runner, the marketplace adapters, CI's checks
        ["fleet.policy", "fleet.launch", "fleet.inventory", "fleet.ansible_run", "fleet.marketplaces.*", "fleet.ci"],
        # 7: the carriers: Pulumi components, the local stack
        ["fleet.components.*", "fleet.local"],
        # 8: the local stack following its stack file
        ["fleet.local_apply"],
    ],
    "infermesh_cli": [
        # 0: the one exception a command raises for an operator's mistake
        ["infermesh_cli", "infermesh_cli.errors"],
        # 1: argument parsers and output cells; the Pulumi CLI's JSON answers
        ["infermesh_cli.inputs", "infermesh_cli.pulumi_cli"],
        # 2: the commands
        ["infermesh_cli.commands.*"],
        # 3: the dispatcher (it loads the commands by name)
        ["infermesh_cli.main", "infermesh_cli.__main__"],
    ],
}

# The packages bottom up: a module imports other packages' modules only from packages below its own.
PACKAGES = ["engines", "fleet", "gateway", "infermesh_cli"]
# The imports that cross that order anyway, each with its reason.
CROSSINGS = {
    ("fleet.local", "gateway.state.migrate"):
        "the local stack creates and migrates the gateway's PostgreSQL database before it starts the replicas",
}
# The gateway stands on fleet's decisions, never on its carriers (Pulumi, Ansible, the local stack).
GATEWAY_REACHES_FLEET_UP_TO = "fleet.plan"


def modules(package: str) -> dict[str, Path]:
    """Every module of a package, by dotted name (a package by its own name, for its __init__.py)."""
    root = REPO / package.replace(".", "/")
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imported(path: Path, name: str, known: set[str]) -> set[str]:
    """The modules of ``known`` that the module at ``path`` (dotted ``name``) imports, in any way."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()

    def add(target: str) -> None:
        # the module itself, or the nearest package above it that is a known module
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            out.add(target)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name if is_package else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                full = f"{base}.{alias.name}"
                add(full if full in known else base)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            f = node.func
            called = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
            if called in ("__import__", "import_module"):
                add(node.args[0].value)
    return out


def floor_of(module: str, floors: list[list[str]]) -> int | None:
    best: tuple[int, int] | None = None          # (length of the matching name, floor)
    for level, names in enumerate(floors):
        for n in names:
            if n == module or (n.endswith(".*") and (module == n[:-2] or module.startswith(n[:-1]))):
                if best is None or len(n) > best[0]:
                    best = (len(n), level)
    return None if best is None else best[1]


def graph(package: str) -> dict[str, set[str]]:
    mods = modules(package)
    return {name: imported(path, name, set(mods)) for name, path in mods.items()}


@pytest.mark.parametrize("package", sorted(FLOORS))
def test_every_module_has_a_floor(package):
    floors = FLOORS[package]
    missing = [m for m in modules(package) if floor_of(m, floors) is None]
    assert not missing, f"modules of {package} on no floor of FLOORS[{package!r}]: {missing}"
    listed = [n for names in floors for n in names if not n.endswith(".*")]
    assert not [n for n in listed if n not in modules(package)], "FLOORS names a module that does not exist"


@pytest.mark.parametrize("package", sorted(FLOORS))
def test_imports_never_go_up_a_floor(package):
    floors = FLOORS[package]
    up = []
    for module, targets in graph(package).items():
        here = floor_of(module, floors)
        for t in sorted(targets):
            there = floor_of(t, floors)
            if here is not None and there is not None and there > here:
                up.append(f"{module} (floor {here}) imports {t} (floor {there})")
    assert not up, "imports up a floor:\n" + "\n".join(up)


def circles_in(g: dict[str, set[str]]) -> list[list[str]]:
    """The import circles of a graph, each as the path that closes it."""
    circles: list[list[str]] = []
    state: dict[str, int] = {}                   # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for t in sorted(g.get(m, ())):
            if state.get(t) == 1:
                circles.append(path[path.index(t):] + [t])
            elif t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)
    return circles


@pytest.mark.parametrize("package", sorted(FLOORS))
def test_no_import_circle(package):
    circles = circles_in(graph(package))
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


def test_the_check_sees_every_kind_of_import(tmp_path):
    """Lazy, TYPE_CHECKING, relative and import_module imports are all edges."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    src = ("from typing import TYPE_CHECKING\nimport importlib\nif TYPE_CHECKING:\n    from pkg.b import X\n"
           "def f():\n    from . import c\n    importlib.import_module('pkg.d')\n    import pkg.e.f\n")
    (pkg / "a.py").write_text(src)
    known = {"pkg", "pkg.a", "pkg.b", "pkg.c", "pkg.d", "pkg.e"}
    assert imported(pkg / "a.py", "pkg.a", known) == {"pkg.b", "pkg.c", "pkg.d", "pkg.e"}
    assert floor_of("pkg.e.f", [["pkg.b"], ["pkg.e.*"]]) == 1 and floor_of("pkg.z", [["pkg.b"]]) is None


def whole_house() -> dict[str, set[str]]:
    """Every module of PACKAGES and what it imports of any of them."""
    mods: dict[str, Path] = {}
    for package in PACKAGES:
        mods.update(modules(package))
    return {name: imported(path, name, set(mods)) for name, path in mods.items()}


def test_packages_import_only_packages_below_them():
    rank = {p: i for i, p in enumerate(PACKAGES)}
    up = [f"{m} imports {t}" for m, targets in whole_house().items() for t in sorted(targets)
          if rank[t.split(".")[0]] > rank[m.split(".")[0]] and (m, t) not in CROSSINGS]
    assert not up, "imports of a package above:\n" + "\n".join(up)
    house = whole_house()       # an exception whose import went away goes too
    stale = [pair for pair in CROSSINGS if pair[1] not in house.get(pair[0], ())]
    assert not stale, f"CROSSINGS names imports that no longer exist: {stale}"


def test_no_import_circle_across_packages():
    circles = circles_in(whole_house())
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


def test_the_gateway_stands_on_fleets_decisions_only():
    top = floor_of(GATEWAY_REACHES_FLEET_UP_TO, FLOORS["fleet"])
    assert top is not None
    high = [f"{m} imports {t} (fleet floor {floor_of(t, FLOORS['fleet'])})"
            for m, targets in whole_house().items() if m.split(".")[0] == "gateway"
            for t in sorted(targets) if t.split(".")[0] == "fleet" and (floor_of(t, FLOORS["fleet"]) or 0) > top]
    assert not high, "the gateway imports a fleet carrier:\n" + "\n".join(high)
