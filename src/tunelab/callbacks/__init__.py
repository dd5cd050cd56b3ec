"""The training loop's callbacks, one file each; `base` holds the interface and the order of the hooks.

| callback | file | option |
|---|---|---|
| `MetricLogger` | metrics.py | always (the logger may be `logger=none`) |
| `Freezing` | freezing.py | always; gradual unfreezing with `freeze.unfreeze_every` |
| `EMA` | ema.py | `trainer.ema_decay` |
| `EarlyStopping` | early_stopping.py | `trainer.early_stopping.patience` |
| `StopSignal` | signals.py | always (Ctrl-C, SIGTERM, SIGUSR2) |
| `Checkpointing` | checkpointing.py | when the run has a folder; `trainer.checkpoint_every_n_steps` |
| `ProgressBar` | progress.py | `trainer.progress` |
| `HeldOutTest` | held_out_test.py | `trainer.test` (when the data has a test split) |

`tunelab.run.callbacks` builds them from the config, in the order they run.
"""
