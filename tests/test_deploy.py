"""deploy/: what each file must say, checked offline.

  * nginx.conf: the directives the retry and streaming design rests on, parsed (tests/test_nginx.py
    runs the file for real);
  * llamabox.service: `systemd-analyze verify` and its offline security score where systemd is
    installed; always, the keys parsed, and ExecStart parsed by llamabox's own argument parser;
  * k8s/: every manifest validated against Kubernetes' schemas (kubernetes-validate ships them;
    the network is blocked while it runs), then the probes, grace period, volumes and the
    commands checked against each other and against llamabox's CLI."""
from __future__ import annotations

import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from server.cli import build_parser
from server.settings import Settings

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
DEFAULTS = Settings()
DRAIN_CANCEL_GRACE_S = 5  # after the drain timeout, llamabox gives its 503s this long to go out (server/wsgi.py)


def serve_args(argv: list[str]):
    """argv (without the program name) as `llamabox` parses it; must be `serve`."""
    args = build_parser().parse_args(argv)
    assert args.command == "serve", argv
    return args


# --- nginx.conf ------------------------------------------------------------------------------------

def parse_nginx(text: str) -> list:
    """nginx's configuration syntax as a tree: [(name, [args], children or None), ...]."""
    tokens = re.findall(r"""'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|#[^\n]*|[{};]|[^\s{};'"#]+""", text)
    tokens = [t for t in tokens if not t.startswith("#")]
    pos = 0

    def block() -> list:
        nonlocal pos
        out, words = [], []
        while pos < len(tokens):
            t = tokens[pos]
            pos += 1
            if t == ";":
                out.append((words[0], words[1:], None))
                words = []
            elif t == "{":
                name, args = words[0], words[1:]
                out.append((name, args, block()))
                words = []
            elif t == "}":
                assert not words, words
                return out
            else:
                words.append(t[1:-1] if t[0] in "'\"" else t)
        assert not words, words
        return out

    return block()


def find(tree: list, name: str, *args: str) -> list:
    return [d for d in tree if d[0] == name and (not args or tuple(d[1][: len(args)]) == args)]


def one(tree: list, name: str, *args: str):
    found = find(tree, name, *args)
    assert len(found) == 1, f"{name} {' '.join(args)}: {len(found)} found"
    return found[0]


def seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+)(ms|s|m|h)?", value)
    assert m, value
    return int(m[1]) * {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600}[m[2]]


def size_bytes(value: str) -> int:
    m = re.fullmatch(r"(\d+)([kKmMgG])?", value)
    assert m, value
    return int(m[1]) * {None: 1, "k": 1024, "m": 1 << 20, "g": 1 << 30}[m[2] and m[2].lower()]


@pytest.fixture(scope="module")
def nginx_conf():
    tree = parse_nginx((DEPLOY / "nginx.conf").read_text())
    http = one(tree, "http")[2]
    return http, one(http, "upstream", "llamabox")[2], one(http, "server")[2]


def test_nginx_upstream_balances_by_least_connections_with_kept_alive_connections(nginx_conf):
    _, upstream, server = nginx_conf
    assert find(upstream, "least_conn") and find(upstream, "zone")
    servers = find(upstream, "server")
    assert len(servers) >= 2
    for _, args, _ in servers:
        opts = dict(a.split("=", 1) for a in args[1:])
        # A marked replica is skipped; when all are marked nginx answers 502 to everything. Marks that
        # outlast a replica's restart (nginx's default: 10 s) did that in a rolling restart.
        assert int(opts["max_fails"]) > 1 and seconds(opts["fail_timeout"]) <= 2
    assert int(one(upstream, "keepalive")[1][0]) > 0
    # nginx closes idle upstream connections before llamabox does, so it never reuses one being closed.
    assert seconds(one(upstream, "keepalive_timeout")[1][0]) < DEFAULTS.idle_timeout_s
    assert one(server, "proxy_http_version")[1] == ["1.1"]
    assert one(server, "proxy_set_header", "Connection")[1] == ["Connection", ""]


def test_nginx_retries_only_where_no_generation_can_have_started(nginx_conf):
    _, _, server = nginx_conf
    assert set(one(server, "proxy_next_upstream")[1]) == {"error", "http_503", "non_idempotent"}
    assert 1 < int(one(server, "proxy_next_upstream_tries")[1][0]) <= 5
    assert one(server, "proxy_request_buffering")[1] == ["on"]  # a retried POST needs its whole body
    for location in find(server, "location"):  # no location may loosen it
        assert not find(location[2] or [], "proxy_next_upstream"), location[1]


def test_nginx_timeouts_limits_streams_and_keys(nginx_conf):
    _, _, server = nginx_conf
    assert seconds(one(server, "proxy_read_timeout")[1][0]) > DEFAULTS.request_timeout_s  # our 504 comes first
    assert seconds(one(server, "proxy_connect_timeout")[1][0]) <= 10
    assert size_bytes(one(server, "client_max_body_size")[1][0]) == DEFAULTS.max_body_bytes
    assert size_bytes(one(server, "client_body_buffer_size")[1][0]) >= DEFAULTS.max_body_bytes
    assert one(server, "proxy_set_header", "Authorization")[1] == ["Authorization", "$http_authorization"]
    v1 = one(server, "location", "/v1/")[2]
    assert one(v1, "proxy_buffering")[1] == ["off"]
    assert one(v1, "proxy_pass")[1] == ["http://llamabox"]
    for location in find(server, "location"):
        # proxy_set_header in a location would drop every one set on the server (nginx inheritance).
        assert not find(location[2] or [], "proxy_set_header"), location[1]


# --- llamabox.service ------------------------------------------------------------------------------

def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """systemd's unit syntax: section -> key -> every value given (keys may repeat)."""
    out: dict[str, dict[str, list[str]]] = {}
    section = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = out.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        section.setdefault(key.strip(), []).append(value.strip())
    return out


@pytest.fixture(scope="module")
def unit():
    return parse_unit((DEPLOY / "llamabox.service").read_text())


def test_the_unit_runs_llamabox_serve_drains_within_the_stop_timeout_and_is_hardened(unit):
    svc = unit["Service"]
    value = {k: v[-1] for k, v in svc.items()}
    argv = shlex.split(value["ExecStart"].replace("%d", "/run/credentials/llamabox.service"))
    assert argv[0].endswith("/llamabox")
    args = serve_args(argv[1:])
    assert args.api_key_file == "/run/credentials/llamabox.service/api-keys"  # LoadCredential=api-keys:...
    assert any(v.startswith("api-keys:") for v in svc["LoadCredential"])
    assert seconds(value["TimeoutStopSec"]) > args.drain_timeout + DRAIN_CANCEL_GRACE_S
    assert value["KillSignal"] == "SIGTERM" and value["Restart"] == "on-failure"
    assert value["DynamicUser"] == "yes" and value["ProtectSystem"] == "strict"
    # The store is the state directory: the one place the service may write.
    assert value["StateDirectory"] == "llamabox"
    assert "LLAMABOX_HOME=%S/llamabox" in svc["Environment"]
    assert re.fullmatch(r"\d+[KMGT]?", value["MemoryMax"])
    for key in ("NoNewPrivileges", "PrivateTmp", "ProtectHome", "PrivateDevices", "ProtectKernelTunables",
                "ProtectKernelModules", "ProtectControlGroups", "RestrictSUIDSGID", "LockPersonality"):
        assert value[key] == "yes", key
    assert value["CapabilityBoundingSet"] == ""
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (Debian: apt-get install systemd); "
                                                    "the unit's keys are still checked by the test above")
def test_systemd_analyze_verify_finds_nothing_and_rates_the_unit_ok(tmp_path):
    # verify checks that ExecStart's program exists: point it at this checkout's llamabox.
    here = Path(sys.executable).parent / "llamabox"
    if not here.exists():
        pytest.skip(f"{here} is not installed (pip install -e .)")
    text = (DEPLOY / "llamabox.service").read_text()
    assert text.count("/opt/llamabox/.venv/bin/llamabox") == 1
    unit_file = tmp_path / "llamabox.service"
    unit_file.write_text(text.replace("/opt/llamabox/.venv/bin/llamabox", str(here)))
    r = subprocess.run([SYSTEMD_ANALYZE, "verify", str(unit_file)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and unit_file.name not in r.stderr, r.stderr  # warnings (unknown keys...) fail too
    r = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=true", "--no-pager", str(unit_file)],
                       capture_output=True, text=True, timeout=60)
    if "--offline" in r.stderr and r.returncode != 0:
        pytest.skip(f"this systemd-analyze has no offline security review: {r.stderr.strip()}")
    m = re.search(r"Overall exposure level for \S+: ([\d.]+)", r.stdout + r.stderr)
    assert m, r.stdout[-500:] + r.stderr[-500:]
    print(f"\nsystemd-analyze security: exposure {m[1]} (0 = locked down, 10 = exposed)")
    assert float(m[1]) <= 2.0


# --- Kubernetes ----------------------------------------------------------------------------------------

KUBE_VERSIONS = ("1.29", "1.33")  # an older one still in clusters, and a recent one; kubernetes-validate has both


def manifests() -> dict[str, list[dict]]:
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d] for p in sorted((DEPLOY / "k8s").glob("*.yaml"))}


def by_kind(kind: str) -> list[dict]:
    return [d for docs in manifests().values() for d in docs if d["kind"] == kind]


@pytest.fixture()
def no_network(monkeypatch):
    def refuse(*_a, **_k):
        raise OSError("network access during an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_every_manifest_is_valid_kubernetes_offline(version, no_network):
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install -e '.[test]' (kubernetes-validate)")
    kinds = []
    for name, docs in manifests().items():
        for doc in docs:
            # strict: an unknown field (a typo such as readinesProbe) is an error, not ignored.
            kubernetes_validate.validate(doc, version, strict=True)
            kinds.append(doc["kind"])
    assert {"Deployment", "Service", "PersistentVolumeClaim", "Job"} <= set(kinds), kinds


def container(doc: dict) -> dict:
    (c,) = doc["spec"]["template"]["spec"]["containers"]
    return c


def test_the_deployment_probes_drains_and_mounts_the_store():
    (dep,) = by_kind("Deployment")
    pod = dep["spec"]["template"]["spec"]
    c = container(dep)
    args = serve_args(c["command"][1:] + c["args"])
    assert c["command"][0] == "llamabox"
    port = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert port["http"] == args.port and args.host == "0.0.0.0"

    assert c["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    start = c["startupProbe"]
    assert start["httpGet"]["path"] == "/health"
    assert start["failureThreshold"] * start["periodSeconds"] >= 600  # a 7B load (and its sha256 check) fits

    # preStop sleep, then SIGTERM and the drain, and the cancelled requests' answers: all inside the grace period.
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > int(pre_stop[1]) + args.drain_timeout + DRAIN_CANCEL_GRACE_S
    assert args.timeout == DEFAULTS.request_timeout_s

    env = {e["name"]: e.get("value") for e in c["env"]}
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert env["LLAMABOX_HOME"] == mounts["store"]["mountPath"]
    pvcs = {d["metadata"]["name"] for d in by_kind("PersistentVolumeClaim")}
    assert volumes["store"]["persistentVolumeClaim"]["claimName"] in pvcs
    assert Path(args.api_key_file).parent == Path(mounts["api-keys"]["mountPath"])
    assert "secret" in volumes["api-keys"]
    assert c["resources"]["requests"]["memory"] and c["resources"]["limits"]["memory"]
    assert int(c["resources"]["limits"]["cpu"]) == args.threads
    assert c["securityContext"]["readOnlyRootFilesystem"] and pod["securityContext"]["runAsNonRoot"]


def test_the_service_and_budget_select_the_server_pods_only():
    (dep,) = by_kind("Deployment")
    (job,) = by_kind("Job")
    (svc,) = by_kind("Service")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    job_labels = job["spec"]["template"]["metadata"]["labels"]
    selector = svc["spec"]["selector"]
    assert selector.items() <= pod_labels.items() and not selector.items() <= job_labels.items()
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    port_names = {p["name"] for p in container(dep)["ports"]}
    assert all(p["targetPort"] in port_names for p in svc["spec"]["ports"])
    for pdb in by_kind("PodDisruptionBudget"):
        assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_the_import_job_writes_the_store_the_deployment_reads():
    (job,) = by_kind("Job")
    (dep,) = by_kind("Deployment")
    c = container(job)
    assert c["command"][:2] == ["llamabox", "import"] and c["command"][2].startswith("/bundles/")
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert "/bundles" in mounts and not mounts[{e["name"]: e["value"] for e in c["env"]}["LLAMABOX_HOME"]].get("readOnly")
    claims = lambda d: {v["name"]: v["persistentVolumeClaim"]["claimName"]  # noqa: E731
                        for v in d["spec"]["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v}
    assert claims(job)["store"] == claims(dep)["store"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"


def test_the_import_job_command_parses():
    (job,) = by_kind("Job")
    args = build_parser().parse_args(container(job)["command"][1:])
    assert args.command == "import"


def test_the_readmes_upload_pod_is_a_valid_pod_on_the_bundles_volume(no_network):
    """deploy/README.md's `kubectl run --overrides` for copying a bundle onto the volume."""
    import json

    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install -e '.[test]' (kubernetes-validate)")
    m = re.search(r"kubectl run llamabox-upload .*--overrides='([^']+)'", (DEPLOY / "README.md").read_text())
    assert m, "no upload command in deploy/README.md"
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "llamabox-upload"}, **json.loads(m[1])}
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(pod, version, strict=True)
    (job,) = by_kind("Job")
    claims = {v["persistentVolumeClaim"]["claimName"] for v in job["spec"]["template"]["spec"]["volumes"]
              if "persistentVolumeClaim" in v}
    assert pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] in claims
    assert pod["spec"]["containers"][0]["volumeMounts"][0]["mountPath"] == "/bundles"
