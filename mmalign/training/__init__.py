"""Lightning glue shared by every method: callbacks, checkpointing, loggers, run folders and resume."""
