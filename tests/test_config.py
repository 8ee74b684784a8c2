import json

import pytest

from lmjax import config as config_lib
from lmjax.errors import UserError


def test_default_experiment_loads_and_validates():
    cfg = config_lib.load("experiments/default.py")
    assert cfg.data.source == "stdlib" and cfg.tokenizer.kind == "byte"


def test_typo_in_file_names_nearest_key(tmp_path):
    f = tmp_path / "exp.py"
    f.write_text(
        "from lmjax.config import base_config\n"
        "def get_config():\n    c = base_config()\n    c.model.n_layer = 3\n    return c\n"
    )
    with pytest.raises(UserError, match=r"unknown config key 'n_layer'.*did you mean 'model.n_layers'"):
        config_lib.load(f)


def test_typo_on_command_line_names_nearest_key():
    with pytest.raises(UserError, match=r"'train.step'.*did you mean 'train.steps'"):
        config_lib.load("experiments/default.py", ["--config.train.step=5"])


def test_overrides_are_typed_by_default():
    cfg = config_lib.load(
        "experiments/default.py",
        [
            "--config.train.steps=7",
            "--config.optim.lr=0.5",
            "--config.model.tie_embeddings=false",
            "--config.data.paths=a,b",
        ],
    )
    assert cfg.train.steps == 7 and isinstance(cfg.train.steps, int)
    assert cfg.optim.lr == 0.5 and cfg.model.tie_embeddings is False and cfg.data.paths == "a,b"


def test_wrong_type_is_refused():
    with pytest.raises(UserError, match=r"'train.steps' expects an int.*got 'many'"):
        config_lib.load("experiments/default.py", ["--config.train.steps=many"])


def test_file_without_get_config(tmp_path):
    f = tmp_path / "exp.py"
    f.write_text("x = 1\n")
    with pytest.raises(UserError, match="defines no get_config"):
        config_lib.load(f)


def test_bad_choice_is_refused():
    with pytest.raises(UserError, match="model.norm.*layernorm, rmsnorm"):
        config_lib.load("experiments/default.py", ["--config.model.norm=batchnorm"])


def test_json_round_trip_and_resume_differences():
    cfg = config_lib.load("experiments/default.py")
    back = config_lib.from_json(config_lib.to_json(cfg))
    assert back.to_dict() == cfg.to_dict()
    changed = config_lib.from_json(config_lib.to_json(cfg))
    changed.train.steps = 99
    changed.model.d_model = 96
    refused, allowed = config_lib.resume_differences(cfg, changed)
    assert [r.split(":")[0] for r in refused] == ["model.d_model"]
    assert [a.split(":")[0] for a in allowed] == ["train.steps"]
    json.loads(config_lib.to_json(cfg))
