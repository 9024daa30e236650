"""Run train_net.py or pretrain_net.py on SLURM with submitit, requeued with --resume at a time limit.

    python -m drcl_d2.tools.submit --script pretrain --config-file configs/pretrain/drcl_R_50_FPN_1x_lvis.yaml \\
        --nodes 2 --gpus-per-node 8 --partition P --timeout-min 4320 [KEY VALUE ...]

One submitit task per GPU (tasks_per_node = gpus per node): every task is one detectron2 worker,
joined into torch.distributed with the job's rank, local rank and world size (SLURM_PROCID,
SLURM_LOCALID, SLURM_NTASKS) and a tcp:// URL on its first node. (A task per node calling detectron2's
`launch` would fork workers that SLURM's warning signal reaches but submitit does not handle.)

At a time limit (SLURM sends USR2 --signal-delay-s before it) or a preemption signalled the same way,
the trainer finishes its step and saves a checkpoint (StopOnRequestHook); then submitit calls
`DistributedTrainingJob.checkpoint` on rank 0, which requeues the job with `--resume` (pretraining
continues bit for bit). A job SLURM requeues by itself (SLURM_RESTART_COUNT > 0) resumes too, from the
last periodic checkpoint. submitit's logs and pickles go to OUTPUT_DIR/submitit/<job id>/. `--cluster
local` runs the same job on this machine with submitit's LocalExecutor (one node).
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import signal
import sys
import threading
import traceback

from detectron2.engine import default_argument_parser
from detectron2.engine.launch import _distributed_worker

from ..engine.hooks import TrainingStopped, request_stop, stopped_at_iteration
from ..utils import load_config

__all__ = ["DistributedTrainingJob", "build_executor", "build_parser", "load_script_main", "output_dir_of",
           "parse_args", "submit", "main"]

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = {"train": "train_net.py", "pretrain": "pretrain_net.py"}


def load_script_main(script: str):
    """`main(args)` of train_net.py or pretrain_net.py, from the repository beside the package."""
    path = os.path.join(REPO_ROOT, SCRIPTS[script])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: install drcl_d2 from its repository (pip install -e .)")
    spec = importlib.util.spec_from_file_location(os.path.splitext(SCRIPTS[script])[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines main; the launch under __main__ does not run
    return module.main


def _requeue_from_thread(requeue, usr_sig) -> None:
    """submitit's requeue from a timer thread: its exit must end the process, not only the thread."""
    try:
        requeue(usr_sig, None)
    except SystemExit as e:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(e.code if isinstance(e.code, int) else 1)


class DistributedTrainingJob:
    """One submitit task: one detectron2 worker of `script` (train / pretrain) with `args`."""

    def __init__(self, script: str, args: argparse.Namespace):
        self.script = script
        self.args = args

    def __call__(self):
        import submitit  # present: submitit runs this job
        job_env = submitit.JobEnvironment()
        dist_env = submitit.helpers.TorchDistributedEnvironment()  # ranks, world size, port from the job id
        args = copy.deepcopy(self.args)
        # SLURM's own requeue (e.g. PreemptMode=REQUEUE) reruns the pickle of the first submission.
        args.resume = args.resume or int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0
        args.num_gpus, args.num_machines, args.machine_rank = dist_env.local_world_size, job_env.num_nodes, job_env.node
        # LocalExecutor's node is this machine; its hostname need not resolve.
        master = "127.0.0.1" if job_env.cluster == "local" else dist_env.master_addr
        args.dist_url = f"tcp://{master}:{dist_env.master_port}"
        print(f"drcl_d2 submit: {job_env}, dist_url {args.dist_url}, resume {args.resume}", flush=True)
        main_func = load_script_main(self.script)
        if dist_env.world_size == 1:
            return self._stop_between_steps(job_env, lambda: main_func(args))  # as detectron2's launch does
        # detectron2 numbers ranks node by node (machine_rank * gpus + local_rank), as SLURM does by default.
        expected = job_env.node * dist_env.local_world_size + dist_env.local_rank
        if dist_env.rank != expected:
            raise RuntimeError(f"SLURM global rank {dist_env.rank} is not node {job_env.node} x "
                               f"{dist_env.local_world_size} tasks + local rank {dist_env.local_rank}: "
                               "submit with the default block distribution")
        # The worker body of detectron2's launch: process group, local group, device, then main.
        return self._stop_between_steps(job_env, lambda: _distributed_worker(
            dist_env.local_rank, main_func, dist_env.world_size, dist_env.local_world_size, job_env.node,
            args.dist_url, (args,)))

    def _stop_between_steps(self, job_env, run):
        """Runs `run()`. At USR2 the trainer saves a checkpoint after its current step, then submitit's handler
        (checkpoint() and requeue, on rank 0), which alone would exit mid-step, runs; if no step ends within
        half of --signal-delay-s (a long evaluation), it runs anyway: the job resumes from the last periodic
        checkpoint."""
        usr_sig = job_env._usr_sig()
        requeue = signal.getsignal(usr_sig)  # submitit's, installed before the job function runs
        fallback = threading.Timer(getattr(self.args, "signal_delay_s", 120) / 2, _requeue_from_thread,
                                   args=(requeue, usr_sig))
        fallback.daemon = True

        def on_signal(signum, frame):
            print(f"drcl_d2 submit: {signal.Signals(signum).name}: checkpoint after this step, then requeue", flush=True)
            request_stop()
            if fallback.ident is None:
                fallback.start()

        signal.signal(usr_sig, on_signal)
        result = None
        try:
            result = run()
        except BaseException as e:
            if stopped_at_iteration() is None:
                raise
            if not isinstance(e, TrainingStopped):
                # An after_train hook failed while TrainingStopped unwound; the checkpoint is saved already.
                traceback.print_exc()
        finally:
            fallback.cancel()
        if stopped_at_iteration() is None:
            return result
        print(f"drcl_d2 submit: stopped after iteration {stopped_at_iteration()}, its checkpoint saved", flush=True)
        requeue(usr_sig, None)  # calls checkpoint(), requeues and exits

    def checkpoint(self):
        """Called by submitit on rank 0 at USR2: the same job again, resuming from OUTPUT_DIR."""
        import submitit
        args = copy.deepcopy(self.args)
        args.resume = True
        print("drcl_d2 submit: requeued; the next run resumes from the last checkpoint", flush=True)
        return submitit.helpers.DelayedSubmission(type(self)(self.script, args))


def build_parser() -> argparse.ArgumentParser:
    parser = default_argument_parser(epilog=__doc__)
    # --num-gpus / --num-machines / --machine-rank / --dist-url come from the job: --gpus-per-node, --nodes.
    group = parser.add_argument_group("submitit / SLURM")
    group.add_argument("--script", choices=sorted(SCRIPTS), required=True,
                       help="train: train_net.py (fine-tuning); pretrain: pretrain_net.py")
    group.add_argument("--nodes", type=int, default=1)
    group.add_argument("--gpus-per-node", type=int, default=8, help="also the number of tasks per node")
    group.add_argument("--cpus-per-task", type=int, default=10, help="data-loading workers + 1 or 2")
    group.add_argument("--mem-gb", type=float, default=None, help="memory per node (default: the partition's)")
    group.add_argument("--timeout-min", type=int, default=4320, help="time limit of one job (before a requeue)")
    for name in ("--partition", "--account", "--qos", "--comment"):
        group.add_argument(name)
    group.add_argument("--constraint", help="e.g. volta32gb")
    group.add_argument("--job-name", default=None, help="default: drcl_<script>")
    group.add_argument("--signal-delay-s", type=int, default=120,
                       help="USR2 comes this long before the time limit (requeue time)")
    group.add_argument("--max-requeues", type=int, default=20, help="time limits the job may hit before it stops")
    group.add_argument("--cluster", choices=("slurm", "local"), default=None,
                       help="default: slurm where sbatch exists, else local (this machine, one node)")
    return parser


def output_dir_of(args) -> str:
    """OUTPUT_DIR of the config file and opts, as the job's setup() will read it."""
    return os.path.abspath(load_config(args.config_file, args.opts, device="cpu").OUTPUT_DIR)  # no CUDA check here


def build_executor(args, output_dir: str):
    """submitit's executor for `args`: nodes x one task per GPU, logs in OUTPUT_DIR/submitit/<job id>."""
    try:
        import submitit
    except ImportError as e:
        raise ImportError("drcl_d2.tools.submit needs submitit: pip install -e '.[slurm]'") from e
    executor = submitit.AutoExecutor(folder=os.path.join(output_dir, "submitit", "%j"), cluster=args.cluster,
                                     slurm_max_num_timeout=args.max_requeues,
                                     local_max_num_timeout=args.max_requeues)
    executor.update_parameters(
        name=args.job_name or f"drcl_{args.script}", nodes=args.nodes, tasks_per_node=args.gpus_per_node,
        gpus_per_node=args.gpus_per_node, cpus_per_task=args.cpus_per_task, mem_gb=args.mem_gb,
        timeout_min=args.timeout_min, slurm_partition=args.partition, slurm_account=args.account,
        slurm_qos=args.qos, slurm_constraint=args.constraint, slurm_comment=args.comment,
        slurm_signal_delay_s=args.signal_delay_s)
    return executor


def parse_args(argv=None):
    """The launcher's arguments, checked, with absolute paths and OUTPUT_DIR resolved into opts."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for name, instead in (("num_gpus", "--gpus-per-node"), ("num_machines", "--nodes"), ("machine_rank", None),
                          ("dist_url", None)):
        if getattr(args, name) != parser.get_default(name):
            raise SystemExit(f"--{name.replace('_', '-')} comes from the job here"
                             + (f": use {instead}" if instead else " (SLURM's ranks and first node)"))
    if not args.config_file:
        raise SystemExit("--config-file is required")
    if args.script == "pretrain" and args.eval_only:
        raise SystemExit("pretrain_net.py has no --eval-only (see pretrain_net.py)")
    if args.nodes < 1 or args.gpus_per_node < 1:
        raise SystemExit("--nodes and --gpus-per-node must be at least 1")
    if args.cluster == "local" and args.nodes != 1:
        raise SystemExit("--cluster local runs on this machine: --nodes 1")
    # Absolute paths: the job may start in another working directory.
    args.config_file = os.path.abspath(args.config_file)
    args.opts = list(args.opts) + ["OUTPUT_DIR", output_dir_of(args)]
    return args


def submit(argv=None):
    """Parses `argv` (sys.argv[1:] by default) and submits the job; returns submitit's Job."""
    args = parse_args(argv)
    output_dir = args.opts[-1]
    executor = build_executor(args, output_dir)
    job = executor.submit(DistributedTrainingJob(args.script, args))
    print(f"Submitted job {job.job_id} ({executor.cluster}): {args.nodes} node(s) x {args.gpus_per_node} GPU(s); "
          f"output {output_dir}, submitit logs {os.path.join(output_dir, 'submitit', str(job.job_id))}")
    return job


def main(argv=None) -> int:
    submit(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
