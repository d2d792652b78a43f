"""A real lab driven through the `cilia` CLI, as a user would."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from dataclasses import dataclass

import pytest

CILIA = os.path.join(os.path.dirname(sys.executable), "cilia")


@dataclass
class Result:
    rc: int
    out: str
    err: str

    def json(self):
        return json.loads(self.out)


class Lab:
    def __init__(self, name: str):
        self.name = name
        self.env = {**os.environ, "CILIA_LAB": name}

    def cilia(self, *args: str, input: str | None = None, timeout: float = 120,
              check: bool = True) -> Result:
        p = subprocess.run([CILIA, *args], input=input, capture_output=True, text=True,
                           env=self.env, timeout=timeout)
        r = Result(p.returncode, p.stdout, p.stderr)
        if check and p.returncode != 0:
            raise AssertionError(f"cilia {' '.join(args)} -> {p.returncode}\n{p.stdout}\n{p.stderr}")
        return r

    def down(self) -> None:
        subprocess.run([CILIA, "lab", "down", "--name", self.name], capture_output=True,
                       timeout=120)

    def apply(self, manifest: str) -> Result:
        return self.cilia("apply", "-f", "-", input=manifest)

    def exec(self, pod: str, *cmd: str, ns: str = "default", check: bool = True,
             timeout: float = 60) -> Result:
        return self.cilia("exec", "-n", ns, pod, "--", *cmd, check=check, timeout=timeout)

    def pods(self, ns: str = "default") -> dict[str, dict]:
        items = self.cilia("get", "pods", "-n", ns, "-o", "json").json()["items"]
        return {p["metadata"]["name"]: p for p in items}

    def pod_ip(self, name: str, ns: str = "default") -> str:
        return self.pods(ns)[name]["status"]["podIP"]


def unique_lab_name(prefix: str = "e") -> str:
    return prefix + uuid.uuid4().hex[:7]


@pytest.fixture(scope="module")
def lab_factory():
    """Labs made through `cilia lab up`, always torn down with `cilia lab down`."""
    made: list[Lab] = []

    def make(nodes: int = 1, routing: str = "tunnel", prefix: str = "e",
             store: str | None = None) -> Lab:
        lab = Lab(unique_lab_name(prefix))
        made.append(lab)
        args = ["lab", "up", "--name", lab.name, "--nodes", str(nodes), "--routing", routing]
        if store:
            args += ["--store", store]
        lab.cilia(*args, timeout=180)
        return lab

    yield make
    for lab in made:
        lab.down()
