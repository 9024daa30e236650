"""The demo pipeline (make demo) end to end at a tiny size: dataset -> 2DRCL pretraining ->
drcl-convert -> DRB fine-tuning -> LVIS evaluation -> figures and the results table."""
import json
import os
import pickle

from PIL import Image

from drcl_d2.tools import demo


def test_demo_pipeline_at_tiny_size(tiny_dataset, tmp_path):
    out, data = tmp_path / "out", os.path.dirname(tiny_dataset["train_json"])  # the session's tiny set, reused
    small = ["INPUT.MIN_SIZE_TRAIN", "(128,)", "INPUT.MAX_SIZE_TRAIN", "160", "INPUT.MIN_SIZE_TEST", "128",
             "INPUT.MAX_SIZE_TEST", "160", "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0",
             "MODEL.FPN.OUT_CHANNELS", "64", "MODEL.ROI_BOX_HEAD.FC_DIM", "128", "TEST.DETECTIONS_PER_IMAGE", "10"]
    assert demo.main(["--data", str(data), "--preset", "tiny", "--output", str(out),
                      "--pretrain-iters", "2", "--iters", "3"] + small) == 0
    # Every stage left its product.
    assert (out / "pretrain" / "model_final.pth").exists()
    converted = pickle.load(open(out / "drcl_converted.pkl", "rb"))["model"]
    assert "backbone.fpn_output2.weight" in converted and "roi_heads.box_head.fc1.weight" in converted
    assert (out / "finetune" / "model_final.pth").exists()
    results = json.loads((out / "results.json").read_text())
    for task in ("bbox", "segm"):
        assert {"AP", "APr", "APc", "APf"} <= set(results[task])
    for name in ("longtail", "drb_schedule", "ap_groups", "attention", "predictions"):
        png = out / "figures" / f"{name}.png"
        with Image.open(png) as im:  # decodes
            im.load()
            assert im.size[0] > 100 and im.size[1] > 100, name
    assert not [f for f in os.listdir(out / "figures") if f.endswith(".tmp")]
