"""The shape of the code base: one home for each kind of knowledge, and a clean dependency direction.

- The module import graph (module-level and in-function imports both counted) has no cycle.
- Wings import downwards only (WINGS, lowest first); `exporters` imports nothing from `compressor`
  but `compressor.core`.
- Every registered layer type goes through every reader of the layer table.
- The recipe's criterion and stage names are read from the registries, and every recipe stage has
  a registered implementation; both data classes implement the DataSource protocol.
- No function over 60 lines in the packages, nor over 80 in scripts/.
"""
import ast
import typing
from pathlib import Path

import pytest

from compressor import criteria, layers, stages
from compressor.config import recipe
from compressor.config.recipe import ActivationStage
from compressor.data import protocol
from compressor.data.sources import Dataset
from compressor.data.streams import StreamDataset
from compressor.layers.base import Handler
from compressor.load.model_io import PRUNING_SUPPORTED

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("compressor", "exporters")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Project modules imported anywhere in the file (a `from pkg import mod` counts as pkg.mod alone:
    inside a package that is how a module names its sibling, and it does not re-enter the package)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = [f"{node.module}.{alias.name}" for alias in node.names]
            names = subs if all(sub in modules for sub in subs) else [node.module, *subs]
        else:
            continue
        found |= {name for name in names if name in modules}
    return found


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    modules = set(files)
    return {name: _imports(path, modules) - {name} for name, path in files.items()}


def test_no_import_cycle():
    graph = import_graph()
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(trail[trail.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


# compressor's wings, lowest first: a module may import its own wing and the ones before it. The
# layer table sits with the core because the core hands its export form to `exporters`.
WINGS = (("core", "layers"), ("criteria", "graph", "load", "config"), ("data",), ("train",), ("stages",),
         ("run",), ("cli", "api"))


def _wing(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "compressor" or len(parts) == 1:
        return None
    return next(rank for rank, wing in enumerate(WINGS) if parts[1] in wing)


def test_wings_import_downwards_only():
    upward = sorted(f"{name} -> {dep}" for name, deps in import_graph().items() for dep in deps
                    if _wing(name) is not None and _wing(dep) is not None and _wing(dep) > _wing(name))
    assert not upward


def test_at_most_six_modules_at_the_top_of_compressor():
    top = sorted(p.name for p in (ROOT / "compressor").glob("*.py"))
    assert len(top) <= 6, top


def test_exporters_import_only_the_core_from_compressor():
    offending = {name: sorted(dep for dep in deps
                              if dep.startswith("compressor") and dep not in ("compressor", "compressor.core"))
                 for name, deps in import_graph().items() if name.startswith("exporters")}
    assert not {k: v for k, v in offending.items() if v}


@pytest.mark.parametrize("handler", list(layers.HANDLERS.values()), ids=lambda h: type(h).__name__)
def test_every_registered_layer_type_is_read_by_every_reader(handler):
    """The support list, surgery and the FLOP counter all answer from the same table entry."""
    assert handler.kinds, f"{type(handler).__name__} registers no layer type"
    for kind in handler.kinds:
        assert layers.handler_for_type(kind) is handler
        assert (kind.__name__ in PRUNING_SUPPORTED) == (not handler.left_whole)
    if type(handler).units is not Handler.units:  # producers say how to cut themselves
        assert type(handler).resize is not Handler.resize


def test_recipe_criteria_are_the_registered_ones():
    names = set(typing.get_args(ActivationStage.model_fields["criterion"].annotation))
    assert names == set(criteria.CRITERIA)


def test_recipe_stages_are_the_registered_ones_and_each_has_an_implementation():
    union = set(typing.get_args(typing.get_args(recipe.Stage)[0]))
    assert union == set(recipe.STAGES.values())
    implemented = {name: spec.config for name, spec in stages.STAGES.items() if spec.config in union}
    assert implemented == dict(recipe.STAGES)
    assert set(stages.structured_names()) == {"activation", "cluster", "sparse_opt"}
    with pytest.raises(recipe.CompressorError, match="unknown stage; allowed: " + ", ".join(recipe.STAGES)):
        recipe.parse_recipe({"stages": [{"name": "nope"}]})


def test_criteria_declare_known_statistics():
    for criterion in criteria.CRITERIA.values():
        assert criterion.needs and set(criterion.needs) <= criteria.STATISTICS, criterion.name
    assert criteria.get("taylor").needs_gradients and not criteria.get("magnitude").needs_gradients


def test_both_data_classes_implement_the_data_source_protocol(digits):
    for cls in (Dataset, StreamDataset):
        missing = [m for m in protocol.MEMBERS if m not in ("name", "input_shape") and not hasattr(cls, m)]
        assert not missing, (cls.__name__, missing)
    assert isinstance(digits, protocol.DataSource)
    stream = StreamDataset("s", lambda shape, task: {}, None)
    assert isinstance(stream, protocol.DataSource)


def _long_functions(folders, limit: int) -> list[str]:
    long = []
    for folder in folders:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                lines = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and lines > limit:
                    long.append(f"{path.relative_to(ROOT)}:{node.name} ({lines} lines)")
    return long


def test_no_function_longer_than_60_lines_in_the_packages():
    assert not _long_functions(PACKAGES, 60)


def test_no_function_longer_than_80_lines_in_scripts():
    assert not _long_functions(("scripts",), 80)
