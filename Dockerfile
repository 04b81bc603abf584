# One image for the sweep workers and the MLflow tracking server (it has mlflow and the
# PostgreSQL driver). CPU-only workers can take the much smaller CPU wheels of PyTorch:
#   docker compose build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu
FROM python:3.11-slim
ARG TORCH_INDEX=""
WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
COPY sweeps ./sweeps
RUN if [ -n "$TORCH_INDEX" ]; then pip install --no-cache-dir torch torchvision --index-url "$TORCH_INDEX"; fi \
 && pip install --no-cache-dir -e '.[scale]'
ENTRYPOINT ["python", "-m", "src.sweep"]
