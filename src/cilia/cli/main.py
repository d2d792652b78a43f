"""`cilia`: the one CLI, kubectl- and cilium-shaped, thin over the store and agent APIs."""
from __future__ import annotations

import sys

import click

from cilia.cli.agent_cmd import bpf, endpoint, identity, status
from cilia.cli.connectivity_cmd import connectivity
from cilia.cli.context import CLIError
from cilia.cli.install_cmd import install, uninstall
from cilia.cli.k8s_cmd import apply, delete, exec_, get, wait
from cilia.cli.lab_cmd import lab
from cilia.cli.monitor_cmd import monitor
from cilia.kvstore import KVStoreError
from cilia.cli.service_cmd import service
from cilia.cli.observe_cmd import observe
from cilia.cli.hubble_cmd import hubble
from cilia.cli.policy_cmd import add_bpf_policy, add_endpoint_config, config, policy


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--lab", "lab_name", envvar="CILIA_LAB", default=None,
              help="Which lab (default: $CILIA_LAB, or the only lab running).")
@click.pass_context
def cli(ctx: click.Context, lab_name: str | None) -> None:
    """cilia: eBPF networking, load balancing, policy and observability for netns workloads."""
    ctx.ensure_object(dict)
    ctx.obj["lab"] = lab_name


@cli.command("version")
def version() -> None:
    from cilia.agent.daemon import VERSION
    click.echo(f"cilia {VERSION}")


for cmd in (lab, apply, delete, get, exec_, wait, status, endpoint, bpf, identity, service, observe, hubble):
    cli.add_command(cmd)
cli.add_command(connectivity)
for cmd in (install, uninstall):
    cli.add_command(cmd)
for cmd in (policy, config):
    cli.add_command(cmd)
cli.add_command(monitor)
add_bpf_policy(bpf)
add_endpoint_config(endpoint)


def main() -> int:
    try:
        rc = cli.main(prog_name="cilia", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted!", err=True)
        return 130
    except click.exceptions.Exit as e:
        return e.exit_code
    except CLIError as e:
        e.show()
        return 1
    except KVStoreError as e:
        click.echo(f"error: cluster store unreachable: {e}", err=True)
        return 1
    except click.ClickException as e:
        # Usage errors: one line, as everywhere else.
        msg = e.format_message()
        click.echo(f"error: {msg}", err=True)
        return e.exit_code
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
