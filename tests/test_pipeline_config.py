"""Pipeline settings without launching anything: the rules of the spec, how layers are split into
stages and stages placed on processes, and a stage module against the whole model's loss."""

import pytest
import torch

from generated import ConfigError, load_config
from helpers import make_model, training_loss
from runtime.distributed.layout import stage_layers, stage_ranks
from runtime.models.deepseek_v3.pipeline import StageModule, combine, held_stages, keep_stages

PP = ["--system.distributed.pipeline_parallel", "2", "--model.n_layers", "4"]


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--system.device.dtype", "float16"], "float16's gradient scaling is not wired"),
        (["--system.distributed.pipeline_split", "1,2"], "a manual split gives the first layer"),
        (["--system.distributed.pipeline_split", "3", "--model.n_layers", "3",
          "--system.distributed.pipeline_parallel", "4"], "every stage needs at least one layer"),
        (["--system.distributed.pipeline_schedule", "interleaved_1f1b",
          "--system.distributed.pipeline_stages_per_rank", "1"], "several stages per process"),
    ],
)  # fmt: skip
def test_pipeline_rules(flags, says):
    with pytest.raises(ConfigError, match=says):
        load_config(argv=PP + flags)


@pytest.mark.parametrize(
    ("world", "flags", "says"),
    [
        (4, ["--system.distributed.pipeline_schedule", "zbv", "--system.distributed.dp_shard", "2",
             "--training.gradient_accumulation_steps", "4"],
         "splits the backward into input and weight passes"),
        (2, ["--training.gradient_accumulation_steps", "1"],
         "1 micro-batches per step .* 1f1b needs at least as many micro-batches as stages \\(2\\)"),
        (2, ["--training.gradient_accumulation_steps", "2", "--system.distributed.pipeline_schedule",
             "dualpipev"], "dualpipev needs at least as many micro-batches as stages \\(4\\)"),
    ],
)  # fmt: skip
def test_what_training_refuses_at_launch(world, flags, says):
    """Checked before any process group exists (prepare_run), with the world size; `plan`
    still estimates these layouts."""
    from runtime.components.data.errors import DataError
    from runtime.trainer.prepare import check_batches

    with pytest.raises(DataError, match=says):
        check_batches(load_config(argv=PP + flags), world)
    check_batches(load_config(argv=PP + ["--training.gradient_accumulation_steps", "4"]), 2)


def test_stages_split_layers_evenly_or_as_told_and_sit_looped_or_in_a_v():
    assert stage_layers(61, 16)[0] == range(0, 4) and stage_layers(61, 16)[-1] == range(58, 61)
    assert sum(len(r) for r in stage_layers(61, 16)) == 61
    assert stage_layers(8, 3, [2, 7]) == [range(0, 2), range(2, 7), range(7, 8)]
    assert stage_ranks(False, 2, 2) == [0, 1, 0, 1]  # interleaved: looped
    assert stage_ranks(True, 2, 2) == [0, 1, 1, 0]  # zbv / dualpipev: first and last on rank 0
    assert held_stages(4, 2, 2, [], True, 0) == {0: range(0, 1), 3: range(3, 4)}


def test_two_stage_modules_give_the_whole_models_loss_and_gradients():
    """Stages 0 and 1 of a 3-layer model, run one after the other in one process: the loss
    vector weighed by `combine` equals TrainingLoss's, and every weight gets the same gradient
    (the first stage's balance terms through AddLossGradient)."""
    torch.manual_seed(0)
    whole = make_model()
    loss = training_loss()
    window = torch.randint(0, 256, (2, 12 + whole.config.mtp_depth))
    torch.manual_seed(1)  # router noise, if any, drawn alike
    want = loss(whole, window, 0)
    want.loss.backward()
    staged = make_model()
    staged.load_state_dict(whole.state_dict())
    keep_stages(staged, [range(0, 3)], first=True, last=True)  # nothing dropped
    n_moe = sum(1 for _ in whole.moe_layers())
    kw = dict(aux_weight=loss.aux_loss_weight, z_weight=loss.z_loss_weight, n_moe_layers=n_moe,
              eos_id=None)  # fmt: skip
    first = StageModule(staged, range(0, 2), first=True, last=False, **kw)  # a MoE layer too
    last = StageModule(staged, range(2, 3), first=False, last=True, **kw)
    torch.manual_seed(1)
    h = first(window, tokens=window)
    out = last(h, tokens=window)
    got = combine(lambda: loss.mtp_weight(0), lambda: 1.0)(out)
    # the first stage's balance and z terms are not in the value, only in the gradient
    first_terms = kw["aux_weight"] * first.aux_sum + kw["z_weight"] * first.z_sum / n_moe
    assert float(got) + float(first_terms) == pytest.approx(float(want.loss), rel=1e-6)
    got.backward()
    for (name, a), b in zip(whole.named_parameters(), staged.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7), name


def test_a_pipelines_blocks_compile_in_place():
    from generated.config import TorchCompilationConfig
    from runtime.distributed.compile import compile_in_place

    blocks = list(make_model().layers)
    names = [dict(b.named_parameters()).keys() for b in blocks]
    assert compile_in_place(blocks, TorchCompilationConfig(compile=False)) == 0
    assert all(b._compiled_call_impl is None for b in blocks)
    assert compile_in_place(blocks, TorchCompilationConfig(compile=True)) == len(blocks)
    assert all(b._compiled_call_impl is not None for b in blocks)  # compiled on first call
    assert [dict(b.named_parameters()).keys() for b in blocks] == names  # names unchanged


def test_a_manual_split_decides_what_each_process_keeps():
    """system.distributed.pipeline_split reaches the pruning (ModelSpec.keep_stages): the
    process of stage 0 keeps layers 0-2 and the embedding, the other the last layer and the head."""
    from runtime.distributed.layout import Layout
    from runtime.models import get_model_spec
    from runtime.models.deepseek_v3.pipeline import Absent

    cfg = load_config(argv=PP + ["--system.distributed.pipeline_split", "3"])
    spec, layout = get_model_spec(), Layout(2, 1, 1, 1, pipeline_parallel=2)
    kept = {}
    for rank in (0, 1):
        with torch.device("meta"):
            model = spec.build(cfg.model, None)
        assert spec.keep_stages is not None
        assert spec.keep_stages(model, cfg.system.distributed, layout, rank) == {
            rank: range(0, 3) if rank == 0 else range(3, 4)
        }
        kept[rank] = [i for i, b in enumerate(model.layers) if not isinstance(b, Absent)]
        assert isinstance(model.head, Absent) == (rank == 0)
    assert kept == {0: [0, 1, 2], 1: [3]}
