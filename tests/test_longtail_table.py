"""benchmarks/longtail_table.py: what a finished run keeps on disk (the table itself runs for 90 min;
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


def test_cells_cover_every_start_and_sampler_of_the_issue():
    table = _load_table_module()
    cells = set(table.CELLS)
    assert {("none", "uniform"), ("none", "RFS"), ("none", "DRB")} <= cells
    for start in ("MoCo v2", "DetCo", "2DRCL"):
        assert {(start, "RFS"), (start, "DRB")} <= cells
    assert ("2DRCL backbone", "DRB") in cells
