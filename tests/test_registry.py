"""Every registry holds exactly the names its spec field's `choices` list, and vice versa; an
incomplete registry fails when its module is imported."""

import pytest

import runtime.components.data  # noqa: F401  (the modules that fill the registries)
import runtime.components.lr_schedule  # noqa: F401
import runtime.distributed.precision  # noqa: F401
import runtime.distributed.utils  # noqa: F401
from generated import FIELDS, PATH
from runtime.utils.registry import BRANCHING_FIELDS, Registry, RegistryIncomplete, all_registries

CHOICES = {path: list(spec.choices) for path, spec in FIELDS.items() if spec.choices is not None}
REGISTRIES = all_registries()


def test_every_choice_field_has_a_registry_or_is_declared_external():
    uncovered = set(CHOICES) - set(REGISTRIES) - set(BRANCHING_FIELDS)
    assert not uncovered, f"spec fields with choices but no runtime registry: {sorted(uncovered)}"


def test_every_registry_implements_a_spec_choice_field():
    stray = set(REGISTRIES) - set(CHOICES)
    assert not stray, f"registries for fields the spec does not give choices: {sorted(stray)}"
    assert not set(BRANCHING_FIELDS) - set(CHOICES)
    assert not set(BRANCHING_FIELDS) & set(REGISTRIES)


@pytest.mark.parametrize("field", sorted(REGISTRIES))
def test_registry_names_equal_spec_choices(field):
    registry = REGISTRIES[field]
    names, choices = set(registry.names()), set(CHOICES[field])
    assert not choices - names, (
        f"{field}: spec choices without an implementation: {sorted(choices - names)}"
    )
    assert not names - choices, (
        f"{field}: implementations the spec does not list: {sorted(names - choices)}"
    )


def test_branching_choice_fields_are_handled_by_the_model():
    # model.score_func: the router branches on the name; every choice builds and routes differently
    import torch

    from generated.config import ModelConfig
    from runtime.models.deepseek_v3.model import Transformer

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
        )
        outputs.append(model(tokens).logits)
    for other in outputs[1:]:
        assert not torch.equal(outputs[0], other)


def test_unknown_name_error_lists_the_choices():
    registry = Registry(PATH.schedule.schedule_type, "thing")
    first, second = list(registry.choices)[:2]
    registry.register(first, 1)

    @registry.register(second)
    def b():
        return 2

    assert registry.get(first) == 1 and registry[second] is b and first in registry
    with pytest.raises(KeyError, match=f"one of: {first}, {second}"):
        registry.get("nope")
    with pytest.raises(RegistryIncomplete, match="twice"):
        registry.register(first, 3)
    with pytest.raises(RegistryIncomplete, match="not one of the generated constants"):
        registry.register("cosine", 3)  # a plain string, not the generated constant


def test_an_incomplete_registry_fails_at_completion():
    registry = Registry(PATH.schedule.schedule_type, "thing")
    choices = list(registry.choices)
    for choice in choices[:-1]:
        registry.register(choice, object())
    with pytest.raises(RegistryIncomplete, match=choices[-1].value):
        registry.complete()
    registry.register(choices[-1], object())
    assert registry.complete() is registry


def test_rope_scaling_choices_change_the_model():
    # model.rope_scaling: the rotary tables and softmax scale branch on it (parity with
    # transformers in tests/test_hf_release.py)
    import torch

    from helpers import debug_model

    tokens = torch.arange(24).view(2, 12)
    outputs = []
    for choice in CHOICES["model.rope_scaling"]:
        model = debug_model(rope_scaling=choice, original_seq_len=4, rope_factor=8.0).eval()
        with torch.no_grad():
            outputs.append(model(tokens).logits)
    assert len(outputs) == 2 and (outputs[0] - outputs[1]).abs().max() > 1e-4
