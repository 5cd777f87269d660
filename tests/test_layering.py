"""Imports go down the floors of the package, never up or sideways, and never through a
command-line module: the rule that keeps each piece usable (and importable) on its own."""

import ast
import os

import clasp

PACKAGE = os.path.dirname(os.path.abspath(clasp.__file__))
KERNELS = os.path.join(os.path.dirname(PACKAGE), "kernels")  # installed as clasp.kernels

# Lowest floor first; a module may import its own package and the floors below it.
FLOORS = [
    ("clasp.config", "clasp.atomic", "clasp.schedules"),
    ("clasp.vocabulary",),
    ("clasp.data",),
    ("clasp.kernels",),
    ("clasp.model",),
    ("clasp.teacher",),
    ("clasp.losses",),
    ("clasp.train",),
    ("clasp.eval",),
    ("clasp.finetune",),
    ("clasp.demo", "clasp.cli", "clasp.__main__"),
]
# Modules that only hold a command (`add_arguments` / `main`): only the dispatcher imports them.
COMMAND_MODULES = {
    "clasp.eval.cli", "clasp.teacher.cli", "clasp.demo.cli", "clasp.train.pretrain",
    "clasp.train.export", "clasp.finetune.cli",
}  # fmt: skip
DISPATCHERS = {"clasp.cli", "clasp.__main__"}
# (importer, imported): why the exception stands.
EXCEPTIONS: dict[tuple[str, str], str] = {}


def _modules() -> dict[str, str]:
    """module name -> file, for every module of clasp (kernels/ as clasp.kernels)."""
    found = {}
    for root, prefix in ((PACKAGE, "clasp"), (KERNELS, "clasp.kernels")):
        for folder, _, files in os.walk(root):
            for name in files:
                if not name.endswith(".py"):
                    continue
                parts = os.path.relpath(os.path.join(folder, name), root)[:-3].split(os.sep)
                if prefix == "clasp" and parts[0] == "kernels":
                    continue
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                found[".".join([prefix, *parts])] = os.path.join(folder, name)
    return found


def _imports(name: str, path: str, modules: dict[str, str]) -> set[str]:
    """The clasp modules a module imports, anywhere in it (lazy imports included)."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            module = (
                ".".join(base + ([node.module] if node.module else []))
                if node.level
                else node.module
            )
            for alias in node.names:  # `from clasp import demo` imports a module
                sub = f"{module}.{alias.name}"
                out.add(sub if sub in modules else module)
    return {m for m in out if m == "clasp" or m.startswith("clasp.")}


def _floor(module: str) -> tuple[int, str]:
    best = max(
        (
            (i, p)
            for i, names in enumerate(FLOORS)
            for p in names
            if module == p or module.startswith(p + ".")
        ),
        key=lambda item: len(item[1]),
        default=(0, "clasp"),  # the package root: version and constants
    )
    return best


def test_every_import_goes_down_a_floor_and_never_through_a_command_module():
    modules = _modules()
    assert "clasp.teacher.fit" in modules and "clasp.kernels.reference" in modules
    problems = []
    for name, path in sorted(modules.items()):
        if name == "clasp":  # the root re-exports load_backbone lazily
            continue
        floor, package = _floor(name)
        if name in COMMAND_MODULES:  # a command sits on the top floor, wherever its file is
            floor = len(FLOORS)
        for imported in sorted(_imports(name, path, modules)):
            if (name, imported) in EXCEPTIONS:
                continue
            target_floor, target_package = _floor(imported)
            if imported in COMMAND_MODULES and name not in DISPATCHERS:
                problems.append(f"{name} imports the command module {imported}")
            elif target_package != package and target_floor >= floor and name not in DISPATCHERS:
                problems.append(f"{name} (floor {floor}) imports {imported} (floor {target_floor})")
    assert not problems, "\n".join(problems)


def test_the_exceptions_still_exist():
    modules = _modules()
    for importer, imported in EXCEPTIONS:
        assert imported in _imports(importer, modules[importer], modules), (importer, imported)
