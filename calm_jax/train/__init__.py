"""The shared trainer, optimizer, checkpoints, metrics and losses."""
from calm_jax.train.checkpoint import CheckpointMismatchError, Checkpointer
from calm_jax.train.losses import lm_batch_loss, lm_loss
from calm_jax.train.metrics import MetricWriter, NonFiniteError, read_metrics
from calm_jax.train.optim import make_optimizer
from calm_jax.train.trainer import (CoverageError, TrainResult, check_coverage, split_trainable, train,
                                    trainable_filter)
