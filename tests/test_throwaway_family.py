"""A model family is its registration: one registered here, with no yaml under conf/model/,
is listed, `model=<name>` composes and validates with its dataclass's values, and a run of it
trains, evaluates and records, with nothing else edited."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from omegaconf import OmegaConf

from peftseg.errors import UserError
from peftseg.models.vitdet import FAMILY, VitDetConfig, build
from peftseg.registry import FAMILIES, FamilySpec

NAME = "throwaway_vit"


@dataclass
class ThrowawayVitConfig(VitDetConfig):  # the vitdet_tiny sizes, as a family's own defaults
    family: str = NAME
    name: str = NAME
    image_size: int = 128
    embed_dim: int = 96
    depth: int = 4
    num_heads: int = 3
    window_size: int = 4
    window_block_indexes: list = field(default_factory=lambda: [0, 2])
    drop_path_rate: float = 0.0
    pretrain_img_size: int = 128
    out_channels: int = 64
    scale_factors: list = field(default_factory=lambda: [2.0, 1.0, 0.5])
    anchor_sizes: list = field(default_factory=lambda: [16, 32, 64, 128])
    rpn_head_convs: int = 1
    rpn_batch_size_per_image: int = 64
    rpn_pre_nms_topk_train: int = 300
    rpn_pre_nms_topk_test: int = 200
    rpn_post_nms_topk_train: int = 100
    rpn_post_nms_topk_test: int = 50
    roi_batch_size_per_image: int = 64
    box_head_convs: int = 1
    box_head_dim: int = 64
    box_head_fc_dim: int = 256
    mask_head_convs: int = 2
    mask_head_dim: int = 32
    detections_per_image: int = 50


@pytest.fixture()
def registered():
    from helpers import registered_for_test

    spec = FamilySpec(NAME, ThrowawayVitConfig, build, FAMILY, summary="a ViTDet under another name")
    with registered_for_test(FAMILIES, spec, "model"):
        yield spec


def test_it_is_listed_composes_validates_and_trains_without_a_yaml(registered, tmp_path, shapes_cache):
    from helpers import CONF, run_in_process
    from peftseg.cli.list import list_text
    from peftseg.config import check_group_choices, compose_config, validate

    assert not (CONF / "model" / f"{NAME}.yaml").exists()
    assert any(line.split()[:1] == [NAME] and "a ViTDet under another name" in line
               for line in list_text().splitlines())
    check_group_choices([f"model={NAME}"])
    cfg = compose_config([f"model={NAME}", "model.depth=2", "model.window_block_indexes=[0]"])
    validate(cfg)
    assert OmegaConf.get_type(cfg.model) is ThrowawayVitConfig
    assert (cfg.model.name, cfg.model.family, cfg.model.depth, cfg.model.embed_dim) == (NAME, NAME, 2, 96)
    with pytest.raises(UserError, match=r"model\.image_size must be an integer at least 32"):
        validate(compose_config([f"model={NAME}", "model.image_size=0"]))
    record = run_in_process(tmp_path, shapes_cache, f"model={NAME}", "method=lora", "train.max_iter=2",
                            "train.warmup_iters=0", "train.num_workers=0", "model.score_thresh_test=0.0")
    assert record.status == "ok" and record.config["model.name"] == NAME
    assert 0 < record.params["ratio"] < 1 and record.params["by_group"]["peft"]["trainable"] > 0
    assert record.metrics["segm"]["AP"] is not None


def test_an_unregistered_family_name_is_refused_after_the_registration_is_gone():
    from peftseg.config import check_group_choices

    with pytest.raises(UserError, match=f"Unknown model '{NAME}'"):
        check_group_choices([f"model={NAME}"])
