"""dist-sam under Lightning: :class:`SAMMixin`, a LightningModule mixin (``pip install 'dist-sam[lightning]'``).

    class Net(SAMMixin, L.LightningModule): ...   # forward, per_sample_loss, configure_optimizers
    L.Trainer(strategy="ddp" | "deepspeed_stage_2" | ModelParallelStrategy(data_parallel_size=n, tensor_parallel_size=1),
              ...).fit(Net(), loader)

See :mod:`.module` for the mixin and :mod:`.runners` for what runs under each strategy.
"""

from .runners import PRECISIONS, import_lightning

import_lightning()  # a clear ImportError naming the extra when Lightning is missing

from .module import CHECKPOINT_KEY, SAMMixin  # noqa: E402

__all__ = ["SAMMixin", "CHECKPOINT_KEY", "PRECISIONS"]
