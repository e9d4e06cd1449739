"""The layout teaches: the algorithm's files at the top import nothing from machinery/ or research/, the import
graph has no cycle (function-local imports count), and the learner's files stay small enough to hold in one's
head."""

import ast

from conftest import ROOT

ALGORITHM = ("model", "attention_mask", "qstar", "fast", "data")    # never import machinery/ or research/
SCRIPTS = ("train", "eval", "generate")                              # may: they run the machinery


def project_modules() -> dict[str, str]:
    """{module name as imported: path} for the top-level files and machinery/."""
    names = {p.stem: p for p in ROOT.glob("*.py")}
    for folder in ("machinery", "research"):
        names |= {f"{folder}.{p.stem}": p for p in (ROOT / folder).glob("*.py") if p.stem != "__init__"}
        names[folder] = ROOT / folder / "__init__.py"
    return names


def imports_of(path, known) -> set[str]:
    """Every project module that `path` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module in known:
                found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known}
    return found


def graph() -> dict[str, set[str]]:
    known = project_modules()
    return {name: imports_of(path, known) - {name} for name, path in known.items()}


def test_the_algorithm_never_imports_the_machinery():
    g = graph()
    for name in ALGORITHM:
        assert not {m for m in g[name] if m.startswith(("machinery", "research"))}, (name, g[name])
        assert not g[name] & set(SCRIPTS), (name, g[name])


def test_the_import_graph_has_no_cycle():
    g, state = graph(), {}

    def visit(node, path):
        if state.get(node) == "done":
            return
        assert state.get(node) != "open", "import cycle: " + " -> ".join(path + [node])
        state[node] = "open"
        for nxt in sorted(g[node]):
            visit(nxt, path + [node])
        state[node] = "done"
    for node in sorted(g):
        visit(node, [])


def test_a_minimal_core():
    top = sorted(p.name for p in ROOT.glob("*.py"))
    assert len(top) <= 8, top
    g, closure, todo = graph(), set(), ["qstar"]
    while todo:
        name = todo.pop()
        if name not in closure:
            closure.add(name)
            todo += g[name]
    lines = {name: len(project_modules()[name].read_text().splitlines()) for name in closure}
    # qstar.py and all it imports: the paper's algorithm, a few hundred lines. The levers beyond the paper live in
    # research/levers.py, so they never lengthen it.
    assert sum(lines.values()) <= 800, lines
    for path in ROOT.glob("*.py"):                                   # every top-level file tells one story
        assert len(path.read_text().splitlines()) <= 450, path.name


def test_the_default_run_is_the_path_the_readme_names():
    """The README says which path `python train.py` takes (fast.py's twins or qstar.py's plain computation) and
    the flag for the other; TrainConfig's default must agree, and the default run must be the paper's QuietStar."""
    import train
    readme = (ROOT / "README.md").read_text()
    default_fast = train.TrainConfig().fast
    assert ("`python train.py` runs fast.py's twins" in readme) == default_fast
    assert ("`--no-fast`" if default_fast else "`--fast`") in readme
    cfg, qcfg, _ = train.parse_args([])
    assert not qcfg.uses_levers                                       # research/levers.py stays out of it
