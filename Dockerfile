# syntax=docker/dockerfile:1
# The kubetx image: one statically linked binary on a distroless base, running as non-root.
#
#   docker build -t kubetx .
#   docker run --rm -p 36789:36789 kubetx serve      # the DTM API on an embedded SQLite file
#
# The chart runs it as `kubetx operator` (the default command). The build stage runs
# scripts/build-static.sh, the same script `cargo test --test chart -- --ignored` checks.

ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target/static \
    scripts/build-static.sh /out/kubetx \
 && mkdir -p /out/data

# distroless/static: CA certificates, tzdata, /etc/passwd with nonroot (65532); no shell, no libc.
FROM gcr.io/distroless/static-debian12:nonroot AS runtime
COPY --from=build /out/kubetx /usr/local/bin/kubetx
COPY --from=build --chown=65532:65532 /out/data /var/lib/kubetx
WORKDIR /var/lib/kubetx
ENV KUBETX_LISTEN=0.0.0.0:36789 \
    KUBETX_DB=/var/lib/kubetx/kubetx.db
USER 65532:65532
# 36789: the DTM-compatible API; 8080: /healthz, /readyz and /metrics of `kubetx operator`.
EXPOSE 36789 8080
ENTRYPOINT ["/usr/local/bin/kubetx"]
CMD ["operator"]
