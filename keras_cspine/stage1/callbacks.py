"""Stage 1 training callbacks (Section 2.5): the atomic best-model checkpoint and the paper's
ReduceLROnPlateau on validation macro F1, with an optional warm-up before it."""

from __future__ import annotations

import os
from pathlib import Path

MONITOR = "val_f1_score"


def _keras():
    import keras

    return keras


class AtomicBestCheckpoint:
    """Save the best model (by ``monitor``, mode max) atomically; a Keras callback.

    ``keras.callbacks.ModelCheckpoint(save_best_only=True)`` writing to a temporary name that is
    renamed over ``path`` only once complete, so a kill never leaves a torn ``.keras``.
    """

    def __new__(cls, path: str | os.PathLike, monitor: str = MONITOR, best: float | None = None):
        keras = _keras()

        class _Checkpoint(keras.callbacks.ModelCheckpoint):
            def __init__(self):
                self.final_path = Path(path)
                self.tmp_path = self.final_path.with_name(f".{self.final_path.stem}.tmp.keras")
                super().__init__(
                    str(self.tmp_path), monitor=monitor, mode="max", save_best_only=True
                )
                if best is not None:
                    self.best = best

            def on_epoch_end(self, epoch, logs=None):
                super().on_epoch_end(epoch, logs)
                if self.tmp_path.exists():
                    os.replace(self.tmp_path, self.final_path)

        return _Checkpoint()


class PlateauAfterWarmup:
    """``keras.callbacks.ReduceLROnPlateau`` on ``val_f1_score`` (mode max, the paper's schedule)
    preceded by an optional linear warm-up; a Keras callback.

    During the first ``warmup_epochs`` epochs the learning rate rises per batch from
    ``base_lr / steps`` to ``base_lr`` and the plateau logic waits: early epochs of a model
    trained from scratch often have a macro F1 of 0 (every sigmoid below 0.5), and cutting the
    rate then only slows the start. Afterwards it is exactly ``ReduceLROnPlateau``.
    """

    def __new__(cls, base_lr: float, warmup_epochs: int = 0, steps_per_epoch: int = 1,
                **plateau_kwargs):  # fmt: skip
        keras = _keras()

        class _Plateau(keras.callbacks.ReduceLROnPlateau):
            def __init__(self):
                super().__init__(**plateau_kwargs)
                self.base_lr = float(base_lr)
                self.warmup_epochs = int(warmup_epochs)
                self.warmup_steps = max(int(warmup_epochs) * int(steps_per_epoch), 1)
                self.epoch = 0

            def on_epoch_begin(self, epoch, logs=None):
                self.epoch = int(epoch)

            def on_train_batch_begin(self, batch, logs=None):
                if self.epoch < self.warmup_epochs:
                    step = self.epoch * (self.warmup_steps // self.warmup_epochs) + int(batch)
                    lr = self.base_lr * min(step + 1, self.warmup_steps) / self.warmup_steps
                    self.model.optimizer.learning_rate = lr

            def on_epoch_end(self, epoch, logs=None):
                if epoch < self.warmup_epochs:
                    if epoch == self.warmup_epochs - 1:
                        self.model.optimizer.learning_rate = self.base_lr
                    if logs is not None:
                        logs["learning_rate"] = float(
                            keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)
                        )
                    return
                super().on_epoch_end(epoch, logs)

        return _Plateau()
