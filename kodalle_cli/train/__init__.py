"""Training: the shared loop (:mod:`.trainer`) and the DALLE task (:mod:`.dalle`)."""
