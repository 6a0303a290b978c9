"""Training: the shared loop (:mod:`.trainer`) with its checkpoints (:mod:`.checkpoint`),
DDP (:mod:`.dist`) and ``metrics.csv`` (:mod:`.metrics`), and the DALLE task (:mod:`.dalle`)."""
