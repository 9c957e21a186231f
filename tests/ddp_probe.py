"""A Lightning callback for the DDP test: each rank writes the training samples it was dealt.

Added to a ``train.py`` run without code, as a user adds any callback:
``+callbacks.probe._target_=ddp_probe.RecordSamples +callbacks.probe.out=<folder>``.
"""

import json
from pathlib import Path

import lightning as L


class RecordSamples(L.Callback):
    """Write ``<out>/rank<r>_epoch<e>.json``: the training samples this rank was dealt.

    ``positions`` are the samples' positions in the epoch's training set, as the rank's batch
    sampler deals them; ``fetched`` the classes of the batches the loop actually received and
    ``dealt`` the classes at those positions, so the test can check one against the other.
    """

    def __init__(self, out: str):
        self.out = Path(out)
        self.fetched = []

    def on_train_epoch_start(self, trainer, module):
        self.fetched = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.fetched.append(batch["target"].tolist())

    def on_train_epoch_end(self, trainer, module):
        batches = list(trainer.train_dataloader.batch_sampler)  # the same epoch deals the same
        data = trainer.datamodule.fit_data
        train_set = data.pooled.subset(data.train)
        record = {
            "rank": trainer.global_rank,
            "world": trainer.world_size,
            "epoch": trainer.current_epoch,
            "n_train": len(data.train),
            "positions": [int(i) for batch in batches for i in batch],
            "dealt": [train_set.__getitems__(batch)["target"].tolist() for batch in batches],
            "fetched": self.fetched,
        }
        self.out.mkdir(parents=True, exist_ok=True)
        name = f"rank{trainer.global_rank}_epoch{trainer.current_epoch}.json"
        (self.out / name).write_text(json.dumps(record))
