"""`cilia connectivity test`: cilium-cli's connectivity suite against a running lab."""
from __future__ import annotations

import sys

import click

from cilia.cli.context import CLIError, lab_spec


@click.group("connectivity")
def connectivity() -> None:
    """Connectivity tests (cilium-cli's `cilium connectivity`)."""


@connectivity.command("test")
@click.option("--test", "tests", multiple=True, metavar="REGEX",
              help="Run tests matching REGEX (repeatable); a leading '!' excludes.")
@click.option("--test-namespace", default="cilia-test", show_default=True,
              help="Namespace the test workloads are deployed into (removed afterwards).")
@click.option("--connect-timeout", type=float, default=2.0, show_default=True,
              help="Seconds a probe waits for a connection.")
@click.option("--request-timeout", type=float, default=5.0, show_default=True,
              help="Seconds a probe waits for a whole request.")
@click.option("--timeout", type=float, default=60.0, show_default=True,
              help="Seconds to wait for deployments, services and policies to become ready.")
@click.option("--flow-validation", type=click.Choice(["disabled", "warning", "strict"]),
              default=None, help="Check each action's flows [default: strict when the "
                                 "observe API is available, else reported as skipped].")
@click.option("--print-flows", is_flag=True, help="Print the flows of every action.")
@click.option("--force-deploy", is_flag=True,
              help="Replace the test namespace when it already exists.")
@click.option("--single-node", is_flag=True,
              help="Deploy everything on one node (no echo-other-node, no cross-node scenarios).")
@click.option("--json-output", metavar="FILE", default=None,
              help="Also write the results as JSON to FILE ('-' for stdout).")
@click.option("--junit-file", metavar="FILE", default=None,
              help="Also write the results as JUnit XML to FILE (as cilium-cli does).")
@click.option("--test-concurrency", "concurrency", type=int, default=10, show_default=True,
              help="Probes run at the same time within a test.")
@click.option("-v", "--verbose", is_flag=True, help="Print every scenario and action.")
@click.pass_context
def test(ctx, tests, test_namespace, connect_timeout, request_timeout, timeout,
         flow_validation, print_flows, force_deploy, single_node, json_output, junit_file, concurrency,
         verbose) -> None:
    """Deploy test workloads and check pod, service, host, world and policy connectivity."""
    from cilia.connectivity.runner import Params, Runner, SelectionError, select
    from cilia.k8s import names
    problems = names.dns1123_label(test_namespace)
    if problems:
        raise CLIError(f"--test-namespace {test_namespace}: {problems[0]}")
    for flag, value in (("--connect-timeout", connect_timeout), ("--request-timeout", request_timeout),
                        ("--timeout", timeout)):
        if value <= 0:
            raise CLIError(f"{flag} {value:g}: must be more than 0 seconds")
    if concurrency < 1:
        raise CLIError("--test-concurrency: must be at least 1")
    from cilia.connectivity import suite
    from cilia.connectivity.deploy import WORLD_OTHER_IP
    try:
        if not select([t.name for t in suite.build(WORLD_OTHER_IP)], tests):
            raise CLIError(f"--test {' '.join(tests)}: no test matches")
    except SelectionError as e:
        raise CLIError(str(e)) from None
    spec = lab_spec(ctx)
    params = Params(namespace=test_namespace, tests=tests, connect_timeout=connect_timeout,
                    request_timeout=request_timeout, timeout=timeout, verbose=verbose,
                    flow_validation=flow_validation, json_output=json_output, junit_file=junit_file,
                    force_deploy=force_deploy, single_node=single_node, print_flows=print_flows,
                    concurrency=concurrency)
    sys.exit(Runner(spec, params).run())
