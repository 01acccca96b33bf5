"""The queue side: the job store, the in-process worker, job runs, webhooks, supervision."""
