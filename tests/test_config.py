from pathlib import Path

import pytest
import yaml

from modules.config import ALL_PROJECTIONS, RunConfig, dump_config, load_config
from modules.errors import UserError

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


MINIMAL = "model: {name_or_path: some/model}\ndata: {train: rows.jsonl}\n"


def test_defaults_are_the_qlora_recipe(tmp_path):
    config = load_config(write(tmp_path, MINIMAL), [])
    assert config.quant.load_in_4bit and config.quant.quant_type == "nf4" and config.quant.double_quant
    assert config.lora.target_modules == ALL_PROJECTIONS
    assert config.output_dir == "runs/run"  # named after the config file


def test_overrides_are_yaml_typed_and_nested(tmp_path):
    config = load_config(
        write(tmp_path, MINIMAL),
        ["train.max_steps=20", "lora.target_modules=[q_proj,v_proj]", "train.lr=1e-3", "log.wandb.mode=offline"],
    )
    assert config.train.max_steps == 20
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    assert config.train.lr == pytest.approx(1e-3)
    assert config.log.wandb.mode == "offline"


def test_unquoted_no_means_no_mixed_precision(tmp_path):
    config = load_config(write(tmp_path, MINIMAL + "train: {mixed_precision: no}\n"), [])
    assert config.train.mixed_precision == "no"
    assert load_config(write(tmp_path, MINIMAL), ["train.mixed_precision=no"]).train.mixed_precision == "no"


def test_unknown_key_suggests_the_close_one(tmp_path):
    with pytest.raises(UserError, match=r"unknown key 'train.micro_batch_sise'; did you mean 'micro_batch_size'\?"):
        load_config(write(tmp_path, MINIMAL + "train: {micro_batch_sise: 2}\n"), [])
    with pytest.raises(UserError, match=r"unknown key 'train.learning_rate'; did you mean 'lr'\?"):
        load_config(write(tmp_path, MINIMAL), ["train.learning_rate=1e-4"])
    with pytest.raises(UserError, match=r"unknown key 'lora.rank'.*did you mean 'r'\?"):
        load_config(write(tmp_path, MINIMAL), ["lora.rank=8"])
    with pytest.raises(UserError, match=r"unknown key 'trian'.*did you mean 'train'\?"):
        load_config(write(tmp_path, MINIMAL), ["trian.max_steps=3"])


def test_wrong_type_names_key_value_and_what_is_allowed(tmp_path):
    with pytest.raises(UserError, match=r"train.lr = 'fast': must be a valid number"):
        load_config(write(tmp_path, MINIMAL), ["train.lr=fast"])
    with pytest.raises(UserError, match=r"model.attn_implementation = 'flash'.*'auto', 'flash_attention_2'"):
        load_config(write(tmp_path, MINIMAL), ["model.attn_implementation=flash"])
    with pytest.raises(UserError, match=r"lora.r = 0: must be greater than or equal to 1"):
        load_config(write(tmp_path, MINIMAL), ["lora.r=0"])


def test_missing_required_key_is_named(tmp_path):
    with pytest.raises(UserError, match=r"missing required key 'data.train'"):
        load_config(write(tmp_path, "model: {name_or_path: m}\ndata: {}\n"), [])


def test_cross_field_problems_are_reported_together(tmp_path):
    with pytest.raises(UserError, match=r"2 problem\(s\)") as caught:
        load_config(
            write(tmp_path, MINIMAL), ["train.warmup_steps=5", "train.warmup_ratio=0.1", "lora.target_modules=[]"]
        )
    assert "warmup_steps (5) and train.warmup_ratio (0.1)" in str(caught.value)
    assert "lora.target_modules is empty" in str(caught.value)


def test_bad_override_syntax_and_bad_yaml(tmp_path):
    with pytest.raises(UserError, match="not of the form key.path=value"):
        load_config(write(tmp_path, MINIMAL), ["train.max_steps"])
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(write(tmp_path, "model: [unclosed\n"), [])
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.yaml", [])
    with pytest.raises(UserError, match="is a value, not a section"):
        load_config(write(tmp_path, MINIMAL), ["model.name_or_path.x=1"])


def test_dumped_config_loads_back_identically(tmp_path):
    config = load_config(write(tmp_path, MINIMAL), ["train.max_steps=7"])
    dumped = tmp_path / "dumped.yaml"
    dumped.write_text(dump_config(config))
    assert load_config(dumped, []) == config


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    config = load_config(path, [])
    assert isinstance(config, RunConfig)
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("#") and "train.py" in first_line, "configs open with the command that runs them"
    assert yaml.safe_load(path.read_text())  # not empty


def test_readme_config_reference_matches_the_config_tree():
    from modules.config import reference_table

    assert reference_table() in (REPO / "README.md").read_text(), "regenerate the README table from reference_table()"


def test_contradicting_and_ambiguous_flags(capsys):
    import train

    for flags in (["--resume", "--overwrite"], ["--resume", "runs/x/checkpoints/step-000010", "--overwrite"]):
        with pytest.raises(SystemExit) as stopped:
            train.parse_args(flags)
        assert stopped.value.code == 2 and "contradict" in capsys.readouterr().err
    args = train.parse_args(["--resume", "lora.r=8"])  # an override after a bare --resume is not a path
    assert args.resume == "" and args.overrides == ["lora.r=8"]
