"""benchmarks/longtail_table.py: its cells, positive-control rule and what runs keep on disk (the table itself runs for 90 min;
`--quick` checks its plumbing)."""
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_table_module():
    path = os.path.join(ROOT, "benchmarks", "longtail_table.py")
    spec = importlib.util.spec_from_file_location("longtail_table", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _touch(run_dir, names):
    os.makedirs(run_dir, exist_ok=True)
    for name in names:
        with open(os.path.join(run_dir, name), "w") as f:
            f.write("x")


def test_drop_checkpoints_keeps_results_and_optionally_the_final_checkpoint(tmp_path):
    table = _load_table_module()
    names = ["model_0000049.pth", "model_final.pth", "metrics.json", "log.txt", "last_checkpoint"]
    pretrain, finetune = str(tmp_path / "pretrain"), str(tmp_path / "finetune")
    _touch(pretrain, names)
    _touch(finetune, names)

    table.drop_checkpoints(pretrain, keep_final=True)   # a later conversion still reads model_final.pth
    table.drop_checkpoints(finetune, keep_final=False)  # results live in metrics.json

    assert sorted(os.listdir(pretrain)) == ["last_checkpoint", "log.txt", "metrics.json", "model_final.pth"]
    assert sorted(os.listdir(finetune)) == ["last_checkpoint", "log.txt", "metrics.json"]


def test_cells_cover_every_start_of_the_issue_with_a_positive_control():
    table = _load_table_module()
    cells = {(start, sampler) for start, sampler, loss in table.CELLS if loss == table.SOFTMAX}
    assert {("scratch", "RFS"), ("scratch", "DRB"), ("supervised", "DRB")} <= cells
    for start in ("MoCo v2", "DetCo", "2DRCL", "2DRCL backbone"):
        assert (start, "DRB") in cells
    assert ("2DRCL", "RFS") in cells
    # Issue 12's loss rows: every loss with both samplers, from scratch.
    losses = {(sampler, loss) for start, sampler, loss in table.LOSS_CELLS if start == "scratch"}
    assert losses == {(s, loss) for s in ("RFS", "DRB") for loss in ("softmax_ce", "federated", "eqlv2", "seesaw", "ecm")}


def _runs(aps):
    return [{"bbox": {"AP": ap}} for ap in aps]


def test_positive_control_verdict_needs_a_margin_of_two_seed_std():
    table = _load_table_module()
    scratch = _runs([5.0, 6.0, 7.0])  # std 1.0
    clear = table.positive_control_verdict({"scratch + DRB": scratch, "supervised + DRB": _runs([9.0, 9.5, 10.0])})
    assert clear["valid"] and clear["threshold"] == 2.0 and abs(clear["margin"] - 3.5) < 1e-9
    close = table.positive_control_verdict({"scratch + DRB": scratch, "supervised + DRB": _runs([7.0, 7.5, 8.0])})
    assert not close["valid"]
    one_seed = table.positive_control_verdict({"scratch + DRB": _runs([1.0]), "supervised + DRB": _runs([9.0])})
    assert not one_seed["valid"]


def test_positive_control_transfers_what_2drcl_transfers(tmp_path):
    import torch

    table = _load_table_module()
    model = {"backbone.fpn_output2.weight": torch.ones(1), "roi_heads.box_head.fc1.weight": torch.ones(1),
             "roi_heads.box_predictor.cls_score.weight": torch.ones(1),
             "roi_heads.mask_head.predictor.weight": torch.ones(1),
             "proposal_generator.rpn_head.conv.weight": torch.ones(1)}
    torch.save({"model": model, "iteration": 9}, tmp_path / "model_final.pth")
    kept = table.strip_for_transfer(str(tmp_path / "model_final.pth"), str(tmp_path / "control.pth"))
    out = torch.load(tmp_path / "control.pth")["model"]
    assert kept == 3 and set(out) == {"backbone.fpn_output2.weight", "roi_heads.box_head.fc1.weight",
                                      "proposal_generator.rpn_head.conv.weight"}
