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
    access, base files, spec version).
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


class ConfigError(ValueError):
    """Every problem found in a config, reported together."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = list(problems)
        count = len(self.problems)
        lines = "\n".join(f"  {problem}" for problem in self.problems)
        super().__init__(f"{count} config problem{'s' if count != 1 else ''}:\n{lines}")


class ConfigAliasWarning(UserWarning):
    """An old key name was used; it still works."""
