from pathlib import Path

import pytest

from pez_cli.config import Settings, preset_names, preset_path, read_toml, resolve
from pez_cli.errors import ConfigError

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_every_shipped_config_parses_and_validates():
    shipped = sorted(p.stem for p in REPO_CONFIGS.glob("*.toml"))
    assert {"paper", "sd15", "sd2", "sdxl", "fast"} <= set(shipped)
    assert preset_names() == shipped
    for name in shipped:
        settings = resolve(preset=name).settings
        assert all(model.count("/") == 1 for model, _ in settings.models()), name


def test_paper_preset_is_the_papers_hyperparameters():
    s = resolve(preset="paper").settings.for_target("image")
    assert (s.prompt_len, s.steps, s.lr, s.weight_decay, s.restarts, s.batch_size) == (16, 3000, 0.1, 0.1, 1, 1)
    assert s.model == "ViT-H-14/laion2b_s32b_b79k"


def test_preset_models():
    assert resolve(preset="sd15").settings.model == "ViT-L-14/openai"
    assert resolve(preset="sd2").settings.model == "ViT-H-14/laion2b_s32b_b79k"
    assert resolve(preset="sdxl").settings.models() == [("ViT-L-14/openai", 0.375), ("ViT-bigG-14/laion2b_s39b_b160k", 0.625)]


def test_defaults_are_paper_except_steps():
    s = Settings().for_target("image")
    assert Settings().for_target("text").prompt_len == 8  # distill's own default
    assert s.model == "ViT-H-14/laion2b_s32b_b79k"
    assert (s.prompt_len, s.lr, s.weight_decay, s.restarts, s.batch_size) == (16, 0.1, 0.1, 1, 1)
    assert Settings(lm="none").loop_steps == 1000 and s.device == "auto"


def test_the_loop_runs_fewer_steps_by_default_with_the_language_prior():
    assert Settings(lm="none").loop_steps == 1000 and Settings(lm_weight=0).loop_steps == 1000  # plain PEZ
    assert Settings().loop_steps == Settings(lm="gpt2").loop_steps == 100  # the beam writes the prompt
    assert Settings(steps=7).loop_steps == Settings(lm="none", steps=7).loop_steps == 7  # given: kept
    assert resolve(preset="fast").settings.loop_steps == 300 and resolve(preset="paper").settings.loop_steps == 3000
    # The steps run are stored, so plain PEZ's settings id is what it was when 1000 was the default.
    assert Settings(lm="none").identity() == Settings(lm="none", steps=1000).identity()
    assert Settings(lm="none").identity()["steps"] == 1000 and Settings().identity()["steps"] == 100


def test_precedence_flag_over_config_over_preset_over_default(tmp_path):
    cfg = tmp_path / "my.toml"
    cfg.write_text('steps = 77\nlr = 0.5\nblock = ["nsfw"]\n')
    r = resolve(preset="fast", config=cfg, flags={"lr": 0.25, "seed": None, "block": []})
    s = r.settings
    assert s.lr == 0.25 and r.sources["lr"] == "flag"
    assert s.steps == 77 and r.sources["steps"] == "config"
    assert s.prompt_len == 8 and r.sources["prompt_len"] == "preset"
    assert s.weight_decay == 0.1 and r.sources["weight_decay"] == "default"
    assert s.seed == 0 and r.sources["seed"] == "default"
    assert s.block == ["nsfw"] and r.sources["block"] == "config"


def test_unknown_preset_lists_choices():
    with pytest.raises(ConfigError, match=r"unknown preset 'sd4'.*available: fast, flux, paper, sd15, sd2, sd3, sdxl"):
        preset_path("sd4")


def test_unknown_key_and_wrong_type_name_the_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("stesp = 5\n")
    with pytest.raises(ConfigError, match=r"unknown setting 'stesp'.*did you mean 'steps'"):
        read_toml(bad)
    bad.write_text('steps = "many"\n')
    with pytest.raises(ConfigError, match=r"'steps'.*wrong type"):
        read_toml(bad)
    bad.write_text("steps = [\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        read_toml(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        read_toml(tmp_path / "missing.toml")


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("prompt_len", 0, "prompt_len must be at least 1"),
        ("steps", 0, "steps must be at least 1"),
        ("lr", 0.0, "lr must be greater than 0"),
        ("lr", -1.0, "lr must be greater than 0"),
        ("weight_decay", -0.1, "weight_decay must be 0 or more"),
        ("restarts", 0, "restarts must be at least 1"),
        ("batch_size", 0, "batch_size must be at least 1"),
        ("device", "tpu", "device must be one of"),
        ("precision", "fp8", "precision must be one of"),
    ],
)
def test_invalid_numbers(field, value, message):
    with pytest.raises(ConfigError, match=message):
        resolve(flags={field: value})


def test_a_whole_number_given_for_a_float_setting_has_the_same_settings_id():
    from pez_cli.config import settings_id

    given = Settings(prior=0, lr=1, lm_weight=2).validate()  # a web form's number, or the Python API
    assert (given.prior, given.lr, given.lm_weight) == (0.0, 1.0, 2.0)
    assert all(type(v) is float for v in (given.prior, given.lr, given.lm_weight))
    assert settings_id(given.identity()) == settings_id(Settings(prior=0.0, lr=1.0, lm_weight=2.0).validate().identity())
