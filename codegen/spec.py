"""Read and validate the config spec (spec/config.yaml) into a small object model.

Every problem is reported with the spec file and line, all of them together, before anything is
generated.
"""

import ast
import difflib
import hashlib
import keyword
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from runtime.configlib import (
    RECORD_LIST,
    FieldSpec,
    LineDict,
    RecordSpec,
    YAMLLoadError,
    check_value,
    load_yaml,
)

_T = TypeVar("_T")

FIELD_ATTRIBUTES = {
    "pattern",
    "pattern_doc",
    "name",
    "type",
    "default",
    "doc",
    "aliases",
    "choices",
    "min",
    "max",
    "gt",
    "policy",
    "hf",
    "sentinels",
    "derived",
    "record",
    "fields",
    "secret",
}
RECORD_FIELD_ATTRIBUTES = {
    "name",
    "type",
    "default",
    "doc",
    "choices",
    "min",
    "max",
    "gt",
    "pattern",
    "pattern_doc",
}
"""What a record's field may say (it has no old names, policy, derived default, sentinels or
secrecy)."""
SECTION_ATTRIBUTES = {
    "name",
    "class",
    "doc",
    "fields",
    "sections",
    "shorthand",
    "aliases",
    "policy",
}
ROOT_ATTRIBUTES = {"class", "doc", "fields", "policy"}
ALIAS_ATTRIBUTES = {"name", "since", "removed"}
POLICIES = ("must_match", "from_checkpoint", "overridable")
RULE_ATTRIBUTES = {"check", "when", "message"}
TOP_ATTRIBUTES = {"version", "root", "sections", "rules", "batch_schedule"}
BASE_TYPES = {
    "int",
    "float",
    "bool",
    "str",
    "steps",
    "tokens",
    "list[int]",
    "list[float]",
    "list[str]",
    "list[steps]",
}
NUMBER_TYPES = ("int", "float", "steps", "tokens")
"""Types that take min / max / gt (and their lists)."""
BATCH_SCHEDULE_KEYS = ("seq_len", "full", "start", "increment", "rampup")
"""The expressions of `batch_schedule`: BatchRamp's arguments (runtime/configlib/quantities.py)."""
RULE_FUNCTIONS = {"len", "sum", "all", "any", "min", "max", "sorted", "zip", "range"}


class SpecError(Exception):
    """One or more problems in the spec; str() lists them as `file:line: message`."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass(kw_only=True)
class Field(FieldSpec):
    line: int = 0


@dataclass
class Section:
    name: str  # "" for the root
    path: str
    class_name: str
    doc: str
    shorthand: str | None
    aliases: list[str]
    line: int
    policy: str = "overridable"
    fields: list[Field] = field(default_factory=list)
    sections: list["Section"] = field(default_factory=list)

    def walk(self) -> Iterator["Section"]:
        yield self
        for child in self.sections:
            yield from child.walk()


@dataclass
class Rule:
    check: str
    when: str | None
    message: str
    paths: list[str]  # the field paths it reads, in order of appearance
    check_code: str  # the expression over `c` (the root config)
    when_code: str | None
    line: int


@dataclass
class DerivedDefault:
    path: str
    expression: str
    code: str  # the expression over `c` (the root config)
    paths: list[str]


@dataclass
class BatchScheduleSpec:
    """`batch_schedule`: BatchRamp's arguments as expressions over the config."""

    expressions: dict[str, str]  # key -> the spec's expression
    codes: dict[str, str]  # key -> the expression over `c`
    paths: list[str]  # the fields they read


@dataclass
class Spec:
    filename: str
    sha256: str
    version: int
    root: Section
    rules: list[Rule]
    # alias path -> (since, removed or None)
    alias_versions: dict[str, tuple[int, int | None]] = field(default_factory=dict)
    derived: list[DerivedDefault] = field(default_factory=list)  # in spec order
    batch_schedule: BatchScheduleSpec | None = None

    def sections(self) -> list[Section]:
        return list(self.root.walk())

    def fields(self) -> list[Field]:
        return [f for section in self.root.walk() for f in section.fields]

    def record_lists(self) -> list[Field]:
        """The list[record] fields, in spec order."""
        return [f for f in self.fields() if f.record is not None]

    def record_fields(self) -> list[Field]:
        """The fields of every record, in spec order (paths like `data.sources[].weight`)."""
        return [rf for f in self.record_lists() for rf in record_fields(f)]


def record_fields(f: FieldSpec) -> list[Field]:
    """The fields of a list[record] field's record (none for other fields)."""
    return [rf for rf in f.record.fields if isinstance(rf, Field)] if f.record else []


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


class _Reader:
    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.problems: list[str] = []
        self.alias_versions: dict[str, tuple[int, int | None]] = {}
        self.derived_lines: dict[str, int] = {}
        self.first_version = 1

    def error(self, line: int, message: str) -> None:
        self.problems.append(f"{self.filename}:{line}: {message}")

    def check_attributes(self, node: LineDict, allowed: set[str], what: str) -> None:
        for key in node:
            if key not in allowed:
                hint = difflib.get_close_matches(key, sorted(allowed), n=1)
                suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
                self.error(
                    node.key_lines[key], f"{what}: unknown spec attribute {key!r}{suggestion}"
                )

    def require(self, node: LineDict, key: str, kind: type[_T], what: str) -> _T | None:
        if key not in node:
            self.error(node.line, f"{what}: missing required attribute {key!r}")
            return None
        value = node[key]
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            self.error(node.key_lines[key], f"{what}: {key!r} must be {kind.__name__}")
            return None
        return value

    def aliases(self, node: LineDict, section_path: str, what: str) -> list[str]:
        """Alias paths of a field or section; each item a name/path or {name, since, removed}."""
        items = node.get("aliases", [])
        if not isinstance(items, list):
            self.error(node.key_lines["aliases"], f"{what}: 'aliases' must be a list")
            return []
        result: list[str] = []
        for item, line in zip(items, getattr(items, "item_lines", [node.line] * len(items))):
            since, removed = self.first_version, None
            if isinstance(item, LineDict):
                self.check_attributes(item, ALIAS_ATTRIBUTES, f"{what} alias")
                name = self.require(item, "name", str, f"{what} alias")
                since = item.get("since", since)
                removed = item.get("removed")
                for key, value in (("since", since), ("removed", removed)):
                    if value is not None and (
                        isinstance(value, bool) or not isinstance(value, int)
                    ):
                        self.error(
                            item.key_lines[key],
                            f"{what} alias: {key!r} must be a spec version (int)",
                        )
                if isinstance(since, int) and isinstance(removed, int) and removed <= since:
                    self.error(
                        item.key_lines["removed"],
                        f"{what} alias: 'removed' must come after 'since'",
                    )
                if name is None:
                    continue
            elif isinstance(item, str):
                name = item
            else:
                self.error(
                    line, f"{what}: each alias must be a name or a mapping with name/since/removed"
                )
                continue
            path = name if "." in name else _join(section_path, name)
            self.alias_versions[path] = (since, removed)
            result.append(path)
        return result

    def policy(self, node: LineDict, inherited: str, what: str) -> str:
        policy = node.get("policy", inherited)
        if policy not in POLICIES:
            self.error(
                node.key_lines.get("policy", node.line),
                f"{what}: policy must be one of {', '.join(POLICIES)}, found {policy!r}",
            )
            return inherited
        return policy

    def string_list(self, node: LineDict, key: str, what: str) -> list[str]:
        value = node.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.error(node.key_lines[key], f"{what}: {key!r} must be a list of strings")
            return []
        return list(value)

    def read_field(
        self,
        node: object,
        section_path: str,
        section_policy: str,
        record_of: str | None = None,
    ) -> Field | None:
        """A field of a section, or of the record of the list[record] field `record_of` (its
        path), whose path is then `record_of[].name` and whose missing default means required."""
        if not isinstance(node, LineDict):
            where = f"record of {record_of}" if record_of else f"section {section_path or '<root>'}"
            self.error(getattr(node, "line", 0), f"{where}: each field must be a mapping")
            return None
        name = self.require(node, "name", str, "field")
        path = f"{record_of}[].{name or '?'}" if record_of else _join(section_path, name or "?")
        what = f"field {path}"
        if record_of is None:
            self.check_attributes(node, FIELD_ATTRIBUTES, what)
        else:
            for key in node:
                if key in FIELD_ATTRIBUTES - RECORD_FIELD_ATTRIBUTES:
                    self.error(
                        node.key_lines[key],
                        f"{what}: {key!r} does not apply to a record's field (it may have {', '.join(sorted(RECORD_FIELD_ATTRIBUTES))})",
                    )
            self.check_attributes(node, FIELD_ATTRIBUTES | RECORD_FIELD_ATTRIBUTES, what)
            if name is not None and (not name.isidentifier() or keyword.iskeyword(name)):
                self.error(
                    node.key_lines["name"],
                    f"{what}: a record's field name must be a Python identifier",
                )
        type_text = self.require(node, "type", str, what) or "str"
        nullable = type_text.endswith("?")
        base = type_text.rstrip("?")
        if base == RECORD_LIST and record_of is not None:
            self.error(
                node.key_lines["type"],
                f"{what}: a record's field cannot itself be a {RECORD_LIST} (records do not nest)",
            )
            base = "str"
        elif base not in BASE_TYPES and base != RECORD_LIST:
            self.error(
                node.key_lines.get("type", node.line),
                f"{what}: unknown type {type_text!r} (one of {', '.join(sorted(BASE_TYPES))}, optionally with ?, or {RECORD_LIST})",
            )
            base = "str"
        doc = self.require(node, "doc", str, what) or ""
        required = record_of is not None and "default" not in node
        if "default" not in node and record_of is None:
            self.error(node.line, f"{what}: missing required attribute 'default'")
        bounds: dict[str, float | None] = {}
        for key in ("min", "max", "gt"):
            value = node.get(key)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float))
            ):
                self.error(node.key_lines[key], f"{what}: {key!r} must be a number")
                value = None
            if value is not None and base.removeprefix("list[").rstrip("]") not in NUMBER_TYPES:
                self.error(
                    node.key_lines[key],
                    f"{what}: {key!r} only applies to number fields (int, float, steps, tokens and their lists)",
                )
                value = None
            bounds[key] = value
        choices = node.get("choices")
        if choices is not None and not isinstance(choices, list):
            self.error(node.key_lines["choices"], f"{what}: 'choices' must be a list")
            choices = None
        aliases = self.aliases(node, section_path, what) if record_of is None else []
        hf = node.get("hf")
        if hf is not None and (not isinstance(hf, str) or not hf.isidentifier()):
            self.error(
                node.key_lines["hf"],
                f"{what}: 'hf' must be the Hugging Face config.json key (an identifier)",
            )
            hf = None
        if hf is not None and hf != name and record_of is None:
            hf_path = _join(section_path, hf)  # the Hugging Face name also loads as an old name
            self.alias_versions[hf_path] = (self.first_version, None)
            aliases.append(hf_path)
        sentinels = node.get("sentinels", {})
        if not isinstance(sentinels, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in sentinels.items()
        ):
            self.error(
                node.key_lines["sentinels"],
                f"{what}: 'sentinels' must map each special value to its meaning",
            )
            sentinels = {}
        elif sentinels and base != "str":
            self.error(node.key_lines["sentinels"], f"{what}: 'sentinels' only apply to str fields")
        pattern, pattern_doc = node.get("pattern"), node.get("pattern_doc")
        if pattern is not None:
            if base.removeprefix("list[").rstrip("]") != "str" or not isinstance(pattern, str):
                self.error(
                    node.key_lines["pattern"],
                    f"{what}: 'pattern' is a regular expression for str fields",
                )
                pattern = None
            else:
                try:
                    re.compile(pattern)
                except re.error as error:
                    self.error(
                        node.key_lines["pattern"],
                        f"{what}: 'pattern' is not a regular expression: {error}",
                    )
                    pattern = None
        if pattern_doc is not None and (pattern is None or not isinstance(pattern_doc, str)):
            self.error(
                node.key_lines["pattern_doc"],
                f"{what}: 'pattern_doc' describes a 'pattern' in words",
            )
            pattern_doc = None
        derived = node.get("derived")
        if derived is not None:
            if not isinstance(derived, str):
                self.error(
                    node.key_lines["derived"],
                    f"{what}: 'derived' must be an expression over field paths",
                )
                derived = None
            elif not nullable or node.get("default") is not None:
                self.error(
                    node.key_lines["derived"],
                    f"{what}: a derived default needs a nullable type and default null (null means derived)",
                )
        secret = self.secret(node, base, derived, what)
        if base == RECORD_LIST:
            return self.read_record_list(
                node, what, path, doc, nullable, choices, hf, aliases, section_policy
            )
        if "record" in node or "fields" in node:
            key = "record" if "record" in node else "fields"
            self.error(
                node.key_lines[key],
                f"{what}: 'record' and 'fields' only apply to {RECORD_LIST} fields",
            )
        result = Field(
            policy=self.policy(node, section_policy, what),
            name=name or "?",
            path=path,
            type=base,
            nullable=nullable,
            default=node.get("default"),
            doc=" ".join(doc.split()),
            aliases=tuple(aliases),
            choices=tuple(choices) if choices is not None else None,
            min=bounds["min"],
            max=bounds["max"],
            gt=bounds["gt"],
            line=node.line,
            hf=hf,
            sentinels=tuple((k, " ".join(v.split())) for k, v in sentinels.items()),
            derived=derived,
            pattern=pattern,
            pattern_doc=pattern_doc,
            required=required,
            secret=secret,
        )
        if secret and result.policy != "overridable":
            self.error(
                node.key_lines["secret"],
                f"{what}: a secret field's policy must be overridable (checkpoints do not hold its "
                f"value), found {result.policy!r}",
            )
        self.derived_lines[result.path] = node.key_lines.get("derived", node.line)
        if "default" in node:
            problem = check_value(result, result.default)
            if problem:
                self.error(
                    node.key_lines["default"],
                    f"{what}: default {result.default!r} does not fit: {problem}",
                )
        for choice in choices or []:
            problem = check_value(result, choice, check_choices=False)
            if problem:
                self.error(
                    node.key_lines["choices"], f"{what}: choice {choice!r} does not fit: {problem}"
                )
        return result

    def secret(self, node: LineDict, base: str, derived: object, what: str) -> bool:
        """`secret: true`: the value is never saved, shown or logged (str fields only)."""
        if "secret" not in node:
            return False
        secret = node["secret"]
        if not isinstance(secret, bool):
            self.error(node.key_lines["secret"], f"{what}: 'secret' must be true or false")
            return False
        if secret and base != "str":
            self.error(
                node.key_lines["secret"],
                f"{what}: 'secret' only applies to str fields (a placeholder string stands for the value)",
            )
            return False
        if secret and node.get("default") is not None:
            self.error(
                node.key_lines["default"],
                f"{what}: a secret field's default must be null (the spec itself is not secret)",
            )
            return False
        if secret and derived is not None:
            self.error(
                node.key_lines["secret"], f"{what}: a secret field cannot have a derived default"
            )
            return False
        return secret

    def read_record_list(
        self,
        node: LineDict,
        what: str,
        path: str,
        doc: str,
        nullable: bool,
        choices: list | None,
        hf: str | None,
        aliases: list[str],
        section_policy: str,
    ) -> Field:
        """A list[record] field: its record's class name and fields; the default must be []."""
        if nullable:
            self.error(
                node.key_lines["type"],
                f"{what}: a {RECORD_LIST} field cannot be nullable (an empty list means none)",
            )
        if "default" in node and node["default"] != []:
            self.error(
                node.key_lines["default"],
                f"{what}: the default of a {RECORD_LIST} field must be [] (an empty list)",
            )
        for key, value in (("choices", choices), ("hf", hf)):
            if value is not None:
                self.error(
                    node.key_lines[key], f"{what}: {key!r} does not apply to a {RECORD_LIST} field"
                )
        policy = self.policy(node, section_policy, what)
        class_name = node.get("record")
        if "record" not in node:
            self.error(
                node.line,
                f"{what}: a {RECORD_LIST} field needs 'record': the class name of its items (e.g. DataSource)",
            )
            class_name = "?"
        elif (
            not isinstance(class_name, str)
            or not class_name.isidentifier()
            or not class_name[0].isupper()
        ):
            self.error(
                node.key_lines["record"],
                f"{what}: 'record' must be a class name (an identifier starting with a capital letter)",
            )
            class_name = "?"
        items = node.get("fields")
        fields: list[Field] = []
        if not isinstance(items, list) or not items:
            self.error(
                node.key_lines.get("fields", node.line),
                f"{what}: a {RECORD_LIST} field needs 'fields': a list of the record's fields (at least one)",
            )
            items = []
        lines: dict[str, int] = {}
        for child in items:
            parsed = self.read_field(child, "", policy, record_of=path)
            if parsed is None:
                continue
            if parsed.name in lines:
                self.error(
                    parsed.line,
                    f"field {parsed.path}: duplicate name {parsed.name!r} in the record (first declared on line {lines[parsed.name]})",
                )
                continue
            lines[parsed.name] = parsed.line
            fields.append(parsed)
        return Field(
            policy=policy,
            name=path.rsplit(".", 1)[-1],
            path=path,
            type=RECORD_LIST,
            nullable=False,
            default=[],
            doc=" ".join(doc.split()),
            aliases=tuple(aliases),
            line=node.line,
            record=RecordSpec(name=class_name, cls=None, fields=tuple(fields)),
        )

    def read_section(
        self,
        node: object,
        parent_path: str,
        inherited_policy: str = "overridable",
        is_root: bool = False,
    ) -> Section | None:
        what = "root" if is_root else "section"
        if not isinstance(node, LineDict):
            self.error(getattr(node, "line", 0), f"{what} must be a mapping")
            return None
        self.check_attributes(node, ROOT_ATTRIBUTES if is_root else SECTION_ATTRIBUTES, what)
        name = "" if is_root else (self.require(node, "name", str, what) or "?")
        path = _join(parent_path, name)
        what = f"section {path}" if path else "root"
        section = Section(
            name=name,
            path=path,
            class_name=self.require(node, "class", str, what) or "?",
            doc=" ".join((self.require(node, "doc", str, what) or "").split()),
            shorthand=node.get("shorthand"),
            aliases=self.aliases(node, parent_path, what),
            line=node.line,
            policy=self.policy(node, inherited_policy, what),
        )
        for child in node.get("fields", []) or []:
            parsed = self.read_field(child, path, section.policy)
            if parsed:
                section.fields.append(parsed)
        for child in node.get("sections", []) or []:
            parsed_section = self.read_section(child, path, section.policy)
            if parsed_section:
                section.sections.append(parsed_section)
        if section.shorthand is not None and section.shorthand not in {
            f.name for f in section.fields
        }:
            self.error(
                node.key_lines["shorthand"],
                f"{what}: shorthand {section.shorthand!r} is not a field of the section",
            )
        return section


def root_fields(root: Section) -> list[Field]:
    return [f for section in root.walk() for f in section.fields]


def has_constants(f: FieldSpec) -> bool:
    """A str field with choices or sentinels gets a generated constants class."""
    return f.item_type == "str" and (f.choices is not None or bool(f.sentinels))


def enum_class_name(field_name: str) -> str:
    """Name of the generated constants class of a choice or sentinel field: `schedule_type` ->
    `ScheduleType`."""
    return "".join(part.capitalize() for part in field_name.split("_"))


def enum_member_name(value: str) -> str:
    """Constant name of a choice or sentinel value: `max-autotune` -> `MAX_AUTOTUNE`; one that
    starts with a digit gets a V (for value) in front: `1f1b` -> `V1F1B`."""
    name = value.upper().replace("-", "_").replace(".", "_")
    return "V" + name if name[:1].isdigit() else name


def _compile_expression(
    reader: _Reader, text: str, line: int, sections: set[str], fields: set[str], what: str
) -> tuple[str | None, list[str]]:
    """Rewrite a rule expression over dotted field paths into one over `c`; collect the paths."""
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as error:
        reader.error(line, f"{what}: not a Python expression: {error.msg}")
        return None, []
    paths: list[str] = []
    bound = {
        n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id not in RULE_FUNCTIONS:
                reader.error(
                    line,
                    f"{what}: function {node.func.id!r} is not allowed (only {', '.join(sorted(RULE_FUNCTIONS))})",
                )
        elif isinstance(node, ast.Call):  # a method call, e.g. len.__self__.__import__('os')
            reader.error(
                line,
                f"{what}: calling {ast.unparse(node.func)!r} is not allowed (only {', '.join(sorted(RULE_FUNCTIONS))})",
            )
        if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            reader.error(line, f"{what}: private attribute {node.attr!r} is not allowed")

    class Rewrite(ast.NodeTransformer):
        def visit_Attribute(self, node: ast.Attribute) -> ast.AST:
            dotted = ast.unparse(node)
            if dotted in fields:
                if dotted not in paths:
                    paths.append(dotted)
                return ast.Attribute(
                    value=ast.parse("c." + dotted.rsplit(".", 1)[0], mode="eval").body
                    if "." in dotted
                    else ast.Name("c", ast.Load()),
                    attr=dotted.rsplit(".", 1)[-1],
                    ctx=ast.Load(),
                )
            if dotted.split(".")[0] in sections:
                reader.error(line, f"{what}: {dotted!r} names no field of the spec")
                return node
            return self.generic_visit(node)

        def visit_Name(self, node: ast.Name) -> ast.AST:
            if node.id in fields:
                if node.id not in paths:
                    paths.append(node.id)
                return ast.Attribute(value=ast.Name("c", ast.Load()), attr=node.id, ctx=ast.Load())
            if (
                node.id not in RULE_FUNCTIONS
                and node.id not in bound
                and node.id not in ("None", "True", "False")
            ):
                reader.error(line, f"{what}: {node.id!r} names no field of the spec")
            return node

    tree = ast.fix_missing_locations(Rewrite().visit(tree))
    return ast.unparse(tree), paths


def load_spec(path: str | Path, text: str | bytes | None = None) -> Spec:
    """Read and validate the spec; raise SpecError listing every problem."""
    if text is None:
        with open(path, "rb") as spec_file:
            text = spec_file.read()
    if isinstance(text, str):
        text = text.encode("utf-8")
    reader = _Reader(str(path))
    try:
        document = load_yaml(text)
    except YAMLLoadError as error:
        raise SpecError([f"{path}:{error.line}: {error.message}"]) from None
    if not isinstance(document, LineDict):
        raise SpecError(
            [f"{path}:1: the spec must be a mapping with {', '.join(sorted(TOP_ATTRIBUTES))}"]
        )
    reader.check_attributes(document, TOP_ATTRIBUTES, "spec")
    version = reader.require(document, "version", int, "spec") or 0
    root_node = document.get("root") or LineDict()
    root = reader.read_section(root_node, "", is_root=True) or Section(
        "", "", "Config", "", None, [], 0
    )
    for child in document.get("sections", []) or []:
        parsed = reader.read_section(child, "")
        if parsed:
            root.sections.append(parsed)

    # Names: fields and sections are unique per section; aliases collide with nothing.
    taken: dict[str, int] = {}
    for section in root.walk():
        for item in section.fields + section.sections:
            line = item.line
            if item.path in taken:
                reader.error(
                    line,
                    f"duplicate name {item.path!r} (first declared on line {taken[item.path]})",
                )
            else:
                taken[item.path] = line
    for section in root.walk():
        for item in ([section] if section is not root else []) + section.fields:
            for alias in item.aliases:
                if alias in taken:
                    reader.error(
                        item.line,
                        f"{item.path}: alias {alias!r} collides with the field or section {alias!r} (line {taken[alias]})",
                    )
                else:
                    taken[alias] = item.line
                parent = alias.rsplit(".", 1)[0] if "." in alias else ""
                if (
                    parent
                    and parent not in {s.path for s in root.walk()}
                    and parent not in {a for s in root.walk() for a in s.aliases}
                ):
                    reader.error(
                        item.line,
                        f"{item.path}: alias {alias!r} lives in {parent!r}, which is not a section",
                    )
    class_names: dict[str, int] = {}
    for section in root.walk():
        if section.class_name in class_names:
            reader.error(
                section.line,
                f"duplicate class name {section.class_name!r} (also line {class_names[section.class_name]})",
            )
        class_names.setdefault(section.class_name, section.line)
    for f in root_fields(root):
        if f.record is None or f.record.name == "?":
            continue
        if f.record.name in class_names:
            reader.error(
                f.line,
                f"field {f.path}: record class name {f.record.name!r} is taken (also line {class_names[f.record.name]})",
            )
        class_names.setdefault(f.record.name, f.line)

    field_paths = {f.path for s in root.walk() for f in s.fields}
    section_names = {s.path.split(".")[0] for s in root.walk() if s.path}
    rules: list[Rule] = []
    for node in document.get("rules", []) or []:
        if not isinstance(node, LineDict):
            reader.error(getattr(node, "line", 0), "each rule must be a mapping")
            continue
        reader.check_attributes(node, RULE_ATTRIBUTES, "rule")
        check = reader.require(node, "check", str, "rule")
        message = reader.require(node, "message", str, "rule")
        when = node.get("when")
        if check is None or message is None:
            continue
        what = f"rule {check!r}"
        check_code, paths = _compile_expression(
            reader, check, node.key_lines["check"], section_names, field_paths, what
        )
        when_code = None
        if when is not None:
            when_code, when_paths = _compile_expression(
                reader, when, node.key_lines["when"], section_names, field_paths, what
            )
            paths += [p for p in when_paths if p not in paths]
        if check_code is None:  # not an expression: reported, and load_spec raises below
            continue
        rules.append(Rule(check, when, message, paths, check_code, when_code, node.line))

    derived: list[DerivedDefault] = []
    for f in root_fields(root):
        if f.derived is None:
            continue
        code, paths = _compile_expression(
            reader,
            f.derived,
            reader.derived_lines[f.path],
            section_names,
            field_paths,
            f"field {f.path}: derived",
        )
        if f.path in paths:
            reader.error(
                reader.derived_lines[f.path],
                f"field {f.path}: a derived default cannot read itself",
            )
        if code is None:  # not an expression: reported, and load_spec raises below
            continue
        derived.append(DerivedDefault(f.path, f.derived, code, paths))
    batch_schedule = _read_batch_schedule(reader, document, section_names, field_paths)
    quantity_fields = [
        g.path
        for parent in root_fields(root)
        for g in [parent, *record_fields(parent)]
        if g.item_type == "steps"
    ]
    if quantity_fields and batch_schedule is None:
        reader.error(
            1,
            f"steps fields ({', '.join(quantity_fields)}) take token counts, which need a "
            f"top-level batch_schedule ({', '.join(BATCH_SCHEDULE_KEYS)})",
        )
    enum_names: dict[str, str] = {}
    every_field = [g for parent in root_fields(root) for g in [parent, *record_fields(parent)]]
    for f in every_field:
        if not has_constants(f):
            continue
        name = enum_class_name(f.name)
        if name in enum_names or name in class_names:
            reader.error(
                f.line,
                f"field {f.path}: its constants class {name!r} collides with {enum_names.get(name) or 'a section or record class'}",
            )
        enum_names[name] = f.path
        for value in list(f.choices or ()) + [value for value, _ in f.sentinels]:
            if not isinstance(value, str) or not enum_member_name(value).isidentifier():
                reader.error(f.line, f"field {f.path}: value {value!r} cannot name a constant")

    if reader.problems:
        raise SpecError(reader.problems)
    for alias, (since, _removed) in reader.alias_versions.items():
        if isinstance(since, int) and since > version:
            reader.problems.append(
                f"{path}: alias {alias!r}: 'since' {since} is newer than the spec version {version}"
            )
    if reader.problems:
        raise SpecError(reader.problems)
    return Spec(
        str(path),
        hashlib.sha256(text).hexdigest(),
        version,
        root,
        rules,
        reader.alias_versions,
        derived,
        batch_schedule,
    )


def _read_batch_schedule(
    reader: _Reader, document: LineDict, sections: set[str], fields: set[str]
) -> BatchScheduleSpec | None:
    """The top-level `batch_schedule`: one expression per BATCH_SCHEDULE_KEYS key."""
    node = document.get("batch_schedule")
    if node is None:
        return None
    line = document.key_lines["batch_schedule"]
    if not isinstance(node, LineDict):
        reader.error(line, f"batch_schedule must be a mapping of {', '.join(BATCH_SCHEDULE_KEYS)}")
        return None
    reader.check_attributes(node, set(BATCH_SCHEDULE_KEYS), "batch_schedule")
    expressions: dict[str, str] = {}
    codes: dict[str, str] = {}
    paths: list[str] = []
    for key in BATCH_SCHEDULE_KEYS:
        text = reader.require(node, key, str, "batch_schedule")
        if text is None:
            continue
        code, read = _compile_expression(
            reader, text, node.key_lines[key], sections, fields, f"batch_schedule.{key}"
        )
        if code is None:
            continue
        expressions[key], codes[key] = text, code
        paths += [p for p in read if p not in paths]
    if len(codes) != len(BATCH_SCHEDULE_KEYS):
        return None
    return BatchScheduleSpec(expressions, codes, paths)
