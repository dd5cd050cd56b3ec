"""The values of config keys that `checks` and the modules using them both read, kept free of torch:
train.py checks a config with them before it imports torch, so bad input ends in about a second."""

from __future__ import annotations

#: Metrics `monitor` may name (logged once per epoch).
EPOCH_METRICS = ("val/loss", "val/acc", "val/balanced_acc", "val/macro_f1", "train/loss", "train/acc",
                 "val/loss_ema", "val/acc_ema", "val/balanced_acc_ema", "val/macro_f1_ema",
                 "val/loss_swa", "val/acc_swa", "val/balanced_acc_swa", "val/macro_f1_swa")
#: `data.augment` values: the random crop and flip alone (true), plus one of torchvision's automatic policies.
AUGMENT = (True, False, "randaugment", "trivialaugment")
#: `trainer.keep_checkpoints`: what a finished run keeps (`checkpoints.KEEP` names the files each removes).
KEEP_CHECKPOINTS = ("all", "best", "none")
