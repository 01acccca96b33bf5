"""The queue side: job functions, the in-process RQ worker, job storage conventions."""
