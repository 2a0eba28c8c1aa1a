# xenpv image for docker-compose.yml: every service runs `xenpv ...` as the non-root user xenpv.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY xenpv ./xenpv
COPY backends ./backends
COPY frontends ./frontends
RUN pip install . && rm -rf /src

# The mount points of the compose volumes exist in the image, owned by xenpv, so that fresh
# named volumes are created with that owner (docker copies the ownership of the mount point).
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/xenpv xenpv \
    && mkdir -p /run/xenpv /var/lib/xenpv/keys /var/lib/xenpv/images /var/lib/xenpv/faults \
    && chown -R xenpv:xenpv /run/xenpv /var/lib/xenpv

USER xenpv
WORKDIR /home/xenpv
EXPOSE 7100 8766
CMD ["xenpv", "--help"]
