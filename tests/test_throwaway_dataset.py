"""A dataset is its registration: one registered here, with no yaml under conf/dataset/, is
listed, described, and `dataset=<name>` composes and validates with its dataclass's values."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from omegaconf import OmegaConf

from peftseg.data.shapes import ShapesDatasetConfig, register_shapes
from peftseg.errors import UserError
from peftseg.registry import DATASETS, DatasetSpec

NAME = "throwaway_shapes"


@dataclass
class ThrowawayDatasetConfig(ShapesDatasetConfig):
    name: str = NAME
    num_val: int = 7  # fewer validation images than the shapes default


@pytest.fixture()
def registered():
    from helpers import registered_for_test

    spec = DatasetSpec(NAME, ThrowawayDatasetConfig, register_shapes, summary="shapes under another name")
    with registered_for_test(DATASETS, spec, "dataset"):
        yield spec


def test_it_is_listed_composes_and_validates_without_a_yaml(registered):
    from helpers import CONF
    from peftseg.cli.list import list_text, train_help
    from peftseg.config import check_group_choices, compose_config, validate

    assert not (CONF / "dataset" / f"{NAME}.yaml").exists()
    assert any(line.split()[:1] == [NAME] and line.endswith("shapes under another name")
               for line in list_text().splitlines())
    assert "dataset.num_val=7  # fewer validation images than the shapes default" in train_help([f"dataset={NAME}"])
    check_group_choices([f"dataset={NAME}"])
    cfg = compose_config([f"dataset={NAME}", "dataset.num_train=5"])
    validate(cfg)
    assert OmegaConf.get_type(cfg.dataset) is ThrowawayDatasetConfig
    assert (cfg.dataset.name, cfg.dataset.num_train, cfg.dataset.num_val) == (NAME, 5, 7)
    with pytest.raises(UserError, match=r"dataset\.num_val must be an integer at least 1"):
        validate(compose_config([f"dataset={NAME}", "dataset.num_val=0"]))


def test_an_unregistered_name_is_refused_after_the_registration_is_gone():
    from peftseg.config import check_group_choices

    with pytest.raises(UserError, match=f"Unknown dataset '{NAME}'"):
        check_group_choices([f"dataset={NAME}"])
