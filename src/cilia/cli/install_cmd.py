"""`cilia install` / `cilia uninstall`: cilia on a real host instead of a lab."""
from __future__ import annotations

import click

from cilia.cli.context import CLIError
from cilia.install import config as C


def _state_dir_option(f):
    return click.option("--state-dir", default=None,
                        help=f"Install record, store, logs, endpoint state "
                             f"(default: $CILIA_STATE_DIR or {C.DEFAULT_STATE_DIR}).")(f)


@click.command("install")
@click.option("--store", type=click.Choice(["local", "etcd"]), default="local",
              help="local: a SQLite file in the state dir; etcd: --etcd-endpoints.")
@click.option("--etcd-endpoints", default="", help="URL[,URL...], e.g. http://10.0.0.1:2379")
@click.option("--cni-bin-dir", default=C.DEFAULT_CNI_BIN_DIR, show_default=True)
@click.option("--cni-conf-dir", default=C.DEFAULT_CNI_CONF_DIR, show_default=True)
@_state_dir_option
@click.option("--run-dir", default=C.DEFAULT_RUN_DIR, show_default=True,
              help="Agent socket and pid files.")
@click.option("--cluster", default=C.DEFAULT_CLUSTER, show_default=True)
@click.option("--node", default="", help="Node name (default: the host name).")
@click.option("--node-ip", default="", help="Default: the uplink's first IPv4 address.")
@click.option("--pod-cidr", default="auto", show_default=True,
              help="This node's pod CIDR, or auto to get one from cilia-operator.")
@click.option("--cluster-cidr", default=C.DEFAULT_CLUSTER_CIDR, show_default=True,
              help="The pool cilia-operator hands pod CIDRs out of.")
@click.option("--routing", type=click.Choice(["tunnel", "native"]), default="tunnel",
              show_default=True)
@click.option("--uplink", default="", help="Underlay device (default: the default route's).")
@click.option("--mtu", type=int, default=0, help="Pod MTU (default: from the uplink).")
@click.option("--netns", default="",
              help="Run the daemons in this named network namespace (a stand-in host).")
def install(store, etcd_endpoints, cni_bin_dir, cni_conf_dir, state_dir, run_dir, cluster,
            node, node_ip, pod_cidr, cluster_cidr, routing, uplink, mtu, netns) -> None:
    """Install cilia on this host: agent + operator (supervised), CNI plugin and conflist."""
    from cilia.install.installer import install as do_install
    cfg = C.InstallConfig(
        cluster=cluster, node=node, node_ip=node_ip, pod_cidr=pod_cidr,
        cluster_cidr=cluster_cidr, routing=routing, uplink=uplink, mtu=mtu, store=store,
        etcd_endpoints=[e for e in etcd_endpoints.split(",") if e.strip()],
        cni_bin_dir=cni_bin_dir, cni_conf_dir=cni_conf_dir,
        state_dir=state_dir or C.state_dir_from_env(), run_dir=run_dir, netns=netns)
    try:
        rec = do_install(cfg, progress=lambda m: click.echo(f"✓ {m}"))
    except C.InstallError as e:
        raise CLIError(str(e)) from None
    c = rec.config
    click.echo(f"✓ cilia installed: cluster {c.cluster}, node {c.node}, store {c.store}, "
               f"state in {c.state_dir}")
    hint = "" if c.state_dir == C.DEFAULT_STATE_DIR else f"CILIA_STATE_DIR={c.state_dir} "
    click.echo(f"  {hint}cilia status    |    {hint}cilia uninstall")


@click.command("uninstall")
@_state_dir_option
def uninstall(state_dir) -> None:
    """Stop cilia on this host and remove everything the install made."""
    from cilia.install.installer import uninstall as do_uninstall
    try:
        removed = do_uninstall(state_dir or C.state_dir_from_env(),
                               progress=lambda m: click.echo(f"✓ {m}"))
    except C.InstallError as e:
        raise CLIError(str(e)) from None
    click.echo(f"✓ cilia uninstalled ({len(removed)} objects removed)")
