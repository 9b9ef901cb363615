"""Safe YAML loading that remembers the line of every mapping key.

Used by the generator to read the spec and, copied verbatim into generated/, by the config parser.
Only the YAML core types load; any other tag (`!!python/object`, custom tags) is an error.
PyYAML is imported on the first load, not at import: importing the config package stays cheap.
"""

import functools


class LineDict(dict):
    """A dict that knows the 1-based line of itself and of each of its keys."""

    line = 0

    def __init__(self):
        super().__init__()
        self.key_lines = {}


class LineList(list):
    """A list that knows its 1-based line and the line of each item."""

    line = 0

    def __init__(self):
        super().__init__()
        self.item_lines = []


class YAMLLoadError(Exception):
    """A YAML document that could not be read: syntax, an unsafe tag or a duplicate key."""

    def __init__(self, message, line):
        super().__init__(message)
        self.message = message
        self.line = line


def _construct_mapping(loader, node):
    loader.flatten_mapping(node)
    mapping = LineDict()
    mapping.line = node.start_mark.line + 1
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if not isinstance(key, str):
            raise YAMLLoadError(f"keys must be strings, found {key!r}", line)
        if key in mapping:
            first = mapping.key_lines[key]
            raise YAMLLoadError(f"duplicate key {key!r} (first given on line {first})", line)
        mapping[key] = loader.construct_object(value_node, deep=True)
        mapping.key_lines[key] = line
    return mapping


def _construct_sequence(loader, node):
    items = LineList()
    items.line = node.start_mark.line + 1
    for item_node in node.value:
        items.append(loader.construct_object(item_node, deep=True))
        items.item_lines.append(item_node.start_mark.line + 1)
    return items


def _reject_tag(loader, tag_suffix, node):
    raise YAMLLoadError(
        f"unsafe or unknown YAML tag {node.tag!r} rejected; only plain YAML values are allowed",
        node.start_mark.line + 1,
    )


@functools.cache
def _loader():
    import yaml

    # libyaml's parser when PyYAML has it (several times faster); same constructors either way.
    class Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
        pass

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)
    Loader.add_multi_constructor("", _reject_tag)
    Loader.add_constructor(None, lambda loader, node: _reject_tag(loader, "", node))
    return Loader


def load_yaml(text):
    """Parse one YAML document into LineDict/LineList/scalars; None for an empty document."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as error:
            raise YAMLLoadError(f"file is not valid UTF-8 ({error.reason} at byte {error.start})", 1)
    import yaml

    try:
        return yaml.load(text, Loader=_loader())
    except YAMLLoadError:
        raise
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = mark.line + 1 if mark is not None else 1
        problem = " ".join(part for part in (error.context, error.problem) if part)
        raise YAMLLoadError(f"YAML syntax error: {problem}", line) from None
    except yaml.YAMLError as error:
        raise YAMLLoadError(f"YAML error: {error}", 1) from None
    except RecursionError:
        raise YAMLLoadError("YAML document nested too deeply", 1) from None
