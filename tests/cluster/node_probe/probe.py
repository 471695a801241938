"""Run as a job on a local cluster: what each node sees of /tmp, this machine's files and a shared folder.

Usage: ``python probe.py HOST_FILE SHARED_FOLDER``; prints one ``PROBE {json}`` line.
"""

import glob
import json
import os
import sys
import time

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


@ray.remote(num_cpus=0)
def look(host_file: str, shared: str) -> dict:
    node = ray.get_runtime_context().get_node_id()
    with open(f"/tmp/written-by-{node}", "w") as out:
        out.write(node)
    time.sleep(2)  # every node has written its file before any looks
    try:
        with open(os.path.join(shared, "written-by-a-node"), "w"):
            writable = True
    except OSError:
        writable = False
    with open(os.path.join(shared, "note.txt")) as note:
        text = note.read()
    return {"node": node, "sees": sorted(os.path.basename(p) for p in glob.glob("/tmp/written-by-*")),
            "host_file": os.path.exists(host_file), "shared": text, "shared_writable": writable,
            "home": os.path.expanduser("~")}


if __name__ == "__main__":
    ray.init()
    driver = ray.get_runtime_context().get_node_id()
    with open("/tmp/written-by-driver", "w") as out:
        out.write(driver)
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    seen = ray.get([look.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(*sys.argv[1:3])
                    for n in nodes])
    print("PROBE " + json.dumps({"driver": driver, "nodes": seen}))
