"""What the services run on, with no knowledge of curricula: object stores
(local folder, S3), the Redis task bus and job records, the task vocabulary
and executor interface (`tasks`), the worker loop (`worker`), a private
redis-server for the embedded run, service configuration and metrics."""
