"""The package's layout as a contract: public names resolve, imports form no cycle (those inside
functions included),
and the pure layers (errors, formats' headers, the math) import neither Ray nor Zarr."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import streamprune

PACKAGE = Path(streamprune.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """streamprune modules that `path` imports anywhere: at module level or inside a function, where
    a deferred import still ties the two modules together."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in out if m.startswith("streamprune.")}


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: _imports(path) & modules.keys() - {name} for name, path in modules.items()}


def test_imports_form_no_cycle_even_inside_functions():
    graph, state, cycles = _graph(), {}, []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = "open"
        for dep in sorted(graph[m]):
            if state.get(dep) == "open":
                cycles.append(stack[stack.index(dep) :] + [dep])
            elif dep not in state:
                visit(dep, [*stack, dep])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert len(graph) > 40 and not cycles, cycles


# The rooms, lowest first: a module imports only from its own room or a lower one. Shards (bytes of
# tar files) know nothing of runs; the math (scoring) works on arrays; formats store the math's inputs
# and results; the loader applies a keep-list; training, demo data, inspection, the stages and the CLI
# build on all of them.
ROOMS = [
    {"errors"},
    {"storage", "progress", "plugins"},
    {"shards"},
    {"scoring"},
    {"formats"},
    {"loader", "loader_state"},
    {"settings"},
    {"config"},
    {"training"},
    {"demo"},
    {"inspection"},
    {"stages"},
    {"cli"},
]


def _rank(module: str) -> int:
    room = module.split(".")[1] if "." in module else ""
    ranks = [i for i, names in enumerate(ROOMS) if room in names]
    assert ranks, f"{module}: in no room of ROOMS; place it"
    return ranks[0]


def test_each_room_imports_only_from_rooms_below_it():
    upward = [
        f"{m} -> {d}"
        for m, deps in sorted(_graph().items())
        if m != "streamprune"
        for d in sorted(deps)
        if d != "streamprune" and _rank(d) > _rank(m)
    ]
    assert not upward, upward


def test_pure_layers_do_not_import_ray_or_zarr():
    pure = [
        "streamprune.errors",
        "streamprune.settings",
        "streamprune.formats.headers",
        "streamprune.formats.rundir",
        *(f"streamprune.scoring.{p.stem}" for p in sorted((PACKAGE / "scoring").glob("[!_]*.py"))),
    ]
    code = (
        f"import sys; import {', '.join(pure)}; "
        "bad = [m for m in ('ray', 'zarr', 'torch', 'webdataset') if m in sys.modules]; "
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_every_public_name_resolves_and_old_paths_keep_working():
    for name in streamprune.__all__:
        assert getattr(streamprune, name) is not None, name
    from streamprune import (
        KeepList,
        PrunedWebDataset,
        StreamPruneError,
        index,
        record,
        reduce,
        reshard,
        sampling,
        scores,
    )

    assert KeepList.__module__ == "streamprune.formats.keeplist"
    assert PrunedWebDataset.__module__ == "streamprune.loader"
    assert [f.__module__ for f in (index, record, reduce, reshard)] == [
        "streamprune.stages.index",
        "streamprune.stages.record",
        "streamprune.stages.reduce",
        "streamprune.stages.reshard",
    ]
    assert callable(scores.dual) and callable(sampling.beta_weights)
    assert issubclass(streamprune.ChangedShardError, StreamPruneError)
    assert issubclass(streamprune.NewerFormatError, streamprune.DamagedRunError)


def _extra(name: str) -> list[str]:
    """The distribution names of pyproject.toml's optional dependencies `name`."""
    import re
    import tomllib

    project = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["project"]
    return [re.split(r"[\[<>=!~ ;]", spec, maxsplit=1)[0].lower() for spec in project["optional-dependencies"][name]]


def test_applying_a_keep_list_needs_nothing_of_the_all_extra():
    """`pip install streamprune` (no `[all]`) is enough for a training job that applies a keep-list
    from local disk or S3: the loader's imports include no distribution of the `all` extra."""
    code = (
        "import sys, importlib.metadata as md, streamprune\n"
        "from streamprune import PrunedWebDataset, KeepList, keep_filter, storage\n"
        "storage.filesystem('s3://bucket')\n"
        "dists = md.packages_distributions()\n"
        "print(' '.join(sorted({d.lower() for m in list(sys.modules) for d in dists.get(m.split('.')[0], ())})))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    imported = set(done.stdout.split())
    assert {"torch", "webdataset", "numpy", "fsspec", "s3fs"} <= imported  # the check sees real imports
    extra = set(_extra("all"))
    assert {"ray", "zarr", "scipy", "matplotlib"} <= extra
    assert imported & extra == set()


def test_pre_commit_runs_the_checks_ci_runs():
    """Every lint, format and type check of `.ci/run` is a pre-commit hook with the same command."""
    import yaml

    root = PACKAGE.parent
    ci = [line.strip() for line in (root / ".ci" / "run").read_text().splitlines()]
    checks = [line for line in ci if line.split(" ", 1)[0] in ("ruff", "mypy")]
    hooks = yaml.safe_load((root / ".pre-commit-config.yaml").read_text())["repos"][0]["hooks"]
    assert len(checks) == 3 and sorted(checks) == sorted(h["entry"] for h in hooks if h["id"] != "fast-tests")


PUBLIC_MODULES = {"scores", "sampling", "errors", "demo"}  # modules in __all__: their names are public too
# Benchmarks that time an internal part on its own reach it directly; each is named here with why.
INTERNAL_FOR_BENCHMARKS = {
    ("bench_index.py", "streamprune.shards.scan"): "times one shard's scan without the stage around it",
    ("bench_record.py", "streamprune.training.decode"): "times the sample decoder alone",
    ("bench_reduce.py", "streamprune.formats"): "fills a synthetic stats store in one commit",
    ("bench_reduce.py", "streamprune.scoring.columns"): "fills a synthetic stats store (its label array)",
    ("bench_reduce.py", "streamprune.storage"): "uploads the synthetic run to the S3 server and sizes it",
}


def _streamprune_imports(text: str) -> list[tuple[str, list[str]]]:
    """(module, names) of every `from streamprune... import` and `import streamprune...` in `text`."""
    import re

    found = [
        (m.group(1), [n.strip().split(" as ")[0] for n in m.group(2).strip("()").split(",") if n.strip()])
        for m in re.finditer(r"^\s*from (streamprune(?:\.[\w.]+)?) import (\([^)]*\)|[^\n#]+)", text, re.M)
    ]
    return found + [(m.group(1), []) for m in re.finditer(r"^\s*import (streamprune(?:\.[\w.]+)?)", text, re.M)]


def test_readme_docs_examples_and_benchmarks_use_only_the_public_api():
    root = PACKAGE.parent
    files = [root / "README.md", *sorted((root / "docs").glob("*.md")), *sorted((root / "examples").glob("*.py"))]
    files += sorted((root / "benchmarks").glob("*.py"))
    deep = []
    for path in files:
        for module, names in _streamprune_imports(path.read_text()):
            if module == "streamprune":
                # `from streamprune import storage` reaches the module streamprune.storage
                pairs = [(f"streamprune.{n}", n) for n in names if n not in streamprune.__all__]
            else:
                pairs = [(module, "")]
            for reached, _ in pairs:
                parts = reached.split(".")
                if (path.name, reached) in INTERNAL_FOR_BENCHMARKS and path.parent.name == "benchmarks":
                    continue
                if len(parts) != 2 or parts[1] not in PUBLIC_MODULES or module == "streamprune":
                    deep.append(f"{path.name}: {reached}")
    assert len(files) > 15 and not deep, deep


LONG_FUNCTIONS_ALLOWED = {("tarscan.py", "iter_members")}  # the tar parser: one loop over hostile bytes, read whole


def test_no_function_of_the_package_is_over_80_lines():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno is not None:
                lines = node.end_lineno - node.lineno + 1
                if lines > 80 and (path.name, node.name) not in LONG_FUNCTIONS_ALLOWED:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long
