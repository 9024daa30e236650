from .checkpoint import AtomicDetectionCheckpointer, atomic_torch_save
from .hooks import TrainingSamplerHook, find_train_sampler
from .trainer import Trainer, build_evaluator, launch_from_args, setup
