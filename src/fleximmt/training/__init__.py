"""Learning a motion from reference videos (``train``), resumable checkpoints (``checkpoint``) and
reading reference videos (``data``). Uses the method and the base models' adapters."""
