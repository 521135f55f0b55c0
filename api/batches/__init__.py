"""OpenAI-style batches: JSONL files of requests run as bulk jobs on the shared engines.

How a batch travels (state in SQL at every step, each step idempotent):

1. `POST /v1/files` — the upload is checked as it is read (size, line count, JSONL at all:
   `upload.py`) and streamed from its disk spool to the object store; its row is stored.
2. `POST /v1/batches` — checked against the file (owner, purpose, endpoint), stored as
   `validating` (`service.py`); the creating API process expands it at once.
3. Expansion (`expansion.py`) — each line is checked with the API's own wire types and job
   builders (`lines.py`); valid lines become jobs (lane `bulk`, batch_id + custom_id,
   unique together), invalid ones stored errors with their line numbers; all in one
   transaction with the move to `in_progress` (or `failed` when nothing is valid).
4. Feeding (`feeder.py`) — lines go to the model's bulk queue a window at a time, so bulk
   work never holds every worker thread; interactive jobs run first in the engine too.
   Workers run them as ordinary jobs (claim, lease, retry after a worker dies).
5. Finalisation (`output.py`) — once no line is open, the output and error files are
   assembled from the jobs in SQL and the batch ends `completed`, `cancelled` or `expired`.

`supervisor.py` runs steps 3-5 for batches whose creator died, and expiry, in every API
process (a Redis lock serialises the passes). Expansion and finalisation live in the API,
not in workers: they need the API's validation and image intake, which workers never
import (DESIGN.md put them in worker/; this is why they moved).
"""
