"""What one Fargate task serves at the autoscaling target: the figures behind docker/fargate-autoscaling.json.

    .venv/bin/python bench/scaling.py --seconds 30

Starts the server with the task definition's own environment (docker/fargate-task-definition.json: its
workers, admission limits and model), then drives closed-loop clients, each sending the default request
(the model's default steps and size), at three loads: one client, the target (WEB_CONCURRENCY x
MAX_ONGOING in flight, what the KEDA and HPA thresholds aim at) and the task's capacity (WEB_CONCURRENCY x
(MAX_ONGOING + MAX_QUEUED)). It prints requests per minute per task beside the policy's TargetValue for
ALBRequestCountPerTarget (requests per target per minute). Measured on this machine's CPUs, not a Fargate
task's: run it on the task size you deploy and set TargetValue from its target row.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

from servers import ROOT, poll, server
from traffic import drive

DOCKER = ROOT / "docker"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="load time per row")
    args = parser.parse_args()
    task = json.loads((DOCKER / "fargate-task-definition.json").read_text())
    env = {item["name"]: item["value"] for item in task["containerDefinitions"][0]["environment"]}
    policy = json.loads((DOCKER / "fargate-autoscaling.json").read_text())["scalingPolicy"]
    target_value = policy["TargetTrackingScalingPolicyConfiguration"]["TargetValue"]
    workers, ongoing, queued = (int(env[name]) for name in ("WEB_CONCURRENCY", "MAX_ONGOING", "MAX_QUEUED"))
    loads = {"one client": 1, "target": workers * ongoing, "capacity": workers * (ongoing + queued)}
    job = {"prompt": "a red circle on a white background"}
    rows = []
    with tempfile.TemporaryDirectory() as cache, server(cache, **env) as (url, _, _):
        poll(url + "/readyz", lambda r: r.status_code == 200, 300, interval=0.2)
        drive(url, 2, min(3.0, 2 * args.seconds), job=job)  # warm the caches and the service-time estimate
        for name, clients in loads.items():
            rows.append((name, clients, drive(url, clients, args.seconds, job=job)))
    print(
        f"\n{env['MODEL_ID']}, WEB_CONCURRENCY={workers}, MAX_ONGOING={ongoing}, MAX_QUEUED={queued}; "
        f"{os.cpu_count()} CPUs here (the task definition asks for {int(task['cpu']) // 1024} vCPU); "
        f"{args.seconds:g} s per row\n"
    )
    print("| load | clients in flight | requests/min per task | p50 / p99 ms | shed (503) | errors |")
    print("|---|---|---|---|---|---|")
    for name, clients, r in rows:
        print(
            f"| {name} | {clients} | {r['images_per_s'] * 60:.0f} | {r['accepted_p50_ms']:.0f} / "
            f"{r['accepted_p99_ms']:.0f} | {r['rejected']} | {r['errors']} |"
        )
    at_target = rows[1][2]["images_per_s"] * 60
    print(
        f"\nALBRequestCountPerTarget TargetValue {target_value:g} requests/min per task: "
        f"{target_value / at_target:.2f}x what one task served here at the target load ({at_target:.0f})"
    )


if __name__ == "__main__":
    main()
