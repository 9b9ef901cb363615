"""Every registry holds exactly the names its spec field's `choices` list, and vice versa."""

import pytest

from generated import FIELDS
from runtime.registry import EXTERNAL_CHOICE_FIELDS, Registry, all_registries

CHOICES = {path: list(spec.choices) for path, spec in FIELDS.items() if spec.choices is not None}
REGISTRIES = all_registries()


def test_every_choice_field_has_a_registry_or_is_declared_external():
    uncovered = set(CHOICES) - set(REGISTRIES) - set(EXTERNAL_CHOICE_FIELDS)
    assert not uncovered, f"spec fields with choices but no runtime registry: {sorted(uncovered)}"


def test_every_registry_implements_a_spec_choice_field():
    stray = set(REGISTRIES) - set(CHOICES)
    assert not stray, f"registries for fields the spec does not give choices: {sorted(stray)}"
    assert not set(EXTERNAL_CHOICE_FIELDS) - set(CHOICES)
    assert not set(EXTERNAL_CHOICE_FIELDS) & set(REGISTRIES)


@pytest.mark.parametrize("field", sorted(REGISTRIES))
def test_registry_names_equal_spec_choices(field):
    registry = REGISTRIES[field]
    names, choices = set(registry.names()), set(CHOICES[field])
    assert (
        not choices - names
    ), f"{field}: spec choices without an implementation: {sorted(choices - names)}"
    assert (
        not names - choices
    ), f"{field}: implementations the spec does not list: {sorted(names - choices)}"


def test_external_choice_fields_are_handled_by_the_model():
    # model.score_func: the router branches on the name; every choice builds and routes differently
    import torch

    from generated.config import ModelConfig, MoETrainingConfig, MTPTrainingConfig
    from runtime.model import Transformer

    tokens = torch.arange(12).view(2, 6)
    outputs = []
    for choice in CHOICES["model.score_func"]:
        torch.manual_seed(0)
        model = Transformer(
            ModelConfig(
                dim=32,
                inter_dim=64,
                moe_inter_dim=32,
                n_layers=2,
                n_heads=2,
                kv_lora_rank=16,
                qk_nope_head_dim=16,
                qk_rope_head_dim=8,
                v_head_dim=16,
                n_routed_experts=4,
                n_group=1,
                score_func=choice,
                mtp_depth=0,
            ),
            MoETrainingConfig(),
            MTPTrainingConfig(),
        )
        outputs.append(model(tokens))
    for other in outputs[1:]:
        assert not torch.equal(outputs[0], other)


def test_unknown_name_error_lists_the_choices():
    registry = Registry("x.y", "thing")
    registry.register("a", 1)

    @registry.register("b")
    def b():
        return 2

    assert registry.get("a") == 1 and registry["b"] is b and "a" in registry
    with pytest.raises(KeyError, match="one of: a, b"):
        registry.get("c")
    with pytest.raises(ValueError):
        registry.register("a", 3)


def test_rope_scaling_choices_change_the_model():
    # model.rope_scaling: the rotary tables and softmax scale branch on it (parity with
    # transformers in tests/test_hf_release.py)
    import torch

    from tiny import debug_model

    tokens = torch.arange(24).view(2, 12)
    outputs = []
    for choice in CHOICES["model.rope_scaling"]:
        model = debug_model(rope_scaling=choice, original_seq_len=4, rope_factor=8.0).eval()
        with torch.no_grad():
            outputs.append(model(tokens))
    assert len(outputs) == 2 and (outputs[0] - outputs[1]).abs().max() > 1e-4
