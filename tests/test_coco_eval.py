"""The fast COCOeval behind detectron2's COCOEvaluator: same AP as pycocotools, per class too."""

import importlib.util
import math

import pytest
import torch
from detectron2.evaluation import coco_evaluation
from pycocotools.cocoeval import COCOeval

from conftest import ROOT
from helpers import ulps
from peftseg.engine.coco_eval import install_fast_cocoeval


@pytest.fixture(scope="module")
def speed_script():
    spec = importlib.util.spec_from_file_location("peftseg_coco_eval_speed", ROOT / "scripts" / "coco_eval_speed.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


@pytest.mark.parametrize("seed,crowd_every", [(0, 0), (1, 7)])
@pytest.mark.parametrize("task", ["segm", "bbox"])
def test_fast_cocoeval_equals_pycocotools(speed_script, seed, crowd_every, task):
    assert install_fast_cocoeval()
    fast = coco_evaluation.COCOeval_opt
    assert fast is not COCOeval
    gt, dets = speed_script.synthetic_coco(num_images=12, instances=8, detections=30, seed=seed,
                                           crowd_every=crowd_every)
    # one class without any detection: its AP is 0 in both, not skipped
    dets = [d for d in dets if d["category_id"] != 5]
    api = speed_script.coco_api(gt)
    ref, _ = speed_script.evaluate(api, dets, task, COCOeval)
    got, _ = speed_script.evaluate(api, dets, task, fast)
    keys = {"AP", "AP50", "AP75", "APs", "APm", "APl"} | {f"AP-{c}" for c in speed_script.CLASSES}
    assert set(ref) == keys == set(got)
    assert 5 < ref["AP"] < 95 and ref["AP-ring"] == 0.0, ref  # a set where the numbers mean something
    for k in keys:
        assert not math.isnan(ref[k]), k
        # both compute in float64 from the same matches (measured: 0 or 1 ulp apart); AP is a mean over
        # 10 IoU thresholds x 101 recall points, whose summation order may differ: ~1e3 ulps of the 100 % scale
        assert abs(ref[k] - got[k]) <= ulps(100.0, 1024, torch.float64), (k, ref[k], got[k])


def test_coco_evaluator_runs_the_fast_impl(tmp_path):
    import json
    import uuid

    from detectron2.data import DatasetCatalog, MetadataCatalog

    from peftseg.engine.evaluate import build_evaluator

    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}))
    name = f"peftseg_test_fast_cocoeval_{uuid.uuid4().hex}"
    DatasetCatalog.register(name, lambda: [])
    MetadataCatalog.get(name).set(json_file=str(path), evaluator_type="coco")
    evaluator = build_evaluator(name, tmp_path)
    assert evaluator._use_fast_impl  # and COCOeval_opt is the fast class (test above)
