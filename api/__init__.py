"""Ferry's HTTP API: validates a request, stores its job in SQL, queues it, streams its events.

One package per feature, each with its routes, wire types (`schemas.py`) and the logic
the routes call:

- `jobs/`           `/v1/jobs`: submit, poll, cancel (`service.py`); group commit of new
                    rows (`intake.py`); held interactive jobs released fairly across keys
                    (`dispatch.py`); Celery messages (`enqueue.py`) and their re-sending
                    (`reconciler.py`).
- `streaming/`      a job's events to a subscriber: one pub/sub connection per process
                    (`event_hub.py`), backlog then live exactly once (`job_events.py`), the
                    Server-Sent Events writer (`sse.py`).
- `openai/`         `/v1/chat/completions`, `/v1/completions`, their wire types, fields
                    refused by name (`request_fields.py`), function tools (`tools.py`).
- `models/`         `/v1/models` and which model a request goes to (`catalog.py`).
- `eas/`            PAI-EAS: `/infer_forward`, `/get_history`, `/clear_history`, `POST /`
                    and the WebSocket at `/`.
- `conversations/`  `/v1/conversations`, and history in prompts (`history.py`).
- `batches/`        `/v1/files`, `/v1/batches` and the supervisor that runs them.
- `images/`         image intake (fetch behind an SSRF guard, verify, store) and
                    `/v1/images/{sha256}`.
- `ops/`            `/health` (liveness), `/ready` (a worker for each declared model),
                    `/metrics` (job metrics read from Redis, never SQL), the per-process
                    HTTP metrics middleware (`http_metrics.py`), and the retention sweep
                    (`retention.py`).
- `admin/`          `/v1/admin/keys` (the admin key only; 404 to any other) and
                    `/v1/webhooks/secret`.
- `webhooks/`       signed webhooks: URL checks (`urls.py`) and the deliverer that sends
                    and retries the messages SQL holds (`deliverer.py`).
- `ui/`             the web page (`/ui/`, static files that call the routes above) and the
                    `/docs`, `/redoc` pages, from the package's own files, under a strict
                    Content-Security-Policy (`security.py`).
- `core/`           what every feature shares: settings, API keys (`auth.py`) and their
                    limits (`limits.py`, enforced by `ratelimit.py`), `Idempotency-Key`
                    (`idempotency.py`), errors, request dependencies, the process's
                    clients (`state.py`), pagination.

`app.py` builds the application and owns the clients' lifetimes (its lifespan).

Transactions: SQL is reached in one of three ways, each for its own reason.

- A route's reads and writes use the request's session (`core.deps.SessionDep`): one
  transaction, committed when the route returns, before the response is sent (rolled
  back if it raises). The route commits early only where something outside SQL must
  follow the commit (a cancel's publish, an object-store delete, starting an expansion).
- New jobs go through the group commit (`state.intake`, `jobs/intake.py`): concurrent
  submits share one commit, which is what keeps a 202 cheap.
- Everything else opens short units through `state.db` (`core/db.py`): `db.read()`
  (nothing committed) or `db.transaction()` (committed when the block ends). That is
  background work (the reconciler, the batch supervisor, feeder, expansion,
  finalisation, the retention sweep, `/metrics`), and routes that stream or wait for a
  job, which must not hold a pooled connection meanwhile. Nothing opens a session from
  the factory itself.
"""
