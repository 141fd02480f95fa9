"""Mutation testing of the core modules: ``python tools/mutation.py MODULE [MODULE ...]``.

Each mutant is one small, plausible bug put into one module (an operator swapped, a
comparison loosened, a constant changed, a call dropped); the tests that cover the module
are run against it, and a mutant the tests still pass on "survived". The score of a
module is killed / (mutants - equivalents). Every survivor is to be either killed by a new
test or named in ``tools/mutation_equivalents.txt`` (read by this script) with a one-line
reason why no test can tell it apart (same behaviour).

Why a runner of our own and not mutmut: mutmut 3 first runs the whole suite under its
trampolines to map tests to functions (7+ minutes on the 2-core box), and is no project
dependency. This one needs only pytest (and ``coverage``, if installed, to skip mutants on
lines the mapped tests never run: those count as survivors without a run). It forks one
warm process (torch & co. imported once) per mutant, and runs only the module's mapped test
files, slow-marked tests excluded, stopping at the first failure.

Usage (from the repository root, venv active):

    OMP_NUM_THREADS=1 python tools/mutation.py losses decoding   # modules in MODULES below
    python tools/mutation.py losses --list                       # the mutants, not run
    python tools/mutation.py losses --only 12 40                 # rerun some by number; the rest keep the last run's result

Results: ``mutants/<module>.json`` and a summary with each survivor's line and key (git-ignored).
An equivalents line reads ``module | stripped source line | mutation | reason``.

What is mutated: binary operators (+ - * / // % ** & |), augmented assignments, comparisons,
``and``/``or``, unary ``-``/``not``/``~`` (dropped), numeric and boolean constants, ``break``/
``continue``, and call statements (dropped). Not mutated: strings, docstrings, annotations,
decorators, default arguments, ``raise`` statements, ``print``/``warnings.warn``/logging calls,
lines carrying ``# pragma: no mutate``, and the functions named in ``UNSCOPED`` (``--all``: those too).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EQUIVALENTS = ROOT / "tools" / "mutation_equivalents.txt"
OUT = ROOT / "mutants"

# module -> the test files that cover it (slow-marked tests are deselected; see PYTEST_ARGS).
MODULES: dict[str, list[str]] = {
    "losses": ["tests/test_losses.py", "tests/test_autograd.py", "tests/test_decoder.py"],
    "decoding": ["tests/test_decoding.py", "tests/test_properties.py"],
    "checkpoint": ["tests/test_checkpoint.py", "tests/test_bad_inputs.py", "tests/test_visualize.py"],
    "correctness": ["tests/test_correctness.py"],
    "metrics": ["tests/test_metrics.py"],
    "visualize": ["tests/test_visualize.py"],
    "attention": ["tests/test_attention.py", "tests/test_attention_variants.py"],
    "decoder": ["tests/test_decoder.py", "tests/test_decoder_behaviour.py", "tests/test_autograd.py",
                "tests/test_attention_variants.py", "tests/test_precision.py"],
    "train": ["tests/test_train_contract.py", "tests/test_train_behaviour.py", "tests/test_bad_inputs.py",
              "tests/test_precision.py"],
}
PYTEST_ARGS = ["-x", "-q", "--no-header", "-p", "no:cacheprovider", "-m", "not slow", "-o", "addopts="]
# per module extra pytest args (train's behaviour tests train tiny models and are marked slow;
# metrics' tests that start the METEOR and SPICE JVMs take a minute a run)
EXTRA_ARGS: dict[str, list[str]] = {"train": ["-m", ""], "metrics": ["-k", "not java_reports"]}
# functions left unmutated, per module, and why (out of the score; mutate them with --all)
UNSCOPED: dict[str, set[str]] = {
    # Java programs driven through pipes: their tests start JVMs (60 s a run); tests/test_metrics.py
    # covers them where Java is installed, outside mutation runs
    "metrics": {"_run_meteor", "_close_meteor", "_run_spice", "_spice_dir", "ptb_tokenize", "_java_problem"},
}
QUIET_CALLS = {"print", "warn", "debug", "info", "warning", "error", "exception", "set_postfix", "write"}

BINOPS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
          ast.Mod: ast.FloorDiv, ast.Pow: ast.Mult, ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd}
CMPOPS = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
          ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is}
SYMBOL = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%",
          ast.Pow: "**", ast.BitAnd: "&", ast.BitOr: "|", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">",
          ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!=", ast.In: "in", ast.NotIn: "not in", ast.Is: "is",
          ast.IsNot: "is not", ast.And: "and", ast.Or: "or", ast.USub: "-x", ast.Not: "not x",
          ast.Invert: "~x"}


@dataclass
class Mutant:
    """One mutation point: ``index`` in walk order, the original line, and what changes."""

    index: int
    line: int
    statement_line: int  # what coverage reports for it
    source: str
    mutation: str
    status: str = "pending"  # killed | survived | no-coverage | timeout | equivalent
    seconds: float = 0.0

    @property
    def key(self) -> str:
        return f"{self.source} | {self.mutation}"


class Mutator(ast.NodeTransformer):
    """Walks a module in a fixed order; records every mutation point, and applies the one at ``target``."""

    def __init__(self, lines: list[str], target: int = -1, skip: set[str] = frozenset()) -> None:
        self.lines, self.target, self.skip = lines, target, skip
        self.points: list[tuple[int, int, str]] = []  # (line, first line of its statement, description)
        self.statement_line = 0

    def visit(self, node):
        if isinstance(node, ast.stmt):  # coverage reports a multi-line statement by its first line
            outer, self.statement_line = self.statement_line, node.lineno
            try:
                return super().visit(node)
            finally:
                self.statement_line = outer
        return super().visit(node)

    def _point(self, node: ast.AST, what: str) -> bool:
        """Record a point; True when it is the one to apply."""
        line = getattr(node, "lineno", 0)
        if line and "pragma: no mutate" in self.lines[line - 1]:
            return False
        self.points.append((line, self.statement_line or line, what))
        return len(self.points) - 1 == self.target

    # -- skipped subtrees

    def visit_FunctionDef(self, node):
        if node.name in self.skip:
            return node
        node.body = self._body(node.body)  # not decorators, defaults or annotations
        return node

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node):
        node.body = self._body(node.body)
        return node

    def _body(self, body: list[ast.stmt]) -> list[ast.stmt]:
        return [self.visit(stmt) for stmt in body]

    def visit_AnnAssign(self, node):
        if node.value is not None:
            node.value = self.visit(node.value)
        return node

    def visit_Raise(self, node):
        return node

    def visit_JoinedStr(self, node):
        return node

    def visit_Assign(self, node):
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return node
        return self.generic_visit(node)

    def visit_If(self, node):
        if isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            return node
        return self.generic_visit(node)

    # -- mutations

    def visit_Expr(self, node):
        if isinstance(node.value, ast.Constant):
            return node  # docstring
        if isinstance(node.value, ast.Call):
            func = node.value.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in QUIET_CALLS:
                return node
            if self._point(node, "drop call"):
                return ast.copy_location(ast.Pass(), node)
        return self.generic_visit(node)

    def visit_BinOp(self, node):
        self.generic_visit(node)
        new = BINOPS.get(type(node.op))
        if new and self._point(node, f"{SYMBOL[type(node.op)]} -> {SYMBOL[new]}"):
            node.op = new()
        return node

    def visit_AugAssign(self, node):
        self.generic_visit(node)
        new = BINOPS.get(type(node.op))
        if new and self._point(node, f"{SYMBOL[type(node.op)]}= -> {SYMBOL[new]}="):
            node.op = new()
        return node

    def visit_Compare(self, node):
        self.generic_visit(node)
        for i, op in enumerate(node.ops):
            new = CMPOPS.get(type(op))
            if new and self._point(node, f"{SYMBOL[type(op)]} -> {SYMBOL[new]}"):
                node.ops[i] = new()
        return node

    def visit_BoolOp(self, node):
        self.generic_visit(node)
        new = ast.Or if isinstance(node.op, ast.And) else ast.And
        if self._point(node, f"{SYMBOL[type(node.op)]} -> {SYMBOL[new]}"):
            node.op = new()
        return node

    def visit_UnaryOp(self, node):
        self.generic_visit(node)
        if isinstance(node.op, (ast.USub, ast.Not, ast.Invert)) and not isinstance(node.operand, ast.Constant):
            if self._point(node, f"{SYMBOL[type(node.op)]} -> x"):
                return node.operand
        return node

    def visit_Constant(self, node):
        v = node.value
        if isinstance(v, bool):
            if self._point(node, f"{v} -> {not v}"):
                return ast.copy_location(ast.Constant(not v), node)
        elif isinstance(v, (int, float)):
            if self._point(node, f"{v!r} -> {v + 1!r}"):
                return ast.copy_location(ast.Constant(v + 1), node)
        return node

    def visit_Break(self, node):
        if self._point(node, "break -> continue"):
            return ast.copy_location(ast.Continue(), node)
        return node

    def visit_Continue(self, node):
        if self._point(node, "continue -> break"):
            return ast.copy_location(ast.Break(), node)
        return node


def mutants_of(source: str, skip: set[str] = frozenset()) -> list[Mutant]:
    lines = source.splitlines()
    walker = Mutator(lines, skip=skip)
    walker.visit(ast.parse(source))
    seen: dict[tuple[str, str], int] = {}
    out = []
    for i, (line, statement, what) in enumerate(walker.points):
        text = lines[line - 1].strip() if line else ""
        n = seen[(text, what)] = seen.get((text, what), 0) + 1
        out.append(Mutant(i, line, statement, text, what if n == 1 else f"{what} #{n}"))
    return out


def mutated_source(source: str, index: int, skip: set[str] = frozenset()) -> str:
    tree = ast.parse(source)
    walker = Mutator(source.splitlines(), target=index, skip=skip)
    tree = ast.fix_missing_locations(walker.visit(tree))
    return ast.unparse(tree) + "\n"


def read_equivalents(module: str) -> dict[str, str]:
    """``module | line | mutation | reason`` lines -> {key: reason} for this module."""
    out = {}
    if EQUIVALENTS.exists():
        for raw in EQUIVALENTS.read_text(encoding="utf-8").splitlines():
            if not raw.strip() or raw.lstrip().startswith("#"):
                continue
            parts = [p.strip() for p in raw.split(" | ")]
            if len(parts) != 4:
                raise SystemExit(f"{EQUIVALENTS}: expected 'module | line | mutation | reason': {raw!r}")
            if parts[0] == module:
                out[f"{parts[1]} | {parts[2]}"] = parts[3]
    return out


def copy_tree(dest: Path) -> None:
    """The repository without git, caches or generated data (top-level data/ and runs/)."""
    everywhere = {".git", "__pycache__", ".pytest_cache", ".hypothesis", ".venv", ".mutcov", ".mutcov.json"}
    top = {"mutants", "runs", "data", "outputs", "notebooks", "benchmarks"}

    def ignore(folder: str, names: list[str]) -> set[str]:
        skip = everywhere | (top if Path(folder) == ROOT else set())
        return {n for n in names if n in skip or n.endswith(".egg-info")}

    shutil.copytree(ROOT, dest, ignore=ignore, dirs_exist_ok=True)


def covered_lines(work: Path, rel: str, tests: list[str], args: list[str]) -> tuple[set[int] | None, float]:
    """Run the mapped tests once on the unmutated module: they must pass. Returns (lines run, seconds)."""
    env = dict(os.environ, PYTHONPATH=str(work), PYTHONDONTWRITEBYTECODE="1")
    try:
        import coverage  # noqa: F401
        cov = [sys.executable, "-m", "coverage", "run", f"--include={rel}", "--data-file=.mutcov", "-m", "pytest"]
    except ImportError:
        cov = [sys.executable, "-m", "pytest"]
    start = time.monotonic()
    run = subprocess.run([*cov, *args, *tests], cwd=work, env=env, capture_output=True, text=True)
    seconds = time.monotonic() - start
    if run.returncode != 0:
        raise SystemExit(f"the mapped tests fail on the unmutated code:\n{run.stdout[-3000:]}{run.stderr[-3000:]}")
    if cov[2] != "coverage":
        return None, seconds
    subprocess.run([sys.executable, "-m", "coverage", "json", "--data-file=.mutcov", "-o", ".mutcov.json"],
                   cwd=work, env=env, capture_output=True, check=True)
    files = json.loads((work / ".mutcov.json").read_text())["files"]
    return set(next(iter(files.values()))["executed_lines"]) if files else set(), seconds


def run_one(work: Path, tests: list[str], args: list[str], timeout: float) -> str:
    """Fork: the child runs pytest on the mutated tree; the parent waits (killing it past ``timeout``)."""
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.setsid()
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1), os.dup2(null, 2)
            os.chdir(work)
            sys.path.insert(0, str(work))
            os.environ["PYTHONPATH"] = str(work)
            import pytest
            code = pytest.main([*args, *tests])
        except BaseException:  # noqa: BLE001 - any crash of the mutated code kills the mutant
            code = 99
        os._exit(int(code))
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return "survived" if os.waitstatus_to_exitcode(status) == 0 else "killed"
        if time.monotonic() > deadline:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "timeout"
        time.sleep(0.05)


def preload() -> None:
    """Import the heavy libraries once in the parent, so each forked child starts warm."""
    import matplotlib
    matplotlib.use("Agg")
    import hypothesis  # noqa: F401
    import matplotlib.pyplot  # noqa: F401
    import numpy  # noqa: F401
    import PIL.Image  # noqa: F401
    import pytest  # noqa: F401
    import torch  # noqa: F401
    import torchvision  # noqa: F401


def run_module(module: str, only: list[int] | None, list_only: bool, everything: bool = False) -> dict:
    rel = f"captioner/{module}.py"
    source = (ROOT / rel).read_text(encoding="utf-8")
    skip = set() if everything else UNSCOPED.get(module, set())
    mutants = mutants_of(source, skip)
    if list_only:
        for m in mutants:
            print(f"{m.index:4d} L{m.line:<4d} {m.mutation:<18s} {m.source}")
        return {}
    tests = [t for t in MODULES[module] if (ROOT / t).exists()]
    args = PYTEST_ARGS + EXTRA_ARGS.get(module, [])
    equivalents = read_equivalents(module)
    with tempfile.TemporaryDirectory(prefix=f"mut-{module}-") as tmp:
        work = Path(tmp)
        copy_tree(work)
        covered, seconds = covered_lines(work, rel, tests, args)
        timeout = 3 * seconds + 30
        print(f"{module}: {len(mutants)} mutants, tests {' '.join(tests)} ({seconds:.0f} s unmutated)", flush=True)
        for m in mutants:
            if only is not None and m.index not in only:
                m.status = "skipped"
                continue
            if m.key in equivalents:
                m.status = "equivalent"
                continue
            if covered is not None and m.statement_line not in covered:
                m.status = "no-coverage"
                print(f"  no-coverage #{m.index} L{m.line}: {m.key}", flush=True)
                continue
            (work / rel).write_text(mutated_source(source, m.index, skip), encoding="utf-8")
            start = time.monotonic()
            m.status = run_one(work, tests, args, timeout)
            m.seconds = round(time.monotonic() - start, 1)
            print(f"  {m.status} #{m.index} L{m.line} ({m.seconds:.0f} s): {m.key}", flush=True)
        (work / rel).write_text(source, encoding="utf-8")
    if only is not None:
        merge_last_run(module, mutants, equivalents)
    return summarise(module, mutants, equivalents)


def merge_last_run(module: str, mutants: list[Mutant], equivalents: dict[str, str]) -> None:
    """After ``--only``: the mutants not rerun keep their result from the last run (same
    number and key), so the score and the results file stay whole."""
    path = OUT / f"{module}.json"
    if not path.exists():
        return
    last = {(r["index"], f"{r['source']} | {r['mutation']}"): r for r in json.loads(path.read_text())["results"]}
    for m in mutants:
        before = last.get((m.index, m.key)) if m.status == "skipped" else None
        if before is not None:
            m.status = "equivalent" if m.key in equivalents else before["status"]
            m.seconds = before["seconds"]


def summarise(module: str, mutants: list[Mutant], equivalents: dict[str, str]) -> dict:
    counted = [m for m in mutants if m.status != "skipped"]
    count = {s: sum(m.status == s for m in counted) for s in ("killed", "timeout", "survived", "no-coverage", "equivalent")}
    live = len(counted) - count["equivalent"]
    score = (count["killed"] + count["timeout"]) / live if live else 1.0
    stale = sorted(set(equivalents) - {m.key for m in mutants})
    report = {"module": module, "mutants": len(counted), **count, "score": round(score, 3),
              "stale_equivalents": stale, "results": [asdict(m) for m in counted]}
    OUT.mkdir(exist_ok=True)
    (OUT / f"{module}.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    print(f"{module}: score {score:.1%} = {count['killed'] + count['timeout']} killed / {live} non-equivalent "
          f"({count['survived']} survived, {count['no-coverage']} not covered, {count['equivalent']} equivalent)")
    for key in stale:
        print(f"  stale equivalent (no such mutant now): {key}")
    return report


def rescore(module: str) -> dict:
    """The last run's results (mutants/<module>.json) with today's equivalents file: for reviewing
    survivors without running the mutants again."""
    last = json.loads((OUT / f"{module}.json").read_text(encoding="utf-8"))
    mutants = [Mutant(**r) for r in last["results"]]
    equivalents = read_equivalents(module)
    for m in mutants:
        if m.key in equivalents:
            m.status = "equivalent"
    return summarise(module, mutants, equivalents)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="+", choices=sorted(MODULES))
    parser.add_argument("--only", type=int, nargs="+", help="run only these mutant numbers")
    parser.add_argument("--list", action="store_true", help="list the mutants without running them")
    parser.add_argument("--show", type=int, help="print the mutated module of this mutant number")
    parser.add_argument("--all", action="store_true", help="mutate the functions UNSCOPED leaves out too")
    parser.add_argument("--rescore", action="store_true", help="recount the last run with today's equivalents")
    a = parser.parse_args(argv)
    if a.rescore:
        reports = [rescore(m) for m in a.modules]
        return 0 if all(r["survived"] + r["no-coverage"] == 0 for r in reports) else 1
    if a.show is not None:
        skip = set() if a.all else UNSCOPED.get(a.modules[0], set())
        print(mutated_source((ROOT / f"captioner/{a.modules[0]}.py").read_text(encoding="utf-8"), a.show, skip))
        return 0
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
    sys.dont_write_bytecode = True
    if not a.list:
        preload()
    reports = [run_module(m, a.only, a.list, a.all) for m in a.modules]
    return 0 if all(r.get("survived", 0) + r.get("no-coverage", 0) == 0 for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
