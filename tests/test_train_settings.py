"""The training defaults, declared once (novelcrafter.train_settings): the coordinator's filled
config and the trainer's settings cannot drift apart."""

from __future__ import annotations

from dataclasses import fields

from novelcrafter.train_settings import (
    MAX_ATTEMPTS,
    LoraSettings,
    TrainSettings,
    default_text,
    help_of,
    with_defaults,
)
from novelcrafter.v1 import common_pb2


def test_a_filled_empty_config_reads_back_as_the_defaults() -> None:
    full = with_defaults(common_pb2.JobConfig(), base_model="m")
    assert TrainSettings.from_job_config(full) == TrainSettings()
    assert TrainSettings.from_job_config(common_pb2.JobConfig()) == TrainSettings()
    assert full.base_model == "m" and full.max_attempts == MAX_ATTEMPTS
    tr, lora = full.training, full.lora
    assert (tr.epochs, tr.grad_accum, tr.learning_rate, tr.max_length) == (3, 8, 5e-5, 1024)
    assert (lora.r, lora.alpha, tuple(lora.target_modules)) == (8, 32, ("q_proj", "v_proj"))
    assert lora.bias == "none"
    for name in ("memorization_prompts", "memorization_new_tokens", "style_prompts", "style_new_tokens"):
        assert tr.HasField(name)
    assert tr.HasField("replay_fraction") and tr.replay_fraction == 0.0


def test_given_values_survive_and_optional_zero_stays_zero() -> None:
    config = common_pb2.JobConfig(
        training=common_pb2.TrainingConfig(epochs=1, style_prompts=0, max_steps_per_part=5, no_packing=True),
        lora=common_pb2.LoraConfig(r=4, target_modules=["k_proj"]),
    )
    full = with_defaults(config, base_model="m")
    settings = TrainSettings.from_job_config(full)
    assert settings == TrainSettings.from_job_config(config)
    assert settings.epochs == 1 and settings.style_prompts == 0 and settings.max_steps_per_part == 5
    assert settings.packing is False and settings.memorization_prompts == 16
    assert settings.lora == LoraSettings(r=4, target_modules=("k_proj",))


def test_every_setting_has_a_meaning_and_a_shown_default() -> None:
    for cls in (TrainSettings, LoraSettings):
        for f in fields(cls):
            if f.name != "lora":
                assert help_of(cls, f.name)
                assert f.metadata["given"] in ("nonzero", "optional", "as_is")
    assert default_text(5e-5) == "5e-5" and default_text(0.01) == "0.01" and default_text(3) == "3"
