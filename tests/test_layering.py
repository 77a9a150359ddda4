"""The layout's layering, read from the source: the core (guardsync/) sits below the Prefect layer
(flows/, tasks/), inside the core no import runs in a circle, and the command modules (one a
command, under the command line) import no other command and are imported by no client.

Every import counts, those inside functions too: a lazy import is still a dependency. Imports
under `if TYPE_CHECKING:` count for circles too (a circle hidden behind TYPE_CHECKING is still two
modules that each need the other to be read), but not for reaching up into the Prefect layer.
"""

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parent.parent / "guardsync"
ENTRY_POINT = "guardsync.cli"  # the command line sits above the flow: the one core module that may reach up
COMMANDS = {"guardsync.init_command", "guardsync.check", "guardsync.demo"}  # one module a command, under the cli
CLIENTS = ("guardsync.graph", "guardsync.scim", "guardsync.admin", "guardsync.state")  # they hold check's probes


def imports_of(path: Path, type_only_too: bool = False) -> set[str]:
    """Every module `path` imports, as dotted names (`from a.b import c` counts as a.b and a.b.c);
    those under `if TYPE_CHECKING:` only with `type_only_too`."""
    found: set[str] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    type_only = set() if type_only_too else {
        id(inner) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node.test)
        for statement in node.body for inner in ast.walk(statement)}
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def core_graph() -> dict[str, set[str]]:
    """guardsync.X -> the guardsync modules it imports, type-only imports included (the sandbox package
    counts as one module)."""
    modules = {f"guardsync.{path.stem}": path for path in CORE.glob("*.py") if path.stem != "__init__"}
    modules["guardsync.sandbox"] = CORE / "sandbox"
    graph = {}
    for name, path in modules.items():
        files = sorted(path.glob("*.py")) if path.is_dir() else [path]
        imported = set().union(*(imports_of(file, type_only_too=True) for file in files))
        graph[name] = {target for target in modules if target != name
                       and any(i == target or i.startswith(target + ".") for i in imported)}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path (first module repeated at the end), or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], _ = "open", stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node], _ = "done", stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_only_the_command_line_reaches_up_into_flows_tasks_or_prefect():
    reaching_up = {}
    for path in [*CORE.glob("*.py"), *(CORE / "sandbox").glob("*.py")]:
        name = "guardsync." + ".".join(path.relative_to(CORE).with_suffix("").parts)
        upward = sorted(i for i in imports_of(path) if i.split(".")[0] in ("flows", "tasks", "prefect"))
        if upward and name != ENTRY_POINT:
            reaching_up[name] = upward
    assert not reaching_up, f"core modules importing the Prefect layer (only {ENTRY_POINT} may): {reaching_up}"


def test_no_import_cycle_in_the_core():
    cycle = find_cycle(core_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module `start` imports, directly or through others."""
    seen: set[str] = set()
    pending = [start]
    while pending:
        for target in graph[pending.pop()] - seen:
            seen.add(target)
            pending.append(target)
    return seen


def command_layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """No command module imports another; the clients and the output never reach a command, even through others."""
    problems = [f"{command} imports the command module(s) {sorted(graph[command] & COMMANDS)}"
                for command in sorted(COMMANDS) if graph[command] & COMMANDS]
    for module in (*CLIENTS, "guardsync.progress"):  # the commands sit above their clients and their output
        if reached := sorted(reachable(graph, module) & COMMANDS):
            problems.append(f"{module} reaches the command module(s) {reached}")
    return problems


def test_the_layers_named_by_the_layout_hold():
    graph = core_graph()
    assert not command_layer_violations(graph), "; ".join(command_layer_violations(graph))
    assert not (ENTRY_POINT in graph["guardsync.demo"] and "guardsync.demo" in graph[ENTRY_POINT])
    importers_of_cli = sorted(name for name, targets in graph.items() if ENTRY_POINT in targets)
    assert not importers_of_cli, f"{ENTRY_POINT} is the top: nothing in the core imports it ({importers_of_cli})"
    for base in ("guardsync.errors", "guardsync.models"):  # the bottom layer: everything may use them
        assert graph[base] <= {"guardsync.errors", "guardsync.models"}, f"{base} imports {graph[base]}"
    # What a change is, what was observed, how the plan is made, the plan for people: arrows one way.
    order = ["guardsync.changes", "guardsync.observe", "guardsync.plan", "guardsync.diff"]
    for lower, module in enumerate(order):
        above = set(order[lower + 1:])
        assert not graph[module] & above, f"{module} imports {sorted(graph[module] & above)}, which sit above it"


def test_the_checker_finds_a_cycle_and_an_upward_import(tmp_path):
    """The checks above can fail: made-up modules importing each other, or reaching a command, are found."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert reachable({"a": {"b"}, "b": {"c"}, "c": set()}, "a") == {"b", "c"}
    layered = {name: set() for name in (*COMMANDS, *CLIENTS, "guardsync.progress", "guardsync.scope")}
    assert not command_layer_violations(layered)
    layered["guardsync.check"] = {"guardsync.init_command"}
    layered["guardsync.scim"], layered["guardsync.scope"] = {"guardsync.scope"}, {"guardsync.demo"}
    assert command_layer_violations(layered) == [
        "guardsync.check imports the command module(s) ['guardsync.init_command']",
        "guardsync.scim reaches the command module(s) ['guardsync.demo']"]
    module = tmp_path / "m.py"
    module.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from guardsync.cli import main\n"
                      "def f():\n    from flows.sync_directory import prefect_secret\n", encoding="utf-8")
    assert "flows.sync_directory" in imports_of(module) and "guardsync.cli" not in imports_of(module)
    assert "guardsync.cli" in imports_of(module, type_only_too=True)  # a circle through annotations is found
