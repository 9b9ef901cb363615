"""One test per discrepancy (§1-§9) of the user's analysis of the old trainer's config
discrepancies (shared/seed/config-discrepancies.md).

Each test loads YAML written the way the old trainer's files were and checks the reconciled
behaviour: the missing fields exist with defaults, the old names load into the canonical fields
with a warning naming the canonical key, and the moved keys land in their new section.
"""

import textwrap
import warnings

import pytest

from generated import (
    CheckpointerConfig,
    Config,
    ConfigAliasWarning,
    ConfigError,
    DataConfig,
    DistributedConfig,
    EvaluatorConfig,
    LRScheduleConfig,
    MoETrainingConfig,
    MTPTrainingConfig,
    TorchCompilationConfig,
    WandbConfig,
    load_config,
)
from helpers import REPO


def load_with_warnings(text, **kwargs):
    """Load YAML text; return the config and the alias warning messages it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = load_config(text=textwrap.dedent(text), filename="old.yaml", **kwargs)
    messages = [str(w.message) for w in caught if issubclass(w.category, ConfigAliasWarning)]
    return config, messages


def assert_warned(messages, old, canonical):
    hits = [m for m in messages if repr(old) in m and repr(canonical) in m]
    assert hits, f"no warning naming {old!r} -> {canonical!r} in {messages}"


# §1 Data: dataset_name -> dataset; num_workers, pin_memory, train_split, val_split exist.
def test_s1_data_fields_and_dataset_name():
    assert (DataConfig().num_workers, DataConfig().pin_memory) == (0, False)
    assert (DataConfig().train_split, DataConfig().val_split) == (0.9, 0.1)
    assert DataConfig().dataset == "stdlib" and DataConfig().data_dir == "data"
    config, messages = load_with_warnings("""
        data:
          dataset_name: stdlib
          data_dir: cache
          train_split: 0.8
          val_split: 0.2
          num_workers: 2
          pin_memory: true
        """)
    assert config.data == DataConfig(
        dataset="stdlib",
        data_dir="cache",
        train_split=0.8,
        val_split=0.2,
        num_workers=2,
        pin_memory=True,
    )
    assert_warned(messages, "data.dataset_name", "data.dataset")
    assert len(messages) == 1


# §2 System: compile_mode, ddp_bucket_cap_mb, find_unused_parameters; `distributed: true`;
# torch_dtype -> dtype.
def test_s2_system_missing_fields_exist():
    assert TorchCompilationConfig().compile_mode == "default"
    assert DistributedConfig().ddp_bucket_cap_mb == 25
    assert DistributedConfig().find_unused_parameters is False


def test_s2_distributed_boolean_becomes_full_section():
    config, messages = load_with_warnings("system:\n  distributed: true\n")
    assert config.system.distributed == DistributedConfig(
        enabled=True, backend="auto", ddp_bucket_cap_mb=25, find_unused_parameters=False,
        pipeline_stages_per_rank=1,  # a derived default: 1 for the default schedule, 1f1b
    )  # fmt: skip
    assert messages == []
    config, _ = load_with_warnings("system:\n  distributed: false\n  compile: true\n")
    assert config.system.distributed.enabled is False
    assert config.system.compile == TorchCompilationConfig(compile=True, compile_mode="default")


def test_s2_torch_dtype_is_dtype():
    config, messages = load_with_warnings("system:\n  device: cuda\n  torch_dtype: bfloat16\n")
    assert (config.system.device.device, config.system.device.dtype) == ("cuda", "bfloat16")
    assert_warned(messages, "system.torch_dtype", "system.device.dtype")
    config, messages = load_with_warnings("system:\n  device:\n    torch_dtype: float16\n")
    assert config.system.device.dtype == "float16"
    assert_warned(messages, "system.device.torch_dtype", "system.device.dtype")


# §3 Checkpointer: every field the old parser expected exists, with defaults.
def test_s3_checkpointer_fields_with_defaults():
    assert CheckpointerConfig() == CheckpointerConfig(
        save_dir=None,
        save_interval=100,
        always_save_checkpoint=True,
        save_best=True,
        keep_last_n=3,
        resume_from=None,
        init_from="scratch",
    )
    config, messages = load_with_warnings("""
        checkpointer:
          save_dir: out/ckpt
          save_interval: 500
          keep_last_n: 2
        """)
    assert (config.checkpointer.save_dir, config.checkpointer.save_interval) == ("out/ckpt", 500)
    assert config.checkpointer.keep_last_n == 2
    assert (config.checkpointer.save_best, config.checkpointer.resume_from) == (True, None)
    assert messages == []


# §4 Evaluator: eval_only defaults to False; every field has a default.
def test_s4_eval_only_defaults_false():
    assert EvaluatorConfig() == EvaluatorConfig(eval_interval=100, eval_iters=20, eval_only=False)
    config, _ = load_with_warnings("evaluator:\n  eval_interval: 50\n  eval_iters: 5\n")
    assert config.evaluator == EvaluatorConfig(eval_interval=50, eval_iters=5, eval_only=False)


# §5 Wandb: use_wandb / wandb_log -> enabled, wandb_project -> project, wandb_run_name -> run_name,
# tags and log_model exist, wandb.out_dir -> the root out_dir.
@pytest.mark.parametrize("old", ["use_wandb", "wandb_log"])
def test_s5_wandb_names(old):
    config, messages = load_with_warnings(f"""
        wandb:
          {old}: true
          wandb_project: deepseek3
          wandb_run_name: legacy
          out_dir: out/legacy
        """)
    assert config.wandb == WandbConfig(
        enabled=True, project="deepseek3", run_name="legacy", tags=[], log_model=False
    )
    assert config.out_dir == "out/legacy"
    assert_warned(messages, f"wandb.{old}", "wandb.enabled")
    assert_warned(messages, "wandb.wandb_project", "wandb.project")
    assert_warned(messages, "wandb.wandb_run_name", "wandb.run_name")
    assert_warned(messages, "wandb.out_dir", "out_dir")
    assert not hasattr(config.wandb, "out_dir")


def test_s5_wandb_tags_and_log_model():
    config, _ = load_with_warnings("wandb:\n  tags: [a, b]\n  log_model: true\n")
    assert (config.wandb.tags, config.wandb.log_model) == (["a", "b"], True)


# §6 MoE: load_balancing_loss_weight -> aux_loss_weight; router_temperature/noise exist.
def test_s6_moe_names_and_router_fields():
    defaults = MoETrainingConfig()
    assert (defaults.router_temperature, defaults.router_noise_scale) == (1.0, 0.0)
    assert (defaults.capacity_factor, defaults.drop_tokens, defaults.z_loss_weight) == (
        1.25,
        False,
        0.0,
    )
    config, messages = load_with_warnings("""
        moe_training:
          load_balancing_loss_weight: 0.01
          router_temperature: 2.0
          router_noise_scale: 0.05
        """)
    assert config.moe.aux_loss_weight == 0.01
    assert (config.moe.router_temperature, config.moe.router_noise_scale) == (2.0, 0.05)
    assert_warned(messages, "moe.load_balancing_loss_weight", "moe.aux_loss_weight")
    assert_warned(messages, "moe_training", "moe")


# §7 MTP: loss_weight -> mtp_loss_weight; warmup_steps exists.
def test_s7_mtp_names_and_warmup():
    assert MTPTrainingConfig() == MTPTrainingConfig(mtp_loss_weight=0.3, warmup_steps=0)
    config, messages = load_with_warnings(
        "mtp_training:\n  loss_weight: 0.5\n  warmup_steps: 100\n"
    )
    assert config.mtp == MTPTrainingConfig(mtp_loss_weight=0.5, warmup_steps=100)
    assert_warned(messages, "mtp.loss_weight", "mtp.mtp_loss_weight")


# §8 Schedule: the optional fields have defaults; phase names and steps must pair up.
def test_s8_schedule_optional_defaults():
    schedule = LRScheduleConfig()
    assert (schedule.num_cycles, schedule.phase_steps, schedule.phase_names) == (1, [], [])
    assert schedule.decay_lr is True
    config, _ = load_with_warnings("""
        schedule:
          schedule_type: cosine
          warmup_iters: 10
          lr_decay_iters: 100
          min_lr: 1.0e-5
        """)
    assert config.schedule.phase_steps == [] and config.schedule.decay_lr is True


def test_s8_phase_names_match_phase_steps():
    ok, _ = load_with_warnings("schedule:\n  phase_steps: [10, 20]\n  phase_names: [a, b]\n")
    assert ok.schedule.phase_names == ["a", "b"]
    with pytest.raises(ConfigError) as raised:
        load_with_warnings("schedule:\n  phase_steps: [10, 20]\n  phase_names: [a]\n")
    (problem,) = raised.value.problems
    assert "len(schedule.phase_names) == len(schedule.phase_steps)" in problem.message
    line = {"schedule.phase_steps": 2, "schedule.phase_names": 3}[problem.path]
    assert str(problem.source) == f"old.yaml:{line}"


# §9 Training: seed lives at the root (training.seed is a moved key); the training-level eval keys
# go to the evaluator.
def test_s9_seed_at_root_and_moved_keys():
    assert Config().seed == 1337
    config, messages = load_with_warnings("seed: 7\n")
    assert config.seed == 7 and messages == []
    config, messages = load_with_warnings("""
        training:
          seed: 42
          batch_size: 4
          eval_interval: 200
          eval_iters: 20
        """)
    assert config.seed == 42
    assert not hasattr(config.training, "seed")
    assert (config.evaluator.eval_interval, config.evaluator.eval_iters) == (200, 20)
    assert_warned(messages, "training.seed", "seed")
    assert_warned(messages, "training.eval_interval", "evaluator.eval_interval")
    assert_warned(messages, "training.eval_iters", "evaluator.eval_iters")


def test_legacy_file_loads_with_alias_warnings_and_no_errors():
    path = REPO / "configs" / "legacy_deepseek3.yaml"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = load_config(path)
    messages = [str(w.message) for w in caught if issubclass(w.category, ConfigAliasWarning)]
    assert len(messages) >= 20
    assert all(str(path) in m for m in messages)
    assert_warned(messages, "data.dataset_name", "data.dataset")
    assert_warned(messages, "system.torch_dtype", "system.device.dtype")
    assert_warned(messages, "training.eval_interval", "evaluator.eval_interval")
    assert config.system.distributed.enabled is True
    assert config.system.compile.compile is False
    assert config.optimizer.lr == pytest.approx(6e-4)
    assert config.schedule.min_lr == pytest.approx(6e-5)
    assert config.model.dim == 64 and config.model.top_k == 2
    assert config.moe.aux_loss_weight == 0.01
    assert config.mtp.mtp_loss_weight == 0.3 and config.mtp.warmup_steps == 100
    assert config.training.seq_len == 64
    assert config.evaluator.eval_interval == 200
    assert config.out_dir == "out/legacy"
    assert config.wandb.project == "deepseek3" and config.wandb.run_name == "legacy-deepseek3"
    assert config.checkpointer.save_dir == "out/legacy/checkpoints"
