"""Cross-references in compose.yaml that the Compose schema does not check.

- the services the documentation names exist, and every depends_on target exists;
- every named volume a service mounts is declared, and every file it mounts exists;
- each chat service runs its own binary and sets every variable that binary reads (parsed
  from the clap `env = "..."` attributes of its config and of the shared CommonConfig), so a
  new setting cannot be forgotten here;
- the Dockerfile builds with the same `cargo build --release --locked` as scripts/up, and
  scripts/test runs that build.
"""

import pathlib
import re
import sys

from ruamel.yaml import YAML

ROOT = pathlib.Path(__file__).resolve().parent.parent
REQUIRED = ["nats", "redis", "mysql", "gateway", "router", "store", "jaeger", "prometheus", "grafana", "proxy"]
BUILD = "cargo build --release --locked -p chat-gateway -p chat-router -p chat-store"

problems = []
compose = YAML(typ="safe").load((ROOT / "compose.yaml").read_text())
services = compose.get("services", {})
volumes = set((compose.get("volumes") or {}).keys())

for name in REQUIRED:
    if name not in services:
        problems.append(f"service {name!r} is missing")

for name, svc in services.items():
    deps = svc.get("depends_on") or []
    for dep in deps if isinstance(deps, list) else deps.keys():
        if dep not in services:
            problems.append(f"{name}: depends_on {dep!r}, which is not a service")
    for mount in svc.get("volumes") or []:
        source = mount.split(":")[0] if isinstance(mount, str) else mount.get("source", "")
        if source.startswith((".", "/")):
            if not (ROOT / source).exists():
                problems.append(f"{name}: mounts {source}, which does not exist")
        elif source and source not in volumes:
            problems.append(f"{name}: mounts volume {source!r}, which is not declared")


def env_vars(path):
    return set(re.findall(r'env\s*=\s*"([A-Z0-9_]+)"', (ROOT / path).read_text()))


# RUST_LOG and the OpenTelemetry SDK's own variables are read outside clap.
common = env_vars("runtime/src/lib.rs") | {"RUST_LOG", "OTEL_EXPORTER_OTLP_ENDPOINT"}
for name in ["gateway", "router", "store"]:
    svc = services.get(name, {})
    command = svc.get("command") or []
    if command[:1] != [f"chat-{name}"]:
        problems.append(f"{name}: runs {command!r}, expected chat-{name}")
    wanted = common | env_vars(f"services/{name}/src/config.rs")
    env = svc.get("environment") or {}
    have = set(env.keys() if isinstance(env, dict) else (e.split("=")[0] for e in env))
    for var in sorted(wanted - have):
        problems.append(f"{name}: does not set {var}, which chat-{name} reads")
    for var in sorted(v for v in have - wanted if not v.startswith("OTEL_")):
        problems.append(f"{name}: sets {var}, which chat-{name} does not read")

for path in ["Dockerfile", "scripts/up", "scripts/test"]:
    if BUILD not in (ROOT / path).read_text():
        problems.append(f"{path} does not build with `{BUILD}`")

if problems:
    print("compose.yaml:", *problems, sep="\n  ", file=sys.stderr)
    sys.exit(1)
print(f"compose.yaml: {len(services)} services, cross-references ok")
