"""The package layers hold, read from the source (issue 22).

`common` is the bottom; `worker`, `aggregator` and `review` stand on it alone; `producer`, the
`patchq` command, ties them together, and inside it only the `*_command` modules and `cli`
know argparse, so services can be called with plain values. Every import counts, including
those inside functions (kept lazy so that light commands never load torch) and under
TYPE_CHECKING: a lazy import still couples the modules. Pure `ast`, nothing is imported.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REPO_PACKAGES = (
    "common",
    "worker",
    "aggregator",
    "review",
    "producer",
    "tests",
    "bench",
    "synthetic",
)
MAY_IMPORT = {
    "common": {"common"},
    "worker": {"common", "worker"},
    "aggregator": {"common", "aggregator"},
    "review": {"common", "review"},
    "producer": {"common", "worker", "aggregator", "review", "producer"},
}  # the product's packages; tests, bench and synthetic are in no list: none is imported


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int

    def __str__(self) -> str:
        return f"{self.importer} imports {self.imported} (line {self.line})"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def product_modules() -> dict[str, Path]:
    return {
        module_name(path): path
        for package in MAY_IMPORT
        for path in sorted((REPO / package).rglob("*.py"))
    }


def imported_names(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool) -> list[str]:
    """Dotted names an import statement may load: `from a import b` names both a.b and a."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: resolved against the importer's package
        package = importer.split(".")
        anchor = package[: len(package) - node.level + (1 if is_package else 0)]
        base = ".".join([*anchor, *filter(None, [node.module])])
    return [f"{base}.{alias.name}" for alias in node.names] + [base]


def repo_imports(name: str, path: Path, known: set[str]) -> Iterator[Import]:
    """Each repository module `name` imports, once per statement, wherever the statement is."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Import | ast.ImportFrom):
            continue
        targets = imported_names(node, name, is_package)
        if isinstance(node, ast.ImportFrom):  # `from a import b`: the module a.b, else a
            targets = [t for t in targets[:-1] if t in known] or targets[-1:]
        for target in dict.fromkeys(targets):
            if target.split(".")[0] in REPO_PACKAGES and target != name:
                yield Import(name, _nearest_module(target, known), node.lineno)


def _nearest_module(target: str, known: set[str]) -> str:
    """`import a.b.c` or `from a.b import f`: the longest prefix that is a product module."""
    parts = target.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in known:
            return ".".join(parts[:end])
    return target  # tests, bench, or a module that does not exist: kept as written


def all_imports() -> list[Import]:
    modules = product_modules()
    known = set(modules)
    return [found for name, path in modules.items() for found in repo_imports(name, path, known)]


def is_command(module: str) -> bool:
    return module == "producer.cli" or (
        module.startswith("producer.") and module.endswith("_command")
    )


def find_cycle(edges: dict[str, dict[str, Import]]) -> list[Import] | None:
    """One import cycle among the modules, as the imports that close it; None if there is none."""
    done: set[str] = set()
    path: list[str] = []  # the modules being visited, each importing the next
    steps: list[Import] = []  # steps[i]: path[i] imports path[i + 1]

    def visit(module: str) -> list[Import] | None:
        path.append(module)
        for step in sorted(edges.get(module, {}).values(), key=str):
            if step.imported in path:
                return [*steps[path.index(step.imported) :], step]
            if step.imported not in done:
                steps.append(step)
                if cycle := visit(step.imported):
                    return cycle
                steps.pop()
        done.add(path.pop())
        return None

    for module in sorted(edges):
        if module not in done and (cycle := visit(module)):
            return cycle
    return None


def test_no_import_cycle() -> None:
    edges: dict[str, dict[str, Import]] = {}
    for found in all_imports():
        edges.setdefault(found.importer, {}).setdefault(found.imported, found)
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle:\n  " + "\n  ".join(map(str, cycle or []))


def test_each_package_imports_only_the_layers_below() -> None:
    wrong = [
        found
        for found in all_imports()
        if found.imported.split(".")[0] not in MAY_IMPORT[found.importer.split(".")[0]]
    ]
    allowed = "; ".join(f"{p} may import {', '.join(sorted(m))}" for p, m in MAY_IMPORT.items())
    assert not wrong, f"imports across the layers ({allowed}):\n  " + "\n  ".join(map(str, wrong))


def test_only_commands_import_commands() -> None:
    """Services take plain values, so nothing but a command needs the argparse side."""
    wrong = [
        found
        for found in all_imports()
        if found.importer.startswith("producer.")
        and not is_command(found.importer)
        and is_command(found.imported)
    ]
    assert not wrong, "services importing a command module or cli:\n  " + "\n  ".join(
        map(str, wrong)
    )


def test_no_namespace_reaches_a_service() -> None:
    """argparse belongs to the commands: a service that imports it is handed a Namespace."""
    wrong = [
        f"{name} imports argparse"
        for name, path in product_modules().items()
        if not is_command(name) and _imports_argparse(path)
    ]
    assert not wrong, "argparse outside the commands:\n  " + "\n  ".join(wrong)


def _imports_argparse(path: Path) -> bool:
    return any(
        (isinstance(node, ast.Import) and any(a.name == "argparse" for a in node.names))
        or (isinstance(node, ast.ImportFrom) and node.module == "argparse")
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
    )
