"""AtomicDetectionCheckpointer on bad files: stale temporaries, file modes, unreadable weights, an
empty last_checkpoint, and a checkpoint that does not fit the model (one summary line, a stop)."""
import logging
import os
import stat

import pytest
import torch
from torch import nn

from drcl_d2.engine.checkpoint import AtomicDetectionCheckpointer, require_backbone_loaded


class _Net(nn.Module):
    """A 'backbone' and a head, as GeneralizedRCNN names them."""

    def __init__(self, width=8):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, width, 3), nn.Conv2d(width, 8, 3))
        self.head = nn.Linear(8, 2)


def test_stale_temporaries_of_interrupted_writes_are_removed(tmp_path):
    stale = [".model_0000002.pth.k2j4h_8q.tmp", ".last_checkpoint.a1b2c3d4.tmp"]
    kept = [".notes.tmp", "model_0000002.pth", ".model_final.pth.tmp", "last_checkpoint"]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"x")
    assert AtomicDetectionCheckpointer(_Net(), save_dir=str(tmp_path)).remove_stale_temporaries() == sorted(stale)
    assert sorted(os.listdir(tmp_path)) == sorted(kept)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_checkpoints_keep_the_users_umask(tmp_path, umask):
    """mkstemp made them 0600; fvcore's open() gives 0666 less the umask."""
    old = os.umask(umask)
    try:
        AtomicDetectionCheckpointer(_Net(), save_dir=str(tmp_path)).save("model_final")
    finally:
        os.umask(old)
    for name in ("model_final.pth", "last_checkpoint"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o666 & ~umask, name


def test_an_empty_or_truncated_checkpoint_is_an_error_naming_the_file(tmp_path):
    AtomicDetectionCheckpointer(_Net(), save_dir=str(tmp_path)).save("model_final")
    data = (tmp_path / "model_final.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.pth").write_bytes(b"")
    for name, size in (("truncated.pth", len(data) // 2), ("empty.pth", 0)):
        with pytest.raises(RuntimeError, match=rf"Cannot read the checkpoint .*{name} \({size} bytes\).*truncated"):
            AtomicDetectionCheckpointer(_Net()).load(str(tmp_path / name))


def test_resume_with_an_empty_last_checkpoint_names_the_file_and_the_checkpoints(tmp_path):
    ckpt = AtomicDetectionCheckpointer(_Net(), save_dir=str(tmp_path))
    ckpt.save("model_0000002")
    (tmp_path / "last_checkpoint").write_text("")
    with pytest.raises(FileNotFoundError, match=r"last_checkpoint names '', which is not a checkpoint file .*"
                                                r"checkpoints there: model_0000002.pth"):
        ckpt.resume_or_load("", resume=True)
    (tmp_path / "last_checkpoint").write_text("model_0000009.pth")  # deleted since
    with pytest.raises(FileNotFoundError, match=r"names 'model_0000009.pth'"):
        ckpt.resume_or_load("", resume=True)


def test_a_checkpoint_that_does_not_fit_says_how_much_it_loaded_and_stops(tmp_path, caplog):
    AtomicDetectionCheckpointer(_Net(width=16), save_dir=str(tmp_path)).save("other")
    model = _Net(width=8)
    ckpt = AtomicDetectionCheckpointer(model)
    with caplog.at_level(logging.INFO, logger="fvcore"):
        ckpt.load(str(tmp_path / "other.pth"))
    s = ckpt.load_summary
    # backbone.0 (weight, bias) and backbone.1.weight have other shapes; backbone.1.bias and the head fit.
    assert (s.loaded, s.total, s.backbone_loaded, s.backbone_total, len(s.incorrect_shapes)) == (3, 6, 1, 4, 3)
    assert f"Loaded 3 of 6 model tensors from {tmp_path / 'other.pth'} (backbone: 1 of 4 tensors, 1% of its " \
           "weights); 3 skipped for mismatching shapes" in caplog.text
    with pytest.raises(RuntimeError, match=r"Less than 50% of the backbone came from the file.*"
                                           r"backbone.0.weight: \(16, 3, 3, 3\) in the file, \(8, 3, 3, 3\) in the "
                                           r"model.*MODEL.ALLOW_PARTIAL_WEIGHTS"):
        require_backbone_loaded(s, allow_partial=False)
    require_backbone_loaded(s, allow_partial=True)
    AtomicDetectionCheckpointer(_Net(), save_dir=str(tmp_path)).save("same")
    ckpt.load(str(tmp_path / "same.pth"))
    assert ckpt.load_summary.loaded == 6 and ckpt.load_summary.backbone_fraction == 1.0
    require_backbone_loaded(ckpt.load_summary, allow_partial=False)
