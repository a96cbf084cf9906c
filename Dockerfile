# The operator image: slim, non-root, no torch. The trainer/server image is trainer_image/Dockerfile.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY operator ./operator
COPY trainer_image/src ./trainer_image/src
RUN pip install --no-cache-dir uv==0.13.8 \
 && uv pip install --system --no-cache -c constraints.txt .

FROM python:3.11-slim
RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin operator
COPY --from=build /usr/local/lib/python3.11/site-packages /usr/local/lib/python3.11/site-packages
COPY --from=build /usr/local/bin/finetune-operator /usr/local/bin/finetune-operator
USER 10001
EXPOSE 8080 9090
ENTRYPOINT ["python", "-m", "finetune_operator"]
CMD ["--all-namespaces", "--health-port", "8080", "--metrics-port", "9090"]
