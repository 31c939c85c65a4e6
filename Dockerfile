FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY pyproject.toml README.md ./
RUN pip install --no-cache-dir -e .
COPY . .
EXPOSE 8000
CMD ["python", "manage.py", "serve", "--host", "0.0.0.0", "--no-worker"]
