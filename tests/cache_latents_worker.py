"""torchrun worker for test_train_cache: every rank caches its chunks of the test's synthetic clips
(gloo), rank 0 writes the manifest. argv: PIPELINE OUT."""
import sys

import torch.distributed as dist

from cogvx.train.cache import cache_latents
from test_train_cache import dataset

dist.init_process_group("gloo")
cache_latents(dataset(3), sys.argv[1], sys.argv[2], shard_size=2)
dist.destroy_process_group()
