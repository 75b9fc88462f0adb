"""The import rules of the code base, checked on the source with `ast` (nothing is imported).

- No circle between files: every import counts, at module level or inside a function.
- The networks (esc_stream.models) import no device code (esc_stream.native, esc_stream.cuda).
- No `_private` name (module or attribute) is imported from another package.
- Nothing imports the repository's top-level folders `vs_plugin`, `demo` or `training` by those names: the
  wheel installs them as `esc_stream.vapoursynth`, `esc_stream.demo` and `esc_stream.training`.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# repository folder -> the package name it is installed as (pyproject.toml's package-dir)
PACKAGES = {
    "esc_stream": "esc_stream",
    "vs_plugin": "esc_stream.vapoursynth",
    "demo": "esc_stream.demo",
    "training": "esc_stream.training",
}


def module_files() -> dict[str, Path]:
    """Installed module name -> source file, for every Python file of the four packages."""
    out: dict[str, Path] = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            if "runs" in rel.parts or any(not p.isidentifier() for p in rel.parts):
                continue
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


MODULES = module_files()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _absolute(module: str, level: int, target: str | None) -> str:
    """The absolute name of a relative import `from .{level}{target} import ...` written in `module`."""
    if level == 0:
        return target or ""
    base = module.split(".")
    if not _is_package(module):
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, target] if target else base)


def imports_of(module: str) -> list[tuple[str, str, int]]:
    """(imported module, imported name or "", line) for every import statement in `module`'s file."""
    tree = ast.parse(MODULES[module].read_text(), str(MODULES[module]))
    found: list[tuple[str, str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((alias.name, "", node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(module, node.level, node.module)
            found.extend((source, alias.name, node.lineno) for alias in node.names)
    return found


def _target(source: str, name: str) -> str | None:
    """The project file an import reaches: the submodule when `name` is one, else the module itself."""
    if name and f"{source}.{name}" in MODULES:
        return f"{source}.{name}"
    return source if source in MODULES else None


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for module in MODULES:
        for source, name, _ in imports_of(module):
            target = _target(source, name)
            if target is not None and target != module:
                edges[module].add(target)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one file (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def _package_of(module: str) -> str:
    return module if _is_package(module) else module.rpartition(".")[0]


def _private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def private_imports() -> list[str]:
    bad = []
    for module in MODULES:
        here = _package_of(module)
        for source, name, line in imports_of(module):
            target = _target(source, name)
            if target is None:  # a third-party module: its own business
                continue
            names = [*source.split("."), *([name] if name else [])]
            if any(_private(p) for p in names) and _package_of(target) != here:
                shown = f"from {source} import {name}" if name else f"import {source}"
                bad.append(f"{MODULES[module].relative_to(ROOT)}:{line}: {shown}")
    return bad


def test_the_scan_sees_the_whole_project():
    assert "esc_stream.upscaler" in MODULES and "esc_stream.vapoursynth" in MODULES
    assert "esc_stream.training.train" in MODULES and "esc_stream.demo.service" in MODULES
    edges = graph()
    assert "esc_stream.checkpoints" in edges["esc_stream.upscaler"]
    # relative imports of mapped folders resolve to their installed names
    assert any(t.startswith("esc_stream.training.") for t in edges["esc_stream.training.train"])


def test_no_import_circle_between_files():
    found = cycles(graph())
    assert not found, "import circles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_no_private_name_is_imported_from_another_package():
    bad = private_imports()
    assert not bad, "private names imported across packages:\n" + "\n".join(bad)


def test_no_import_by_a_repository_folder_name():
    bad = []
    for module in MODULES:
        for source, _, line in imports_of(module):
            if source.split(".")[0] in ("vs_plugin", "demo", "training"):
                bad.append(f"{MODULES[module].relative_to(ROOT)}:{line}: {source}")
    assert not bad, "imports that the installed wheel cannot satisfy:\n" + "\n".join(bad)


def test_the_networks_import_no_device_code():
    """esc_stream.models is pure torch: kernels for a device (native/, cuda/) are chosen in esc_stream.backends."""
    bad = []
    for module in MODULES:
        if not module.startswith("esc_stream.models"):
            continue
        for source, name, line in imports_of(module):
            target = _target(source, name) or source
            if target.startswith(("esc_stream.native", "esc_stream.cuda")):
                bad.append(f"{MODULES[module].relative_to(ROOT)}:{line}: {target}")
    assert not bad, "device code imported by the networks:\n" + "\n".join(bad)
