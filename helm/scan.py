"""Policy scan of the chart: render helm/llava-triton with several values and scan the manifests with checkov.

    python helm/scan.py --checkov build/checkov-venv/bin/checkov   # `make scan-chart` (and `make lint`)

Helm's Go library renders (helm-python-sdk, the project's venv); checkov runs from its own venv
(helm/checkov-requirements.txt), offline (`--skip-download`). Exit status 1 on any failed check,
except the two that only a digest closes (CKV_K8S_43 image by digest, CKV_K8S_15 pull policy) in
the renders without `image.digest`, which is the chart's default (the digest of your build is
yours to give). The findings the chart accepts are skipped in its templates with their reasons
(checkov.io/skipN annotations; docs/kubernetes.md lists them) and printed here.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import helm_python as helm

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "llava-triton"
CHECKOV_VERSION = "3.3.30"
RELEASE, NAMESPACE = "llava", "serving"
DIGEST = "sha256:" + "0123456789abcdef" * 4

# Values rendered and scanned: the defaults, each switch that adds or removes something scanned.
RENDERS: dict[str, dict] = {
    "default": {},
    "openai-off": {"openai": {"enabled": False}},
    "digest": {"image": {"digest": DIGEST}},
    "download": {"checkpoint": {"download": {"enabled": True, "repoId": "llava-hf/llava-1.5-7b-hf",
                                             "tokenSecret": "hf-token"}}},
    "everything-optional": {
        "image": {"digest": DIGEST},
        "autoscaling": {"enabled": True}, "serviceMonitor": {"enabled": True},
        "podDisruptionBudget": {"enabled": True},
        "grpcTLS": {"enabled": True, "secretName": "llava-grpc-tls", "mutual": True},
        "restrictedAPIs": {"existingSecret": "llava-admin"},
        "networkPolicy": {"serverEgress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}],
                                            "ports": [{"port": 4317, "protocol": "TCP"}]}]},
        "service": {"type": "LoadBalancer"},
    },
    "no-export": {"image": {"digest": DIGEST}, "export": {"enabled": False},
                  "modelRepository": {"existingClaim": "llava-models"}},
    "open-cpu": {"restrictedAPIs": {"enabled": False}, "serviceAccount": {"create": False},
                 "gpus": 0, "export": {"device": "cpu"}},
}

TAG_ONLY = {"CKV_K8S_43", "CKV_K8S_15"}  # closed by image.digest only


def render(output: Path) -> None:
    """Each render's manifests under output/<render>/templates/<template>.yaml."""
    with helm.Chart.load(str(CHART)) as chart:
        for name, values in RENDERS.items():
            for path, text in chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True).items():
                if path.endswith(".yaml") and text.strip():
                    target = output / name / Path(path).relative_to(CHART.name)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_text(text)


def scan(checkov: Path, output: Path) -> dict:
    result = subprocess.run([str(checkov), "--directory", str(output), "--framework", "kubernetes",
                             "--skip-download", "--output", "json"], capture_output=True, text=True, check=False)
    try:
        report = json.loads(result.stdout)
    except json.JSONDecodeError:
        sys.exit(f"checkov gave no report (exit {result.returncode}): {result.stderr[-3000:]}")
    if isinstance(report, list):  # one report per framework; only kubernetes was asked for
        (report,) = report
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkov", type=Path, required=True, help="the checkov executable")
    parser.add_argument("--output", type=Path, default=ROOT / "build" / "chart-scan",
                        help="where the rendered manifests are written (emptied first)")
    args = parser.parse_args(argv)
    output = args.output.resolve()
    if output.exists():
        for stale in sorted(output.rglob("*"), reverse=True):
            stale.unlink() if stale.is_file() else stale.rmdir()
    render(output)
    report = scan(args.checkov, output)

    summary = report["summary"]
    problems = []
    if summary.get("checkov_version") != CHECKOV_VERSION:
        problems.append(f"checkov {summary.get('checkov_version')} ran, {CHECKOV_VERSION} is the one pinned")
    if summary.get("parsing_errors") or not summary.get("resource_count"):
        problems.append(f"checkov parsed nothing or failed to parse: {summary}")
    results = report.get("results", {})
    tag_only, failed = [], []
    for check in results.get("failed_checks", []):
        parts = Path(check["file_path"]).parts  # .../<render>/templates/<template>.yaml
        render_name = parts[parts.index("templates") - 1]
        finding = f"{render_name}: {check['check_id']} {check['check_name']} ({check['resource']})"
        if check["check_id"] in TAG_ONLY and not RENDERS[render_name].get("image", {}).get("digest"):
            tag_only.append(finding)
        else:
            failed.append(finding)
    accepted = Counter((c["check_id"], c["check_result"].get("suppress_comment", ""))
                       for c in results.get("skipped_checks", []))

    print(f"checkov {summary.get('checkov_version')} on {len(RENDERS)} renders ({', '.join(RENDERS)}): "
          f"{summary['resource_count']} resources, {summary['passed']} checks passed, {summary['failed']} failed, "
          f"{summary['skipped']} skipped")
    for (check_id, reason), count in sorted(accepted.items()):
        print(f"  accepted {check_id} ({count} resources): {reason}")
    print(f"  {len(tag_only)} findings of renders without image.digest (CKV_K8S_43, CKV_K8S_15): set image.digest")
    for finding in failed:
        print(f"  FAILED {finding}")
    for problem in problems:
        print(f"  ERROR {problem}")
    return 1 if failed or problems else 0


if __name__ == "__main__":
    sys.exit(main())
