"""cilium-cli's output: test headers, progress dots, buffered logs, the final report, JSON."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

from .model import Action


@dataclass
class TestRun:
    name: str
    index: int
    policies: tuple[str, ...] = ()
    actions: list[Action] = field(default_factory=list)
    scenarios: list[str] = field(default_factory=list)
    scenarios_skipped: list[tuple[str, str]] = field(default_factory=list)
    skipped: str | None = None          # why, when the whole test was skipped
    failed: bool = False
    errors: list[str] = field(default_factory=list)   # test-level failures (policy apply …)
    log: list[str] = field(default_factory=list)
    pre_lines: int | None = None        # how many log lines come before the scenarios
    duration: float = 0.0

    def failed_actions(self) -> list[Action]:
        return [a for a in self.actions if a.failed]


class Output:
    def __init__(self, verbose: bool, stream=None):
        self.verbose = verbose
        self.stream = stream or sys.stdout
        self._dots = False

    def line(self, text: str = "") -> None:
        if self._dots:
            self.stream.write("\n")
            self._dots = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def dot(self) -> None:
        if self.verbose:
            return
        self.stream.write(".")
        self.stream.flush()
        self._dots = True

    def end_dots(self) -> None:
        if self._dots:
            self.stream.write("\n")
            self.stream.flush()
            self._dots = False


def summary(runs: list[TestRun], out: Output, flow_note: str | None) -> bool:
    """Prints cilium-cli's closing lines; True when nothing failed."""
    ran = [r for r in runs if r.skipped is None]
    skipped = len(runs) - len(ran)
    actions = sum(len(r.actions) for r in ran)
    scen_skipped = sum(len(r.scenarios_skipped) for r in ran)
    failed = [r for r in ran if r.failed]
    out.line()
    if failed:
        fa = sum(len(r.failed_actions()) for r in failed)
        out.line("📋 Test Report")
        out.line(f"❌ {len(failed)}/{len(ran)} tests failed ({fa}/{actions} actions), "
                 f"{skipped} tests skipped, {scen_skipped} scenarios skipped:")
        for r in failed:
            out.line(f"Test [{r.name}]:")
            for e in r.errors:
                out.line(f"  ❌ {e}")
            for a in r.failed_actions():
                out.line(f"  ❌ {a}")
    else:
        out.line(f"✅ All {len(ran)} tests ({actions} actions) successful, {skipped} tests skipped, "
                 f"{scen_skipped} scenarios skipped.")
    if flow_note:
        out.line(f"ℹ️  Flow validation {flow_note}")
    unsure = [a for r in ran for a in r.actions if a.flow_status.startswith("inconclusive")]
    if unsure:
        out.line(f"⚠️  Flow validation inconclusive for {len(unsure)} actions:")
        for a in unsure:
            out.line(f"  ⚠️  {a} ({a.flow_status})")
    return not failed


def to_json(runs: list[TestRun], lab: str, namespace: str, flow_validation: str,
            interrupted: bool) -> dict:
    def action(a: Action) -> dict:
        return {
            "name": a.name, "scenario": a.scenario, "id": str(a),
            "source": {"name": a.src.name, "address": a.src.address},
            "destination": {"name": a.dst.name, "address": a.dst.address, "port": a.dst.port},
            "expected": {"egress": a.egress.describe(), "ingress": a.ingress.describe()},
            "exit_code": a.exit_code, "status": "failed" if a.failed else "passed",
            "flow_validation": a.flow_status, "log": a.log,
        }
    tests = []
    for r in runs:
        status = "skipped" if r.skipped is not None else ("failed" if r.failed else "passed")
        tests.append({"name": r.name, "status": status, "skip_reason": r.skipped,
                      "policies": list(r.policies), "errors": r.errors,
                      "scenarios_skipped": [{"name": n, "reason": why}
                                            for n, why in r.scenarios_skipped],
                      "duration_s": round(r.duration, 3),
                      "actions": [action(a) for a in r.actions]})
    ran = [r for r in runs if r.skipped is None]
    return {"lab": lab, "namespace": namespace, "flow_validation": flow_validation,
            "interrupted": interrupted,
            "summary": {"tests": len(ran), "failed": sum(r.failed for r in ran),
                        "skipped": len(runs) - len(ran),
                        "actions": sum(len(r.actions) for r in ran),
                        "failed_actions": sum(len(r.failed_actions()) for r in ran)},
            "tests": tests}


def write_json(path: str, data: dict) -> None:
    if path == "-":
        json.dump(data, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def write_junit(path: str, runs: list[TestRun], args: list[str], started: float) -> None:
    """cilium-cli's --junit-file layout: one testsuite, one testcase per test."""
    import time
    import xml.etree.ElementTree as ET
    ran = [r for r in runs if r.skipped is None]
    failures = sum(r.failed for r in ran)
    total_time = f"{sum(r.duration for r in runs):.3f}"
    suites = ET.Element("testsuites", tests=str(len(runs)), disabled=str(len(runs) - len(ran)),
                        failures=str(failures), time=total_time)
    suite = ET.SubElement(suites, "testsuite", name="connectivity test", package="cilia",
                          tests=str(len(runs)), skipped=str(len(runs) - len(ran)),
                          failures=str(failures), time=total_time,
                          timestamp=time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(started)))
    props = ET.SubElement(suite, "properties")
    ET.SubElement(props, "property", name="Args", value="|".join(args))
    for r in runs:
        status = "skipped" if r.skipped is not None else ("failed" if r.failed else "passed")
        case = ET.SubElement(suite, "testcase", name=r.name, classname="connectivity test",
                             status=status, time=f"{r.duration:.3f}")
        if r.skipped is not None:
            ET.SubElement(case, "skipped", message=f"{r.name} skipped")
        elif r.failed:
            fail = ET.SubElement(case, "failure", message=f"{r.name} failed", type="failure")
            fail.text = "\n".join(r.errors + [str(a) for a in r.failed_actions()])
    ET.indent(suites)
    ET.ElementTree(suites).write(path, encoding="utf-8", xml_declaration=True)
