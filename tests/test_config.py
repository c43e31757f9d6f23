"""Config loading: inheritance, overrides, and the error messages users see."""
import os
import textwrap

import pytest
import yaml

from ltrainer.trainer.config import ConfigError, load_config, save_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


@pytest.fixture
def base(tmp_path):
    write(tmp_path, "base.yaml", """
        run: {name: base, seed: 3}
        optim: {lr: 0.1}
        data: {rho: 100}
    """)
    return tmp_path


def test_inheritance_and_overrides(base):
    child = write(base, "child.yaml", """
        _base_: base.yaml
        run: {name: child}
        data: {rho: 50}
    """)
    cfg = load_config(child, ["optim.lr=0.05", "sched.milestones=[10, 20]"])
    assert cfg.run.name == "child" and cfg.run.seed == 3          # child wins, base fills
    assert cfg.data.rho == 50.0 and isinstance(cfg.data.rho, float)
    assert cfg.optim.lr == 0.05 and cfg.sched.milestones == [10, 20]
    assert cfg.optim.momentum == 0.9                              # schema default


def test_unknown_key_names_file_key_and_suggestion(base):
    child = write(base, "typo.yaml", """
        _base_: base.yaml
        optim: {lrr: 0.05}
    """)
    with pytest.raises(ConfigError) as e:
        load_config(child)
    msg = str(e.value)
    assert "typo.yaml" in msg and "optim.lrr" in msg and "did you mean 'optim.lr'" in msg


def test_unknown_key_in_base_names_the_base_file(tmp_path):
    write(tmp_path, "b.yaml", "data: {rhoo: 3}\n")
    child = write(tmp_path, "c.yaml", "_base_: b.yaml\n")
    with pytest.raises(ConfigError, match=r"b\.yaml: unknown key 'data\.rhoo'; did you mean 'data\.rho'"):
        load_config(child)


def test_unknown_section_and_override(base):
    with pytest.raises(ConfigError, match=r"unknown key 'optimizer'; did you mean 'optim'"):
        load_config(write(base, "s.yaml", "optimizer: {lr: 1}\n"))
    with pytest.raises(ConfigError, match=r"command line: unknown key 'data.batch'.*'data.batch_size'"):
        load_config(str(base / "base.yaml"), ["data.batch=4"])


def test_wrong_type_and_choice_name_key_and_allowed(base):
    with pytest.raises(ConfigError, match=r"optim\.lr = 'fast' is not allowed; expected a number"):
        load_config(str(base / "base.yaml"), ["optim.lr=fast"])
    with pytest.raises(ConfigError, match=r"loss\.name = 'hinge'.*one of 'ce', 'focal', 'ldam'"):
        load_config(str(base / "base.yaml"), ["loss.name=hinge"])
    with pytest.raises(ConfigError, match=r"run\.deterministic = 1 .*true or false"):
        load_config(str(base / "base.yaml"), ["run.deterministic=1"])
    with pytest.raises(ConfigError, match=r"sched\.milestones.*a list of ints"):
        load_config(str(base / "base.yaml"), ["sched.milestones=[1, x]"])


def test_consistency_rules(base):
    with pytest.raises(ConfigError, match="needs a cosine classifier; set model.head: cosine"):
        load_config(str(base / "base.yaml"), ["loss.name=ldam"])
    with pytest.raises(ConfigError, match="data.rho = 0.5 must be >= 1"):
        load_config(str(base / "base.yaml"), ["data.rho=0.5"])


def test_required_key(tmp_path):
    path = write(tmp_path, "r.yaml", "data:\n  source: cifar10\n  root: ???\n")
    with pytest.raises(ConfigError, match=r"r\.yaml: data\.root is required"):
        load_config(path)
    assert load_config(path, ["data.root=/x"]).data.root == "/x"


def test_bad_yaml_missing_file_and_base_loop(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "bad.yaml", "run: {name: [\n"))
    write(tmp_path, "a.yaml", "_base_: b.yaml\n")
    write(tmp_path, "b.yaml", "_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(str(tmp_path / "a.yaml"))
    with pytest.raises(ConfigError, match="should look like section.key=value"):
        load_config(None, ["optim.lr"])


def test_saved_config_round_trips(tmp_path, base):
    cfg = load_config(str(base / "base.yaml"), ["optim.lr=0.3"])
    out = str(tmp_path / "resolved.yaml")
    save_config(cfg, out)
    with open(out) as f:
        assert yaml.safe_load(f) == cfg.to_dict()
    assert load_config(out).to_dict() == cfg.to_dict()


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(CONFIGS) if f.endswith(".yaml")))
def test_shipped_configs_validate(name):
    """Every shipped config (plain or multi-stage) loads; the ones for external data say which
    key is missing."""
    from ltrainer.trainer.pipeline import load_plan
    path = os.path.join(CONFIGS, name)
    try:
        plan = load_plan(path)
    except ConfigError as e:
        assert "is required" in str(e) or "LTRAINER_DATA is not set" in str(e)
        plan = load_plan(path, ["data.root=/data", "data.train_list=a", "data.val_list=b",
                                "data.test_list=c", "semi.root=/pool", "semi.list=d"])
    names = [s.cfg.run.name for s in plan]
    assert names == [name[:-5]] or all(n.startswith(name[:-5] + "/") for n in names)
