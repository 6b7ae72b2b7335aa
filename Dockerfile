# syntax=docker/dockerfile:1
# One image holds the three services (chat-gateway, chat-router, chat-store); compose picks
# the command. The build is the same `cargo build --release --locked` as scripts/up; the
# registry and target directory are cache mounts, so a code change rebuilds only our crates.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p chat-gateway -p chat-router -p chat-store \
 && mkdir -p /out \
 && cp target/release/chat-gateway target/release/chat-router target/release/chat-store /out/

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home chat
COPY --from=build /out/ /usr/local/bin/
USER chat
EXPOSE 8080 9090
CMD ["chat-gateway"]
