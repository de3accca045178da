"""Helpers for the deploy tests: a small Dockerfile parser and the Python entry points a command
line names (uvicorn app, celery app, `-m` modules), checked against the source tree without
importing it."""

from __future__ import annotations

import ast
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

_VAR = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}|\$(\w+)")


@dataclass
class Instruction:
    keyword: str  # upper case: FROM, COPY, RUN, ...
    rest: str  # everything after the keyword, continuations joined
    line: int

    def exec_form(self) -> list[str] | None:
        """The JSON array of CMD/ENTRYPOINT/HEALTHCHECK CMD, or None for the shell form."""
        text = self.rest
        if self.keyword == "HEALTHCHECK":
            m = re.search(r"\bCMD\s+(.*)$", text, re.S)
            if not m:
                return None
            text = m[1]
        text = text.strip()
        if text.startswith("["):
            return json.loads(text)
        return None

    def flags_and_args(self) -> tuple[dict[str, str], list[str]]:
        """For COPY/ADD: ({"from": ..., "chown": ...}, [src..., dest])."""
        words = shlex.split(self.rest)
        flags = {}
        while words and words[0].startswith("--"):
            key, _, value = words.pop(0)[2:].partition("=")
            flags[key] = value
        return flags, words


@dataclass
class Stage:
    name: str
    base: str  # the image or stage it is FROM (ARGs substituted)
    instructions: list[Instruction] = field(default_factory=list)

    def last(self, keyword: str) -> Instruction | None:
        found = [i for i in self.instructions if i.keyword == keyword]
        return found[-1] if found else None

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: dict[str, Stage]

    def chain(self, target: str) -> list[Stage]:
        """The stages a target builds on, base first, the target last."""
        chain = []
        name: str | None = target
        while name in self.stages:
            stage = self.stages[name]
            chain.insert(0, stage)
            name = stage.base
        return chain

    def root_image(self, target: str) -> str:
        return self.chain(target)[0].base

    def effective(self, target: str, keyword: str) -> Instruction | None:
        """The CMD/USER/HEALTHCHECK/... a target inherits: the last one along its chain."""
        for stage in reversed(self.chain(target)):
            found = stage.last(keyword)
            if found is not None:
                return found
        return None

    def substitute(self, text: str) -> str:
        def repl(m: re.Match[str]) -> str:
            name = m[1] or m[3]
            return self.global_args.get(name, m[2] or "")

        return _VAR.sub(repl, text)


def parse_dockerfile(path: Path) -> Dockerfile:
    lines = path.read_text().splitlines()
    logical: list[tuple[int, str]] = []
    buf, start = "", 0
    for number, raw in enumerate(lines, 1):
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue  # comment lines inside a continuation are dropped by Docker too
        if not buf:
            start = number
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        logical.append((start, buf))
        buf = ""
    global_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for number, text in logical:
        keyword, _, rest = text.partition(" ")
        keyword = keyword.upper()
        instruction = Instruction(keyword, rest.strip(), number)
        if keyword == "ARG" and current is None:
            name, _, default = instruction.rest.partition("=")
            global_args[name] = default
            continue
        if keyword == "FROM":
            words = instruction.rest.split()
            words = [w for w in words if not w.startswith("--platform")]
            base = Dockerfile(global_args, {}).substitute(words[0])
            name = (
                words[2] if len(words) >= 3 and words[1].upper() == "AS" else f"stage-{len(stages)}"
            )
            current = Stage(name, base)
            stages[name] = current
            continue
        assert current is not None, f"line {number}: {keyword} before FROM"
        current.instructions.append(instruction)
    return Dockerfile(global_args, stages)


# --- entry points


@dataclass(frozen=True)
class EntryPoint:
    module: str
    attribute: str | None  # "create_app" for uvicorn pkg.mod:create_app
    as_main: bool  # run with -m: a package needs __main__.py
    source: str  # where the command was found, for messages


def entry_points(argv: list[str], source: str) -> list[EntryPoint]:
    """The project modules a command line runs (uvicorn, celery -A, python/torchrun -m)."""
    if not argv:
        return []
    found = []
    program = Path(argv[0]).name
    if program == "uvicorn":
        target = next(a for a in argv[1:] if not a.startswith("-"))
        module, _, attr = target.partition(":")
        found.append(EntryPoint(module, attr or None, False, source))
    if program == "celery":
        for flag in ("-A", "--app"):
            if flag in argv:
                module, _, attr = argv[argv.index(flag) + 1].partition(":")
                found.append(EntryPoint(module, attr or None, False, source))
        for a in argv:
            if a.startswith("--app="):
                module, _, attr = a.removeprefix("--app=").partition(":")
                found.append(EntryPoint(module, attr or None, False, source))
    if program in ("torchrun", "python", "python3") and "-m" in argv:
        found.append(EntryPoint(argv[argv.index("-m") + 1], None, True, source))
    return [e for e in found if e.module.split(".")[0] in ("services", "lmcore", "scripts")]


def entry_point_problem(repo: Path, entry: EntryPoint) -> str | None:
    """None when the module (and attribute) exists in the source tree, else what is missing."""
    base = repo.joinpath(*entry.module.split("."))
    module_file = base.with_suffix(".py")
    package_init = base / "__init__.py"
    if entry.as_main and package_init.is_file():
        if not (base / "__main__.py").is_file():
            return f"{entry.source}: -m {entry.module}: package has no __main__.py"
        return None
    path = (
        module_file if module_file.is_file() else package_init if package_init.is_file() else None
    )
    if path is None:
        return f"{entry.source}: module {entry.module} not found ({module_file})"
    if entry.attribute and entry.attribute not in defined_names(path):
        return f"{entry.source}: {entry.module} defines no {entry.attribute}"
    return None


def defined_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names
