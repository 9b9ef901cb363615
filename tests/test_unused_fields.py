"""Every spec field must be read by the runtime (not only by the generated parser).

Dynamic check: the config objects are swapped for instances of recording subclasses of the
generated slots dataclasses (same fields, isinstance still holds) that note every field read
outside the config machinery itself (construction/validation, config_to_dict, dump_yaml). Then tiny
trainings run with settings that take the optional code paths (text_dir data, wandb offline with
log_model, compile flag resolution, token dropping, router noise, resume...), every schedule type
is evaluated, and the helpers the trainer uses under torchrun (process-group backend, DDP options)
are called. A spec field nobody read fails the test, by its dotted path.
"""

import contextlib
import dataclasses
import json
import os

import numpy as np
import pytest
import torch

import generated.parser as gparser
from generated import FIELDS
from generated.config import (
    Config,
    DataConfig,
    DataSource,
    LRScheduleConfig,
    LRSegment,
    MoETrainingConfig,
    MTPTrainingConfig,
    TorchCompilationConfig,
)
from helpers import TINY_RUN_FLAGS, trainer_args
from runtime.components.data.corpus import load_corpus
from runtime.components.data.module import DataModule
from runtime.components.data.prepare import Settings, prepare
from runtime.components.lr_schedule import lr_at, phase_at
from runtime.components.tokenizer import TextCodec
from runtime.distributed import utils as dist_utils
from runtime.distributed.compile import compile_module
from runtime.distributed.data_parallel import ddp_options
from runtime.trainer import prepare as prepare_mod
from runtime.trainer import trainer as train_mod

KINDS = ("cosine", "linear", "constant", "wsd", "cosine_restarts", "multi_phase", "piecewise")
"""Every schedule type."""

TINY = TINY_RUN_FLAGS + [
    "--evaluator.eval_iters",
    "1",
    "--schedule.warmup_iters",
    "1",
    "--schedule.lr_decay_iters",
    "20",
]


# Spec fields the runtime does not read yet, each listed with the change that wires it; that change
# removes its entries (the test fails while a listed field is read). The fields of a record are
# listed by their `[]` path, as FIELDS[...].record.fields names them.
NOT_WIRED_YET: set[str] = set()


def spec_paths():
    """Every field path, and the `[]` paths of the fields of each record (`data.sources[].path`)."""
    records = [rf.path for spec in FIELDS.values() if spec.record for rf in spec.record.fields]
    return list(FIELDS) + records


class Recorder:
    def __init__(self):
        self.reads = set()
        self.paused = 0
        self._classes = {}

    @contextlib.contextmanager
    def pause(self):
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1

    def recording_class(self, cls, path):
        key = (cls, path)
        if key not in self._classes:
            names = frozenset(f.name for f in dataclasses.fields(cls))
            prefix = f"{path}." if path else ""
            recorder = self

            def __getattribute__(obj, name):
                value = object.__getattribute__(obj, name)
                if name in names and not recorder.paused:
                    recorder.reads.add(prefix + name)
                return value

            def __init__(obj, **kwargs):
                with recorder.pause():
                    cls.__init__(obj, **kwargs)

            self._classes[key] = type(
                cls.__name__,
                (cls,),
                {
                    "__slots__": (),
                    "__getattribute__": __getattribute__,
                    "__init__": __init__,
                },
            )
        return self._classes[key]

    def wrap(self, obj, path=""):
        """A recording copy of a config (section), nested sections included."""
        cls = type(obj)
        while cls.__name__ == cls.__bases__[0].__name__:  # already a recording class
            cls = cls.__bases__[0]
        with self.pause():
            kwargs = {}
            for f in dataclasses.fields(cls):
                value = getattr(obj, f.name)
                if dataclasses.is_dataclass(value):
                    value = self.wrap(value, f"{path}.{f.name}" if path else f.name)
                elif isinstance(value, list) and any(dataclasses.is_dataclass(v) for v in value):
                    # the items of a list[record] field: reads count as `data.sources[].path`
                    items = f"{path}.{f.name}[]" if path else f"{f.name}[]"
                    value = [self.wrap(item, items) for item in value]
                kwargs[f.name] = value
            return self.recording_class(cls, path)(**kwargs)

    def rewrapping_call(self, fn):
        def call(*args, **kwargs):
            with self.pause():
                result = fn(*args, **kwargs)
            resolved = result[0] if isinstance(result, tuple) else result
            resolved.config = self.wrap(resolved.config)
            return result

        return call

    def paused_call(self, fn):
        def call(*args, **kwargs):
            with self.pause():
                return fn(*args, **kwargs)

        return call


@pytest.fixture
def recorder(monkeypatch):
    rec = Recorder()
    # the config machinery reads every field; those reads are not uses
    for name in ("to_saved_dict", "dump_yaml"):
        monkeypatch.setattr(train_mod, name, rec.paused_call(getattr(gparser, name)))
    # these build a new config (derived defaults, resume, init_from): keep recording reads of the
    # one they return
    monkeypatch.setattr(
        train_mod, "resolved_from_config", rec.rewrapping_call(gparser.resolved_from_config)
    )
    for name in ("reconcile_with_checkpoint", "adopt_values"):
        monkeypatch.setattr(prepare_mod, name, rec.rewrapping_call(getattr(gparser, name)))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield rec
    torch.set_num_threads(before)


def test_recorder_sees_reads_per_section(recorder):
    cfg = recorder.wrap(Config())
    assert isinstance(cfg.system.distributed, type(Config().system.distributed))
    cfg.system.distributed.enabled  # noqa: B018 - a read
    assert recorder.reads == {"system.distributed", "system", "system.distributed.enabled"}
    assert "wandb.enabled" not in recorder.reads
    with recorder.pause():
        gparser.config_to_dict(cfg)
    assert "model.dim" not in recorder.reads
    copy = dataclasses.replace(cfg.model, dim=8)  # replace keeps recording
    copy.dim  # noqa: B018
    assert "model.dim" in recorder.reads


def test_recorder_sees_reads_of_record_items(recorder):
    from generated.config import DataConfig, DataSource

    sources = [DataSource(path="a"), DataSource(path="b", weight=2.0)]
    cfg = recorder.wrap(Config(data=DataConfig(sources=sources)))
    assert isinstance(cfg.data.sources[1], DataSource)
    assert cfg.data.sources[1].weight == 2.0
    assert recorder.reads == {"data", "data.sources", "data.sources[].weight"}
    assert "data.sources[].weight" in spec_paths()


def test_every_spec_field_is_read_by_the_runtime(recorder, tmp_path, monkeypatch):
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    text = tmp_path / "text"
    text.mkdir()
    for i in range(3):
        (text / f"f{i}.txt").write_text("def function(argument):\n    return argument * 2\n" * 40)
    out = tmp_path / "out"
    argv = trainer_args(
        out,
        tmp_path / "data",
        "--data.dataset",
        "text_dir",
        "--data.path",
        str(text),
        "--data.num_workers",
        "1",
        "--training.max_iters",
        "2",
        "--evaluator.eval_interval",
        "1",
        "--checkpointer.save_interval",
        "1",
        "--wandb.enabled",
        "true",
        "--wandb.log_model",
        "true",
        "--moe.drop_tokens",
        "true",
        "--moe.router_noise_scale",
        "0.1",
        "--moe.z_loss_weight",
        "0.01",
        "--model.q_lora_rank",
        "8",
        "--mtp.warmup_steps",
        "2",
        "--model.rope_scaling",
        "yarn",
        "--model.original_seq_len",
        "8",
        "--model.rope_factor",
        "4",
        "--moe.bias_update_speed_until",
        "1",
        "--mtp.mtp_loss_weight_until",
        "1",
        "--schedule.schedule_type",
        "multi_phase",
        "--schedule.phase_steps",
        "[1]",
        "--schedule.phase_names",
        "[b]",
        flags=TINY,
    )
    cfg = recorder.wrap(gparser.load_config(argv=argv))
    assert train_mod.Trainer(cfg).run() == 0
    # resume and eval_only paths
    cfg = recorder.wrap(
        gparser.load_config(
            argv=argv
            + [
                "--checkpointer.resume_from",
                "latest",
                "--evaluator.eval_only",
                "true",
                "--wandb.enabled",
                "false",
            ]
        )
    )
    assert train_mod.Trainer(cfg).run() == 0
    # every schedule type
    for kind in KINDS:
        schedule = recorder.wrap(
            LRScheduleConfig(
                schedule_type=kind,
                warmup_iters=2,
                lr_decay_iters=10,
                phase_steps=[4],
                segments=[LRSegment(until=6, lr=1e-4)],
                phase_names=["x"],
            ),
            "schedule",
        )
        for step in range(12):
            lr_at(step, schedule, 1e-3)
            phase_at(step, schedule)
    # the data section's other kinds, read only there: a bin file, and a mixture of prepared
    # sources with a validation source, its tokenizer and document masks
    tokens = tmp_path / "tokens.bin"
    (np.arange(4000) % 300).astype(np.uint16).tofile(tokens)
    bin_data = DataConfig(dataset="bin", path=str(tokens), data_dir=str(tmp_path / "cache"))
    load_corpus(recorder.wrap(bin_data, "data"), vocab_size=320)
    folder = _prepared(tmp_path / "prepared")
    mixture = DataConfig(
        sources=[DataSource(path=folder, weight=2.0)], validation=folder, tokenizer=folder,
        document_mask=True, data_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    data = DataModule(recorder.wrap(mixture, "data"), seed=0, window=9, batch_size=2,
                      grad_accum=1, vocab_size=320)  # fmt: skip
    assert data.eos_id is not None and len(next(data.train_steps(1))[0]) == 2
    # compile_mode is read only when compiling (torch.compile is lazy: nothing compiles here)
    compile_cfg = recorder.wrap(TorchCompilationConfig(compile=True), "system.compile")
    compile_module(torch.nn.Linear(1, 1), compile_cfg)
    # what the trainer reads only under torchrun (test_train runs it for real with 2 processes)
    distributed = cfg.system.distributed
    dist_utils.process_group_backend(distributed, "cpu")
    dist_utils.collective_timeout(distributed)
    ddp_options(distributed)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(dist_utils.SystemConfigError):
        dist_utils.check_launch(distributed)
    # a pipeline stage's process prunes the model to its stages (test_pipeline runs them)
    from runtime.distributed.layout import Layout
    from runtime.models import get_model_spec

    spec = get_model_spec()
    with torch.device("meta"):
        whole = spec.build(cfg.model, None)
    assert spec.keep_stages is not None
    held = spec.keep_stages(whole, distributed, Layout(2, 1, 1, 1, pipeline_parallel=2), 0)
    assert 0 in held

    sections = {p.rsplit(".", 1)[0] for p in list(FIELDS) if "." in p}
    assert NOT_WIRED_YET <= set(spec_paths()), "NOT_WIRED_YET names a path the spec lacks"
    unread = [p for p in spec_paths() if p not in recorder.reads and p not in NOT_WIRED_YET]
    assert not unread, f"spec fields never read by runtime/: {', '.join(unread)}"
    wired = sorted(NOT_WIRED_YET & recorder.reads)
    assert not wired, f"read by runtime/ now: remove {', '.join(wired)} from NOT_WIRED_YET"
    assert sections <= recorder.reads | {""}


def _prepared(folder):
    """A small prepared dataset folder (a BPE of 300 ids with an end-of-sequence token)."""
    texts = [f"text {i} " * (i % 4 + 1) for i in range(60)]
    codec = TextCodec.train_bpe(texts, 300)
    codec.tokenizer.add_special_tokens(["<eos>"])
    codec.eos_id = codec.tokenizer.token_to_id("<eos>")
    os.makedirs(folder / "in")
    with open(folder / "in" / "a.jsonl", "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    out = str(folder / "ds")
    prepare([str(folder / "in")], codec, "test", out, Settings(val_fraction=0.2, workers=1))
    return out


def _section_fields(section):
    """The section's fields, and those of its records (`schedule.segments[].lr`)."""
    return {p for p in spec_paths() if p.startswith(section + ".")}


def test_each_component_reads_its_part_of_the_sections_it_takes(recorder):
    """Per component: the fields it reads are exactly its share of the sections it is given
    (nothing outside them, nothing of them left unread by the components that share a section)."""
    from helpers import debug_model_config
    from runtime.components.balancer import MoEBalancer
    from runtime.components.loss import TrainingLoss
    from runtime.components.lr_schedule import LRSchedule
    from runtime.models.deepseek_v3.model import Transformer
    from runtime.models.deepseek_v3.moe import RoutingKnobs

    def reads_of(fn):
        recorder.reads.clear()
        result = fn()
        return result, set(recorder.reads)

    model_cfg = recorder.wrap(
        debug_model_config(
            q_lora_rank=8, mtp_depth=1, rope_scaling="yarn", original_seq_len=8, rope_factor=4.0
        ),
        "model",
    )
    moe = recorder.wrap(MoETrainingConfig(router_noise_scale=0.1, drop_tokens=True), "moe")
    mtp = recorder.wrap(MTPTrainingConfig(warmup_steps=2, mtp_loss_weight_until=1), "mtp")
    window = torch.randint(0, 64, (2, 10))

    knobs, knob_reads = reads_of(lambda: RoutingKnobs.from_config(moe))
    net, model_reads = reads_of(lambda: Transformer(model_cfg, knobs))
    _, forward_reads = reads_of(lambda: net(window[:, :-1], mtp=True))
    assert model_reads | forward_reads == _section_fields("model")

    out = net(window[:, :-1], mtp=True)  # the model's reads are the model's

    def loss_step():
        loss = TrainingLoss(moe, mtp)
        return [loss.combine(out, window[:, 1:], s).loss for s in (0, 1, 5)]

    _, loss_reads = reads_of(loss_step)
    assert loss_reads - _section_fields("moe") == _section_fields("mtp")

    def balance():
        balancer = MoEBalancer(net, moe)
        for s in (0, 1, 10**6):
            with recorder.pause():
                net(window[:, :-1])
            balancer.update(s)

    _, balancer_reads = reads_of(balance)
    moe_parts = [knob_reads, loss_reads & _section_fields("moe"), balancer_reads]
    assert all(a.isdisjoint(b) for i, a in enumerate(moe_parts) for b in moe_parts[i + 1 :])
    assert set().union(*moe_parts) == _section_fields("moe")  # the moe section, shared out
    assert balancer_reads <= _section_fields("moe") and knob_reads <= _section_fields("moe")

    schedule_reads = set()
    for kind in KINDS:
        schedule = recorder.wrap(
            LRScheduleConfig(
                schedule_type=kind,
                warmup_iters=2,
                lr_decay_iters=10,
                phase_steps=[4],
                segments=[LRSegment(until=6, lr=1e-4)],
            ),
            "schedule",
        )
        component = LRSchedule(schedule, 1e-3)

        def walk(component=component):
            for step in range(12):
                component.lr(step)
                component.phase(step)

        schedule_reads |= reads_of(walk)[1]
    assert schedule_reads == _section_fields("schedule")
