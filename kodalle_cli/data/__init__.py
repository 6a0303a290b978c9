"""Data: sources -> captions -> images -> WebDataset shards (``kodalle prepare``), and the
shard reader every later stage uses.

- :mod:`.kfashion`: K-Fashion labels: reading them, parts, attributes, values, boxes
- :mod:`.captions`: Korean captions built from K-Fashion labels (and read back)
- :mod:`.sources`: kfashion / folder / jsonl / csv readers
- :mod:`.images`: the one place images are opened and preprocessed (+ ``to_tensor``)
- :mod:`.shards`: shard writer and ``iter_image_samples`` reader
- :mod:`.prepare`: the ``kodalle prepare`` library function
- :mod:`.tokens`: token shards (text ids + VQGAN codes): their one writer and the reader
- :mod:`.synthetic`: seeded synthetic K-Fashion data (demo and tests)
"""
