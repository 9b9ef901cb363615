"""The runtime knows the config only through generated tables: no Hugging Face config name,
choice or special value, or field path is written as a string literal in runtime/ (docstrings
aside). Code uses generated.PATH, the generated constants classes and generated.HF_NAMES."""

import ast
import re
from pathlib import Path

import pytest

from generated import ALIASES, FIELDS, HF_NAMES, SECTIONS

RUNTIME = Path(__file__).resolve().parents[1] / "runtime"
SOURCES = sorted(p for p in RUNTIME.rglob("*.py") if "configlib" not in p.parts)
DOTTED = re.compile(r"(?<![\w.])[a-z_]+(?:\.[a-z_]+)+(?![\w(])")
PATHS = set(FIELDS) | {p for p in SECTIONS if p} | set(ALIASES)
VALUES = {
    str(value): path
    for path, spec in FIELDS.items()
    for value in list(spec.choices or ()) + [v for v, _ in spec.sentinels]
}
HF_KEYS = {name: path for path, name in HF_NAMES.items()}
# The same word meaning something other than the config value; each entry says what it is.
UNRELATED = {
    ("console.py", "default"): "warnings.simplefilter action",
    ("corpus.py", "stdlib"): "sysconfig.get_paths() key",
    ("corpus.py", "bytes"): "byte count in the corpus cache metadata",
    ("corpus.py", "vocab_size"): "key of the BPE cache metadata",
    ("prepare.py", "bytes"): "byte count of an input in the dataset manifest",
    ("prepare.py", "vocab_size"): "key of the dataset manifest's tokenizer record",
    ("data.py", "vocab_size"): "key of the dataset manifest's tokenizer record (data inspect)",
    ("sources.py", "vocab_size"): "key of the dataset manifest's tokenizer record",
    ("mixture.py", "vocab_size"): "key of the dataset manifest's tokenizer record",
    ("state_dict_adapter.py", "float32"): "storage dtype of an export (config.json torch_dtype)",
    ("state_dict_adapter.py", "bfloat16"): "storage dtype of an export (config.json torch_dtype)",
    ("state_dict_adapter.py", "default"): "Hugging Face rope_type of unscaled rotary embeddings",
    ("wandb_logger.py", "latest"): "wandb artifact alias",
    ("metrics.py", "none"): "printed when there is no best validation loss yet",
    ("hf_folder.py", "float32"): "storage dtype of an export",
    ("hf_folder.py", "bfloat16"): "storage dtype of an export",
}


def _docstring_ids(tree):
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def _literal_strings(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    docstrings = _docstring_ids(tree)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in docstrings
        ):
            yield node.lineno, node.value


def _violations(path):
    found = []
    for line, text in _literal_strings(path):
        where = f"{path.relative_to(RUNTIME.parent)}:{line}"
        if text in VALUES and (path.name, text) not in UNRELATED:
            found.append(
                f"{where}: {text!r} is a value of {VALUES[text]}; use its generated constant"
            )
        if text in HF_KEYS and (path.name, text) not in UNRELATED:
            found.append(
                f"{where}: {text!r} is the Hugging Face name of {HF_KEYS[text]}; use HF_NAMES"
            )
        for token in DOTTED.findall(text):
            if token in PATHS:
                found.append(f"{where}: field path {token!r} written literally; use generated.PATH")
    return found


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_no_spec_knowledge_written_literally(path):
    assert not _violations(path)


def test_the_search_finds_what_it_looks_for(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text(
        '"""Docstrings may say training.max_iters."""\n'
        'a = "cosine"\n'
        'b = f"see checkpointer.resume_from for {a}"\n'
        'c = "hidden_size"\n'
        'd = "model.safetensors"\n'
    )
    global RUNTIME
    saved, RUNTIME = RUNTIME, tmp_path
    try:
        found = _violations(planted)
    finally:
        RUNTIME = saved
    assert len(found) == 3, found
    assert any("'cosine'" in f for f in found)
    assert any("checkpointer.resume_from" in f for f in found)
    assert any("hidden_size" in f for f in found)
