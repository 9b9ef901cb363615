"""The config engine: layered loading of YAML files and flags into a spec's dataclasses.

generated/parser.py builds one `ConfigSpec` from the spec's tables (fields, sections, aliases,
rules, derived defaults) and exposes its methods. Nothing here knows any particular field.

Sources apply in layers: spec defaults, then base files (`base:` in a file), then the file, then
command-line flags; later layers win. Every problem in every layer is collected and raised together
as one `ConfigError`, each naming the key path and the file and line (or flag) it came from.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import DEFAULT_SOURCE, ConfigAliasWarning, ConfigError, Problem, Problems, Source
from .fields import Derived, FieldSpec, Rule, SectionSpec, check_value, shown
from .yamllines import MAX_DOCUMENT_BYTES, LineDict, YAMLLoadError, load_yaml

BASE_KEY = "base"
"""Root key naming the files a config file builds on (paths relative to the file)."""

VERSION_KEY = "spec_version"
"""Root key recording the spec version a config was written for (saved configs always have it)."""

RESERVED_KEYS = (BASE_KEY, VERSION_KEY)


@dataclass
class Assignment:
    path: str  # canonical field path
    value: Any
    source: Source
    written: str  # the key path as the user wrote it


@dataclass
class Rename:
    written: str  # the old key path as written
    canonical: str
    source: Source


@dataclass
class Layer:
    """What one source (a file or the command line) assigns, and the old names it used."""

    assignments: list[Assignment] = field(default_factory=list)
    renames: list[Rename] = field(default_factory=list)
    spec_version: int | None = None  # as declared by the source, if it did
    origin: str | None = None  # absolute path of a base file


@dataclass
class Resolved:
    """A resolved config and where each value came from."""

    config: Any
    sources: dict[str, Source]  # field path -> Source of the winning value
    overridden: dict[str, list[tuple[Any, Source]]]  # field path -> values that lost, oldest first
    warnings: list[str] = field(default_factory=list)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _parent(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


def _leaf(path: str) -> str:
    return path.rsplit(".", 1)[-1]


def _last_of_each(layers: list[Layer]) -> list[Layer]:
    """The layers with each file's layer kept at its last place only (a base reached twice
    applies once, where it wins; the result is the same, without exponential repetition)."""
    last = {id(layer): index for index, layer in enumerate(layers)}
    return [layer for index, layer in enumerate(layers) if last[id(layer)] == index]


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value


def _same(a: Any, b: Any) -> bool:
    """Equal and of the same kind: 1e-3 == 0.001, but true != 1."""
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


_ITEM = {
    name: FieldSpec(path="", name="", type=name, nullable=False, default=None, doc="")
    for name in ("int", "float", "bool", "str")
}


def get_path(config: Any, path: str) -> Any:
    """The value at a dotted field path of a config object."""
    value = config
    for part in path.split("."):
        value = getattr(value, part)
    return value


def coerce(spec: FieldSpec, value: Any) -> Any:
    """The value in the field's Python type where YAML or JSON spell it another way: an int for a
    float field, an integral float (4.0) for an int field. Anything else is left for the check."""
    if isinstance(value, list):
        return [_coerce_item(spec.item_type, item) for item in value]
    if not spec.is_list:
        return _coerce_item(spec.type, value)
    return value


def _coerce_item(type_name: str, value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and type(value) is not str:
        return str.__str__(value)  # a generated constant (StrEnum) is stored as its plain value
    if type_name == "float" and isinstance(value, int):
        try:
            return float(value)
        except OverflowError:
            return math.inf if value > 0 else -math.inf  # rejected as non-finite by the check
    if type_name == "int" and isinstance(value, float) and value.is_integer():
        return int(value)  # JSON and JSON Schema do not tell 4.0 from 4
    return value


class ConfigSpec:
    """A spec's tables plus the operations on configs: resolve, validate, migrate, reconcile."""

    def __init__(
        self,
        *,
        version: int,
        fields: Mapping[str, FieldSpec],
        sections: Mapping[str, SectionSpec],
        aliases: Mapping[str, str],
        alias_versions: Mapping[str, tuple[int, int | None]],
        rules: Sequence[Rule],
        derived: Mapping[str, Derived],
    ) -> None:
        self.version = version
        self.fields = fields
        self.sections = sections
        self.aliases = aliases
        self.alias_versions = alias_versions
        self.rules = tuple(rules)
        self.derived = derived
        self.flags = self._flag_paths()
        self._field_order = {path: index for index, path in enumerate(fields)}

    # ----- reading files and flags -------------------------------------------------------------

    def _names_in(self, section_path: str) -> set[str]:
        """Keys that may appear directly in a section: fields, subsections and aliases there."""
        section = self.sections[section_path]
        names = set(section.fields) | set(section.sections)
        names |= {_leaf(alias) for alias in self.aliases if _parent(alias) == section_path}
        if section_path == "":
            names.update(RESERVED_KEYS)
        return names

    def _unknown_key_message(self, key: str, section_path: str, cheap: bool = False) -> str:
        where = f"section {section_path!r}" if section_path else "the root"
        if cheap or len(key) > 64:  # past the shown problems, or no field name is this long
            return f"unknown key {shown(key)} in {where}"
        import difflib  # only on errors

        candidates = sorted(self._names_in(section_path))
        close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
        homes = sorted(p for p in list(self.fields) + list(self.sections) if p and _leaf(p) == key)
        if homes:
            return f"unknown key {key!r} in {where}; {key!r} belongs in {_parent(homes[0]) or 'the root'!r} (write it as {homes[0]})"
        if close:
            return f"unknown key {key!r} in {where}; did you mean {close[0]!r}?"
        return f"unknown key {key!r} in {where}; expected one of {', '.join(candidates)}"

    def _walk_mapping(
        self, mapping: LineDict, section_path: str, file: str, layer: Layer, problems: Problems
    ) -> None:
        """Turn one YAML mapping into assignments to canonical field paths."""
        for key, value in mapping.items():
            line = mapping.key_lines.get(key, mapping.line)
            source = Source("file", file, line)
            written = _join(section_path, key)
            if section_path == "" and key in RESERVED_KEYS:
                continue
            canonical = self.aliases.get(written, written)
            if canonical != written:
                layer.renames.append(Rename(written, canonical, source))
            if canonical in self.sections:
                self._assign_section(canonical, value, source, written, layer, problems, file)
            elif canonical in self.fields:
                if isinstance(value, dict):
                    type_text = self.fields[canonical].type_text
                    found = ", ".join(shown(k, 30) for k in list(value)[:5])
                    message = f"is a single {type_text} value, not a section; found a mapping with keys {found}"
                    problems.append(Problem(canonical, message, source, "key"))
                else:
                    layer.assignments.append(Assignment(canonical, value, source, written))
            else:
                message = self._unknown_key_message(key, section_path, cheap=problems.full)
                problems.append(Problem(written, message, source, "key"))

    def _assign_section(
        self,
        section_path: str,
        value: Any,
        source: Source,
        written: str,
        layer: Layer,
        problems: Problems,
        file: str,
    ) -> None:
        section = self.sections[section_path]
        if isinstance(value, LineDict):
            self._walk_mapping(value, section_path, file, layer, problems)
        elif value is None:
            return  # `model:` with nothing under it
        elif section.shorthand is not None and not isinstance(value, (dict, list)):
            layer.assignments.append(
                Assignment(_join(section_path, section.shorthand), value, source, written)
            )
        else:
            hint = ""
            if section.shorthand:
                shorthand = self.fields[_join(section_path, section.shorthand)]
                hint = f" (or a {shorthand.type_text} for {section.shorthand!r})"
            example = ", ".join((section.fields + section.sections)[:3])
            message = f"is a section: expected a mapping of its keys ({example}, ...){hint}, found {shown(value)}"
            problems.append(Problem(section_path, message, source, "key"))

    def _read_file_layers(
        self, path: str, problems: Problems, stack: list[str], cache: dict[str, list[Layer]]
    ) -> list[Layer]:
        """Layers of a file and of its bases, base files first. Each file is read once per
        resolve (`cache`), and a file reached twice keeps only its last place in the order."""
        absolute = os.path.abspath(path)
        if absolute in stack:
            chain = " -> ".join(
                os.path.relpath(p) for p in stack[stack.index(absolute) :] + [absolute]
            )
            problems.append(
                Problem(
                    BASE_KEY, f"base files form a cycle: {chain}", Source("file", path, 1), "file"
                )
            )
            return []
        if absolute in cache:
            return cache[absolute]
        try:
            if os.path.getsize(path) > MAX_DOCUMENT_BYTES:  # checked before reading it all
                size = os.path.getsize(path)
                message = f"the file has {size:,} bytes; config files are limited to {MAX_DOCUMENT_BYTES:,} bytes ({MAX_DOCUMENT_BYTES >> 10} KiB)"
                problems.append(Problem("", message, Source("file", path, 1), "file"))
                cache[absolute] = []
                return []
            with open(path, "rb") as config_file:
                data = config_file.read()
        except OSError as error:
            what = (
                "a folder, not a config file"
                if os.path.isdir(path)
                else error.strerror or str(error)
            )
            problems.append(
                Problem("", f"cannot read config file: {what}", Source("file", path, 1), "file")
            )
            cache[absolute] = []
            return []
        layers = self._read_text_layers(data, path, problems, stack + [absolute], cache)
        for layer in layers:
            layer.origin = layer.origin or absolute
        cache[absolute] = layers
        return layers

    def _read_text_layers(
        self,
        text: str | bytes,
        filename: str,
        problems: Problems,
        stack: list[str],
        cache: dict[str, list[Layer]],
    ) -> list[Layer]:
        try:
            document = load_yaml(text)
        except YAMLLoadError as error:
            problems.append(
                Problem(error.path, error.message, Source("file", filename, error.line), "file")
            )
            return []
        if document is None:
            return []
        if not isinstance(document, LineDict):
            where = Source("file", filename, getattr(document, "line", 1))
            message = (
                f"a config file must be a mapping of sections, found {type(document).__name__}"
            )
            problems.append(Problem("", message, where, "key"))
            return []
        layers = []
        if BASE_KEY in document:
            layers += self._read_bases(document, filename, problems, stack, cache)
        layer = Layer(spec_version=self._declared_version(document, filename, problems))
        layer.origin = os.path.abspath(filename) if stack else None
        self._walk_mapping(document, "", filename, layer, problems)
        return _last_of_each(layers + [layer])

    def _read_bases(
        self,
        document: LineDict,
        filename: str,
        problems: Problems,
        stack: list[str],
        cache: dict[str, list[Layer]],
    ) -> list[Layer]:
        bases = document[BASE_KEY]
        source = Source("file", filename, document.key_lines[BASE_KEY])
        if isinstance(bases, str):
            bases = [bases]
        if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
            message = f"expected a file name or a list of file names, found {shown(bases)}"
            problems.append(Problem(BASE_KEY, message, source, "value"))
            return []
        layers = []
        folder = os.path.dirname(filename) if stack else os.getcwd()
        for base in list(dict.fromkeys(reversed(bases)))[::-1]:  # listed twice: the last place wins
            base_path = os.path.join(folder, base)
            if not os.path.isfile(base_path):
                message = f"base file {base!r} not found (looked for {base_path})"
                problems.append(Problem(BASE_KEY, message, source, "file"))
                continue
            layers += self._read_file_layers(base_path, problems, stack, cache)
        return _last_of_each(layers)

    def _declared_version(self, mapping: Mapping, filename: str, problems: Problems) -> int | None:
        if VERSION_KEY not in mapping:
            return None
        version = mapping[VERSION_KEY]
        source = Source("file", filename, getattr(mapping, "key_lines", {}).get(VERSION_KEY, 0))
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            message = f"expected a spec version (a positive integer), found {shown(version)}"
            problems.append(Problem(VERSION_KEY, message, source, "value"))
            return None
        if version > self.version:
            message = f"written for spec version {version}, newer than this code's version {self.version}; update the code"
            problems.append(Problem(VERSION_KEY, message, source, "value"))
            return None
        return version

    def _flag_paths(self) -> dict[str, str]:
        """Command-line flag (without --) -> canonical field path: every field, its old names,
        section shorthands, and all of these under an old section name (`lr_schedule.min_lr`)."""
        flags = {path: path for path in self.fields}
        for alias, canonical in self.aliases.items():
            if canonical in self.fields:
                flags[alias] = canonical
        for path, section in self.sections.items():
            if section.shorthand is not None:
                flags[path] = _join(path, section.shorthand)
        for alias, canonical in self.aliases.items():
            if canonical in self.sections:
                prefix = canonical + "."
                for flag, target in list(flags.items()):
                    if flag.startswith(prefix):
                        flags.setdefault(alias + "." + flag[len(prefix) :], target)
                    elif flag == canonical:  # the shorthand
                        flags.setdefault(alias, target)
        return flags

    def _parse_flag_value(self, spec: FieldSpec, text: str) -> Any:
        """A flag's text as the value YAML would give it. A str field takes the text as is (null
        and ~ are null, as in a file); a list field also takes `a,b` for `[a, b]`."""
        if spec.is_list and not text.lstrip().startswith("["):
            items = [item.strip() for item in text.split(",")] if text.strip() else []
            return [
                item
                if spec.item_type == "str"
                else self._parse_flag_value(_ITEM[spec.item_type], item)
                for item in items
            ]
        if spec.type == "str":
            return None if text in ("null", "~") else text
        try:
            return load_yaml(text)
        except YAMLLoadError as error:
            return f"<unparsable: {error.message}>"

    def split_command_line(self, argv: Sequence[str]) -> tuple[list[str], list[str], bool]:
        """(positional arguments, config flags, whether help was asked for) of a command line
        whose flags may come before, between or after its positional arguments. A bool flag
        without a value (`--overwrite`) means true."""
        positionals: list[str] = []
        flags: list[str] = []
        wants_help = False
        index = 0
        while index < len(argv):
            token = argv[index]
            index += 1
            if token in ("-h", "--help"):
                wants_help = True
            elif token.startswith("--") and len(token) > 2:
                name, has_value, _ = token[2:].partition("=")
                if has_value:
                    flags.append(token)
                elif self._is_bool_flag(name) and (
                    index == len(argv) or argv[index].startswith("--")
                ):
                    flags += [token, "true"]
                elif index < len(argv):
                    flags += [token, argv[index]]
                    index += 1
                else:
                    flags.append(token)  # reported as "flag needs a value"
            else:
                positionals.append(token)
        return positionals, flags, wants_help

    def _old_names_in(self, flag: str) -> list[tuple[str, str]]:
        """(old name, canonical) pairs a flag uses: an old section name, an old field name."""
        found = []
        parts = flag.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:cut])
            if self.aliases.get(prefix) in self.sections:
                found.append((prefix, self.aliases[prefix]))
                flag = _join(self.aliases[prefix], ".".join(parts[cut:]))
                break
        if flag in self.aliases:
            found.append((flag, self.aliases[flag]))
        return found

    def _is_bool_flag(self, name: str) -> bool:
        path = self.flags.get(name)
        return path is not None and self.fields[path].type == "bool"

    def _read_argv(self, argv: Iterable[str], problems: Problems) -> Layer:
        layer = Layer()
        items = list(argv)
        index = 0
        while index < len(items):
            token = items[index]
            index += 1
            if not token.startswith("--") or len(token) == 2:
                message = f"unexpected argument {token!r}; flags look like --section.field VALUE"
                problems.append(Problem("", message, Source("cli", flag=token), "key"))
                continue
            name, has_value, value = token[2:].partition("=")
            if not has_value:
                if index < len(items) and not (
                    items[index].startswith("--") and self._is_bool_flag(name)
                ):
                    value = items[index]
                    index += 1
                elif self._is_bool_flag(name):
                    value = "true"  # `--overwrite` alone
                else:
                    problems.append(
                        Problem(name, "flag needs a value", Source("cli", flag=token), "value")
                    )
                    continue
            source = Source("cli", flag=f"--{name}")
            if name not in self.flags:
                hint = ""
                if not problems.full:
                    import difflib  # only on errors

                    close = difflib.get_close_matches(name, list(self.flags), n=1, cutoff=0.6)
                    hint = f"; did you mean --{close[0]}?" if close else ""
                problems.append(Problem(name, f"unknown flag --{name}{hint}", source, "key"))
                continue
            canonical = self.flags[name]
            layer.renames += [Rename(old, new, source) for old, new in self._old_names_in(name)]
            spec = self.fields[canonical]
            layer.assignments.append(
                Assignment(canonical, self._parse_flag_value(spec, value), source, name)
            )
        return layer

    # ----- merging and checking ----------------------------------------------------------------

    def _merge(
        self, layers: list[Layer], problems: Problems, notes: list[str]
    ) -> tuple[dict[str, Any], dict[str, Source], dict[str, list]]:
        """Apply layers in order; later flags win. Within one file the same field may be given
        twice (under its name and an old name) only with the same value, and each is checked."""
        values = {path: spec.default for path, spec in self.fields.items()}
        sources = {path: DEFAULT_SOURCE for path in self.fields}
        overridden: dict[str, list] = {}
        for layer in layers:
            self._apply_renames(layer, problems, notes)
            seen: dict[str, Assignment] = {}
            for item in layer.assignments:
                if item.path in seen and item.source.kind != "cli":
                    self._check_repeat(seen[item.path], item, problems)
                    continue
                seen[item.path] = item
                overridden.setdefault(item.path, []).append((values[item.path], sources[item.path]))
                values[item.path] = item.value
                sources[item.path] = item.source
        return values, sources, overridden

    def _check_repeat(self, first: Assignment, again: Assignment, problems: Problems) -> None:
        """A field given a second time in one file: its value is checked as if it came first
        (so the order of a canonical key and its old name does not matter), then compared."""
        spec = self.fields[again.path]
        value = coerce(spec, again.value)
        problem = check_value(spec, _plain(value))
        if problem:
            problems.append(
                Problem(
                    again.path, f"{problem} (given as {again.written!r})", again.source, "value"
                )
            )
        elif check_value(spec, _plain(coerce(spec, first.value))) is None and not _same(
            coerce(spec, first.value), value
        ):  # 1e-3 and 0.001 agree; true and 1 do not (a bad first value is reported on its own)
            message = (
                f"given twice with different values: {first.written!r} = {shown(first.value)} "
                f"({first.source}) and {again.written!r} = {shown(again.value)}"
            )
            problems.append(Problem(again.path, message, again.source, "duplicate"))

    def _apply_renames(self, layer: Layer, problems: Problems, notes: list[str]) -> None:
        for rename in layer.renames:
            since, removed = self.alias_versions[rename.written]
            if removed is not None and removed <= self.version:
                if layer.spec_version is None or layer.spec_version >= removed:
                    message = (
                        f"{rename.written!r} was renamed to {rename.canonical!r} in spec version {since} and removed in "
                        f"version {removed}; run `python -m runtime config migrate FILE` to rewrite it"
                    )
                    problems.append(Problem(rename.written, message, rename.source, "key"))
                    continue
                notes.append(
                    f"{rename.source}: upgraded {rename.written!r} to {rename.canonical!r} (written for spec version {layer.spec_version})"
                )
                continue
            note = f"{rename.source}: {rename.written!r} is an old name of {rename.canonical!r}; it still works, but write {rename.canonical!r}"
            notes.append(note)
            warnings.warn(note, ConfigAliasWarning, stacklevel=5)

    def _check_values(self, values: dict, sources: dict, problems: Problems) -> set[str]:
        bad = set()
        for path, spec in self.fields.items():
            value = coerce(spec, values[path])
            if isinstance(value, list):
                value = list(value)  # drop the line-tracking list type
            values[path] = value
            problem = check_value(spec, value)
            if problem:
                problems.append(Problem(path, problem, sources[path], "value"))
                bad.add(path)
        return bad

    def _build(self, section_path: str, values: Mapping[str, Any]) -> Any:
        section = self.sections[section_path]
        kwargs = {name: values[_join(section_path, name)] for name in section.fields}
        kwargs.update(
            {name: self._build(_join(section_path, name), values) for name in section.sections}
        )
        return section.cls(**kwargs)

    def _fill_derived(self, values: dict, sources: dict, bad: set[str], problems: Problems) -> None:
        """Compute each derived default left null, from the fields it reads."""
        for path, derived in self.derived.items():
            if values[path] is not None or path in bad:
                continue
            if any(p in bad for p in derived.paths):
                bad.add(path)
                continue
            value = coerce(self.fields[path], derived.compute(self._build("", values)))
            source = Source("derived", expression=derived.expression)
            problem = check_value(self.fields[path], value)
            if problem:
                problems.append(
                    Problem(
                        path,
                        f"{problem} (its default is derived: {derived.expression})",
                        source,
                        "value",
                    )
                )
                bad.add(path)
                continue
            values[path] = value
            sources[path] = source

    def _check_rules(
        self, config: Any, bad: set[str], sources: Mapping[str, Source], problems: Problems
    ) -> None:
        for rule in self.rules:
            if any(path in bad for path in rule.paths):
                continue
            if rule.applies is not None and not rule.applies(config):
                continue
            if rule.holds(config):
                continue
            given = [p for p in rule.paths if sources[p].explicit]
            blamed = given[-1] if given else rule.paths[0]
            detail = ", ".join(f"{p} = {get_path(config, p)!r} ({sources[p]})" for p in rule.paths)
            problems.append(
                Problem(
                    blamed,
                    f"{rule.message}: `{rule.check}` does not hold ({detail})",
                    sources[blamed],
                    "rule",
                )
            )

    def _resolve_layers(self, layers: list[Layer], problems: Problems) -> Resolved:
        notes: list[str] = []
        values, sources, overridden = self._merge(layers, problems, notes)
        bad = self._check_values(values, sources, problems)
        for path in bad:
            values[path] = self.fields[
                path
            ].default  # keep building so rules over other fields still run
        self._fill_derived(values, sources, bad, problems)
        config = self._build("", values)
        self._check_rules(config, bad, sources, problems)
        if problems:
            raise ConfigError(problems)
        return Resolved(config, sources, overridden, notes)

    # ----- public operations -------------------------------------------------------------------

    def resolve(
        self,
        path: str | os.PathLike | None = None,
        *,
        text: str | bytes | None = None,
        argv: Iterable[str] = (),
        filename: str | None = None,
    ) -> Resolved:
        """Resolve a config file (or YAML text) plus flags, with the source of every value."""
        problems = Problems()
        layers: list[Layer] = []
        if path is not None:
            layers += self._read_file_layers(os.fspath(path), problems, [], {})
        elif text is not None:
            layers += self._read_text_layers(text, filename or "<text>", problems, [], {})
        layers.append(self._read_argv(argv, problems))
        return self._resolve_layers(layers, problems)

    def load_config(
        self,
        path: str | os.PathLike | None = None,
        *,
        text: str | bytes | None = None,
        argv: Iterable[str] = (),
        filename: str | None = None,
    ) -> Any:
        """The root config of a YAML file (or text) and `--section.field VALUE` flags."""
        return self.resolve(path, text=text, argv=argv, filename=filename).config

    def config_to_dict(self, config: Any) -> dict:
        """A plain nested dict of a config, canonical names, spec order."""
        return dataclasses.asdict(config)

    def _flatten(self, mapping: Mapping, prefix: str, layer: Layer, problems: Problems) -> None:
        source = Source("file", "<dict>", 0)
        for key, value in mapping.items():
            if not prefix and key in RESERVED_KEYS:
                continue
            written = _join(prefix, key)
            path = self.aliases.get(written, written)
            if path != written:
                layer.renames.append(Rename(written, path, source))
            if path in self.sections and isinstance(value, dict):
                self._flatten(value, path, layer, problems)
            elif path in self.fields:
                layer.assignments.append(Assignment(path, value, source, written))
            else:
                problems.append(Problem(path, self._unknown_key_message(key, prefix), None, "key"))

    def config_from_dict(self, mapping: Mapping) -> Any:
        """Validate a plain nested dict (e.g. one saved in a checkpoint) into a config."""
        return self._resolve_dict(mapping).config

    def _resolve_dict(self, mapping: Mapping) -> Resolved:
        problems = Problems()
        layer = Layer(spec_version=self._declared_version(mapping, "<dict>", problems))
        self._flatten(mapping, "", layer, problems)
        return self._resolve_layers([layer], problems)

    def to_saved_dict(self, config: Any) -> dict:
        """The dict to store with a checkpoint: the config plus the spec version it was written for."""
        return {VERSION_KEY: self.version, **self.config_to_dict(config)}

    def _finish(
        self, values: dict, sources: dict, resolved: Resolved, notes: list[str]
    ) -> Resolved:
        """Rebuild a config from flat values, checking derived defaults and rules again."""
        problems = Problems()
        self._fill_derived(values, sources, set(), problems)
        if problems:
            raise ConfigError(problems)
        config = self._build("", values)
        self._check_rules(config, set(), sources, problems)
        if problems:
            raise ConfigError(problems)
        return Resolved(config, sources, resolved.overridden, resolved.warnings + notes)

    def reconcile_with_checkpoint(
        self, resolved: Resolved, saved: Mapping, checkpoint: str = "checkpoint"
    ) -> tuple[Resolved, list[str]]:
        """The config of a resumed run, applying each field's checkpoint policy.

        `must_match` fields must equal the checkpoint's (an error names the field and both values);
        `from_checkpoint` fields take the checkpoint's value unless this run set them explicitly;
        `overridable` fields keep this run's value. Returns (Resolved, notes about what changed).
        """
        saved_values = self.flat_values(self._resolve_dict(saved).config)
        values = self.flat_values(resolved.config)
        sources = dict(resolved.sources)
        problems, notes = Problems(), []
        for path, spec in self.fields.items():
            new, old = values[path], saved_values[path]
            if new == old:
                continue
            if spec.policy == "must_match":
                problems.append(
                    Problem(
                        path,
                        f"must match the checkpoint {checkpoint}: it has {old!r}, this run has {new!r}",
                        sources[path],
                        "value",
                    )
                )
            elif spec.policy == "from_checkpoint" and not sources[path].explicit:
                values[path] = old
                sources[path] = Source("file", checkpoint, 0)
                notes.append(f"{path} = {old!r} taken from the checkpoint (spec default {new!r})")
            else:
                notes.append(
                    f"{path}: this run's {new!r} overrides the checkpoint's {old!r} ({sources[path]})"
                )
        if problems:
            raise ConfigError(problems)
        return self._finish(values, sources, resolved, notes), notes

    def adopt_values(self, resolved: Resolved, values: Mapping[str, Any], origin: str) -> Resolved:
        """The config with `values` ({field path: value}) taken from `origin` (e.g. a Hugging Face
        config.json): a field this run left at its default takes the value; a field this run set
        explicitly to something else is an error naming both."""
        current = self.flat_values(resolved.config)
        sources = dict(resolved.sources)
        problems = Problems()
        for path, value in values.items():
            value = coerce(self.fields[path], value)
            if value == current[path]:
                continue
            if sources[path].explicit:
                problems.append(
                    Problem(
                        path,
                        f"this run sets {shown(current[path])} but {origin} has {shown(value)}; remove the key or make them agree",
                        sources[path],
                        "value",
                    )
                )
                continue
            current[path] = value
            sources[path] = Source("file", origin, 0)
        for path, value in current.items():
            problem = check_value(self.fields[path], value)
            if problem:
                problems.append(Problem(path, f"{problem} (from {origin})", sources[path], "value"))
        if problems:
            raise ConfigError(problems)
        return self._finish(current, sources, resolved, [])

    def resolved_from_config(self, config: Any) -> Resolved:
        """A Resolved for a config built in code: values that differ from the spec default count
        as set explicitly (source `<config object>`); derived defaults left null are computed."""
        values = self.flat_values(config)
        sources = {
            path: DEFAULT_SOURCE
            if value == self.fields[path].default
            else Source("file", "<config object>", 0)
            for path, value in values.items()
        }
        return self._finish(values, sources, Resolved(config, sources, {}, []), [])

    def flat_values(self, config: Any) -> dict[str, Any]:
        """{dotted field path: value} of a config, in spec order."""
        return {path: get_path(config, path) for path in self.fields}

    def dump_yaml(self, config: Any) -> str:
        """Canonical YAML of a resolved config; loading it gives an equal config."""
        import yaml

        return yaml.safe_dump(
            self.to_saved_dict(config),
            sort_keys=False,
            default_flow_style=False,
            allow_unicode=True,
        )

    def nest(self, values: Mapping[str, Any]) -> dict:
        """A nested dict, sections in spec order, of {dotted field path: value}."""
        tree: dict = {}
        for path in sorted(values, key=self._field_order.__getitem__):
            node = tree
            *parents, leaf = path.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = values[path]
        return tree

    def migrate_text(self, text: str | bytes, filename: str = "<text>") -> str:
        """The same config with every old name rewritten to its canonical key; values unchanged."""
        problems = Problems()
        try:
            document = load_yaml(text)
        except YAMLLoadError as error:
            raise ConfigError(
                [Problem("", error.message, Source("file", filename, error.line), "file")]
            ) from None
        if document is None:
            return ""
        if not isinstance(document, LineDict):
            raise ConfigError(
                [
                    Problem(
                        "",
                        "a config file must be a mapping of sections",
                        Source("file", filename, 1),
                        "key",
                    )
                ]
            )
        layer = Layer()
        self._walk_mapping(document, "", filename, layer, problems)
        if problems:
            raise ConfigError(problems)
        assignments = []
        seen: dict[str, Assignment] = {}
        for item in layer.assignments:
            coerced = coerce(self.fields[item.path], item.value)
            item.value = list(coerced) if isinstance(coerced, list) else coerced
            if item.path in seen:
                first = seen[item.path]
                if first.value != item.value:
                    message = f"given twice with different values: {first.written!r} = {shown(first.value)} ({first.source}) and {item.written!r} = {shown(item.value)}"
                    problems.append(Problem(item.path, message, item.source, "duplicate"))
                continue
            seen[item.path] = item
            assignments.append(item)
        if problems:
            raise ConfigError(problems)
        tree = {
            VERSION_KEY: self.version,
            **self.nest({item.path: item.value for item in assignments}),
        }
        if BASE_KEY in document:
            tree = {BASE_KEY: document[BASE_KEY], **tree}
        import yaml

        return yaml.safe_dump(tree, sort_keys=False, default_flow_style=False, allow_unicode=True)

    def build_arg_parser(self, prog: str = "python -m runtime train") -> argparse.ArgumentParser:
        """An argparse parser with one --section.field flag per field, for --help text."""
        parser = argparse.ArgumentParser(
            prog=prog,
            description="Flags override the config file; later flags win.",
            allow_abbrev=False,
        )
        parser.add_argument("config", nargs="?", help="YAML config file")
        for path, section in self.sections.items():
            if not path:
                continue
            group = parser.add_argument_group(path, section.doc)
            for name in section.fields:
                self._add_flag(group, self.fields[_join(path, name)])
        group = parser.add_argument_group("root", self.sections[""].doc)
        for name in self.sections[""].fields:
            self._add_flag(group, self.fields[name])
        return parser

    @staticmethod
    def _add_flag(group: argparse._ArgumentGroup, spec: FieldSpec) -> None:
        aliases = [f"--{alias}" for alias in spec.aliases]
        extra = f" Old names: {', '.join(aliases)}." if aliases else ""
        choices = f" One of: {', '.join(map(str, spec.choices))}." if spec.choices else ""
        help_text = f"{spec.doc}{choices} Default: {spec.default!r}.{extra}"
        group.add_argument(
            f"--{spec.path}", metavar=spec.type_text.upper(), help=help_text.replace("%", "%%")
        )


def validate_instance(
    instance: Any,
    section: SectionSpec,
    fields: Mapping[str, FieldSpec],
    sections: Mapping[str, SectionSpec],
) -> None:
    """Check a dataclass built in code (called from its __post_init__); ValueError on bad values."""
    problems = []
    for name in section.fields:
        spec = fields[_join(section.path, name)]
        problem = check_value(spec, getattr(instance, name))
        if problem:
            problems.append(f"{spec.path}: {problem}")
    for name in section.sections:
        child = sections[_join(section.path, name)]
        if not isinstance(getattr(instance, name), child.cls):
            problems.append(f"{child.path}: expected a {child.cls.__name__}")
    if problems:
        raise ValueError("; ".join(problems))
