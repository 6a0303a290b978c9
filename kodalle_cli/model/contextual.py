"""The contextual text encoder: a frozen language model whose hidden states are the captions.

:class:`ContextualText` wraps a backbone's whole model (``AutoModel``), in eval mode with no
gradients, and turns caption ids ``[B, T]`` (the tokenizer's own ids, padded with the pad
id) into the hidden states of one layer ``[B, T, hidden]``. The DALLE projects them to its
width (:mod:`kodalle_cli.model.dalle`).

- **A cache keyed by the caption ids.** Label-built captions repeat, so each distinct caption
  runs through the language model once; later batches read its states back.
- **One caption at a time.** A caption missing from the cache runs alone, so its states never
  depend on which other captions shared its batch: a resumed run (empty cache, other
  batches) computes exactly the values the first run did.
- **The null caption** (all padding, for classifier-free guidance) is read as a lone pad
  token: the attention mask always keeps position 0.
- **Device.** It follows the ids: the model moves to the device of the first ids it gets.
- **Not a submodule of the DALLE.** Its weights are never trained, saved in checkpoints,
  wrapped by DDP or sharded by FSDP: each rank holds its own copy (replicated: it has no
  gradients or optimizer state to shard, and sharding would add a gather to every forward).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

DEFAULT_CACHE_CAPTIONS = 4096


class ContextualText:
    def __init__(self, lm, pad_id: int, layer: int = -1,
                 cache_captions: int = DEFAULT_CACHE_CAPTIONS):
        self.lm = lm.eval().requires_grad_(False)
        self.pad_id = int(pad_id)
        self.layer = int(layer)
        self.cache_captions = int(cache_captions)
        self.cache: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.hidden_size = int(lm.config.hidden_size)
        layers = int(lm.config.num_hidden_layers)
        if not -(layers + 1) <= self.layer <= layers:
            from kodalle_cli.errors import ConfigError

            raise ConfigError("text_layer", layer, f"the language model has {layers} layers "
                              f"(0: its embeddings, -1: the last)")
        self.hits = self.misses = 0

    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device

    @torch.no_grad()
    def encode_one(self, ids: torch.Tensor) -> torch.Tensor:
        """[T] ids -> [T, hidden]: the chosen layer's states, padding masked out (position 0
        always kept, so an all-padding caption is a lone pad token)."""
        ids = ids[None]
        mask = ids != self.pad_id
        mask[:, 0] = True
        out = self.lm(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True)
        return out.hidden_states[self.layer][0].float()

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.device != self.device:
            self.lm.to(ids.device)
            self.cache.clear()
        rows = ids.to(torch.long)
        keys = [bytes(memoryview(r.numpy())) for r in rows.cpu()]
        out = []
        for key, row in zip(keys, rows, strict=True):
            states = self.cache.get(key)
            if states is None:
                self.misses += 1
                states = self.encode_one(row)
                self.cache[key] = states
                if len(self.cache) > self.cache_captions:
                    self.cache.popitem(last=False)
            else:
                self.hits += 1
                self.cache.move_to_end(key)
            out.append(states)
        return torch.stack(out)


def load_contextual(directory, pad_id: int, layer: int = -1) -> ContextualText:
    """The language model saved in a run's ``text_encoder/`` (or any transformers directory)."""
    from kodalle_cli.backbone import load_language_model
    from kodalle_cli.progress import quiet_libraries

    quiet_libraries()
    return ContextualText(load_language_model(str(directory)), pad_id, layer)
