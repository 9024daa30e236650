"""drcl_d2.tools.submit on submitit's LocalExecutor: a tiny 2DRCL pretraining job, interrupted with the
signal SLURM sends before a time limit, requeues itself with --resume and ends bit-identical to an
uninterrupted run."""
import os
import signal
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_pretrain_net import CONFIG, _args  # noqa: E402

from drcl_d2.engine.pretrain import PretrainTrainer  # noqa: E402
from drcl_d2.engine.trainer import setup  # noqa: E402
from drcl_d2.tools.submit import build_executor, parse_args, submit  # noqa: E402

# 6 iterations, a checkpoint every 2: the signal comes after the first one, with 4 iterations to go.
RUN = {"SOLVER.MAX_ITER": 6, "SOLVER.STEPS": "(4,)", "SOLVER.CHECKPOINT_PERIOD": 2}


def _child_pids(pid: int) -> list[int]:
    """Processes whose parent is `pid` (LocalExecutor's controller starts one per task)."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # field 4: ppid (after "(comm)")
                children.append(int(entry))
    return children


def _wait_for(predicate, timeout_s: float, what: str):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def test_interrupted_job_requeues_resumes_and_ends_bit_identical(tiny_dataset, tmp_path):
    straight_dir, job_dir = tmp_path / "straight", tmp_path / "job"
    trainer = PretrainTrainer(setup(_args(tiny_dataset, straight_dir, **RUN)))
    trainer.resume_or_load(resume=False)
    trainer.train()

    opts = _args(tiny_dataset, job_dir, **RUN).opts
    job = submit(["--script", "pretrain", "--config-file", CONFIG, "--cluster", "local", "--gpus-per-node", "1",
                  "--timeout-min", "10", *opts])
    assert job.paths.folder == job_dir / "submitit" / str(job.job_id)  # submitit's logs inside OUTPUT_DIR
    _wait_for(lambda: (job_dir / "model_0000001.pth").exists() or job.done(), 120, "the first checkpoint")
    assert not job.done(), job.stderr()
    (task,) = _child_pids(job._process.pid)  # the one task (SLURM signals its tasks the same way)
    os.kill(task, signal.SIGUSR2)
    job.result()  # raises if the requeued run failed

    stdout, log = job.stdout(), (job_dir / "log.txt").read_text()
    # The trainer finished its step and saved it; then submitit's handler called checkpoint() and requeued.
    events = ["SIGUSR2: checkpoint after this step, then requeue", "drcl_d2 submit: stopped after iteration",
              "this job is timed-out", "requeued; the next run resumes from the last checkpoint", "Requeued job",
              "resume True", "Job completed successfully"]
    positions = [stdout.find(e) for e in events]
    assert -1 not in positions and positions == sorted(positions), dict(zip(events, positions))
    stopped = int(stdout.split("stopped after iteration ")[1].split(",")[0])
    assert 1 <= stopped < 5 and (job_dir / f"model_{stopped:07d}.pth").exists()
    # detectron2's log.txt (appended by both runs): the second run starts right after the stop, losing no step.
    starts = [int(line.rsplit(" ", 1)[1]) for line in log.splitlines() if "Starting training from iteration" in line]
    assert starts == [0, stopped + 1], starts

    a = torch.load(straight_dir / "model_final.pth", weights_only=False)
    b = torch.load(job_dir / "model_final.pth", weights_only=False)
    assert a["iteration"] == b["iteration"] == 5
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:  # online and target weights, queues and pointers
        assert torch.equal(a["model"][k], b["model"][k]), k
    opt_a, opt_b = (c["trainer"]["_trainer"]["optimizer"]["state"] for c in (a, b))
    assert len(opt_a) == len(opt_b) > 0
    for sa, sb in zip(opt_a.values(), opt_b.values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert a["trainer"]["hooks"] == b["trainer"]["hooks"]  # LR scheduler, sampler position


def test_two_tasks_join_one_process_group_and_train_with_ddp(tiny_dataset, tmp_path):
    """tasks_per_node 2: two detectron2 workers (gloo) joined by the job's ranks and tcp:// URL."""
    opts = _args(tiny_dataset, tmp_path, **{"SOLVER.IMS_PER_BATCH": 4, "SOLVER.MAX_ITER": 2,
                                            "SOLVER.CHECKPOINT_PERIOD": 100,
                                            "MODEL.DRCL.HCL_QUEUE_SIZE": 32}).opts
    job = submit(["--script", "pretrain", "--config-file", CONFIG, "--cluster", "local", "--gpus-per-node", "2",
                  "--timeout-min", "10", *opts])
    job.results()  # both tasks; raises if one failed
    for rank in (0, 1):
        assert f"Rank of current process: {rank}. World size: 2" in (tmp_path / f"log.txt{'.rank1' * rank}").read_text()
    urls = {line.split("dist_url ")[1].split(",")[0] for task in job._sub_jobs for line in task.stdout().splitlines()
            if line.startswith("drcl_d2 submit: JobEnvironment")}
    assert len(urls) == 1 and urls.pop().startswith("tcp://127.0.0.1:")  # one rendezvous for both tasks
    final = torch.load(tmp_path / "model_final.pth", weights_only=False)
    assert final["iteration"] == 1
    # 2 iterations x global batch 4 (2 per rank) x 2 views, gathered from both ranks (one rank's alone: 8).
    assert int(final["model"]["queue_hcl.ptr"]) == 2 * 4 * 2
    assert final["trainer"]["hooks"]["TrainingSamplerHook"]["next_position"] == 8


def test_sbatch_script_asks_for_nodes_times_one_task_per_gpu(tmp_path, monkeypatch):
    """What `--nodes 2 --gpus-per-node 8` puts in the sbatch script (submitit writes it; nothing is submitted)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # never run: submitit only looks for it on PATH
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    args = parse_args(["--script", "train", "--config-file", CONFIG, "--nodes", "2", "--gpus-per-node", "8",
                       "--partition", "learnlab", "--timeout-min", "4320", "--cluster", "slurm",
                       "OUTPUT_DIR", str(tmp_path / "run")])
    assert args.opts[-2:] == ["OUTPUT_DIR", str(tmp_path / "run")] and os.path.isabs(args.config_file)
    sbatch = build_executor(args, args.opts[-1])._executor._make_submission_file_text("python -m x", "UID")
    for line in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=10",
                 "--partition=learnlab", "--time=4320", "--signal=USR2@120", "--job-name=drcl_train",
                 f"--output={tmp_path}/run/submitit/%j/%j_0_log.out"):
        assert f"#SBATCH {line}\n" in sbatch, line
