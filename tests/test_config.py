"""The real config composes for every option of every group, and every key is documented."""

import pytest
from omegaconf import OmegaConf

from conftest import CONF, GROUPS, compose_config, options


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes(group, option):
    cfg = compose_config([f"{group}={option}"])
    assert set(GROUPS) <= set(cfg)
    node = cfg[group]
    assert OmegaConf.to_container(node, resolve=True) is not None


def test_every_yaml_key_is_commented():
    """Each key line of every option file is preceded by a comment (or carries one); this covers
    the files of Hydra's own groups too (conf/hydra/launcher/)."""
    for path in sorted(CONF.rglob("*.yaml")):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            stripped = line.strip()
            if not stripped or stripped.startswith(("#", "-")) or ":" not in stripped or stripped.startswith("_"):
                continue
            if stripped.endswith(":") or stripped.startswith("subdir:"):
                continue
            previous = lines[i - 1].strip() if i else ""
            documented = "#" in line or previous.startswith("#")
            assert documented, f"{path.relative_to(CONF)}:{i + 1} has no comment: {line}"


def test_defaults_name_every_group():
    cfg = compose_config([])
    assert cfg.data.dataset._target_ == "tunelab.data.digits"
    assert cfg.model.name == "resnet18"
    assert cfg.optimizer._partial_ and cfg.scheduler._partial_


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_experiments_compose(experiment):
    cfg = compose_config([f"+experiment={experiment}"])
    assert cfg.logger.experiment_name == "transfer"
    assert list(cfg.data.dataset.classes) in ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9])


@pytest.mark.parametrize("order", ["sweeper first", "experiment first"])
def test_each_strategy_of_the_strategies_experiment_is_what_it_says(order):
    """The sweeper puts its params before the command line's +experiment: either way scratch has no
    weights, and the others start from step 1's."""
    expected = {"head": (-1, None, True), "depth2": (2, None, True), "full": (0, None, True), "lp_ft": (-1, 3, True),
                "scratch": (0, None, False)}
    for strategy, (depth, probe, pretrained) in expected.items():
        overrides = [f"strategy={strategy}", "seed=3", "+experiment=strategies"]
        cfg = compose_config(overrides if order == "sweeper first" else overrides[::-1])
        assert (cfg.freeze.depth, cfg.freeze.get("probe_epochs"), cfg.model.weights_path is not None) == (depth, probe, pretrained), strategy
        assert cfg.data.dataset.max_train_samples == 25 and cfg.seed == 3
