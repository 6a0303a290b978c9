"""Data: sources -> captions -> images -> WebDataset shards (``kodalle prepare``), and the
shard reader every later stage uses.

- :mod:`.captions`: Korean captions from K-Fashion labels
- :mod:`.sources`: kfashion / folder / jsonl / csv readers
- :mod:`.images`: the one place images are opened and preprocessed (+ ``to_tensor``)
- :mod:`.shards`: shard writer and ``iter_image_samples`` reader
- :mod:`.prepare`: the ``kodalle prepare`` library function
- :mod:`.synthetic`: seeded synthetic K-Fashion data (demo and tests)
"""
