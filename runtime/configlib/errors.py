"""Where a config value came from, and the problems found in a config, reported together."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Source:
    """Where a value came from: the spec default, a derived default, a file and line, or a flag."""

    kind: str  # "default" | "derived" | "file" | "cli"
    file: str | None = None
    line: int | None = None
    flag: str | None = None
    expression: str | None = None  # of a derived default
    env: tuple[str, ...] = ()  # environment variables the value was read from (`${env:NAME}`)
    env_unset: tuple[str, ...] = ()  # those of them that were unset (their default was used)
    # counts written with a unit (`14.3T tokens`): (where in the value: "" for the value itself,
    # "[2]" for a list item, "[1].until" for a record's key; as written; what it resolved to)
    resolved: tuple[tuple[str, str, str], ...] = ()

    @property
    def env_text(self) -> str:
        """`environment RUN_LR` (`environment A, B (unset: its default)`), or "" when the value
        names no environment variable."""
        if not self.env:
            return ""
        names = [
            name + (" (unset: its default)" if name in self.env_unset else "") for name in self.env
        ]
        return "environment " + ", ".join(names)

    def describe(self) -> str:
        """Where the value came from, with the environment variables it was read from:
        `environment RUN_LR (configs/x.yaml:3)`; otherwise as str()."""
        return f"{self.env_text} ({self})" if self.env else str(self)

    @property
    def explicit(self) -> bool:
        """Whether the user set the value (in a file or a flag) rather than the spec."""
        return self.kind in ("file", "cli")

    def __str__(self) -> str:
        if self.kind == "file":
            return f"{self.file}:{self.line}" if self.line else str(self.file)
        if self.kind == "cli":
            return f"command line {self.flag}"
        if self.kind == "derived":
            return f"derived default {self.expression}"
        return "spec default"


DEFAULT_SOURCE = Source("default")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config: the key path, what is wrong, and where it was written.

    `kind` sorts problems for tools and tests: "value" (a field's type, range or choice), "key"
    (unknown or misplaced keys, sections given as values), "rule" (a cross-field rule of the
    spec), "duplicate" (one field given twice with different values), "file" (YAML syntax, file
    access, base files, spec version), "env" (an environment reference: a variable that is not
    set and has no default, or a malformed `${env:...}`).
    """

    path: str
    message: str
    source: Source | None = None
    kind: str = "value"

    def __str__(self) -> str:
        where = (
            f"{self.source}: " if self.source is not None and self.source.kind != "default" else ""
        )
        return f"{where}{self.path or '<root>'}: {self.message}"


MAX_SHOWN_PROBLEMS = 50
"""Problems listed in a ConfigError's message; the rest are counted ("and N more")."""


class Problems(list):
    """The problems found so far. Past MAX_SHOWN_PROBLEMS it only counts, so a file of a
    million bad keys costs a count, not a million messages (`full` tells callers to skip
    expensive hints such as "did you mean")."""

    def __init__(self) -> None:
        super().__init__()
        self.extra = 0  # problems counted but not kept

    @property
    def full(self) -> bool:
        return len(self) >= MAX_SHOWN_PROBLEMS

    def append(self, problem: Problem) -> None:
        if self.full:
            self.extra += 1
        else:
            super().append(problem)

    @property
    def total(self) -> int:
        return len(self) + self.extra


class ConfigError(ValueError):
    """Every problem found in a config, reported together (the first MAX_SHOWN_PROBLEMS of them)."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = list(problems)[:MAX_SHOWN_PROBLEMS]
        count = getattr(problems, "total", len(problems))
        self.count = count
        lines = "\n".join(f"  {problem}" for problem in self.problems)
        more = (
            f"\n  ... and {count - len(self.problems)} more" if count > len(self.problems) else ""
        )
        super().__init__(f"{count} config problem{'s' if count != 1 else ''}:\n{lines}{more}")


class ConfigAliasWarning(UserWarning):
    """An old key name was used; it still works."""
