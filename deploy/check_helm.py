"""Renders and lints the Helm chart with several value sets (run by deploy/check).

Usage: python check_helm.py CHART_DIR OUT_DIR KUBE_VERSION

Writes every rendered manifest of every value set to OUT_DIR/<set>/<n>.yaml, one
Kubernetes object per file (kubernetes-validate then checks them), and exits
non-zero when a render fails, lint reports anything (strict: warnings too), or a
value set does not produce the objects it is meant to.
"""

import copy
import os
import sys

import helm_python
import yaml

REQUIRED = {
    "database": {"url": "postgres://switchboard:secret@postgres:5432/switchboard"},
    "auth": {"jwksUrl": "https://clerk.example.com/.well-known/jwks.json"},
}


def merge(base, extra):
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


# name -> (values, kinds that must appear, kinds that must not)
VALUE_SETS = {
    "defaults": (REQUIRED, {"Deployment", "Service", "ConfigMap", "Secret", "Job",
                            "PodDisruptionBudget"}, {"Ingress", "HorizontalPodAutoscaler",
                                                     "ServiceMonitor"}),
    "ingress-tls": (merge(REQUIRED, {
        "ingress": {
            "enabled": True,
            "hosts": [{"host": "chat.example.com", "paths": [{"path": "/", "pathType": "Prefix"}]}],
            "tls": [{"secretName": "chat-example-com-tls", "hosts": ["chat.example.com"]}],
        },
        "corsOrigins": "https://app.example.com",
        "trustedProxies": "10.0.0.0/8",
    }), {"Ingress"}, set()),
    "autoscaling": (merge(REQUIRED, {
        "gateway": {"autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 12}},
    }), {"HorizontalPodAutoscaler"}, set()),
    "servicemonitor": (merge(REQUIRED, {
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus"}}},
    }), {"ServiceMonitor"}, set()),
    "existing-secrets": ({
        "auth": {"publicKey": "-----BEGIN PUBLIC KEY-----\nMIIB\n-----END PUBLIC KEY-----\n",
                 "issuer": "https://clerk.example.com", "authorizedParties": "https://app.example.com"},
        "redis": {"existingSecret": "switchboard-redis", "existingSecretKey": "url"},
        "database": {"existingSecret": "switchboard-db", "existingSecretKey": "url"},
        "otel": {"endpoint": "http://otel-collector:4318", "sampler": "parentbased_traceidratio",
                 "samplerArg": "0.1"},
        "extraEnv": [{"name": "PING_INTERVAL_MS", "value": "20000"}],
        "migrations": {"enabled": False},
        "podDisruptionBudget": {"enabled": False},
    }, {"Deployment"}, {"Secret", "Job", "PodDisruptionBudget"}),
}


def check_service_monitor(name, target):
    """The ServiceMonitor (a CRD, no schema in kubernetes-validate): every endpoint port is a
    named port of a Service it selects, and it selects the gateways and the workers."""
    docs = [yaml.safe_load(open(os.path.join(target, f))) for f in sorted(os.listdir(target))]
    monitors = [d for d in docs if d["kind"] == "ServiceMonitor"]
    services = [d for d in docs if d["kind"] == "Service"]
    out = []
    for sm in monitors:
        want = sm["spec"]["selector"]["matchLabels"]
        selected = [s for s in services
                    if all(s["metadata"].get("labels", {}).get(k) == v for k, v in want.items())]
        ports = {p.get("name") for s in selected for p in s["spec"]["ports"]}
        for ep in sm["spec"]["endpoints"]:
            if ep.get("port") not in ports:
                out.append(f"{name}: ServiceMonitor endpoint port {ep.get('port')!r} is not a port "
                           f"of the Services it selects ({sorted(ports)})")
        components = {s["metadata"]["labels"].get("app.kubernetes.io/component") for s in selected}
        if not {"gateway", "worker"} <= components:
            out.append(f"{name}: ServiceMonitor selects {sorted(map(str, components))}, "
                       "not both gateways and workers")
    return out


def main():
    chart_dir, out_dir, kube_version = sys.argv[1:4]
    chart = helm_python.Chart.load(chart_dir)
    failures = []
    for name, (values, must, must_not) in VALUE_SETS.items():
        try:
            rendered = chart.render(values, name="sb", namespace="chat", is_install=True)
        except helm_python.HelmError as e:
            failures.append(f"{name}: render failed: {e}")
            continue
        target = os.path.join(out_dir, name)
        os.makedirs(target, exist_ok=True)
        kinds = set()
        count = 0
        for template, text in sorted(rendered.items()):
            if not template.endswith((".yaml", ".yml")):
                continue
            for doc in yaml.safe_load_all(text):
                if not doc:
                    continue
                kinds.add(doc.get("kind"))
                count += 1
                with open(os.path.join(target, f"{count:02d}-{doc['kind']}.yaml"), "w") as f:
                    yaml.safe_dump(doc, f, sort_keys=False)
        failures += check_service_monitor(name, target)
        if not must <= kinds:
            failures.append(f"{name}: expected {sorted(must - kinds)} among {sorted(kinds)}")
        if must_not & kinds:
            failures.append(f"{name}: unexpected {sorted(must_not & kinds)}")
        report = helm_python.lint(chart_dir, values, strict=True, namespace="chat",
                                  kube_version=kube_version)
        problems = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2]
        problems += [{"error": e} for e in report.get("errors", [])]
        for p in problems:
            failures.append(f"{name}: lint: {p.get('path', '')} {p.get('error')}")
        print(f"helm {name}: {count} objects ({', '.join(sorted(kinds))}), lint "
              f"{'clean' if not problems else f'{len(problems)} finding(s)'}")

    # A release that could not authenticate anybody must be refused.
    try:
        chart.render({"database": REQUIRED["database"]}, name="sb", namespace="chat", is_install=True)
        failures.append("no-auth: render succeeded without auth.jwksUrl/auth.publicKey")
    except helm_python.HelmError:
        print("helm no-auth: refused, as it should be")

    for f in failures:
        print(f"FAIL {f}", file=sys.stderr)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
