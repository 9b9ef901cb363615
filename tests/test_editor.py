"""Editor support: every example config points yaml-language-server at the generated JSON Schema."""

import io
import json
import sys

import pytest
import yaml

from generated import load_config
from helpers import REPO
from runtime.cli import config as config_cli

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
MODELINE = "# yaml-language-server: $schema=../generated/config.schema.json"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_has_the_schema_modeline(path):
    first = path.read_text().splitlines()[0]
    assert first == MODELINE
    schema = (path.parent / first.split("$schema=", 1)[1]).resolve()
    assert schema == REPO / "generated" / "config.schema.json"
    assert json.loads(schema.read_text())["$schema"].startswith("http")
    # a comment to YAML: the loader and the validator see the same document as without it
    text = path.read_text()
    assert yaml.safe_load(text) == yaml.safe_load(text.split("\n", 1)[1])
    load_config(str(path))


def test_migrate_keeps_the_modeline(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    assert config_cli.main(["migrate", str(REPO / "configs" / "legacy_deepseek3.yaml")]) == 0
    assert out.getvalue().splitlines()[0] == MODELINE
    assert "hidden_size" not in out.getvalue()


def test_readme_shows_the_modeline():
    assert MODELINE in (REPO / "README.md").read_text()
